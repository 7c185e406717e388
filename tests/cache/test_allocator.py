"""Block bookkeeping: allocate_blocks / free_sequence and the BlockAllocator free list."""

import numpy as np
import pytest

from attnax._cache import (
    BlockAllocator,
    allocate_blocks,
    append_kv,
    free_sequence,
    gather_kv,
    init_paged_kv_cache,
)
from tests.cache._inputs import normal


def test_allocate_append_gather_free() -> None:
    cache = init_paged_kv_cache(
        num_blocks=5, block_size=4, num_kv_heads=2, head_dim=3, batch_size=2, max_blocks_per_seq=3
    )
    free = [4, 2, 0, 1, 3]
    cache, used = allocate_blocks(cache, sequence_idx=1, num_new_tokens=6, free_block_ids=free)
    assert used == 2
    free = free[used:]
    np.testing.assert_array_equal(cache.block_table, [[-1, -1, -1], [4, 2, -1]])
    chunk = normal(0, (2, 6, 3))
    cache = append_kv(cache, 1, chunk, -chunk)
    keys, values, length = gather_kv(cache, 1)
    assert int(length) == 6
    np.testing.assert_array_equal(keys[:, :6], chunk)
    np.testing.assert_array_equal(values[:, :6], -chunk)
    assert np.all(np.asarray(keys[:, 6:]) == 0.0)
    with pytest.raises(ValueError, match="unallocated"):
        append_kv(cache, 1, chunk[:, :3], chunk[:, :3])  # 9 tokens need a third block
    with pytest.raises(ValueError, match="only 0 are free"):
        allocate_blocks(cache, sequence_idx=1, num_new_tokens=3, free_block_ids=[])
    with pytest.raises(ValueError, match="already owns"):
        allocate_blocks(cache, sequence_idx=0, num_new_tokens=1, free_block_ids=[2])
    with pytest.raises(ValueError, match="max_blocks_per_seq"):
        allocate_blocks(cache, sequence_idx=1, num_new_tokens=7, free_block_ids=free)
    cache, freed = free_sequence(cache, 1)
    assert sorted(freed) == [2, 4]
    assert int(cache.seq_lengths[1]) == 0
    np.testing.assert_array_equal(cache.block_table[1], [-1, -1, -1])


def test_block_allocator_exhaustion_and_ownership() -> None:
    cache = init_paged_kv_cache(
        num_blocks=3, block_size=2, num_kv_heads=1, head_dim=2, batch_size=2, max_blocks_per_seq=3
    )
    allocator = BlockAllocator.for_cache(cache)
    cache = allocator.reserve(cache, sequence_idx=0, num_new_tokens=4)
    assert allocator.blocks_of(0) == (0, 1) and allocator.num_free == 1
    with pytest.raises(ValueError, match="only 1 are free"):
        allocator.reserve(cache, sequence_idx=1, num_new_tokens=3)
    assert allocator.num_free == 1  # a failed reservation takes nothing
    with pytest.raises(ValueError, match="exhausted"):
        allocator.allocate(5, 2)
    cache = allocator.release(cache, sequence_idx=0)
    assert allocator.num_free == 3
    cache = allocator.reserve(cache, sequence_idx=1, num_new_tokens=5)
    assert set(allocator.blocks_of(1)) == {0, 1, 2}
