"""Ring attention: exact softmax attention over a sequence sharded across a device mesh axis.

Inside :func:`jax.shard_map`, with the sequence axis (axis 2 of ``(B, H, T, D)``) of query, key
and value sharded over ``axis_name``, every device keeps its query shard and the key/value
shards travel around the ring with :func:`jax.lax.ppermute` (Liu et al., "Ring Attention with
Blockwise Transformers for Near-Infinite Context", 2023). Each step computes the attention of
the local queries to the visiting key/value shard blockwise (online softmax over tiles, no
``(T, S)`` matrix) and merges it into the running result exactly through the log-sum-exp, in
float32. The transfer of the next shard is issued before the current shard's compute so XLA can
overlap them.

The backward (a :func:`jax.custom_vjp`) rotates key/value around the ring again, together with
their ``dK``/``dV`` accumulators, which arrive back on the key/value's home device after ``P``
steps; it recomputes scores from the saved log-sum-exp (FlashAttention-2 style), so memory per
device stays ``O(T / P)`` in training too.

Layouts. Under a causal mask the contiguous layout leaves device 0 with one tile of work and
device ``P - 1`` with ``P``. ``layout="zigzag"`` gives device ``i`` the chunks ``i`` and
``2P - 1 - i`` of ``2P`` equal chunks; ``layout="striped"`` gives it positions
``i, i + P, i + 2P, ...``. Both balance causal work. Put a global sequence into the layout's
order with :func:`to_ring_layout` before sharding it contiguously, and undo it with
:func:`from_ring_layout`; score and mask mods always see the true global positions.
"""

import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from .._checks import positive_int, shape_checked
from .._mods import AndMask, BlockOverlapMask, CausalMask, split_score_mod
from .._typing import (
    AttentionMask,
    AttentionOutput,
    KeyArray,
    MaskMod,
    PRNGKeyArray,
    QueryArray,
    ScoreMod,
    ValueArray,
)
from ._common import (
    accumulation_dtype,
    apply_score_mods,
    check_dropout,
    check_mask,
    check_qkv,
    cuda_compute_capability,
    default_scale,
    merge_partials,
    rotate_ring,
    safe_normaliser,
    vary_like,
)
from ._flash import cudnn_plan
from .memory_efficient import memory_efficient_attention
from ._ring_flash import cudnn_pairs_available, flash_ring
from ._ring_pallas import pallas_ring
from ._standard import standard_attention

__all__ = [
    "FusedPairs",
    "RingLayout",
    "from_ring_layout",
    "ring_attention",
    "ring_attention_reference",
    "sharded_ring_attention",
    "to_ring_layout",
]

RingLayout: TypeAlias = Literal["contiguous", "zigzag", "striped"]
# How ring_attention computes a (query shard, key shard) pair; see its docstring.
FusedPairs: TypeAlias = bool | Literal["cudnn", "pallas"] | None
_LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag", "striped")

# Positions are int32 everywhere (score mods index arrays with them).
_Positions: TypeAlias = Int[Array, " L"]


# --------------------------------------------------------------------------- layouts


def _check_layout(layout: str, *, name: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"{name}: `layout` must be one of {_LAYOUTS}, got {layout!r}.")


def _layout_divisor(num_shards: int, layout: str) -> int:
    # zigzag cuts the sequence into 2P chunks; the others into P shards.
    return 2 * num_shards if layout == "zigzag" else num_shards


def _check_divides(length: int, num_shards: int, layout: str, *, name: str, what: str) -> None:
    divisor = _layout_divisor(num_shards, layout)
    if length % divisor != 0:
        raise ValueError(
            f"{name}: {what} length {length} is not divisible by {divisor} "
            f"({'2 x ' if layout == 'zigzag' else ''}{num_shards} shards, layout={layout!r}); "
            "pad the sequence to a multiple of it (and mask the padding with a key-padding mask) "
            "or use a mesh axis whose size divides it."
        )


def _layout_order(length: int, num_shards: int, layout: str) -> np.ndarray:
    """``order[j]`` = the global position stored at slot ``j`` of the ring layout."""
    positions = np.arange(length)
    if layout == "contiguous":
        return positions
    if layout == "zigzag":
        chunks = positions.reshape(2 * num_shards, -1)
        pairs = [(i, 2 * num_shards - 1 - i) for i in range(num_shards)]
        return np.concatenate([np.concatenate([chunks[a], chunks[b]]) for a, b in pairs])
    # striped: device i holds i, i + P, i + 2P, ...
    return positions.reshape(-1, num_shards).T.reshape(-1)


def to_ring_layout(
    x: Array, num_shards: int, layout: RingLayout = "contiguous", axis: int = 2
) -> Array:
    """Reorder a global sequence so that contiguous sharding gives each device its layout's part.

    ``shard_map`` with the sequence axis sharded over ``num_shards`` devices then hands device
    ``i`` chunk ``i`` and chunk ``2P - 1 - i`` (zigzag) or positions ``i, i + P, ...`` (striped),
    the order :func:`ring_attention` expects for the same ``layout``.

    Args:
      x: any array with the sequence on ``axis`` (query, key, value, a key-padding mask, ids).
      num_shards: size of the mesh axis the sequence will be sharded over.
      layout: "contiguous" (identity), "zigzag" or "striped".
      axis: the sequence axis (2 for ``(B, H, T, D)``; 3 for a ``(B, 1, 1, S)`` mask).

    Returns:
      ``x`` with its sequence axis permuted.

    Raises:
      ValueError: for an unknown layout or a length the layout cannot split evenly.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> x = jnp.arange(8).reshape(1, 1, 8, 1)
      >>> zigzag = attnax.to_ring_layout(x, num_shards=2, layout="zigzag")
      >>> zigzag[0, 0, :, 0].tolist()  # device 0 gets chunks 0 and 3, device 1 chunks 1 and 2
      [0, 1, 6, 7, 2, 3, 4, 5]
      >>> attnax.to_ring_layout(x, num_shards=2, layout="striped")[0, 0, :, 0].tolist()
      [0, 2, 4, 6, 1, 3, 5, 7]
    """
    name = "to_ring_layout"
    _check_layout(layout, name=name)
    positive_int(num_shards, "num_shards", caller=name)
    length = x.shape[axis]
    _check_divides(length, num_shards, layout, name=name, what="sequence")
    return jnp.take(x, jnp.asarray(_layout_order(length, num_shards, layout)), axis=axis)


