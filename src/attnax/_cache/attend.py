"""The layer's side of the caches: :func:`cache_positions` and :func:`attend_with_cache`.

:func:`attend_with_cache` checks its arguments and hands each cache kind to its own helper: a
contiguous cache to the decode kernel, a ring buffer to XLA over its slots, a paged cache to the
paged decode kernel, and any cache to a user ``kernel`` over the whole (gathered) cache.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .._checks import check_float_inputs, positive_int
from .._mods import (
    AndMask,
    CausalMask,
    MaskScoreMod,
    OffsetMask,
    SlidingWindowMask,
    compose_score_mods,
    shift_positions,
)
from .._typing import AttentionFn, AttentionOutput, QueryArray, ScoreIndex, ScoreMod, Scores
from ..kernels.decode import decode_attention
from ..kernels._standard import standard_attention
from .contiguous import KVLayerCache, ring_positions, update_kv_layer_cache
from .paged import PagedKVCache, append_kv_batched, gather_kv
from .paged_attention import paged_attention_batched


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


# Over 100 lines only through its docstring, the public contract; the body is short.
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

    * :class:`KVLayerCache`: :func:`attnax.kernels.decode.decode_attention` (Pallas
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
    _check_attend_args(query, keys_new, cache, attention_window, kernel, scale, name)
    if isinstance(cache, KVLayerCache) and cache.ring_buffer:
        return _attend_ring(
            query, keys_new, values_new, cache, score_mod, attention_window, scale, name
        )
    if kernel is not None:
        return _attend_with_kernel(
            kernel, query, keys_new, values_new, cache, score_mod, attention_window
        )
    if isinstance(cache, KVLayerCache):
        return _attend_contiguous(
            query,
            keys_new,
            values_new,
            cache,
            score_mod=score_mod,
            attention_window=attention_window,
            use_pallas=use_pallas,
            interpret=interpret,
            scale=scale,
        )
    return _attend_paged(
        query,
        keys_new,
        values_new,
        cache,
        score_mod=score_mod,
        attention_window=attention_window,
        use_pallas=use_pallas,
        interpret=interpret,
        scale=scale,
    )


def _check_attend_args(
    query: QueryArray,
    keys_new: Float[Array, "B Hk T D"],
    cache: KVLayerCache | PagedKVCache,
    attention_window: int | None,
    kernel: AttentionFn | None,
    scale: float | None,
    name: str,
) -> None:
    """Raise the argument errors of :func:`attend_with_cache`, in the order it always has
    (after the dtype rule: a non-float query is a ``TypeError``)."""
    check_float_inputs(name, query=query)
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
    if not isinstance(cache, (KVLayerCache, PagedKVCache)):
        raise TypeError(
            f"{name}: `cache` must be a KVLayerCache or a PagedKVCache, got {type(cache).__name__}."
        )
    if kernel is not None and isinstance(cache, KVLayerCache) and cache.ring_buffer:
        raise NotImplementedError(
            f"{name}: `kernel` is not supported with a ring-buffer cache; drop it (the "
            "ring attends in XLA) or use a cache with ring_buffer=False."
        )


def _attend_contiguous(
    query: QueryArray,
    keys_new: Float[Array, "B Hk T D"],
    values_new: Float[Array, "B Hk T D"],
    cache: KVLayerCache,
    *,
    score_mod: ScoreMod | None,
    attention_window: int | None,
    use_pallas: bool | None,
    interpret: bool,
    scale: float | None,
) -> tuple[AttentionOutput, KVLayerCache]:
    """Write the new tokens at each row's length, then the decode kernel over the cache."""
    old_length = cache.length
    new_cache = update_kv_layer_cache(cache, keys_new, values_new, old_length)
    out = decode_attention(
        query,
        new_cache.keys,
        new_cache.values,
        new_cache.length,
        score_mod=score_mod,
        q_offset=old_length,
        causal=True,
        attention_window=attention_window,
        use_pallas=use_pallas,
        interpret=interpret,
        scale=scale,
    )
    return out, new_cache


def _attend_paged(
    query: QueryArray,
    keys_new: Float[Array, "B Hk T D"],
    values_new: Float[Array, "B Hk T D"],
    cache: PagedKVCache,
    *,
    score_mod: ScoreMod | None,
    attention_window: int | None,
    use_pallas: bool | None,
    interpret: bool,
    scale: float | None,
) -> tuple[AttentionOutput, PagedKVCache]:
    """Append the new tokens through the block table, then the paged decode kernel."""
    old_length = cache.seq_lengths
    paged = append_kv_batched(cache, keys_new, values_new)
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


def _attend_with_kernel(
    kernel: AttentionFn,
    query: QueryArray,
    keys_new: Float[Array, "B Hk T D"],
    values_new: Float[Array, "B Hk T D"],
    cache: KVLayerCache | PagedKVCache,
    score_mod: ScoreMod | None,
    attention_window: int | None,
) -> tuple[AttentionOutput, KVLayerCache | PagedKVCache]:
    """A user kernel over the whole cache (a paged one gathered), the masks as a score mod."""
    result_cache: KVLayerCache | PagedKVCache
    if isinstance(cache, KVLayerCache):
        old_length = cache.length
        new_cache = update_kv_layer_cache(cache, keys_new, values_new, old_length)
        keys, values, new_length = new_cache.keys, new_cache.values, new_cache.length
        result_cache = new_cache
    else:
        old_length = cache.seq_lengths
        paged = append_kv_batched(cache, keys_new, values_new)
        new_length = paged.seq_lengths
        keys, values, _ = jax.vmap(lambda row: gather_kv(paged, row))(jnp.arange(paged.batch_size))
        result_cache = paged
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
    slot_positions = ring_positions(old_length, capacity)
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
