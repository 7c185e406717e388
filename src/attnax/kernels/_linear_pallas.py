"""Fused Pallas kernels for causal chunkwise linear attention (forward).

The XLA formulation in :mod:`attnax.kernels._linear` runs five memory-bound stages whose
intermediates (feature maps, per-chunk (D, D) states, intra-chunk weights, float32 numerators)
are each as large as the inputs. Two kernels keep all of that on chip:

* ``chunk_states``: one program per (batch, kv head, chunk) reads the chunk's keys and values
  once and writes ``phi(K_c)^T V_c`` (D × D, rounded to the input dtype, float32 accumulation)
  and ``sum_t phi(k_t)`` (float32);
* the prefix sum over chunks stays one XLA matmul (``_linear._exclusive_prefix_sum``);
* ``chunk_outputs``: one program per (batch, query head, chunk) reads the chunk's queries, keys,
  values and its prefix state, and writes the finished output:
  ``(mask(phi(Q_c) phi(K_c)^T) V_c + phi(Q_c) S_c) / (rowsum(...) + phi(Q_c) z_c)``.

Rounding matches the XLA path (bf16 feature maps, states and weights entering matmuls,
float32 accumulation), so both paths agree to bf16 precision. The backward is the XLA
backward (:mod:`._linear_pallas_vjp`) has the same two-pass shape and uses the denominator and
prefix states this forward saves.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from ._decode import _gpu_compiler_params, _is_power_of_two

__all__ = [
    "ForwardResiduals",
    "compiler_params",
    "feature_map",
    "fused_causal_forward",
    "fused_unsupported_reason",
]

_MAX_TILE = 256


def fused_unsupported_reason(*, dtype: Any, head_dim: int, chunk: int) -> str | None:
    """Why the fused kernels cannot run this configuration (None when they can)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"inputs are {jnp.dtype(dtype).name}, the fused kernels take bf16/fp16"
    if not _is_power_of_two(head_dim) or not 16 <= head_dim <= _MAX_TILE:
        return f"head_dim {head_dim} is not a power of two in [16, {_MAX_TILE}]"
    if not _is_power_of_two(chunk) or not 16 <= chunk <= _MAX_TILE:
        return f"chunk_size {chunk} is not a power of two in [16, {_MAX_TILE}]"
    return None


def feature_map(x: Any) -> Any:
    # elu(x) + 1, written with exp and where (what the Triton lowering has).
    return jnp.where(x > 0, x + 1.0, jnp.exp(jnp.minimum(x, 0.0)))


