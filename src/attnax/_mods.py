"""FlexAttention-style score mods and mask mods, mask builders, and block sparsity.

A *mask mod* says which (query, key) pairs may attend; a *score mod* rewrites scores. Built-in
mods are frozen dataclasses registered as JAX pytrees: their arrays (document ids, prefix
lengths, a bias) are leaves, so mods pass through ``jit``, ``grad`` and ``vmap`` like any other
argument, and a learnable bias receives its gradient.

Masking score mods (:class:`MaskScoreMod`) keep their mask mod, also through
:func:`compose_score_mods` and :func:`shift_positions`, so kernels can recover it with
:func:`split_score_mod` and skip whole blocks that the mask rules out
(:func:`block_sparsity`). Inside a composition, mask components exclude their positions
whatever their place in the order; value components (ALiBi, softcap, a bias) apply left to
right. A plain user callable keeps working, without block skipping.
"""

import dataclasses
import math
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Int8

from ._checks import positive_int
from ._typing import AttentionMask, MaskMod, ScoreIndex, ScoreMod, Scores

__all__ = [
    "AdditiveBiasMod",
    "AlibiMod",
    "AndMask",
    "BlockOverlapMask",
    "BoxMask",
    "CausalMask",
    "ComposedScoreMod",
    "DocumentMask",
    "MaskScoreMod",
    "OffsetMask",
    "OffsetScoreMod",
    "PrefixLMMask",
    "SlidingWindowMask",
    "SoftcapMod",
    "additive_bias_mod",
    "alibi_mod",
    "alibi_slopes",
    "block_sparsity",
    "block_sparsity_from_mask",
    "causal_mod",
    "combine_masks",
    "compose_score_mods",
    "document_mask_mod",
    "make_causal_mask",
    "make_document_mask",
    "make_padding_mask",
    "make_sliding_window_mask",
    "mask_mod_to_boolean_mask",
    "mask_mod_to_score_mod",
    "prefix_lm_mod",
    "shift_positions",
    "sliding_window_mod",
    "softcap_mod",
    "split_score_mod",
]

# Block classes in a block-sparsity map.
BLOCK_EMPTY = 0  # no allowed pair: never load or compute
BLOCK_PARTIAL = 1  # some pairs allowed: evaluate the mask element-wise
BLOCK_FULL = 2  # every real pair allowed: skip the mask evaluation

_Offset = int | Int[Array, "#B"]


@runtime_checkable
class BlockOverlapMask(Protocol):
    """A mask mod that can classify whole index ranges without evaluating every pair.

    ``block_overlap`` receives per-block half-open ranges ``[q_lo, q_hi)`` and ``[kv_lo, kv_hi)``
    (broadcastable arrays) and the batch/head indices, and returns ``(any_allowed,
    all_allowed)``. ``any_allowed`` may over-approximate and ``all_allowed`` may
    under-approximate; both only ever cost speed, never correctness.
    """

    def __call__(
        self, b_idx: ScoreIndex, h_idx: ScoreIndex, q_idx: ScoreIndex, kv_idx: ScoreIndex, /
    ) -> Bool[Array, "*#tile"]: ...

    def block_overlap(
        self,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_lo: ScoreIndex,
        q_hi: ScoreIndex,
        kv_lo: ScoreIndex,
        kv_hi: ScoreIndex,
    ) -> tuple[Bool[Array, "*#tile"], Bool[Array, "*#tile"]]: ...


