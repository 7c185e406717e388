"""Which path a call takes and the tables the kernels walk, built at trace time.

* :func:`prepare` pads T/S to whole blocks of every kernel (and head_dim to a power of two) and
  builds the mod plan (:mod:`.tile_mods`).
* The block classes (empty / partial / full, :func:`attnax._mods.block_sparsity`) become per-row
  *block lists* (for each (batch, head, query block) the indices of its partial key blocks
  first, then its full ones, and the two counts) or, for interval masks, *block ranges* (four
  bounds a row), so empty blocks are never loaded and full ones skip the mask.
* The selection rules: where the Mosaic-GPU kernels take full attention
  (:func:`mosaic_forward_applies`, :func:`mosaic_backward_applies`) and the launches measured
  apart from the configured ones (:func:`forward_stages`, :func:`backward_stages`,
  :func:`dq_launch`).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ..._mods import (
    BLOCK_EMPTY,
    BLOCK_FULL,
    BLOCK_PARTIAL,
    AndMask,
    BoxMask,
    CausalMask,
    PrefixLMMask,
    SlidingWindowMask,
    block_sparsity,
    block_sparsity_from_mask,
)
from .._gpu import next_power_of_two
from .config import FlashConfig, fit
from .mosaic import MOSAIC_ROWS, hopper_gpu, mosaic_gpu_available
from .tile_mods import Plan, build_plan

__all__ = [
    "BLOCK_RANGES",
    "LISTED_STAGES",
    "WIDE_DQ",
    "Prepared",
    "backward_stages",
    "block_classes",
    "block_lists",
    "block_ranges",
    "compact_tiles",
    "deep_list_pipeline",
    "dq_launch",
    "forward_stages",
    "full_blocks_consecutive",
    "mosaic_backward_applies",
    "mosaic_forward_applies",
    "prepare",
    "prepared_classes",
    "row_blocks",
    "uses_block_ranges",
]

# Read at trace time: interval masks take block ranges (block_ranges). benchmarks/pallas_flash.py
# turns it off (--indexed-full) to time every mask with block lists.
BLOCK_RANGES = True


# --------------------------------------------------------------------------- block lists


def block_classes(
    plan: Plan,
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
    indices = jnp.pad(indices, [(0, 0)] * (indices.ndim - 1) + [(0, next_power_of_two(width) - width)])
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




def interval_mask(mask_mod: Any) -> bool:
    """Whether the mask lets each query see one interval of keys that moves with the query
    (and each key be seen by one interval of queries).

    A prefix-LM row sees ``[0, max(prefix, q + 1))`` and a key ``k`` is seen from ``k`` on (from
    0 inside the prefix); a box row sees its key range or nothing, in one run of rows.
    """
    interval_types = (CausalMask, SlidingWindowMask, BoxMask, PrefixLMMask)
    if mask_mod is None or isinstance(mask_mod, interval_types):
        return True
    if isinstance(mask_mod, AndMask):
        return all(interval_mask(part) for part in mask_mod.mask_mods)
    return False



def uses_block_ranges(plan: Plan) -> bool:
    """Whether the kernels describe rows (and, transposed, columns) by block ranges rather
    than block lists: interval masks (:func:`full_blocks_consecutive`) unless
    :data:`BLOCK_RANGES` is off."""
    return BLOCK_RANGES and full_blocks_consecutive(plan)


def full_blocks_consecutive(plan: Plan) -> bool:
    """Whether every row's full key blocks (and every column's full query blocks) are
    consecutive block indices, ascending.

    True without a mask, for causal, sliding-window, prefix-LM and box masks and intersections
    of these (a row of query blocks sees a band of key blocks whose fully allowed part is an
    interval; the key padding block, forced partial, sits at the band's end). A dense mask or
    a document mask gives no such guarantee and keeps the block lists.
    """
    return plan.dense_mask is None and interval_mask(plan.mask_mod)


# --------------------------------------------------------------------------- preparation


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One call's padded Q/K/V and its mod plan, with the unpadded lengths."""

    query: jax.Array  # (B, H, Tp, Dp)
    key: jax.Array  # (B, Hk, Sp, Dp)
    value: jax.Array
    plan: Plan
    seq_q: int
    seq_kv: int
    head_dim: int


def pad_to(x: jax.Array, axis: int, target: int) -> jax.Array:
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
) -> Prepared:
    """Pad to whole blocks of every kernel (the largest of their blocks) and build the plan."""
    batch, _, seq_q, head_dim = query.shape
    seq_kv = key.shape[2]
    # One padding serves the forward and both backward kernels: the largest tile of each axis.
    q_unit = max(
        fit(config.block_q, seq_q), fit(config.block_q_dkv, seq_q), fit(config.block_q_dq, seq_q)
    )
    kv_unit = max(
        fit(config.block_kv, seq_kv),
        fit(config.block_kv_dkv, seq_kv),
        fit(config.block_kv_dq, seq_kv),
    )
    padded_q = -(-seq_q // q_unit) * q_unit
    padded_kv = -(-seq_kv // kv_unit) * kv_unit
    padded_d = max(16, next_power_of_two(head_dim))
    q = pad_to(pad_to(query, 2, padded_q), 3, padded_d)
    k = pad_to(pad_to(key, 2, padded_kv), 3, padded_d)
    v = pad_to(pad_to(value, 2, padded_kv), 3, padded_d)
    plan = build_plan(
        mask,
        score_mod,
        batch=batch,
        seq_q=seq_q,
        seq_kv=seq_kv,
        padded_q=padded_q,
        padded_kv=padded_kv,
    )
    return Prepared(q, k, v, plan, seq_q, seq_kv, head_dim)


def prepared_classes(prepared: Prepared, block_q: int, block_kv: int) -> jax.Array:
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


# --------------------------------------------------------------------------- selection


def mosaic_forward_applies(
    config: FlashConfig, prepared: Prepared, scale: float, *, hopper: bool | None = None
) -> bool:
    """Whether the forward runs the Mosaic-GPU kernel (:mod:`.mosaic`) rather than the Triton
    one: ``config.use_mosaic_forward`` on a Hopper GPU (``hopper``; None: the default device),
    not interpreted or stepped, for full attention (no mask, mod or operand) on 2-byte Q/K/V
    at head_dim padded to 64 or 128, with no padded query row or key (query length a multiple
    of 128, key length of ``mosaic_block_kv``) and a positive scale."""
    if not config.use_mosaic_forward or config.interpret or config.key_step_blocks > 0:
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


def mosaic_backward_applies(config: FlashConfig, prepared: Prepared, scale: float) -> bool:
    """Whether both backward kernels run in Mosaic GPU (``FlashConfig.use_mosaic_backward``):
    where the forward does, with sequences in whole 128-row tiles of both kernels (each
    program owns two consumers' 64 rows; the streamed tiles are 64 or 128 rows)."""
    return (
        config.use_mosaic_backward
        and prepared.query.shape[2] % 128 == 0
        and prepared.key.shape[2] % 128 == 0
        and mosaic_forward_applies(config, prepared, scale)
    )


def compact_tiles(prepared: Prepared) -> bool:
    """2-byte tiles at head_dim padded to 128 with no dense-mask or bias plane beside them:
    where the larger launches (the wide dQ tile, :data:`LISTED_STAGES`) were measured.
    Float32 tiles, or a plane tile in every stage, would crowd the H100's shared memory: a
    float32 bias-gradient GPU test failed to compile with the wide dQ tile."""
    plan = prepared.plan
    return (
        plan.dense_mask_slot is None
        and not plan.bias_slots
        and jnp.dtype(prepared.query.dtype).itemsize <= 2
        and prepared.query.shape[3] == 128
    )


# The three kernels' pipeline stages where rows keep block lists (documents, custom masks) on
# :func:`compact_tiles` (``deep_list_pipeline``). On an H100 three stages took 6% off the
# 4-document forward and cost 8-12% on full and causal attention (block ranges), which keep
# the configured two (NOTES, "Eighth session"); in both backward kernels -2.2% and -2.8% on
# the documents' forward+backward in an interleaved A/B.
LISTED_STAGES = 3


def deep_list_pipeline(prepared: Prepared) -> bool:
    """Whether a call's rows keep block lists on :func:`compact_tiles`: there the kernels
    pipeline :data:`LISTED_STAGES` stages, as a listed walk loads each block's index before
    the block and a deeper pipeline issues both ahead."""
    return not uses_block_ranges(prepared.plan) and compact_tiles(prepared)


def forward_stages(config: FlashConfig, prepared: Prepared) -> int:
    """The forward kernel's pipeline stages: :data:`LISTED_STAGES` where
    :func:`deep_list_pipeline` holds, else ``num_stages``."""
    return LISTED_STAGES if deep_list_pipeline(prepared) else config.num_stages


def backward_stages(prepared: Prepared, stages: int) -> int:
    """A backward kernel's pipeline stages: :data:`LISTED_STAGES` where
    :func:`deep_list_pipeline` holds, else ``stages``."""
    return LISTED_STAGES if deep_list_pipeline(prepared) else stages


# The wide dQ launch: (query rows, warps, stages). Interval masks (block ranges), bf16/fp16,
# no bias operand, head_dim padded to 128, query padding a multiple of 128: the dQ kernel takes
# 128-row query tiles with 8 warps and 3 stages (FlexAttention's H100 dQ choice) in place of
# block_q_dq and the backward's launch parameters. On an H100 (NOTES, "backward sweep 3") that
# took 3% off full attention's forward+backward; documents (block lists) lost 2.7% with it and
# keep 64-row tiles.
WIDE_DQ = (128, 8, 3)


def dq_launch(config: FlashConfig, prepared: Prepared) -> tuple[int, int | None, int]:
    """The dQ kernel's (query tile, warps, stages): :data:`WIDE_DQ` for interval masks on
    :func:`compact_tiles` (where it was measured; Flex itself keeps 64-row dQ tiles at
    head_dim 64) whose padding already holds whole 128-row tiles; else the configured ones
    (``block_q_dq``, ``num_warps_bwd``, stages by :func:`backward_stages`)."""
    rows = WIDE_DQ[0]
    if (
        uses_block_ranges(prepared.plan)
        and compact_tiles(prepared)
        and fit(rows, prepared.seq_q) == rows
        and prepared.query.shape[2] % rows == 0
    ):
        return WIDE_DQ
    return (
        fit(config.block_q_dq, prepared.seq_q),
        config.num_warps_bwd,
        backward_stages(prepared, config.num_stages_bwd),
    )
