"""KV caches for autoregressive decoding: contiguous (per layer) and paged (block table).

Both caches are frozen dataclasses registered as JAX pytrees, so they pass through ``jit``,
``lax.scan`` and ``nnx.jit`` and are updated functionally (every operation returns a new
cache). Positions are absolute: row ``b`` holds tokens ``0 .. length[b] - 1`` and the next
``T`` new tokens take positions :func:`cache_positions` ``= length[b] + arange(T)``, which is
where the layer rotates them with RoPE and where score mods, the causal mask and the sliding
window see them. A prefill followed by one-token steps therefore equals the full causal pass.

Overflow is never silent. Outside ``jit`` (concrete values) a write beyond the capacity raises
``ValueError`` naming the capacity and the requested length. Under ``jit`` the row's write is
dropped (no stored token is overwritten, its length does not move) and its ``overflow`` flag
is set; with shape checks on (:func:`attnax.shape_checks`) it is also a checkify error, which
the caller sees by functionalising the step::

    from jax.experimental import checkify
    err, (out, cache) = checkify.checkify(jax.jit(step))(x, cache)
    err.throw()  # raises JaxRuntimeError: "KV cache overflow: capacity ..., requested ..."

Without ``checkify.checkify`` the check is a no-op (``checkify.debug_check``), so checked code
still jits.

Module map: :class:`KVLayerCache` with :func:`init_kv_layer_cache` /
:func:`update_kv_layer_cache`; :class:`PagedKVCache` with :func:`init_paged_kv_cache`, the
eager :func:`allocate_blocks`, :func:`append_kv`, :func:`gather_kv`, :func:`free_sequence`,
the host-side :class:`BlockAllocator`, the jittable :func:`append_kv_batched`;
:func:`paged_attention` / :func:`paged_attention_batched`; and, for the layer,
:func:`cache_positions` and :func:`attend_with_cache`. The decode kernels themselves (plain
arrays in, no cache types) live in :mod:`attnax.kernels._decode` and
:mod:`attnax.kernels._paged`.
"""

import collections
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jaxtyping import Array, Bool, Float, Int

from ._checks import positive_int, shape_checks_enabled
from ._mods import (
    AndMask,
    CausalMask,
    MaskScoreMod,
    OffsetMask,
    SlidingWindowMask,
    compose_score_mods,
    shift_positions,
)
from ._typing import AttentionFn, AttentionOutput, QueryArray, ScoreIndex, ScoreMod, Scores
from .kernels._standard import standard_attention
from .kernels.decode import decode_attention, paged_decode_attention

__all__ = [
    "BlockAllocator",
    "KVLayerCache",
    "PagedKVCache",
    "allocate_blocks",
    "append_kv",
    "append_kv_batched",
    "attend_with_cache",
    "cache_positions",
    "free_sequence",
    "gather_kv",
    "init_kv_layer_cache",
    "init_paged_kv_cache",
    "paged_attention",
    "paged_attention_batched",
    "update_kv_layer_cache",
]


