r"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Softmax is replaced by the positive feature map :math:`\phi(x) = \mathrm{elu}(x) + 1`, so
attention factorises through a (head_dim × head_dim) state per head and never forms the
(T, S) score matrix:

.. math::

    o_t = \frac{\phi(s\,q_t)^\top \sum_{s' \in A(t)} \phi(k_{s'})\, v_{s'}^\top}
               {\phi(s\,q_t)^\top \sum_{s' \in A(t)} \phi(k_{s'})}

where :math:`A(t)` is the set of allowed keys (all unpadded keys, and only those up to
:math:`t` when causal) and :math:`s` the query scale.

The causal form is chunkwise parallel: inside a chunk of ``chunk_size`` positions a masked
(chunk × chunk) quadratic term, across chunks the (D × D) state of all earlier chunks, whose
prefix over chunks is one parallel matmul. On a GPU the causal form runs as fused Pallas
kernels around that prefix, forward (:mod:`attnax.kernels._linear_pallas`) and backward
(:mod:`attnax.kernels._linear_pallas_vjp`, around a suffix sum of the same kind); elsewhere as
the XLA formulation below, differentiated by autodiff.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .._checks import positive_int, shape_checked
from .._typing import (
    AttentionMask,
    AttentionOutput,
    KeyArray,
    PRNGKeyArray,
    QueryArray,
    ScoreMod,
    ValueArray,
)
from ._common import accumulation_dtype, check_dropout, check_mask, check_qkv
from ._linear_pallas import ForwardResiduals, fused_causal_forward, fused_unsupported_reason
from ._linear_pallas_vjp import fused_causal_backward

__all__ = ["linear_attention"]


def key_padding_mask(
    mask: AttentionMask | None, query: Array, key: Array, *, name: str
) -> Bool[Array, "B S"] | None:
    """Reduce a key-padding ``mask`` (broadcastable to (B, 1, 1, S)) to a (B, S) boolean.

    Kernels that never form per-(query, key) scores can only honour masks that depend on the
    key alone; anything that varies over heads or query positions is refused by name.
    """
    check_mask(mask, query, key, name=name)
    if mask is None:
        return None
    if mask.shape[1] != 1 or mask.shape[2] != 1:
        raise NotImplementedError(
            f"{name} supports only key-padding masks, broadcastable to (batch, 1, 1, seq_kv), "
            f"got a mask of shape {mask.shape} that varies over heads or query positions; use "
            "causal=True for causal masking, or standard_attention (or another softmax kernel) "
            "for general masks."
        )
    return jnp.broadcast_to(mask[:, 0, 0, :], (query.shape[0], key.shape[2]))


def refuse_weight_dropout(
    dropout_rate: float, dropout_rng: Array | None, deterministic: bool, *, name: str
) -> None:
    """Validate the dropout arguments; active dropout is NotImplementedError (no weights)."""
    if check_dropout(dropout_rate, dropout_rng, deterministic, name=name):
        raise NotImplementedError(
            f"{name} does not implement attention dropout (there are no attention weights to "
            "drop); pass deterministic=True or dropout_rate=0.0, and use dropout on the output "
            "projection, or standard_attention for dropout on the weights."
        )


def check_causal_lengths(causal: bool, seq_q: int, seq_kv: int, *, name: str) -> None:
    """Causal kernels without per-pair scores need query t aligned with key t."""
    if causal and seq_q != seq_kv:
        raise NotImplementedError(
            f"{name} with causal=True needs equal query and key lengths (query t sees keys "
            f"0..t), got seq_q={seq_q} and seq_kv={seq_kv}; for single-token decoding against "
            "a cache, call it with causal=False and a key-padding mask of the filled cache "
            "slots, or use standard_attention with a shifted causal mod."
        )


