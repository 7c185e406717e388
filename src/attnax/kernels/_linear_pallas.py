"""Fused Pallas kernels for causal chunkwise linear attention.

The XLA formulation in :mod:`attnax.kernels._linear` runs five memory-bound stages whose
intermediates (feature maps, per-chunk (D, D) states, intra-chunk weights, float32 numerators)
are each as large as the inputs. Two designs keep all of that on chip; ``FUSED_DESIGN`` picks
one at trace time.

``"fused_chunk"`` (default; the flash-linear-attention "fused_chunk" scheme): one program per
(batch, query head, slice of ``block`` value columns) walks the chunks in order with the
running state ``S = sum phi(k) v^T`` (D × block) and normaliser ``z = sum phi(k)`` (D) in
registers, so nothing but q, k, v and the output (plus a float32 denominator per row for the
backward) touches memory. Its backward is three more sequential walks, launched together as one
grid: dq (chunks in order, carrying ``S`` over a slice of key columns), dk (chunks in reverse,
carrying ``dS = sum phi(q) dnum^T`` over a slice of key columns) and dv (chunks in reverse,
carrying ``dS`` over a slice of value columns); every program writes a disjoint slice, so no
partial sums leave the chip.

``"two_pass"``: ``chunk_states`` (one program per (batch, kv head, chunk): ``phi(K_c)^T V_c``
rounded to the input dtype, and ``sum_t phi(k_t)`` in float32), the prefix over chunks as one
XLA matmul (``_linear._exclusive_prefix_sum``), then ``chunk_outputs`` (one program per
(batch, query head, chunk): ``(mask(phi(Q_c) phi(K_c)^T) V_c + phi(Q_c) S_c) / (rowsum(...) +
phi(Q_c) z_c)``); its backward is autodiff of the XLA formulation (in ``_linear``).

Matmul operands are in the input dtype (bf16/fp16 tensor cores) and every product, state and
sum accumulates in float32, so both designs agree with the XLA path to bf16 precision.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from ._decode import _gpu_compiler_params, _is_power_of_two

__all__ = [
    "FUSED_DESIGNS",
    "fused_causal_forward",
    "fused_chunk_attention",
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


def _feature_map(x: Any) -> Any:
    # elu(x) + 1, written with exp and where (what the Triton lowering has).
    return jnp.where(x > 0, x + 1.0, jnp.exp(jnp.minimum(x, 0.0)))


def _feature_map_grad(x: Any) -> Any:
    # d(elu(x) + 1)/dx: 1 above zero, exp(x) below.
    return jnp.where(x > 0, 1.0, jnp.exp(jnp.minimum(x, 0.0)))


def _causal_mask(chunk: int) -> Any:
    """(chunk, chunk) boolean, True where the row (query) is at or after the column (key)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    return rows >= cols


def _normalise(numerator: Any, denominator: Any) -> Any:
    # A row whose denominator is not positive gets zeros (as _linear._safe_divide).
    positive = denominator > 0.0
    safe = jnp.where(positive, denominator, 1.0)
    return jnp.where(positive[:, None], numerator / safe[:, None], 0.0)


def _dot(lhs: Any, rhs: Any, contract: tuple[int, int]) -> Any:
    """2-D matmul contracting ``lhs`` axis ``contract[0]`` with ``rhs`` axis ``contract[1]``.

    (1, 0) is ``lhs @ rhs``, (1, 1) ``lhs @ rhs.T`` and (0, 0) ``lhs.T @ rhs``; the Triton
    lowering folds the transposes into the MMA, and the product accumulates in float32.
    """
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)


