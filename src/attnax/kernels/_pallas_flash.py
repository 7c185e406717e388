"""FlashAttention-2 in Pallas (Triton lowering on GPU): score mods in the inner loop, block-sparse.

Structure (kept open to a second, Mosaic-GPU lowering; see ``benchmarks/NOTES.md``):

* **XLA side** (:func:`_prepare`): pad T/S to whole blocks (and head_dim to a power of two),
  split the score mod into its mask part and its value part, compute the block classes
  (empty / partial / full, :func:`attnax._mods.block_sparsity`) and turn them into per-row
  *block lists*: for each (batch, head, query block) the indices of its partial key blocks
  first, then its full ones, and the two counts. Mods that hold arrays (document ids, prefix
  lengths, array offsets, an additive bias) become kernel *operands* with their own BlockSpecs.
* **Kernel side**: a program owns one (query block, batch, head); it walks the partial blocks
  with the mask evaluated and then the full blocks without it, so empty blocks are never
  loaded. The value mod is traced into the loop with absolute indices (``b``, ``h`` scalars
  from the program ids, ``q_idx`` (bq, 1), ``kv_idx`` (1, bk)); softmax runs online in float32
  in base 2 (scores are multiplied by log2(e) after the mod, so mods see natural-unit scores).
* **Stepped forward** (``FlashConfig.key_step_blocks``, memory_efficient_attention's GPU path):
  an XLA ``lax.scan`` over steps of a few key blocks; each step's block lists hold only its
  own blocks, and the kernel reads and writes the float32 running state (accumulator, maximum,
  denominator) in aliased HBM buffers instead of keeping it in registers for the whole walk.
* **Mosaic-GPU forward** (``_pallas_flash_mgpu``): full attention on a Hopper GPU (no mask,
  mod or operand; 2-byte inputs; whole tiles) takes a warp-specialised wgmma kernel in place of
  the Triton forward (:func:`mosaic_forward_applies`); it returns the same (out, lse2), so
  either backward reads it.
* **Mosaic-GPU backward** (``_pallas_flash_mgpu_vjp``): where the Mosaic-GPU forward runs, its
  dK/dV and dQ kernels (warp-specialised pipelines, wgmma) replace the Triton ones below
  (``_pallas_flash_vjp.mosaic_backward_applies``).
* **Backward** (``_pallas_flash_vjp``): a dK/dV kernel per key block (looping over the query
  heads of its GQA group and their query blocks) and a dQ kernel per query block, recomputing
  probabilities from the saved log-sum-exp; the value mod is differentiated inside the kernel
  with :func:`jax.vjp`, which also yields the gradient of an additive bias tile.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .._checks import shape_checked
from .._mods import (
    BLOCK_EMPTY,
    BLOCK_FULL,
    BLOCK_PARTIAL,
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
    block_sparsity,
    block_sparsity_from_mask,
    split_score_mod,
)
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
    check_dropout,
    check_mask,
    check_qkv,
    default_scale,
    kernel_outputs,
    vary_like,
    varying_axes,
)
from ._pallas_flash_mgpu import MOSAIC_ROWS, hopper_gpu, mosaic_forward, mosaic_gpu_available

__all__ = [
    "FAST_FORWARD_BLOCK_KV",
    "FlashConfig",
    "default_config",
    "pallas_flash_attention",
    "stepped_config",
]

_NAME = "pallas_flash_attention"
_LOG2E = math.log2(math.e)
# The forward key tile our own callers pass (MultiHeadAttention, FLASH's Pallas path): at
# head_dim <= 128 on an H100, 64 ran every masked config's forward 5-16% faster than the
# signature's 128 (benchmarks/NOTES.md, "Tenth session", call 5). Full attention takes the
# Mosaic-GPU kernel there whatever the tile; head_dim 256 halves the tiles anyway.
FAST_FORWARD_BLOCK_KV = 64


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Tile sizes and Triton launch parameters of the three kernels (hashable: a jit static).

    Block sizes are powers of two >= 16; they are shrunk to the (padded) sequence length for
    short sequences. ``num_warps`` ``None`` picks 8 for head_dim > 64 with forward tiles above
    128 x 64, and 4 otherwise.
    """

    block_q: int = 128
    block_kv: int = 128
    # Backward defaults from the H100 sweep (benchmarks/NOTES.md): 64x64 tiles with 4 warps
    # ran B4 S4096 causal forward+backward in 3.26 ms against 6.68 ms for 64x128 / 128x64
    # with 8 warps (register pressure of two (bk, D) float32 accumulators).
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    block_q_dq: int = 64
    block_kv_dq: int = 64
    num_warps: int | None = None
    num_stages: int = 2
    # The forward's stages where rows keep block lists (documents, custom masks) on 2-byte
    # inputs at head_dim padded to 128 without plane operands (``deep_list_pipeline``);
    # None: ``num_stages`` everywhere. On an H100 three stages took 6% off the 4-document
    # forward and cost 8-12% on full and causal attention (block ranges), which keep two
    # (NOTES, "Eighth session").
    num_stages_listed: int | None = 3
    # The same for both backward kernels (``_pallas_flash_vjp.backward_stages``; None: their
    # configured stages): -2.2% and -2.8% on the documents' forward+backward in an
    # interleaved A/B on an H100.
    num_stages_bwd_listed: int | None = 3
    num_warps_bwd: int | None = 4
    num_stages_bwd: int = 2
    # The dQ kernel's own launch parameters; None: the dK/dV kernel's (the two above). Its one
    # (block_q_dq, D) float32 accumulator leaves more registers than dK/dV's two.
    num_warps_dq: int | None = None
    num_stages_dq: int | None = None
    # Interval masks (block ranges), bf16/fp16, no bias operand, head_dim padded to 128, query
    # padding a multiple of 128: the dQ kernel takes 128-row query tiles with 8 warps and 3
    # stages (FlexAttention's H100 dQ choice) in place of block_q_dq and the launch parameters
    # above (``_pallas_flash_vjp.dq_launch``). On an H100 (NOTES, "backward sweep 3") that
    # took 3% off full attention's forward+backward; documents (block lists) lost 2.7% with it
    # and keep 64-row tiles.
    wide_dq: bool = True
    # The dK/dV kernel's score tiles as (keys, queries): no register tile is transposed before
    # its two matmuls (False: the (queries, keys) form, kept to measure against).
    transposed_dkv: bool = True
    interpret: bool = False
    # 0: one kernel walks every key block of a query block with its softmax state in
    # registers (PALLAS_FLASH). n > 0: an XLA scan over steps of n key blocks, one kernel per
    # step, with the float32 state (accumulator, maximum, denominator) in HBM between steps
    # (memory_efficient_attention's GPU path: the tile is fused, the loop over key blocks is
    # XLA's). The backward is the same either way.
    key_step_blocks: int = 0
    # Full attention (no mask, no score mod, no bias) on a Hopper GPU with 2-byte inputs at
    # head_dim 64/128 and lengths in whole tiles: the forward runs the Mosaic-GPU kernel
    # (``_pallas_flash_mgpu``; warp-specialised, wgmma) instead of the Triton one
    # (``mosaic_forward_applies``). False: Triton everywhere, to measure against.
    mosaic_forward: bool = True
    # Its key tile and K/V pipeline slots (the query tile is fixed at 2 x 64 rows).
    mosaic_block_kv: int = 128
    mosaic_stages: int = 2
    # Where the Mosaic-GPU forward applies, both backward kernels in Mosaic GPU too
    # (``_pallas_flash_mgpu_vjp``): -10% and -14% on full attention's forward+backward against
    # the Triton backward (B4 S4096, B1 S16384; NOTES, "Tenth session"). False: Triton.
    mosaic_backward: bool = True
    # Its tiles and pipeline slots. The dK/dV kernel owns 2 x 64 keys and streams query tiles
    # of ``mosaic_dkv_block_q`` rows (Q, dO, lse, delta); the dQ kernel owns 2 x 64 queries
    # and streams key tiles of ``mosaic_dq_block_kv`` rows (K, V). On an H100 128-key dQ
    # tiles took 4-6% off the forward+backward; 128-query dK/dV tiles were no better (+2.5%
    # at B4 S4096), nor were three dK/dV slots (within 1%).
    mosaic_dkv_block_q: int = 64
    mosaic_dq_block_kv: int = 128
    mosaic_dkv_stages: int = 2
    mosaic_dq_stages: int = 2

    def __post_init__(self) -> None:
        steps = self.key_step_blocks
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{_NAME}: `key_step_blocks` must be an int >= 0, got {steps!r}.")
        for name in ("mosaic_stages", "mosaic_dkv_stages", "mosaic_dq_stages"):
            stages = getattr(self, name)
            if isinstance(stages, bool) or not isinstance(stages, int) or stages < 2:
                # One slot would make the producer wait for a step to finish before loading
                # the next: no pipeline (JAX's Mosaic-GPU example requires two as well).
                raise ValueError(f"{_NAME}: `{name}` must be an int >= 2, got {stages!r}.")
        for name in ("mosaic_dkv_block_q", "mosaic_dq_block_kv"):
            if getattr(self, name) not in (64, 128):
                # Either divides the whole 128-row tiles its selection requires of both
                # sequences (``mosaic_backward_applies``).
                raise ValueError(
                    f"{_NAME}: `{name}` must be 64 or 128, got {getattr(self, name)!r}."
                )
        if isinstance(self.mosaic_block_kv, int) and self.mosaic_block_kv % 64:
            raise ValueError(
                f"{_NAME}: `mosaic_block_kv` must be a multiple of 64 (the Mosaic-GPU forward's "
                f"shared-memory tiles are 64 wide), got {self.mosaic_block_kv}."
            )
        for name in (
            "block_q",
            "block_kv",
            "block_q_dkv",
            "block_kv_dkv",
            "block_q_dq",
            "block_kv_dq",
            "mosaic_block_kv",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 16:
                raise ValueError(f"{_NAME}: `{name}` must be an int >= 16, got {value!r}.")
            if value & (value - 1):
                raise ValueError(
                    f"{_NAME}: `{name}` must be a power of two (Triton tiles), got {value}."
                )


def default_config(head_dim: int, block_q: int, block_kv: int, interpret: bool) -> FlashConfig:
    """The public entry's configuration: forward tiles from the caller, backward from the sweep.

    head_dim 256 halves the tiles (and pipelines less): a 128 x 256 bf16 tile is 64 KiB, and
    the forward's q, k and v tiles at two stages would overflow the H100's 227 KiB of shared
    memory.
    """
    if head_dim > 128:
        return FlashConfig(
            block_q=min(block_q, 64),
            block_kv=min(block_kv, 64),
            block_q_dkv=32,
            block_kv_dkv=64,
            block_q_dq=64,
            block_kv_dq=32,
            num_warps=8,
            num_stages=2,
            num_warps_bwd=4,
            num_stages_bwd=1,
            interpret=interpret,
        )
    return FlashConfig(block_q=block_q, block_kv=block_kv, interpret=interpret)


def stepped_config(
    head_dim: int,
    seq_kv: int,
    block_size: int,
    *,
    interpret: bool = False,
    block_q: int = 128,
    block_kv: int = 128,
) -> FlashConfig:
    """memory_efficient_attention's GPU configuration: steps of ``block_size`` keys.

    The kernel tiles are PALLAS_FLASH's; a step holds ``block_size // tile`` key tiles (at
    least one), so ``block_size`` keeps its meaning, the keys one XLA loop iteration visits.
    """
    config = default_config(head_dim, block_q, block_kv, interpret)
    tile = _fit(config.block_kv, seq_kv)
    return dataclasses.replace(config, key_step_blocks=max(1, block_size // tile))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _fit(block: int, length: int) -> int:
    """The tile actually used: ``block`` unless the sequence is shorter (never below 16)."""
    return min(block, max(16, _next_pow2(length)))


def _compiler_params(
    num_warps: int | None, num_stages: int, head_dim: int, tile: int = 128 * 128
) -> Any:
    # Unset warps: 8 for head_dim > 64 on tiles above 128 x 64; 4 otherwise. On the H100 a
    # 128 x 64 forward tile at head_dim 128 ran 1.28 ms with 4 warps against 1.76 with 8
    # (B4 S4096 full; benchmarks/NOTES.md).
    if num_warps is not None:
        warps = num_warps
    else:
        warps = 4 if head_dim <= 64 or tile <= 128 * 64 else 8
    return plgpu.CompilerParams(num_warps=warps, num_stages=num_stages)


# --------------------------------------------------------------------------- partitioned mods


@dataclasses.dataclass(frozen=True)
class _StaticMod:
    """The non-array part of a score-mod pytree (treedef and static leaves), hashable."""

    treedef: Any
    static_leaves: tuple[Any, ...]  # None where the leaf is an array (passed dynamically)

    def rebuild(self, arrays: Sequence[jax.Array]) -> Any:
        it = iter(arrays)
        leaves = [next(it) if s is None else s for s in self.static_leaves]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _partition(tree: Any) -> tuple[tuple[jax.Array, ...], _StaticMod]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    arrays = tuple(jnp.asarray(x) for x in leaves if _is_array(x))
    static = tuple(None if _is_array(x) else x for x in leaves)
    return arrays, _StaticMod(treedef, static)


# --------------------------------------------------------------------------- kernel operands


class _Tile:
    """What the traced mods see inside a kernel: program scalars, tile indices, operand refs.

    A tile is (queries, keys), or (keys, queries) when ``transposed`` (the dK/dV kernel's
    scores, so that no register tile is transposed before its matmuls). The mods are
    element-wise over broadcast index arrays, so they trace the same either way; only the
    index arrays and the operand tiles here know the orientation.
    """

    def __init__(
        self,
        *,
        refs: Sequence[Any],
        b: Any,
        h: Any,
        q_start: Any,
        kv_start: Any,
        block_q: int,
        block_kv: int,
        transposed: bool = False,
    ) -> None:
        self.refs = refs
        self.b = b
        self.h = h
        self.q_start = q_start
        self.kv_start = kv_start
        self.block_q = block_q
        self.block_kv = block_kv
        self.transposed = transposed
        q_axis = 1 if transposed else 0
        self.q_idx = q_start + jax.lax.broadcasted_iota(
            jnp.int32, self._oriented(block_q, 1), q_axis
        )
        self.kv_idx = kv_start + jax.lax.broadcasted_iota(
            jnp.int32, self._oriented(1, block_kv), 1 - q_axis
        )

    def _oriented(self, rows: int, cols: int) -> tuple[int, int]:
        # A (query, key) shape in this tile's orientation.
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def shape(self) -> tuple[int, int]:
        return self._oriented(self.block_q, self.block_kv)

    def scalar(self, slot: int) -> Any:
        return self.refs[slot][0]

    def q_row(self, slot: int) -> Any:
        row = self.refs[slot][pl.ds(self.q_start, self.block_q)]
        return row[None, :] if self.transposed else row[:, None]

    def kv_row(self, slot: int) -> Any:
        row = self.refs[slot][pl.ds(self.kv_start, self.block_kv)]
        return row[:, None] if self.transposed else row[None, :]

    def plane(self, slot: int) -> Any:
        """A (bq | 1, bk | 1) tile of a (#H, Tp | 1, Sp | 1) plane (bias or dense mask), in
        this tile's orientation."""
        ref = self.refs[slot]
        num_h, len_q, len_kv = ref.shape
        h = self.h if num_h > 1 else 0
        rows = pl.ds(self.q_start, self.block_q) if len_q > 1 else pl.ds(0, 1)
        cols = pl.ds(self.kv_start, self.block_kv) if len_kv > 1 else pl.ds(0, 1)
        block = ref[h, rows, cols]
        return block.T if self.transposed else block


@dataclasses.dataclass(frozen=True)
class _Offset:
    """An accumulated position shift: an int plus per-batch array slots (and their arrays)."""

    const: int = 0
    slots: tuple[int, ...] = ()
    arrays: tuple[jax.Array, ...] = ()

    @property
    def is_zero(self) -> bool:
        return self.const == 0 and not self.slots

    def value(self, tile: _Tile) -> Any:
        total: Any = self.const
        for slot in self.slots:
            total = total + tile.scalar(slot)
        return total

    def per_batch(self, batch: int) -> jax.Array:
        total = jnp.full((batch,), self.const, jnp.int32)
        for array in self.arrays:
            total = total + array
        return total


class _Builder:
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
                f"{_NAME}: a per-batch mod array has shape {values.shape}; expected "
                f"({self.batch},) or a scalar."
            )
        return self._add(values.reshape(self.batch, 1))

    def shift(self, offset: _Offset, extra: Any) -> _Offset:
        if isinstance(extra, (int, np.integer)) and not isinstance(extra, bool):
            return dataclasses.replace(offset, const=offset.const + int(extra))
        array = jnp.asarray(extra, jnp.int32)
        array = jnp.broadcast_to(array, (self.batch,)) if array.ndim == 0 else array
        slot = self.add_batch_scalar(array)
        return _Offset(offset.const, (*offset.slots, slot), (*offset.arrays, array))

    def add_row(self, ids: jax.Array, offset: _Offset, padded: int, fill: int) -> int:
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
        self, mod: Any, q_off: _Offset, kv_off: _Offset, seq_q: int, seq_kv: int
    ) -> Callable[[_Tile], Any]:
        if isinstance(mod, (CausalMask, SlidingWindowMask)):
            return lambda t: mod(t.b, t.h, t.q_idx + q_off.value(t), t.kv_idx + kv_off.value(t))
        if isinstance(mod, PrefixLMMask):
            prefix = self.add_batch_scalar(mod.prefix_lengths)

            def prefix_mask(t: _Tile) -> Any:
                q_pos = t.q_idx + q_off.value(t)
                kv_pos = t.kv_idx + kv_off.value(t)
                return (kv_pos < t.scalar(prefix)) | (q_pos >= kv_pos)

            return prefix_mask
        if isinstance(mod, BoxMask):
            bounds = [
                self.add_batch_scalar(bound)
                for bound in (mod.q_start, mod.q_stop, mod.kv_start, mod.kv_stop)
            ]

            def box_mask(t: _Tile) -> Any:
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

            def and_mask(t: _Tile) -> Any:
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
        _reject_array_holder(mod, "mask mod")
        return lambda t: mod(t.b, t.h, t.q_idx + q_off.value(t), t.kv_idx + kv_off.value(t))

    # ------------------------------------------------------------------ value mods

    def value(
        self, mod: Any, q_off: _Offset, kv_off: _Offset, seq_q: int, seq_kv: int
    ) -> Callable[[Any, _Tile, Sequence[Any]], Any]:
        """A closure ``(scores, tile, bias_tiles) -> scores``; bias tiles come in slot order."""
        if isinstance(mod, (AlibiMod, SoftcapMod)):
            return lambda s, t, biases: mod(
                s, t.b, t.h, t.q_idx + q_off.value(t), t.kv_idx + kv_off.value(t)
            )
        if isinstance(mod, AdditiveBiasMod):
            if not (q_off.is_zero and kv_off.is_zero):
                raise NotImplementedError(
                    f"{_NAME}: an AdditiveBiasMod under shifted positions (OffsetScoreMod) is not "
                    "supported in the Pallas kernel; use memory_efficient_attention."
                )
            bias = jnp.asarray(mod.bias)
            position = len(self.bias_slots)
            self.bias_slots.append(self.add_plane(bias, seq_q, seq_kv))
            self.bias_leaves.append(mod.bias)
            return lambda s, t, biases: s + biases[position]
        if isinstance(mod, ValueChain):
            parts = [self.value(m, q_off, kv_off, seq_q, seq_kv) for m in mod.score_mods]

            def chain(s: Any, t: _Tile, biases: Sequence[Any]) -> Any:
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
        _reject_array_holder(mod, "score mod")
        return lambda s, t, biases: mod(
            s, t.b, t.h, t.q_idx + q_off.value(t), t.kv_idx + kv_off.value(t)
        )


def _reject_array_holder(mod: Any, what: str) -> None:
    """A pytree mod with array leaves we do not know how to tile cannot enter a Pallas kernel."""
    if any(_is_array(leaf) for leaf in jax.tree_util.tree_leaves(mod)):
        raise NotImplementedError(
            f"{_NAME}: the {what} {type(mod).__name__} holds arrays, which a Pallas kernel cannot "
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
    return _builtin_mask(mask_mod) and _builtin_value(value_mod, shifted=False)


def _builtin_mask(mod: Any) -> bool:
    if mod is None or isinstance(
        mod, (CausalMask, SlidingWindowMask, PrefixLMMask, DocumentMask, BoxMask)
    ):
        return True
    if isinstance(mod, AndMask):
        return all(_builtin_mask(part) for part in mod.mask_mods)
    if isinstance(mod, OffsetMask):
        return _builtin_mask(mod.mask_mod)
    return False


def _builtin_value(mod: Any, *, shifted: bool) -> bool:
    if mod is None or isinstance(mod, (AlibiMod, SoftcapMod)):
        return True
    if isinstance(mod, AdditiveBiasMod):
        return not shifted  # _Builder.value refuses a shifted bias
    if isinstance(mod, ValueChain):
        return all(_builtin_value(part, shifted=shifted) for part in mod.score_mods)
    if isinstance(mod, OffsetScoreMod):
        return _builtin_value(mod.score_mod, shifted=True)
    if isinstance(mod, MaskScoreMod):
        return _builtin_mask(mod.mask_mod)
    return False


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything the kernels need, built at trace time from the mods and the dense mask."""

    mask_fn: Callable[[_Tile], Any] | None
    value_fn: Callable[[Any, _Tile, Sequence[Any]], Any] | None
    dense_mask_slot: int | None
    bias_slots: tuple[int, ...]
    bias_leaves: tuple[jax.Array, ...]
    operands: tuple[jax.Array, ...]
    mask_mod: MaskMod | None
    dense_mask: jax.Array | None
    seq_kv: int
    padded_kv: int

    def load_biases(self, tile: _Tile) -> tuple[Any, ...]:
        return tuple(
            jnp.broadcast_to(tile.plane(slot).astype(jnp.float32), tile.shape)
            for slot in self.bias_slots
        )

    def modded(self, raw: Any, tile: _Tile, biases: Sequence[Any]) -> Any:
        """Natural-unit scores after the value mod (float32)."""
        if self.value_fn is None:
            return raw
        return jnp.asarray(self.value_fn(raw, tile, biases)).astype(jnp.float32)

    def allowed(self, tile: _Tile) -> Any:
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


def _build_plan(
    mask: jax.Array | None,
    score_mod: Any,
    *,
    batch: int,
    seq_q: int,
    seq_kv: int,
    padded_q: int,
    padded_kv: int,
) -> _Plan:
    mask_mod, value_mod = split_score_mod(score_mod)
    builder = _Builder(batch=batch, padded_q=padded_q, padded_kv=padded_kv)
    zero = _Offset()
    mask_fn = None if mask_mod is None else builder.mask(mask_mod, zero, zero, seq_q, seq_kv)
    value_fn = None if value_mod is None else builder.value(value_mod, zero, zero, seq_q, seq_kv)
    dense_slot = None
    if mask is not None:
        dense_slot = builder.add_plane(mask.astype(jnp.int8), seq_q, seq_kv)
    return _Plan(
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


def _operand_specs(plan: _Plan) -> list[pl.BlockSpec]:
    """Operands are blocked on their batch axis only (every grid puts the batch at index 1)."""
    specs = []
    for array in plan.operands:
        rest = (0,) * (array.ndim - 1)
        if array.shape[0] > 1:
            index_map = lambda i, b, h, rest=rest: (b, *rest)
        else:
            index_map = lambda i, b, h, rest=rest: (0, *rest)
        specs.append(pl.BlockSpec((None, *array.shape[1:]), index_map))
    return specs


# --------------------------------------------------------------------------- block lists


def block_classes(
    plan: _Plan,
    *,
    batch: int,
    num_heads: int,
    seq_q: int,
    seq_kv: int,
    block_q: int,
    block_kv: int,
    num_q_blocks: int,
) -> jax.Array:
    """int8 (#B, #H, NQ, NK) classes of the mask mod, the dense mask and key padding.

    Classified on real positions; query blocks past ``seq_q`` (up to ``num_q_blocks``, the
    grid's extent) are empty, so padded query rows do no work.
    """
    num_q = -(-seq_q // block_q)
    num_kv = -(-seq_kv // block_kv)
    classes = jnp.full((1, 1, num_q, num_kv), BLOCK_FULL, jnp.int8)
    if plan.mask_mod is not None:
        from_mod = block_sparsity(
            plan.mask_mod,
            batch=batch,
            num_heads=num_heads,
            seq_q=seq_q,
            seq_kv=seq_kv,
            block_q=block_q,
            block_kv=block_kv,
        )
        classes = jnp.minimum(classes, from_mod)
    if plan.dense_mask is not None:
        from_mask = block_sparsity_from_mask(
            plan.dense_mask, seq_q=seq_q, seq_kv=seq_kv, block_q=block_q, block_kv=block_kv
        )
        classes = jnp.minimum(classes, from_mask)
    if seq_kv % block_kv:
        # The last key block holds padded keys: evaluate its mask so they stay excluded.
        last = (jnp.arange(num_kv) == num_kv - 1)[None, None, None, :]
        classes = jnp.where(last, jnp.minimum(classes, BLOCK_PARTIAL), classes)
    if num_q_blocks > num_q:
        classes = jnp.pad(classes, ((0, 0), (0, 0), (0, num_q_blocks - num_q), (0, 0)))
    return classes.astype(jnp.int8)


def block_lists(classes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row of blocks: indices (partial first, then full; padded to a power of two) and counts.

    Returns ``indices`` int32 (..., N_pow2) and ``counts`` int32 (..., 2) = (partial, full).
    """
    key = jnp.where(classes == BLOCK_PARTIAL, 0, jnp.where(classes == BLOCK_FULL, 1, 2))
    indices = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
    width = classes.shape[-1]
    indices = jnp.pad(indices, [(0, 0)] * (indices.ndim - 1) + [(0, _next_pow2(width) - width)])
    counts = jnp.stack(
        [
            jnp.sum(classes == BLOCK_PARTIAL, axis=-1, dtype=jnp.int32),
            jnp.sum(classes == BLOCK_FULL, axis=-1, dtype=jnp.int32),
        ],
        axis=-1,
    )
    return indices, counts


def block_ranges(classes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row of blocks whose allowed blocks are one interval with the full ones consecutive
    inside it (:func:`full_blocks_consecutive`): the bounds and the counts.

    Returns ``bounds`` int32 (..., 4) = (first allowed, first full, end of full, end allowed)
    and ``counts`` int32 (..., 2) = (partial, full): the partial blocks are
    ``[first allowed, first full)`` and ``[end of full, end allowed)``. Four numbers a row
    instead of :func:`block_lists`' sorted row: at two million tokens a list of 64-token
    blocks is 4 GiB of int32, plus the sort's temporaries, against 0.5 MiB here, and the
    reductions need no sort.
    """
    allowed = classes != BLOCK_EMPTY
    full = classes == BLOCK_FULL
    n_allowed = jnp.sum(allowed, axis=-1, dtype=jnp.int32)
    n_full = jnp.sum(full, axis=-1, dtype=jnp.int32)
    first = jnp.argmax(allowed, axis=-1).astype(jnp.int32)
    end = first + n_allowed
    # No full block: the whole interval is partial (first full = end of full = end allowed).
    first_full = jnp.where(n_full > 0, jnp.argmax(full, axis=-1).astype(jnp.int32), end)
    bounds = jnp.stack([first, first_full, first_full + n_full, end], axis=-1)
    return bounds, jnp.stack([n_allowed - n_full, n_full], axis=-1)


def row_blocks(classes: jax.Array, ranged: bool) -> tuple[jax.Array, jax.Array]:
    """The kernels' per-row table and counts: :func:`block_ranges` or :func:`block_lists`."""
    return block_ranges(classes) if ranged else block_lists(classes)


# --------------------------------------------------------------------------- shared math


def dot_nt(a: Any, b: Any, precision: Any) -> Any:
    """``a @ b.T`` accumulated in float32."""
    return jax.lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def dot_nn(a: Any, b: Any, precision: Any) -> Any:
    """``a @ b`` accumulated in float32."""
    return jax.lax.dot_general(
        a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def dot_tn(a: Any, b: Any, precision: Any) -> Any:
    """``a.T @ b`` accumulated in float32."""
    return jax.lax.dot_general(
        a, b, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def matmul_precision(dtype: Any) -> Any:
    """Full float32 products for float32 inputs (IEEE in Triton), the default for half types."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# --------------------------------------------------------------------------- forward kernel


@dataclasses.dataclass(frozen=True)
class _Static:
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


# Read at trace time: interval masks take block ranges (block_ranges). benchmarks/pallas_flash.py
# turns it off (--indexed-full) to time every mask with block lists.
BLOCK_RANGES = True


def _interval_mask(mask_mod: Any) -> bool:
    """Whether the mask lets each query see one interval of keys that moves with the query
    (and each key be seen by one interval of queries).

    A prefix-LM row sees ``[0, max(prefix, q + 1))`` and a key ``k`` is seen from ``k`` on (from
    0 inside the prefix); a box row sees its key range or nothing, in one run of rows.
    """
    interval_types = (CausalMask, SlidingWindowMask, BoxMask, PrefixLMMask)
    if mask_mod is None or isinstance(mask_mod, interval_types):
        return True
    if isinstance(mask_mod, AndMask):
        return all(_interval_mask(part) for part in mask_mod.mask_mods)
    return False


def _range_block(bound_at: Callable[[Any], Any], n_partial: Any) -> Callable[[Any, bool], Any]:
    """``block(j, masked)`` of a row given by its four bounds (:func:`block_ranges`):
    arithmetic, no index load per block."""
    first, first_full, end_full = bound_at(0), bound_at(1), bound_at(2)
    left = first_full - first  # partial blocks before the full ones

    def block(j: Any, masked: bool) -> Any:
        if masked:
            return jnp.where(j < left, first + j, end_full + (j - left))
        return first_full + (j - n_partial)

    return block


def walk_row(
    step: Callable[[Any, Any, bool], Any],
    carry: Any,
    *,
    index_at: Callable[[Any], Any],
    count_at: Callable[[Any], Any],
    ranged: bool,
) -> Any:
    """Run ``step(block, carry, masked)`` over a row's partial blocks (``masked``) and then
    its full ones, returning the carry.

    ``index_at(j)`` reads the row's table and ``count_at(i)`` its two counts
    (:func:`row_blocks`). With ranges (``ranged``) the table is the row's four bounds and the
    block at each step is arithmetic; with lists it is read from the row's list.
    """
    n_partial, n_full = count_at(0), count_at(1)

    def listed(j: Any, masked: bool) -> Any:
        return index_at(j)

    block = _range_block(index_at, n_partial) if ranged else listed
    carry = jax.lax.fori_loop(0, n_partial, lambda j, c: step(block(j, True), c, True), carry)
    return jax.lax.fori_loop(
        n_partial, n_partial + n_full, lambda j, c: step(block(j, False), c, False), carry
    )


def uses_block_ranges(plan: "_Plan") -> bool:
    """Whether the kernels describe rows (and, transposed, columns) by block ranges rather
    than block lists: interval masks (:func:`full_blocks_consecutive`) unless
    :data:`BLOCK_RANGES` is off."""
    return BLOCK_RANGES and full_blocks_consecutive(plan)


def full_blocks_consecutive(plan: "_Plan") -> bool:
    """Whether every row's full key blocks (and every column's full query blocks) are
    consecutive block indices, ascending.

    True without a mask, for causal, sliding-window, prefix-LM and box masks and intersections
    of these (a row of query blocks sees a band of key blocks whose fully allowed part is an
    interval; the key padding block, forced partial, sits at the band's end). A dense mask or
    a document mask gives no such guarantee and keeps the block lists.
    """
    return plan.dense_mask is None and _interval_mask(plan.mask_mod)


def _forward_kernel(
    q_ref: Any,
    k_ref: Any,
    v_ref: Any,
    idx_ref: Any,
    cnt_ref: Any,
    *refs: Any,
    plan: _Plan,
    static: _Static,
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
        tile = _Tile(
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
            t = raw * (static.scale * _LOG2E)
        else:
            t = plan.modded(raw * static.scale, tile, plan.load_biases(tile)) * _LOG2E
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


def finish_rows(acc: Any, m: Any, l: Any) -> tuple[Any, Any]:
    """The normalised output and log2-sum-exp of an online softmax's (acc, max, denominator).

    A row with nothing allowed gives zeros and +inf, so the backward's exp2(t - lse) is 0 there.
    Serves the kernel (one query block) and the stepped forward's scan (whole arrays).
    """
    nonempty = l > 0.0
    safe_l = jnp.where(nonempty, l, 1.0)
    return acc / safe_l[..., None], jnp.where(nonempty, m + jnp.log2(safe_l), jnp.inf)


# --------------------------------------------------------------------------- preparation


@dataclasses.dataclass(frozen=True)
class _Prepared:
    query: jax.Array  # (B, H, Tp, Dp)
    key: jax.Array  # (B, Hk, Sp, Dp)
    value: jax.Array
    plan: _Plan
    seq_q: int
    seq_kv: int
    head_dim: int


def _pad_to(x: jax.Array, axis: int, target: int) -> jax.Array:
    if x.shape[axis] == target:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, target - x.shape[axis])
    return jnp.pad(x, pad)


def prepare(
    config: FlashConfig,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    score_mod: Any,
) -> _Prepared:
    """Pad to whole blocks of every kernel (the largest of their blocks) and build the plan."""
    batch, _, seq_q, head_dim = query.shape
    seq_kv = key.shape[2]
    # One padding serves the forward and both backward kernels: the largest tile of each axis.
    q_unit = max(
        _fit(config.block_q, seq_q), _fit(config.block_q_dkv, seq_q), _fit(config.block_q_dq, seq_q)
    )
    kv_unit = max(
        _fit(config.block_kv, seq_kv),
        _fit(config.block_kv_dkv, seq_kv),
        _fit(config.block_kv_dq, seq_kv),
    )
    padded_q = -(-seq_q // q_unit) * q_unit
    padded_kv = -(-seq_kv // kv_unit) * kv_unit
    padded_d = max(16, _next_pow2(head_dim))
    q = _pad_to(_pad_to(query, 2, padded_q), 3, padded_d)
    k = _pad_to(_pad_to(key, 2, padded_kv), 3, padded_d)
    v = _pad_to(_pad_to(value, 2, padded_kv), 3, padded_d)
    plan = _build_plan(
        mask,
        score_mod,
        batch=batch,
        seq_q=seq_q,
        seq_kv=seq_kv,
        padded_q=padded_q,
        padded_kv=padded_kv,
    )
    return _Prepared(q, k, v, plan, seq_q, seq_kv, head_dim)


def prepared_classes(prepared: _Prepared, block_q: int, block_kv: int) -> jax.Array:
    """:func:`block_classes` of a prepared call at one kernel's tiles (every padded query
    block of the grid included, as empty)."""
    batch, num_heads, padded_q, _ = prepared.query.shape
    return block_classes(
        prepared.plan,
        batch=batch,
        num_heads=num_heads,
        seq_q=prepared.seq_q,
        seq_kv=prepared.seq_kv,
        block_q=block_q,
        block_kv=block_kv,
        num_q_blocks=padded_q // block_q,
    )


def _list_spec(indices: jax.Array, counts: jax.Array) -> tuple[pl.BlockSpec, pl.BlockSpec]:
    """BlockSpecs of per-(b, h, row) block lists for a (row, b, h) grid (broadcast axes at 0)."""
    many_b = indices.shape[0] > 1
    many_h = indices.shape[1] > 1

    def index_map(i: Any, b: Any, h: Any) -> tuple[Any, ...]:
        return (b if many_b else 0, h if many_h else 0, i, 0)

    return (
        pl.BlockSpec((None, None, None, indices.shape[-1]), index_map),
        pl.BlockSpec((None, None, None, 2), index_map),
    )


def forward(
    config: FlashConfig, prepared: _Prepared, scale: float
) -> tuple[jax.Array, jax.Array]:
    """Run the forward on prepared (padded) inputs; returns (out_padded, lse2_padded).

    One kernel call, or with ``config.key_step_blocks`` an XLA scan of stepped calls.
    """
    q, plan = prepared.query, prepared.plan
    if mosaic_forward_applies(config, prepared, scale):
        return mosaic_forward(
            q,
            prepared.key,
            prepared.value,
            scale=scale,
            block_kv=config.mosaic_block_kv,
            stages=config.mosaic_stages,
        )
    batch, num_heads, padded_q, _ = q.shape
    bq = _fit(config.block_q, prepared.seq_q)
    bk = _fit(config.block_kv, prepared.seq_kv)
    classes = prepared_classes(prepared, bq, bk)
    static = _Static(
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

    # Steps of n key blocks: each step's list holds only its own blocks (global indices), so
    # the kernel reads the keys it needs straight from the whole K/V, positions unshifted.
    n = config.key_step_blocks
    num_kv = classes.shape[-1]
    num_steps = -(-num_kv // n)
    classes = jnp.pad(classes, ((0, 0), (0, 0), (0, 0), (0, num_steps * n - num_kv)))
    indices, counts = row_blocks(classes.reshape(*classes.shape[:3], num_steps, n), static.ranged)
    # Every entry of a list or a range is a block index: shift each step's to global ones.
    indices = indices + (jnp.arange(num_steps, dtype=jnp.int32) * n)[:, None]
    head_dim = q.shape[-1]
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


def mosaic_forward_applies(
    config: FlashConfig, prepared: _Prepared, scale: float, *, hopper: bool | None = None
) -> bool:
    """Whether the forward runs the Mosaic-GPU kernel (``_pallas_flash_mgpu``) rather than
    the Triton one: ``config.mosaic_forward`` on a Hopper GPU (``hopper``; None: the default
    device), not interpreted or stepped, for full attention (no mask, mod or operand) on
    2-byte Q/K/V at head_dim padded to 64 or 128, with no padded query row or key (query
    length a multiple of 128, key length of ``mosaic_block_kv``) and a positive scale."""
    if not config.mosaic_forward or config.interpret or config.key_step_blocks > 0:
        return False
    plan, q = prepared.plan, prepared.query
    padded_q, padded_d = q.shape[2], q.shape[3]
    padded_kv = prepared.key.shape[2]
    dtypes = {jnp.dtype(x.dtype) for x in (q, prepared.key, prepared.value)}
    full_attention = (
        plan.mask_fn is None
        and plan.value_fn is None
        and plan.dense_mask is None
        and not plan.operands
    )
    whole_tiles = (
        prepared.seq_q == padded_q
        and padded_q % MOSAIC_ROWS == 0
        and prepared.seq_kv == padded_kv
        and padded_kv % config.mosaic_block_kv == 0
    )
    if not (
        full_attention
        and whole_tiles
        and dtypes in ({jnp.dtype(jnp.bfloat16)}, {jnp.dtype(jnp.float16)})
        and padded_d in (64, 128)
        and scale > 0
        and mosaic_gpu_available()
    ):
        return False
    return hopper_gpu() if hopper is None else hopper


def compact_tiles(prepared: _Prepared) -> bool:
    """2-byte tiles at head_dim padded to 128 with no dense-mask or bias plane beside them:
    where the larger launches (``FlashConfig.wide_dq``, ``num_stages_listed``,
    ``num_stages_bwd_listed``) were measured. Float32 tiles, or a plane tile in every stage,
    would crowd the H100's shared memory: a float32 bias-gradient GPU test failed to compile
    with the wide dQ tile."""
    plan = prepared.plan
    return (
        plan.dense_mask_slot is None
        and not plan.bias_slots
        and jnp.dtype(prepared.query.dtype).itemsize <= 2
        and prepared.query.shape[3] == 128
    )


def deep_list_pipeline(prepared: _Prepared) -> bool:
    """Whether a call's rows keep block lists on :func:`compact_tiles`: there the kernels
    pipeline more stages (``FlashConfig.num_stages_listed``, ``num_stages_bwd_listed``), as a
    listed walk loads each block's index before the block and a deeper pipeline issues both
    ahead."""
    return not uses_block_ranges(prepared.plan) and compact_tiles(prepared)


def forward_stages(config: FlashConfig, prepared: _Prepared) -> int:
    """The forward kernel's pipeline stages: ``num_stages_listed`` where
    :func:`deep_list_pipeline` holds, else ``num_stages``."""
    if config.num_stages_listed is not None and deep_list_pipeline(prepared):
        return config.num_stages_listed
    return config.num_stages


def _forward_call(
    config: FlashConfig,
    prepared: _Prepared,
    static: _Static,
    indices: jax.Array,
    counts: jax.Array,
    state: tuple[jax.Array, ...],
) -> Any:
    """One forward kernel call: (out, lse2), or the next (acc, m, l) when ``state`` is given."""
    q, k, v, plan = prepared.query, prepared.key, prepared.value, prepared.plan
    batch, num_heads, padded_q, padded_d = q.shape
    padded_kv = k.shape[2]
    bq, group = static.block_q, static.group
    kernel = functools.partial(_forward_kernel, plan=plan, static=static)
    idx_spec, cnt_spec = _list_spec(indices, counts)
    row_block = pl.BlockSpec((None, None, bq, padded_d), lambda i, b, h: (b, h, i, 0))
    row_scalars = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    in_specs = [
        row_block,
        pl.BlockSpec((None, None, padded_kv, padded_d), lambda i, b, h: (b, h // group, 0, 0)),
        pl.BlockSpec((None, None, padded_kv, padded_d), lambda i, b, h: (b, h // group, 0, 0)),
        idx_spec,
        cnt_spec,
        *_operand_specs(plan),
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
        compiler_params=_compiler_params(
            config.num_warps,
            forward_stages(config, prepared),
            padded_d,
            tile=bq * static.block_kv,
        ),
        interpret=config.interpret,
        name="attnax_flash_forward_step" if state else "attnax_flash_forward",
    )(*operands)


# --------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(
    config: FlashConfig,
    static_mod: _StaticMod,
    scale: float,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    mod_arrays: tuple[jax.Array, ...],
) -> jax.Array:
    out, _ = _flash_forward(config, static_mod, scale, query, key, value, mask, mod_arrays)
    return out


def _flash_forward(
    config: FlashConfig,
    static_mod: _StaticMod,
    scale: float,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    mod_arrays: tuple[jax.Array, ...],
) -> tuple[jax.Array, jax.Array]:
    score_mod = static_mod.rebuild(mod_arrays)
    prepared = prepare(config, query, key, value, mask, score_mod)
    out, lse = forward(config, prepared, scale)
    seq_q, head_dim = query.shape[2], query.shape[3]
    return out[:, :, :seq_q, :head_dim], lse


def _flash_fwd_rule(
    config: FlashConfig,
    static_mod: _StaticMod,
    scale: float,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    mod_arrays: tuple[jax.Array, ...],
) -> tuple[jax.Array, tuple[Any, ...]]:
    out, lse = _flash_forward(config, static_mod, scale, query, key, value, mask, mod_arrays)
    return out, (query, key, value, mask, mod_arrays, out, lse)


def _flash_bwd_rule(
    config: FlashConfig,
    static_mod: _StaticMod,
    scale: float,
    residuals: tuple[Any, ...],
    d_out: jax.Array,
) -> tuple[Any, ...]:
    from ._pallas_flash_vjp import backward  # the backward module imports this one

    query, key, value, mask, mod_arrays, out, lse = residuals
    score_mod = static_mod.rebuild(mod_arrays)
    prepared = prepare(config, query, key, value, mask, score_mod)
    d_query, d_key, d_value, d_biases = backward(
        config, prepared, scale, out, lse, d_out
    )
    # Each bias leaf gets the gradient of its tile; every other mod leaf a zero cotangent.
    by_identity = {id(leaf): grad for leaf, grad in zip(prepared.plan.bias_leaves, d_biases, strict=True)}
    d_mod = tuple(
        by_identity[id(leaf)] if id(leaf) in by_identity else _zero_cotangent(leaf)
        for leaf in mod_arrays
    )
    return d_query, d_key, d_value, None, d_mod


def _zero_cotangent(x: jax.Array) -> Any:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


_flash.defvjp(_flash_fwd_rule, _flash_bwd_rule)

_flash_jit = jax.jit(_flash, static_argnums=(0, 1, 2))


# --------------------------------------------------------------------------- public entry


def flash_attention_with_config(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    config: FlashConfig,
    mask: jax.Array | None = None,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
) -> jax.Array:
    """The kernel with every tile/launch knob exposed (benchmarks sweep these); no fallback."""
    arrays, static_mod = _partition(score_mod)
    scale_value = default_scale(query.shape[-1], scale)
    out: jax.Array = _flash_jit(config, static_mod, scale_value, query, key, value, mask, arrays)
    return out


def _fallback(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    score_mod: ScoreMod | None,
    block_kv: int,
    scale: float | None,
) -> jax.Array:
    from .memory_efficient import memory_efficient_attention

    return memory_efficient_attention(
        query, key, value, mask=mask, score_mod=score_mod, block_size=block_kv, scale=scale
    )


@shape_checked
def pallas_flash_attention(
    query: QueryArray,
    key: KeyArray,
    value: ValueArray,
    *,
    mask: AttentionMask | None = None,
    score_mod: ScoreMod | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    block_q: int = 128,
    block_kv: int = 128,
    force_fallback: bool = False,
    interpret: bool = False,
    scale: float | None = None,
) -> AttentionOutput:
    r"""FlashAttention-2 in Pallas: :math:`\mathrm{softmax}(\mathrm{mod}(s QK^\top)) V`, tiled.

    A Pallas kernel (Triton lowering on GPU) with an online float32 softmax. On a Hopper GPU,
    full attention (no mask, no mod) on bf16/fp16 inputs at head_dim 33-128 whose lengths are
    multiples of 128 runs its forward and backward through Mosaic-GPU kernels instead
    (warp-specialised, wgmma; ``_pallas_flash_mgpu``, ``_pallas_flash_mgpu_vjp``). The score
    mod is traced into the inner loop with absolute indices; its mask part is turned into a
    per-(query block, key block) map outside the kernel, so blocks with no allowed pair are
    never loaded and blocks where every pair is allowed skip the mask. Grouped-query heads read
    their key/value head through the BlockSpec index maps (no repeated K/V). The backward is a
    ``jax.custom_vjp`` with Pallas dK/dV and dQ kernels that recompute the probabilities from
    the saved log-sum-exp and differentiate the value mod inside the kernel (an
    :class:`~attnax._mods.AdditiveBiasMod` receives its gradient).

    Supported mods: ``CausalMask``, ``SlidingWindowMask``, ``DocumentMask``, ``PrefixLMMask``,
    ``AlibiMod``, ``SoftcapMod``, ``AdditiveBiasMod``, their compositions, ``OffsetMask`` /
    ``OffsetScoreMod`` with int or per-batch offsets, and plain callables that capture no
    arrays (Pallas rejects a callable that closes over an array at trace time).

    Fallbacks (documented, never silent on failure): with ``force_fallback=True``, or on a
    non-GPU backend without ``interpret=True``, the call is served by
    :func:`~attnax.kernels._memory_efficient.memory_efficient_attention` (``block_size =
    block_kv``). On GPU a lowering or compile error propagates.

    Args:
      query: (batch, heads, seq_q, head_dim).
      key: (batch, kv_heads, seq_kv, head_dim); ``kv_heads`` divides ``heads``.
      value: like ``key``.
      mask: boolean, broadcastable to (batch, heads, seq_q, seq_kv); True means attend.
      score_mod: applied to the scaled scores with absolute (batch, head, query, key) indices.
      dropout_rng: must be None unless dropout is inactive.
      dropout_rate: must be 0 unless ``deterministic``; the kernel has no dropout.
      deterministic: no dropout when True.
      block_q: forward query tile (power of two >= 16; shrunk for short sequences).
      block_kv: forward key tile (power of two >= 16). At head_dim <= 128 on an H100,
        :data:`FAST_FORWARD_BLOCK_KV` (64) ran masked forwards 5-16% faster than this default
        128; ``MultiHeadAttention`` and :func:`~attnax.kernels.flash_attention` pass it.
      force_fallback: use memory_efficient_attention instead of the kernel.
      interpret: run the Pallas kernels in interpret mode (CPU tests).
      scale: score scale, ``1 / sqrt(head_dim)`` by default.

    Returns:
      (batch, heads, seq_q, head_dim) in the query's dtype; a row with no allowed key is zero.

    Raises:
      ValueError: for shapes that do not fit together or bad block sizes.
      NotImplementedError: for active dropout, or a mod that holds arrays the kernel cannot tile.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 16, 16))
      >>> kv = jax.random.normal(jax.random.key(1), (1, 2, 16, 16))
      >>> out = attnax.pallas_flash_attention(  # interpret=True runs the kernel on any backend
      ...     q, kv, kv, score_mod=attnax.causal_mod(), block_q=16, block_kv=16, interpret=True)
      >>> ref = attnax.standard_attention(q, kv, kv, score_mod=attnax.causal_mod())
      >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
      ((1, 2, 16, 16), True)
    """
    check_qkv(query, key, value, name=_NAME)
    check_mask(mask, query, key, name=_NAME)
    if check_dropout(dropout_rate, dropout_rng, deterministic, name=_NAME):
        raise NotImplementedError(
            f"{_NAME}: attention dropout is not implemented in the Pallas kernel; use "
            "standard_attention or memory_efficient_attention for dropout_rate > 0."
        )
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1):
            raise ValueError(f"{_NAME}: `{name}` must be a power of two >= 16, got {block!r}.")
    config = default_config(query.shape[-1], block_q, block_kv, interpret)
    if force_fallback or (jax.default_backend() != "gpu" and not interpret):
        return _fallback(query, key, value, mask, score_mod, block_kv, scale)
    return flash_attention_with_config(
        query, key, value, config=config, mask=mask, score_mod=score_mod, scale=scale
    )
