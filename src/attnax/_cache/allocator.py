"""Eager block bookkeeping of a :class:`PagedKVCache`: allocating, freeing, a serving free list.

:func:`allocate_blocks` and :func:`free_sequence` edit one row of the block table;
:class:`BlockAllocator` keeps the host-side free list of a serving loop and calls them.
"""

import collections
import dataclasses
from collections.abc import Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from .._checks import positive_int
from .checks import check_sequence_idx
from .paged import PagedKVCache


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
    row = check_sequence_idx(sequence_idx, cache.batch_size, name)
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
    row = check_sequence_idx(sequence_idx, cache.batch_size, "free_sequence")
    table = np.asarray(cache.block_table)
    freed = [int(block) for block in table[row] if block >= 0]
    new_cache = dataclasses.replace(
        cache,
        block_table=cache.block_table.at[row].set(-1),
        seq_lengths=cache.seq_lengths.at[row].set(0),
        overflow=cache.overflow_flags.at[row].set(False),
    )
    return new_cache, freed



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

