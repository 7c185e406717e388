"""Score mods turned into kernel code: the closures a tile applies and the arrays they need.

At trace time (:func:`build_plan`) the score mod is split into its mask part and its value
part; built-in mods become closures over a :class:`~.tiles.Tile` (absolute indices, program
scalars), and the arrays they hold (document ids, prefix lengths, array offsets, an additive
bias) become kernel *operands* with their own BlockSpecs. The custom_vjp passes the mod's
arrays apart from its static structure (:func:`partition`, :class:`StaticMod`).
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..._mods import (
    AdditiveBiasMod,
    AlibiMod,
    AndMask,
    BoxMask,
    CausalMask,
    DocumentMask,
    MaskScoreMod,
    OffsetMask,
    OffsetScoreMod,
    PrefixLMMask,
    SlidingWindowMask,
    SoftcapMod,
    ValueChain,
    split_score_mod,
)
from ..._typing import MaskMod
from .config import NAME
from .tiles import Tile

__all__ = [
    "Plan",
    "StaticMod",
    "build_plan",
    "kernel_can_tile",
    "partition",
]


@dataclasses.dataclass(frozen=True)
class StaticMod:
    """The non-array part of a score-mod pytree (treedef and static leaves), hashable."""

    treedef: Any
    static_leaves: tuple[Any, ...]  # None where the leaf is an array (passed dynamically)

    def rebuild(self, arrays: Sequence[jax.Array]) -> Any:
        it = iter(arrays)
        leaves = [next(it) if s is None else s for s in self.static_leaves]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def partition(tree: Any) -> tuple[tuple[jax.Array, ...], StaticMod]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    arrays = tuple(jnp.asarray(x) for x in leaves if is_array(x))
    static = tuple(None if is_array(x) else x for x in leaves)
    return arrays, StaticMod(treedef, static)



@dataclasses.dataclass(frozen=True)
class Offset:
    """An accumulated position shift: an int plus per-batch array slots (and their arrays)."""

    const: int = 0
    slots: tuple[int, ...] = ()
    arrays: tuple[jax.Array, ...] = ()

    @property
    def is_zero(self) -> bool:
        return self.const == 0 and not self.slots

    def value(self, tile: Tile) -> Any:
        total: Any = self.const
        for slot in self.slots:
            total = total + tile.scalar(slot)
        return total

    def per_batch(self, batch: int) -> jax.Array:
        total = jnp.full((batch,), self.const, jnp.int32)
        for array in self.arrays:
            total = total + array
        return total


class Builder:
    """Turns built-in mods into kernel-side closures plus the arrays they need as operands."""

    def __init__(self, *, batch: int, padded_q: int, padded_kv: int) -> None:
        self.batch = batch
        self.padded_q = padded_q
        self.padded_kv = padded_kv
        self.operands: list[jax.Array] = []
        self.bias_slots: list[int] = []
        self.bias_leaves: list[jax.Array] = []

    def _add(self, array: jax.Array) -> int:
        self.operands.append(array)
        return len(self.operands) - 1

    def add_batch_scalar(self, values: Any) -> int:
        values = jnp.asarray(values, jnp.int32)
        values = jnp.broadcast_to(values, (self.batch,)) if values.ndim <= 1 else values
        if values.shape != (self.batch,):
            raise ValueError(
                f"{NAME}: a per-batch mod array has shape {values.shape}; expected "
                f"({self.batch},) or a scalar."
            )
        return self._add(values.reshape(self.batch, 1))

    def shift(self, offset: Offset, extra: Any) -> Offset:
        if isinstance(extra, (int, np.integer)) and not isinstance(extra, bool):
            return dataclasses.replace(offset, const=offset.const + int(extra))
        array = jnp.asarray(extra, jnp.int32)
        array = jnp.broadcast_to(array, (self.batch,)) if array.ndim == 0 else array
        slot = self.add_batch_scalar(array)
        return Offset(offset.const, (*offset.slots, slot), (*offset.arrays, array))

    def add_row(self, ids: jax.Array, offset: Offset, padded: int, fill: int) -> int:
        """(batch, padded) ids as seen from shifted positions (jnp indexing semantics)."""
        ids = jnp.asarray(ids).astype(jnp.int32)
        length = ids.shape[1]
        if not offset.is_zero:
            pos = jnp.arange(length)[None, :] + offset.per_batch(ids.shape[0])[:, None]
            pos = jnp.where(pos < 0, pos + length, pos)
            ids = jnp.take_along_axis(ids, jnp.clip(pos, 0, length - 1), axis=1)
        ids = jnp.pad(ids, ((0, 0), (0, padded - length)), constant_values=fill)
        return self._add(ids)

    def add_plane(self, plane: jax.Array, seq_q: int, seq_kv: int) -> int:
        """A rank-4 (#B, #H, #T, #S) array padded on its non-broadcast sequence axes."""
        pad_q = self.padded_q - seq_q if plane.shape[2] > 1 else 0
        pad_kv = self.padded_kv - seq_kv if plane.shape[3] > 1 else 0
        if pad_q or pad_kv:
            plane = jnp.pad(plane, ((0, 0), (0, 0), (0, pad_q), (0, pad_kv)))
        return self._add(plane)

    # ------------------------------------------------------------------ masks

    def mask(
        self, mod: Any, q_off: Offset, kv_off: Offset, seq_q: int, seq_kv: int
    ) -> Callable[[Tile], Any]:
        if isinstance(mod, (CausalMask, SlidingWindowMask)):
            return lambda t: mod(t.b, t.h, t.q_idx + q_off.value(t), t.kv_idx + kv_off.value(t))
        if isinstance(mod, PrefixLMMask):
            prefix = self.add_batch_scalar(mod.prefix_lengths)

            def prefix_mask(t: Tile) -> Any:
                q_pos = t.q_idx + q_off.value(t)
                kv_pos = t.kv_idx + kv_off.value(t)
                return (kv_pos < t.scalar(prefix)) | (q_pos >= kv_pos)

            return prefix_mask
        if isinstance(mod, BoxMask):
            bounds = [
                self.add_batch_scalar(bound)
                for bound in (mod.q_start, mod.q_stop, mod.kv_start, mod.kv_stop)
            ]

            def box_mask(t: Tile) -> Any:
                q_pos = t.q_idx + q_off.value(t)
                kv_pos = t.kv_idx + kv_off.value(t)
                q_start, q_stop, kv_start, kv_stop = (t.scalar(slot) for slot in bounds)
                rows = (q_pos >= q_start) & (q_pos < q_stop)
                return rows & (kv_pos >= kv_start) & (kv_pos < kv_stop)

            return box_mask
        if isinstance(mod, DocumentMask):
            q_ids = self.add_row(mod.query_document_ids, q_off, self.padded_q, -1)
            kv_ids = self.add_row(mod.kv_document_ids, kv_off, self.padded_kv, -2)
            return lambda t: t.q_row(q_ids) == t.kv_row(kv_ids)
        if isinstance(mod, AndMask):
            parts = [self.mask(m, q_off, kv_off, seq_q, seq_kv) for m in mod.mask_mods]

            def and_mask(t: Tile) -> Any:
                allowed = parts[0](t)
                for part in parts[1:]:
                    allowed = allowed & part(t)
                return allowed

            return and_mask
        if isinstance(mod, OffsetMask):
            return self.mask(
                mod.mask_mod,
                self.shift(q_off, mod.q_offset),
                self.shift(kv_off, mod.kv_offset),
                seq_q,
                seq_kv,
            )
        reject_array_holder(mod, "mask mod")
        return lambda t: mod(t.b, t.h, t.q_idx + q_off.value(t), t.kv_idx + kv_off.value(t))

    # ------------------------------------------------------------------ value mods

    def value(
        self, mod: Any, q_off: Offset, kv_off: Offset, seq_q: int, seq_kv: int
    ) -> Callable[[Any, Tile, Sequence[Any]], Any]:
        """A closure ``(scores, tile, bias_tiles) -> scores``; bias tiles come in slot order."""
        if isinstance(mod, (AlibiMod, SoftcapMod)):
            return lambda s, t, biases: mod(
                s, t.b, t.h, t.q_idx + q_off.value(t), t.kv_idx + kv_off.value(t)
            )
        if isinstance(mod, AdditiveBiasMod):
            if not (q_off.is_zero and kv_off.is_zero):
                raise NotImplementedError(
                    f"{NAME}: an AdditiveBiasMod under shifted positions (OffsetScoreMod) is not "
                    "supported in the Pallas kernel; use memory_efficient_attention."
                )
            bias = jnp.asarray(mod.bias)
            position = len(self.bias_slots)
            self.bias_slots.append(self.add_plane(bias, seq_q, seq_kv))
            self.bias_leaves.append(mod.bias)
            return lambda s, t, biases: s + biases[position]
        if isinstance(mod, ValueChain):
            parts = [self.value(m, q_off, kv_off, seq_q, seq_kv) for m in mod.score_mods]

            def chain(s: Any, t: Tile, biases: Sequence[Any]) -> Any:
                for part in parts:
                    s = part(s, t, biases)
                return s

            return chain
        if isinstance(mod, OffsetScoreMod):
            return self.value(
                mod.score_mod,
                self.shift(q_off, mod.q_offset),
                self.shift(kv_off, mod.kv_offset),
                seq_q,
                seq_kv,
            )
        if isinstance(mod, MaskScoreMod):  # only reachable through a user's own nesting
            inner = self.mask(mod.mask_mod, q_off, kv_off, seq_q, seq_kv)
            return lambda s, t, biases: jnp.where(inner(t), s, -jnp.inf)
        reject_array_holder(mod, "score mod")
        return lambda s, t, biases: mod(
            s, t.b, t.h, t.q_idx + q_off.value(t), t.kv_idx + kv_off.value(t)
        )


def reject_array_holder(mod: Any, what: str) -> None:
    """A pytree mod with array leaves we do not know how to tile cannot enter a Pallas kernel."""
    if any(is_array(leaf) for leaf in jax.tree_util.tree_leaves(mod)):
        raise NotImplementedError(
            f"{NAME}: the {what} {type(mod).__name__} holds arrays, which a Pallas kernel cannot "
            "capture; supported array-holding mods are DocumentMask, PrefixLMMask, "
            "AdditiveBiasMod and OffsetMask/OffsetScoreMod offsets. Use "
            "memory_efficient_attention for this mod."
        )


def kernel_can_tile(score_mod: Any) -> bool:
    """Whether the kernels serve ``score_mod`` from built-in mods alone (no user callable).

    A plain callable may close over arrays, which Pallas refuses only once it traces the
    kernel; callers that must not fail (memory_efficient_attention's automatic GPU path) take
    the kernel only when this holds.
    """
    mask_mod, value_mod = split_score_mod(score_mod)
    return builtin_mask(mask_mod) and builtin_value(value_mod, shifted=False)


def builtin_mask(mod: Any) -> bool:
    if mod is None or isinstance(
        mod, (CausalMask, SlidingWindowMask, PrefixLMMask, DocumentMask, BoxMask)
    ):
        return True
    if isinstance(mod, AndMask):
        return all(builtin_mask(part) for part in mod.mask_mods)
    if isinstance(mod, OffsetMask):
        return builtin_mask(mod.mask_mod)
    return False


def builtin_value(mod: Any, *, shifted: bool) -> bool:
    if mod is None or isinstance(mod, (AlibiMod, SoftcapMod)):
        return True
    if isinstance(mod, AdditiveBiasMod):
        return not shifted  # Builder.value refuses a shifted bias
    if isinstance(mod, ValueChain):
        return all(builtin_value(part, shifted=shifted) for part in mod.score_mods)
    if isinstance(mod, OffsetScoreMod):
        return builtin_value(mod.score_mod, shifted=True)
    if isinstance(mod, MaskScoreMod):
        return builtin_mask(mod.mask_mod)
    return False


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the kernels need, built at trace time from the mods and the dense mask."""

    mask_fn: Callable[[Tile], Any] | None
    value_fn: Callable[[Any, Tile, Sequence[Any]], Any] | None
    dense_mask_slot: int | None
    bias_slots: tuple[int, ...]
    bias_leaves: tuple[jax.Array, ...]
    operands: tuple[jax.Array, ...]
    mask_mod: MaskMod | None
    dense_mask: jax.Array | None
    seq_kv: int
    padded_kv: int

    def load_biases(self, tile: Tile) -> tuple[Any, ...]:
        return tuple(
            jnp.broadcast_to(tile.plane(slot).astype(jnp.float32), tile.shape)
            for slot in self.bias_slots
        )

    def modded(self, raw: Any, tile: Tile, biases: Sequence[Any]) -> Any:
        """Natural-unit scores after the value mod (float32)."""
        if self.value_fn is None:
            return raw
        return jnp.asarray(self.value_fn(raw, tile, biases)).astype(jnp.float32)

    def allowed(self, tile: Tile) -> Any:
        """The element-wise mask of a partial block (None if nothing masks)."""
        allowed: Any = None
        if self.mask_fn is not None:
            allowed = jnp.asarray(self.mask_fn(tile))
        if self.dense_mask_slot is not None:
            dense = tile.plane(self.dense_mask_slot) != 0
            allowed = dense if allowed is None else allowed & dense
        if self.padded_kv != self.seq_kv:
            real = tile.kv_idx < self.seq_kv
            allowed = real if allowed is None else allowed & real
        return allowed


def build_plan(
    mask: jax.Array | None,
    score_mod: Any,
    *,
    batch: int,
    seq_q: int,
    seq_kv: int,
    padded_q: int,
    padded_kv: int,
) -> Plan:
    mask_mod, value_mod = split_score_mod(score_mod)
    builder = Builder(batch=batch, padded_q=padded_q, padded_kv=padded_kv)
    zero = Offset()
    mask_fn = None if mask_mod is None else builder.mask(mask_mod, zero, zero, seq_q, seq_kv)
    value_fn = None if value_mod is None else builder.value(value_mod, zero, zero, seq_q, seq_kv)
    dense_slot = None
    if mask is not None:
        dense_slot = builder.add_plane(mask.astype(jnp.int8), seq_q, seq_kv)
    return Plan(
        mask_fn=mask_fn,
        value_fn=value_fn,
        dense_mask_slot=dense_slot,
        bias_slots=tuple(builder.bias_slots),
        bias_leaves=tuple(builder.bias_leaves),
        operands=tuple(builder.operands),
        mask_mod=mask_mod,
        dense_mask=mask,
        seq_kv=seq_kv,
        padded_kv=padded_kv,
    )


