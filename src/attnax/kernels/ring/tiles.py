"""The tiles of one (query shard, key/value shard) pair of the XLA ring, and which of them to skip.

Each ring step views the local queries and the visiting key/value shard as whole tiles
(:class:`TiledPair`, padded where the shard is not a multiple of the tile), scores a tile pair
with the score and mask mods at global positions (:func:`raw_scores`, :func:`tile_scores`) and,
for a mask mod that classifies whole position ranges, says which tile pairs may hold an allowed
pair at all (:func:`tile_classes`), so the blockwise loops skip the rest.
"""

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ..._mods import AndMask, BlockOverlapMask, split_score_mod
from ..._typing import MaskMod, ScoreMod
from .._common import accumulation_dtype, apply_score_mods
from .layout import Positions


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockwiseConfig:
    """Static configuration of one ring call (no arrays)."""

    axis_name: Hashable
    num_shards: int
    layout: str
    scale: float
    block_q: int
    block_kv: int
    rebuild: Callable[[Sequence[Array]], ScoreMod | None]
    num_heads: int


def pad_axis(x: Array, axis: int, target: int, value: Any = 0) -> Array:
    extra = target - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _pad_positions(positions: Positions, target: int) -> Positions:
    # Padded slots repeat the last real position so tile ranges stay those of real slots.
    extra = target - positions.shape[0]
    if extra == 0:
        return positions
    return jnp.concatenate([positions, jnp.broadcast_to(positions[-1], (extra,))])


def varying_zero(*arrays: Array | None) -> Float[Array, ""]:
    """A float32 zero that varies over every mesh axis any of ``arrays`` varies over.

    Loop carries and ``cond`` branches inside ``shard_map`` must have the manual-axis type of
    what the loop body produces; adding this zero to a fresh constant gives it that type
    without naming axes or a version-specific cast (``full_like`` keeps the argument's type).
    """
    zero = jnp.zeros((), jnp.float32)
    for array in arrays:
        if array is not None:
            zero = zero + jnp.full_like(array, 0, shape=(), dtype=jnp.float32)
    return zero


