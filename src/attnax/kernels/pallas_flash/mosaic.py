"""PALLAS_FLASH's forward lowered through Mosaic GPU (Hopper), for attention without mods.

The Triton forward (:mod:`.triton`) serves every mask and score mod. Where nothing masks or
modifies the scores (full attention, MHA or GQA, 2-byte inputs, head_dim padded to 64 or 128,
lengths in whole tiles), this kernel takes the forward instead: on an H100 it ran 525-590 TF/s
where Triton's tiles ran 456-480 (``benchmarks/NOTES.md``, "Ninth session"). It returns the
same ``(out, lse2)`` as the Triton forward, so the backward kernels are shared.

Structure (FlashAttention-3's warp specialisation): a program owns 128 query rows of one
(batch, head); three warpgroups share it.

* Two **consumer** warpgroups of 64 rows each keep their accumulator, row maximum and
  denominator in registers in the WGMMA layout; each step multiplies Q Kᵀ and P V on the
  tensor cores (``wgmma``) with the online softmax in float32 between. A two-arrival
  *schedule* barrier offsets the two by half a step, so one's softmax overlaps the other's
  matrix products.
* One **producer** warpgroup, with its registers handed to the consumers, streams K/V tiles
  into ``stages`` shared-memory slots by TMA; each slot has a *ready* barrier (TMA arrival)
  and a *free* barrier (both consumers done with it).

Scores are never scaled as a tile: the row maximum is taken on raw ``Q Kᵀ`` and the scale,
times log2(e), is folded into the exponent's argument (one FMA a score). That needs a positive
scale, which :func:`.plan.mosaic_forward_applies` requires.

Only this module's names are imported with attnax: ``jax.experimental.pallas.mosaic_gpu``
itself is imported on first use (:func:`mosaic_gpu_module`).
"""

import functools
import importlib
import math
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .tiles import LOG2E


@functools.cache
def mosaic_gpu_module() -> Any:
    """``jax.experimental.pallas.mosaic_gpu``, or None in a jax without it (then the Triton
    forward serves every call). Imported on first use, not with attnax (0.3 s); untyped, as its
    API is experimental and still moves between jax releases."""
    try:
        return importlib.import_module("jax.experimental.pallas.mosaic_gpu")
    except ImportError:
        return None


__all__ = [
    "MOSAIC_ROWS",
    "batch_folded",
    "check_shared_memory",
    "compiler_params",
    "hopper_gpu",
    "mosaic_forward",
    "mosaic_gpu_available",
    "mosaic_gpu_module",
    "swizzled_tiles",
]

_RECIP_LN2 = 1.0 / math.log(2.0)
# Query rows per consumer warpgroup (one wgmma's M) and consumers per program.
_WARPGROUP_ROWS = 64
_CONSUMERS = 2
# Query rows per program: sequences must be a multiple of this.
MOSAIC_ROWS = _WARPGROUP_ROWS * _CONSUMERS
# Shared memory Mosaic GPU reserves for cross-warp reductions (None: its default; read at
# trace time, ``benchmarks/pallas_flash.py --mosaic reserve`` flips it). The row
# reductions here stay inside a warp (the WGMMA layout splits rows, not columns, over warps),
# so none is needed; on an H100 the forward ran 1-3% faster without it (NOTES, "Ninth
# session"), and three K/V slots of 128 x 128 fit only without it.
REDUCTION_SCRATCH_BYTES: int | None = 0


# Shared memory one block may take on an H100 (227 KiB), as Mosaic GPU checks it when it
# compiles; tiles that overflow it are refused at trace time instead, naming the setting.
_SHARED_MEMORY_BYTES = 227 * 1024
# Mosaic GPU's default reduction reserve (REDUCTION_SCRATCH_BYTES None) and room for the
# barriers (8 bytes each) and alignment.
_DEFAULT_RESERVE_BYTES = 2048
_BARRIER_ROOM_BYTES = 1024


