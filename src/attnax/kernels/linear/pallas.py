"""Fused Pallas kernels for causal chunkwise linear attention: the forward.

The XLA formulation in :mod:`attnax.kernels.linear.xla` runs five memory-bound stages whose
intermediates (feature maps, per-chunk (D, D) states, intra-chunk weights, float32 numerators)
are each as large as the inputs. Two kernels keep all of that on chip:

* ``chunk_states``: for each (batch, kv head, chunk), reads the chunk's keys and values once
  and writes ``phi(K_c)^T V_c`` (D × D, rounded to the input dtype, float32 accumulation) and
  ``sum_t phi(k_t)`` (float32);
* the prefix sum over chunks stays one XLA matmul (``xla.exclusive_prefix_sum``);
* ``chunk_outputs``: for each (batch, query head, chunk), reads the chunk's queries, keys,
  values and its prefix state, and writes the finished output
  ``(mask(phi(Q_c) phi(K_c)^T) V_c + phi(Q_c) S_c) / (rowsum(...) + phi(Q_c) z_c)`` and its
  denominator.

Each program takes ``CHUNKS_PER_PROGRAM`` consecutive chunks (two by default, in a loop the
states kernel pipelines over two stages); the chunks are independent, so this only changes
how loads overlap.

Rounding matches the XLA path (bf16 feature maps, states and weights entering matmuls,
float32 accumulation), so both paths agree to bf16 precision. The backward
(:mod:`.pallas_vjp`) has the same two-pass shape and uses the denominator and prefix
states this forward saves.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from .._common import kernel_outputs
from .._gpu import is_power_of_two, triton_compiler_params

__all__ = [
    "CHUNKS_PER_PROGRAM",
    "NUM_STAGES",
    "NUM_WARPS",
    "ForwardResiduals",
    "causal_in_chunk",
    "chunk_dot",
    "chunk_outputs",
    "chunk_states",
    "chunks_per_program",
    "compiler_params",
    "feature_map",
    "for_each_chunk",
    "fused_causal_forward",
    "fused_unsupported_reason",
    "scaled_query",
]

_MAX_TILE = 256


def fused_unsupported_reason(*, dtype: Any, head_dim: int, chunk: int) -> str | None:
    """Why the fused kernels cannot run this configuration (None when they can)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"inputs are {jnp.dtype(dtype).name}, the fused kernels take bf16/fp16"
    if not is_power_of_two(head_dim) or not 16 <= head_dim <= _MAX_TILE:
        return f"head_dim {head_dim} is not a power of two in [16, {_MAX_TILE}]"
    if not is_power_of_two(chunk) or not 16 <= chunk <= _MAX_TILE:
        return f"chunk_size {chunk} is not a power of two in [16, {_MAX_TILE}]"
    return None


def feature_map(x: Any) -> Any:
    # elu(x) + 1, written with exp and where (what the Triton lowering has).
    return jnp.where(x > 0, x + 1.0, jnp.exp(jnp.minimum(x, 0.0)))


def chunk_dot(a: Any, b: Any, contract: tuple[int, int]) -> Any:
    """``a`` and ``b`` contracted over axes ``contract`` (one each), accumulated in float32."""
    return jax.lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32
    )


def causal_in_chunk(weights: Any) -> Any:
    """(C, C) weights with the pairs of a later key than query set to 0."""
    chunk = weights.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    return jnp.where(rows >= cols, weights, 0.0)


def scaled_query(q_ref: Any, rows: Any, scale: float) -> Any:
    """The chunk's queries in float32, times the query scale."""
    q = q_ref[rows, :].astype(jnp.float32)
    return q * scale if scale != 1.0 else q


def for_each_chunk(rows: int, chunk: int, body: Any) -> None:
    """Runs ``body(i)`` for each of a program's ``rows // chunk`` chunks (in a loop if several).

    Several chunks per program (CHUNKS_PER_PROGRAM) give Triton a loop whose next chunk's
    loads it can issue while the current chunk computes (num_stages > 1), and fewer,
    longer-lived programs.
    """
    count = rows // chunk
    if count == 1:
        body(0)
        return

    def step(i: Any, carry: Any) -> Any:
        body(i)
        return carry

    jax.lax.fori_loop(0, count, step, 0)


def _chunk_state_kernel(
    k_ref: Any, v_ref: Any, state_ref: Any, norm_ref: Any, *, chunk: int
) -> None:
    def one_chunk(i: Any) -> None:
        rows = pl.ds(i * chunk, chunk)
        phi_k = feature_map(k_ref[rows, :].astype(jnp.float32)).astype(v_ref.dtype)
        state_ref[i] = chunk_dot(phi_k, v_ref[rows, :], (0, 0)).astype(state_ref.dtype)
        norm_ref[i] = jnp.sum(phi_k.astype(jnp.float32), axis=0)

    for_each_chunk(k_ref.shape[0], chunk, one_chunk)