def from_ring_layout(
    x: Array, num_shards: int, layout: RingLayout = "contiguous", axis: int = 2
) -> Array:
    """Undo :func:`to_ring_layout`: put a sequence in ring order back into global order.

    Args:
      x: an array whose sequence axis is in ``layout`` order.
      num_shards: size of the mesh axis the sequence was sharded over.
      layout: "contiguous" (identity), "zigzag" or "striped".
      axis: the sequence axis.

    Returns:
      ``x`` with its sequence axis in global order.

    Raises:
      ValueError: for an unknown layout or a length the layout cannot split evenly.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> x = jnp.arange(8).reshape(1, 1, 8, 1)
      >>> ring = attnax.to_ring_layout(x, num_shards=2, layout="zigzag")
      >>> bool(jnp.array_equal(attnax.from_ring_layout(ring, num_shards=2, layout="zigzag"), x))
      True
    """
    name = "from_ring_layout"
    _check_layout(layout, name=name)
    positive_int(num_shards, "num_shards", caller=name)
    length = x.shape[axis]
    _check_divides(length, num_shards, layout, name=name, what="sequence")
    inverse = np.argsort(_layout_order(length, num_shards, layout))
    return jnp.take(x, jnp.asarray(inverse), axis=axis)


def _shard_positions(
    layout: str, shard: Int[Array, ""], num_shards: int, local_length: int
) -> _Positions:
    """Global positions of the ``local_length`` slots held by ``shard`` (a traced index)."""
    slots = jnp.arange(local_length, dtype=jnp.int32)
    shard = jnp.asarray(shard, jnp.int32)
    if layout == "contiguous":
        return shard * local_length + slots
    if layout == "zigzag":
        chunk = local_length // 2
        mirror = 2 * num_shards - 1 - shard
        return jnp.where(slots < chunk, shard * chunk + slots, mirror * chunk + slots - chunk)
    return slots * num_shards + shard


# --------------------------------------------------------------------------- axis binding


def bound_axis_size(axis_name: Hashable | None) -> int | None:
    """The size of mesh axis ``axis_name`` if it is bound here (inside shard_map/pmap), else None.

    ``jax.lax.axis_size`` raises ``NameError`` for an axis name that no enclosing ``shard_map``
    or ``pmap`` binds, and that is the only ``NameError`` the call can raise (its argument is
    already evaluated, so no Python name lookup of ours happens inside it). Catching exactly
    that error is therefore a reliable "am I inside a mapped axis" test that hides nothing else.
    """
    if axis_name is None:
        return None
    try:
        size = jax.lax.axis_size(axis_name)
    except NameError:
        return None
    return int(size)


def _vary_over_ring(array: Array, axis_name: Hashable) -> Array:
    """Mark a replicated (ring-invariant) array as varying over ``axis_name``.

    Each device's backward produces only its own queries' share of a score-mod array's
    gradient. Casting the array to "varying" before the custom_vjp makes JAX transpose the cast
    into the psum that adds those shares (:func:`~attnax.kernels._common.vary_like` does the
    cast, in whichever spelling this JAX has).
    """
    if not jnp.issubdtype(array.dtype, jnp.floating):
        return array
    return vary_like(array, frozenset({axis_name}))


def _partition_mod(
    score_mod: ScoreMod | None,
) -> tuple[list[Array], Callable[[Sequence[Array]], ScoreMod | None]]:
    """Split a score mod into its array leaves (differentiable inputs) and a rebuild function.

    Everything that is not an array (a plain callable, static fields) stays in the closure, so
    the custom_vjp only sees arrays.
    """
    if score_mod is None:
        return [], lambda arrays: None
    leaves, treedef = jax.tree_util.tree_flatten(score_mod)
    array_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))]
    arrays = [jnp.asarray(leaves[i]) for i in array_slots]

    def rebuild(new_arrays: Sequence[Array]) -> ScoreMod | None:
        filled = list(leaves)
        for slot, array in zip(array_slots, new_arrays, strict=True):
            filled[slot] = array
        rebuilt: ScoreMod = jax.tree_util.tree_unflatten(treedef, filled)
        return rebuilt

    return arrays, rebuild


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


# --------------------------------------------------------------------------- per-pair blockwise math


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Static:
    """Static configuration of one ring call (no arrays)."""

    axis_name: Hashable
    num_shards: int
    layout: str
    scale: float
    block_q: int
    block_kv: int
    rebuild: Callable[[Sequence[Array]], ScoreMod | None]
    num_heads: int


def _pad_axis(x: Array, axis: int, target: int, value: Any = 0) -> Array:
    extra = target - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _pad_positions(positions: _Positions, target: int) -> _Positions:
    # Padded slots repeat the last real position so tile ranges stay those of real slots.
    extra = target - positions.shape[0]
    if extra == 0:
        return positions
    return jnp.concatenate([positions, jnp.broadcast_to(positions[-1], (extra,))])


def _varying_zero(*arrays: Array | None) -> Float[Array, ""]:
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


class _Pair:
    """Tiled views of one (query shard, key/value shard) pair, padded to whole tiles."""

    def __init__(
        self,
        cfg: _Static,
        q: Float[Array, "B Hk G T D"],
        k: Float[Array, "B Hk S D"],
        v: Float[Array, "B Hk S D"],
        key_mask: Bool[Array, "#B #H 1 S"] | None,
        q_pos: _Positions,
        kv_pos: _Positions,
        mod_arrays: Sequence[Array],
    ) -> None:
        batch, num_kv_heads, group, seq_q, head_dim = q.shape
        seq_kv = k.shape[2]
        bq, bk = cfg.block_q, cfg.block_kv
        self.nq, self.nk = _num_tiles(seq_q, bq), _num_tiles(seq_kv, bk)
        tq, tk = self.nq * bq, self.nk * bk
        self.seq_q = seq_q
        self.zero = _varying_zero(q, k, v, key_mask, q_pos, kv_pos)
        self.shape = (batch, num_kv_heads, group, head_dim)
        # (NQ, B, Hk, G, BQ, D) and (NK, B, Hk, BK, D): tiles on a leading axis for scans.
        self.q_tiles = jnp.moveaxis(
            _pad_axis(q, 3, tq).reshape(batch, num_kv_heads, group, self.nq, bq, head_dim), 3, 0
        )
        self.k_tiles = jnp.moveaxis(
            _pad_axis(k, 2, tk).reshape(batch, num_kv_heads, self.nk, bk, head_dim), 2, 0
        )
        self.v_tiles = jnp.moveaxis(
            _pad_axis(v, 2, tk).reshape(batch, num_kv_heads, self.nk, bk, head_dim), 2, 0
        )
        self.q_pos = _pad_positions(q_pos, tq).reshape(self.nq, bq)
        self.kv_pos = _pad_positions(kv_pos, tk).reshape(self.nk, bk)
        self.kv_real = (jnp.arange(tk) < seq_kv).reshape(self.nk, bk)
        self.mod_arrays = mod_arrays
        self.zero = self.zero + _varying_zero(*mod_arrays)
        if key_mask is None:
            self.mask_tiles: Array | None = None
        else:
            padded = _pad_axis(key_mask, 3, tk, False)
            self.mask_tiles = jnp.moveaxis(
                padded.reshape(*padded.shape[:3], self.nk, bk), 3, 0
            )  # (NK, #B, #H, 1, BK)


