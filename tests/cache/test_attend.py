"""attend_with_cache: prefill + decode equals the full causal pass for every cache kind."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _mods
from attnax._cache import (
    BlockAllocator,
    KVLayerCache,
    PagedKVCache,
    attend_with_cache,
    init_kv_layer_cache,
    init_paged_kv_cache,
    update_kv_layer_cache,
)
from attnax.kernels import standard_attention
from tests._reference import relative_error
from tests.cache._inputs import normal


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
    query = normal(0, (batch, num_heads, seq, head_dim))
    keys = normal(1, (batch, num_kv_heads, seq, head_dim))
    values = normal(2, (batch, num_kv_heads, seq, head_dim))
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
    query = normal(3, (batch, num_heads, seq, head_dim))
    keys = normal(4, (batch, num_kv_heads, seq, head_dim))
    values = normal(5, (batch, num_kv_heads, seq, head_dim))
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
