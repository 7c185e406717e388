"""Split-KV decode attention that reads keys and values through a block table (paged cache).

The cache is a pool of fixed-size blocks shared by all sequences, ``key_pool`` of shape
(num_blocks, block_size, kv_heads, head_dim); row ``b``'s logical token ``j`` lives in block
``block_table[b, j // block_size]`` at offset ``j % block_size``. The kernel never gathers a
whole sequence: each program walks its split of the block table and loads
``pages_per_step`` blocks at a time straight from the pool, with the same online softmax, GQA
row grouping, absolute positions and log-sum-exp merge as the contiguous kernel in
:mod:`attnax.kernels.decode.pallas`. The load is a 2-D row gather from the pool viewed as
(num_blocks * block_size, kv_heads * head_dim): the tile goes to the matmuls as loaded, which
lets Triton pipeline it like the contiguous kernel's (a (pages, block_size, head_dim) gather
reshaped afterwards ran at 0.81-0.85x the contiguous kernel's bandwidth; this form at 0.97-0.98x
on an H100, ``benchmarks/NOTES.md``).

Backends: Pallas (Triton on GPU; ``interpret=True`` on CPU) and an XLA path that gathers one
tile of ``pages_per_step`` blocks per loop step (never the whole sequence). Forward-only, like
the contiguous decode kernel.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from ..._checks import shape_checked
from ..._typing import AttentionOutput, QueryArray, ScoreMod
from .._common import default_scale
from .._dtypes import promote_floats
from .._gpu import is_power_of_two
from .checks import check_paged_arguments, pallas_unsupported_reason, resolve_use_pallas
from .pallas import run_split_kv, split_kv_body
from .plan import query_tile_rows, split_plan
from .xla import xla_decode_loop

__all__ = ["paged_decode_attention"]


def _paged_kernel(
    length_ref: Any,
    q_offset_ref: Any,
    q_ref: Any,
    table_ref: Any,
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
    block_size: int,
    pages_per_step: int,
    steps_per_split: int,
    num_steps_total: int,
    causal: bool,
    attention_window: int | None,
) -> None:
    tile = pages_per_step * block_size

    def load_tile(index: Any) -> tuple[Any, Any]:
        # Unallocated entries (-1) only occur past the row's length, where every score is
        # masked; block 0 is a harmless address to read instead.
        pages = jnp.maximum(table_ref[pl.ds(index * pages_per_step, pages_per_step)], 0)
        # The pool is viewed as (num_blocks * block_size, Hk * D) rows, so the tile is a 2-D
        # row gather that feeds the matmuls as loaded: gathering (pages, P, D) and reshaping
        # the loaded tile to (tile, D) put a reshape between the load and the dot.
        offsets = jax.lax.broadcasted_iota(jnp.int32, (pages_per_step, block_size), 1)
        rows = (pages[:, None] * block_size + offsets).reshape(tile)
        return k_ref[rows, :], v_ref[rows, :]

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
        tile=tile,
        steps_per_split=steps_per_split,
        num_steps_total=num_steps_total,
        causal=causal,
        attention_window=attention_window,
    )


def _pad_table(block_table: Int[Array, "B M"], columns: int) -> Int[Array, "B Mp"]:
    extra = columns - block_table.shape[1]
    if extra <= 0:
        return block_table.astype(jnp.int32)
    return jnp.pad(block_table.astype(jnp.int32), ((0, 0), (0, extra)), constant_values=-1)


def _pallas_paged(
    query: QueryArray,
    key_pool: Float[Array, "N P Hk D"],
    value_pool: Float[Array, "N P Hk D"],
    block_table: Int[Array, "B M"],
    lengths: Int[Array, " B"],
    q_offset: Int[Array, " B"],
    *,
    score_mod: ScoreMod | None,
    scale: float,
    causal: bool,
    attention_window: int | None,
    num_splits: int | None,
    pages_per_step: int,
    rows: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
) -> AttentionOutput:
    batch, num_heads, seq_q, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_pool.shape
    group = num_heads // num_kv_heads
    num_steps_total = -(-block_table.shape[1] // pages_per_step)
    splits, steps_per_split = split_plan(
        num_splits, batch=batch, num_kv_heads=num_kv_heads, num_tiles=num_steps_total
    )
    table = _pad_table(block_table, num_steps_total * pages_per_step)
    # (N, P, Hk, D) -> (N * P, Hk * D) is free; a block of D columns then selects one KV head.
    k_flat = key_pool.reshape(num_blocks * block_size, num_kv_heads * head_dim)
    v_flat = value_pool.reshape(num_blocks * block_size, num_kv_heads * head_dim)
    kernel = functools.partial(
        _paged_kernel,
        score_mod=score_mod,
        scale=scale,
        group=group,
        seq_q=seq_q,
        block_size=block_size,
        pages_per_step=pages_per_step,
        steps_per_split=steps_per_split,
        num_steps_total=num_steps_total,
        causal=causal,
        attention_window=attention_window,
    )
    pool_spec = pl.BlockSpec((num_blocks * block_size, head_dim), lambda b, h, s: (0, h))
    table_spec = pl.BlockSpec((None, table.shape[1]), lambda b, h, s: (b, 0))
    return run_split_kv(
        kernel,
        [(table, table_spec), (k_flat, pool_spec), (v_flat, pool_spec)],
        query=query,
        lengths=lengths,
        q_offset=q_offset,
        num_kv_heads=num_kv_heads,
        splits=splits,
        rows=rows,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="attnax_paged_decode_attention",
    )


def _xla_paged(
    query: QueryArray,
    key_pool: Float[Array, "N P Hk D"],
    value_pool: Float[Array, "N P Hk D"],
    block_table: Int[Array, "B M"],
    lengths: Int[Array, " B"],
    q_offset: Int[Array, " B"],
    *,
    score_mod: ScoreMod | None,
    scale: float,
    causal: bool,
    attention_window: int | None,
    pages_per_step: int,
) -> AttentionOutput:
    batch = query.shape[0]
    _, block_size, num_kv_heads, head_dim = key_pool.shape
    num_steps = -(-block_table.shape[1] // pages_per_step)
    table = jnp.maximum(_pad_table(block_table, num_steps * pages_per_step), 0)
    tile = pages_per_step * block_size

    def load_tile(index: Any) -> tuple[Any, Any, Any, Any]:
        pages = jax.lax.dynamic_slice_in_dim(table, index * pages_per_step, pages_per_step, axis=1)

        def gather(pool: Any) -> Any:
            blocks = pool[pages].reshape(batch, tile, num_kv_heads, head_dim)
            return jnp.swapaxes(blocks, 1, 2)

        kv_pos = (index * tile + jnp.arange(tile)).reshape(1, 1, 1, tile)
        return gather(key_pool), gather(value_pool), kv_pos, None

    return xla_decode_loop(
        query,
        load_tile,
        num_kv_heads=num_kv_heads,
        num_tiles=num_steps,
        tile=tile,
        lengths=lengths,
        q_offset=q_offset,
        score_mod=score_mod,
        scale=scale,
        causal=causal,
        attention_window=attention_window,
    )


# Over 100 lines: half of it is the docstring; the body is one check and two dispatches that
# pass every argument by name.
@shape_checked(head_axis=None)
def paged_decode_attention(
    query: QueryArray,
    key_pool: Float[Array, "N P Hk D"],
    value_pool: Float[Array, "N P Hk D"],
    block_table: Int[Array, "B M"],
    lengths: Int[Array, " B"],
    *,
    score_mod: ScoreMod | None = None,
    q_offset: Int[Array, " B"] | None = None,
    causal: bool = True,
    attention_window: int | None = None,
    num_splits: int | None = None,
    block_kv: int = 128,
    num_warps: int = 4,
    num_stages: int = 2,
    use_pallas: bool | None = None,
    interpret: bool = False,
    scale: float | None = None,
) -> AttentionOutput:
    r"""Decode attention over a paged cache, reading K/V through the block table.

    Args:
      query: (batch, heads, seq_q, head_dim), a few new tokens per row.
      key_pool: (num_blocks, block_size, kv_heads, head_dim), shared by all rows; ``kv_heads``
        divides ``heads`` (GQA: one read per tile for the whole query-head group).
      value_pool: like ``key_pool``.
      block_table: (batch, max_blocks_per_seq) int, physical block of each logical block, -1
        where unallocated (only allowed at or beyond ``lengths``).
      lengths: (batch,) int, tokens stored per row; later keys are never attended.
      score_mod: applied to the scaled scores with absolute (batch, head, query, key) indices.
      q_offset: (batch,) absolute position of each row's first query; default
        ``lengths - seq_q``.
      causal: mask keys after each query's absolute position (default True).
      attention_window: sliding window over absolute positions (tiles outside are skipped).
      num_splits: programs per row and KV head (split-KV); default as in ``decode_attention``.
      block_kv: keys per loop step; ``max(1, block_kv // block_size)`` blocks are loaded at
        once (Pallas needs ``block_size`` a power of two and at least 16 keys per step).
      num_warps: Triton warps per program (GPU only).
      num_stages: Triton pipelining stages (GPU only).
      use_pallas: as in ``decode_attention``: True (raise ``NotImplementedError`` when
        unsupported), False (XLA) or None (Pallas on GPU / with ``interpret`` when supported).
      interpret: run the Pallas kernel in the interpreter (CPU tests).
      scale: score scale, ``1 / sqrt(head_dim)`` by default.

    Returns:
      (batch, heads, seq_q, head_dim) in the promoted dtype of query and pools; a query with no
      allowed key gives zeros.

    Raises:
      ValueError: for arguments that do not fit together.
      NotImplementedError: for ``use_pallas=True`` with a configuration Pallas cannot run.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> key_pool = jax.random.normal(jax.random.key(0), (4, 2, 1, 4))  # 4 blocks of 2 tokens
      >>> value_pool = jax.random.normal(jax.random.key(1), (4, 2, 1, 4))
      >>> block_table = jnp.array([[3, 1, -1]])  # the row's tokens live in blocks 3 then 1
      >>> query = jax.random.normal(jax.random.key(2), (1, 2, 1, 4))
      >>> out = jax.jit(attnax.paged_decode_attention)(
      ...     query, key_pool, value_pool, block_table, jnp.array([3]))
      >>> keys = jnp.concatenate([key_pool[3], key_pool[1]])[:3].transpose(1, 0, 2)[None]
      >>> values = jnp.concatenate([value_pool[3], value_pool[1]])[:3].transpose(1, 0, 2)[None]
      >>> ref = attnax.standard_attention(query, keys, values)
      >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
      ((1, 2, 1, 4), True)
    """
    name = "paged_decode_attention"
    # The dtype rule and mixed-float promotion every kernel applies (pools narrower than the
    # query are upcast here, a copy per call: keep the pools in the query's dtype to avoid it).
    query, key_pool, value_pool = promote_floats(
        name, query=query, key_pool=key_pool, value_pool=value_pool
    )
    check_paged_arguments(
        query,
        key_pool,
        value_pool,
        block_table,
        lengths,
        q_offset,
        attention_window=attention_window,
        num_splits=num_splits,
        block_kv=block_kv,
        name=name,
    )
    _, block_size, num_kv_heads, head_dim = key_pool.shape
    _, num_heads, seq_q, _ = query.shape
    scale_value = default_scale(head_dim, scale)
    offsets = lengths - seq_q if q_offset is None else q_offset
    pages_per_step = max(1, block_kv // block_size)
    rows = query_tile_rows(num_heads, num_kv_heads, seq_q)
    reason = pallas_unsupported_reason(
        head_dim=head_dim, rows=rows, tile=pages_per_step * block_size, score_mod=score_mod
    )
    if reason is None and not is_power_of_two(block_size):
        reason = f"block_size {block_size} is not a power of two"
    if resolve_use_pallas(use_pallas, interpret, reason, name=name):
        return _pallas_paged(
            query,
            key_pool,
            value_pool,
            block_table,
            lengths,
            offsets,
            score_mod=score_mod,
            scale=scale_value,
            causal=causal,
            attention_window=attention_window,
            num_splits=num_splits,
            pages_per_step=pages_per_step,
            rows=rows,
            num_warps=num_warps,
            num_stages=num_stages,
            interpret=interpret,
        )
    return _xla_paged(
        query,
        key_pool,
        value_pool,
        block_table,
        lengths,
        offsets,
        score_mod=score_mod,
        scale=scale_value,
        causal=causal,
        attention_window=attention_window,
        pages_per_step=pages_per_step,
    )