def _tile_scores(
    cfg: _Static,
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


def _raw_scores(
    cfg: _Static, q_tile: Float[Array, "B Hk G BQ D"], k_tile: Float[Array, "B Hk BK D"]
) -> Float[Array, "B Hk G BQ BK"]:
    acc = accumulation_dtype(q_tile.dtype)
    raw = jnp.einsum("bkgqd,bksd->bkgqs", q_tile, k_tile, preferred_element_type=acc)
    return raw * jnp.asarray(cfg.scale, acc)


def _tile_classes(cfg: _Static, pair: _Pair, mod_arrays: Sequence[Array]) -> Array | None:
    """(NQ, NK) booleans: which tiles may hold an allowed pair (None: all of them)."""
    mask_mod, _ = split_score_mod(cfg.rebuild(mod_arrays))
    analytic = _analytic_mask(mask_mod)
    if analytic is None:
        return None
    batch = pair.shape[0]
    return _nonempty_tiles(
        analytic, batch=batch, num_heads=cfg.num_heads, q_tiles=pair.q_pos, kv_tiles=pair.kv_pos
    )


def _pair_forward(
    cfg: _Static,
    pair: _Pair,
    mod_arrays: Sequence[Array],
    nonempty: Array | None,
) -> tuple[Float[Array, "B Hk G T D"], Float[Array, "B Hk G T"]]:
    """Normalised output and log-sum-exp of the local queries over one key/value shard."""
    batch, num_kv_heads, group, head_dim = pair.shape
    bq = cfg.block_q
    acc_dtype = accumulation_dtype(pair.q_tiles.dtype)
    value_dtype = pair.v_tiles.dtype

    def one_query_tile(
        args: tuple[Array, Array, Array],
    ) -> tuple[Array, Array]:
        q_tile, q_pos, qi = args
        zero = pair.zero.astype(acc_dtype)
        init = (
            jnp.zeros((batch, num_kv_heads, group, bq, head_dim), acc_dtype) + zero,
            jnp.full((batch, num_kv_heads, group, bq), -jnp.inf, acc_dtype) + zero,
            jnp.zeros((batch, num_kv_heads, group, bq), acc_dtype) + zero,
        )

        def update(carry: tuple[Array, Array, Array], kj: Array) -> tuple[Array, Array, Array]:
            acc, row_max, row_sum = carry
            mask_tile = None if pair.mask_tiles is None else pair.mask_tiles[kj]
            scores = _tile_scores(
                cfg,
                _raw_scores(cfg, q_tile, pair.k_tiles[kj]),
                mod_arrays,
                q_pos,
                pair.kv_pos[kj],
                pair.kv_real[kj],
                mask_tile,
            )
            new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))
            safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            weights = jnp.exp(scores - safe_max[..., None])
            correction = jnp.exp(row_max - safe_max)
            row_sum = row_sum * correction + jnp.sum(weights, axis=-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgqs,bksd->bkgqd",
                weights.astype(value_dtype),
                pair.v_tiles[kj],
                preferred_element_type=acc_dtype,
            )
            return acc, new_max, row_sum

        def step(carry: tuple[Array, Array, Array], kj: Array) -> tuple[Any, None]:
            if nonempty is None:
                return update(carry, kj), None
            return jax.lax.cond(nonempty[qi, kj], update, lambda c, _: c, carry, kj), None

        (acc, row_max, row_sum), _ = jax.lax.scan(step, init, jnp.arange(pair.nk))
        out = acc / safe_normaliser(row_sum)[..., None]
        safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        lse = jnp.where(row_sum > 0.0, safe_max + jnp.log(safe_normaliser(row_sum)), -jnp.inf)
        return out, lse

    outs, lses = jax.lax.map(
        one_query_tile, (pair.q_tiles, pair.q_pos, jnp.arange(pair.nq))
    )  # (NQ, B, Hk, G, BQ, D), (NQ, B, Hk, G, BQ)
    out = jnp.moveaxis(outs, 0, 3).reshape(batch, num_kv_heads, group, -1, head_dim)
    lse = jnp.moveaxis(lses, 0, 3).reshape(batch, num_kv_heads, group, -1)
    return out[..., : pair.seq_q, :], lse[..., : pair.seq_q]


