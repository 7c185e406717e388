r"""The XLA formulation of linear attention, differentiated by autodiff.

Non-causal attention is two global matmuls through the (D × D) state. The causal form is
chunkwise parallel: inside a chunk of ``chunk_size`` positions a masked (chunk × chunk)
quadratic term, across chunks the (D × D) state of all earlier chunks, whose prefix over chunks
is one parallel matmul (:func:`exclusive_prefix_sum`, which the fused kernels use too).
"""

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .._common import accumulation_dtype

__all__ = ["exclusive_prefix_sum", "xla_linear"]


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


def exclusive_prefix_sum(
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


def xla_linear(
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
    """Linear attention in XLA: global sums, or chunkwise when ``causal`` (see the module)."""
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
    state = exclusive_prefix_sum(chunk_state).astype(operand)
    normaliser = exclusive_prefix_sum(chunk_normaliser).astype(operand)

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
