"""The split-KV Pallas kernel (Triton lowering on GPU; ``interpret=True`` runs it on CPU).

The kernel splits the cache's sequence axis into ``num_splits`` chunks that run as separate
programs (so a small batch still fills the GPU); each program streams its chunk in tiles of
``block_kv`` keys with an online softmax, and the float32 partial results are merged by
log-sum-exp in XLA (:mod:`.softmax`). The paged kernel (:mod:`.paged`) shares the program body
and the launch; it differs only in how a tile is loaded.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Int

from ..._mods import split_score_mod
from ..._typing import AttentionOutput, KeyArray, QueryArray, ScoreMod, ValueArray
from .._common import kernel_outputs
from .._gpu import triton_compiler_params
from .plan import group_query_rows, row_indices, split_plan, tile_range, ungroup_rows
from .softmax import NEG_INF_FINITE, merge_splits, online_softmax_step, tile_scores


def split_kv_body(
    *,
    load_tile: Any,
    length: Any,
    q_offset: Any,
    q: Any,
    out_ref: Any,
    max_ref: Any,
    sum_ref: Any,
    score_mod: ScoreMod | None,
    scale: float,
    group: int,
    seq_q: int,
    tile: int,
    steps_per_split: int,
    num_steps_total: int,
    causal: bool,
    attention_window: int | None,
) -> None:
    """One split-KV program: online softmax over this split's visible tiles, partials out.

    Shared by the contiguous and the paged kernel, which differ only in ``load_tile(index)``:
    how the keys and values of tile ``index`` (``tile`` rows each) are read.
    """
    b = pl.program_id(0)
    kv_head = pl.program_id(1)
    split = pl.program_id(2)
    rows, head_dim = q.shape
    h_idx, q_pos = row_indices(
        jnp.arange(rows)[:, None], group=group, seq_q=seq_q, kv_head=kv_head, q_offset=q_offset
    )
    mask_mod, value_mod = split_score_mod(score_mod)
    lo, hi = tile_range(
        length=length,
        q_offset=q_offset,
        seq_q=seq_q,
        tile=tile,
        causal=causal,
        attention_window=attention_window,
    )
    first = jnp.maximum(split * steps_per_split, lo)
    last = jnp.minimum(jnp.minimum((split + 1) * steps_per_split, num_steps_total), hi)
    num_steps = jnp.maximum(last - first, 0)
    kv_offsets = jnp.arange(tile)[None, :]

    def body(step: Any, carry: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
        out_prev, max_prev, sum_prev = carry
        index = first + step
        k, v = load_tile(index)
        scores = (
            jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            * scale
        )
        scores = tile_scores(
            scores,
            b_idx=b,
            h_idx=h_idx,
            q_pos=q_pos,
            kv_pos=index * tile + kv_offsets,
            length=length,
            causal=causal,
            attention_window=attention_window,
            mask_mod=mask_mod,
            value_mod=value_mod,
        )

        def value_product(weights: Any) -> Any:
            return jax.lax.dot_general(
                weights.astype(v.dtype),
                v,
                (((1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32,
            )

        return online_softmax_step(scores, max_prev, sum_prev, out_prev, value_product)

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), NEG_INF_FINITE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    out, row_max, row_sum = jax.lax.fori_loop(0, num_steps, body, init)
    out_ref[...] = out
    max_ref[...] = row_max
    sum_ref[...] = row_sum


def _decode_kernel(
    length_ref: Any,
    q_offset_ref: Any,
    q_ref: Any,
    k_ref: Any,
    v_ref: Any,
    out_ref: Any,
    max_ref: Any,
    sum_ref: Any,
    *,
    score_mod: ScoreMod | None,
    scale: float,
    group: int,
    seq_q: int,
    block_kv: int,
    tiles_per_split: int,
    num_tiles: int,
    causal: bool,
    attention_window: int | None,
) -> None:
    def load_tile(index: Any) -> tuple[Any, Any]:
        # The alignment hint lets Triton emit wide vectorised loads.
        start = pl.multiple_of(index * block_kv, block_kv)
        return k_ref[pl.ds(start, block_kv), :], v_ref[pl.ds(start, block_kv), :]

    split_kv_body(
        load_tile=load_tile,
        length=length_ref[0],
        q_offset=q_offset_ref[0],
        q=q_ref[...],
        out_ref=out_ref,
        max_ref=max_ref,
        sum_ref=sum_ref,
        score_mod=score_mod,
        scale=scale,
        group=group,
        seq_q=seq_q,
        tile=block_kv,
        steps_per_split=tiles_per_split,
        num_steps_total=num_tiles,
        causal=causal,
        attention_window=attention_window,
    )


def pallas_contiguous(
    query: QueryArray,
    keys: KeyArray,
    values: ValueArray,
    lengths: Int[Array, " B"],
    q_offset: Int[Array, " B"],
    *,
    score_mod: ScoreMod | None,
    scale: float,
    causal: bool,
    attention_window: int | None,
    num_splits: int | None,
    block_kv: int,
    rows: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
) -> AttentionOutput:
    """The split-KV Pallas kernel over a contiguous (B, Hk, max_len, D) cache."""
    batch, num_heads, seq_q, head_dim = query.shape
    num_kv_heads, cache_len = keys.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    num_tiles = cache_len // block_kv
    splits, tiles_per_split = split_plan(
        num_splits, batch=batch, num_kv_heads=num_kv_heads, num_tiles=num_tiles
    )
    kernel = functools.partial(
        _decode_kernel,
        score_mod=score_mod,
        scale=scale,
        group=group,
        seq_q=seq_q,
        block_kv=block_kv,
        tiles_per_split=tiles_per_split,
        num_tiles=num_tiles,
        causal=causal,
        attention_window=attention_window,
    )
    kv_spec = pl.BlockSpec((None, None, cache_len, head_dim), lambda b, h, s: (b, h, 0, 0))
    return run_split_kv(
        kernel,
        [(keys, kv_spec), (values, kv_spec)],
        query=query,
        lengths=lengths,
        q_offset=q_offset,
        num_kv_heads=num_kv_heads,
        splits=splits,
        rows=rows,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="attnax_decode_attention",
    )


def run_split_kv(
    kernel: Any,
    cache_inputs: list[tuple[Array, Any]],
    *,
    query: QueryArray,
    lengths: Int[Array, " B"],
    q_offset: Int[Array, " B"],
    num_kv_heads: int,
    splits: int,
    rows: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
    name: str,
) -> AttentionOutput:
    """Launch a split-KV kernel over (batch, kv_head, split) and merge its partials.

    The kernel's operands are each row's length and first query position, the grouped query
    rows, then ``cache_inputs`` ((array, BlockSpec) pairs: the contiguous cache, or the block
    table and the pools); its outputs are the per-split float32 (out, max, sum) partials.
    """
    batch, num_heads, seq_q, head_dim = query.shape
    row_scalar = pl.BlockSpec((1,), lambda b, h, s: (b,))
    q_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0))
    partial_shape = (batch, num_kv_heads, splits, rows)
    operands = (
        lengths.astype(jnp.int32),
        q_offset.astype(jnp.int32),
        group_query_rows(query, num_kv_heads, rows),
        *(array for array, _ in cache_inputs),
    )
    out, row_max, row_sum = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, splits),
        in_specs=[row_scalar, row_scalar, q_spec, *(spec for _, spec in cache_inputs)],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=kernel_outputs(
            operands,
            ((*partial_shape, head_dim), jnp.float32),
            (partial_shape, jnp.float32),
            (partial_shape, jnp.float32),
        ),
        compiler_params=triton_compiler_params(num_warps, num_stages, interpret=interpret),
        interpret=interpret,
        name=name,
    )(*operands)
    merged = merge_splits(out, row_max, row_sum)
    return ungroup_rows(merged, num_heads, seq_q).astype(query.dtype)