def _pair_backward(
    cfg: _Static,
    pair: _Pair,
    mod_arrays: Sequence[Array],
    nonempty: Array | None,
    d_out: Float[Array, "B Hk G T D"],
    lse: Float[Array, "B Hk G T"],
    delta: Float[Array, "B Hk G T"],
) -> tuple[Array, Array, Array, list[Array]]:
    """Gradients of the pair: dQ (B, Hk, G, T, D), dK and dV (B, Hk, S, D), mod arrays.

    FlashAttention-2 recurrences with the *global* log-sum-exp and ``delta = rowsum(dO * O)``
    of the merged output: ``P = exp(S - lse)``, ``dV += P^T dO``, ``dS = P (dO V^T - delta)``;
    score mods are differentiated by ``jax.vjp`` of the tile's mod application.
    """
    batch, num_kv_heads, group, head_dim = pair.shape
    bq, bk = cfg.block_q, cfg.block_kv
    acc_dtype = accumulation_dtype(pair.q_tiles.dtype)
    in_dtype = pair.q_tiles.dtype
    tq = pair.nq * bq

    def tiles_of(x: Array) -> Array:
        x = _pad_axis(x, 3, tq)
        return jnp.moveaxis(x.reshape(*x.shape[:3], pair.nq, bq, *x.shape[4:]), 3, 0)

    # Padded query rows get lse = +inf so their weights are exactly zero.
    do_tiles = tiles_of(d_out.astype(acc_dtype))
    lse_tiles = tiles_of(jnp.where(jnp.isfinite(lse), lse, jnp.inf))
    lse_tiles = jnp.where(
        (jnp.arange(tq) < pair.seq_q).reshape(pair.nq, 1, 1, 1, bq), lse_tiles, jnp.inf
    )
    delta_tiles = tiles_of(delta)
    float_slots = [i for i, a in enumerate(mod_arrays) if jnp.issubdtype(a.dtype, jnp.floating)]

    def mod_grads_zero() -> list[Array]:
        return [jnp.zeros(mod_arrays[i].shape, acc_dtype) + zero for i in float_slots]

    zero = pair.zero.astype(acc_dtype)
    dk0 = jnp.zeros((pair.nk, batch, num_kv_heads, bk, head_dim), acc_dtype) + zero

    def one_query_tile(
        carry: tuple[Array, Array, list[Array]], args: tuple[Array, ...]
    ) -> tuple[tuple[Array, Array, list[Array]], Array]:
        q_tile, q_pos, do_tile, lse_tile, delta_tile, qi = args

        def update(
            inner: tuple[Array, Array, Array, list[Array]], kj: Array
        ) -> tuple[Array, Array, Array, list[Array]]:
            dq, dk_all, dv_all, dmods = inner
            k_tile, v_tile = pair.k_tiles[kj], pair.v_tiles[kj]
            mask_tile = None if pair.mask_tiles is None else pair.mask_tiles[kj]

            def modded(raw: Array, floats: list[Array]) -> Array:
                arrays = list(mod_arrays)
                for slot, array in zip(float_slots, floats, strict=True):
                    arrays[slot] = array
                return _tile_scores(
                    cfg, raw, arrays, q_pos, pair.kv_pos[kj], pair.kv_real[kj], mask_tile
                )

            floats = [mod_arrays[i] for i in float_slots]
            scores, mods_vjp = jax.vjp(modded, _raw_scores(cfg, q_tile, k_tile), floats)
            weights = jnp.exp(scores - lse_tile[..., None])
            dv = jnp.einsum(
                "bkgqs,bkgqd->bksd",
                weights.astype(in_dtype),
                do_tile.astype(in_dtype),
                preferred_element_type=acc_dtype,
            )
            dp = jnp.einsum(
                "bkgqd,bksd->bkgqs",
                do_tile.astype(in_dtype),
                v_tile,
                preferred_element_type=acc_dtype,
            )
            d_scores = weights * (dp - delta_tile[..., None])
            d_raw, d_floats = mods_vjp(d_scores)
            d_raw = (d_raw * jnp.asarray(cfg.scale, acc_dtype)).astype(in_dtype)
            dq = dq + jnp.einsum(
                "bkgqs,bksd->bkgqd", d_raw, k_tile, preferred_element_type=acc_dtype
            )
            dk = jnp.einsum("bkgqs,bkgqd->bksd", d_raw, q_tile, preferred_element_type=acc_dtype)
            dk_all = dk_all.at[kj].add(dk)
            dv_all = dv_all.at[kj].add(dv)
            dmods = [a + b.astype(acc_dtype) for a, b in zip(dmods, d_floats, strict=True)]
            return dq, dk_all, dv_all, dmods

        def step(inner: Any, kj: Array) -> tuple[Any, None]:
            if nonempty is None:
                return update(inner, kj), None
            return jax.lax.cond(nonempty[qi, kj], update, lambda c, _: c, inner, kj), None

        dk_all, dv_all, dmods = carry
        dq0 = jnp.zeros((batch, num_kv_heads, group, bq, head_dim), acc_dtype) + zero
        (dq, dk_all, dv_all, dmods), _ = jax.lax.scan(
            step, (dq0, dk_all, dv_all, dmods), jnp.arange(pair.nk)
        )
        return (dk_all, dv_all, dmods), dq

    (dk_tiles, dv_tiles, dmods), dq_tiles = jax.lax.scan(
        one_query_tile,
        (dk0, dk0, mod_grads_zero()),
        (pair.q_tiles, pair.q_pos, do_tiles, lse_tiles, delta_tiles, jnp.arange(pair.nq)),
    )
    dq = jnp.moveaxis(dq_tiles, 0, 3).reshape(batch, num_kv_heads, group, -1, head_dim)
    seq_kv = pair.kv_real.size  # padded; sliced by the caller's shape below

    def untile_kv(x: Array) -> Array:
        return jnp.moveaxis(x, 0, 2).reshape(batch, num_kv_heads, seq_kv, head_dim)

    full_mods: list[Array] = []
    it = iter(dmods)
    for i in range(len(mod_arrays)):
        full_mods.append(next(it) if i in float_slots else jnp.zeros((), acc_dtype))
    return dq[..., : pair.seq_q, :], untile_kv(dk_tiles), untile_kv(dv_tiles), full_mods


# --------------------------------------------------------------------------- the ring


def _ring_forward(
    cfg: _Static,
    q: Float[Array, "B Hk G T D"],
    k: Array,
    v: Array,
    key_mask: Array | None,
    mod_arrays: Sequence[Array],
) -> tuple[Array, Array]:
    me = jax.lax.axis_index(cfg.axis_name)
    seq_q, seq_kv = q.shape[3], k.shape[2]
    q_pos = _shard_positions(cfg.layout, me, cfg.num_shards, seq_q)
    acc_dtype = accumulation_dtype(q.dtype)
    zero = _varying_zero(q, k, v, key_mask, q_pos, *mod_arrays).astype(acc_dtype)

    def ring_step(carry: Any, step: Array) -> tuple[Any, None]:
        visiting, out, lse = carry
        # Issue the next transfer first: it does not depend on this step's compute, so XLA can
        # overlap it. (The last step's transfer only brings K/V home; it costs no extra time
        # while it overlaps the last compute, and keeps one compiled loop body for any P.)
        upcoming = rotate_ring(visiting, cfg.axis_name, cfg.num_shards)
        source = (me - step) % cfg.num_shards
        kv_pos = _shard_positions(cfg.layout, source, cfg.num_shards, seq_kv)
        pair = _Pair(cfg, q, visiting[0], visiting[1], visiting[2], q_pos, kv_pos, mod_arrays)
        nonempty = _tile_classes(cfg, pair, mod_arrays)
        if nonempty is None:
            part_out, part_lse = _pair_forward(cfg, pair, mod_arrays, None)
        else:
            # A (query shard, key shard) pair entirely in the masked future is not computed.
            part_out, part_lse = jax.lax.cond(
                jnp.any(nonempty),
                lambda: _pair_forward(cfg, pair, mod_arrays, nonempty),
                lambda: (
                    jnp.zeros(q.shape, acc_dtype) + pair.zero,
                    jnp.full(q.shape[:-1], -jnp.inf, acc_dtype) + pair.zero,
                ),
            )
        out, lse = merge_partials(out, lse, part_out, part_lse)
        return (upcoming, out, lse), None

    init = (
        (k, v, key_mask),
        jnp.zeros(q.shape, acc_dtype) + zero,
        jnp.full(q.shape[:-1], -jnp.inf, acc_dtype) + zero,
    )
    (_, out, lse), _ = jax.lax.scan(ring_step, init, jnp.arange(cfg.num_shards))
    return out, lse