def _chunk_state_kernel(k_ref: Any, v_ref: Any, state_ref: Any, norm_ref: Any) -> None:
    phi_k = feature_map(k_ref[...].astype(jnp.float32)).astype(v_ref.dtype)
    state = jax.lax.dot_general(
        phi_k, v_ref[...], (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    state_ref[...] = state.astype(state_ref.dtype)
    norm_ref[...] = jnp.sum(phi_k.astype(jnp.float32), axis=0)


def _chunk_output_kernel(
    q_ref: Any,
    k_ref: Any,
    v_ref: Any,
    state_ref: Any,
    norm_ref: Any,
    out_ref: Any,
    denominator_ref: Any,
    *,
    scale: float,
) -> None:
    # With a value-column split (VALUE_BLOCK), v_ref, state_ref and out_ref hold this
    # program's columns; the weights and the denominator span every column, so each of the
    # chunk's programs recomputes them and writes the same denominator.
    operand = v_ref.dtype
    q = q_ref[...].astype(jnp.float32)
    if scale != 1.0:
        q = q * scale
    phi_q = feature_map(q).astype(operand)
    phi_k = feature_map(k_ref[...].astype(jnp.float32)).astype(operand)
    chunk = phi_q.shape[0]
    weights = jax.lax.dot_general(
        phi_q, phi_k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    weights = jnp.where(rows >= cols, weights, 0.0).astype(operand)
    numerator = jax.lax.dot_general(
        weights, v_ref[...], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    ) + jax.lax.dot_general(
        phi_q, state_ref[...], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    norm = norm_ref[...].astype(operand).astype(jnp.float32)
    denominator = jnp.sum(weights.astype(jnp.float32), axis=1) + jnp.sum(
        phi_q.astype(jnp.float32) * norm[None, :], axis=1
    )
    positive = denominator > 0.0
    safe = jnp.where(positive, denominator, 1.0)
    out = jnp.where(positive[:, None], numerator / safe[:, None], 0.0)
    out_ref[...] = out.astype(out_ref.dtype)
    # Saved for the backward (one float per query row): it needs 1/denominator, and
    # recomputing it would take the chunk's keys and a (C, C) matmul more.
    denominator_ref[...] = denominator


# Triton warps per program of each kernel; read at trace time (benchmarks/linear_chunks.py
# sweeps them). No kernel has a loop, so there is nothing to pipeline (one stage).
NUM_WARPS = {
    "states": 8,
    "outputs": 8,
    "grad_states": 8,
    "grad_query": 8,
    "grad_key_value": 8,
}
# Value columns per program of the output kernel (0: all of head_dim). A split gives each
# chunk several programs with smaller accumulators; they share the chunk's q and k through L2.
VALUE_BLOCK = {"outputs": 0}


def compiler_params(kernel: str, interpret: bool) -> Any:
    return _gpu_compiler_params(NUM_WARPS[kernel], 1, interpret)


def _chunk_states(
    key: Float[Array, "B Hk S D"], value: Float[Array, "B Hk S D"], *, chunk: int, interpret: bool
) -> tuple[Float[Array, "B Hk N D D"], Float[Array, "B Hk N D"]]:
    batch, num_kv_heads, seq, head_dim = key.shape
    num_chunks = seq // chunk
    tile = pl.BlockSpec((None, None, chunk, head_dim), lambda b, h, n: (b, h, n, 0))
    states, norms = pl.pallas_call(
        _chunk_state_kernel,
        grid=(batch, num_kv_heads, num_chunks),
        in_specs=[tile, tile],
        out_specs=[
            pl.BlockSpec((None, None, None, head_dim, head_dim), lambda b, h, n: (b, h, n, 0, 0)),
            pl.BlockSpec((None, None, None, head_dim), lambda b, h, n: (b, h, n, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(
                (batch, num_kv_heads, num_chunks, head_dim, head_dim), value.dtype
            ),  # type: ignore[no-untyped-call]
            jax.ShapeDtypeStruct((batch, num_kv_heads, num_chunks, head_dim), jnp.float32),  # type: ignore[no-untyped-call]
        ],
        compiler_params=compiler_params("states", interpret),
        interpret=interpret,
        name="attnax_linear_chunk_states",
    )(key, value)
    return states, norms


def _chunk_outputs(
    query: Float[Array, "B H T D"],
    key: Float[Array, "B Hk S D"],
    value: Float[Array, "B Hk S D"],
    states: Float[Array, "B Hk N D D"],
    norms: Float[Array, "B Hk N D"],
    *,
    chunk: int,
    scale: float,
    interpret: bool,
) -> tuple[Float[Array, "B H T D"], Float[Array, "B H T"]]:
    batch, num_heads, seq, head_dim = query.shape
    group = num_heads // key.shape[1]
    num_chunks = seq // chunk
    value_block = VALUE_BLOCK["outputs"] or head_dim
    if head_dim % value_block:
        raise ValueError(f"VALUE_BLOCK {value_block} does not divide head_dim {head_dim}")
    # The value-column axis is the grid's last, so a chunk's programs run side by side and
    # read its queries and keys from L2 after the first.
    grid = (batch, num_heads, num_chunks, head_dim // value_block)
    q_tile = pl.BlockSpec((None, None, chunk, head_dim), lambda b, h, n, j: (b, h, n, 0))
    k_tile = pl.BlockSpec((None, None, chunk, head_dim), lambda b, h, n, j: (b, h // group, n, 0))
    v_tile = pl.BlockSpec(
        (None, None, chunk, value_block), lambda b, h, n, j: (b, h // group, n, j)
    )
    out_tile = pl.BlockSpec((None, None, chunk, value_block), lambda b, h, n, j: (b, h, n, j))
    out, denominator = pl.pallas_call(
        functools.partial(_chunk_output_kernel, scale=scale),
        grid=grid,
        in_specs=[
            q_tile,
            k_tile,
            v_tile,
            pl.BlockSpec(
                (None, None, None, head_dim, value_block),
                lambda b, h, n, j: (b, h // group, n, 0, j),
            ),
            pl.BlockSpec((None, None, None, head_dim), lambda b, h, n, j: (b, h // group, n, 0)),
        ],
        out_specs=[out_tile, pl.BlockSpec((None, None, chunk), lambda b, h, n, j: (b, h, n))],
        out_shape=[
            jax.ShapeDtypeStruct(query.shape, query.dtype),  # type: ignore[no-untyped-call]
            jax.ShapeDtypeStruct((batch, num_heads, seq), jnp.float32),  # type: ignore[no-untyped-call]
        ],
        compiler_params=compiler_params("outputs", interpret),
        interpret=interpret,
        name="attnax_linear_chunk_outputs",
    )(query, key, value, states, norms)
    return out, denominator


class ForwardResiduals(NamedTuple):
    """What the fused backward needs from the forward besides q, k, v and the output."""

    denominator: Float[Array, "B H T"]
    prefix_states: Float[Array, "B Hk N D D"]
    prefix_norms: Float[Array, "B Hk N D"]


def fused_causal_forward(
    query: Float[Array, "B H T D"],
    key: Float[Array, "B Hk S D"],
    value: Float[Array, "B Hk S D"],
    *,
    chunk: int,
    scale: float,
    exclusive_prefix_sum: Any,
    interpret: bool,
) -> tuple[Float[Array, "B H T D"], ForwardResiduals]:
    """Causal chunkwise linear attention, T a multiple of ``chunk``, no key mask."""
    states, norms = _chunk_states(key, value, chunk=chunk, interpret=interpret)
    # The prefix states leave their matmul in the input dtype (float32 accumulation inside).
    prefix_states = exclusive_prefix_sum(states, out_dtype=value.dtype)
    prefix_norms = exclusive_prefix_sum(norms)
    out, denominator = _chunk_outputs(
        query,
        key,
        value,
        prefix_states,
        prefix_norms,
        chunk=chunk,
        scale=scale,
        interpret=interpret,
    )
    return out, ForwardResiduals(denominator, prefix_states, prefix_norms)
