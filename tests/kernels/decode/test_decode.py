"""The split-KV decode kernel (Pallas in interpret mode, and the XLA path) against the reference."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _mods
from attnax.kernels.decode import decode_attention
from tests._reference import reference_attention, relative_error


def _inputs(
    seed: int,
    *,
    batch: int = 2,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    seq_q: int = 1,
    cache_len: int = 64,
    head_dim: int = 16,
    dtype: jnp.dtype = jnp.float32,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    query = jax.random.normal(kq, (batch, num_heads, seq_q, head_dim), jnp.float32)
    keys = jax.random.normal(kk, (batch, num_kv_heads, cache_len, head_dim), jnp.float32)
    values = jax.random.normal(kv, (batch, num_kv_heads, cache_len, head_dim), jnp.float32)
    return query.astype(dtype), keys.astype(dtype), values.astype(dtype)


def _decode(
    query: jax.Array, keys: jax.Array, values: jax.Array, lengths: jax.Array, **kwargs: Any
) -> jax.Array:
    """decode_attention under one jit (a single compile is much faster than eager dispatch)."""
    fn = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, **kwargs))
    out: jax.Array = fn(query, keys, values, lengths)
    return out


def _decode_reference(
    query: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    lengths: jax.Array,
    *,
    q_offset: jax.Array | None = None,
    causal: bool = True,
    attention_window: int | None = None,
    score_mod: object = None,
) -> np.ndarray:
    """float64 reference with the decode kernel's absolute positions written out as a mask."""
    _, _, seq_q, _ = query.shape
    cache_len = keys.shape[2]
    lengths_np = np.asarray(lengths)
    offsets = lengths_np - seq_q if q_offset is None else np.asarray(q_offset)
    q_pos = offsets[:, None, None, None] + np.arange(seq_q)[None, None, :, None]
    kv_pos = np.arange(cache_len)[None, None, None, :]
    mask = kv_pos < lengths_np[:, None, None, None]
    if causal:
        mask = mask & (kv_pos <= q_pos)
    if attention_window is not None:
        mask = mask & (q_pos - kv_pos < attention_window)
    shifted = None
    if score_mod is not None:
        shifted = _mods.shift_positions(score_mod, q_offset=jnp.asarray(offsets))  # type: ignore[arg-type]
    return reference_attention(query, keys, values, mask=mask, score_mod=shifted)


@pytest.mark.parametrize(
    ("use_pallas", "seq_q"),
    [(True, 1), (False, 1), (False, 4)],
    ids=["pallas-T1", "xla-T1", "xla-T4"],
)
def test_gqa_ragged_lengths(use_pallas: bool, seq_q: int) -> None:
    query, keys, values = _inputs(0, seq_q=seq_q, cache_len=64)
    lengths = jnp.array([23, 64], jnp.int32)
    out = _decode(
        query,
        keys,
        values,
        lengths,
        use_pallas=use_pallas,
        interpret=True,
        block_kv=16,
        num_splits=3,
    )
    expected = _decode_reference(query, keys, values, lengths)
    assert out.shape == query.shape
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("use_pallas", [True, False], ids=["pallas", "xla"])
def test_window_and_score_mods_see_absolute_positions(use_pallas: bool) -> None:
    # GQA 8/2 with four query tokens: the Pallas tile has 4 heads x 4 tokens = 16 rows.
    query, keys, values = _inputs(1, num_heads=8, num_kv_heads=2, seq_q=4, cache_len=48)
    lengths = jnp.array([40, 17], jnp.int32)
    score_mod = _mods.compose_score_mods(_mods.alibi_mod(8), _mods.softcap_mod(5.0))
    out = _decode(
        query,
        keys,
        values,
        lengths,
        score_mod=score_mod,
        attention_window=9,
        use_pallas=use_pallas,
        interpret=True,
        block_kv=16,
    )
    expected = _decode_reference(
        query, keys, values, lengths, attention_window=9, score_mod=score_mod
    )
    assert relative_error(out, expected) < 1e-5


def test_q_offset_non_causal_and_empty_rows_give_zeros() -> None:
    query, keys, values = _inputs(2, num_heads=2, num_kv_heads=1, seq_q=1, cache_len=32)
    lengths = jnp.array([0, 20], jnp.int32)
    offsets = jnp.array([0, 5], jnp.int32)
    out = _decode(
        query,
        keys,
        values,
        lengths,
        q_offset=offsets,
        causal=False,
        use_pallas=True,
        interpret=True,
        block_kv=16,
    )
    expected = _decode_reference(query, keys, values, lengths, q_offset=offsets, causal=False)
    assert np.all(np.asarray(out[0]) == 0.0)
    assert relative_error(out, expected) < 1e-5


def test_bf16_pallas() -> None:
    query, keys, values = _inputs(3, seq_q=1, cache_len=64, dtype=jnp.bfloat16)
    lengths = jnp.array([64, 31], jnp.int32)
    out = _decode(query, keys, values, lengths, use_pallas=True, interpret=True, block_kv=32)
    assert out.dtype == jnp.bfloat16
    expected = _decode_reference(query, keys, values, lengths)
    assert relative_error(out, expected) < 2e-2


def test_xla_path_under_jit_with_array_mod_and_odd_length() -> None:
    # A prefix-LM mod carries an array and a 50-token cache is no multiple of 16: both are for
    # the XLA path, which use_pallas=None picks on CPU.
    query, keys, values = _inputs(4, num_heads=4, num_kv_heads=2, seq_q=3, cache_len=50)
    lengths = jnp.array([50, 12], jnp.int32)
    score_mod = _mods.prefix_lm_mod(jnp.array([30, 2]))
    fn = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, score_mod=score_mod, block_kv=16))
    out = fn(query, keys, values, lengths)
    expected = _decode_reference(query, keys, values, lengths, causal=False, score_mod=score_mod)
    # The prefix-LM mod already contains causality (q >= kv) beyond the prefix.
    assert relative_error(out, expected) < 1e-5


def test_pallas_refusals_name_the_alternative() -> None:
    query, keys, values = _inputs(5, num_heads=2, num_kv_heads=1, cache_len=32)
    lengths = jnp.array([3, 4], jnp.int32)
    with pytest.raises(NotImplementedError, match="use_pallas=False"):
        decode_attention(
            query,
            keys,
            values,
            lengths,
            score_mod=_mods.prefix_lm_mod(jnp.array([1, 1])),
            use_pallas=True,
            interpret=True,
        )
    with pytest.raises((ValueError, TypeError), match="lengths|B"):
        decode_attention(query, keys, values, jnp.array([3], jnp.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("seq_q", [1, 4])
def test_compiled_pallas_on_gpu(seq_q: int) -> None:
    query, keys, values = _inputs(
        6,
        batch=2,
        num_heads=32,
        num_kv_heads=8,
        seq_q=seq_q,
        cache_len=1024,
        head_dim=128,
        dtype=jnp.bfloat16,
    )
    lengths = jnp.array([1024, 333], jnp.int32)
    out = _decode(query, keys, values, lengths, use_pallas=True, attention_window=700)
    expected = _decode_reference(query, keys, values, lengths, attention_window=700)
    assert relative_error(out, expected) < 2e-2