def _ring_backward(
    cfg: _Static,
    q: Array,
    k: Array,
    v: Array,
    key_mask: Array | None,
    mod_arrays: Sequence[Array],
    out: Array,
    lse: Array,
    d_out: Array,
) -> tuple[Array, Array, Array, list[Array]]:
    me = jax.lax.axis_index(cfg.axis_name)
    seq_q, seq_kv = q.shape[3], k.shape[2]
    q_pos = _shard_positions(cfg.layout, me, cfg.num_shards, seq_q)
    acc_dtype = accumulation_dtype(q.dtype)
    zero = _varying_zero(q, k, v, key_mask, q_pos, d_out, *mod_arrays).astype(acc_dtype)
    delta = jnp.sum(d_out.astype(acc_dtype) * out.astype(acc_dtype), axis=-1)

    def ring_step(carry: Any, step: Array) -> tuple[Any, None]:
        visiting, dq, dk, dv, dmods = carry
        upcoming = rotate_ring(visiting, cfg.axis_name, cfg.num_shards)
        source = (me - step) % cfg.num_shards
        kv_pos = _shard_positions(cfg.layout, source, cfg.num_shards, seq_kv)
        pair = _Pair(cfg, q, visiting[0], visiting[1], visiting[2], q_pos, kv_pos, mod_arrays)
        nonempty = _tile_classes(cfg, pair, mod_arrays)

        def compute() -> Any:
            return _pair_backward(cfg, pair, mod_arrays, nonempty, d_out, lse, delta)

        if nonempty is None:
            part = compute()
        else:
            part = jax.lax.cond(
                jnp.any(nonempty),
                compute,
                lambda: jax.tree_util.tree_map(
                    lambda s: jnp.zeros(s.shape, s.dtype) + pair.zero.astype(s.dtype),
                    jax.eval_shape(compute),
                ),
            )
        part_dq, part_dk, part_dv, part_mods = part
        dq = dq + part_dq
        dmods = [a + b for a, b in zip(dmods, part_mods, strict=True)]
        # dK/dV travel with their key/value shard; after P hops they are home again.
        dk, dv = rotate_ring(
            (dk + part_dk[:, :, :seq_kv], dv + part_dv[:, :, :seq_kv]),
            cfg.axis_name,
            cfg.num_shards,
        )
        return (upcoming, dq, dk, dv, dmods), None

    init_mods = [
        jnp.zeros(a.shape if jnp.issubdtype(a.dtype, jnp.floating) else (), acc_dtype) + zero
        for a in mod_arrays
    ]
    init = (
        (k, v, key_mask),
        jnp.zeros(q.shape, acc_dtype) + zero,
        jnp.zeros(k.shape, acc_dtype) + zero,
        jnp.zeros(v.shape, acc_dtype) + zero,
        init_mods,
    )
    (_, dq, dk, dv, dmods), _ = jax.lax.scan(ring_step, init, jnp.arange(cfg.num_shards))
    # No psum here: mod arrays enter the ring device-varying (see _vary_over_ring), so JAX's
    # own transpose of that cast sums the per-device contributions exactly once.
    reduced = [
        grad.astype(primal.dtype) if jnp.issubdtype(primal.dtype, jnp.floating) else grad
        for grad, primal in zip(dmods, mod_arrays, strict=True)
    ]
    return dq, dk, dv, reduced


def _ring_core(cfg: _Static) -> Callable[..., Array]:
    @jax.custom_vjp
    def ring(
        q: Array, k: Array, v: Array, key_mask: Array | None, mod_arrays: list[Array]
    ) -> Array:
        out, _ = _ring_forward(cfg, q, k, v, key_mask, mod_arrays)
        return out.astype(q.dtype)

    def fwd(
        q: Array, k: Array, v: Array, key_mask: Array | None, mod_arrays: list[Array]
    ) -> tuple[Array, tuple[Any, ...]]:
        out, lse = _ring_forward(cfg, q, k, v, key_mask, mod_arrays)
        out = out.astype(q.dtype)
        return out, (q, k, v, key_mask, mod_arrays, out, lse)

    def bwd(res: tuple[Any, ...], d_out: Array) -> tuple[Any, ...]:
        q, k, v, key_mask, mod_arrays, out, lse = res
        dq, dk, dv, dmods = _ring_backward(cfg, q, k, v, key_mask, mod_arrays, out, lse, d_out)
        mod_cts = [
            g if jnp.issubdtype(a.dtype, jnp.floating) else None
            for g, a in zip(dmods, mod_arrays, strict=True)
        ]
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, mod_cts

    ring.defvjp(fwd, bwd)
    return ring


# --------------------------------------------------------------------------- public API


def _fused_pair_plan(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None,
    score_mod: ScoreMod | None,
    layout: str,
) -> tuple[bool, str | None]:
    """(causal, None) when one cuDNN call per shard pair serves this ring, else (_, reason)."""
    if not cudnn_pairs_available():
        return False, "this JAX does not expose the cuDNN attention backward"
    if mask is not None:
        return False, "a key-padding mask is given"
    seq_q, seq_kv = query.shape[2], key.shape[2]
    if seq_q != seq_kv:
        return False, f"query and key shards differ in length ({seq_q} vs {seq_kv})"
    plan = cudnn_plan(
        dtypes=(query.dtype, key.dtype, value.dtype),
        head_dim=query.shape[-1],
        seq_q=seq_q,
        seq_kv=seq_kv,
        score_mod=score_mod,
        compute_capability=cuda_compute_capability(),
    )
    if plan is None or plan.window_size is not None or plan.biases:
        return False, (
            "it needs an NVIDIA GPU (compute capability 8.0+), bf16/fp16 inputs, a supported "
            "head_dim, and a score mod that is None or causal"
        )
    if plan.is_causal and layout not in ("contiguous", "zigzag"):
        return (
            False,
            f"causal pairs are planned for the contiguous and zigzag layouts, not {layout}",
        )
    return plan.is_causal, None