def _feature_map(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    return jax.nn.elu(x) + 1.0


def _safe_divide(
    numerator: Float[Array, "*rows D"], denominator: Float[Array, "*rows"]
) -> Float[Array, "*rows D"]:
    # A row with no allowed key has denominator exactly 0 (every phi term is positive), so
    # it gets zeros; the where keeps NaN out of the value and out of the gradient.
    positive = denominator > 0.0
    safe = jnp.where(positive, denominator, 1.0)
    return jnp.where(positive[..., None], numerator / safe[..., None], 0.0)


def _exclusive_prefix_sum(
    x: Float[Array, "B Hk N *rest"], out_dtype: Any = jnp.float32, *, reverse: bool = False
) -> Float[Array, "B Hk N *rest"]:
    """Sums of the earlier chunks' terms (axis 2; the later ones with ``reverse``): one matmul.

    ``jnp.cumsum`` lowers to a reduce-window that XLA:GPU expands into a log-depth tree of
    passes over the whole (N, D, D) state array (and the same again, reversed, in the
    backward); the matmul with a 0/1 triangular matrix reads and writes it once, with N·N·D²
    multiply-adds that are cheap at N = T / chunk_size. It accumulates in float32 and rounds
    once to ``out_dtype``.
    """
    num_chunks = x.shape[2]
    ones = jnp.ones((num_chunks, num_chunks), x.dtype)
    chosen = jnp.triu(ones, k=1) if reverse else jnp.tril(ones, k=-1)
    # Batched over (B, Hk) on both sides, so the product comes out in x's own layout: with an
    # unbatched 0/1 matrix the einsum puts the chunk axis last and transposes after the dot.
    # The stage measured 0.089 -> 0.087 and 0.103 -> 0.082 ms on the H100 (NOTES.md); the
    # broadcast is N² elements per head.
    chosen = jnp.broadcast_to(chosen, x.shape[:2] + chosen.shape)
    summed: Array = jnp.einsum(
        "bknm,bkm...->bkn...",
        chosen,
        x,
        precision=_PREFIX_PRECISION.get(jnp.dtype(x.dtype), jax.lax.Precision.HIGHEST),
        preferred_element_type=out_dtype,
    )
    return summed


# bf16/fp16 terms are exact in a half-precision matmul with 0/1 coefficients and float32
# accumulation, so they need no more than DEFAULT; float32 terms need HIGHEST (no TF32).
_PREFIX_PRECISION = {
    jnp.dtype(jnp.bfloat16): jax.lax.Precision.DEFAULT,
    jnp.dtype(jnp.float16): jax.lax.Precision.DEFAULT,
}


# The fused kernels' shortest chunk. Chunks only set how the sums are split (the result is
# the same up to rounding), and on an H100 at head_dim 128 the kernels run fastest at 128 (chunk
# 64 writes twice the (D, D) states: 0.63 ms against 0.48 forward, benchmarks/NOTES.md), so a
# shorter chunk_size is raised to this where the length is a multiple of it. 0 turns it off.
FUSED_MIN_CHUNK = 128


def _fused_chunk(chunk_size: int, seq: int) -> int:
    chunk = min(chunk_size, seq)
    if chunk < FUSED_MIN_CHUNK and seq % FUSED_MIN_CHUNK == 0:
        return FUSED_MIN_CHUNK
    return chunk


# Whether the fused forward's backward is the fused Pallas one (else the XLA formulation's
# autodiff); read at trace time, so benchmarks/linear_chunks.py can time both.
FUSED_BACKWARD = True


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fused_causal(
    query: Float[Array, "B H T D"],
    key: Float[Array, "B Hk S D"],
    value: Float[Array, "B Hk S D"],
    chunk: int,
    scale: float,
    precision: jax.lax.PrecisionLike,
    interpret: bool,
) -> Float[Array, "B H T D"]:
    """Pallas forward (:mod:`._linear_pallas`) and backward (:mod:`._linear_pallas_vjp`)."""
    return _fused_causal_fwd(query, key, value, chunk, scale, precision, interpret)[0]


_FusedResiduals = tuple[Array, Array, Array, Array, ForwardResiduals]


def _fused_causal_fwd(
    query: Array,
    key: Array,
    value: Array,
    chunk: int,
    scale: float,
    precision: jax.lax.PrecisionLike,
    interpret: bool,
) -> tuple[Array, _FusedResiduals]:
    out, saved = fused_causal_forward(
        query,
        key,
        value,
        chunk=chunk,
        scale=scale,
        exclusive_prefix_sum=_exclusive_prefix_sum,
        interpret=interpret,
    )
    return out, (query, key, value, out, saved)


def _fused_causal_bwd(
    chunk: int,
    scale: float,
    precision: jax.lax.PrecisionLike,
    interpret: bool,
    residuals: _FusedResiduals,
    d_out: Array,
) -> tuple[Array, Array, Array]:
    query, key, value, out, saved = residuals
    if FUSED_BACKWARD:
        return fused_causal_backward(
            query,
            key,
            value,
            out,
            saved,
            d_out,
            chunk=chunk,
            scale=scale,
            exclusive_prefix_sum=_exclusive_prefix_sum,
            interpret=interpret,
        )

    def xla_forward(q: Array, k: Array, v: Array) -> Array:
        return _xla_linear(
            q, k, v, None, causal=True, chunk_size=chunk, scale=scale, precision=precision
        )

    _, vjp = jax.vjp(xla_forward, query, key, value)
    grads: tuple[Array, Array, Array] = vjp(d_out)
    return grads


_fused_causal.defvjp(_fused_causal_fwd, _fused_causal_bwd)


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
        chunk = _fused_chunk(chunk_size, query.shape[2])
        out: Array = _fused_causal(query, key, value, chunk, scale, precision, interpret)
        return out
    return _xla_linear(
        query,
        key,
        value,
        key_mask,
        causal=causal,
        chunk_size=chunk_size,
        scale=scale,
        precision=precision,
    )


def _xla_linear(
    query: Float[Array, "B H T D"],
    key: Float[Array, "B Hk S D"],
    value: Float[Array, "B Hk S D"],
    key_mask: Bool[Array, "B S"] | None,
    *,
    causal: bool,
    chunk_size: int,
    scale: float,
    precision: jax.lax.PrecisionLike,
) -> Float[Array, "B H T D"]:
    batch, num_heads, seq_q, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    acc = accumulation_dtype(query.dtype)

    # Matmul operands stay in the input precision for bf16/fp16 (tensor cores, half the
    # bytes), and every product accumulates in float32 (preferred_element_type); feature
    # maps, states and sums are formed in float32 and rounded once where they enter a matmul.
    # A float32 input keeps float32 operands throughout, and so does the CPU, which has no
    # faster half-precision matmul (and whose runtime lacks some bf16 x bf16 -> f32 dots).
    half_operands = acc != query.dtype and jax.default_backend() in ("gpu", "tpu")
    operand = query.dtype if half_operands else acc

    # GQA: query heads are grouped over their key head, key/value are never repeated.
    grouped_query = query.astype(acc).reshape(batch, num_kv_heads, group, seq_q, head_dim)
    if scale != 1.0:
        grouped_query = grouped_query * jnp.asarray(scale, acc)
    phi_q = _feature_map(grouped_query).astype(operand)
    k = key.astype(acc)
    v = value
    if key_mask is not None:
        keep = key_mask[:, None, :, None]
        # Zeroing padded keys and values before use keeps garbage in unused cache slots
        # (inf, NaN) out of the sums and out of the gradient.
        k = jnp.where(keep, k, 0.0)
        v = jnp.where(keep, v, jnp.zeros((), v.dtype))
        phi_k = jnp.where(keep, _feature_map(k), 0.0)
    else:
        phi_k = _feature_map(k)
    phi_k = phi_k.astype(operand)
    v = v.astype(operand)

    def einsum(spec: str, *operands: Array) -> Array:
        return jnp.einsum(spec, *operands, precision=precision, preferred_element_type=acc)

    if not causal:
        state = einsum("bksd,bkse->bkde", phi_k, v)
        normaliser = jnp.sum(phi_k, axis=2, dtype=acc)
        numerator = einsum("bkgtd,bkde->bkgte", phi_q, state.astype(operand))
        denominator = einsum("bkgtd,bkd->bkgt", phi_q, normaliser.astype(operand))
        out = _safe_divide(numerator, denominator)
        return out.reshape(batch, num_heads, seq_q, head_dim).astype(query.dtype)

    chunk = min(chunk_size, seq_q)
    num_chunks = seq_q // chunk
    q_c = phi_q.reshape(batch, num_kv_heads, group, num_chunks, chunk, head_dim)
    k_c = phi_k.reshape(batch, num_kv_heads, num_chunks, chunk, head_dim)
    v_c = v.reshape(batch, num_kv_heads, num_chunks, chunk, head_dim)

    # Inter-chunk recurrence state_{c+1} = state_c + K_c^T V_c is a prefix sum over the chunk
    # axis, evaluated in parallel rather than as a sequential lax.scan of T/chunk_size small
    # steps. Each chunk's (D, D) state is as large as the chunk's keys, so with half-precision
    # operands the per-chunk states and the intra-chunk weights leave their matmuls already
    # rounded to the operand dtype (accumulated in float32 inside the matmul, rounded once, as
    # they would be on entering the next matmul anyway); the prefix sums accumulate in float32.
    # This halves the bytes of the two largest intermediates (measured in benchmarks/NOTES.md).
    chunk_state = jnp.einsum(
        "bkncd,bknce->bknde", k_c, v_c, precision=precision, preferred_element_type=operand
    )
    chunk_normaliser = jnp.sum(k_c, axis=3, dtype=acc)
    state = _exclusive_prefix_sum(chunk_state).astype(operand)
    normaliser = _exclusive_prefix_sum(chunk_normaliser).astype(operand)

    causal_in_chunk = jnp.tril(jnp.ones((chunk, chunk), bool))
    weights = jnp.einsum(
        "bkgncd,bknjd->bkgncj", q_c, k_c, precision=precision, preferred_element_type=operand
    )
    weights = jnp.where(causal_in_chunk, weights, jnp.zeros((), operand))
    numerator = einsum("bkgncj,bknje->bkgnce", weights, v_c) + einsum(
        "bkgncd,bknde->bkgnce", q_c, state
    )
    denominator = jnp.sum(weights, axis=-1, dtype=acc) + einsum(
        "bkgncd,bknd->bkgnc", q_c, normaliser
    )
    out = _safe_divide(numerator, denominator)
    return out.reshape(batch, num_heads, seq_q, head_dim).astype(query.dtype)


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
      score_mod: unsupported (NotImplementedError); must be None.
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
      NotImplementedError: for a ``score_mod``, active dropout, a mask that is not a
        key-padding mask, or causal attention with seq_q != seq_kv.

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
    check_qkv(query, key, value, name=name)
    key_mask = key_padding_mask(mask, query, key, name=name)
    refuse_weight_dropout(dropout_rate, dropout_rng, deterministic, name=name)
    if score_mod is not None:
        raise NotImplementedError(
            f"{name} does not support `score_mod`: it never forms the (seq_q, seq_kv) scores a "
            "score mod rewrites (phi(q)·phi(k) factorises through a head_dim × head_dim "
            "state). Use causal=True for causal masking and `mask` for key padding, or a "
            "softmax kernel (standard_attention, memory_efficient_attention) for score mods."
        )
    positive_int(chunk_size, "chunk_size", caller=name)
    seq_q, seq_kv = query.shape[2], key.shape[2]
    check_causal_lengths(causal, seq_q, seq_kv, name=name)
    if causal and seq_q > chunk_size and seq_q % chunk_size != 0:
        raise ValueError(
            f"{name}: seq_q={seq_q} is not a multiple of chunk_size={chunk_size}; pad the "
            f"sequence to a multiple of `chunk_size` (padding at the end does not change the "
            "earlier positions of causal attention) or choose a `chunk_size` that divides it."
        )
    fused = _use_fused(
        use_pallas,
        interpret,
        causal=causal,
        key_mask=key_mask,
        dtype=query.dtype,
        head_dim=query.shape[-1],
        chunk=_fused_chunk(chunk_size, seq_q),
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


def _use_fused(
    use_pallas: bool | None,
    interpret: bool,
    *,
    causal: bool,
    key_mask: Array | None,
    dtype: Any,
    head_dim: int,
    chunk: int,
    name: str,
) -> bool:
    """Whether the fused Pallas forward serves this call (see ``use_pallas``)."""
    if use_pallas is False:
        return False
    reason: str | None = None
    if not causal:
        reason = "the non-causal form is two global matmuls already"
    elif key_mask is not None:
        reason = "a key-padding mask is given"
    elif not interpret and jax.default_backend() != "gpu":
        reason = "it needs a GPU (or interpret=True)"
    elif not (interpret and jnp.dtype(dtype) == jnp.dtype(jnp.float32)):
        reason = fused_unsupported_reason(dtype=dtype, head_dim=head_dim, chunk=chunk)
    if use_pallas and reason is not None:
        raise NotImplementedError(
            f"{name}: use_pallas=True, but the fused kernels cannot run this call: {reason}; "
            "pass use_pallas=None (or False) for the XLA formulation."
        )
    return reason is None
