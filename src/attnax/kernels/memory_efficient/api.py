"""The public entry: checks the arguments, picks the fused GPU tile or the XLA tiles, and wires
the XLA tiles' forward and backward into one ``custom_vjp``."""

import functools
from typing import Any, Literal

import jax

from ..._checks import positive_int, shape_checked
from ..._mods import split_score_mod
from ..._typing import (
    AttentionMask,
    AttentionOutput,
    KeyArray,
    PRNGKeyArray,
    QueryArray,
    ScoreMod,
    ValueArray,
)
from .._common import check_dropout, check_mask, check_qkv, default_scale
from .backward import attention_bwd
from .forward import attention_fwd
from .fused import fused_attention, use_fused_tile
from .plan import NAME, Config, fit_block, partition

__all__ = ["memory_efficient_attention"]


# --------------------------------------------------------------------------- custom_vjp


def _attention(config: Config, *operands: Any) -> jax.Array:
    out, _ = attention_fwd(config, *operands)
    return out


_attention_vjp = jax.custom_vjp(_attention, nondiff_argnums=(0,))
_attention_vjp.defvjp(attention_fwd, attention_bwd)


@functools.partial(jax.jit, static_argnums=(0,))
def _attention_jit(config: Config, *operands: Any) -> jax.Array:
    out: jax.Array = _attention_vjp(config, *operands)
    return out


def _xla_config(
    query: jax.Array,
    key: jax.Array,
    score_mod: Any,
    *,
    dropout_rate: float,
    dropout_active: bool,
    block_size: int,
    scale: float | None,
) -> tuple[Config, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """The XLA tiles' static configuration and the mask and value mods' array leaves."""
    seq_q, head_dim = query.shape[2], query.shape[3]
    seq_kv = key.shape[2]
    mask_mod, value_mod = split_score_mod(score_mod)
    mask_leaves, mask_static = partition(mask_mod)
    value_leaves, value_static = partition(value_mod)
    config = Config(
        scale=default_scale(head_dim, scale),
        seq_q=seq_q,
        seq_kv=seq_kv,
        block_q=fit_block(seq_q, block_size),
        block_kv=fit_block(seq_kv, block_size),
        dropout_rate=float(dropout_rate) if dropout_active else 0.0,
        mask_mod=mask_static,
        value_mod=value_static,
        has_mask_mod=mask_mod is not None,
        has_value_mod=value_mod is not None,
    )
    return config, mask_leaves, value_leaves


# --------------------------------------------------------------------------- public


@shape_checked
def memory_efficient_attention(
    query: QueryArray,
    key: KeyArray,
    value: ValueArray,
    *,
    mask: AttentionMask | None = None,
    score_mod: ScoreMod | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    block_size: int = 512,
    scale: float | None = None,
    implementation: Literal["xla", "pallas"] | None = None,
) -> AttentionOutput:
    r"""Softmax attention in O(T * D) memory, forward and backward.

    Computes :math:`\mathrm{softmax}(\mathrm{mod}(s QK^\top)) V` tile by tile with an online
    softmax (running maximum and denominator in float32), never forming the (T, S) score
    matrix. The backward is a ``custom_vjp`` that recomputes each probability tile from the
    saved per-row log-sum-exp (FlashAttention-2).

    Args:
      query: (batch, heads, seq_q, head_dim).
      key: (batch, kv_heads, seq_kv, head_dim); ``kv_heads`` divides ``heads`` (GQA/MQA: query
        head ``h`` reads key head ``h // (heads // kv_heads)``; key heads are never repeated,
        and their gradients are summed over the group).
      value: like ``key``.
      mask: boolean, broadcastable to (batch, heads, seq_q, seq_kv); True means attend. Tiles
        it rules out entirely are skipped.
      score_mod: applied to the scaled scores of each tile with absolute indices. Its mask
        part (causal, sliding window, prefix-LM, document, any mask mod) is turned into block
        classes so that empty tiles are skipped and full tiles skip the mask evaluation; its
        value part (ALiBi, softcap, a bias, a plain callable) is applied per tile, and its
        array leaves (for example the bias of :func:`~attnax.additive_bias_mod`) receive
        gradients. Arrays closed over by a plain callable receive no gradient: wrap them in
        a pytree mod instead.
      dropout_rng: key for dropout on the attention weights.
      dropout_rate: probability of dropping a weight, in [0, 1). Each tile draws its mask from
        ``fold_in(fold_in(dropout_rng, query_block), key_block)``, in the forward and again in
        the backward, so the masks agree without being stored; the random stream therefore
        differs from :func:`~attnax.standard_attention`'s for the same key.
      deterministic: no dropout when True.
      block_size: the largest tile edge, for query and key blocks. Shorter sequences use one
        tile; otherwise the smallest tile that covers the sequence in the same number of
        tiles is used, and the sequence is padded internally (padded keys are excluded).
      scale: score scale, ``1 / sqrt(head_dim)`` by default.
      implementation: ``"xla"`` runs the tiles as XLA loops (any backend, any mod, dropout).
        ``"pallas"`` runs the fused GPU tile: an XLA scan over steps of ``block_size`` keys,
        one Pallas kernel per step keeping the float32 softmax state in HBM between steps, and
        Pallas FlashAttention-2 backward kernels; it needs an NVIDIA GPU, no dropout and a
        score mod built from attnax's mods (plain callables may capture arrays, which a
        kernel cannot take). ``None`` (default) picks ``"pallas"`` when those hold and the
        inputs are bf16 or fp16, and ``"xla"`` otherwise (float32 keeps XLA's exact products).
        A Pallas kernel has no partitioning rule, so ``jit``'s automatic sharding does not
        split it over devices as it splits the XLA tiles: call it inside ``shard_map`` for
        data or tensor parallelism, or pass ``"xla"``.

    Returns:
      (batch, heads, seq_q, head_dim) in the query's dtype. Softmax statistics and
      accumulators are float32 for bf16/fp16 inputs. A query row with no allowed key returns
      zeros, with finite (zero) gradients.

    Raises:
      ValueError: for shapes that do not fit together, bad dropout arguments, a non-positive
        ``block_size``, an unknown ``implementation``, or ``implementation="pallas"`` for a
        call the fused tile cannot serve (the message says why).

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> kv = jax.random.normal(jax.random.key(1), (1, 2, 8, 4))
      >>> out = attnax.memory_efficient_attention(
      ...     q, kv, kv, score_mod=attnax.causal_mod(), block_size=4)  # 2 x 2 tiles
      >>> ref = attnax.standard_attention(q, kv, kv, score_mod=attnax.causal_mod())
      >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
      ((1, 2, 8, 4), True)
    """
    query, key, value = check_qkv(query, key, value, name=NAME)
    check_mask(mask, query, key, name=NAME)
    dropout_active = check_dropout(dropout_rate, dropout_rng, deterministic, name=NAME)
    positive_int(block_size, "block_size", caller=NAME)
    if use_fused_tile(implementation, query, score_mod, dropout_active):
        return fused_attention(
            query, key, value, mask=mask, score_mod=score_mod, scale=scale, block_size=block_size
        )
    config, mask_leaves, value_leaves = _xla_config(
        query,
        key,
        score_mod,
        dropout_rate=dropout_rate,
        dropout_active=dropout_active,
        block_size=block_size,
        scale=scale,
    )
    rng = dropout_rng if dropout_active else None
    out: AttentionOutput = _attention_jit(
        config, query, key, value, mask, mask_leaves, value_leaves, rng
    )
    return out
