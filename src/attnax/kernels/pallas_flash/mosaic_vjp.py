"""PALLAS_FLASH's backward lowered through Mosaic GPU (Hopper), for attention without mods.

The forward's companion (:mod:`.mosaic`), chosen with it where
``FlashConfig.use_mosaic_backward`` is on (:func:`.plan.mosaic_backward_applies`): the same
preconditions, and it reads the forward's base-2 log-sum-exp.

Two kernels, as the Triton backward, each a warp-specialised pipeline
(``plgpu.emit_pipeline_warp_specialized``: one memory warpgroup streams tiles by TMA, the
compute warpgroups consume them):

* **dK/dV**: a program owns ``2 x 64`` keys of one (batch, KV head), a consumer warpgroup 64
  of them with dK and dV in registers. The pipeline streams Q, dO, the
  log-sum-exp and delta for every query tile of every query head of the GQA group (Q viewed as
  (B, Hk, group * T, D), a free reshape). Scores as (keys, queries), so both products
  ``dV += Pᵀ dO`` and ``dK += dSᵀ Q`` take the probability tiles from registers as they are.
* **dQ**: a program owns ``2 x 64`` query rows of one (batch, head); the pipeline streams
  K and V of its KV head; ``dQ += dS K``.

With ``c = scale * log2(e)``: ``P = exp2(c Q Kᵀ - lse2)``, ``dS = P (dO Vᵀ - delta)``, and the
gradients of the unscaled products are ``scale`` times the products of ``dS``.
"""

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import mosaic as forward_kernel
from .mosaic import (
    mosaic_gpu_module,
    batch_folded,
    check_shared_memory,
    compiler_params,
    swizzled_tiles,
)
from .tiles import LOG2E

__all__ = ["mosaic_backward"]

_CONSUMERS = 2
# Rows of the tile a consumer warpgroup owns (its keys in dK/dV, its queries in dQ): one
# wgmma M tile, and with the streamed tile's rows the register budget of its score tiles.
_OWNED_ROWS = 64
# The memory warpgroup's registers (the rest go to the consumers).
_MEMORY_REGISTERS = 40


def _load_row(ref: Any, layout: Any) -> Any:
    """A (rows,) float32 vector from shared memory in a WGMMA reduction layout.

    ``plgpu.load`` takes an index tuple in jax 0.10 and none in 0.11."""
    plgpu = mosaic_gpu_module()
    index = inspect.signature(plgpu.load).parameters.get("idx")
    if index is not None and index.default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def _streamed_tile(plgpu: Any, rows: int, head_dim: int) -> Any:
    """The pipeline's spec for the i-th (rows, head_dim) tile of a (length, head_dim) ref."""
    return plgpu.BlockSpec(
        block_shape=(rows, head_dim),
        index_map=lambda i: (i, 0),
        transforms=swizzled_tiles(plgpu),
    )


def _pipeline(
    plgpu: Any, step: Any, compute: Any, steps: int, stages: int, in_specs: list[Any]
) -> Any:
    """``steps`` steps of ``step`` over the streamed ``in_specs`` in ``stages`` slots: one TMA
    memory warpgroup, the consumers inside ``compute`` (which owns their resident tiles), each
    step releasing its slots itself (``manual_consumed_barriers``) as soon as it has read them."""
    return plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(steps,),
        max_concurrent_steps=min(stages, steps),
        num_compute_wgs=_CONSUMERS,
        memory_registers=_MEMORY_REGISTERS,
        wg_axis="wg",
        manual_consumed_barriers=True,
        compute_context=compute,
        in_specs=in_specs,
    )


def _params(plgpu: Any) -> Any:
    # The forward's reduction reserve, read at trace time (the backward reduces nothing across
    # warps either).
    return compiler_params(plgpu, forward_kernel.REDUCTION_SCRATCH_BYTES)