def check_shared_memory(tile_bytes: int, kernel: str, settings: str) -> None:
    """Raise a ValueError naming ``settings`` (the FlashConfig fields to lower) when a Mosaic-GPU
    kernel's shared-memory tiles, ``tile_bytes`` in all, overflow one block's shared memory."""
    reserve = _DEFAULT_RESERVE_BYTES if REDUCTION_SCRATCH_BYTES is None else 0
    available = _SHARED_MEMORY_BYTES - reserve - _BARRIER_ROOM_BYTES
    if tile_bytes > available:
        raise ValueError(
            f"pallas_flash_attention: the Mosaic-GPU {kernel}'s tiles need {tile_bytes} bytes "
            f"of shared memory at this head_dim, over the {available} a block has: lower "
            f"{settings} in FlashConfig."
        )


_Outputs = TypeVar("_Outputs", bound=tuple[jax.Array, ...])


def swizzled_tiles(plgpu: Any) -> tuple[Any, ...]:
    """Shared-memory transforms of every wgmma operand tile here: 128-byte swizzled (8, 64)
    tiles, the layout wgmma reads from shared memory."""
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def compiler_params(plgpu: Any, reduction_scratch: int | None) -> Any:
    """Approximate exp2 and the reduction reserve (None: Mosaic GPU's default)."""
    extra = {} if reduction_scratch is None else {"reduction_scratch_bytes": reduction_scratch}
    return plgpu.CompilerParams(approx_math=True, **extra)


def batch_folded(fn: Callable[..., _Outputs]) -> Callable[..., _Outputs]:
    """``fn`` (arrays with a leading batch axis in, a tuple of them out) with a vmap rule that
    folds the mapped axis into the batch axis, broadcasting unmapped inputs first: Mosaic GPU
    kernels have no batching rule of their own."""

    @jax.custom_batching.custom_vmap
    def batched(*arrays: jax.Array) -> _Outputs:
        return fn(*arrays)

    @batched.def_vmap
    def _rule(
        axis_size: int, in_batched: list[bool], *arrays: jax.Array
    ) -> tuple[tuple[jax.Array, ...], tuple[bool, ...]]:
        def folded(x: jax.Array, mapped: bool) -> jax.Array:
            x = x if mapped else jnp.broadcast_to(x, (axis_size, *x.shape))
            return x.reshape(axis_size * x.shape[1], *x.shape[2:])

        outs = batched(*(folded(x, m) for x, m in zip(arrays, in_batched, strict=True)))
        unfolded = tuple(o.reshape(axis_size, -1, *o.shape[1:]) for o in outs)
        return unfolded, (True,) * len(unfolded)

    return batched


def mosaic_gpu_available() -> bool:
    """Whether this jax ships Mosaic GPU's Pallas API."""
    return mosaic_gpu_module() is not None


