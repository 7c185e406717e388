"""The public entry of linear attention: :func:`linear_attention`."""

import functools

import jax
from jaxtyping import Array, Bool, Float

from ..._checks import positive_int, shape_checked
from ..._typing import (
    AttentionMask,
    AttentionOutput,
    KeyArray,
    PRNGKeyArray,
    QueryArray,
    ScoreMod,
    ValueArray,
)
from .._common import check_qkv
from .checks import (
    causal_from_score_mod,
    check_causal_lengths,
    key_padding_mask,
    refuse_weight_dropout,
)
from .fused import fused_causal, fused_chunk, use_fused
from .xla import xla_linear

__all__ = ["linear_attention"]

_NO_SCORES = (
    "it never forms the (seq_q, seq_kv) scores a score mod rewrites (phi(q)·phi(k) factorises "
    "through a head_dim × head_dim state)."
)


@functools.partial(
    jax.jit,
    static_argnames=("causal", "chunk_size", "scale", "precision", "fused", "interpret"),
)
def _linear_attention(
    query: Float[Array, "B H T D"],
    key: Float[Array, "B Hk S D"],
    value: Float[Array, "B Hk S D"],
    key_mask: Bool[Array, "B S"] | None,
    *,
    causal: bool,
    chunk_size: int,
    scale: float,
    precision: jax.lax.PrecisionLike,
    fused: bool,
    interpret: bool,
) -> Float[Array, "B H T D"]:
    if fused:
        chunk = fused_chunk(chunk_size, query.shape[2])
        out: Array = fused_causal(query, key, value, chunk, scale, precision, interpret)
        return out
    return xla_linear(
        query,
        key,
        value,
        key_mask,
        causal=causal,
        chunk_size=chunk_size,
        scale=scale,
        precision=precision,
    )


