"""The reference kernel against the float64 NumPy reference: values, gradients, dropout."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnax
from tests._reference import random_qkv, reference_attention, relative_error

CASES = [
    dict(num_heads=4, num_kv_heads=4, seq_q=16, seq_kv=16),
    dict(num_heads=4, num_kv_heads=2, seq_q=9, seq_kv=23),  # GQA, unequal lengths
    dict(num_heads=6, num_kv_heads=1, seq_q=17, seq_kv=5),  # MQA
]

MODS: dict[str, Callable[[int], attnax.ScoreMod | None]] = {
    "none": lambda heads: None,
    "causal": lambda heads: attnax.causal_mod(),
    "alibi+causal": lambda heads: attnax.compose_score_mods(attnax.causal_mod(), attnax.alibi_mod(heads)),
    "window": lambda heads: attnax.sliding_window_mod(4),
    "softcap": lambda heads: attnax.softcap_mod(2.0),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mod_name", list(MODS))
def test_matches_float64_reference(case: dict[str, int], mod_name: str) -> None:
    q, k, v = random_qkv(hash((mod_name, tuple(case.values()))) % 1000, **case)
    score_mod = MODS[mod_name](case["num_heads"])
    out = attnax.standard_attention(q, k, v, score_mod=score_mod)
    expected = reference_attention(q, k, v, score_mod=score_mod)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_error(out, expected) < 1e-5


def test_dense_mask_and_fully_masked_rows_give_zeros_and_finite_grads() -> None:
    q, k, v = random_qkv(3, num_heads=4, num_kv_heads=2, seq_q=8, seq_kv=12)
    mask = jax.random.bernoulli(jax.random.key(9), 0.5, (2, 1, 8, 12))
    mask = mask.at[:, :, 3, :].set(False)  # row 3 sees nothing
    out = attnax.standard_attention(q, k, v, mask=mask)
    np.testing.assert_array_equal(np.asarray(out[:, :, 3]), 0.0)
    assert relative_error(out, reference_attention(q, k, v, mask=mask)) < 1e-5
    grads = jax.grad(lambda *a: attnax.standard_attention(*a, mask=mask).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def _x64_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """An independent float64 JAX formula (repeat heads, plain softmax) for gradients."""
    group = q.shape[1] // k.shape[1]
    k = jnp.repeat(k, group, axis=1)
    v = jnp.repeat(v, group, axis=1)
    s = jnp.einsum("bhtd,bhsd->bhts", q, k) / jnp.sqrt(q.shape[-1])
    s = jnp.where(mask, s, -1e300)
    return jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(s, axis=-1), v)


def test_gradients_match_float64() -> None:
    q, k, v = random_qkv(5, num_heads=4, num_kv_heads=2, seq_q=7, seq_kv=11)
    mask = jnp.tril(jnp.ones((7, 11), bool), k=4)[None, None]
    cot = jax.random.normal(jax.random.key(2), q.shape)

    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.sum(attnax.standard_attention(q, k, v, mask=mask) * cot)

    def loss64(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.sum(_x64_attention(q, k, v, mask) * cot.astype(jnp.float64))

    got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    with jax.enable_x64(True):
        q64, k64, v64 = (jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v))
        want = [np.asarray(w) for w in jax.grad(loss64, argnums=(0, 1, 2))(q64, k64, v64)]
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) < 1e-5


def test_bf16_accumulates_in_float32() -> None:
    q, k, v = random_qkv(11, num_heads=4, num_kv_heads=2, seq_q=64, seq_kv=64, head_dim=32, dtype=jnp.bfloat16)
    out = attnax.standard_attention(q, k, v, score_mod=attnax.causal_mod())
    assert out.dtype == jnp.bfloat16
    expected = reference_attention(q, k, v, score_mod=attnax.causal_mod())
    assert relative_error(out, expected) < 1e-2


def test_dropout_scales_and_is_deterministic_when_asked() -> None:
    q, k, v = random_qkv(13, num_heads=2, seq_q=8, seq_kv=8)
    base = attnax.standard_attention(q, k, v)
    same = attnax.standard_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(0), deterministic=True)
    np.testing.assert_allclose(np.asarray(same), np.asarray(base), rtol=1e-6)
    dropped = attnax.standard_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(0), deterministic=False)
    assert not np.allclose(np.asarray(dropped), np.asarray(base))
    # Inverted dropout keeps the expectation: average over many keys approaches the base output.
    outs = jax.vmap(
        lambda key: attnax.standard_attention(q, k, v, dropout_rate=0.5, dropout_rng=key, deterministic=False)
    )(jax.random.split(jax.random.key(1), 400))
    assert relative_error(outs.mean(0), base) < 0.1
    with pytest.raises(ValueError, match="dropout_rng"):
        attnax.standard_attention(q, k, v, dropout_rate=0.5, deterministic=False)


def test_bad_layouts_are_value_errors_naming_the_argument() -> None:
    q, k, v = random_qkv(1, num_heads=4, num_kv_heads=2)
    with attnax.shape_checks(False):
        with pytest.raises(ValueError, match="`key` has 3 heads"):
            attnax.standard_attention(q, jnp.ones((2, 3, 16, 16)), jnp.ones((2, 3, 16, 16)))
        with pytest.raises(ValueError, match="mask"):
            attnax.standard_attention(q, k, v, mask=jnp.ones((16, 16), bool))
        with pytest.raises(ValueError, match="rank 4"):
            attnax.standard_attention(q[0], k, v)