def hopper_gpu() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x), where the
    warpgroup matrix products this kernel is built on exist."""
    if mosaic_gpu_module() is None:
        return False
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return False
    capability = str(getattr(device, "compute_capability", ""))
    return device.platform == "gpu" and capability.startswith("9.")


# Over 100 lines: one kernel body, whose consumer and producer warpgroups hand the shared
# K/V slots to each other through the barriers declared here; split apart, each side would
# take a dozen refs and barriers, and the protocol would no longer read in one place.
def _kernel(
    q_ref: Any,
    k_ref: Any,
    v_ref: Any,
    out_ref: Any,
    lse_ref: Any,
    scoped: Any,
    *,
    group: int,
    block_kv: int,
    stages: int,
    steps: int,
    exponent_scale: float,
) -> None:
    plgpu = mosaic_gpu_module()
    buffers, ready, free, schedule = scoped
    qo_smem2, k_smem, v_smem, lse_smem2 = buffers
    k_ready, v_ready, q_ready = ready
    k_free, v_free = free
    batch = lax.axis_index("batch")
    head = lax.axis_index("head")
    warpgroup = lax.axis_index("wg")
    rows = _WARPGROUP_ROWS

    def take_turn() -> None:
        # Both consumers arrive; neither passes until the other has arrived too.
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    @pl.when(warpgroup < _CONSUMERS)
    def _consume() -> None:
        plgpu.set_max_registers(232, action="increase")
        qo_smem = qo_smem2.at[warpgroup]
        lse_smem = lse_smem2.at[warpgroup]
        row_start = lax.axis_index("q_tile") * MOSAIC_ROWS + warpgroup * rows
        plgpu.copy_gmem_to_smem(
            q_ref.at[batch, head, pl.ds(row_start, rows)], qo_smem, q_ready.at[warpgroup]
        )
        plgpu.barrier_wait(q_ready.at[warpgroup])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        head_dim = qo_smem.shape[-1]
        acc = plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        row_max = plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32), row_layout)
        row_sum = plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), row_layout)
        plgpu.barrier_wait(k_ready.at[0])
        # The second consumer starts half a step behind the first.
        pl.when(warpgroup == 1)(take_turn)

        def step(kv_step: Any, carry: Any) -> Any:
            acc, row_max, row_sum = carry
            slot = lax.rem(kv_step, jnp.array(stages, kv_step.dtype))

            def scores(acc_ref: Any) -> Any:
                # K's slot read as Kᵀ (a transposed view: wgmma takes either major order).
                plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                take_turn()
                return acc_ref[...]

            raw = pl.run_scoped(scores, plgpu.ACC((rows, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            # Maximum of the raw scores, in the exponent's units (the scale is positive).
            new_max = jnp.maximum(row_max, raw.max(axis=1) * exponent_scale)
            alpha = jnp.exp2(row_max - new_max)
            probs = jnp.exp2(raw * exponent_scale - lax.broadcast_in_dim(new_max, raw.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            row_sum = row_sum * alpha + probs.sum(axis=1)
            probs_low = probs.astype(k_smem.dtype)
            # Keeps the softmax ahead of the barriers below (it is what overlaps the other
            # consumer's matrix products).
            acc, row_sum, new_max, probs_low = lax.optimization_barrier(  # type: ignore[no-untyped-call]
                (acc, row_sum, new_max, probs_low)
            )
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(schedule)

            def values(acc_ref: Any) -> None:
                plgpu.wgmma(acc_ref, probs_low, v_smem.at[slot])
                next_step = kv_step + 1

                @pl.when(next_step < steps)
                def _() -> None:
                    plgpu.barrier_wait(
                        k_ready.at[lax.rem(next_step, jnp.array(stages, kv_step.dtype))]
                    )

            acc = pl.run_state(values)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, new_max, row_sum

        acc, row_max, row_sum = lax.fori_loop(0, steps, step, (acc, row_max, row_sum))
        # Balances the second consumer's extra turn at the start.
        pl.when(warpgroup == 0)(take_turn)
        inverse = 1.0 / row_sum
        qo_smem[...] = (acc * lax.broadcast_in_dim(inverse, acc.shape, [0])).astype(qo_smem.dtype)
        lse_smem[...] = row_max + jnp.log(row_sum) * _RECIP_LN2
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[batch, head, pl.ds(row_start, rows)])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(row_start, rows)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(warpgroup == _CONSUMERS)
    def _produce() -> None:
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, jnp.array(group, head.dtype))

        def load(kv_step: Any, slot: Any) -> None:
            window = (batch, kv_head, pl.ds(kv_step * block_kv, block_kv))
            plgpu.copy_gmem_to_smem(k_ref.at[window], k_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[window], v_smem.at[slot], v_ready.at[slot])

        for slot in range(stages):
            load(slot, slot)

        @pl.loop(0, steps - stages)
        def _(kv_step: Any) -> None:
            slot = lax.rem(kv_step, jnp.array(stages, kv_step.dtype))
            # K is read first in a step, so it is freed first: wait on each just before its copy.
            window = (batch, kv_head, pl.ds((kv_step + stages) * block_kv, block_kv))
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[window], k_smem.at[slot], k_ready.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[window], v_smem.at[slot], v_ready.at[slot])


@functools.cache
def _forward_fn(
    scale: float, block_kv: int, stages: int, reduction_scratch: int | None
) -> Callable[..., Any]:
    """The kernel for one (scale, block_kv, stages), with a vmap rule: batched calls fold the
    mapped axis into the batch axis (Mosaic GPU kernels have no batching rule of their own)."""

    def call(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        plgpu = mosaic_gpu_module()
        batch, heads, seq_q, head_dim = q.shape
        kv_heads, seq_kv = k.shape[1], k.shape[2]
        steps = seq_kv // block_kv
        used_stages = min(stages, steps)
        check_shared_memory(
            _CONSUMERS * _WARPGROUP_ROWS * (head_dim * q.dtype.itemsize + 4)
            + 2 * used_stages * block_kv * head_dim * k.dtype.itemsize,
            "forward",
            "`mosaic_stages` or `mosaic_block_kv`",
        )
        kernel = functools.partial(
            _kernel,
            group=heads // kv_heads,
            block_kv=block_kv,
            stages=used_stages,
            steps=steps,
            exponent_scale=scale * LOG2E,
        )
        transforms = swizzled_tiles(plgpu)

        def body(q_ref: Any, k_ref: Any, v_ref: Any, out_ref: Any, lse_ref: Any) -> None:
            pl.run_scoped(
                lambda *scoped: kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, scoped),
                [
                    plgpu.SMEM(
                        (_CONSUMERS, _WARPGROUP_ROWS, head_dim), q.dtype, transforms=transforms
                    ),
                    plgpu.SMEM((used_stages, block_kv, head_dim), k.dtype, transforms=transforms),
                    plgpu.SMEM((used_stages, block_kv, head_dim), v.dtype, transforms=transforms),
                    plgpu.SMEM((_CONSUMERS, _WARPGROUP_ROWS), jnp.float32),
                ],
                (
                    plgpu.Barrier(num_barriers=used_stages),
                    plgpu.Barrier(num_barriers=used_stages),
                    plgpu.Barrier(num_barriers=_CONSUMERS),
                ),
                (
                    plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=used_stages),
                    plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=used_stages),
                ),
                plgpu.Barrier(num_arrivals=_CONSUMERS),
                collective_axes="wg",
            )

        out, lse = plgpu.kernel(
            body,
            out_type=(
                jax.ShapeDtypeStruct(q.shape, q.dtype),  # type: ignore[no-untyped-call]
                jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32),  # type: ignore[no-untyped-call]
            ),
            # Query tiles vary fastest, so the programs running at once share one head's K/V
            # in L2 (heads fastest, as in JAX's example, measured the same).
            grid=(seq_q // MOSAIC_ROWS, heads, batch),
            grid_names=("q_tile", "head", "batch"),
            num_threads=_CONSUMERS + 1,
            thread_name="wg",
            compiler_params=compiler_params(plgpu, reduction_scratch),
        )(q, k, v)
        return out, lse

    return batch_folded(call)


def mosaic_forward(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    scale: float,
    block_kv: int,
    stages: int,
) -> tuple[jax.Array, jax.Array]:
    """Full attention's forward: ``(out (B, H, T, D), lse2 (B, H, T) float32)``, the base-2
    log-sum-exp of ``scale * log2(e) * Q Kᵀ`` per row, as the Triton forward returns it.

    Preconditions (checked by the caller, :func:`.plan.mosaic_forward_applies`): a Hopper
    GPU; 2-byte Q/K/V of one dtype; head_dim (padded) 64 or 128; T a multiple of
    :data:`MOSAIC_ROWS` and S of ``block_kv``; H a multiple of Hk; ``scale > 0``.
    """
    fn = _forward_fn(float(scale), block_kv, stages, REDUCTION_SCRATCH_BYTES)
    out, lse = fn(query, key, value)
    return out, lse
