"""Attention over a :class:`PagedKVCache` through its block table, for one row or the batch.

Both functions unpack the cache and call the array-level kernel
:func:`attnax.kernels.decode.paged_decode_attention`.
"""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._typing import AttentionOutput, QueryArray, ScoreMod
from ..kernels.decode import paged_decode_attention
from .checks import check_sequence_idx
from .paged import PagedKVCache


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


# Over 100 lines only through its docstring, the public contract; the body is short.
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
    return _paged_attention_one(
        query,
        cache,
        sequence_idx,
        score_mod=score_mod,
        q_offset=q_offset,
        causal=causal,
        attention_window=attention_window,
        use_pallas=use_pallas,
        interpret=interpret,
        scale=scale,
    )


def _paged_attention_one(
    query: Float[Array, "H T D"],
    cache: PagedKVCache,
    sequence_idx: int | Int[Array, ""],
    *,
    score_mod: ScoreMod | None,
    q_offset: int | Int[Array, "..."] | None,
    causal: bool,
    attention_window: int | None,
    use_pallas: bool | None,
    interpret: bool,
    scale: float | None,
) -> Array:
    """:func:`paged_attention` of one sequence: its table row and length as a batch of one."""
    name = "paged_attention"
    if isinstance(sequence_idx, (int, np.integer)):
        check_sequence_idx(int(sequence_idx), cache.batch_size, name)
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