def _chunk_state_kernel(k_ref: Any, v_ref: Any, state_ref: Any, norm_ref: Any) -> None:
    phi_k = _feature_map(k_ref[...].astype(jnp.float32)).astype(v_ref.dtype)
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
    *,
    scale: float,
) -> None:
    operand = v_ref.dtype
    q = q_ref[...].astype(jnp.float32)
    if scale != 1.0:
        q = q * scale
    phi_q = _feature_map(q).astype(operand)
    phi_k = _feature_map(k_ref[...].astype(jnp.float32)).astype(operand)
    weights = jnp.where(_causal_mask(phi_q.shape[0]), _dot(phi_q, phi_k, (1, 1)), 0.0)
    weights = weights.astype(operand)
    numerator = jax.lax.dot_general(
        weights, v_ref[...], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    ) + jax.lax.dot_general(
        phi_q, state_ref[...], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    norm = norm_ref[...].astype(operand).astype(jnp.float32)
    denominator = jnp.sum(weights.astype(jnp.float32), axis=1) + jnp.sum(
        phi_q.astype(jnp.float32) * norm[None, :], axis=1
    )
    out_ref[...] = _normalise(numerator, denominator).astype(out_ref.dtype)


# Launch knobs, all read at trace time (benchmarks/linear_chunks.py sweeps them; traces are
# cached, so a change needs jax.clear_caches()). "states"/"outputs" are the two-pass kernels,
# which have no loop and so nothing to pipeline (one stage); "fused_forward"/"fused_backward"
# are the fused-chunk kernels, whose chunk loop Triton pipelines over NUM_STAGES stages.
# BLOCK_V is the fused-chunk column slice per program (value columns in the forward; key or
# value columns in the backward): smaller slices give more programs (the loop over chunks is
# sequential, so B·H programs alone would leave most SMs idle) and smaller register states,
# at the price of re-reading (from L2) the full-width tiles once per slice.
NUM_WARPS: dict[str, int] = {"states": 8, "outputs": 8, "fused_forward": 4, "fused_backward": 8}
NUM_STAGES: dict[str, int] = {"states": 1, "outputs": 1, "fused_forward": 2, "fused_backward": 2}
BLOCK_V: dict[str, int] = {"fused_forward": 64, "fused_backward": 64}

# Which fused design serves linear_attention's fused path, read when it is called (it is a
# static argument of the jitted implementation, so a change needs no cache clearing).
FUSED_DESIGNS = ("fused_chunk", "two_pass")
FUSED_DESIGN = "fused_chunk"

# The fused-chunk backward's three kinds of program (dq, dk, dv) run as one launch (a grid
# axis picks the kind, so the three sequential walks run side by side) or as three launches.
BACKWARD_LAUNCHES = 1


def _compiler_params(kernel: str, interpret: bool) -> Any:
    return _gpu_compiler_params(NUM_WARPS[kernel], NUM_STAGES[kernel], interpret)


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
        compiler_params=_compiler_params("states", interpret),
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
) -> Float[Array, "B H T D"]:
    batch, num_heads, seq, head_dim = query.shape
    group = num_heads // key.shape[1]
    num_chunks = seq // chunk
    q_tile = pl.BlockSpec((None, None, chunk, head_dim), lambda b, h, n: (b, h, n, 0))
    kv_tile = pl.BlockSpec((None, None, chunk, head_dim), lambda b, h, n: (b, h // group, n, 0))
    out: Array = pl.pallas_call(
        functools.partial(_chunk_output_kernel, scale=scale),
        grid=(batch, num_heads, num_chunks),
        in_specs=[
            q_tile,
            kv_tile,
            kv_tile,
            pl.BlockSpec(
                (None, None, None, head_dim, head_dim), lambda b, h, n: (b, h // group, n, 0, 0)
            ),
            pl.BlockSpec((None, None, None, head_dim), lambda b, h, n: (b, h // group, n, 0)),
        ],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(query.shape, query.dtype),  # type: ignore[no-untyped-call]
        compiler_params=_compiler_params("outputs", interpret),
        interpret=interpret,
        name="attnax_linear_chunk_outputs",
    )(query, key, value, states, norms)
    return out


def fused_causal_forward(
    query: Float[Array, "B H T D"],
    key: Float[Array, "B Hk S D"],
    value: Float[Array, "B Hk S D"],
    *,
    chunk: int,
    scale: float,
    exclusive_prefix_sum: Any,
    interpret: bool,
) -> Float[Array, "B H T D"]:
    """Causal chunkwise linear attention, T a multiple of ``chunk``, no key mask."""
    states, norms = _chunk_states(key, value, chunk=chunk, interpret=interpret)
    # The prefix states leave their matmul in the input dtype (float32 accumulation inside).
    prefix_states = exclusive_prefix_sum(states, out_dtype=value.dtype)
    prefix_norms = exclusive_prefix_sum(norms)
    return _chunk_outputs(
        query,
        key,
        value,
        prefix_states,
        prefix_norms,
        chunk=chunk,
        scale=scale,
        interpret=interpret,
    )


# --------------------------------------------------------------------------- fused chunk


def _column_block(head_dim: int, wanted: int) -> int:
    """The column slice per program: ``wanted`` where it splits head_dim evenly, else all."""
    if wanted < head_dim and head_dim % wanted == 0:
        return wanted
    return head_dim


def _chunk_rows(index: Any, chunk: int) -> Any:
    return pl.ds(pl.multiple_of(index * chunk, chunk), chunk)


def _fused_forward_kernel(
    q_ref: Any,
    k_ref: Any,
    v_ref: Any,
    out_ref: Any,
    den_ref: Any,
    *,
    chunk: int,
    scale: float,
) -> None:
    # Refs hold this (batch, head)'s whole sequence: q and k all D columns, v and the output
    # this program's slice of value columns.
    operand = v_ref.dtype
    head_dim, block = q_ref.shape[1], v_ref.shape[1]
    causal = _causal_mask(chunk)

    def step(index: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
        state, norm = carry
        rows = _chunk_rows(index, chunk)
        phi_q = _feature_map(q_ref[rows, :].astype(jnp.float32) * scale).astype(operand)
        phi_k = _feature_map(k_ref[rows, :].astype(jnp.float32)).astype(operand)
        v = v_ref[rows, :]
        weights = jnp.where(causal, _dot(phi_q, phi_k, (1, 1)), 0.0)
        numerator = _dot(weights.astype(operand), v, (1, 0)) + _dot(
            phi_q, state.astype(operand), (1, 0)
        )
        denominator = jnp.sum(weights, axis=1) + jnp.sum(
            phi_q.astype(jnp.float32) * norm[None, :], axis=1
        )
        out_ref[rows, :] = _normalise(numerator, denominator).astype(out_ref.dtype)
        # Every value slice of this row computes the same denominator; each stores it (the
        # same float32 bits), which is cheaper than a second launch or a reduction.
        den_ref[rows] = denominator
        state = state + _dot(phi_k, v, (0, 0))
        norm = norm + jnp.sum(phi_k.astype(jnp.float32), axis=0)
        return state, norm

    init = (jnp.zeros((head_dim, block), jnp.float32), jnp.zeros((head_dim,), jnp.float32))
    jax.lax.fori_loop(0, q_ref.shape[0] // chunk, step, init)


def fused_chunk_forward(
    query: Float[Array, "B H T D"],
    key: Float[Array, "B Hk T D"],
    value: Float[Array, "B Hk T D"],
    *,
    chunk: int,
    scale: float,
    interpret: bool,
) -> tuple[Float[Array, "B H T D"], Float[Array, "B H T"]]:
    """Causal linear attention by sequential chunks; returns the output and its denominators.

    Grid (batch, query head, value slice); query head h reads kv head h // group. The float32
    denominators (B, H, T) are what the backward needs besides the inputs and the output.
    """
    batch, num_heads, seq, head_dim = query.shape
    group = num_heads // key.shape[1]
    block = _column_block(head_dim, BLOCK_V["fused_forward"])
    full = (None, None, seq, head_dim)
    out, den = pl.pallas_call(
        functools.partial(_fused_forward_kernel, chunk=chunk, scale=scale),
        grid=(batch, num_heads, head_dim // block),
        in_specs=[
            pl.BlockSpec(full, lambda b, h, j: (b, h, 0, 0)),
            pl.BlockSpec(full, lambda b, h, j: (b, h // group, 0, 0)),
            pl.BlockSpec((None, None, seq, block), lambda b, h, j: (b, h // group, 0, j)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, seq, block), lambda b, h, j: (b, h, 0, j)),
            pl.BlockSpec((None, None, seq), lambda b, h, j: (b, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(query.shape, query.dtype),  # type: ignore[no-untyped-call]
            jax.ShapeDtypeStruct((batch, num_heads, seq), jnp.float32),  # type: ignore[no-untyped-call]
        ],
        compiler_params=_compiler_params("fused_forward", interpret),
        interpret=interpret,
        name="attnax_linear_fused_chunk_forward",
    )(query, key, value)
    return out, den


# The backward's refs: q, k, v, dO (whole sequence, all columns) and the per-row 1/den and
# dL/dden (float32). With o = num / den: dnum = dO / den and dden = -rowsum(dO * o) / den.
# num and den are both causal linear-attention sums (den with v = 1), so with
# mixed[t, j] = dnum_t . v_j + dden_t and weights[t, j] = phi(q_t) . phi(k_j), both for j <= t:
#   dphi(q_t) = sum_j mixed[t, j] phi(k_j)     (earlier chunks: dnum_t S^T + dden_t z)
#   dphi(k_j) = sum_t mixed[t, j] phi(q_t)     (later chunks: v_j dS^T + dz)
#   dv_j      = sum_t weights[t, j] dnum_t     (later chunks: phi(k_j) dS)
# with S = sum phi(k) v^T, z = sum phi(k) over earlier chunks and dS = sum phi(q) dnum^T,
# dz = sum phi(q) dden over later chunks. Each job owns `block` columns of its gradient, so
# the states it carries are the matching (block, D) or (D, block) slices.


def _d_numerator(do_ref: Any, inv_den_ref: Any, rows: Any, cols: Any, operand: Any) -> Any:
    scaled = do_ref[rows, cols].astype(jnp.float32) * inv_den_ref[rows][:, None]
    return scaled.astype(operand)


def _mixed(d_num: Any, v: Any, d_den: Any, causal: Any, operand: Any) -> Any:
    return jnp.where(causal, _dot(d_num, v, (1, 1)) + d_den[:, None], 0.0).astype(operand)


def _dq_job(refs: tuple[Any, ...], out_ref: Any, cols: Any, *, chunk: int, scale: float) -> None:
    q_ref, k_ref, v_ref, do_ref, inv_den_ref, d_den_ref = refs
    operand = v_ref.dtype
    block, head_dim = out_ref.shape[1], q_ref.shape[1]
    causal = _causal_mask(chunk)

    def step(index: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
        state, norm = carry  # phi(K)^T V over this program's key columns, sum phi(K)
        rows = _chunk_rows(index, chunk)
        q = q_ref[rows, cols].astype(jnp.float32) * scale
        phi_k = _feature_map(k_ref[rows, cols].astype(jnp.float32)).astype(operand)
        v = v_ref[rows, :]
        d_num = _d_numerator(do_ref, inv_den_ref, rows, slice(None), operand)
        d_den = d_den_ref[rows]
        d_phi = (
            _dot(_mixed(d_num, v, d_den, causal, operand), phi_k, (1, 0))
            + _dot(d_num, state.astype(operand), (1, 1))
            + d_den[:, None] * norm[None, :]
        )
        out_ref[rows, :] = (d_phi * (scale * _feature_map_grad(q))).astype(out_ref.dtype)
        state = state + _dot(phi_k, v, (0, 0))
        norm = norm + jnp.sum(phi_k.astype(jnp.float32), axis=0)
        return state, norm

    init = (jnp.zeros((block, head_dim), jnp.float32), jnp.zeros((block,), jnp.float32))
    jax.lax.fori_loop(0, q_ref.shape[0] // chunk, step, init)


def _dk_job(refs: tuple[Any, ...], out_ref: Any, cols: Any, *, chunk: int, scale: float) -> None:
    q_ref, k_ref, v_ref, do_ref, inv_den_ref, d_den_ref = refs
    operand = v_ref.dtype
    block, head_dim = out_ref.shape[1], q_ref.shape[1]
    num_chunks = q_ref.shape[0] // chunk
    causal = _causal_mask(chunk)

    def step(index: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
        d_state, d_norm = carry  # phi(Q)^T dnum over this program's key columns, phi(Q)^T dden
        rows = _chunk_rows(num_chunks - 1 - index, chunk)
        phi_q = _feature_map(q_ref[rows, cols].astype(jnp.float32) * scale).astype(operand)
        k = k_ref[rows, cols].astype(jnp.float32)
        v = v_ref[rows, :]
        d_num = _d_numerator(do_ref, inv_den_ref, rows, slice(None), operand)
        d_den = d_den_ref[rows]
        d_phi = (
            _dot(_mixed(d_num, v, d_den, causal, operand), phi_q, (0, 0))
            + _dot(v, d_state.astype(operand), (1, 1))
            + d_norm[None, :]
        )
        out_ref[rows, :] = (d_phi * _feature_map_grad(k)).astype(out_ref.dtype)
        d_state = d_state + _dot(phi_q, d_num, (0, 0))
        d_norm = d_norm + jnp.sum(phi_q.astype(jnp.float32) * d_den[:, None], axis=0)
        return d_state, d_norm

    init = (jnp.zeros((block, head_dim), jnp.float32), jnp.zeros((block,), jnp.float32))
    jax.lax.fori_loop(0, num_chunks, step, init)


def _dv_job(refs: tuple[Any, ...], out_ref: Any, cols: Any, *, chunk: int, scale: float) -> None:
    q_ref, k_ref, v_ref, do_ref, inv_den_ref, _ = refs
    operand = v_ref.dtype
    block, head_dim = out_ref.shape[1], q_ref.shape[1]
    num_chunks = q_ref.shape[0] // chunk
    causal = _causal_mask(chunk)

    def step(index: Any, d_state: Any) -> Any:
        # d_state: phi(Q)^T dnum over this program's value columns (D, block).
        rows = _chunk_rows(num_chunks - 1 - index, chunk)
        phi_q = _feature_map(q_ref[rows, :].astype(jnp.float32) * scale).astype(operand)
        phi_k = _feature_map(k_ref[rows, :].astype(jnp.float32)).astype(operand)
        d_num = _d_numerator(do_ref, inv_den_ref, rows, cols, operand)
        weights = jnp.where(causal, _dot(phi_q, phi_k, (1, 1)), 0.0).astype(operand)
        dv = _dot(weights, d_num, (0, 0)) + _dot(phi_k, d_state.astype(operand), (1, 0))
        out_ref[rows, :] = dv.astype(out_ref.dtype)
        return d_state + _dot(phi_q, d_num, (0, 0))

    jax.lax.fori_loop(0, num_chunks, step, jnp.zeros((head_dim, block), jnp.float32))


_JOBS = {"dq": _dq_job, "dk": _dk_job, "dv": _dv_job}


def _fused_backward_kernel(
    q_ref: Any,
    k_ref: Any,
    v_ref: Any,
    do_ref: Any,
    inv_den_ref: Any,
    d_den_ref: Any,
    *out_refs: Any,
    chunk: int,
    scale: float,
    jobs: tuple[str, ...],
) -> None:
    refs = (q_ref, k_ref, v_ref, do_ref, inv_den_ref, d_den_ref)
    block = out_refs[0].shape[1]
    num_splits = q_ref.shape[1] // block
    program = pl.program_id(2)
    split = program % num_splits
    cols = pl.ds(pl.multiple_of(split * block, block), block)
    for index, (job, out_ref) in enumerate(zip(jobs, out_refs, strict=True)):
        run = functools.partial(_JOBS[job], refs, out_ref, cols, chunk=chunk, scale=scale)
        if len(jobs) == 1:
            run()
        else:
            # The job is uniform over a program, so this is a branch, not divergence; the
            # other jobs' output blocks are left untouched by this program.
            pl.when(program // num_splits == index)(run)


def fused_chunk_backward(
    query: Float[Array, "B H T D"],
    key: Float[Array, "B Hk T D"],
    value: Float[Array, "B Hk T D"],
    out: Float[Array, "B H T D"],
    den: Float[Array, "B H T"],
    d_out: Float[Array, "B H T D"],
    *,
    chunk: int,
    scale: float,
    interpret: bool,
) -> tuple[Float[Array, "B H T D"], Float[Array, "B Hk T D"], Float[Array, "B Hk T D"]]:
    """Gradients of :func:`fused_chunk_forward` for query, key and value.

    Grid (batch, query head, job × column slice): dq programs walk the chunks forwards, dk and
    dv programs backwards, each writing its own ``block`` columns. GQA: dk and dv come out per
    query head (float32 when a group has several) and are summed over the group here.
    """
    batch, num_heads, seq, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    block = _column_block(head_dim, BLOCK_V["fused_backward"])
    num_splits = head_dim // block
    # One cheap elementwise pass over dO and o (XLA fuses it): the per-row factors both
    # gradients of o = num / den need. Rows with den <= 0 have o = 0 and get no gradient.
    positive = den > 0.0
    inv_den = jnp.where(positive, 1.0 / jnp.where(positive, den, 1.0), 0.0)
    d_den = -jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) * inv_den
    kv_grad_dtype = key.dtype if group == 1 else jnp.float32
    full = (None, None, seq, head_dim)
    in_specs = [
        pl.BlockSpec(full, lambda b, h, p: (b, h, 0, 0)),
        pl.BlockSpec(full, lambda b, h, p: (b, h // group, 0, 0)),
        pl.BlockSpec(full, lambda b, h, p: (b, h // group, 0, 0)),
        pl.BlockSpec(full, lambda b, h, p: (b, h, 0, 0)),
        pl.BlockSpec((None, None, seq), lambda b, h, p: (b, h, 0)),
        pl.BlockSpec((None, None, seq), lambda b, h, p: (b, h, 0)),
    ]
    slice_spec = pl.BlockSpec((None, None, seq, block), lambda b, h, p: (b, h, 0, p % num_splits))
    all_jobs = ("dq", "dk", "dv")
    launches = [all_jobs] if BACKWARD_LAUNCHES == 1 else [(job,) for job in all_jobs]
    grads: dict[str, Array] = {}
    for jobs in launches:
        results = pl.pallas_call(
            functools.partial(_fused_backward_kernel, chunk=chunk, scale=scale, jobs=jobs),
            grid=(batch, num_heads, len(jobs) * num_splits),
            in_specs=in_specs,
            out_specs=[slice_spec] * len(jobs),
            out_shape=[
                jax.ShapeDtypeStruct(  # type: ignore[no-untyped-call]
                    query.shape, query.dtype if job == "dq" else kv_grad_dtype
                )
                for job in jobs
            ],
            compiler_params=_compiler_params("fused_backward", interpret),
            interpret=interpret,
            name="attnax_linear_fused_chunk_backward",
        )(query, key, value, d_out, inv_den, d_den)
        grads.update(zip(jobs, results, strict=True))

    def per_kv_head(grad: Array) -> Array:
        if group == 1:
            return grad
        grouped = grad.reshape(batch, num_kv_heads, group, seq, head_dim)
        return jnp.sum(grouped, axis=2).astype(key.dtype)

    return grads["dq"], per_kv_head(grads["dk"]), per_kv_head(grads["dv"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def fused_chunk_attention(
    query: Float[Array, "B H T D"],
    key: Float[Array, "B Hk T D"],
    value: Float[Array, "B Hk T D"],
    chunk: int,
    scale: float,
    interpret: bool,
) -> Float[Array, "B H T D"]:
    """Causal linear attention, T a multiple of ``chunk``, no key mask: fused-chunk kernels."""
    out, _ = fused_chunk_forward(query, key, value, chunk=chunk, scale=scale, interpret=interpret)
    return out


def _fused_chunk_fwd(
    query: Array, key: Array, value: Array, chunk: int, scale: float, interpret: bool
) -> tuple[Array, tuple[Array, Array, Array, Array, Array]]:
    out, den = fused_chunk_forward(query, key, value, chunk=chunk, scale=scale, interpret=interpret)
    return out, (query, key, value, out, den)


def _fused_chunk_bwd(
    chunk: int,
    scale: float,
    interpret: bool,
    residuals: tuple[Array, Array, Array, Array, Array],
    d_out: Array,
) -> tuple[Array, Array, Array]:
    return fused_chunk_backward(*residuals, d_out, chunk=chunk, scale=scale, interpret=interpret)


fused_chunk_attention.defvjp(_fused_chunk_fwd, _fused_chunk_bwd)
