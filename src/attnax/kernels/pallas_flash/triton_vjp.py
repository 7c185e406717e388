"""PALLAS_FLASH's Triton backward kernels (:func:`dkv_call`, :func:`dq_call`).

FlashAttention-2 style, two Pallas kernels that recompute the probabilities from the saved
base-2 log-sum-exp and share the forward's block skipping:

* dK/dV: one program per (key block, batch, kv head); it loops over the query heads of its GQA
  group and, for each, over the query blocks that the block map lists for this key block
  (partial first with the mask, then full without), so dK and dV of a group are summed in
  registers, never through per-query-head partials. Its score tiles are (keys, queries), so
  both of its products take the probabilities untransposed.
* dQ: one program per (query block, batch, head), looping over key blocks like the forward. It
  also writes the score gradient tile of every additive bias into a zero-initialised (aliased)
  (B, H, Tp, Sp) buffer, which XLA sums to the bias's broadcast shape.

The value part of the score mod is differentiated per tile with :func:`jax.vjp` inside the
kernel body (closed forms fall out of the traced derivative: ``1 - tanh^2`` for softcap, 1 for
ALiBi and a bias).

Full attention on a Hopper GPU, where the Mosaic-GPU forward ran, takes the Mosaic-GPU pair of
:mod:`.mosaic_vjp` instead (:func:`.plan.mosaic_backward_applies`; the choice is made in
:func:`.api.backward`).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .._common import kernel_outputs, vary_like, varying_axes
from .config import FlashConfig, fit
from .plan import (
    Prepared,
    backward_stages,
    dq_launch,
    prepared_classes,
    row_blocks,
    uses_block_ranges,
)
from .tile_mods import Plan
from .tiles import LOG2E, Tile, dot_nn, dot_nt, matmul_precision, operand_specs, walk_row
from .triton import launch_params

__all__ = ["dkv_call", "dq_call", "row_terms"]


def _scores_and_vjp(
    plan: Plan, raw: Any, tile: Tile, masked: bool
) -> tuple[Any, Any]:
    """log2-domain masked scores of a tile and a function mapping dL/dz to (dL/ds, bias grads)."""
    if plan.value_fn is None:
        z = raw

        def pullback(dz: Any) -> tuple[Any, tuple[Any, ...]]:
            return dz, ()

    else:
        biases = plan.load_biases(tile)
        z, vjp_fn = jax.vjp(lambda s, bs: plan.modded(s, tile, bs), raw, biases)

        def pullback(dz: Any) -> tuple[Any, tuple[Any, ...]]:
            d_raw, d_biases = vjp_fn(dz)
            return d_raw, tuple(d_biases)

    t = z * LOG2E
    if masked:
        allowed = plan.allowed(tile)
        if allowed is not None:
            t = jnp.where(allowed, t, -jnp.inf)
    return t, pullback


def _dkv_kernel(
    q_ref: Any,
    k_ref: Any,
    v_ref: Any,
    do_ref: Any,
    lse_ref: Any,
    delta_ref: Any,
    idx_ref: Any,
    cnt_ref: Any,
    *refs: Any,
    plan: Plan,
    scale: float,
    group: int,
    block_q: int,
    block_kv: int,
    precision: Any,
    ranged: bool = False,
    accumulate: bool = False,
) -> None:
    num_operands = len(plan.operands)
    operand_refs = refs[:num_operands]
    if accumulate:
        dk_in, dv_in, dk_ref, dv_ref = refs[num_operands:]
    else:
        dk_ref, dv_ref = refs[num_operands:]
    kv_block, b, kv_head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kv_start = kv_block * block_kv
    k = k_ref[...]
    v = v_ref[...]
    many_h = idx_ref.shape[0] > 1

    # (keys, queries) tiles, as FlexAttention's dK/dV kernel: dV += P^T dO and dK += dS^T Q
    # then take the tiles as they come out of the exponent, where the (queries, keys) form
    # transposes two register tiles per step.
    def head_body(g: Any, carry: Any) -> Any:
        h = kv_head * group + g
        h_list = h if many_h else 0

        def step(q_block: Any, carry: Any, masked: bool) -> Any:
            dk, dv = carry
            q_start = q_block * block_q
            rows = pl.ds(q_start, block_q)
            q = q_ref[g, rows, :]
            do = do_ref[g, rows, :]
            lse = lse_ref[g, rows]
            delta = delta_ref[g, rows]
            tile = Tile(
                refs=operand_refs,
                b=b,
                h=h,
                q_start=q_start,
                kv_start=kv_start,
                block_q=block_q,
                block_kv=block_kv,
                transposed=True,
            )
            raw = dot_nt(k, q, precision) * scale
            t, pullback = _scores_and_vjp(plan, raw, tile, masked)
            p = jnp.exp2(t - lse[None, :])
            dv = dv + dot_nn(p.astype(do.dtype), do, precision)
            dp = dot_nt(v, do, precision)
            dz = p * (dp - delta[None, :])
            d_raw, _ = pullback(dz)
            dk = dk + dot_nn(d_raw.astype(q.dtype), q, precision)
            return dk, dv

        return walk_row(
            step,
            carry,
            index_at=lambda j: idx_ref[h_list, j],
            count_at=lambda i: cnt_ref[h_list, i],
            ranged=ranged,
        )

    head_dim = k.shape[-1]
    zeros = jnp.zeros((block_kv, head_dim), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, group, head_body, (zeros, zeros))
    dk = dk * scale
    if accumulate:
        # The buffers are aliased: this program adds its key block's share to what arrived.
        dk = dk + dk_in[...].astype(jnp.float32)
        dv = dv + dv_in[...].astype(jnp.float32)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    q_ref: Any,
    k_ref: Any,
    v_ref: Any,
    do_ref: Any,
    lse_ref: Any,
    delta_ref: Any,
    idx_ref: Any,
    cnt_ref: Any,
    *refs: Any,
    plan: Plan,
    scale: float,
    block_q: int,
    block_kv: int,
    precision: Any,
    ranged: bool = False,
    accumulate: bool = False,
) -> None:
    num_operands = len(plan.operands)
    num_biases = len(plan.bias_slots)
    operand_refs = refs[:num_operands]
    # The aliased zero buffers (and the dQ accumulator) arrive as inputs too; the zeros' input
    # refs are never read.
    first_output = num_operands + num_biases + int(accumulate)
    outputs = refs[first_output:]
    dq_ref = outputs[0]
    dbias_refs = outputs[1:]
    q_block, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q_start = q_block * block_q
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]

    def step(kv_block: Any, dq: Any, masked: bool) -> Any:
        kv_start = kv_block * block_kv
        cols = pl.ds(kv_start, block_kv)
        k = k_ref[cols, :]
        v = v_ref[cols, :]
        tile = Tile(
            refs=operand_refs,
            b=b,
            h=h,
            q_start=q_start,
            kv_start=kv_start,
            block_q=block_q,
            block_kv=block_kv,
        )
        raw = dot_nt(q, k, precision) * scale
        t, pullback = _scores_and_vjp(plan, raw, tile, masked)
        p = jnp.exp2(t - lse[:, None])
        dp = dot_nt(do, v, precision)
        dz = p * (dp - delta[:, None])
        d_raw, d_biases = pullback(dz)
        for dbias_ref, d_bias in zip(dbias_refs, d_biases, strict=True):
            dbias_ref[:, cols] = d_bias.astype(dbias_ref.dtype)
        return dq + dot_nn(d_raw.astype(k.dtype), k, precision)

    dq = walk_row(
        step,
        jnp.zeros((block_q, q.shape[-1]), jnp.float32),
        index_at=lambda j: idx_ref[j],
        count_at=lambda i: cnt_ref[i],
        ranged=ranged,
    )
    dq = dq * scale
    if accumulate:
        dq = dq + refs[first_output - 1][...].astype(jnp.float32)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def row_terms(
    prepared: Prepared, out: jax.Array, d_out: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The backward's per-row inputs padded like the prepared query: (dO, delta).

    ``delta_i = sum_d dO_id O_id``, the softmax-gradient row term; cheap, so plain XLA. Once it
    is formed the output is no longer needed.
    """
    q = prepared.query
    padded_q, padded_d = q.shape[2], q.shape[3]
    seq_q, head_dim = prepared.seq_q, prepared.head_dim
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, padded_q - seq_q)))
    do = jnp.pad(
        d_out.astype(q.dtype), ((0, 0), (0, 0), (0, padded_q - seq_q), (0, padded_d - head_dim))
    )
    return do, delta


