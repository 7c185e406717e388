"""KV caches: jittable updates, overflow, ring buffers, paged blocks, and prefill + decode."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

from attnax import _mods
from attnax._cache import (
    BlockAllocator,
    KVLayerCache,
    PagedKVCache,
    allocate_blocks,
    append_kv,
    append_kv_batched,
    attend_with_cache,
    cache_positions,
    free_sequence,
    gather_kv,
    init_kv_layer_cache,
    init_paged_kv_cache,
    paged_attention,
    update_kv_layer_cache,
)
from attnax.kernels import standard_attention
from tests._reference import reference_attention, relative_error


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape)


# --------------------------------------------------------------------------- contiguous


def test_update_under_jit_with_ragged_rows() -> None:
    cache = init_kv_layer_cache(3, 2, 4, 8, jnp.float32)
    keys_new, values_new = _normal(0, (3, 2, 3, 4)), _normal(1, (3, 2, 3, 4))
    start = jnp.array([0, 2, 5], jnp.int32)
    new = jax.jit(update_kv_layer_cache)(cache, keys_new, values_new, start)
    np.testing.assert_array_equal(new.length, [3, 5, 8])
    assert not np.any(new.overflow)
    for row, s in enumerate([0, 2, 5]):
        np.testing.assert_array_equal(new.keys[row, :, s : s + 3], keys_new[row])
        np.testing.assert_array_equal(new.values[row, :, s : s + 3], values_new[row])
        untouched = np.ones(8, bool)
        untouched[s : s + 3] = False
        assert np.all(np.asarray(new.keys[row, :, untouched]) == 0.0)
    np.testing.assert_array_equal(cache_positions(new, 2), [[3, 4], [5, 6], [8, 9]])


def test_overflow_eager_raises_with_capacity_and_length() -> None:
    cache = init_kv_layer_cache(2, 1, 4, 6, jnp.float32)
    new = _normal(0, (2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"length 7 .*capacity is 6"):
        update_kv_layer_cache(cache, new, new, jnp.array([0, 3], jnp.int32))
    with pytest.raises(ValueError, match="capacity is 6"):
        update_kv_layer_cache(cache, new, new, 5)


def test_overflow_under_jit_is_flagged_and_overwrites_nothing() -> None:
    cache = init_kv_layer_cache(2, 1, 4, 6, jnp.float32)
    first = _normal(0, (2, 1, 5, 4))
    cache = update_kv_layer_cache(cache, first, first, 0)
    second = _normal(1, (2, 1, 2, 4))
    step = jax.jit(update_kv_layer_cache)
    # Row 0 appends at 4 (fits: 6), row 1 at 5 (needs 7 > 6).
    new = step(cache, second, second, jnp.array([4, 5], jnp.int32))
    np.testing.assert_array_equal(new.overflow, [False, True])
    np.testing.assert_array_equal(new.length, [6, 5])
    np.testing.assert_array_equal(new.keys[1], cache.keys[1])
    np.testing.assert_array_equal(new.values[1], cache.values[1])
    np.testing.assert_array_equal(new.keys[0, :, 4:6], second[0])
    # The flag is sticky.
    again = step(new, second[:, :, :1], second[:, :, :1], jnp.array([0, 0], jnp.int32))
    np.testing.assert_array_equal(again.overflow, [False, True])


def test_overflow_is_a_checkify_error_with_shape_checks_on() -> None:
    cache = init_kv_layer_cache(2, 1, 4, 4, jnp.float32)
    new = _normal(0, (2, 1, 3, 4))
    checked = checkify.checkify(jax.jit(update_kv_layer_cache))
    error, _ = checked(cache, new, new, jnp.array([0, 2], jnp.int32))
    message = error.get()
    assert message is not None and "capacity 4" in message and "requested length 5" in message
    with pytest.raises(checkify.JaxRuntimeError, match="KV cache overflow"):
        error.throw()  # type: ignore[no-untyped-call]
    error, _ = checked(cache, new, new, jnp.array([0, 1], jnp.int32))
    assert error.get() is None


def test_ring_buffer_keeps_the_last_window() -> None:
    window = 4
    cache = init_kv_layer_cache(1, 1, 2, window, ring_buffer=True)
    tokens = jnp.arange(11, dtype=jnp.float32).reshape(1, 1, 11, 1) * jnp.ones((1, 1, 1, 2))
    step = jax.jit(update_kv_layer_cache)
    cache = step(cache, tokens[:, :, :6], tokens[:, :, :6], cache.length)  # longer than the ring
    for t in range(6, 11):
        cache = step(cache, tokens[:, :, t : t + 1], tokens[:, :, t : t + 1], cache.length)
    assert int(cache.length[0]) == 11 and not bool(cache.overflow[0])
    # Positions 7..10 in slots p % 4.
    np.testing.assert_array_equal(cache.keys[0, 0, :, 0], [8.0, 9.0, 10.0, 7.0])


# --------------------------------------------------------------------------- prefill + decode


def _prefill_then_decode(
    cache: KVLayerCache | PagedKVCache,
    query: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    prefill: int,
    **kwargs: Any,
) -> jax.Array:
    step = jax.jit(lambda q, k, v, c: attend_with_cache(q, k, v, c, **kwargs))
    out, cache = step(query[:, :, :prefill], keys[:, :, :prefill], values[:, :, :prefill], cache)
    outs = [out]
    for t in range(prefill, query.shape[2]):
        out, cache = step(
            query[:, :, t : t + 1], keys[:, :, t : t + 1], values[:, :, t : t + 1], cache
        )
        outs.append(out)
    assert not np.any(np.asarray(cache.overflow))
    return jnp.concatenate(outs, axis=2)


def _full_causal(
    query: jax.Array, keys: jax.Array, values: jax.Array, window: int | None, score_mod: Any
) -> jax.Array:
    seq = query.shape[2]
    mask = _mods.make_causal_mask(seq)
    if window is not None:
        mask = mask & _mods.make_sliding_window_mask(seq, window_size=window)
    return standard_attention(query, keys, values, mask=mask, score_mod=score_mod)


def _paged_cache(
    batch: int, num_kv_heads: int, head_dim: int, tokens: int, block_size: int
) -> PagedKVCache:
    blocks_per_seq = -(-tokens // block_size)
    cache = init_paged_kv_cache(
        num_blocks=batch * blocks_per_seq + 2,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        batch_size=batch,
        max_blocks_per_seq=blocks_per_seq,
    )
    allocator = BlockAllocator.for_cache(cache)
    allocator.allocate(-1, 1)  # shift the ids so rows do not get the identity layout
    for row in range(batch):
        cache = allocator.reserve(cache, sequence_idx=row, num_new_tokens=tokens)
    return cache


@pytest.mark.parametrize(
    ("kind", "window", "mod"),
    [
        ("contiguous", None, None),
        ("contiguous", 5, "alibi"),
        ("paged", None, "softcap"),
        ("paged", 6, None),
        ("ring", 5, "alibi"),
        ("kernel", 6, "alibi"),
    ],
)
def test_prefill_then_steps_equal_the_full_causal_pass(
    kind: str, window: int | None, mod: str | None
) -> None:
    batch, num_heads, num_kv_heads, seq, head_dim = 2, 4, 2, 12, 8
    query = _normal(0, (batch, num_heads, seq, head_dim))
    keys = _normal(1, (batch, num_kv_heads, seq, head_dim))
    values = _normal(2, (batch, num_kv_heads, seq, head_dim))
    score_mod = {
        "alibi": _mods.alibi_mod(num_heads),
        "softcap": _mods.softcap_mod(2.0),
        None: None,
    }[mod]
    cache: KVLayerCache | PagedKVCache
    kwargs: dict[str, Any] = {"attention_window": window, "score_mod": score_mod}
    if kind == "paged":
        cache = _paged_cache(batch, num_kv_heads, head_dim, seq, block_size=4)
    elif kind == "ring":
        assert window is not None
        cache = init_kv_layer_cache(batch, num_kv_heads, head_dim, window, ring_buffer=True)
    else:
        cache = init_kv_layer_cache(batch, num_kv_heads, head_dim, 16)
    if kind == "kernel":
        kwargs["kernel"] = standard_attention
    out = _prefill_then_decode(cache, query, keys, values, 7, **kwargs)
    expected = _full_causal(query, keys, values, window, score_mod)
    assert relative_error(out, expected) < 1e-5


def test_ragged_rows_decode_at_their_own_lengths_with_pallas() -> None:
    # Row 0 holds 3 tokens and row 1 holds 6; both then decode 3 steps with the Pallas kernel.
    batch, num_heads, num_kv_heads, seq, head_dim = 2, 4, 2, 9, 16
    query = _normal(3, (batch, num_heads, seq, head_dim))
    keys = _normal(4, (batch, num_kv_heads, seq, head_dim))
    values = _normal(5, (batch, num_kv_heads, seq, head_dim))
    prompt = np.array([3, 6])
    cache = init_kv_layer_cache(batch, num_kv_heads, head_dim, 16)
    cache = update_kv_layer_cache(cache, keys[:, :, :6], values[:, :, :6], 0)
    cache = dataclasses.replace(cache, length=jnp.asarray(prompt, jnp.int32))
    step = jax.jit(
        lambda q, k, v, c: attend_with_cache(q, k, v, c, use_pallas=True, interpret=True)
    )
    rows = np.arange(batch)
    outs = []
    for s in range(3):
        at = prompt + s
        q_t = query[rows, :, at][:, :, None]
        k_t = keys[rows, :, at][:, :, None]
        v_t = values[rows, :, at][:, :, None]
        out, cache = step(q_t, k_t, v_t, cache)
        outs.append(out)
    expected = np.asarray(_full_causal(query, keys, values, None, None))
    for s, out in enumerate(outs):
        for b in range(batch):
            np.testing.assert_allclose(out[b, :, 0], expected[b, :, prompt[b] + s], atol=1e-5)


# --------------------------------------------------------------------------- paged


def test_allocate_append_gather_free() -> None:
    cache = init_paged_kv_cache(
        num_blocks=5, block_size=4, num_kv_heads=2, head_dim=3, batch_size=2, max_blocks_per_seq=3
    )
    free = [4, 2, 0, 1, 3]
    cache, used = allocate_blocks(cache, sequence_idx=1, num_new_tokens=6, free_block_ids=free)
    assert used == 2
    free = free[used:]
    np.testing.assert_array_equal(cache.block_table, [[-1, -1, -1], [4, 2, -1]])
    chunk = _normal(0, (2, 6, 3))
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


def test_batched_append_under_jit_flags_missing_blocks() -> None:
    cache = init_paged_kv_cache(
        num_blocks=4, block_size=2, num_kv_heads=1, head_dim=2, batch_size=2, max_blocks_per_seq=2
    )
    allocator = BlockAllocator.for_cache(cache)
    cache = allocator.reserve(cache, sequence_idx=0, num_new_tokens=3)
    cache = allocator.reserve(cache, sequence_idx=1, num_new_tokens=1)
    new = _normal(0, (2, 1, 3, 2))
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
