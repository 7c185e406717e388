"""The paged decode kernel: Pallas (interpret) and XLA against the contiguous kernel and the reference."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _mods
from attnax.kernels.decode import decode_attention, paged_decode_attention
from tests._reference import reference_attention, relative_error


def _paged_from_contiguous(
    keys: jax.Array, values: jax.Array, lengths: jax.Array, *, block_size: int, seed: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Scatter a contiguous cache into a shuffled pool; blocks beyond each length stay -1."""
    batch, num_kv_heads, cache_len, head_dim = keys.shape
    blocks_per_seq = cache_len // block_size
    num_blocks = batch * blocks_per_seq + 3  # a few spare blocks that nobody owns
    permutation = np.random.default_rng(seed).permutation(num_blocks)
    table = permutation[: batch * blocks_per_seq].reshape(batch, blocks_per_seq)
    used = -(-np.asarray(lengths) // block_size)
    table = np.where(np.arange(blocks_per_seq)[None, :] < used[:, None], table, -1)
    rng = np.random.default_rng(seed + 1)
    pools = []
    for array in (keys, values):
        # Garbage everywhere first, so that reading an unowned block would show.
        pool = rng.normal(size=(num_blocks, block_size, num_kv_heads, head_dim)).astype(np.float32)
        tokens = np.asarray(array, np.float32).reshape(
            batch, num_kv_heads, blocks_per_seq, block_size, head_dim
        )
        for b in range(batch):
            for i in range(blocks_per_seq):
                if table[b, i] >= 0:
                    pool[table[b, i]] = tokens[b, :, i].transpose(1, 0, 2)
        pools.append(jnp.asarray(pool, array.dtype))
    return pools[0], pools[1], jnp.asarray(table, jnp.int32)


def _inputs(
    seed: int, *, num_heads: int, num_kv_heads: int, seq_q: int, cache_len: int
) -> tuple[jax.Array, ...]:
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    query = jax.random.normal(kq, (2, num_heads, seq_q, 16))
    keys = jax.random.normal(kk, (2, num_kv_heads, cache_len, 16))
    values = jax.random.normal(kv, (2, num_kv_heads, cache_len, 16))
    return query, keys, values


def _reference(
    query: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    lengths: jax.Array,
    *,
    attention_window: int | None = None,
    score_mod: Any = None,
) -> np.ndarray:
    seq_q = query.shape[2]
    offsets = np.asarray(lengths) - seq_q
    q_pos = offsets[:, None, None, None] + np.arange(seq_q)[None, None, :, None]
    kv_pos = np.arange(keys.shape[2])[None, None, None, :]
    mask = (kv_pos < np.asarray(lengths)[:, None, None, None]) & (kv_pos <= q_pos)
    if attention_window is not None:
        mask = mask & (q_pos - kv_pos < attention_window)
    shifted = (
        None
        if score_mod is None
        else _mods.shift_positions(score_mod, q_offset=jnp.asarray(offsets))
    )
    return reference_attention(query, keys, values, mask=mask, score_mod=shifted)


@pytest.mark.parametrize(
    ("use_pallas", "seq_q", "block_size"),
    [(True, 1, 8), (False, 1, 8), (False, 4, 4)],
    ids=["pallas-T1-P8", "xla-T1-P8", "xla-T4-P4"],
)
def test_paged_equals_contiguous_and_reference(
    use_pallas: bool, seq_q: int, block_size: int
) -> None:
    query, keys, values = _inputs(seq_q, num_heads=8, num_kv_heads=2, seq_q=seq_q, cache_len=64)
    lengths = jnp.array([37, 64], jnp.int32)
    key_pool, value_pool, table = _paged_from_contiguous(
        keys, values, lengths, block_size=block_size, seed=seq_q
    )
    paged = jax.jit(
        lambda q, kp, vp, t, n: paged_decode_attention(
            q, kp, vp, t, n, use_pallas=use_pallas, interpret=True, block_kv=16, num_splits=2
        )
    )(query, key_pool, value_pool, table, lengths)
    contiguous = decode_attention(query, keys, values, lengths, use_pallas=False, block_kv=16)
    assert relative_error(paged, contiguous) < 1e-5
    assert relative_error(paged, _reference(query, keys, values, lengths)) < 1e-5


@pytest.mark.parametrize("use_pallas", [True, False], ids=["pallas", "xla"])
def test_paged_window_and_score_mod(use_pallas: bool) -> None:
    # Four query tokens of an MQA group of 4 heads: a 16-row tile, 16-key blocks.
    query, keys, values = _inputs(7, num_heads=4, num_kv_heads=1, seq_q=4, cache_len=64)
    lengths = jnp.array([50, 9], jnp.int32)
    key_pool, value_pool, table = _paged_from_contiguous(
        keys, values, lengths, block_size=16, seed=7
    )
    score_mod = _mods.alibi_mod(4)
    paged = jax.jit(
        lambda q, kp, vp, t, n: paged_decode_attention(
            q,
            kp,
            vp,
            t,
            n,
            score_mod=score_mod,
            attention_window=12,
            use_pallas=use_pallas,
            interpret=True,
        )
    )(query, key_pool, value_pool, table, lengths)
    expected = _reference(query, keys, values, lengths, attention_window=12, score_mod=score_mod)
    assert relative_error(paged, expected) < 1e-5


def test_paged_argument_errors() -> None:
    query, keys, values = _inputs(8, num_heads=4, num_kv_heads=2, seq_q=1, cache_len=32)
    lengths = jnp.array([5, 6], jnp.int32)
    key_pool, value_pool, table = _paged_from_contiguous(
        keys, values, lengths, block_size=4, seed=8
    )
    with pytest.raises((ValueError, TypeError), match="block_table|B"):
        paged_decode_attention(query, key_pool, value_pool, table[:1], lengths)
    with pytest.raises(NotImplementedError, match="use_pallas=False"):
        paged_decode_attention(
            query,
            key_pool,
            value_pool,
            table,
            lengths,
            score_mod=_mods.prefix_lm_mod(jnp.array([1, 2])),
            use_pallas=True,
            interpret=True,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 128])
def test_compiled_paged_pallas_on_gpu(block_size: int) -> None:
    kq, kk, kv = jax.random.split(jax.random.key(9), 3)
    query = jax.random.normal(kq, (2, 32, 1, 128), jnp.bfloat16)
    keys = jax.random.normal(kk, (2, 8, 1024, 128), jnp.bfloat16)
    values = jax.random.normal(kv, (2, 8, 1024, 128), jnp.bfloat16)
    lengths = jnp.array([1024, 517], jnp.int32)
    key_pool, value_pool, table = _paged_from_contiguous(
        keys, values, lengths, block_size=block_size, seed=9
    )
    out = jax.jit(lambda q, kp, vp, t, n: paged_decode_attention(q, kp, vp, t, n, use_pallas=True))(
        query, key_pool, value_pool, table, lengths
    )
    assert relative_error(out, _reference(query, keys, values, lengths)) < 2e-2
