"""The contiguous per-layer cache :class:`KVLayerCache`: plain or sliding-window ring buffer.

Slot ``j`` of a plain cache holds absolute position ``j``; a ring buffer holds position ``p`` in
slot ``p % capacity`` (see :class:`KVLayerCache`). Overflow behaviour is described in
:mod:`attnax._cache`.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .._checks import positive_int
from .checks import check_new_kv, is_concrete, overflow_check


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
    check_new_kv(
        keys_new, values_new, batch=batch, num_kv_heads=num_kv_heads, head_dim=head_dim, name=name
    )
    seq_new = keys_new.shape[2]
    start_array = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (batch,))
    if cache.ring_buffer:
        fits = start_array >= 0
    else:
        fits = (start_array >= 0) & (start_array + seq_new <= capacity)
    if is_concrete(start):
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
    overflow_check(fits, capacity, start_array + seq_new)
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


def ring_positions(length: Int[Array, " B"], capacity: int) -> Int[Array, "B L"]:
    """Absolute position held by each ring slot (negative: never written)."""
    slots = jnp.arange(capacity)[None, :]
    last = length[:, None] - 1
    return last - jnp.mod(last - slots, capacity)

