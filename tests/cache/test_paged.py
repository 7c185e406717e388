"""The paged cache: jitted batched appends, and interleaved appends and frees never mix tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

from attnax._cache import (
    BlockAllocator,
    append_kv,
    append_kv_batched,
    gather_kv,
    init_paged_kv_cache,
    paged_attention,
)
from tests._reference import reference_attention, relative_error
from tests.cache._inputs import normal


def test_batched_append_under_jit_flags_missing_blocks() -> None:
    cache = init_paged_kv_cache(
        num_blocks=4, block_size=2, num_kv_heads=1, head_dim=2, batch_size=2, max_blocks_per_seq=2
    )
    allocator = BlockAllocator.for_cache(cache)
    cache = allocator.reserve(cache, sequence_idx=0, num_new_tokens=3)
    cache = allocator.reserve(cache, sequence_idx=1, num_new_tokens=1)
    new = normal(0, (2, 1, 3, 2))
    with pytest.raises(ValueError, match="unallocated"):
        append_kv_batched(cache, new, new)
    appended = jax.jit(append_kv_batched)(cache, new, new)
    np.testing.assert_array_equal(appended.seq_lengths, [3, 0])
    np.testing.assert_array_equal(appended.overflow, [False, True])
    np.testing.assert_array_equal(
        appended.key_pool[allocator.blocks_of(1)[0]], cache.key_pool[allocator.blocks_of(1)[0]]
    )
    keys, _, _ = gather_kv(appended, 0)
    np.testing.assert_array_equal(keys[:, :3], new[0])
    # Inactive rows are left alone, without a flag.
    quiet = jax.jit(lambda c, k: append_kv_batched(c, k, k, active=jnp.array([True, False])))(
        cache, new
    )
    np.testing.assert_array_equal(quiet.overflow, [False, False])
    error, _ = checkify.checkify(jax.jit(append_kv_batched))(cache, new, new)
    assert error.get() is not None


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    operations=st.lists(
        st.tuples(
            st.sampled_from(["append", "append", "append", "free"]),
            st.integers(0, 3),  # sequence
            st.integers(1, 5),  # tokens
        ),
        min_size=1,
        max_size=14,
    ),
    seed=st.integers(0, 2**16),
)
def test_interleavings_never_lose_or_mix_tokens(
    operations: list[tuple[str, int, int]], seed: int
) -> None:
    num_sequences, block_size, num_kv_heads, head_dim = 4, 2, 1, 4
    cache = init_paged_kv_cache(
        num_blocks=14,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        batch_size=num_sequences,
        max_blocks_per_seq=6,
    )
    allocator = BlockAllocator.for_cache(cache)
    history: dict[int, list[np.ndarray]] = {row: [] for row in range(num_sequences)}
    rng = np.random.default_rng(seed)
    for kind, row, tokens in operations:
        if kind == "free":
            cache = allocator.release(cache, sequence_idx=row)
            history[row] = []
            continue
        try:
            cache = allocator.reserve(cache, sequence_idx=row, num_new_tokens=tokens)
        except ValueError:
            continue  # pool or sequence full: nothing changes
        chunk = rng.normal(size=(num_kv_heads, tokens, head_dim)).astype(np.float32)
        cache = append_kv(cache, row, jnp.asarray(chunk), jnp.asarray(2.0 * chunk))
        history[row].append(chunk)
    owned = [block for row in range(num_sequences) for block in allocator.blocks_of(row)]
    assert len(owned) == len(set(owned))
    assert len(owned) + allocator.num_free == cache.num_blocks
    query_rng = np.random.default_rng(seed + 1)
    for row in range(num_sequences):
        keys, values, length = gather_kv(cache, row)
        if not history[row]:
            assert int(length) == 0
            continue
        expected = np.concatenate(history[row], axis=1)
        assert int(length) == expected.shape[1]
        np.testing.assert_array_equal(keys[:, : expected.shape[1]], expected)
        np.testing.assert_array_equal(values[:, : expected.shape[1]], 2.0 * expected)
        # The last two tokens attend over the sequence's own history.
        seq_q = min(2, expected.shape[1])
        query = jnp.asarray(query_rng.normal(size=(2, seq_q, head_dim)), jnp.float32)
        out = paged_attention(query, cache, row, use_pallas=False)
        total = expected.shape[1]
        q_pos = total - seq_q + np.arange(seq_q)[:, None]
        mask = (np.arange(total)[None, :] <= q_pos)[None, None]
        reference = reference_attention(
            query[None], expected[None], 2.0 * expected[None], mask=mask
        )[0]
        assert relative_error(out, reference) < 1e-5