# Over 100 lines (as _dq below): the kernel body and its pipeline step close over one call's
# shapes, refs and barriers; split into module functions each would take a dozen of them,
# and the order of waits and arrivals would no longer read in one place.
def _dkv(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    do: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    *,
    scale: float,
    block_q: int,
    stages: int,
) -> tuple[jax.Array, jax.Array]:
    plgpu = mosaic_gpu_module()
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_kv = k.shape[1], k.shape[2]
    group = heads // kv_heads
    # Every query head of a KV head's group, one after another: (B, Hk, group * T, ...).
    q_grouped = q.reshape(batch, kv_heads, group * seq_q, head_dim)
    do_grouped = do.reshape(batch, kv_heads, group * seq_q, head_dim)
    lse_grouped = lse.reshape(batch, kv_heads, group * seq_q)
    delta_grouped = delta.reshape(batch, kv_heads, group * seq_q)
    block_kv = _OWNED_ROWS
    exponent_scale = scale * LOG2E
    dtype = q.dtype
    steps = group * seq_q // block_q
    # K and V of both consumers; per slot, Q and dO tiles with their float32 lse and delta.
    check_shared_memory(
        2 * _CONSUMERS * block_kv * head_dim * dtype.itemsize
        + min(stages, steps) * 2 * block_q * (head_dim * dtype.itemsize + 4),
        "dK/dV kernel",
        "`mosaic_dkv_stages` or `mosaic_dkv_block_q`",
    )

    def kernel(
        q_ref: Any,
        k_ref: Any,
        v_ref: Any,
        do_ref: Any,
        lse_ref: Any,
        delta_ref: Any,
        dk_ref: Any,
        dv_ref: Any,
        buffers: Any,
        ready: Any,
    ) -> None:
        b = lax.axis_index("batch")
        kv_head = lax.axis_index("kv_head")
        warpgroup = lax.axis_index("wg")
        k_smem2, v_smem2 = buffers
        k_ready, v_ready = ready

        def compute(pipeline: Callable[[Any], Any]) -> None:
            k_smem, v_smem = k_smem2.at[warpgroup], v_smem2.at[warpgroup]
            key_start = lax.axis_index("kv_tile") * (_CONSUMERS * block_kv) + warpgroup * block_kv
            keys = (b, kv_head, pl.ds(key_start, block_kv))
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, k_ready.at[warpgroup])
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, v_ready.at[warpgroup])
            plgpu.barrier_wait(k_ready.at[warpgroup])
            plgpu.barrier_wait(v_ready.at[warpgroup])
            zeros = jnp.zeros((block_kv, head_dim), jnp.float32)
            dk, dv = pipeline(
                (
                    plgpu.layout_cast(zeros, plgpu.Layout.WGMMA),
                    plgpu.layout_cast(zeros, plgpu.Layout.WGMMA),
                )
            )
            # K and V are no longer read: their shared memory stages the results.
            k_smem[...] = (dk * scale).astype(dtype)
            v_smem[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[keys], commit_group=False)
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[keys], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        def step(
            _: Any,
            q_smem: Any,
            do_smem: Any,
            lse_smem: Any,
            delta_smem: Any,
            q_free: Any,
            do_free: Any,
            lse_free: Any,
            delta_free: Any,
            carry: Any,
        ) -> Any:
            dk, dv = carry
            k_smem, v_smem = k_smem2.at[warpgroup], v_smem2.at[warpgroup]

            def scores(acc_ref: Any) -> Any:
                plgpu.wgmma(acc_ref, k_smem, q_smem.transpose((1, 0)))
                return acc_ref[...]

            raw = pl.run_scoped(scores, plgpu.ACC((block_kv, block_q), jnp.float32))
            # Per query: a column vector of the (keys, queries) tile.
            lse_row = _load_row(lse_smem, plgpu.Layout.WGMMA.reduce(0))
            plgpu.barrier_arrive(lse_free)
            shape = (block_kv, block_q)
            probs = jnp.exp2(raw * exponent_scale - lax.broadcast_in_dim(lse_row, shape, [1]))

            def value_products(refs: Any) -> None:
                # Both issued before one wait: dV += Pᵀ dO and dPᵀ = V dOᵀ.
                dv_ref, dp_ref = refs
                plgpu.wgmma(dv_ref, probs.astype(dtype), do_smem)
                plgpu.wgmma(dp_ref, v_smem, do_smem.transpose((1, 0)))

            empty = plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)
            dv, dp = pl.run_state(value_products)((plgpu.ACC.init(dv), plgpu.ACC.init(empty)))
            plgpu.barrier_arrive(do_free)
            delta_row = _load_row(delta_smem, plgpu.Layout.WGMMA.reduce(0))
            plgpu.barrier_arrive(delta_free)
            d_scores = probs * (dp - lax.broadcast_in_dim(delta_row, shape, [1]))

            def key_product(acc_ref: Any) -> None:
                plgpu.wgmma(acc_ref, d_scores.astype(dtype), q_smem)

            dk = pl.run_state(key_product)(plgpu.ACC.init(dk))
            plgpu.barrier_arrive(q_free)
            return dk, dv

        rows = _streamed_tile(plgpu, block_q, head_dim)
        scalars = plgpu.BlockSpec(block_shape=(block_q,), index_map=lambda i: (i,))
        pipeline = _pipeline(plgpu, step, compute, steps, stages, [rows, rows, scalars, scalars])
        pipeline(
            q_ref.at[b, kv_head],
            do_ref.at[b, kv_head],
            lse_ref.at[b, kv_head],
            delta_ref.at[b, kv_head],
        )

    tiles = swizzled_tiles(plgpu)
    key_tile = plgpu.SMEM((_CONSUMERS, block_kv, head_dim), dtype, transforms=tiles)
    kv_shape = jax.ShapeDtypeStruct(k.shape, dtype)  # type: ignore[no-untyped-call]
    dk, dv = plgpu.kernel(
        kernel,
        out_type=(kv_shape, kv_shape),
        scratch_types=[
            (key_tile, key_tile),
            (plgpu.Barrier(num_barriers=_CONSUMERS),) * 2,
        ],
        compiler_params=_params(plgpu),
        grid=(seq_kv // (_CONSUMERS * block_kv), kv_heads, batch),
        grid_names=("kv_tile", "kv_head", "batch"),
        num_threads=_CONSUMERS + 1,
        thread_name="wg",
    )(q_grouped, k, v, do_grouped, lse_grouped, delta_grouped)
    return dk, dv


def _dq(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    do: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    *,
    scale: float,
    block_kv: int,
    stages: int,
) -> jax.Array:
    plgpu = mosaic_gpu_module()
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_kv = k.shape[1], k.shape[2]
    group = heads // kv_heads
    block_q = _OWNED_ROWS
    exponent_scale = scale * LOG2E
    dtype = q.dtype
    steps = seq_kv // block_kv
    # Q, dO, lse and delta of both consumers; per slot, K and V tiles.
    check_shared_memory(
        _CONSUMERS * block_q * 2 * (head_dim * dtype.itemsize + 4)
        + min(stages, steps) * 2 * block_kv * head_dim * dtype.itemsize,
        "dQ kernel",
        "`mosaic_dq_stages` or `mosaic_dq_block_kv`",
    )

    def kernel(
        q_ref: Any,
        k_ref: Any,
        v_ref: Any,
        do_ref: Any,
        lse_ref: Any,
        delta_ref: Any,
        dq_ref: Any,
        buffers: Any,
        ready: Any,
    ) -> None:
        b = lax.axis_index("batch")
        head = lax.axis_index("head")
        warpgroup = lax.axis_index("wg")
        q_smem2, do_smem2, lse_smem2, delta_smem2 = buffers

        def compute(pipeline: Callable[[Any], Any]) -> None:
            q_smem, do_smem = q_smem2.at[warpgroup], do_smem2.at[warpgroup]
            lse_smem, delta_smem = lse_smem2.at[warpgroup], delta_smem2.at[warpgroup]
            row_start = lax.axis_index("q_tile") * (_CONSUMERS * block_q) + warpgroup * block_q
            rows = (b, head, pl.ds(row_start, block_q))
            for source, target, barrier in zip(
                (q_ref, do_ref, lse_ref, delta_ref),
                (q_smem, do_smem, lse_smem, delta_smem),
                ready,
                strict=True,
            ):
                plgpu.copy_gmem_to_smem(source.at[rows], target, barrier.at[warpgroup])
            for barrier in ready:
                plgpu.barrier_wait(barrier.at[warpgroup])
            lse_row = _load_row(lse_smem, plgpu.Layout.WGMMA.reduce(1))
            delta_row = _load_row(delta_smem, plgpu.Layout.WGMMA.reduce(1))
            zeros = jnp.zeros((block_q, head_dim), jnp.float32)
            dq, _, _ = pipeline((plgpu.layout_cast(zeros, plgpu.Layout.WGMMA), lse_row, delta_row))
            # Q is no longer read: its shared memory stages dQ.
            q_smem[...] = (dq * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        def step(_: Any, k_smem: Any, v_smem: Any, k_free: Any, v_free: Any, carry: Any) -> Any:
            dq, lse_row, delta_row = carry
            q_smem, do_smem = q_smem2.at[warpgroup], do_smem2.at[warpgroup]
            shape = (block_q, block_kv)

            def scores(acc_ref: Any) -> Any:
                plgpu.wgmma(acc_ref, q_smem, k_smem.transpose((1, 0)))
                return acc_ref[...]

            raw = pl.run_scoped(scores, plgpu.ACC(shape, jnp.float32))
            probs = jnp.exp2(raw * exponent_scale - lax.broadcast_in_dim(lse_row, shape, [0]))

            def value_product(acc_ref: Any) -> Any:
                plgpu.wgmma(acc_ref, do_smem, v_smem.transpose((1, 0)))
                return acc_ref[...]

            dp = pl.run_scoped(value_product, plgpu.ACC(shape, jnp.float32))
            plgpu.barrier_arrive(v_free)
            d_scores = probs * (dp - lax.broadcast_in_dim(delta_row, shape, [0]))

            def query_product(acc_ref: Any) -> None:
                plgpu.wgmma(acc_ref, d_scores.astype(dtype), k_smem)

            dq = pl.run_state(query_product)(plgpu.ACC.init(dq))
            plgpu.barrier_arrive(k_free)
            return dq, lse_row, delta_row

        tile = _streamed_tile(plgpu, block_kv, head_dim)
        pipeline = _pipeline(plgpu, step, compute, steps, stages, [tile, tile])
        kv_head = lax.div(head, jnp.array(group, head.dtype))
        pipeline(k_ref.at[b, kv_head], v_ref.at[b, kv_head])

    tiles = swizzled_tiles(plgpu)
    rows_tile = plgpu.SMEM((_CONSUMERS, block_q, head_dim), dtype, transforms=tiles)
    row_vector = plgpu.SMEM((_CONSUMERS, block_q), jnp.float32)
    dq: jax.Array = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),  # type: ignore[no-untyped-call]
        scratch_types=[
            (rows_tile, rows_tile, row_vector, row_vector),
            (plgpu.Barrier(num_barriers=_CONSUMERS),) * 4,
        ],
        compiler_params=_params(plgpu),
        grid=(seq_q // (_CONSUMERS * block_q), heads, batch),
        grid_names=("q_tile", "head", "batch"),
        num_threads=_CONSUMERS + 1,
        thread_name="wg",
    )(q, k, v, do, lse, delta)
    return dq


@functools.cache
def _backward_fn(
    scale: float, dkv_block_q: int, dq_block_kv: int, dkv_stages: int, dq_stages: int
) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    """Both kernels for one configuration, with a vmap rule folding the mapped axis into the
    batch (Mosaic GPU kernels have no batching rule of their own)."""
    dkv = functools.partial(_dkv, scale=scale, block_q=dkv_block_q, stages=dkv_stages)
    dq = functools.partial(_dq, scale=scale, block_kv=dq_block_kv, stages=dq_stages)

    def both(*arrays: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        dk, dv = dkv(*arrays)
        return dq(*arrays), dk, dv

    return batch_folded(both)


def mosaic_backward(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    d_out: jax.Array,
    lse2: jax.Array,
    delta: jax.Array,
    *,
    scale: float,
    dkv_block_q: int = 64,
    dq_block_kv: int = 128,
    dkv_stages: int = 2,
    dq_stages: int = 2,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dQ, dK, dV) of full attention from the forward's base-2 log-sum-exp ``lse2`` (B, H, T)
    and ``delta = sum(dO * O, -1)`` (B, H, T), both float32.

    Preconditions as :func:`.mosaic.mosaic_forward`'s, with T a
    multiple of 128 and S of 128 (each program owns 2 x 64 rows; ``dkv_block_q``, the dK/dV
    kernel's streamed query tile, and ``dq_block_kv``, the dQ kernel's streamed key tile, are
    64 or 128), with ``dkv_stages`` and ``dq_stages`` pipeline slots.
    """
    fn = _backward_fn(float(scale), dkv_block_q, dq_block_kv, dkv_stages, dq_stages)
    return fn(query, key, value, d_out, lse2, delta)
