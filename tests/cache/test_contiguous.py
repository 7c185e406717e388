"""The contiguous cache: jitted updates of ragged rows, overflow (eager, jit, checkify), rings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from attnax._cache import cache_positions, init_kv_layer_cache, update_kv_layer_cache
from tests.cache._inputs import normal


def test_update_under_jit_with_ragged_rows() -> None:
    cache = init_kv_layer_cache(3, 2, 4, 8, jnp.float32)
    keys_new, values_new = normal(0, (3, 2, 3, 4)), normal(1, (3, 2, 3, 4))
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
    new = normal(0, (2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"length 7 .*capacity is 6"):
        update_kv_layer_cache(cache, new, new, jnp.array([0, 3], jnp.int32))
    with pytest.raises(ValueError, match="capacity is 6"):
        update_kv_layer_cache(cache, new, new, 5)


def test_overflow_under_jit_is_flagged_and_overwrites_nothing() -> None:
    cache = init_kv_layer_cache(2, 1, 4, 6, jnp.float32)
    first = normal(0, (2, 1, 5, 4))
    cache = update_kv_layer_cache(cache, first, first, 0)
    second = normal(1, (2, 1, 2, 4))
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
    new = normal(0, (2, 1, 3, 4))
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