def _is_concrete(*values: Any) -> bool:
    """True when no value is a tracer (eager code, or Python ints under jit)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(values))


def _overflow_check(fits: Bool[Array, " B"], capacity: int, requested: Int[Array, " B"]) -> None:
    if shape_checks_enabled():
        checkify.debug_check(
            jnp.all(fits),
            "KV cache overflow: capacity {capacity} tokens, requested length {requested}; "
            "allocate a larger cache (or more blocks) before appending.",
            capacity=jnp.asarray(capacity, jnp.int32),
            requested=jnp.max(requested),
        )


# --------------------------------------------------------------------------- contiguous


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVLayerCache:
    """One layer's contiguous cache: keys/values after RoPE and each row's filled length.

    Attributes:
      keys: (batch, kv_heads, capacity, head_dim).
      values: like ``keys``.
      length: (batch,) int32, tokens appended so far to each row (absolute; for a ring buffer
        it keeps counting past the capacity).
      overflow: (batch,) bool, set when a write under ``jit`` did not fit (and was dropped).
      ring_buffer: static. False: slot ``j`` holds absolute position ``j`` and the capacity is
        the longest sequence. True: a sliding-window ring buffer, position ``p`` lives in slot
        ``p % capacity``, only the last ``capacity`` tokens are kept (O(window) memory), it
        never overflows and it must be attended with ``attention_window <= capacity``.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> cache = attnax.init_kv_layer_cache(batch_size=2, num_kv_heads=1, head_dim=4, max_len=8)
      >>> cache.keys.shape, cache.capacity, cache.length.tolist()
      ((2, 1, 8, 4), 8, [0, 0])
      >>> new = jnp.ones((2, 1, 3, 4))  # 3 tokens for each row
      >>> cache = attnax.update_kv_layer_cache(cache, new, new, start=cache.length)
      >>> cache.length.tolist(), cache.overflow.tolist()
      ([3, 3], [False, False])
    """

    keys: Float[Array, "B Hk L D"]
    values: Float[Array, "B Hk L D"]
    length: Int[Array, " B"]
    overflow: Bool[Array, " B"]
    ring_buffer: bool = dataclasses.field(default=False, metadata={"static": True})

    @property
    def capacity(self) -> int:
        """Slots per row (``max_len``, or the window of a ring buffer)."""
        return int(self.keys.shape[2])


def init_kv_layer_cache(
    batch_size: int,
    num_kv_heads: int,
    head_dim: int,
    max_len: int,
    dtype: Any = jnp.float32,
    *,
    ring_buffer: bool = False,
) -> KVLayerCache:
    """An empty contiguous cache (zeros, every length 0, no overflow).

    Args:
      batch_size: rows decoded together.
      num_kv_heads: key/value heads of the layer.
      head_dim: per-head feature size.
      max_len: capacity in tokens: the longest sequence, or for ``ring_buffer=True`` the
        sliding window (``attention_window`` of the layer, or more).
      dtype: storage dtype of keys and values (for example ``jnp.bfloat16``).
      ring_buffer: keep only the last ``max_len`` tokens in a ring (see :class:`KVLayerCache`).

    Returns:
      The cache.

    Raises:
      ValueError: when a size is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> cache = attnax.init_kv_layer_cache(2, 1, 4, 8, jnp.bfloat16)
      >>> cache.keys.shape, str(cache.keys.dtype), cache.length.tolist()
      ((2, 1, 8, 4), 'bfloat16', [0, 0])
      >>> window = attnax.init_kv_layer_cache(2, 1, 4, 4, ring_buffer=True)  # last 4 tokens only
      >>> window.ring_buffer, window.capacity
      (True, 4)
    """
    for value, name in (
        (batch_size, "batch_size"),
        (num_kv_heads, "num_kv_heads"),
        (head_dim, "head_dim"),
        (max_len, "max_len"),
    ):
        positive_int(value, name)
    shape = (batch_size, num_kv_heads, max_len, head_dim)
    return KVLayerCache(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        length=jnp.zeros((batch_size,), jnp.int32),
        overflow=jnp.zeros((batch_size,), bool),
        ring_buffer=ring_buffer,
    )


def _check_new_kv(
    keys_new: Array, values_new: Array, *, batch: int, num_kv_heads: int, head_dim: int, name: str
) -> None:
    expected = (batch, num_kv_heads, "T", head_dim)
    for arg, array in (("keys_new", keys_new), ("values_new", values_new)):
        if (
            array.ndim != 4
            or array.shape[0] != batch
            or array.shape[1] != num_kv_heads
            or array.shape[3] != head_dim
        ):
            raise ValueError(
                f"{name}: `{arg}` must have shape (batch, kv_heads, T, head_dim) = {expected} to "
                f"match the cache, got {array.shape}."
            )
    if keys_new.shape != values_new.shape:
        raise ValueError(
            f"{name}: `keys_new` {keys_new.shape} and `values_new` {values_new.shape} differ."
        )


def update_kv_layer_cache(
    cache: KVLayerCache,
    keys_new: Float[Array, "B Hk T D"],
    values_new: Float[Array, "B Hk T D"],
    start: int | Int[Array, " B"],
) -> KVLayerCache:
    """Write ``T`` new tokens of every row at that row's own ``start``; jittable.

    Row ``b`` receives positions ``start[b] .. start[b] + T - 1`` and its length becomes
    ``start[b] + T`` (so ``start < length`` rewrites the tail, as speculative decoding needs;
    ``start = cache.length`` appends). Writes are dynamic updates of ``T`` slots per row; no
    Python int is taken from a traced value.

    Args:
      cache: the cache to update.
      keys_new: (batch, kv_heads, T, head_dim), already rotated (RoPE) at their positions.
      values_new: like ``keys_new``.
      start: an int for every row or a (batch,) int array.

    Returns:
      The updated cache. A row whose write does not fit (``start + T > capacity``, or
      ``start < 0``) is left untouched under ``jit`` and its ``overflow`` flag is set; a ring
      buffer writes position ``p`` to slot ``p % capacity`` and never overflows.

    Raises:
      ValueError: for mismatched shapes, or (with concrete values) a write that does not fit,
        naming the capacity and the requested length.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> cache = attnax.init_kv_layer_cache(2, 1, 4, 8)
      >>> prompt = jnp.ones((2, 1, 3, 4))
      >>> cache = attnax.update_kv_layer_cache(cache, prompt, prompt, start=0)
      >>> token = jnp.full((2, 1, 1, 4), 2.0)
      >>> # Row 0 appends at its length; row 1 rewrites its last token (speculative decoding).
      >>> cache = attnax.update_kv_layer_cache(cache, token, token, start=jnp.array([3, 2]))
      >>> cache.length.tolist()
      [4, 3]
      >>> cache.keys[:, 0, :4, 0].tolist()
      [[1.0, 1.0, 1.0, 2.0], [1.0, 1.0, 2.0, 0.0]]
    """
    name = "update_kv_layer_cache"
    batch, num_kv_heads, capacity, head_dim = cache.keys.shape
    _check_new_kv(
        keys_new, values_new, batch=batch, num_kv_heads=num_kv_heads, head_dim=head_dim, name=name
    )
    seq_new = keys_new.shape[2]
    start_array = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (batch,))
    if cache.ring_buffer:
        fits = start_array >= 0
    else:
        fits = (start_array >= 0) & (start_array + seq_new <= capacity)
    if _is_concrete(start):
        requested = np.asarray(start_array) + seq_new
        bad = ~np.asarray(fits)
        if np.any(bad):
            row = int(np.argmax(bad))
            raise ValueError(
                f"{name}: row {row} needs length {int(requested[row])} (start "
                f"{int(requested[row]) - seq_new} + {seq_new} new tokens) but the cache capacity "
                f"is {capacity} tokens; create the cache with a larger max_len, or use "
                "ring_buffer=True for a sliding-window layer."
            )
    _overflow_check(fits, capacity, start_array + seq_new)
    keys_new = keys_new.astype(cache.keys.dtype)
    values_new = values_new.astype(cache.values.dtype)
    if cache.ring_buffer:
        keys, values = _ring_write(cache, keys_new, values_new, start_array, fits)
    elif seq_new > capacity:
        keys, values = cache.keys, cache.values  # nothing fits: every row overflows
    else:

        def write_row(buffer: Any, new: Any, row_start: Any, ok: Any) -> Any:
            # Clamp so the slice is in bounds, and write the old contents back when the row
            # does not fit: an overflowing write never touches a stored token.
            at = jnp.clip(row_start, 0, capacity - seq_new)
            old = jax.lax.dynamic_slice_in_dim(buffer, at, seq_new, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(buffer, jnp.where(ok, new, old), at, axis=1)

        keys = jax.vmap(write_row)(cache.keys, keys_new, start_array, fits)
        values = jax.vmap(write_row)(cache.values, values_new, start_array, fits)
    return dataclasses.replace(
        cache,
        keys=keys,
        values=values,
        length=jnp.where(fits, start_array + seq_new, cache.length).astype(jnp.int32),
        overflow=cache.overflow | ~fits,
    )


def _ring_write(
    cache: KVLayerCache,
    keys_new: Float[Array, "B Hk T D"],
    values_new: Float[Array, "B Hk T D"],
    start: Int[Array, " B"],
    fits: Bool[Array, " B"],
) -> tuple[Float[Array, "B Hk L D"], Float[Array, "B Hk L D"]]:
    capacity = cache.capacity
    seq_new = keys_new.shape[2]
    kept = min(seq_new, capacity)  # earlier new tokens would be overwritten anyway
    positions = start[:, None] + (seq_new - kept) + jnp.arange(kept)[None, :]
    # Slots of distinct positions within one window never collide; a bad row writes nowhere.
    slots = jnp.where(fits[:, None], positions % capacity, capacity)

    def write_row(buffer: Any, new: Any, row_slots: Any) -> Any:
        return buffer.at[:, row_slots].set(new, mode="drop")

    keys = jax.vmap(write_row)(cache.keys, keys_new[:, :, seq_new - kept :], slots)
    values = jax.vmap(write_row)(cache.values, values_new[:, :, seq_new - kept :], slots)
    return keys, values


def _ring_positions(length: Int[Array, " B"], capacity: int) -> Int[Array, "B L"]:
    """Absolute position held by each ring slot (negative: never written)."""
    slots = jnp.arange(capacity)[None, :]
    last = length[:, None] - 1
    return last - jnp.mod(last - slots, capacity)


# --------------------------------------------------------------------------- paged


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """A paged cache: shared key/value pools addressed through a per-sequence block table.

    Attributes:
      key_pool: (num_blocks, block_size, kv_heads, head_dim), blocks shared by all rows.
      value_pool: like ``key_pool``.
      block_table: (batch, max_blocks_per_seq) int32; entry ``[b, i]`` is the physical block
        holding row ``b``'s tokens ``i * block_size .. (i + 1) * block_size - 1``, -1 when
        unallocated. Allocated entries form a prefix of each row.
      seq_lengths: (batch,) int32, tokens stored per row.
      overflow: (batch,) bool, set when a jitted append found a needed block unallocated (the
        row's write was dropped). ``None`` only for caches built by hand; the functions here
        treat it as all False and always return an array.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> cache = attnax.init_paged_kv_cache(
      ...     num_blocks=4, block_size=2, num_kv_heads=1, head_dim=4,
      ...     batch_size=2, max_blocks_per_seq=2)
      >>> cache.key_pool.shape, cache.block_table.tolist(), cache.seq_lengths.tolist()
      ((4, 2, 1, 4), [[-1, -1], [-1, -1]], [0, 0])
      >>> cache.num_blocks, cache.block_size, cache.max_blocks_per_seq, cache.batch_size
      (4, 2, 2, 2)
    """

    key_pool: Float[Array, "N P Hk D"]
    value_pool: Float[Array, "N P Hk D"]
    block_table: Int[Array, "B M"]
    seq_lengths: Int[Array, " B"]
    overflow: Bool[Array, " B"] | None = None

    @property
    def num_blocks(self) -> int:
        return int(self.key_pool.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.key_pool.shape[1])

    @property
    def max_blocks_per_seq(self) -> int:
        return int(self.block_table.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.block_table.shape[0])

    @property
    def overflow_flags(self) -> Bool[Array, " B"]:
        """``overflow`` as an array (all False when the field is ``None``)."""
        if self.overflow is None:
            return jnp.zeros((self.batch_size,), bool)
        return self.overflow


def init_paged_kv_cache(
    *,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    batch_size: int,
    max_blocks_per_seq: int,
    dtype: Any = jnp.float32,
) -> PagedKVCache:
    """An empty paged cache: zero pools, every block-table entry -1, lengths 0.

    For the Pallas decode kernel make ``block_size`` a power of two (16 or more is best).

    Args:
      num_blocks: blocks in each pool, shared by all rows.
      block_size: tokens per block.
      num_kv_heads: key/value heads of the layer.
      head_dim: per-head feature size.
      batch_size: rows (sequences) of the block table.
      max_blocks_per_seq: blocks one sequence may own (its capacity is this times
        ``block_size``).
      dtype: storage dtype of the pools.

    Returns:
      The cache, with ``overflow`` all False.

    Raises:
      ValueError: when a size is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> cache = attnax.init_paged_kv_cache(
      ...     num_blocks=8, block_size=16, num_kv_heads=2, head_dim=4,
      ...     batch_size=2, max_blocks_per_seq=4)
      >>> cache.key_pool.shape, cache.block_table.shape, cache.overflow.tolist()
      ((8, 16, 2, 4), (2, 4), [False, False])
    """
    for value, name in (
        (num_blocks, "num_blocks"),
        (block_size, "block_size"),
        (num_kv_heads, "num_kv_heads"),
        (head_dim, "head_dim"),
        (batch_size, "batch_size"),
        (max_blocks_per_seq, "max_blocks_per_seq"),
    ):
        positive_int(value, name)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return PagedKVCache(
        key_pool=jnp.zeros(shape, dtype),
        value_pool=jnp.zeros(shape, dtype),
        block_table=jnp.full((batch_size, max_blocks_per_seq), -1, jnp.int32),
        seq_lengths=jnp.zeros((batch_size,), jnp.int32),
        overflow=jnp.zeros((batch_size,), bool),
    )


def _check_sequence_idx(cache: PagedKVCache, sequence_idx: int, name: str) -> int:
    if isinstance(sequence_idx, bool) or not isinstance(sequence_idx, (int, np.integer)):
        raise TypeError(f"{name}: `sequence_idx` must be an int, got {sequence_idx!r}.")
    if not 0 <= sequence_idx < cache.batch_size:
        raise ValueError(
            f"{name}: `sequence_idx` {sequence_idx} is out of range for a cache of "
            f"{cache.batch_size} sequences."
        )
    return int(sequence_idx)


def allocate_blocks(
    cache: PagedKVCache,
    *,
    sequence_idx: int,
    num_new_tokens: int,
    free_block_ids: Sequence[int],
) -> tuple[PagedKVCache, int]:
    """Give sequence ``sequence_idx`` enough blocks for ``num_new_tokens`` more tokens (eager).

    Blocks are taken from the front of ``free_block_ids``; the caller drops the first
    ``blocks_used`` ids from its free list (:class:`BlockAllocator` does this for you).

    Args:
      cache: the paged cache (concrete, not traced).
      sequence_idx: the row of the block table.
      num_new_tokens: tokens about to be appended (>= 0).
      free_block_ids: ids of blocks that no sequence owns.

    Returns:
      ``(cache, blocks_used)``: the cache with the new blocks in its table, and how many ids
      of ``free_block_ids`` it used (0 when the allocated blocks already suffice).

    Raises:
      ValueError: when too few free blocks are given, when the sequence would exceed
        ``max_blocks_per_seq``, or when a given id is out of range, repeated or already owned.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> cache = attnax.init_paged_kv_cache(
      ...     num_blocks=4, block_size=2, num_kv_heads=1, head_dim=4,
      ...     batch_size=1, max_blocks_per_seq=3)
      >>> free = [2, 0, 1, 3]
      >>> cache, used = attnax.allocate_blocks(
      ...     cache, sequence_idx=0, num_new_tokens=3, free_block_ids=free)
      >>> used, cache.block_table.tolist()
      (2, [[2, 0, -1]])
      >>> free = free[used:]
    """
    name = "allocate_blocks"
    row = _check_sequence_idx(cache, sequence_idx, name)
    if (
        isinstance(num_new_tokens, bool)
        or not isinstance(num_new_tokens, (int, np.integer))
        or num_new_tokens < 0
    ):
        raise ValueError(f"{name}: `num_new_tokens` must be an int >= 0, got {num_new_tokens!r}.")
    table = np.asarray(cache.block_table)
    length = int(np.asarray(cache.seq_lengths)[row])
    have = int(np.sum(table[row] >= 0))
    needed = -(-(length + int(num_new_tokens)) // cache.block_size)
    if needed > cache.max_blocks_per_seq:
        raise ValueError(
            f"{name}: sequence {row} would need {needed} blocks for {length + num_new_tokens} "
            f"tokens, more than max_blocks_per_seq={cache.max_blocks_per_seq}; create the cache "
            "with a larger max_blocks_per_seq."
        )
    count = max(0, needed - have)
    if count == 0:
        return cache, 0
    free = [int(block) for block in free_block_ids]
    if count > len(free):
        raise ValueError(
            f"{name}: sequence {row} needs {count} more blocks but only {len(free)} are free; "
            "free finished sequences (free_sequence / BlockAllocator.release) or create a pool "
            "with more num_blocks."
        )
    chosen = free[:count]
    owned = set(table[table >= 0].tolist())
    for block in chosen:
        if not 0 <= block < cache.num_blocks:
            raise ValueError(
                f"{name}: free block id {block} is out of range [0, {cache.num_blocks})."
            )
        if block in owned:
            raise ValueError(
                f"{name}: block {block} is listed as free but a sequence already owns it; keep "
                "the free list in sync (BlockAllocator does)."
            )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{name}: `free_block_ids` repeats a block id: {chosen}.")
    new_table = cache.block_table.at[row, have : have + count].set(jnp.asarray(chosen, jnp.int32))
    return dataclasses.replace(cache, block_table=new_table, overflow=cache.overflow_flags), count


def free_sequence(cache: PagedKVCache, sequence_idx: int) -> tuple[PagedKVCache, list[int]]:
    """Release every block of a sequence (eager): its table row becomes -1 and length 0.

    Returns:
      ``(cache, freed_block_ids)``; the ids can be handed to :func:`allocate_blocks` again.

    Args:
      cache: the paged cache (concrete, not traced).
      sequence_idx: the row of the block table.

    Raises:
      TypeError: when ``sequence_idx`` is not an int.
      ValueError: when ``sequence_idx`` is out of range.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> cache = attnax.init_paged_kv_cache(
      ...     num_blocks=4, block_size=2, num_kv_heads=1, head_dim=4,
      ...     batch_size=1, max_blocks_per_seq=2)
      >>> cache, _ = attnax.allocate_blocks(
      ...     cache, sequence_idx=0, num_new_tokens=4, free_block_ids=[2, 0])
      >>> cache, freed = attnax.free_sequence(cache, 0)
      >>> freed, cache.block_table.tolist(), cache.seq_lengths.tolist()
      ([2, 0], [[-1, -1]], [0])
    """
    row = _check_sequence_idx(cache, sequence_idx, "free_sequence")
    table = np.asarray(cache.block_table)
    freed = [int(block) for block in table[row] if block >= 0]
    new_cache = dataclasses.replace(
        cache,
        block_table=cache.block_table.at[row].set(-1),
        seq_lengths=cache.seq_lengths.at[row].set(0),
        overflow=cache.overflow_flags.at[row].set(False),
    )
    return new_cache, freed


def _paged_write(
    cache: PagedKVCache,
    keys_new: Float[Array, "B T Hk D"],
    values_new: Float[Array, "B T Hk D"],
    rows: Int[Array, " B"],
    active: Bool[Array, " B"],
    name: str,
) -> PagedKVCache:
    """Append ``T`` tokens to each of ``rows`` (token-major layout), dropping rows that lack blocks."""
    seq_new = keys_new.shape[1]
    block_size = cache.block_size
    lengths = cache.seq_lengths[rows]
    positions = lengths[:, None] + jnp.arange(seq_new)[None, :]
    logical = positions // block_size
    in_table = logical < cache.max_blocks_per_seq
    table_rows = cache.block_table[rows]
    physical = jnp.take_along_axis(
        table_rows, jnp.clip(logical, 0, cache.max_blocks_per_seq - 1), axis=1
    )
    token_ok = in_table & (physical >= 0)
    fits = jnp.all(token_ok, axis=1) | ~active
    writes = fits & active
    if _is_concrete(cache.block_table, cache.seq_lengths, rows, active):
        bad = ~np.asarray(fits)
        if np.any(bad):
            index = int(np.argmax(bad))
            row = int(np.asarray(rows)[index])
            length = int(np.asarray(lengths)[index])
            raise ValueError(
                f"{name}: sequence {row} needs length {length + seq_new} but its allocated blocks "
                f"hold {int(np.sum(np.asarray(table_rows)[index] >= 0)) * block_size} tokens "
                f"(block_size {block_size}, capacity {cache.max_blocks_per_seq * block_size}); a "
                "needed block is unallocated: call allocate_blocks (or BlockAllocator.reserve) "
                "first."
            )
    _overflow_check(fits, cache.max_blocks_per_seq * block_size, lengths + seq_new)
    # Out-of-range block ids make the scatter drop the row's tokens: nothing is overwritten.
    target = jnp.where(writes[:, None], physical, cache.num_blocks)
    offsets = positions % block_size
    key_pool = cache.key_pool.at[target, offsets].set(
        keys_new.astype(cache.key_pool.dtype), mode="drop"
    )
    value_pool = cache.value_pool.at[target, offsets].set(
        values_new.astype(cache.value_pool.dtype), mode="drop"
    )
    seq_lengths = cache.seq_lengths.at[rows].add(jnp.where(writes, seq_new, 0).astype(jnp.int32))
    overflow = cache.overflow_flags.at[rows].set(cache.overflow_flags[rows] | ~fits)
    return dataclasses.replace(
        cache,
        key_pool=key_pool,
        value_pool=value_pool,
        seq_lengths=seq_lengths,
        overflow=overflow,
    )


def append_kv(
    cache: PagedKVCache,
    sequence_idx: int | Int[Array, ""],
    keys_new: Float[Array, "Hk T D"],
    values_new: Float[Array, "Hk T D"],
) -> PagedKVCache:
    """Append ``T`` tokens to one sequence at its current length.

    Args:
      cache: the paged cache; the blocks for the new tokens must be allocated.
      sequence_idx: the row (an int, or a traced scalar under ``jit``).
      keys_new: (kv_heads, T, head_dim), already rotated at their absolute positions.
      values_new: like ``keys_new``.

    Returns:
      The cache with the tokens written and the row's length advanced. Under ``jit`` a row
      whose blocks are missing is left unchanged and flagged in ``overflow``.

    Raises:
      ValueError: for mismatched shapes, or (with concrete values) when a needed block is
        unallocated.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> cache = attnax.init_paged_kv_cache(
      ...     num_blocks=4, block_size=2, num_kv_heads=1, head_dim=4,
      ...     batch_size=1, max_blocks_per_seq=2)
      >>> cache, _ = attnax.allocate_blocks(
      ...     cache, sequence_idx=0, num_new_tokens=3, free_block_ids=[1, 2])
      >>> new = jnp.ones((1, 3, 4))  # (kv_heads, T, head_dim)
      >>> cache = attnax.append_kv(cache, 0, new, new)
      >>> cache.seq_lengths.tolist(), cache.key_pool[:, :, 0, 0].tolist()
      ([3], [[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    """
    name = "append_kv"
    _, _, num_kv_heads, head_dim = cache.key_pool.shape
    if keys_new.ndim != 3 or keys_new.shape[0] != num_kv_heads or keys_new.shape[2] != head_dim:
        raise ValueError(
            f"{name}: `keys_new` must have shape (kv_heads, T, head_dim) = ({num_kv_heads}, T, "
            f"{head_dim}), got {keys_new.shape}."
        )
    if values_new.shape != keys_new.shape:
        raise ValueError(
            f"{name}: `values_new` {values_new.shape} must match `keys_new` {keys_new.shape}."
        )
    if isinstance(sequence_idx, (int, np.integer)):
        _check_sequence_idx(cache, int(sequence_idx), name)
    rows = jnp.asarray(sequence_idx, jnp.int32).reshape(1)
    return _paged_write(
        cache,
        jnp.swapaxes(keys_new, 0, 1)[None],
        jnp.swapaxes(values_new, 0, 1)[None],
        rows,
        jnp.ones((1,), bool),
        name,
    )


def append_kv_batched(
    cache: PagedKVCache,
    keys_new: Float[Array, "B Hk T D"],
    values_new: Float[Array, "B Hk T D"],
    *,
    active: Bool[Array, " B"] | None = None,
) -> PagedKVCache:
    """Append ``T`` tokens to every row at its own length in one jittable scatter.

    Blocks must be allocated beforehand (:func:`allocate_blocks`, :class:`BlockAllocator`).

    Args:
      cache: the paged cache.
      keys_new: (batch, kv_heads, T, head_dim), already rotated at :func:`cache_positions`.
      values_new: like ``keys_new``.
      active: optional (batch,) bool; rows with False are left untouched (idle serving slots).

    Returns:
      The updated cache. Under ``jit`` a row that lacks a block is not written (nothing is
      overwritten), keeps its length, and gets its ``overflow`` flag set; with shape checks on
      it is also a checkify error (see the module docstring).

    Raises:
      ValueError: for mismatched shapes, or (with concrete values) a row that lacks a block.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> cache = attnax.init_paged_kv_cache(
      ...     num_blocks=4, block_size=2, num_kv_heads=1, head_dim=4,
      ...     batch_size=2, max_blocks_per_seq=2)
      >>> allocator = attnax.BlockAllocator.for_cache(cache)
      >>> cache = allocator.reserve(cache, sequence_idx=0, num_new_tokens=3)
      >>> new = jnp.ones((2, 1, 3, 4))  # three tokens for each row
      >>> active = jnp.array([True, False])  # row 1 is an idle serving slot
      >>> cache = jax.jit(attnax.append_kv_batched)(cache, new, new, active=active)
      >>> cache.seq_lengths.tolist(), cache.overflow.tolist()
      ([3, 0], [False, False])
    """
    name = "append_kv_batched"
    _, _, num_kv_heads, head_dim = cache.key_pool.shape
    _check_new_kv(
        keys_new,
        values_new,
        batch=cache.batch_size,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        name=name,
    )
    flags = jnp.ones((cache.batch_size,), bool) if active is None else jnp.asarray(active, bool)
    return _paged_write(
        cache,
        jnp.swapaxes(keys_new, 1, 2),
        jnp.swapaxes(values_new, 1, 2),
        jnp.arange(cache.batch_size, dtype=jnp.int32),
        flags,
        name,
    )


def gather_kv(
    cache: PagedKVCache, sequence_idx: int | Int[Array, ""]
) -> tuple[Float[Array, "Hk S D"], Float[Array, "Hk S D"], Int[Array, ""]]:
    """One sequence's keys and values in order, for inspection and tests (jittable).

    Returns:
      ``(keys, values, length)``: keys and values of shape (kv_heads, max_blocks_per_seq *
      block_size, head_dim), zero at and beyond ``length`` (the sequence's token count).

    Args:
      cache: the paged cache.
      sequence_idx: the row (an int, or a traced scalar under ``jit``).

    Raises:
      ValueError: for an int ``sequence_idx`` out of range.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> cache = attnax.init_paged_kv_cache(
      ...     num_blocks=4, block_size=2, num_kv_heads=1, head_dim=4,
      ...     batch_size=1, max_blocks_per_seq=2)
      >>> cache, _ = attnax.allocate_blocks(
      ...     cache, sequence_idx=0, num_new_tokens=3, free_block_ids=[3, 1])
      >>> new = jnp.arange(1.0, 4.0).reshape(1, 3, 1) * jnp.ones((1, 3, 4))
      >>> cache = attnax.append_kv(cache, 0, new, new)
      >>> keys, values, length = attnax.gather_kv(cache, 0)
      >>> keys.shape, int(length), keys[0, :, 0].tolist()
      ((1, 4, 4), 3, [1.0, 2.0, 3.0, 0.0])
    """
    if isinstance(sequence_idx, (int, np.integer)):
        _check_sequence_idx(cache, int(sequence_idx), "gather_kv")
    table_row = cache.block_table[sequence_idx]
    length = cache.seq_lengths[sequence_idx]
    capacity = cache.max_blocks_per_seq * cache.block_size
    valid = (jnp.arange(capacity) < length)[None, :, None]

    def gather(pool: Any) -> Any:
        blocks = pool[jnp.maximum(table_row, 0)]  # (M, P, Hk, D)
        tokens = blocks.reshape(capacity, pool.shape[2], pool.shape[3])
        return jnp.where(valid, jnp.swapaxes(tokens, 0, 1), jnp.zeros((), pool.dtype))

    return gather(cache.key_pool), gather(cache.value_pool), length


class BlockAllocator:
    """Host-side free list for a :class:`PagedKVCache` in a serving loop.

    Sequences are identified by their block-table row. The allocator records which row owns
    each block, so no block is ever handed to two sequences; :meth:`reserve` grows a row
    before an append and :meth:`release` returns a finished row's blocks to the free list.
    Blocks are handed out first-in first-out.

    Args:
      num_blocks: blocks in the cache's pools.
      block_size: tokens per block.
      max_blocks_per_seq: width of the cache's block table.

    Raises:
      ValueError: for a non-positive size.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> cache = attnax.init_paged_kv_cache(
      ...     num_blocks=4, block_size=2, num_kv_heads=1, head_dim=4,
      ...     batch_size=2, max_blocks_per_seq=2)
      >>> allocator = attnax.BlockAllocator.for_cache(cache)
      >>> cache = allocator.reserve(cache, sequence_idx=0, num_new_tokens=3)  # a 3-token prompt
      >>> allocator.blocks_of(0), allocator.free_block_ids
      ((0, 1), (2, 3))
      >>> # ... jitted prefill / decode steps (append_kv_batched, attend_with_cache) ...
      >>> cache = allocator.release(cache, sequence_idx=0)  # the sequence finished
      >>> allocator.free_block_ids, cache.block_table.tolist()
      ((2, 3, 0, 1), [[-1, -1], [-1, -1]])
    """

    def __init__(self, num_blocks: int, *, block_size: int, max_blocks_per_seq: int) -> None:
        self.num_blocks = positive_int(num_blocks, "num_blocks")
        self.block_size = positive_int(block_size, "block_size")
        self.max_blocks_per_seq = positive_int(max_blocks_per_seq, "max_blocks_per_seq")
        self._free: collections.deque[int] = collections.deque(range(num_blocks))
        self._owned: dict[int, list[int]] = {}

    @classmethod
    def for_cache(cls, cache: PagedKVCache) -> "BlockAllocator":
        """An allocator matching ``cache``, with the blocks its table already uses marked owned."""
        allocator = cls(
            cache.num_blocks,
            block_size=cache.block_size,
            max_blocks_per_seq=cache.max_blocks_per_seq,
        )
        table = np.asarray(cache.block_table)
        for row in range(table.shape[0]):
            blocks = [int(block) for block in table[row] if block >= 0]
            if blocks:
                allocator._take(row, blocks)
        return allocator

    @property
    def free_block_ids(self) -> tuple[int, ...]:
        """Unowned blocks, in the order they will be handed out."""
        return tuple(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_of(self, sequence_idx: int) -> tuple[int, ...]:
        """Blocks owned by a sequence, in logical order."""
        return tuple(self._owned.get(sequence_idx, ()))

    def _take(self, sequence_idx: int, blocks: Iterable[int]) -> None:
        for block in blocks:
            for owner, owned in self._owned.items():
                if block in owned:
                    raise ValueError(
                        f"BlockAllocator: block {block} is already owned by sequence {owner}."
                    )
            self._free.remove(block)
            self._owned.setdefault(sequence_idx, []).append(block)

    def allocate(self, sequence_idx: int, num_blocks: int) -> list[int]:
        """Hand ``num_blocks`` free blocks to a sequence; returns their ids.

        Raises:
          ValueError: when the pool has fewer free blocks, or the sequence would exceed
            ``max_blocks_per_seq``.
        """
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(
                f"BlockAllocator.allocate: `num_blocks` must be an int >= 0, got {num_blocks!r}."
            )
        owned = len(self._owned.get(sequence_idx, ()))
        if owned + num_blocks > self.max_blocks_per_seq:
            raise ValueError(
                f"BlockAllocator.allocate: sequence {sequence_idx} would own {owned + num_blocks} "
                f"blocks, more than max_blocks_per_seq={self.max_blocks_per_seq}."
            )
        if num_blocks > len(self._free):
            raise ValueError(
                f"BlockAllocator.allocate: the pool is exhausted: sequence {sequence_idx} needs "
                f"{num_blocks} blocks but {len(self._free)} of {self.num_blocks} are free; "
                "release finished sequences or create a larger pool."
            )
        blocks = [self._free.popleft() for _ in range(num_blocks)]
        self._owned.setdefault(sequence_idx, []).extend(blocks)
        return blocks

    def free(self, sequence_idx: int) -> list[int]:
        """Return every block of a sequence to the free list; returns their ids."""
        blocks = self._owned.pop(sequence_idx, [])
        self._free.extend(blocks)
        return blocks

    def reserve(
        self, cache: PagedKVCache, *, sequence_idx: int, num_new_tokens: int
    ) -> PagedKVCache:
        """Allocate the blocks a sequence needs for ``num_new_tokens`` more tokens (eager).

        Raises:
          ValueError: when the pool is exhausted (the allocator and the cache stay unchanged).
        """
        self._check_cache(cache)
        new_cache, used = allocate_blocks(
            cache,
            sequence_idx=sequence_idx,
            num_new_tokens=num_new_tokens,
            free_block_ids=self._free,
        )
        blocks = [self._free.popleft() for _ in range(used)]
        self._owned.setdefault(sequence_idx, []).extend(blocks)
        return new_cache

    def release(self, cache: PagedKVCache, *, sequence_idx: int) -> PagedKVCache:
        """Free a finished sequence: its blocks return to the pool, its row is reset."""
        self._check_cache(cache)
        new_cache, freed = free_sequence(cache, sequence_idx)
        mine = self._owned.pop(sequence_idx, [])
        if sorted(freed) != sorted(mine):
            self._owned[sequence_idx] = mine
            raise ValueError(
                f"BlockAllocator.release: the cache's row {sequence_idx} holds blocks {freed} but "
                f"the allocator recorded {mine}; use one allocator per cache for every "
                "allocation."
            )
        self._free.extend(mine)
        return new_cache

    def _check_cache(self, cache: PagedKVCache) -> None:
        if (cache.num_blocks, cache.block_size, cache.max_blocks_per_seq) != (
            self.num_blocks,
            self.block_size,
            self.max_blocks_per_seq,
        ):
            raise ValueError(
                "BlockAllocator: the cache has (num_blocks, block_size, max_blocks_per_seq) = "
                f"{(cache.num_blocks, cache.block_size, cache.max_blocks_per_seq)}, the allocator "
                f"{(self.num_blocks, self.block_size, self.max_blocks_per_seq)}; build it with "
                "BlockAllocator.for_cache(cache)."
            )


# --------------------------------------------------------------------------- paged attention


def paged_attention_batched(
    query: QueryArray,
    cache: PagedKVCache,
    *,
    score_mod: ScoreMod | None = None,
    q_offset: Int[Array, " B"] | None = None,
    causal: bool = True,
    attention_window: int | None = None,
    num_splits: int | None = None,
    block_kv: int = 128,
    use_pallas: bool | None = None,
    interpret: bool = False,
    scale: float | None = None,
) -> AttentionOutput:
    """Attention of every row's new queries over its paged history, through the block table.

    Args:
      query: (batch, heads, seq_q, head_dim); ``kv_heads`` of the cache divides ``heads``.
      cache: the paged cache (the queries' own keys already appended).
      score_mod: applied with absolute (batch, head, query, key) positions.
      q_offset: (batch,) absolute position of each row's first query; default
        ``seq_lengths - seq_q`` (the queries are each row's last ``seq_q`` tokens).
      causal: mask keys after each query's position (default True).
      attention_window: sliding window over absolute positions.
      num_splits: split-KV programs per row (see ``paged_decode_attention``).
      block_kv: keys per loop step.
      use_pallas: Pallas kernel (True), XLA (False) or automatic (None: Pallas on GPU).
      interpret: run the Pallas kernel in the interpreter (CPU tests).
      scale: score scale, ``1 / sqrt(head_dim)`` by default.

    Returns:
      (batch, heads, seq_q, head_dim); keys at or beyond each row's length are masked.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> cache = attnax.init_paged_kv_cache(
      ...     num_blocks=4, block_size=2, num_kv_heads=1, head_dim=4,
      ...     batch_size=2, max_blocks_per_seq=2)
      >>> allocator = attnax.BlockAllocator.for_cache(cache)
      >>> for row in range(2):
      ...     cache = allocator.reserve(cache, sequence_idx=row, num_new_tokens=3)
      >>> keys = jax.random.normal(jax.random.key(0), (2, 1, 3, 4))
      >>> cache = jax.jit(attnax.append_kv_batched)(cache, keys, keys)
      >>> query = jax.random.normal(jax.random.key(1), (2, 2, 1, 4))  # the newest token's query
      >>> out = jax.jit(attnax.paged_attention_batched)(query, cache)
      >>> ref = attnax.standard_attention(query, keys, keys)
      >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
      ((2, 2, 1, 4), True)
    """
    return paged_decode_attention(
        query,
        cache.key_pool,
        cache.value_pool,
        cache.block_table,
        cache.seq_lengths,
        score_mod=score_mod,
        q_offset=q_offset,
        causal=causal,
        attention_window=attention_window,
        num_splits=num_splits,
        block_kv=block_kv,
        use_pallas=use_pallas,
        interpret=interpret,
        scale=scale,
    )


def paged_attention(
    query: Float[Array, "H T D"] | QueryArray,
    cache: PagedKVCache,
    sequence_idx: int | Int[Array, ""] | None = None,
    *,
    score_mod: ScoreMod | None = None,
    q_offset: int | Int[Array, "..."] | None = None,
    causal: bool = True,
    attention_window: int | None = None,
    use_pallas: bool | None = None,
    interpret: bool = False,
    scale: float | None = None,
) -> Array:
    """Paged attention, one sequence or the whole batch (dispatch on the query's rank).

    * ``query`` (heads, seq_q, head_dim) with ``sequence_idx``: that sequence alone; returns
      (heads, seq_q, head_dim). Score mods see batch index 0.
    * ``query`` (batch, heads, seq_q, head_dim) without ``sequence_idx``: every row, as
      :func:`paged_attention_batched`.

    Queries sit at absolute positions ``q_offset + i``, by default the sequence's last
    ``seq_q`` positions (``length - seq_q + i``); with ``causal=True`` (default) each query
    sees its own and earlier positions, never positions at or beyond the length.

    Args:
      query: (heads, seq_q, head_dim) for one sequence, or (batch, heads, seq_q, head_dim).
      cache: the paged cache (the queries' own keys already appended).
      sequence_idx: the row for a rank-3 query; must be None for a rank-4 one.
      score_mod: applied with absolute (batch, head, query, key) positions.
      q_offset: absolute position of the first query (an int or per-row array); default
        ``length - seq_q``.
      causal: mask keys after each query's position.
      attention_window: sliding window over absolute positions.
      use_pallas: Pallas kernel (True), XLA (False) or automatic (None: Pallas on GPU).
      interpret: run the Pallas kernel in the interpreter (CPU tests).
      scale: score scale, ``1 / sqrt(head_dim)`` by default.

    Returns:
      The output in the query's layout and dtype.

    Raises:
      ValueError: for a rank other than 3 or 4, or ``sequence_idx`` given with a rank-4 query
        (or missing with a rank-3 one).

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> cache = attnax.init_paged_kv_cache(
      ...     num_blocks=4, block_size=2, num_kv_heads=1, head_dim=4,
      ...     batch_size=2, max_blocks_per_seq=2)
      >>> cache, _ = attnax.allocate_blocks(
      ...     cache, sequence_idx=1, num_new_tokens=3, free_block_ids=[0, 1])
      >>> keys = jax.random.normal(jax.random.key(0), (1, 3, 4))  # (kv_heads, T, head_dim)
      >>> cache = jax.jit(attnax.append_kv)(cache, 1, keys, keys)
      >>> query = jax.random.normal(jax.random.key(1), (2, 1, 4))  # (heads, seq_q, head_dim)
      >>> out = jax.jit(attnax.paged_attention)(query, cache, 1)  # sequence 1 alone
      >>> ref = attnax.standard_attention(query[None], keys[None], keys[None])[0]
      >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
      ((2, 1, 4), True)
    """
    name = "paged_attention"
    if query.ndim == 4:
        if sequence_idx is not None:
            raise ValueError(
                f"{name}: a rank-4 query covers the whole batch; drop `sequence_idx` (or pass "
                "one sequence's (heads, seq_q, head_dim) query)."
            )
        offsets = (
            None
            if q_offset is None
            else jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (query.shape[0],))
        )
        return paged_attention_batched(
            query,
            cache,
            score_mod=score_mod,
            q_offset=offsets,
            causal=causal,
            attention_window=attention_window,
            use_pallas=use_pallas,
            interpret=interpret,
            scale=scale,
        )
    if query.ndim != 3:
        raise ValueError(
            f"{name}: `query` must be (heads, seq_q, head_dim) for one sequence or (batch, heads, "
            f"seq_q, head_dim), got shape {query.shape}."
        )
    if sequence_idx is None:
        raise ValueError(f"{name}: a rank-3 query needs `sequence_idx` (the sequence's row).")
    if isinstance(sequence_idx, (int, np.integer)):
        _check_sequence_idx(cache, int(sequence_idx), name)
    length = cache.seq_lengths[sequence_idx].reshape(1)
    offsets_one = None if q_offset is None else jnp.asarray(q_offset, jnp.int32).reshape(1)
    out = paged_decode_attention(
        query[None],
        cache.key_pool,
        cache.value_pool,
        cache.block_table[sequence_idx][None],
        length,
        score_mod=score_mod,
        q_offset=offsets_one,
        causal=causal,
        attention_window=attention_window,
        use_pallas=use_pallas,
        interpret=interpret,
        scale=scale,
    )
    return out[0]


# --------------------------------------------------------------------------- for the layer


def cache_positions(cache: KVLayerCache | PagedKVCache, num_new: int) -> Int[Array, "B T"]:
    """Absolute positions of the next ``num_new`` tokens of each row: ``length + arange(T)``.

    Rotate the new queries and keys with RoPE at these positions before
    :func:`attend_with_cache`.

    Args:
      cache: a :class:`KVLayerCache` or :class:`PagedKVCache`.
      num_new: how many new tokens per row.

    Returns:
      (batch, num_new) int positions.

    Raises:
      ValueError: when ``num_new`` is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> cache = attnax.init_kv_layer_cache(2, 1, 4, 8)
      >>> new = jnp.ones((2, 1, 1, 4))
      >>> cache = attnax.update_kv_layer_cache(cache, new, new, start=jnp.array([2, 5]))
      >>> attnax.cache_positions(cache, 2).tolist()  # rows now hold 3 and 6 tokens
      [[3, 4], [6, 7]]
    """
    positive_int(num_new, "num_new")
    length = cache.length if isinstance(cache, KVLayerCache) else cache.seq_lengths
    return length[:, None] + jnp.arange(num_new, dtype=length.dtype)[None, :]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class _LengthMask:
    """``kv_idx < lengths[b]``: keys a row has actually stored."""

    lengths: Int[Array, " B"]

    def __call__(
        self, b_idx: ScoreIndex, h_idx: ScoreIndex, q_idx: ScoreIndex, kv_idx: ScoreIndex, /
    ) -> Bool[Array, "*#tile"]:
        return jnp.asarray(kv_idx < self.lengths[b_idx])

    def block_overlap(
        self,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_lo: ScoreIndex,
        q_hi: ScoreIndex,
        kv_lo: ScoreIndex,
        kv_hi: ScoreIndex,
    ) -> tuple[Bool[Array, "*#tile"], Bool[Array, "*#tile"]]:
        limit = self.lengths[b_idx]
        return jnp.asarray(kv_lo < limit), jnp.asarray(kv_hi - 1 < limit)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class _PositionMapScoreMod:
    """A score mod seen through explicit absolute positions (a ring buffer's slots)."""

    score_mod: Any
    q_positions: Int[Array, "B T"]
    kv_positions: Int[Array, "B S"]

    def __call__(
        self,
        scores: Scores,
        b_idx: ScoreIndex,
        h_idx: ScoreIndex,
        q_idx: ScoreIndex,
        kv_idx: ScoreIndex,
        /,
    ) -> Scores:
        modded: Scores = self.score_mod(
            scores, b_idx, h_idx, self.q_positions[b_idx, q_idx], self.kv_positions[b_idx, kv_idx]
        )
        return modded


def _mask_score_mod(
    q_offset: Int[Array, " B"], lengths: Int[Array, " B"], attention_window: int | None
) -> MaskScoreMod:
    masks: list[Any] = [OffsetMask(CausalMask(), q_offset=q_offset), _LengthMask(lengths)]
    if attention_window is not None:
        masks.append(OffsetMask(SlidingWindowMask(attention_window), q_offset=q_offset))
    return MaskScoreMod(AndMask(tuple(masks)))


def attend_with_cache(
    query: QueryArray,
    keys_new: Float[Array, "B Hk T D"],
    values_new: Float[Array, "B Hk T D"],
    cache: KVLayerCache | PagedKVCache,
    *,
    score_mod: ScoreMod | None = None,
    attention_window: int | None = None,
    kernel: AttentionFn | None = None,
    use_pallas: bool | None = None,
    interpret: bool = False,
    scale: float | None = None,
) -> tuple[AttentionOutput, KVLayerCache | PagedKVCache]:
    """Append the new keys/values and attend the new queries over the whole cache (jittable).

    ``query`` (batch, heads, T, head_dim) and ``keys_new``/``values_new`` (batch, kv_heads, T,
    head_dim) are projected and RoPE-rotated at :func:`cache_positions` ``(cache, T)``. The
    attention is causal over absolute positions, limited to ``attention_window`` when given,
    masked at and beyond each row's new length, and ``score_mod`` sees absolute query and key
    positions. Rows decode at their own lengths (ragged batches).

    Backends:

    * :class:`KVLayerCache`: :func:`attnax.kernels._decode.decode_attention` (Pallas
      split-KV on GPU, chunked XLA elsewhere; any ``T``). A ring buffer (``ring_buffer=True``)
      attends in XLA over its ``capacity`` slots plus the new tokens *before* writing them, so
      a prefill longer than the window still sees every key in its window; it needs
      ``attention_window <= capacity``.
    * :class:`PagedKVCache`: :func:`append_kv_batched` then the paged decode kernel; every
      row's blocks for the new tokens must already be allocated (an unallocated block is a
      ``ValueError`` eagerly and the ``overflow`` flag under ``jit``).
    * ``kernel`` (any :class:`attnax.AttentionFn`, for example a flash kernel for long
      prefills): called as ``kernel(query, keys, values, score_mod=...)`` over the whole
      cache (a paged cache is gathered first), with the causal, window and length masks as a
      mask score mod so block-sparse kernels skip empty blocks. Not for ring buffers.

    Args:
      query: (batch, heads, T, head_dim).
      keys_new: (batch, kv_heads, T, head_dim).
      values_new: like ``keys_new``.
      cache: the layer's cache.
      score_mod: extra score mod over absolute positions.
      attention_window: sliding window (``0 <= q - kv < attention_window``).
      kernel: optional attention kernel over the full cache instead of the decode kernels.
      use_pallas: forwarded to the decode kernels (None: Pallas on GPU).
      interpret: run the Pallas decode kernels in the interpreter (CPU tests).
      scale: score scale, ``1 / sqrt(head_dim)`` by default.

    Returns:
      ``(out, new_cache)`` with ``out`` (batch, heads, T, head_dim) in the query's dtype.

    Raises:
      ValueError: for mismatched shapes, an overflowing write with concrete values, or a ring
        buffer without a fitting ``attention_window``.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 4, 4))
      >>> kv = jax.random.normal(jax.random.key(1), (1, 1, 4, 4))
      >>> cache = attnax.init_kv_layer_cache(1, 1, 4, 8)
      >>> step = jax.jit(attnax.attend_with_cache)
      >>> # Prefill three tokens, then decode the fourth:
      >>> out3, cache = step(q[:, :, :3], kv[:, :, :3], kv[:, :, :3], cache)
      >>> out1, cache = step(q[:, :, 3:], kv[:, :, 3:], kv[:, :, 3:], cache)
      >>> full = attnax.standard_attention(q, kv, kv, score_mod=attnax.causal_mod())
      >>> bool(jnp.allclose(jnp.concatenate([out3, out1], axis=2), full, atol=1e-5))
      True
      >>> cache.length.tolist()
      [4]
    """
    name = "attend_with_cache"
    if attention_window is not None:
        positive_int(attention_window, "attention_window", caller=name)
    if (
        query.ndim != 4
        or keys_new.ndim != 4
        or query.shape[0] != keys_new.shape[0]
        or query.shape[2] != keys_new.shape[2]
    ):
        raise ValueError(
            f"{name}: `query` (batch, heads, T, head_dim) {query.shape} and `keys_new` (batch, "
            f"kv_heads, T, head_dim) {keys_new.shape} must agree on batch and T."
        )
    if kernel is not None and scale is not None:
        raise NotImplementedError(
            f"{name}: `scale` cannot be forwarded to an arbitrary `kernel`; scale the query "
            "instead, or use kernel=None."
        )
    if isinstance(cache, KVLayerCache):
        old_length = cache.length
        if cache.ring_buffer:
            if kernel is not None:
                raise NotImplementedError(
                    f"{name}: `kernel` is not supported with a ring-buffer cache; drop it (the "
                    "ring attends in XLA) or use a cache with ring_buffer=False."
                )
            return _attend_ring(
                query, keys_new, values_new, cache, score_mod, attention_window, scale, name
            )
        new_cache = update_kv_layer_cache(cache, keys_new, values_new, old_length)
        keys, values, new_length = new_cache.keys, new_cache.values, new_cache.length
        if kernel is None:
            out = decode_attention(
                query,
                keys,
                values,
                new_length,
                score_mod=score_mod,
                q_offset=old_length,
                causal=True,
                attention_window=attention_window,
                use_pallas=use_pallas,
                interpret=interpret,
                scale=scale,
            )
            return out, new_cache
        result_cache: KVLayerCache | PagedKVCache = new_cache
    elif isinstance(cache, PagedKVCache):
        old_length = cache.seq_lengths
        paged = append_kv_batched(cache, keys_new, values_new)
        if kernel is None:
            out = paged_attention_batched(
                query,
                paged,
                score_mod=score_mod,
                q_offset=old_length,
                causal=True,
                attention_window=attention_window,
                use_pallas=use_pallas,
                interpret=interpret,
                scale=scale,
            )
            return out, paged
        new_length = paged.seq_lengths
        keys, values, _ = jax.vmap(lambda row: gather_kv(paged, row))(jnp.arange(paged.batch_size))
        result_cache = paged
    else:
        raise TypeError(
            f"{name}: `cache` must be a KVLayerCache or a PagedKVCache, got {type(cache).__name__}."
        )
    combined = compose_score_mods(
        _mask_score_mod(old_length, new_length, attention_window),
        shift_positions(score_mod, q_offset=old_length),
    )
    return kernel(query, keys, values, score_mod=combined), result_cache


def _attend_ring(
    query: QueryArray,
    keys_new: Float[Array, "B Hk T D"],
    values_new: Float[Array, "B Hk T D"],
    cache: KVLayerCache,
    score_mod: ScoreMod | None,
    attention_window: int | None,
    scale: float | None,
    name: str,
) -> tuple[AttentionOutput, KVLayerCache]:
    capacity = cache.capacity
    if attention_window is None or attention_window > capacity:
        raise ValueError(
            f"{name}: a ring-buffer cache keeps only the last {capacity} tokens, so it needs "
            f"attention_window <= {capacity}, got {attention_window!r}; pass the layer's window "
            "or use ring_buffer=False."
        )
    seq_new = query.shape[2]
    old_length = cache.length
    slot_positions = _ring_positions(old_length, capacity)
    new_positions = cache_positions(cache, seq_new)
    kv_positions = jnp.concatenate([slot_positions, new_positions], axis=1)
    keys = jnp.concatenate([cache.keys, keys_new.astype(cache.keys.dtype)], axis=2)
    values = jnp.concatenate([cache.values, values_new.astype(cache.values.dtype)], axis=2)
    q_pos = new_positions[:, None, :, None]
    kv_pos = kv_positions[:, None, None, :]
    mask = (kv_pos >= 0) & (kv_pos <= q_pos) & (q_pos - kv_pos < attention_window)
    mapped = (
        None if score_mod is None else _PositionMapScoreMod(score_mod, new_positions, kv_positions)
    )
    out = standard_attention(query, keys, values, mask=mask, score_mod=mapped, scale=scale)
    new_cache = update_kv_layer_cache(cache, keys_new, values_new, old_length)
    return out, new_cache