def _pallas_pair_plan(
    query: Array,
    key: Array,
    *,
    mask: Array | None,
    score_mod: ScoreMod | None,
    layout: str,
) -> tuple[bool, str | None]:
    """(causal, None) when PALLAS_FLASH pairs serve this ring, else (_, reason)."""
    if jax.default_backend() != "gpu":
        return False, "its kernels need a GPU (Pallas's Triton lowering)"
    if mask is not None:
        return False, "a key-padding mask is given"
    if query.shape[2] != key.shape[2]:
        return False, f"query and key shards differ in length ({query.shape[2]} vs {key.shape[2]})"
    mask_mod, value_mod = split_score_mod(score_mod)
    if value_mod is not None or not (mask_mod is None or isinstance(mask_mod, CausalMask)):
        return False, "the score mod must be None or causal"
    causal = mask_mod is not None
    if causal and layout not in ("contiguous", "zigzag"):
        return False, f"causal pairs need the zigzag or contiguous layout, not {layout}"
    return causal, None


def _ring_key_mask(
    mask: AttentionMask | None, query: Array, key: Array, *, name: str
) -> Bool[Array, "#B #H 1 S"] | None:
    """The ring supports key-padding masks only (their S axis travels with the keys)."""
    if mask is None:
        return None
    if mask.shape[2] != 1:
        raise NotImplementedError(
            f"{name}: a dense `mask` with a query axis (shape {mask.shape}) cannot travel around "
            "the ring; pass a key-padding mask of shape (batch, 1, 1, seq_kv) sharded like the "
            "keys, and express query-dependent masking as a mask mod (score_mod=causal_mod(), "
            "sliding_window_mod(...), document_mask_mod(...)), which sees global positions."
        )
    return jnp.broadcast_to(mask, (*mask.shape[:3], key.shape[2]))


