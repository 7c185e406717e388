"""The reference kernel: plain XLA attention that materialises the (T, S) score matrix.

Every other kernel is tested against this one (run at ``precision=HIGHEST``).
"""

import jax
import jax.numpy as jnp

from .._checks import shape_checked
from .._mods import split_score_mod
from .._typing import (
    AttentionMask,
    AttentionOutput,
    KeyArray,
    PRNGKeyArray,
    QueryArray,
    ScoreMod,
    ValueArray,
)
from ._common import (
    accumulation_dtype,
    apply_score_mods,
    check_dropout,
    check_mask,
    check_qkv,
    default_scale,
    safe_normaliser,
    safe_row_max,
)

__all__ = ["standard_attention"]


def _modded_scores(
    query: jax.Array,
    key: jax.Array,
    *,
    mask: jax.Array | None,
    score_mod: ScoreMod | None,
    scale_value: float,
    precision: jax.lax.PrecisionLike,
) -> jax.Array:
    """Scaled scores (B, H, T, S) in the accumulation dtype, mods and ``mask`` applied
    (disallowed pairs at -inf)."""
    batch, num_heads, seq_q, head_dim = query.shape
    num_kv_heads, seq_kv = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    acc = accumulation_dtype(query.dtype)
    grouped_query = query.reshape(batch, num_kv_heads, group, seq_q, head_dim)
    scores = jnp.einsum(
        "bkgtd,bksd->bkgts",
        grouped_query,
        key,
        precision=precision,
        preferred_element_type=acc,
    ).reshape(batch, num_heads, seq_q, seq_kv)
    scores = scores * jnp.asarray(scale_value, acc)

    mask_mod, value_mod = split_score_mod(score_mod)
    b_idx = jnp.arange(batch).reshape(batch, 1, 1, 1)
    h_idx = jnp.arange(num_heads).reshape(1, num_heads, 1, 1)
    q_idx = jnp.arange(seq_q).reshape(1, 1, seq_q, 1)
    kv_idx = jnp.arange(seq_kv).reshape(1, 1, 1, seq_kv)
    scores, _ = apply_score_mods(
        scores,
        mask_mod=mask_mod,
        value_mod=value_mod,
        b_idx=b_idx,
        h_idx=h_idx,
        q_idx=q_idx,
        kv_idx=kv_idx,
        allowed=mask,
    )
    return scores


@shape_checked
def standard_attention(
    query: QueryArray,
    key: KeyArray,
    value: ValueArray,
    *,
    mask: AttentionMask | None = None,
    score_mod: ScoreMod | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    scale: float | None = None,
    precision: jax.lax.PrecisionLike = None,
) -> AttentionOutput:
    r"""Softmax attention, :math:`\mathrm{softmax}(\mathrm{mod}(s QK^\top)) V`.

    Args:
      query: (batch, heads, seq_q, head_dim).
      key: (batch, kv_heads, seq_kv, head_dim); ``kv_heads`` divides ``heads`` (GQA/MQA: query
        head ``h`` reads key head ``h // (heads // kv_heads)``, by a grouped einsum, without
        repeating key heads).
      value: like ``key``.
      mask: boolean, broadcastable to (batch, heads, seq_q, seq_kv); True means attend.
      score_mod: applied to the scaled scores with absolute (batch, head, query, key) indices.
      dropout_rng: key for dropout on the attention weights.
      dropout_rate: probability of dropping a weight, in [0, 1).
      deterministic: no dropout when True.
      scale: score scale, ``1 / sqrt(head_dim)`` by default.
      precision: matmul precision (``jax.lax.Precision.HIGHEST`` for a float32 reference).

    Returns:
      (batch, heads, seq_q, head_dim) in the query's dtype. Softmax and accumulation run in
      float32 for bf16/fp16 inputs. A query row with no allowed key returns zeros (never NaN),
      with finite gradients.

    Raises:
      ValueError: for shapes that do not fit together or bad dropout arguments.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> kv = jax.random.normal(jax.random.key(1), (1, 1, 8, 4))  # MQA: one key/value head
      >>> out = attnax.standard_attention(q, kv, kv, mask=attnax.make_causal_mask(8))
      >>> out.shape, out.dtype
      ((1, 2, 8, 4), dtype('float32'))
      >>> no_key = jnp.zeros((1, 1, 8, 8), bool)
      >>> bool(jnp.all(attnax.standard_attention(q, kv, kv, mask=no_key) == 0))  # no NaN
      True
    """
    name = "standard_attention"
    query, key, value = check_qkv(query, key, value, name=name)
    check_mask(mask, query, key, name=name)
    dropout_active = check_dropout(dropout_rate, dropout_rng, deterministic, name=name)
    batch, num_heads, seq_q, head_dim = query.shape
    num_kv_heads, seq_kv = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    acc = accumulation_dtype(query.dtype)
    scale_value = default_scale(head_dim, scale)

    scores = _modded_scores(
        query, key, mask=mask, score_mod=score_mod, scale_value=scale_value, precision=precision
    )

    row_max = jax.lax.stop_gradient(safe_row_max(scores))
    weights = jnp.exp(scores - row_max)
    denominator = safe_normaliser(jnp.sum(weights, axis=-1, keepdims=True))
    weights = weights / denominator
    if dropout_active:
        assert dropout_rng is not None
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)

    out = jnp.einsum(
        "bkgts,bksd->bkgtd",
        weights.reshape(batch, num_kv_heads, group, seq_q, seq_kv),
        value.astype(acc),
        precision=precision,
        preferred_element_type=acc,
    )
    return out.reshape(batch, num_heads, seq_q, head_dim).astype(query.dtype)
