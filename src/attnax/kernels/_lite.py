r"""Lite attention: element-wise gated attention of the Attention Free Transformer family.

AFT-simple (Zhai et al. 2021, "An Attention Free Transformer", arXiv:2105.14103, eq. 3 with
the position biases dropped) replaces the dot-product score by a per-channel softmax of the
keys over positions, gated by the sigmoid of a query-side signal:

.. math::

    o_{t,d} = \sigma(g_{t,d}) \cdot
              \frac{\sum_{s \in A(t)} e^{k_{s,d}} v_{s,d}}{\sum_{s \in A(t)} e^{k_{s,d}}}

Every channel ``d`` is its own softmax over positions, so there is no (T, S) matrix and the
cost is O(T·D) time and memory.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .._checks import shape_checked
from .._typing import (
    AttentionMask,
    AttentionOutput,
    KeyArray,
    PRNGKeyArray,
    QueryArray,
    ScoreMod,
    ValueArray,
)
from ._common import accumulation_dtype, check_qkv
from .linear.checks import (
    causal_from_score_mod,
    check_causal_lengths,
    key_padding_mask,
    refuse_weight_dropout,
)

__all__ = ["lite_attention"]

_NO_SCORES = (
    "it has no (seq_q, seq_kv) dot-product scores for a score mod to rewrite (its weights are a "
    "per-channel softmax of the keys)."
)

# (running max, weighted value sum, weight sum) over a span of positions.
_Partial = tuple[Float[Array, "*span"], Float[Array, "*span"], Float[Array, "*span"]]


def _finite_or_zero(running_max: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    # A max over no allowed key is -inf; shifting by 0 instead keeps exp() at exactly 0.
    return jnp.where(jnp.isneginf(running_max), 0.0, running_max)


def _combine(left: _Partial, right: _Partial) -> _Partial:
    """Merge two (max, weighted value sum, weight sum) partials, rescaled to the joint max."""
    left_max, left_num, left_den = left
    right_max, right_num, right_den = right
    joint_max = jnp.maximum(left_max, right_max)
    shift = _finite_or_zero(joint_max)
    left_scale = jnp.exp(left_max - shift)
    right_scale = jnp.exp(right_max - shift)
    return (
        joint_max,
        left_num * left_scale + right_num * right_scale,
        left_den * left_scale + right_den * right_scale,
    )


def _context(
    numerator: Float[Array, "*rows D"], denominator: Float[Array, "*rows D"]
) -> Float[Array, "*rows D"]:
    # Channels of a row with no allowed key have a zero denominator and return zeros; the
    # where keeps NaN out of both the value and the gradient.
    positive = denominator > 0.0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("causal",))
def _lite_attention(
    query: Float[Array, "B H T D"],
    key: Float[Array, "B Hk S D"],
    value: Float[Array, "B Hk S D"],
    gate: Float[Array, "B H T D"],
    key_mask: Bool[Array, "B S"] | None,
    *,
    causal: bool,
) -> Float[Array, "B H T D"]:
    batch, num_heads, seq_q, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    acc = accumulation_dtype(query.dtype)

    k = key.astype(acc)
    v = value.astype(acc)
    if key_mask is None:
        allowed = jnp.ones(k.shape, bool)
    else:
        allowed = jnp.broadcast_to(key_mask[:, None, :, None], k.shape)
    # The stabilising max carries no gradient (the softmax does not depend on it); the
    # gradient flows through exp(k - stop_gradient(max)) alone, so ties in the max and
    # empty rows cannot produce NaN. Disallowed keys enter exp() as -inf (never as a large
    # key that could overflow), so neither value nor gradient sees inf * 0.
    masked_keys = jnp.where(allowed, jax.lax.stop_gradient(k), -jnp.inf)
    v = jnp.where(allowed, v, 0.0)

    if causal:
        # Each position starts as its own partial (max = its key, weight exp(0) = 1 carrying
        # the key's gradient); an associative scan merges prefixes in log depth.
        weights = jnp.exp(jnp.where(allowed, k - _finite_or_zero(masked_keys), -jnp.inf))
        _, numerator, denominator = jax.lax.associative_scan(
            _combine, (masked_keys, weights * v, weights), axis=2
        )
    else:
        key_max = _finite_or_zero(jnp.max(masked_keys, axis=2, keepdims=True))
        weights = jnp.exp(jnp.where(allowed, k - key_max, -jnp.inf))
        numerator = jnp.sum(weights * v, axis=2, keepdims=True)
        denominator = jnp.sum(weights, axis=2, keepdims=True)
    context = _context(numerator, denominator)

    # GQA: the context is per key head; query heads of a group share it without repeats.
    gated = (
        jax.nn.sigmoid(gate.astype(acc).reshape(batch, num_kv_heads, group, seq_q, head_dim))
        * context[:, :, None]
    )
    return gated.reshape(batch, num_heads, seq_q, head_dim).astype(query.dtype)


@shape_checked
def lite_attention(
    query: QueryArray,
    key: KeyArray,
    value: ValueArray,
    *,
    mask: AttentionMask | None = None,
    score_mod: ScoreMod | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    causal: bool = False,
    gate: QueryArray | None = None,
) -> AttentionOutput:
    r"""Element-wise gated attention (AFT-simple, Zhai et al. 2021, arXiv:2105.14103).

    .. math::

        o_t = \sigma(g_t) \odot \sum_{s \in A(t)} \mathrm{softmax}_s(k_s) \odot v_s,
        \qquad
        \mathrm{softmax}_s(k_s)_d = \frac{e^{k_{s,d}}}{\sum_{s' \in A(t)} e^{k_{s',d}}}

    The softmax runs over positions separately for every head_dim channel ``d`` and is
    computed stably (shifted by the running per-channel maximum). :math:`A(t)` holds the
    unpadded keys, only those with :math:`s \le t` when causal. The gate ``g`` is ``gate``
    when given (the layer's trainable gate projection) and the query otherwise, as in the
    paper. Non-causal attention is one masked sum over positions; causal attention is an
    associative scan of (max, weighted sum, weight sum) partials. Both use O(T·D) memory and
    float32 accumulation for half-precision inputs; no (T, S) matrix exists.

    Args:
      query: (batch, heads, seq_q, head_dim); the gate when ``gate`` is None.
      key: (batch, kv_heads, seq_kv, head_dim); ``kv_heads`` divides ``heads`` (GQA/MQA:
        query head ``h`` reads key head ``h // (heads // kv_heads)``, never repeated).
      value: like ``key``.
      mask: a key-padding mask only, boolean and broadcastable to (batch, 1, 1, seq_kv);
        True means attend.
      score_mod: only causal masking (``causal_mod()``, the same as ``causal=True``); any
        other mod is NotImplementedError (a softmax backend applies it).
      dropout_rng: unused (dropout is unsupported).
      dropout_rate: must be 0 unless ``deterministic``.
      deterministic: dropout is off when True.
      causal: position ``t`` attends to keys ``0..t`` (needs seq_q == seq_kv).
      gate: gate pre-activations with the query's shape; defaults to the query.

    Returns:
      (batch, heads, seq_q, head_dim) in the query's dtype. A query with no allowed key
      returns zeros, with finite gradients.

    Raises:
      ValueError: for shapes that do not fit, a bad mask or bad dropout arguments.
      NotImplementedError: for a ``score_mod`` other than causal masking, active dropout, a
        mask that is not a key-padding mask, or causal attention with seq_q != seq_kv.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> kv = jax.random.normal(jax.random.key(1), (1, 2, 8, 4))
      >>> out = attnax.lite_attention(q, kv, kv, causal=True)
      >>> out.shape
      (1, 2, 8, 4)
      >>> # The first position sees only itself: sigmoid(gate) * value.
      >>> bool(jnp.allclose(out[:, :, 0], jax.nn.sigmoid(q[:, :, 0]) * kv[:, :, 0], atol=1e-5))
      True
    """
    name = "lite_attention"
    query, key, value = check_qkv(query, key, value, name=name)
    key_mask = key_padding_mask(mask, query, key, name=name)
    refuse_weight_dropout(dropout_rate, dropout_rng, deterministic, name=name)
    causal = causal_from_score_mod(score_mod, why=_NO_SCORES, name=name) or causal
    if gate is not None and gate.shape != query.shape:
        raise ValueError(
            f"{name}: `gate` of shape {gate.shape} must have the query's shape {query.shape}."
        )
    check_causal_lengths(causal, query.shape[2], key.shape[2], name=name)
    out: AttentionOutput = _lite_attention(
        query, key, value, query if gate is None else gate, key_mask, causal=causal
    )
    return out
