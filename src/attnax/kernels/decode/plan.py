"""Split-KV planning: how the cache is cut into tiles and splits, and how query rows are grouped.

Grouped-query attention shares every key/value tile across the ``H / Hk`` query heads of its
group: the group's query heads (times the query length ``T``) are the rows of the query tile,
padded to at least 16 rows (a power of two) so that every dot has Triton-friendly shapes.
"""

from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ..._typing import QueryArray
from .._gpu import next_power_of_two

MIN_ROWS = 16  # Triton's dot needs at least 16 rows.
MAX_ROWS = 128  # beyond this the query tile stops fitting comfortably in registers
TARGET_PROGRAMS = 528  # ~4 waves of the 132 SMs of an H100


def query_tile_rows(num_heads: int, num_kv_heads: int, seq_q: int) -> int:
    """Rows of the grouped query tile: a KV head's query heads times ``seq_q``, padded to a
    power of two of at least ``MIN_ROWS``."""
    return max(MIN_ROWS, next_power_of_two((num_heads // num_kv_heads) * seq_q))


def cache_tile(block_kv: int, cache_len: int) -> int:
    """Keys per Pallas tile: ``block_kv`` halved (not below 16) until it divides ``cache_len``."""
    tile = block_kv
    while tile > 16 and cache_len % tile != 0:
        tile //= 2
    return tile


def default_num_splits(batch: int, num_kv_heads: int, num_tiles: int) -> int:
    """Enough splits to give the GPU a few waves of programs, never more than tiles."""
    wanted = next_power_of_two(max(1, -(-TARGET_PROGRAMS // max(1, batch * num_kv_heads))))
    return max(1, min(wanted, num_tiles))


def split_plan(
    num_splits: int | None, *, batch: int, num_kv_heads: int, num_tiles: int
) -> tuple[int, int]:
    """``(splits, tiles_per_split)``: ``num_splits`` (default :func:`default_num_splits`), at
    most one per tile, and how many consecutive tiles each split walks."""
    splits = num_splits or default_num_splits(batch, num_kv_heads, num_tiles)
    splits = min(splits, num_tiles)
    return splits, -(-num_tiles // splits)


# --------------------------------------------------------------------------- query rows


def row_indices(
    rows: Int[Array, "*#r"], *, group: int, seq_q: int, kv_head: Any, q_offset: Any
) -> tuple[Int[Array, "*#r"], Int[Array, "*#r"]]:
    """Query head and absolute query position of each tile row (row = g * T + t).

    Padding rows (beyond ``group * seq_q``) are clamped onto the last real row, so that score
    mods never see a head index or a position that does not exist.
    """
    real = jnp.minimum(rows, group * seq_q - 1)
    h_idx = kv_head * group + real // seq_q
    q_pos = q_offset + real % seq_q
    return h_idx, q_pos


def group_query_rows(query: QueryArray, num_kv_heads: int, rows: int) -> Float[Array, "B Hk R D"]:
    """(B, H, T, D) -> (B, Hk, R, D) with row g * T + t, zero-padded to ``rows`` rows."""
    batch, num_heads, seq_q, head_dim = query.shape
    group = num_heads // num_kv_heads
    grouped = query.reshape(batch, num_kv_heads, group * seq_q, head_dim)
    if rows > group * seq_q:
        grouped = jnp.pad(grouped, ((0, 0), (0, 0), (0, rows - group * seq_q), (0, 0)))
    return grouped


def ungroup_rows(
    out: Float[Array, "B Hk R D"], num_heads: int, seq_q: int
) -> Float[Array, "B H T D"]:
    """(B, Hk, R, D) -> (B, H, T, D): the inverse of :func:`group_query_rows`, padding dropped."""
    batch, num_kv_heads, _, head_dim = out.shape
    group = num_heads // num_kv_heads
    return out[:, :, : group * seq_q].reshape(batch, num_heads, seq_q, head_dim)


def tile_range(
    *,
    length: Any,
    q_offset: Any,
    seq_q: int,
    tile: int,
    causal: bool,
    attention_window: int | None,
) -> tuple[Any, Any]:
    """Half-open range of KV tiles that can hold an allowed key (as traced ints)."""
    hi = (length + tile - 1) // tile
    if causal:
        hi = jnp.minimum(hi, (q_offset + seq_q - 1) // tile + 1)
    lo = jnp.zeros_like(hi)
    if attention_window is not None:
        lo = jnp.maximum(q_offset - attention_window + 1, 0) // tile
    return lo, hi