def dkv_call(
    config: FlashConfig,
    prepared: Prepared,
    scale: float,
    do: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    *,
    accumulate: tuple[jax.Array, jax.Array] | None = None,
    in_place: bool = False,
    out_dtype: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """The dK/dV kernel on prepared (padded) inputs; returns padded (dK, dV).

    ``accumulate``: (dK, dV) buffers, padded like the keys, that the kernel adds its shares to
    in place (aliased; their dtype is the result's). ``in_place``: write dK and dV over the key
    and value buffers (aliased; each program reads its key block before writing it). Either
    saves a pair of (Sp, D) buffers; the caller must not read the keys and values, nor the
    accumulators, afterwards. ``out_dtype``: the results' dtype when neither is given (the
    keys' by default).
    """
    q, k, v, plan = prepared.query, prepared.key, prepared.value, prepared.plan
    batch, num_heads, padded_q, padded_d = q.shape
    num_kv_heads, padded_kv = k.shape[1], k.shape[2]
    seq_q, seq_kv = prepared.seq_q, prepared.seq_kv
    group = num_heads // num_kv_heads
    bq = fit(config.block_q_dkv, seq_q)
    bk = fit(config.block_kv_dkv, seq_kv)
    num_kv_blocks = padded_kv // bk
    # Grid over key blocks; query blocks listed per key block (the transposed map).
    classes_t = jnp.swapaxes(prepared_classes(prepared, bq, bk), -1, -2)
    if num_kv_blocks > classes_t.shape[2]:
        extra = num_kv_blocks - classes_t.shape[2]
        classes_t = jnp.pad(classes_t, ((0, 0), (0, 0), (0, extra), (0, 0)))
    indices, counts = row_blocks(classes_t, uses_block_ranges(plan))
    many_b = indices.shape[0] > 1
    list_h = indices.shape[1]

    def list_map(j: Any, b: Any, hk: Any) -> tuple[Any, ...]:
        return (b if many_b else 0, 0, j, 0)

    group_spec = pl.BlockSpec((None, group, padded_q, padded_d), lambda j, b, hk: (b, hk, 0, 0))
    group_rows = pl.BlockSpec((None, group, padded_q), lambda j, b, hk: (b, hk, 0))
    kv_spec = pl.BlockSpec((None, None, bk, padded_d), lambda j, b, hk: (b, hk, j, 0))
    operands: tuple[jax.Array, ...] = (q, k, v, do, lse, delta, indices, counts, *plan.operands)
    in_specs = [
        group_spec,
        kv_spec,
        kv_spec,
        group_spec,
        group_rows,
        group_rows,
        pl.BlockSpec((None, list_h, None, indices.shape[-1]), list_map),
        pl.BlockSpec((None, list_h, None, 2), list_map),
        *operand_specs(plan.operands),
    ]
    if accumulate is not None:
        out_dtypes = (accumulate[0].dtype, accumulate[1].dtype)
        aliases = {len(operands): 0, len(operands) + 1: 1}
        operands = (*operands, *accumulate)
        in_specs += [kv_spec, kv_spec]
    elif in_place:
        out_dtypes = (k.dtype, v.dtype)
        aliases = {1: 0, 2: 1}
    else:
        out_dtypes = (out_dtype or k.dtype, out_dtype or v.dtype)
        aliases = {}
    d_key, d_value = pl.pallas_call(
        functools.partial(
            _dkv_kernel,
            plan=plan,
            scale=scale,
            group=group,
            block_q=bq,
            block_kv=bk,
            precision=matmul_precision(q.dtype),
            ranged=uses_block_ranges(plan),
            accumulate=accumulate is not None,
        ),
        grid=(num_kv_blocks, batch, num_kv_heads),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=kernel_outputs(operands, (k.shape, out_dtypes[0]), (v.shape, out_dtypes[1])),
        input_output_aliases=aliases,
        compiler_params=launch_params(
            config.num_warps_bwd,
            backward_stages(prepared, config.num_stages_bwd),
            padded_d,
            interpret=config.interpret,
        ),
        interpret=config.interpret,
        name="attnax_flash_dkv",
    )(*operands)
    return d_key, d_value


def dq_call(
    config: FlashConfig,
    prepared: Prepared,
    scale: float,
    do: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    *,
    accumulate: jax.Array | None = None,
    out_dtype: Any = None,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """The dQ kernel on prepared (padded) inputs: padded dQ and each bias's (B, H, Tp, Sp)
    score gradient (float32).

    ``accumulate``: a dQ buffer, padded like the query, that the kernel adds to in place
    (aliased; its dtype is the result's). ``out_dtype``: dQ's dtype otherwise (the query's by
    default).
    """
    q, k, v, plan = prepared.query, prepared.key, prepared.value, prepared.plan
    batch, num_heads, padded_q, padded_d = q.shape
    num_kv_heads, padded_kv = k.shape[1], k.shape[2]
    seq_kv = prepared.seq_kv
    group = num_heads // num_kv_heads
    # Grid over query blocks, key blocks listed per query block.
    bq, num_warps, num_stages = dq_launch(config, prepared)
    bk = fit(config.block_kv_dq, seq_kv)
    indices, counts = row_blocks(prepared_classes(prepared, bq, bk), uses_block_ranges(plan))
    many_b, many_h = indices.shape[0] > 1, indices.shape[1] > 1

    def row_map(i: Any, b: Any, h: Any) -> tuple[Any, ...]:
        return (b if many_b else 0, h if many_h else 0, i, 0)

    q_spec = pl.BlockSpec((None, None, bq, padded_d), lambda i, b, h: (b, h, i, 0))
    rows_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    full_kv = pl.BlockSpec((None, None, padded_kv, padded_d), lambda i, b, h: (b, h // group, 0, 0))
    dbias_spec = pl.BlockSpec((None, None, bq, padded_kv), lambda i, b, h: (b, h, i, 0))
    num_biases = len(plan.bias_slots)
    operands = (q, k, v, do, lse, delta, indices, counts, *plan.operands)
    mesh_axes = varying_axes(*operands)  # the aliased zeros vary like the kernel's outputs
    zeros = tuple(
        vary_like(jnp.zeros((batch, num_heads, padded_q, padded_kv), jnp.float32), mesh_axes)
        for _ in range(num_biases)
    )
    aliases = {len(operands) + n: 1 + n for n in range(num_biases)}
    extra_specs = [dbias_spec] * num_biases
    if accumulate is not None:
        aliases[len(operands) + num_biases] = 0
        extra_specs.append(q_spec)
        dq_dtype = accumulate.dtype
        extra: tuple[jax.Array, ...] = (*zeros, accumulate)
    else:
        dq_dtype = out_dtype or q.dtype
        extra = zeros
    results = pl.pallas_call(
        functools.partial(
            _dq_kernel,
            plan=plan,
            scale=scale,
            block_q=bq,
            block_kv=bk,
            precision=matmul_precision(q.dtype),
            ranged=uses_block_ranges(plan),
            accumulate=accumulate is not None,
        ),
        grid=(padded_q // bq, batch, num_heads),
        in_specs=[
            q_spec,
            full_kv,
            full_kv,
            q_spec,
            rows_spec,
            rows_spec,
            pl.BlockSpec((None, None, None, indices.shape[-1]), row_map),
            pl.BlockSpec((None, None, None, 2), row_map),
            *operand_specs(plan.operands),
            *extra_specs,
        ],
        out_specs=[q_spec, *([dbias_spec] * num_biases)],
        out_shape=kernel_outputs(
            operands, (q.shape, dq_dtype), *((z.shape, z.dtype) for z in zeros)
        ),
        input_output_aliases=aliases,
        compiler_params=launch_params(
            num_warps, num_stages, padded_d, interpret=config.interpret
        ),
        interpret=config.interpret,
        name="attnax_flash_dq",
    )(*operands, *extra)
    return results[0], tuple(results[1:])