# Over 100 lines: two thirds of it is the docstring (the math, every argument, an example);
# the body is the checks in order and one call.
@shape_checked
def linear_attention(
    query: QueryArray,
    key: KeyArray,
    value: ValueArray,
    *,
    mask: AttentionMask | None = None,
    score_mod: ScoreMod | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    causal: bool = True,
    chunk_size: int = 64,
    scale: float | None = None,
    precision: jax.lax.PrecisionLike = None,
    use_pallas: bool | None = None,
    interpret: bool = False,
) -> AttentionOutput:
    r"""Linear attention with :math:`\phi(x) = \mathrm{elu}(x) + 1` (Katharopoulos et al. 2020).

    .. math::

        o_t = \frac{\phi(s\,q_t)^\top \sum_{j \in A(t)} \phi(k_j) v_j^\top}
                   {\phi(s\,q_t)^\top \sum_{j \in A(t)} \phi(k_j)}

    with :math:`A(t)` the unpadded keys (those with :math:`j \le t` when causal). Causal
    attention is computed chunkwise: a masked quadratic term inside each chunk of
    ``chunk_size`` positions plus the (head_dim × head_dim) state of all earlier chunks, so
    memory is O(T·D + T/chunk_size·D²) per head and no (T, S) matrix exists. Non-causal
    attention uses the global sums (``chunk_size`` is then ignored). Gradients come from
    autodiff through this computation, or from the fused backward kernels (``use_pallas``).

    Args:
      query: (batch, heads, seq_q, head_dim).
      key: (batch, kv_heads, seq_kv, head_dim); ``kv_heads`` divides ``heads`` (GQA/MQA by a
        grouped einsum, key/value heads are never repeated).
      value: like ``key``.
      mask: a key-padding mask only, boolean and broadcastable to (batch, 1, 1, seq_kv); True
        means attend. Padded keys contribute nothing.
      score_mod: only causal masking (``causal_mod()``, the same as ``causal=True``); any
        other mod is NotImplementedError (a softmax backend applies it).
      dropout_rng: unused (dropout is unsupported).
      dropout_rate: must be 0 unless ``deterministic``.
      deterministic: dropout is off when True.
      causal: query ``t`` attends to keys ``0..t`` (needs seq_q == seq_kv).
      chunk_size: chunk length of the causal form; seq_q must be a multiple of it, or at most
        it (one chunk). Ignored when not causal. The fused kernels (``use_pallas``) raise a
        shorter chunk to 128 where seq_q is a multiple of 128: chunks change only how the sums
        are split, and 128 is the fastest on an H100.
      scale: multiplies the query before the feature map. Default None means 1.0, as in the
        paper: unlike softmax, :math:`\phi` has no temperature to correct, and
        ``1/sqrt(head_dim)`` would only squash queries towards :math:`\phi(0) = 1`.
      precision: matmul precision (``jax.lax.Precision.HIGHEST`` for float32 references).
      use_pallas: causal attention without a key mask can run as two fused Pallas kernels
        (per-chunk states, then per-chunk outputs; the prefix over chunks stays one XLA
        matmul), which keep the feature maps, weights and numerators on chip, and its
        backward as three more kernels of the same shape. ``None`` (default): fused on a GPU
        for bf16/fp16 inputs with power-of-two head_dim and chunk in [16, 256], else XLA.
        ``True``: fused or ``NotImplementedError`` with the reason. ``False``: XLA.
      interpret: run the fused kernels in the Pallas interpreter (CPU tests; float32 allowed).

    Returns:
      (batch, heads, seq_q, head_dim) in the query's dtype; feature maps, states and sums are
      float32 for bf16/fp16 inputs. A query with no allowed key returns zeros, with finite
      gradients.

    Raises:
      ValueError: for shapes that do not fit, a bad mask, bad dropout arguments, a
        non-positive ``chunk_size``, or a causal seq_q that is not a multiple of
        ``chunk_size`` (pad the sequence, as the layer does).
      NotImplementedError: for a ``score_mod`` other than causal masking, active dropout, a
        mask that is not a key-padding mask, or causal attention with seq_q != seq_kv.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> kv = jax.random.normal(jax.random.key(1), (1, 2, 8, 4))
      >>> out = attnax.linear_attention(q, kv, kv, causal=True, chunk_size=4)
      >>> out.shape
      (1, 2, 8, 4)
      >>> # The first query sees only the first key: its output is that key's value.
      >>> bool(jnp.allclose(out[:, :, 0], kv[:, :, 0], atol=1e-5))
      True
    """
    name = "linear_attention"
    query, key, value = check_qkv(query, key, value, name=name)
    key_mask = key_padding_mask(mask, query, key, name=name)
    refuse_weight_dropout(dropout_rate, dropout_rng, deterministic, name=name)
    causal = causal_from_score_mod(score_mod, why=_NO_SCORES, name=name) or causal
    positive_int(chunk_size, "chunk_size", caller=name)
    seq_q, seq_kv = query.shape[2], key.shape[2]
    check_causal_lengths(causal, seq_q, seq_kv, name=name)
    if causal and seq_q > chunk_size and seq_q % chunk_size != 0:
        raise ValueError(
            f"{name}: seq_q={seq_q} is not a multiple of chunk_size={chunk_size}; pad the "
            f"sequence to a multiple of `chunk_size` (padding at the end does not change the "
            "earlier positions of causal attention) or choose a `chunk_size` that divides it."
        )
    fused = use_fused(
        use_pallas,
        interpret,
        causal=causal,
        key_mask=key_mask,
        dtype=query.dtype,
        head_dim=query.shape[-1],
        chunk=fused_chunk(chunk_size, seq_q),
        name=name,
    )
    out: AttentionOutput = _linear_attention(
        query,
        key,
        value,
        key_mask,
        causal=causal,
        chunk_size=chunk_size,
        scale=1.0 if scale is None else float(scale),
        precision=precision,
        fused=fused,
        interpret=interpret,
    )
    return out

