"""PALLAS_FLASH's Triton forward: FlashAttention-2 with score mods in the inner loop.

A program owns one (query block, batch, head); it walks the partial blocks with the mask
evaluated and then the full blocks without it, so empty blocks are never loaded
(:func:`.tiles.walk_row` over :func:`.plan.row_blocks`). The value mod is traced into the loop
with absolute indices (``b``, ``h`` scalars from the program ids, ``q_idx`` (bq, 1),
``kv_idx`` (1, bk)); softmax runs online in float32 in base 2 (scores are multiplied by
log2(e) after the mod, so mods see natural-unit scores).

**Stepped forward** (``FlashConfig.key_step_blocks``, memory_efficient_attention's GPU path):
an XLA ``lax.scan`` over steps of a few key blocks; each step's block lists hold only its own
blocks, and the kernel reads and writes the float32 running state (accumulator, maximum,
denominator) in aliased HBM buffers instead of keeping it in registers for the whole walk.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .._common import kernel_outputs, vary_like, varying_axes
from .._gpu import triton_compiler_params
from .config import FlashConfig, fit
from .plan import Prepared, forward_stages, prepared_classes, row_blocks, uses_block_ranges
from .tile_mods import Plan
from .tiles import (
    LOG2E,
    Tile,
    dot_nn,
    dot_nt,
    finish_rows,
    matmul_precision,
    operand_specs,
    walk_row,
)

__all__ = ["launch_params", "triton_forward"]


def launch_params(
    num_warps: int | None,
    num_stages: int,
    head_dim: int,
    *,
    interpret: bool,
    tile: int = 128 * 128,
) -> Any:
    """Every Triton kernel's launch parameters (None when interpreted).

    Unset warps: 8 for head_dim > 64 on tiles above 128 x 64; 4 otherwise. On the H100 a
    128 x 64 forward tile at head_dim 128 ran 1.28 ms with 4 warps against 1.76 with 8
    (B4 S4096 full; benchmarks/NOTES.md).
    """
    if num_warps is not None:
        warps = num_warps
    else:
        warps = 4 if head_dim <= 64 or tile <= 128 * 64 else 8
    return triton_compiler_params(warps, num_stages, interpret=interpret)


@dataclasses.dataclass(frozen=True)
class Static:
    """Static facts of one call (closed over by the kernels)."""

    scale: float
    group: int
    block_q: int
    block_kv: int
    precision: Any
    # Rows are described by block ranges, not lists (row_blocks, walk_row).
    ranged: bool = False
    # The forward kernel reads and writes the running softmax state instead of starting from
    # nothing and normalising (FlashConfig.key_step_blocks > 0).
    stepped: bool = False




def forward_kernel(
    q_ref: Any,
    k_ref: Any,
    v_ref: Any,
    idx_ref: Any,
    cnt_ref: Any,
    *refs: Any,
    plan: Plan,
    static: Static,
) -> None:
    num_operands = len(plan.operands)
    operand_refs = refs[:num_operands]
    q_block, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = static.block_q, static.block_kv
    q = q_ref[...]
    head_dim = q.shape[-1]

    def step(kv_block: Any, carry: Any, masked: bool) -> Any:
        acc, m_prev, l_prev = carry
        kv_start = kv_block * bk
        k = k_ref[pl.ds(kv_start, bk), :]
        v = v_ref[pl.ds(kv_start, bk), :]
        tile = Tile(
            refs=operand_refs,
            b=b,
            h=h,
            q_start=q_block * bq,
            kv_start=kv_start,
            block_q=bq,
            block_kv=bk,
        )
        raw = dot_nt(q, k, static.precision)
        if plan.value_fn is None:
            t = raw * (static.scale * LOG2E)
        else:
            t = plan.modded(raw * static.scale, tile, plan.load_biases(tile)) * LOG2E
        if masked:
            allowed = plan.allowed(tile)
            if allowed is not None:
                t = jnp.where(allowed, t, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(t, axis=1))
        # A row with nothing allowed so far keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        alpha = jnp.exp2(m_prev - m_safe)
        p = jnp.exp2(t - m_safe[:, None])
        l_next = alpha * l_prev + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + dot_nn(p.astype(v.dtype), v, static.precision)
        return acc, m_next, l_next

    def walk(carry: Any) -> Any:
        return walk_row(
            step,
            carry,
            index_at=lambda j: idx_ref[j],
            count_at=lambda i: cnt_ref[i],
            ranged=static.ranged,
        )

    if static.stepped:
        acc_in, m_in, l_in, acc_ref, m_ref, l_ref = refs[num_operands:]

        # The state buffers are aliased in place: a query block this step cannot see keeps
        # its state without being read or written.
        @pl.when(cnt_ref[0] + cnt_ref[1] > 0)
        def _() -> None:
            acc, m, l = walk((acc_in[...], m_in[...], l_in[...]))
            acc_ref[...] = acc
            m_ref[...] = m
            l_ref[...] = l

        return

    o_ref, lse_ref = refs[num_operands:]
    acc, m, l = walk(
        (
            jnp.zeros((bq, head_dim), jnp.float32),
            jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32),
        )
    )
    out, lse2 = finish_rows(acc, m, l)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse2


def list_spec(indices: jax.Array, counts: jax.Array) -> tuple[pl.BlockSpec, pl.BlockSpec]:
    """BlockSpecs of per-(b, h, row) block lists for a (row, b, h) grid (broadcast axes at 0)."""
    many_b = indices.shape[0] > 1
    many_h = indices.shape[1] > 1

    def index_map(i: Any, b: Any, h: Any) -> tuple[Any, ...]:
        return (b if many_b else 0, h if many_h else 0, i, 0)

    return (
        pl.BlockSpec((None, None, None, indices.shape[-1]), index_map),
        pl.BlockSpec((None, None, None, 2), index_map),
    )



def triton_forward(
    config: FlashConfig, prepared: Prepared, scale: float
) -> tuple[jax.Array, jax.Array]:
    """The Triton forward on prepared (padded) inputs; returns (out_padded, lse2_padded).

    One kernel call, or with ``config.key_step_blocks`` an XLA scan of stepped calls.
    """
    q, plan = prepared.query, prepared.plan
    num_heads = q.shape[1]
    bq = fit(config.block_q, prepared.seq_q)
    bk = fit(config.block_kv, prepared.seq_kv)
    classes = prepared_classes(prepared, bq, bk)
    static = Static(
        scale,
        num_heads // prepared.key.shape[1],
        bq,
        bk,
        matmul_precision(q.dtype),
        ranged=uses_block_ranges(plan),
        stepped=config.key_step_blocks > 0,
    )
    if not static.stepped:
        indices, counts = row_blocks(classes, static.ranged)
        out, lse = _forward_call(config, prepared, static, indices, counts, ())
        return out, lse
    return _stepped_forward(config, prepared, static, classes)


def _stepped_forward(
    config: FlashConfig, prepared: Prepared, static: Static, classes: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Steps of n key blocks: each step's list holds only its own blocks (global indices), so
    the kernel reads the keys it needs straight from the whole K/V, positions unshifted."""
    q, plan = prepared.query, prepared.plan
    batch, num_heads, padded_q, head_dim = q.shape
    n = config.key_step_blocks
    num_kv = classes.shape[-1]
    num_steps = -(-num_kv // n)
    classes = jnp.pad(classes, ((0, 0), (0, 0), (0, 0), (0, num_steps * n - num_kv)))
    indices, counts = row_blocks(classes.reshape(*classes.shape[:3], num_steps, n), static.ranged)
    # Every entry of a list or a range is a block index: shift each step's to global ones.
    indices = indices + (jnp.arange(num_steps, dtype=jnp.int32) * n)[:, None]
    # Inside shard_map the scan's carry must vary over the same mesh axes as the kernel's output.
    axes = varying_axes(q, prepared.key, prepared.value, *plan.operands)
    state = (
        vary_like(jnp.zeros((batch, num_heads, padded_q, head_dim), jnp.float32), axes),
        vary_like(jnp.full((batch, num_heads, padded_q), -jnp.inf, jnp.float32), axes),
        vary_like(jnp.zeros((batch, num_heads, padded_q), jnp.float32), axes),
    )

    def key_step(
        state: tuple[jax.Array, jax.Array, jax.Array], lists: tuple[jax.Array, jax.Array]
    ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], None]:
        acc, m, l = _forward_call(config, prepared, static, lists[0], lists[1], state)
        return (acc, m, l), None

    lists = (jnp.moveaxis(indices, 3, 0), jnp.moveaxis(counts, 3, 0))
    (acc, m, l), _ = jax.lax.scan(key_step, state, lists)
    out, lse2 = finish_rows(acc, m, l)
    return out.astype(q.dtype), lse2