def _num_tiles(length: int, block: int) -> int:
    return -(-length // block)


class TiledPair:
    """Tiled views of one (query shard, key/value shard) pair, padded to whole tiles."""

    def __init__(
        self,
        cfg: BlockwiseConfig,
        q: Float[Array, "B Hk G T D"],
        k: Float[Array, "B Hk S D"],
        v: Float[Array, "B Hk S D"],
        key_mask: Bool[Array, "#B #H 1 S"] | None,
        q_pos: Positions,
        kv_pos: Positions,
        mod_arrays: Sequence[Array],
    ) -> None:
        batch, num_kv_heads, group, seq_q, head_dim = q.shape
        seq_kv = k.shape[2]
        bq, bk = cfg.block_q, cfg.block_kv
        self.nq, self.nk = _num_tiles(seq_q, bq), _num_tiles(seq_kv, bk)
        tq, tk = self.nq * bq, self.nk * bk
        self.seq_q = seq_q
        self.zero = varying_zero(q, k, v, key_mask, q_pos, kv_pos)
        self.shape = (batch, num_kv_heads, group, head_dim)
        # (NQ, B, Hk, G, BQ, D) and (NK, B, Hk, BK, D): tiles on a leading axis for scans.
        self.q_tiles = jnp.moveaxis(
            pad_axis(q, 3, tq).reshape(batch, num_kv_heads, group, self.nq, bq, head_dim), 3, 0
        )
        self.k_tiles = jnp.moveaxis(
            pad_axis(k, 2, tk).reshape(batch, num_kv_heads, self.nk, bk, head_dim), 2, 0
        )
        self.v_tiles = jnp.moveaxis(
            pad_axis(v, 2, tk).reshape(batch, num_kv_heads, self.nk, bk, head_dim), 2, 0
        )
        self.q_pos = _pad_positions(q_pos, tq).reshape(self.nq, bq)
        self.kv_pos = _pad_positions(kv_pos, tk).reshape(self.nk, bk)
        self.kv_real = (jnp.arange(tk) < seq_kv).reshape(self.nk, bk)
        self.mod_arrays = mod_arrays
        self.zero = self.zero + varying_zero(*mod_arrays)
        if key_mask is None:
            self.mask_tiles: Array | None = None
        else:
            padded = pad_axis(key_mask, 3, tk, False)
            self.mask_tiles = jnp.moveaxis(
                padded.reshape(*padded.shape[:3], self.nk, bk), 3, 0
            )  # (NK, #B, #H, 1, BK)


def tile_scores(
    cfg: BlockwiseConfig,
    raw: Float[Array, "B Hk G BQ BK"],
    mod_arrays: Sequence[Array],
    q_pos: Int[Array, " BQ"],
    kv_pos: Int[Array, " BK"],
    kv_real: Bool[Array, " BK"],
    mask_tile: Bool[Array, "#B #H 1 BK"] | None,
) -> Float[Array, "B Hk G BQ BK"]:
    """Apply score/mask mods (at global positions) and the key masks to raw scaled scores."""
    batch, num_kv_heads, group, bq, bk = raw.shape
    mask_mod, value_mod = split_score_mod(cfg.rebuild(mod_arrays))
    allowed = kv_real.reshape(1, 1, 1, bk)
    if mask_tile is not None:
        allowed = allowed & mask_tile
    scores, _ = apply_score_mods(
        raw.reshape(batch, cfg.num_heads, bq, bk),
        mask_mod=mask_mod,
        value_mod=value_mod,
        b_idx=jnp.arange(batch, dtype=jnp.int32).reshape(-1, 1, 1, 1),
        h_idx=jnp.arange(cfg.num_heads, dtype=jnp.int32).reshape(1, -1, 1, 1),
        q_idx=q_pos.reshape(1, 1, bq, 1),
        kv_idx=kv_pos.reshape(1, 1, 1, bk),
        allowed=allowed,
    )
    return scores.reshape(batch, num_kv_heads, group, bq, bk)


def raw_scores(
    cfg: BlockwiseConfig,
    q_tile: Float[Array, "B Hk G BQ D"],
    k_tile: Float[Array, "B Hk BK D"],
) -> Float[Array, "B Hk G BQ BK"]:
    acc = accumulation_dtype(q_tile.dtype)
    raw = jnp.einsum("bkgqd,bksd->bkgqs", q_tile, k_tile, preferred_element_type=acc)
    return raw * jnp.asarray(cfg.scale, acc)


def _analytic_mask(mask_mod: MaskMod | None) -> BlockOverlapMask | None:
    """The mask mod if whole position ranges can be classified without evaluating pairs."""
    if mask_mod is None or not isinstance(mask_mod, BlockOverlapMask):
        return None
    if isinstance(mask_mod, AndMask) and not mask_mod.has_block_overlap:
        return None
    return mask_mod


def _tile_ranges(positions: Int[Array, "N L"]) -> tuple[Int[Array, " N"], Int[Array, " N"]]:
    # [min, max + 1) covers every position of the tile; classifying a superset range is
    # conservative (any_allowed over-, all_allowed under-approximates), so correctness holds
    # for non-contiguous tiles (striped) too.
    return jnp.min(positions, axis=-1), jnp.max(positions, axis=-1) + 1


def _nonempty_tiles(
    mask_mod: BlockOverlapMask,
    *,
    batch: int,
    num_heads: int,
    q_tiles: Int[Array, "NQ BQ"],
    kv_tiles: Int[Array, "NK BK"],
) -> Bool[Array, "NQ NK"]:
    """Whether any (batch, head) has an allowed pair in each (query tile, key tile)."""
    q_lo, q_hi = _tile_ranges(q_tiles)
    kv_lo, kv_hi = _tile_ranges(kv_tiles)
    b_idx = jnp.arange(batch, dtype=jnp.int32).reshape(-1, 1, 1, 1)
    h_idx = jnp.arange(num_heads, dtype=jnp.int32).reshape(1, -1, 1, 1)
    any_allowed, _ = mask_mod.block_overlap(
        b_idx,
        h_idx,
        q_lo.reshape(1, 1, -1, 1),
        q_hi.reshape(1, 1, -1, 1),
        kv_lo.reshape(1, 1, 1, -1),
        kv_hi.reshape(1, 1, 1, -1),
    )
    shape = (batch, num_heads, q_tiles.shape[0], kv_tiles.shape[0])
    return jnp.any(jnp.broadcast_to(any_allowed, shape), axis=(0, 1))


def tile_classes(
    cfg: BlockwiseConfig, pair: TiledPair, mod_arrays: Sequence[Array]
) -> Array | None:
    """(NQ, NK) booleans: which tiles may hold an allowed pair (None: all of them)."""
    mask_mod, _ = split_score_mod(cfg.rebuild(mod_arrays))
    analytic = _analytic_mask(mask_mod)
    if analytic is None:
        return None
    batch = pair.shape[0]
    return _nonempty_tiles(
        analytic, batch=batch, num_heads=cfg.num_heads, q_tiles=pair.q_pos, kv_tiles=pair.kv_pos
    )