def _chunk_output_kernel(
    q_ref: Any,
    k_ref: Any,
    v_ref: Any,
    state_ref: Any,
    norm_ref: Any,
    out_ref: Any,
    denominator_ref: Any,
    *,
    chunk: int,
    scale: float,
) -> None:
    operand = v_ref.dtype

    def one_chunk(i: Any) -> None:
        rows = pl.ds(i * chunk, chunk)
        phi_q = feature_map(scaled_query(q_ref, rows, scale)).astype(operand)
        phi_k = feature_map(k_ref[rows, :].astype(jnp.float32)).astype(operand)
        v = v_ref[rows, :]
        weights = causal_in_chunk(chunk_dot(phi_q, phi_k, (1, 1))).astype(operand)
        numerator = chunk_dot(weights, v, (1, 0)) + chunk_dot(phi_q, state_ref[i], (1, 0))
        norm = norm_ref[i].astype(operand).astype(jnp.float32)
        denominator = jnp.sum(weights.astype(jnp.float32), axis=1) + jnp.sum(
            phi_q.astype(jnp.float32) * norm[None, :], axis=1
        )
        positive = denominator > 0.0
        safe = jnp.where(positive, denominator, 1.0)
        out = jnp.where(positive[:, None], numerator / safe[:, None], 0.0)
        out_ref[rows, :] = out.astype(out_ref.dtype)
        # Saved for the backward (one float per query row): it needs 1/denominator, and
        # recomputing it would take the chunk's keys and a (C, C) matmul more.
        denominator_ref[rows] = denominator

    for_each_chunk(q_ref.shape[0], chunk, one_chunk)


# Triton warps and pipeline stages per program, and chunks per program, of each kernel; read at
# trace time (benchmarks/linear_chunks.py sweeps them; the H100 figures are in NOTES.md). A
# kernel without a loop (one chunk per program) has nothing to pipeline, so its stages do not
# matter; the output kernel's chunk takes ~128 KB of shared memory at head_dim 128, so it
# cannot have two stages there.
NUM_WARPS = {
    "states": 8,
    "outputs": 8,
    "grad_states": 8,
    "grad_query": 8,
    "grad_key_value": 8,
}
NUM_STAGES = {
    "states": 2,
    "outputs": 1,
    "grad_states": 1,
    "grad_query": 1,
    "grad_key_value": 1,
}
CHUNKS_PER_PROGRAM = {
    "states": 2,
    "outputs": 2,
    "grad_states": 1,
    "grad_query": 1,
    "grad_key_value": 1,
}


def compiler_params(kernel: str, interpret: bool) -> Any:
    return triton_compiler_params(NUM_WARPS[kernel], NUM_STAGES[kernel], interpret=interpret)


def chunks_per_program(kernel: str, num_chunks: int) -> int:
    wanted = CHUNKS_PER_PROGRAM[kernel]
    # Largest divisor of num_chunks not above the setting: every program gets whole chunks.
    return max(g for g in range(1, min(wanted, num_chunks) + 1) if num_chunks % g == 0)


def chunk_states(
    key: Float[Array, "B Hk S D"], value: Float[Array, "B Hk S D"], *, chunk: int, interpret: bool
) -> tuple[Float[Array, "B Hk N D D"], Float[Array, "B Hk N D"]]:
    """Each chunk's ``phi(K_c)^T V_c`` (input dtype) and ``sum_t phi(k_t)`` (float32)."""
    batch, num_kv_heads, seq, head_dim = key.shape
    num_chunks = seq // chunk
    per_program = chunks_per_program("states", num_chunks)
    tile = pl.BlockSpec((None, None, per_program * chunk, head_dim), lambda b, h, n: (b, h, n, 0))
    states, norms = pl.pallas_call(
        functools.partial(_chunk_state_kernel, chunk=chunk),
        grid=(batch, num_kv_heads, num_chunks // per_program),
        in_specs=[tile, tile],
        out_specs=[
            pl.BlockSpec(
                (None, None, per_program, head_dim, head_dim), lambda b, h, n: (b, h, n, 0, 0)
            ),
            pl.BlockSpec((None, None, per_program, head_dim), lambda b, h, n: (b, h, n, 0)),
        ],
        out_shape=kernel_outputs(
            (key, value),
            ((batch, num_kv_heads, num_chunks, head_dim, head_dim), value.dtype),
            ((batch, num_kv_heads, num_chunks, head_dim), jnp.float32),
        ),
        compiler_params=compiler_params("states", interpret),
        interpret=interpret,
        name="attnax_linear_chunk_states",
    )(key, value)
    return states, norms


def chunk_outputs(
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
    """Each chunk's finished output and its denominator, from the chunk's prefix state."""
    batch, num_heads, seq, head_dim = query.shape
    group = num_heads // key.shape[1]
    num_chunks = seq // chunk
    per_program = chunks_per_program("outputs", num_chunks)
    rows = per_program * chunk
    q_tile = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, n: (b, h, n, 0))
    kv_tile = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, n: (b, h // group, n, 0))
    out, denominator = pl.pallas_call(
        functools.partial(_chunk_output_kernel, chunk=chunk, scale=scale),
        grid=(batch, num_heads, num_chunks // per_program),
        in_specs=[
            q_tile,
            kv_tile,
            kv_tile,
            pl.BlockSpec(
                (None, None, per_program, head_dim, head_dim),
                lambda b, h, n: (b, h // group, n, 0, 0),
            ),
            pl.BlockSpec(
                (None, None, per_program, head_dim), lambda b, h, n: (b, h // group, n, 0)
            ),
        ],
        out_specs=[q_tile, pl.BlockSpec((None, None, rows), lambda b, h, n: (b, h, n))],
        out_shape=kernel_outputs(
            (query, key, value, states, norms),
            (query.shape, query.dtype),
            ((batch, num_heads, seq), jnp.float32),
        ),
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
    states, norms = chunk_states(key, value, chunk=chunk, interpret=interpret)
    # The prefix states leave their matmul in the input dtype (float32 accumulation inside).
    prefix_states = exclusive_prefix_sum(states, out_dtype=value.dtype)
    prefix_norms = exclusive_prefix_sum(norms)
    out, denominator = chunk_outputs(
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
