"""Mask mods: which (query, key) pairs may attend, and how whole blocks of pairs classify.

Each built-in mask mod is a frozen dataclass registered as a JAX pytree and implements
:class:`BlockOverlapMask`, so block-sparse kernels classify a tile from its index ranges alone.
"""

import dataclasses
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from .._checks import positive_int
from .._typing import MaskMod, ScoreIndex
from .offsets import Offset, offset_for


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class OffsetMask:
    """A mask mod seen from shifted positions: ``q_idx + q_offset[b]``, ``kv_idx + kv_offset[b]``.

    Offsets are ints or (batch,) arrays; a KV cache uses them to give absolute positions.
    """

    mask_mod: MaskMod
    q_offset: Offset = 0
    kv_offset: Offset = 0

    def __call__(
        self, b_idx: ScoreIndex, h_idx: ScoreIndex, q_idx: ScoreIndex, kv_idx: ScoreIndex, /
    ) -> Bool[Array, "*#tile"]:
        q_pos = q_idx + offset_for(self.q_offset, b_idx)
        kv_pos = kv_idx + offset_for(self.kv_offset, b_idx)
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
        q_shift = offset_for(self.q_offset, b_idx)
        kv_shift = offset_for(self.kv_offset, b_idx)
        return self.mask_mod.block_overlap(
            b_idx, h_idx, q_lo + q_shift, q_hi + q_shift, kv_lo + kv_shift, kv_hi + kv_shift
        )