# --------------------------------------------------------------------------- mask mods


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CausalMask:
    """``q_idx >= kv_idx``."""

    def __call__(
        self, b_idx: ScoreIndex, h_idx: ScoreIndex, q_idx: ScoreIndex, kv_idx: ScoreIndex, /
    ) -> Bool[Array, "*#tile"]:
        return jnp.asarray(q_idx >= kv_idx)

    def block_overlap(
        self,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_lo: ScoreIndex,
        q_hi: ScoreIndex,
        kv_lo: ScoreIndex,
        kv_hi: ScoreIndex,
    ) -> tuple[Bool[Array, "*#tile"], Bool[Array, "*#tile"]]:
        return jnp.asarray(q_hi - 1 >= kv_lo), jnp.asarray(q_lo >= kv_hi - 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlidingWindowMask:
    """Keys within ``window_size`` positions of the query.

    Causal: ``0 <= q_idx - kv_idx < window_size`` (the query itself counts). Otherwise
    ``|q_idx - kv_idx| < window_size``.
    """

    window_size: int = dataclasses.field(metadata={"static": True})
    causal: bool = dataclasses.field(default=True, metadata={"static": True})

    def __post_init__(self) -> None:
        positive_int(self.window_size, "window_size")

    def __call__(
        self, b_idx: ScoreIndex, h_idx: ScoreIndex, q_idx: ScoreIndex, kv_idx: ScoreIndex, /
    ) -> Bool[Array, "*#tile"]:
        distance = q_idx - kv_idx
        if self.causal:
            return jnp.asarray((distance >= 0) & (distance < self.window_size))
        return jnp.asarray(jnp.abs(distance) < self.window_size)

    def block_overlap(
        self,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_lo: ScoreIndex,
        q_hi: ScoreIndex,
        kv_lo: ScoreIndex,
        kv_hi: ScoreIndex,
    ) -> tuple[Bool[Array, "*#tile"], Bool[Array, "*#tile"]]:
        # Largest and smallest q - kv over the block.
        max_distance = (q_hi - 1) - kv_lo
        min_distance = q_lo - (kv_hi - 1)
        w = self.window_size
        if self.causal:
            any_allowed = (max_distance >= 0) & (min_distance < w)
            all_allowed = (min_distance >= 0) & (max_distance < w)
        else:
            any_allowed = (max_distance > -w) & (min_distance < w)
            all_allowed = (min_distance > -w) & (max_distance < w)
        return jnp.asarray(any_allowed), jnp.asarray(all_allowed)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class PrefixLMMask:
    """Prefix-LM: every query sees the first ``prefix_lengths[b]`` keys, the rest causally."""

    prefix_lengths: Int[Array, " B"]

    def __call__(
        self, b_idx: ScoreIndex, h_idx: ScoreIndex, q_idx: ScoreIndex, kv_idx: ScoreIndex, /
    ) -> Bool[Array, "*#tile"]:
        prefix = self.prefix_lengths[b_idx]
        return jnp.asarray((kv_idx < prefix) | (q_idx >= kv_idx))

    def block_overlap(
        self,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_lo: ScoreIndex,
        q_hi: ScoreIndex,
        kv_lo: ScoreIndex,
        kv_hi: ScoreIndex,
    ) -> tuple[Bool[Array, "*#tile"], Bool[Array, "*#tile"]]:
        prefix = self.prefix_lengths[b_idx]
        any_allowed = (kv_lo < prefix) | (q_hi - 1 >= kv_lo)
        all_allowed = (kv_hi - 1 < prefix) | (q_lo >= kv_hi - 1)
        return jnp.asarray(any_allowed), jnp.asarray(all_allowed)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class DocumentMask:
    """Packed sequences: a query attends only to keys of the same document.

    ``query_document_ids`` is (batch, seq_q); ``kv_document_ids`` (batch, seq_kv) defaults to the
    same array (self-attention).
    """

    query_document_ids: Int[Array, "B T"]
    kv_document_ids: Int[Array, "B S"]

    def __call__(
        self, b_idx: ScoreIndex, h_idx: ScoreIndex, q_idx: ScoreIndex, kv_idx: ScoreIndex, /
    ) -> Bool[Array, "*#tile"]:
        return jnp.asarray(
            self.query_document_ids[b_idx, q_idx] == self.kv_document_ids[b_idx, kv_idx]
        )

    def block_overlap(
        self,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_lo: ScoreIndex,
        q_hi: ScoreIndex,
        kv_lo: ScoreIndex,
        kv_hi: ScoreIndex,
    ) -> tuple[Bool[Array, "*#tile"], Bool[Array, "*#tile"]]:
        # Per-block id ranges: equal ids somewhere need overlapping ranges (true for any ids).
        q_min, q_max = _range_min_max(self.query_document_ids, b_idx, q_lo, q_hi)
        kv_min, kv_max = _range_min_max(self.kv_document_ids, b_idx, kv_lo, kv_hi)
        any_allowed = (q_min <= kv_max) & (kv_min <= q_max)
        all_allowed = (q_min == q_max) & (kv_min == kv_max) & (q_min == kv_min)
        return jnp.asarray(any_allowed), jnp.asarray(all_allowed)


def _range_min_max(
    ids: Int[Array, "B N"], b_idx: ScoreIndex, lo: ScoreIndex, hi: ScoreIndex
) -> tuple[Int[Array, "..."], Int[Array, "..."]]:
    """Min and max of ``ids[b, lo:hi]`` per block, shaped like ``b_idx`` broadcast with ``lo``."""
    lo = jnp.asarray(lo)
    positions = jnp.arange(ids.shape[1])
    lo_flat = jnp.reshape(lo, (-1, 1))
    hi_flat = jnp.reshape(jnp.broadcast_to(hi, lo.shape), (-1, 1))
    inside = (positions >= lo_flat) & (positions < hi_flat)  # (blocks, N)
    info = np.iinfo(ids.dtype)
    mins = jnp.min(jnp.where(inside, ids[:, None, :], info.max), axis=-1)  # (B, blocks)
    maxs = jnp.max(jnp.where(inside, ids[:, None, :], info.min), axis=-1)
    block_index = jnp.arange(lo_flat.shape[0]).reshape(lo.shape)
    return mins[b_idx, block_index], maxs[b_idx, block_index]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class BoxMask:
    """Queries in ``[q_start, q_stop)`` see keys in ``[kv_start, kv_stop)``; nothing else.

    The bounds are int32 scalars and may be traced (the ring attention's pairs decide them from
    the device index). Each query sees one interval of keys, so block-sparse kernels treat it
    like causal masks and windows: a row's fully allowed blocks are consecutive.
    """

    q_start: Int[Array, ""]
    q_stop: Int[Array, ""]
    kv_start: Int[Array, ""]
    kv_stop: Int[Array, ""]

    def __call__(
        self, b_idx: ScoreIndex, h_idx: ScoreIndex, q_idx: ScoreIndex, kv_idx: ScoreIndex, /
    ) -> Bool[Array, "*#tile"]:
        rows = (q_idx >= self.q_start) & (q_idx < self.q_stop)
        return jnp.asarray(rows & (kv_idx >= self.kv_start) & (kv_idx < self.kv_stop))

    def block_overlap(
        self,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_lo: ScoreIndex,
        q_hi: ScoreIndex,
        kv_lo: ScoreIndex,
        kv_hi: ScoreIndex,
    ) -> tuple[Bool[Array, "*#tile"], Bool[Array, "*#tile"]]:
        any_allowed = (q_lo < self.q_stop) & (q_hi > self.q_start)
        any_allowed &= (kv_lo < self.kv_stop) & (kv_hi > self.kv_start)
        all_allowed = (q_lo >= self.q_start) & (q_hi <= self.q_stop)
        all_allowed &= (kv_lo >= self.kv_start) & (kv_hi <= self.kv_stop)
        return jnp.asarray(any_allowed), jnp.asarray(all_allowed)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class AndMask:
    """The intersection of several mask mods."""

    mask_mods: tuple[MaskMod, ...]

    def __call__(
        self, b_idx: ScoreIndex, h_idx: ScoreIndex, q_idx: ScoreIndex, kv_idx: ScoreIndex, /
    ) -> Bool[Array, "*#tile"]:
        allowed = jnp.asarray(True)
        for mask_mod in self.mask_mods:
            allowed = allowed & mask_mod(b_idx, h_idx, q_idx, kv_idx)
        return allowed

    def block_overlap(
        self,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_lo: ScoreIndex,
        q_hi: ScoreIndex,
        kv_lo: ScoreIndex,
        kv_hi: ScoreIndex,
    ) -> tuple[Bool[Array, "*#tile"], Bool[Array, "*#tile"]]:
        any_allowed = jnp.asarray(True)
        all_allowed = jnp.asarray(True)
        for mask_mod in self.mask_mods:
            if isinstance(mask_mod, BlockOverlapMask):
                some, every = mask_mod.block_overlap(b_idx, h_idx, q_lo, q_hi, kv_lo, kv_hi)
                any_allowed = any_allowed & some
                all_allowed = all_allowed & every
            else:
                all_allowed = jnp.asarray(False)
        return any_allowed, all_allowed

    @property
    def has_block_overlap(self) -> bool:
        return all(isinstance(m, BlockOverlapMask) for m in self.mask_mods)


def _offset_for(offset: _Offset, b_idx: ScoreIndex) -> ScoreIndex:
    if isinstance(offset, int):
        return jnp.asarray(offset)
    offset_array = jnp.asarray(offset)
    if offset_array.ndim == 0:
        return offset_array
    return offset_array[b_idx]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class OffsetMask:
    """A mask mod seen from shifted positions: ``q_idx + q_offset[b]``, ``kv_idx + kv_offset[b]``.

    Offsets are ints or (batch,) arrays; a KV cache uses them to give absolute positions.
    """

    mask_mod: MaskMod
    q_offset: _Offset = 0
    kv_offset: _Offset = 0

    def __call__(
        self, b_idx: ScoreIndex, h_idx: ScoreIndex, q_idx: ScoreIndex, kv_idx: ScoreIndex, /
    ) -> Bool[Array, "*#tile"]:
        q_pos = q_idx + _offset_for(self.q_offset, b_idx)
        kv_pos = kv_idx + _offset_for(self.kv_offset, b_idx)
        return jnp.asarray(self.mask_mod(b_idx, h_idx, q_pos, kv_pos))

    def block_overlap(
        self,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_lo: ScoreIndex,
        q_hi: ScoreIndex,
        kv_lo: ScoreIndex,
        kv_hi: ScoreIndex,
    ) -> tuple[Bool[Array, "*#tile"], Bool[Array, "*#tile"]]:
        if not isinstance(self.mask_mod, BlockOverlapMask) or (
            isinstance(self.mask_mod, AndMask) and not self.mask_mod.has_block_overlap
        ):
            false = jnp.asarray(False)
            return jnp.asarray(True) | false, false
        q_shift = _offset_for(self.q_offset, b_idx)
        kv_shift = _offset_for(self.kv_offset, b_idx)
        return self.mask_mod.block_overlap(
            b_idx, h_idx, q_lo + q_shift, q_hi + q_shift, kv_lo + kv_shift, kv_hi + kv_shift
        )


# --------------------------------------------------------------------------- score mods


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class MaskScoreMod:
    """A score mod that sets disallowed scores to ``-inf``; kernels read ``mask_mod`` to skip."""

    mask_mod: MaskMod

    def __call__(
        self,
        scores: Scores,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_idx: ScoreIndex,
        kv_idx: ScoreIndex,
        /,
    ) -> Scores:
        allowed = self.mask_mod(b_idx, h_idx, q_idx, kv_idx)
        return jnp.where(allowed, scores, -jnp.inf)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AlibiMod:
    """ALiBi: ``scores - slope[h] * |q_idx - kv_idx|`` with the paper's geometric slopes.

    Slopes are computed arithmetically from ``h_idx`` (no table lookup), so the mod traces into a
    Pallas kernel unchanged. Press et al., "Train Short, Test Long", ICLR 2022.
    """

    num_heads: int = dataclasses.field(metadata={"static": True})

    def __post_init__(self) -> None:
        positive_int(self.num_heads, "num_heads")

    def slope(self, h_idx: ScoreIndex) -> Float[Array, "*#tile"]:
        power = 2 ** math.floor(math.log2(self.num_heads))
        h = jnp.asarray(h_idx, jnp.float32)
        main = jnp.exp2(-8.0 * (h + 1.0) / power)
        # Heads beyond the largest power of two take every other slope of the 2*power series.
        extra = jnp.exp2(-4.0 * (2.0 * (h - power) + 1.0) / power)
        return jnp.where(h < power, main, extra)

    def __call__(
        self,
        scores: Scores,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_idx: ScoreIndex,
        kv_idx: ScoreIndex,
        /,
    ) -> Scores:
        distance = jnp.abs(q_idx - kv_idx).astype(jnp.float32)
        return scores - self.slope(h_idx) * distance


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SoftcapMod:
    """``cap * tanh(scores / cap)``, as in Gemma 2."""

    cap: float = dataclasses.field(metadata={"static": True})

    def __post_init__(self) -> None:
        if not (isinstance(self.cap, (int, float)) and self.cap > 0 and math.isfinite(self.cap)):
            raise ValueError(f"`cap` must be a positive finite number, got {self.cap!r}.")

    def __call__(
        self,
        scores: Scores,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_idx: ScoreIndex,
        kv_idx: ScoreIndex,
        /,
    ) -> Scores:
        return self.cap * jnp.tanh(scores / self.cap)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class AdditiveBiasMod:
    """``scores + bias[b, h, q, kv]``; ``bias`` broadcastable to (B, H, T, S) and differentiable."""

    bias: Float[Array, "#B #H #T #S"]

    def __call__(
        self,
        scores: Scores,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_idx: ScoreIndex,
        kv_idx: ScoreIndex,
        /,
    ) -> Scores:
        # A size-1 axis of the bias is broadcast: index it at 0 whatever the index says.
        index = tuple(
            jnp.zeros((), jnp.int32) if size == 1 else idx
            for size, idx in zip(self.bias.shape, (b_idx, h_idx, q_idx, kv_idx), strict=True)
        )
        return scores + self.bias[index].astype(jnp.result_type(scores))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class ComposedScoreMod:
    """Several score mods; mask parts exclude positions, value parts apply left to right."""

    score_mods: tuple[ScoreMod, ...]

    def __call__(
        self,
        scores: Scores,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_idx: ScoreIndex,
        kv_idx: ScoreIndex,
        /,
    ) -> Scores:
        mask_mod, value_mod = split_score_mod(self)
        if value_mod is not None:
            scores = value_mod(scores, b_idx, h_idx, q_idx, kv_idx)
        if mask_mod is not None:
            scores = jnp.where(mask_mod(b_idx, h_idx, q_idx, kv_idx), scores, -jnp.inf)
        return scores


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class _ValueChain:
    """Value score mods applied left to right (no masks inside)."""

    score_mods: tuple[ScoreMod, ...]

    def __call__(
        self,
        scores: Scores,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_idx: ScoreIndex,
        kv_idx: ScoreIndex,
        /,
    ) -> Scores:
        for score_mod in self.score_mods:
            scores = score_mod(scores, b_idx, h_idx, q_idx, kv_idx)
        return scores


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class OffsetScoreMod:
    """A score mod seen from shifted positions (see :class:`OffsetMask`)."""

    score_mod: ScoreMod
    q_offset: _Offset = 0
    kv_offset: _Offset = 0

    def __call__(
        self,
        scores: Scores,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_idx: ScoreIndex,
        kv_idx: ScoreIndex,
        /,
    ) -> Scores:
        q_pos = q_idx + _offset_for(self.q_offset, b_idx)
        kv_pos = kv_idx + _offset_for(self.kv_offset, b_idx)
        return self.score_mod(scores, b_idx, h_idx, q_pos, kv_pos)


# --------------------------------------------------------------------------- constructors


def causal_mod() -> MaskScoreMod:
    """Causal masking as a score mod (kernels skip the blocks above the diagonal).

    Returns:
      A :class:`MaskScoreMod` over ``q_idx >= kv_idx``.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> out = attnax.standard_attention(q, q, q, score_mod=attnax.causal_mod())
      >>> bool(jnp.allclose(out[:, :, 0], q[:, :, 0]))  # the first query sees only itself
      True
    """
    return MaskScoreMod(CausalMask())


def sliding_window_mod(window_size: int, *, causal: bool = True) -> MaskScoreMod:
    """Sliding-window masking; see :class:`SlidingWindowMask`.

    Args:
      window_size: keys closer than this many positions are kept (the query itself counts).
      causal: keep only keys at or before the query.

    Returns:
      A :class:`MaskScoreMod` over a :class:`SlidingWindowMask`.

    Raises:
      ValueError: when ``window_size`` is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mask_mod, _ = attnax.split_score_mod(attnax.sliding_window_mod(2))
      >>> mask = attnax.mask_mod_to_boolean_mask(mask_mod, batch=1, num_heads=1, seq_q=4, seq_kv=4)
      >>> mask[0, 0].astype(int).tolist()
      [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    return MaskScoreMod(SlidingWindowMask(window_size, causal))


def alibi_slopes(num_heads: int) -> Float[Array, " H"]:
    """The ALiBi paper's per-head slopes (geometric; interleaved for non-powers of two).

    Args:
      num_heads: number of query heads.

    Returns:
      (num_heads,) float32 slopes.

    Raises:
      ValueError: when ``num_heads`` is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> attnax.alibi_slopes(4).tolist()
      [0.25, 0.0625, 0.015625, 0.00390625]
    """
    return AlibiMod(num_heads).slope(jnp.arange(num_heads))


def alibi_mod(num_heads: int) -> AlibiMod:
    """ALiBi position bias; see :class:`AlibiMod`.

    Args:
      num_heads: number of query heads (the slopes depend on it).

    Returns:
      An :class:`AlibiMod` (a value mod: it masks nothing).

    Raises:
      ValueError: when ``num_heads`` is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mod = attnax.alibi_mod(4)
      >>> scores = jnp.zeros((1, 4, 1, 3))  # query 2 against keys 0, 1, 2
      >>> b, h = jnp.arange(1).reshape(1, 1, 1, 1), jnp.arange(4).reshape(1, 4, 1, 1)
      >>> q_idx, kv_idx = jnp.full((1, 1, 1, 1), 2), jnp.arange(3).reshape(1, 1, 1, 3)
      >>> mod(scores, b, h, q_idx, kv_idx)[0, 0, 0].tolist()  # head 0: slope 1/4
      [-0.5, -0.25, 0.0]
    """
    return AlibiMod(num_heads)


def prefix_lm_mod(prefix_lengths: Int[Array, " B"]) -> MaskScoreMod:
    """Prefix-LM masking with one prefix length per batch row.

    Args:
      prefix_lengths: (batch,) int; row ``b`` sees its first ``prefix_lengths[b]`` keys from
        every query, the rest causally.

    Returns:
      A :class:`MaskScoreMod` over a :class:`PrefixLMMask`.

    Raises:
      ValueError: when ``prefix_lengths`` is not rank 1.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mod = attnax.prefix_lm_mod(jnp.array([2]))  # the first 2 keys are visible to all
      >>> mask_mod, _ = attnax.split_score_mod(mod)
      >>> mask = attnax.mask_mod_to_boolean_mask(mask_mod, batch=1, num_heads=1, seq_q=4, seq_kv=4)
      >>> mask[0, 0].astype(int).tolist()
      [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    """
    prefix_lengths = jnp.asarray(prefix_lengths)
    if prefix_lengths.ndim != 1:
        raise ValueError(
            f"`prefix_lengths` must have shape (batch,), got {prefix_lengths.shape}."
        )
    return MaskScoreMod(PrefixLMMask(prefix_lengths))


def document_mask_mod(
    document_ids: Int[Array, "B T"], kv_document_ids: Int[Array, "B S"] | None = None
) -> MaskScoreMod:
    """Packed-sequence masking from (batch, seq) document ids.

    Args:
      document_ids: (batch, seq_q) int document id of every query position.
      kv_document_ids: (batch, seq_kv) ids of the keys; defaults to ``document_ids``
        (self-attention).

    Returns:
      A :class:`MaskScoreMod` over a :class:`DocumentMask`.

    Raises:
      ValueError: when the ids are not (batch, seq) arrays with one batch size.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mod = attnax.document_mask_mod(jnp.array([[0, 0, 1, 1]]))  # two packed documents
      >>> mask_mod, _ = attnax.split_score_mod(mod)
      >>> mask = attnax.mask_mod_to_boolean_mask(mask_mod, batch=1, num_heads=1, seq_q=4, seq_kv=4)
      >>> mask[0, 0].astype(int).tolist()
      [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    """
    document_ids = jnp.asarray(document_ids)
    kv_ids = document_ids if kv_document_ids is None else jnp.asarray(kv_document_ids)
    if document_ids.ndim != 2 or kv_ids.ndim != 2 or kv_ids.shape[0] != document_ids.shape[0]:
        raise ValueError(
            "`document_ids` must have shape (batch, seq) (and `kv_document_ids` (batch, seq_kv)), "
            f"got {document_ids.shape} and {kv_ids.shape}."
        )
    return MaskScoreMod(DocumentMask(document_ids, kv_ids))


def additive_bias_mod(bias: Float[Array, "#B #H #T #S"]) -> AdditiveBiasMod:
    """Add a (differentiable) bias broadcastable to (batch, heads, seq_q, seq_kv).

    Args:
      bias: float, rank 4, broadcastable to (batch, heads, seq_q, seq_kv).

    Returns:
      An :class:`AdditiveBiasMod` whose bias is a pytree leaf (it receives gradients).

    Raises:
      ValueError: when ``bias`` is not rank 4.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 4, 4))
      >>> bias = jnp.zeros((1, 1, 4, 4))  # shared by the batch and the heads
      >>> def loss(bias):
      ...     out = attnax.standard_attention(q, q, q, score_mod=attnax.additive_bias_mod(bias))
      ...     return jnp.sum(out ** 2)
      >>> jax.jit(jax.grad(loss))(bias).shape  # the bias is differentiable
      (1, 1, 4, 4)
    """
    bias = jnp.asarray(bias)
    if bias.ndim != 4:
        raise ValueError(
            f"`bias` must be rank 4, broadcastable to (batch, heads, seq_q, seq_kv); got shape "
            f"{bias.shape}. Add leading axes of size 1."
        )
    return AdditiveBiasMod(bias)


def softcap_mod(cap: float) -> SoftcapMod:
    """Soft-capping ``cap * tanh(s / cap)``.

    Args:
      cap: the positive, finite bound of the scores.

    Returns:
      A :class:`SoftcapMod`.

    Raises:
      ValueError: when ``cap`` is not positive and finite.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mod = attnax.softcap_mod(2.0)
      >>> index = jnp.zeros((), jnp.int32)
      >>> capped = mod(jnp.array([0.0, 1.0, 100.0]), index, index, index, index)
      >>> [round(float(s), 4) for s in capped]
      [0.0, 0.9242, 2.0]
    """
    return SoftcapMod(float(cap))


def mask_mod_to_score_mod(mask_mod: MaskMod) -> MaskScoreMod:
    """Turn a mask mod into a masking score mod (kernels can still see the mask).

    Args:
      mask_mod: any :class:`MaskMod`.

    Returns:
      A :class:`MaskScoreMod` that sets disallowed scores to ``-inf``.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> def local(b_idx, h_idx, q_idx, kv_idx):
      ...     return jnp.abs(q_idx - kv_idx) <= 1
      >>> score_mod = attnax.mask_mod_to_score_mod(local)
      >>> attnax.split_score_mod(score_mod)[0] is local  # kernels can still skip blocks
      True
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> attnax.standard_attention(q, q, q, score_mod=score_mod).shape
      (1, 2, 8, 4)
    """
    return MaskScoreMod(mask_mod)


def compose_score_mods(*score_mods: ScoreMod | None) -> ScoreMod | None:
    """Compose score mods left to right; ``None`` entries are skipped.

    Returns ``None`` when every entry is ``None`` and a single mod unchanged.

    Args:
      *score_mods: score mods or ``None``, applied in order (mask parts exclude their
        positions wherever they stand).

    Returns:
      A :class:`ComposedScoreMod`, the single mod given, or ``None``.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mod = attnax.compose_score_mods(attnax.causal_mod(), attnax.softcap_mod(30.0), None)
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> attnax.standard_attention(q, q, q, score_mod=mod).shape
      (1, 2, 8, 4)
      >>> attnax.compose_score_mods(None, None) is None
      True
    """
    present = tuple(m for m in score_mods if m is not None)
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    return ComposedScoreMod(present)


def shift_positions(
    score_mod: ScoreMod | None, *, q_offset: _Offset = 0, kv_offset: _Offset = 0
) -> ScoreMod | None:
    """Make ``score_mod`` see ``q_idx + q_offset`` and ``kv_idx + kv_offset`` (ints or (B,)).

    Args:
      score_mod: the mod to shift; ``None`` stays ``None``.
      q_offset: added to query indices: an int or a (batch,) int array.
      kv_offset: added to key indices: an int or a (batch,) int array.

    Returns:
      An :class:`OffsetScoreMod` (its mask part stays visible to :func:`split_score_mod`), or
      ``None``.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> # Two new queries at absolute positions 3 and 4 of a 5-token sequence:
      >>> mod = attnax.shift_positions(attnax.causal_mod(), q_offset=3)
      >>> mask_mod, _ = attnax.split_score_mod(mod)
      >>> mask = attnax.mask_mod_to_boolean_mask(mask_mod, batch=1, num_heads=1, seq_q=2, seq_kv=5)
      >>> mask[0, 0].astype(int).tolist()
      [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    """
    if score_mod is None:
        return None
    return OffsetScoreMod(score_mod, q_offset, kv_offset)


def split_score_mod(score_mod: ScoreMod | None) -> tuple[MaskMod | None, ScoreMod | None]:
    """Split a score mod into its mask part and its value part.

    ``score_mod(s) == where(mask_mod(...), value_mod(s), -inf)`` for built-in mods. A plain
    callable is all value part (kernels then cannot skip blocks, but results are the same).

    Args:
      score_mod: any score mod, or ``None``.

    Returns:
      ``(mask_mod, value_mod)``, either ``None`` when that part is absent.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mod = attnax.compose_score_mods(attnax.causal_mod(), attnax.alibi_mod(2))
      >>> mask_mod, value_mod = attnax.split_score_mod(mod)
      >>> type(mask_mod).__name__, type(value_mod).__name__
      ('CausalMask', 'AlibiMod')
      >>> attnax.split_score_mod(None)
      (None, None)
    """
    if score_mod is None:
        return None, None
    if isinstance(score_mod, MaskScoreMod):
        return score_mod.mask_mod, None
    if isinstance(score_mod, ComposedScoreMod):
        masks: list[Any] = []
        values: list[Any] = []
        for part in score_mod.score_mods:
            part_mask, part_value = split_score_mod(part)
            if part_mask is not None:
                masks.extend(part_mask.mask_mods if isinstance(part_mask, AndMask) else [part_mask])
            if part_value is not None:
                values.append(part_value)
        mask: MaskMod | None = None
        if len(masks) == 1:
            mask = masks[0]
        elif masks:
            mask = AndMask(tuple(masks))
        value: ScoreMod | None = None
        if len(values) == 1:
            value = values[0]
        elif values:
            value = _ValueChain(tuple(values))
        return mask, value
    if isinstance(score_mod, OffsetScoreMod):
        inner_mask, inner_value = split_score_mod(score_mod.score_mod)
        shifted_mask = (
            None
            if inner_mask is None
            else OffsetMask(inner_mask, score_mod.q_offset, score_mod.kv_offset)
        )
        shifted_value = (
            None
            if inner_value is None
            else OffsetScoreMod(inner_value, score_mod.q_offset, score_mod.kv_offset)
        )
        return shifted_mask, shifted_value
    return None, score_mod


# --------------------------------------------------------------------------- dense masks


def _tile_indices(
    batch: int, num_heads: int, seq_q: int, seq_kv: int
) -> tuple[Int[Array, "B 1 1 1"], Int[Array, "1 H 1 1"], Int[Array, "1 1 T 1"], Int[Array, "1 1 1 S"]]:
    return (
        jnp.arange(batch).reshape(batch, 1, 1, 1),
        jnp.arange(num_heads).reshape(1, num_heads, 1, 1),
        jnp.arange(seq_q).reshape(1, 1, seq_q, 1),
        jnp.arange(seq_kv).reshape(1, 1, 1, seq_kv),
    )


def mask_mod_to_boolean_mask(
    mask_mod: MaskMod, *, batch: int, num_heads: int, seq_q: int, seq_kv: int
) -> Bool[Array, "B H T S"]:
    """Evaluate a mask mod densely to a (batch, heads, seq_q, seq_kv) boolean mask.

    Args:
      mask_mod: any :class:`MaskMod`.
      batch: batch size.
      num_heads: number of heads.
      seq_q: query length.
      seq_kv: key length.

    Returns:
      A (batch, num_heads, seq_q, seq_kv) boolean array; True means attend.

    Raises:
      ValueError: when a size is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> def same_parity(b_idx, h_idx, q_idx, kv_idx):
      ...     return (q_idx % 2) == (kv_idx % 2)
      >>> mask = attnax.mask_mod_to_boolean_mask(
      ...     same_parity, batch=2, num_heads=1, seq_q=3, seq_kv=3)
      >>> mask.shape, mask.dtype
      ((2, 1, 3, 3), dtype('bool'))
      >>> mask[0, 0].astype(int).tolist()
      [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    """
    for value, name in ((batch, "batch"), (num_heads, "num_heads"), (seq_q, "seq_q"), (seq_kv, "seq_kv")):
        positive_int(value, name)
    b, h, q, kv = _tile_indices(batch, num_heads, seq_q, seq_kv)
    allowed = jnp.asarray(mask_mod(b, h, q, kv), dtype=bool)
    return jnp.broadcast_to(allowed, (batch, num_heads, seq_q, seq_kv))


def make_causal_mask(seq: int) -> Bool[Array, "1 1 T T"]:
    """A (1, 1, seq, seq) lower-triangular mask.

    Args:
      seq: sequence length.

    Returns:
      (1, 1, seq, seq) boolean, True on and below the diagonal.

    Raises:
      ValueError: when ``seq`` is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mask = attnax.make_causal_mask(3)
      >>> mask.shape
      (1, 1, 3, 3)
      >>> mask[0, 0].astype(int).tolist()
      [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    positive_int(seq, "seq")
    return mask_mod_to_boolean_mask(CausalMask(), batch=1, num_heads=1, seq_q=seq, seq_kv=seq)


def make_sliding_window_mask(
    seq: int, *, window_size: int, causal: bool = True
) -> Bool[Array, "1 1 T T"]:
    """A (1, 1, seq, seq) sliding-window mask; see :class:`SlidingWindowMask`.

    Args:
      seq: sequence length.
      window_size: keys closer than this many positions are kept (the query itself counts).
      causal: keep only keys at or before the query.

    Returns:
      (1, 1, seq, seq) boolean; True means attend.

    Raises:
      ValueError: when ``seq`` or ``window_size`` is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mask = attnax.make_sliding_window_mask(4, window_size=2, causal=False)
      >>> mask[0, 0].astype(int).tolist()
      [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    """
    positive_int(seq, "seq")
    return mask_mod_to_boolean_mask(
        SlidingWindowMask(window_size, causal), batch=1, num_heads=1, seq_q=seq, seq_kv=seq
    )


def make_padding_mask(ids: Int[Array, "B S"], pad_token_id: int) -> Bool[Array, "B 1 1 S"]:
    """Key-padding mask (batch, 1, 1, seq): False where ``ids == pad_token_id``.

    Args:
      ids: (batch, seq) token ids.
      pad_token_id: the id of padding tokens.

    Returns:
      (batch, 1, 1, seq) boolean, False at padding keys.

    Raises:
      ValueError: when ``ids`` is not rank 2.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mask = attnax.make_padding_mask(jnp.array([[5, 7, 0, 0]]), pad_token_id=0)
      >>> mask.shape
      (1, 1, 1, 4)
      >>> mask[0, 0, 0].tolist()
      [True, True, False, False]
    """
    ids = jnp.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"`ids` must have shape (batch, seq), got {ids.shape}.")
    return (ids != pad_token_id)[:, None, None, :]


def make_document_mask(document_ids: Int[Array, "B T"]) -> Bool[Array, "B 1 T T"]:
    """Block-diagonal mask (batch, 1, seq, seq) from packed-sequence document ids.

    Args:
      document_ids: (batch, seq) int document id of every position.

    Returns:
      (batch, 1, seq, seq) boolean, True where query and key share a document.

    Raises:
      ValueError: when ``document_ids`` is not rank 2.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mask = attnax.make_document_mask(jnp.array([[0, 0, 1]]))
      >>> mask.shape
      (1, 1, 3, 3)
      >>> mask[0, 0].astype(int).tolist()
      [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """
    document_ids = jnp.asarray(document_ids)
    if document_ids.ndim != 2:
        raise ValueError(f"`document_ids` must have shape (batch, seq), got {document_ids.shape}.")
    return (document_ids[:, :, None] == document_ids[:, None, :])[:, None]


def combine_masks(*masks: AttentionMask | None) -> AttentionMask | None:
    """Logical AND of broadcastable boolean masks; ``None`` entries are skipped.

    Args:
      *masks: rank-4 boolean masks or ``None``.

    Returns:
      Their broadcast AND, or ``None`` when every entry is ``None``.

    Raises:
      ValueError: when a mask is not rank 4.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> padding = attnax.make_padding_mask(jnp.array([[3, 4, 0]]), pad_token_id=0)
      >>> mask = attnax.combine_masks(attnax.make_causal_mask(3), padding, None)
      >>> mask[0, 0].astype(int).tolist()
      [[1, 0, 0], [1, 1, 0], [1, 1, 0]]
      >>> attnax.combine_masks(None) is None
      True
    """
    present = [jnp.asarray(m, dtype=bool) for m in masks if m is not None]
    if not present:
        return None
    for m in present:
        if m.ndim != 4:
            raise ValueError(
                f"masks must be rank 4, broadcastable to (batch, heads, seq_q, seq_kv); got {m.shape}."
            )
    combined = present[0]
    for m in present[1:]:
        combined = combined & m
    return combined


# --------------------------------------------------------------------------- block sparsity


def block_sparsity(
    mask_mod: MaskMod,
    *,
    batch: int,
    num_heads: int,
    seq_q: int,
    seq_kv: int,
    block_q: int,
    block_kv: int,
) -> Int8[Array, "#B #H NQ NK"]:
    """Classify each (query block, key block) as empty (0), partial (1) or full (2).

    Mods with ``block_overlap`` are classified analytically in O(NQ * NK); other mask mods are
    evaluated one query block at a time (memory O(B * H * block_q * S)). Blocks that run past
    ``seq_q`` / ``seq_kv`` are classified on their real positions only: a kernel that pads must
    still exclude padded keys itself.
    """
    num_q_blocks = -(-seq_q // block_q)
    num_kv_blocks = -(-seq_kv // block_kv)
    q_lo = (jnp.arange(num_q_blocks) * block_q).reshape(1, 1, -1, 1)
    q_hi = jnp.minimum(q_lo + block_q, seq_q)
    kv_lo = (jnp.arange(num_kv_blocks) * block_kv).reshape(1, 1, 1, -1)
    kv_hi = jnp.minimum(kv_lo + block_kv, seq_kv)
    b_idx = jnp.arange(batch).reshape(-1, 1, 1, 1)
    h_idx = jnp.arange(num_heads).reshape(1, -1, 1, 1)
    analytic = isinstance(mask_mod, BlockOverlapMask) and not (
        isinstance(mask_mod, AndMask) and not mask_mod.has_block_overlap
    )
    if analytic:
        assert isinstance(mask_mod, BlockOverlapMask)
        any_allowed, all_allowed = mask_mod.block_overlap(b_idx, h_idx, q_lo, q_hi, kv_lo, kv_hi)
    else:
        dense = _dense_block_overlap(
            mask_mod, batch, num_heads, seq_q, seq_kv, block_q, block_kv
        )
        any_allowed, all_allowed = dense
    classes = jnp.where(all_allowed, BLOCK_FULL, jnp.where(any_allowed, BLOCK_PARTIAL, BLOCK_EMPTY))
    return jnp.asarray(classes, jnp.int8)


def _dense_block_overlap(
    mask_mod: MaskMod,
    batch: int,
    num_heads: int,
    seq_q: int,
    seq_kv: int,
    block_q: int,
    block_kv: int,
) -> tuple[Bool[Array, "B H NQ NK"], Bool[Array, "B H NQ NK"]]:
    num_q_blocks = -(-seq_q // block_q)
    num_kv_blocks = -(-seq_kv // block_kv)
    kv_pad = num_kv_blocks * block_kv
    b_idx = jnp.arange(batch).reshape(-1, 1, 1, 1)
    h_idx = jnp.arange(num_heads).reshape(1, -1, 1, 1)
    kv_idx = jnp.arange(kv_pad).reshape(1, 1, 1, -1)

    def one_query_block(q_block: Int[Array, ""]) -> tuple[Bool[Array, "B H NK"], Bool[Array, "B H NK"]]:
        q_idx = (q_block * block_q + jnp.arange(block_q)).reshape(1, 1, -1, 1)
        real = (q_idx < seq_q) & (kv_idx < seq_kv)
        allowed = jnp.broadcast_to(
            jnp.asarray(mask_mod(b_idx, h_idx, q_idx, kv_idx), bool),
            (batch, num_heads, block_q, kv_pad),
        )
        tiles = (allowed & real).reshape(batch, num_heads, block_q, num_kv_blocks, block_kv)
        full = (allowed | ~real).reshape(batch, num_heads, block_q, num_kv_blocks, block_kv)
        return jnp.any(tiles, axis=(2, 4)), jnp.all(full, axis=(2, 4))

    any_allowed, all_allowed = jax.lax.map(one_query_block, jnp.arange(num_q_blocks))
    # lax.map stacks along a new leading axis: (NQ, B, H, NK) -> (B, H, NQ, NK).
    return (
        jnp.moveaxis(any_allowed, 0, 2),
        jnp.moveaxis(all_allowed, 0, 2),
    )


def block_sparsity_from_mask(
    mask: AttentionMask, *, seq_q: int, seq_kv: int, block_q: int, block_kv: int
) -> Int8[Array, "#B #H NQ NK"]:
    """Block classes (see :func:`block_sparsity`) of a dense boolean mask."""
    mask = jnp.asarray(mask, bool)
    num_q_blocks = -(-seq_q // block_q)
    num_kv_blocks = -(-seq_kv // block_kv)
    lead = mask.shape[:2]
    full_shape = (*lead, seq_q, seq_kv)
    mask = jnp.broadcast_to(mask, full_shape)
    pad = ((0, 0), (0, 0), (0, num_q_blocks * block_q - seq_q), (0, num_kv_blocks * block_kv - seq_kv))
    padded_false = jnp.pad(mask, pad, constant_values=False)
    padded_true = jnp.pad(mask, pad, constant_values=True)
    tiles_shape = (*lead, num_q_blocks, block_q, num_kv_blocks, block_kv)
    any_allowed = jnp.any(padded_false.reshape(tiles_shape), axis=(3, 5))
    all_allowed = jnp.all(padded_true.reshape(tiles_shape), axis=(3, 5))
    classes = jnp.where(all_allowed, BLOCK_FULL, jnp.where(any_allowed, BLOCK_PARTIAL, BLOCK_EMPTY))
    return jnp.asarray(classes, jnp.int8)

