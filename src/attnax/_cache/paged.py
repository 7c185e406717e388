"""The paged cache :class:`PagedKVCache`: shared key/value pools behind a per-sequence block table.

Here are the cache, :func:`init_paged_kv_cache` and the array-level operations on it
(:func:`append_kv`, the jittable :func:`append_kv_batched`, :func:`gather_kv`); the eager block
bookkeeping lives in :mod:`attnax._cache.allocator` and the attention over the cache in
:mod:`attnax._cache.paged_attention`.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .._checks import check_float_inputs, positive_int
from .checks import check_new_kv, check_sequence_idx, is_concrete, overflow_check


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
    if is_concrete(cache.block_table, cache.seq_lengths, rows, active):
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
    overflow_check(fits, cache.max_blocks_per_seq * block_size, lengths + seq_new)
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
    check_float_inputs(name, keys_new=keys_new, values_new=values_new)
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
        check_sequence_idx(int(sequence_idx), cache.batch_size, name)
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
      it is also a checkify error (see :mod:`attnax._cache`).

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
    check_new_kv(
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
        check_sequence_idx(int(sequence_idx), cache.batch_size, "gather_kv")
    table_row = cache.block_table[sequence_idx]
    length = cache.seq_lengths[sequence_idx]
    capacity = cache.max_blocks_per_seq * cache.block_size
    valid = (jnp.arange(capacity) < length)[None, :, None]

    def gather(pool: Any) -> Any:
        blocks = pool[jnp.maximum(table_row, 0)]  # (M, P, Hk, D)
        tokens = blocks.reshape(capacity, pool.shape[2], pool.shape[3])
        return jnp.where(valid, jnp.swapaxes(tokens, 0, 1), jnp.zeros((), pool.dtype))

    return gather(cache.key_pool), gather(cache.value_pool), length