def _forward_call(
    config: FlashConfig,
    prepared: Prepared,
    static: Static,
    indices: jax.Array,
    counts: jax.Array,
    state: tuple[jax.Array, ...],
) -> Any:
    """One forward kernel call: (out, lse2), or the next (acc, m, l) when ``state`` is given."""
    q, k, v, plan = prepared.query, prepared.key, prepared.value, prepared.plan
    batch, num_heads, padded_q, padded_d = q.shape
    padded_kv = k.shape[2]
    bq, group = static.block_q, static.group
    kernel = functools.partial(forward_kernel, plan=plan, static=static)
    idx_spec, cnt_spec = list_spec(indices, counts)
    row_block = pl.BlockSpec((None, None, bq, padded_d), lambda i, b, h: (b, h, i, 0))
    row_scalars = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    in_specs = [
        row_block,
        pl.BlockSpec((None, None, padded_kv, padded_d), lambda i, b, h: (b, h // group, 0, 0)),
        pl.BlockSpec((None, None, padded_kv, padded_d), lambda i, b, h: (b, h // group, 0, 0)),
        idx_spec,
        cnt_spec,
        *operand_specs(plan.operands),
    ]
    operands = (q, k, v, indices, counts, *plan.operands, *state)
    rows = ((batch, num_heads, padded_q), jnp.float32)
    if state:
        first_state = len(in_specs)
        in_specs += [row_block, row_scalars, row_scalars]
        out_shape = kernel_outputs(operands, (q.shape, jnp.float32), rows, rows)
        out_specs = [row_block, row_scalars, row_scalars]
        aliases = {first_state + i: i for i in range(3)}
    else:
        out_shape = kernel_outputs(operands, (q.shape, q.dtype), rows)
        out_specs = [row_block, row_scalars]
        aliases = {}
    return pl.pallas_call(
        kernel,
        grid=(padded_q // bq, batch, num_heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=launch_params(
            config.num_warps,
            forward_stages(config, prepared),
            padded_d,
            interpret=config.interpret,
            tile=bq * static.block_kv,
        ),
        interpret=config.interpret,
        name="attnax_flash_forward_step" if state else "attnax_flash_forward",
    )(*operands)