@shape_checked
def ring_attention(
    query: QueryArray,
    key: KeyArray,
    value: ValueArray,
    *,
    axis_name: Hashable | None = None,
    mask: AttentionMask | None = None,
    score_mod: ScoreMod | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    layout: RingLayout = "contiguous",
    block_size: int = 512,
    scale: float | None = None,
    fused_pairs: FusedPairs = None,
) -> AttentionOutput:
    r"""Exact softmax attention over a sequence sharded on mesh axis ``axis_name``.

    Call it inside :func:`jax.shard_map` with axis 2 (the sequence) of query, key, value (and a
    key-padding mask) sharded over ``axis_name``, in the order of ``layout`` (see
    :func:`to_ring_layout`). Each device returns the output rows of its own queries. Score
    and mask mods see global positions; key/value shards and their gradients rotate with
    ``lax.ppermute`` (``P`` steps forward, ``P`` steps backward); memory per device is
    ``O(T / P)``.

    Without ``axis_name``, or with one that no enclosing ``shard_map``/``pmap`` binds, this is
    single-device attention on the arrays given (``memory_efficient_attention``; dropout and any
    dense mask supported there).

    Args:
      query: local shard (batch, heads, seq_q / P, head_dim).
      key: local shard (batch, kv_heads, seq_kv / P, head_dim); ``kv_heads`` divides
        ``heads``; only these heads travel the ring (GQA is never repeated).
      value: like ``key``.
      axis_name: the mesh axis the sequence is sharded over.
      mask: in the ring, a key-padding mask broadcastable to (batch, heads, 1, seq_kv / P),
        sharded like the keys (it travels with them). Dense (T, S) masks raise
        ``NotImplementedError``; use a mask mod instead.
      score_mod: applied to scaled scores with global (batch, head, query, key) positions;
        masking mods (causal, window, prefix, document) also skip tiles and whole shard pairs.
      dropout_rng: dropout key (local path only).
      dropout_rate: dropout probability (local path only; the ring raises for active dropout).
      deterministic: no dropout when True.
      layout: "contiguous", "zigzag" (device ``i`` holds chunks ``i`` and ``2P - 1 - i``) or
        "striped" (device ``i`` holds ``i, i + P, ...``); balanced layouts even out causal work.
      block_size: tile size of the blockwise compute (per device, in tokens); unused by the
        fused pairs.
      scale: score scale, ``1 / sqrt(head_dim)`` by default.
      fused_pairs: how each (query shard, key shard) pair is computed. ``None`` (default):
        one cuDNN flash call per pair whenever the call qualifies (an NVIDIA GPU, bf16/fp16,
        no mask, a score mod that is None or causal, equal query and key shard lengths, layout
        zigzag or contiguous under causal; backward from the global log-sum-exp, see
        :mod:`attnax.kernels._ring_flash`), else blockwise XLA tiles, which take any score
        mod. ``False``: always XLA tiles. ``True`` or ``"cudnn"``: cuDNN pairs or
        ``NotImplementedError`` with the reason. ``"pallas"``: PALLAS_FLASH kernels per pair
        (:mod:`attnax.kernels._ring_pallas`; a GPU, no mask, a score mod that is None or
        causal, equal shard lengths, layout zigzag or contiguous under causal): slower than
        cuDNN but the leanest in memory (gradients accumulated in place, no cuDNN workspace),
        so it trains the longest sequences: on two H100s about 7.2 (B, H, T/P, D) arrays per
        device in a causal training step against 13.0 for the cuDNN pairs, at 0.7-0.8x their
        speed (benchmarks/NOTES.md, Ring); ``NotImplementedError`` with the reason otherwise.

    Returns:
      (batch, heads, seq_q / P, head_dim) in the query's dtype: this device's output rows.
      Rows with no allowed key are zeros with finite gradients.

    Raises:
      ValueError: bad shapes, dropout arguments, layout or block size; a zigzag shard of odd
        length.
      NotImplementedError: active dropout or a dense query-dependent mask in the ring;
        ``fused_pairs=True`` for a call the fused pairs cannot serve.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> from jax.sharding import Mesh, PartitionSpec
      >>> mesh = Mesh(jax.devices()[:2], ("seq",))  # needs 2 devices
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> kv = jax.random.normal(jax.random.key(1), (1, 2, 8, 4))
      >>> spec = PartitionSpec(None, None, "seq", None)  # shard the sequence axis
      >>> ring = jax.jit(jax.shard_map(
      ...     lambda q, k, v: attnax.ring_attention(
      ...         q, k, v, axis_name="seq", score_mod=attnax.causal_mod()),
      ...     mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec))
      >>> out = ring(q, kv, kv)  # contiguous layout: no reordering needed
      >>> ref = attnax.standard_attention(q, kv, kv, score_mod=attnax.causal_mod())
      >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
      ((1, 2, 8, 4), True)
    """
    name = "ring_attention"
    check_qkv(query, key, value, name=name)
    check_mask(mask, query, key, name=name)
    dropout_active = check_dropout(dropout_rate, dropout_rng, deterministic, name=name)
    _check_layout(layout, name=name)
    positive_int(block_size, "block_size", caller=name)
    num_shards = bound_axis_size(axis_name)
    if num_shards is None or num_shards == 1:
        # The single-device path: no ring to run.
        return memory_efficient_attention(
            query,
            key,
            value,
            mask=mask,
            score_mod=score_mod,
            dropout_rng=dropout_rng,
            dropout_rate=dropout_rate,
            deterministic=deterministic,
            block_size=block_size,
            scale=scale,
        )
    if dropout_active:
        raise NotImplementedError(
            f"{name}: attention-weight dropout is not implemented in the ring; use "
            "deterministic=True (dropout on the attention output still works in the layer)."
        )
    batch, num_heads, seq_q, head_dim = query.shape
    num_kv_heads, seq_kv = key.shape[1], key.shape[2]
    if layout == "zigzag" and (seq_q % 2 or seq_kv % 2):
        raise ValueError(
            f"{name}: layout='zigzag' needs an even local shard length (two chunks per device), "
            f"got query {seq_q} and key {seq_kv} tokens per device; the global length must be a "
            f"multiple of 2 x {num_shards}."
        )
    key_mask = _ring_key_mask(mask, query, key, name=name)
    if fused_pairs not in (None, True, False, "cudnn", "pallas"):
        raise ValueError(
            f"{name}: `fused_pairs` must be None, True, False, 'cudnn' or 'pallas', "
            f"got {fused_pairs!r}."
        )
    if fused_pairs == "pallas":
        causal, reason = _pallas_pair_plan(
            query, key, mask=key_mask, score_mod=score_mod, layout=layout
        )
        kind, fallback = "PALLAS_FLASH", "None for the cuDNN pairs or the XLA tiles"
        run_pairs: Callable[..., AttentionOutput] = pallas_ring
    else:
        causal, reason = _fused_pair_plan(
            query, key, value, mask=key_mask, score_mod=score_mod, layout=layout
        )
        kind, fallback = "fused (cuDNN)", "None to fall back to the XLA tiles"
        run_pairs = functools.partial(flash_ring, pair="cudnn")
    if fused_pairs not in (None, False) and reason is not None:
        raise NotImplementedError(
            f"{name}: fused_pairs={fused_pairs!r}, but the {kind} pairs cannot serve this "
            f"call: {reason}; pass fused_pairs={fallback}."
        )
    if fused_pairs is not False and reason is None:
        return run_pairs(
            query,
            key,
            value,
            axis_name=axis_name,
            num_shards=num_shards,
            layout=layout,
            causal=causal,
            scale=default_scale(head_dim, scale),
        )
    mod_arrays, rebuild = _partition_mod(score_mod)
    mod_arrays = [_vary_over_ring(array, axis_name) for array in mod_arrays]
    unit_q = seq_q // 2 if layout == "zigzag" else seq_q
    unit_kv = seq_kv // 2 if layout == "zigzag" else seq_kv
    cfg = _Static(
        axis_name=axis_name,
        num_shards=num_shards,
        layout=layout,
        scale=default_scale(head_dim, scale),
        # Tiles no longer than a zigzag chunk, so a tile never straddles two chunks.
        block_q=min(block_size, unit_q),
        block_kv=min(block_size, unit_kv),
        rebuild=rebuild,
        num_heads=num_heads,
    )
    grouped = query.reshape(batch, num_kv_heads, num_heads // num_kv_heads, seq_q, head_dim)
    out = _ring_core(cfg)(grouped, key, value, key_mask, mod_arrays)
    return out.reshape(batch, num_heads, seq_q, head_dim)


@shape_checked
def ring_attention_reference(
    query: QueryArray,
    key: KeyArray,
    value: ValueArray,
    *,
    axis_name: Hashable | None = None,
    mask: AttentionMask | None = None,
    score_mod: ScoreMod | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    layout: RingLayout = "contiguous",
    block_size: int = 512,
    scale: float | None = None,
) -> AttentionOutput:
    """:func:`ring_attention`'s math on the gathered global sequence (for tests and docs).

    Inside shard_map it all-gathers query, key, value (and a key-padding mask) along the
    sequence, puts them back into global order, runs :func:`standard_attention` at
    ``precision=HIGHEST`` and returns this device's rows. Memory is ``O(T * S)``: a reference,
    not a kernel. ``block_size`` is accepted for signature parity and ignored.

    Args:
      query: local shard (batch, heads, seq_q / P, head_dim), or the whole query outside
        ``shard_map``.
      key: local shard (batch, kv_heads, seq_kv / P, head_dim).
      value: like ``key``.
      axis_name: the mesh axis the sequence is sharded over.
      mask: a key-padding mask sharded like the keys, as in :func:`ring_attention`.
      score_mod: applied with global positions.
      dropout_rng: dropout key (local path only).
      dropout_rate: dropout probability (local path only).
      deterministic: no dropout when True.
      layout: the shards' order, as in :func:`ring_attention`.
      block_size: ignored.
      scale: score scale, ``1 / sqrt(head_dim)`` by default.

    Returns:
      (batch, heads, seq_q / P, head_dim): this device's output rows.

    Raises:
      ValueError, NotImplementedError: as :func:`ring_attention`.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> # Outside shard_map it is standard attention on the arrays given:
      >>> out = attnax.ring_attention_reference(q, q, q, score_mod=attnax.causal_mod())
      >>> ref = attnax.standard_attention(q, q, q, score_mod=attnax.causal_mod())
      >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
      ((1, 2, 8, 4), True)
    """
    name = "ring_attention_reference"
    check_qkv(query, key, value, name=name)
    check_mask(mask, query, key, name=name)
    _check_layout(layout, name=name)
    num_shards = bound_axis_size(axis_name)
    if num_shards is None or num_shards == 1:
        return standard_attention(
            query,
            key,
            value,
            mask=mask,
            score_mod=score_mod,
            dropout_rng=dropout_rng,
            dropout_rate=dropout_rate,
            deterministic=deterministic,
            scale=scale,
            precision=jax.lax.Precision.HIGHEST,
        )
    if check_dropout(dropout_rate, dropout_rng, deterministic, name=name):
        raise NotImplementedError(f"{name}: dropout is not implemented in the ring.")
    key_mask = _ring_key_mask(mask, query, key, name=name)

    def gather(x: Array, axis: int) -> Array:
        full = jax.lax.all_gather(x, axis_name, axis=axis, tiled=True)
        return from_ring_layout(full, num_shards, layout, axis=axis)

    global_mask = None
    if key_mask is not None:
        global_mask = gather(key_mask, 3)
    out = standard_attention(
        gather(query, 2),
        gather(key, 2),
        gather(value, 2),
        mask=global_mask,
        score_mod=score_mod,
        scale=scale,
        precision=jax.lax.Precision.HIGHEST,
    )
    ordered = to_ring_layout(out, num_shards, layout, axis=2)
    me = jax.lax.axis_index(axis_name)
    seq_q = query.shape[2]
    return jax.lax.dynamic_slice_in_dim(ordered, me * seq_q, seq_q, axis=2)


def sharded_ring_attention(
    query: QueryArray,
    key: KeyArray,
    value: ValueArray,
    *,
    mesh: Mesh,
    axis_name: str,
    mask: AttentionMask | None = None,
    score_mod: ScoreMod | None = None,
    layout: RingLayout = "contiguous",
    block_size: int = 512,
    scale: float | None = None,
    batch_axis: str | None = None,
    fused_pairs: FusedPairs = None,
) -> AttentionOutput:
    """Run :func:`ring_attention` on global (unsharded-order) arrays over ``mesh[axis_name]``.

    A convenience wrapper: permutes the sequences into ``layout`` order, shards them with
    :func:`jax.shard_map` (sequence over ``axis_name``, batch over ``batch_axis`` if given),
    runs the ring and restores the global order. ``mask`` must be a key-padding mask
    (batch, 1, 1, seq_kv) or None. ``score_mod`` arrays are replicated.

    Args:
      query: (batch, heads, seq_q, head_dim) in global order.
      key: (batch, kv_heads, seq_kv, head_dim); ``kv_heads`` divides ``heads``.
      value: like ``key``.
      mesh: the device mesh.
      axis_name: the mesh axis to shard the sequence over.
      mask: a key-padding mask (batch, 1, 1, seq_kv), or None.
      score_mod: applied with global positions (masking mods also skip work).
      layout: "contiguous", "zigzag" or "striped" (see :func:`to_ring_layout`).
      block_size: tile size of the per-device blockwise compute.
      scale: score scale, ``1 / sqrt(head_dim)`` by default.
      batch_axis: optional mesh axis to shard the batch over.
      fused_pairs: how each shard pair is computed, as in :func:`ring_attention`
        (``"pallas"``: the leanest in memory).

    Returns:
      (batch, heads, seq_q, head_dim) in global order and the query's dtype.

    Raises:
      ValueError: when the mesh axis size does not divide the sequence lengths (zigzag: twice
        the axis size), or ``axis_name`` is not an axis of ``mesh``.
      NotImplementedError: for a ``mask`` that is not a key-padding mask.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> from jax.sharding import Mesh
      >>> mesh = Mesh(jax.devices()[:2], ("seq",))  # needs 2 devices
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> kv = jax.random.normal(jax.random.key(1), (1, 2, 8, 4))
      >>> @jax.jit
      ... def zigzag_causal(q, k, v):
      ...     return attnax.sharded_ring_attention(
      ...         q, k, v, mesh=mesh, axis_name="seq", layout="zigzag",
      ...         score_mod=attnax.causal_mod())
      >>> out = zigzag_causal(q, kv, kv)
      >>> ref = attnax.standard_attention(q, kv, kv, score_mod=attnax.causal_mod())
      >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
      ((1, 2, 8, 4), True)
    """
    name = "sharded_ring_attention"
    if axis_name not in mesh.shape:
        raise ValueError(
            f"{name}: `axis_name` {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}."
        )
    num_shards = int(mesh.shape[axis_name])
    _check_layout(layout, name=name)
    _check_divides(query.shape[2], num_shards, layout, name=name, what="query sequence")
    _check_divides(key.shape[2], num_shards, layout, name=name, what="key/value sequence")
    if mask is not None and mask.ndim == 4 and mask.shape[2] != 1:
        raise NotImplementedError(
            f"{name}: only key-padding masks (batch, 1, 1, seq_kv) travel the ring; got "
            f"{mask.shape}. Use a mask mod for query-dependent masking."
        )
    seq_spec = PartitionSpec(batch_axis, None, axis_name, None)  # type: ignore[no-untyped-call]
    q = to_ring_layout(query, num_shards, layout)
    k = to_ring_layout(key, num_shards, layout)
    v = to_ring_layout(value, num_shards, layout)
    mask_in = None
    mask_spec: PartitionSpec | None = None
    if mask is not None:
        full_mask = jnp.broadcast_to(mask, (*mask.shape[:3], key.shape[2]))
        mask_in = to_ring_layout(full_mask, num_shards, layout, axis=3)
        mask_spec = PartitionSpec(  # type: ignore[no-untyped-call]
            batch_axis if mask.shape[0] != 1 else None, None, None, axis_name
        )

    # The score mod is closed over (replicated): it may be a plain callable, not a pytree.
    def body(q: Array, k: Array, v: Array, m: Array | None) -> Array:
        return ring_attention(
            q,
            k,
            v,
            axis_name=axis_name,
            mask=m,
            score_mod=score_mod,
            layout=layout,
            block_size=block_size,
            scale=scale,
            fused_pairs=fused_pairs,
        )

    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(seq_spec, seq_spec, seq_spec, mask_spec),
        out_specs=seq_spec,
    )
    out = mapped(q, k, v, mask_in)
    return from_ring_layout(out, num_shards, layout)
