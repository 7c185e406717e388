"""lite_attention (AFT-simple) against an independent float64 NumPy formula."""

from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from attnax._backends import softmax_backend_names
from attnax._mods import causal_mod
from attnax.kernels._lite import lite_attention
from tests._reference import PAIR_SCORE_MODS, random_qkv, relative_error


def _allowed(batch: int, seq_q: int, seq_kv: int, *, causal: bool, key_mask: Any) -> np.ndarray:
    allowed = np.ones((batch, seq_q, seq_kv), bool)
    if causal:
        allowed &= np.tril(np.ones((seq_q, seq_kv), bool))
    if key_mask is not None:
        allowed &= np.asarray(key_mask, bool)[:, None, :]
    return allowed


def lite_reference(
    query: Any,
    key: Any,
    value: Any,
    *,
    causal: bool,
    key_mask: Any = None,
    gate: Any = None,
) -> np.ndarray:
    """float64: sigmoid(g_t) * sum_s softmax_s(k_s) * v_s, a softmax over s per channel."""
    q = np.asarray(query, np.float64)
    g = q if gate is None else np.asarray(gate, np.float64)
    k = np.asarray(key, np.float64)
    v = np.asarray(value, np.float64)
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    batch, _, seq_q, _ = q.shape
    allowed = _allowed(batch, seq_q, k.shape[2], causal=causal, key_mask=key_mask)
    allowed = allowed[:, None, :, :, None]  # (B, 1, T, S, 1)
    logits = np.where(allowed, k[:, :, None, :, :], -np.inf)  # (B, H, T, S, D)
    row_max = logits.max(axis=3, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(logits - row_max)
    denominator = weights.sum(axis=3)
    numerator = (weights * v[:, :, None, :, :]).sum(axis=3)
    context = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), 0)
    return (1.0 / (1.0 + np.exp(-g))) * context


def _lite_dense_jax(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    gate: jax.Array,
    *,
    causal: bool,
    key_mask: jax.Array | None,
) -> jax.Array:
    """The same dense formula in float32 JAX, for reference gradients."""
    group = query.shape[1] // key.shape[1]
    k = jnp.repeat(key, group, axis=1)
    v = jnp.repeat(value, group, axis=1)
    batch, _, seq_q, _ = query.shape
    allowed = jnp.asarray(_allowed(batch, seq_q, k.shape[2], causal=causal, key_mask=key_mask))
    allowed = allowed[:, None, :, :, None]
    logits = jnp.where(allowed, k[:, :, None, :, :], -jnp.inf)
    weights = jax.nn.softmax(logits, axis=3, where=allowed)
    weights = jnp.where(allowed, weights, 0.0)
    context = (weights * v[:, :, None, :, :]).sum(axis=3)
    return jax.nn.sigmoid(gate) * context


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_matches_reference(causal: bool, num_kv_heads: int) -> None:
    q, k, v = random_qkv(0, num_heads=4, num_kv_heads=num_kv_heads, seq_q=12, head_dim=8)
    out = lite_attention(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_error(out, lite_reference(q, k, v, causal=causal)) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_gate_given(causal: bool) -> None:
    q, k, v = random_qkv(1, num_heads=4, num_kv_heads=2, seq_q=8, head_dim=8)
    gate = jax.random.normal(jax.random.key(10), q.shape)
    out = lite_attention(q, k, v, causal=causal, gate=gate)
    expected = lite_reference(q, k, v, causal=causal, gate=gate)
    assert relative_error(out, expected) < 1e-5
    # The gate replaces the query entirely: the query then does not matter.
    other = lite_attention(q * 3.0 + 1.0, k, v, causal=causal, gate=gate)
    np.testing.assert_allclose(np.asarray(other), np.asarray(out), rtol=1e-6, atol=1e-6)


def test_unequal_lengths_non_causal() -> None:
    q, k, v = random_qkv(2, num_heads=2, num_kv_heads=1, seq_q=5, seq_kv=9, head_dim=8)
    out = lite_attention(q, k, v)
    assert relative_error(out, lite_reference(q, k, v, causal=False)) < 1e-5


def test_large_keys_are_stable() -> None:
    q, k, v = random_qkv(3, num_heads=2, seq_q=8, head_dim=4)
    k = k * 200.0  # exp() of these overflows float32 without the running max
    for causal in (False, True):
        out = lite_attention(q, k, v, causal=causal)
        assert relative_error(out, lite_reference(q, k, v, causal=causal)) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_padding_mask_and_fully_padded_rows(causal: bool) -> None:
    q, k, v = random_qkv(4, batch=3, num_heads=4, num_kv_heads=2, seq_q=8, head_dim=8)
    # Row 1 starts with padding (left-padded), so its first causal positions see no key.
    key_mask = jnp.array(
        [[True] * 8, [False] * 3 + [True] * 5, [False] * 8],
    )
    k = jnp.where(key_mask[:, None, :, None], k, jnp.nan)
    v = jnp.where(key_mask[:, None, :, None], v, jnp.inf)
    out = lite_attention(q, k, v, mask=key_mask[:, None, None, :], causal=causal)
    expected = lite_reference(
        q, np.nan_to_num(k), np.nan_to_num(v), causal=causal, key_mask=key_mask
    )
    assert relative_error(out, expected) < 1e-5
    assert np.all(np.asarray(out[2]) == 0.0)
    if causal:
        assert np.all(np.asarray(out[1, :, :3]) == 0.0)


@pytest.mark.parametrize("causal", [False, True])
def test_bf16(causal: bool) -> None:
    q, k, v = random_qkv(5, num_heads=4, num_kv_heads=2, seq_q=16, head_dim=8, dtype=jnp.bfloat16)
    out = lite_attention(q, k, v, causal=causal)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, lite_reference(q, k, v, causal=causal)) < 2e-2


@pytest.mark.parametrize(("causal", "with_gate"), [(False, True), (True, True), (True, False)])
def test_gradients(causal: bool, with_gate: bool) -> None:
    q, k, v = random_qkv(6, batch=2, num_heads=4, num_kv_heads=2, seq_q=8, head_dim=4)
    gate = jax.random.normal(jax.random.key(60), q.shape)
    key_mask = jnp.array([[True] * 8, [False] * 2 + [True] * 4 + [False] * 2])
    mask = key_mask[:, None, None, :]
    cotangent = jax.random.normal(jax.random.key(61), q.shape)

    def loss_kernel(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array) -> jax.Array:
        out = lite_attention(q, k, v, mask=mask, causal=causal, gate=g if with_gate else None)
        return jnp.sum(out * cotangent)

    def loss_reference(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array) -> jax.Array:
        gate_value = g if with_gate else q
        out = _lite_dense_jax(q, k, v, gate_value, causal=causal, key_mask=key_mask)
        return jnp.sum(out * cotangent)

    grads = jax.grad(loss_kernel, argnums=(0, 1, 2, 3))(q, k, v, gate)
    expected = jax.grad(loss_reference, argnums=(0, 1, 2, 3))(q, k, v, gate)
    for got, want in zip(grads, expected, strict=True):
        assert np.all(np.isfinite(np.asarray(got)))
        if np.any(np.asarray(want) != 0):
            assert relative_error(got, want) < 1e-5
        else:
            assert np.all(np.asarray(got) == 0.0)


def test_fully_masked_gradients_are_zero() -> None:
    q, k, v = random_qkv(7, batch=1, num_heads=2, seq_q=4, head_dim=4)
    mask = jnp.zeros((1, 1, 1, 4), bool)
    for causal in (False, True):
        grads = jax.grad(
            lambda q, k, v, c=causal: jnp.sum(lite_attention(q, k, v, mask=mask, causal=c) ** 2),
            argnums=(0, 1, 2),
        )(q, k, v)
        for grad in grads:
            assert np.all(np.asarray(grad) == 0.0)


def test_under_jit() -> None:
    q, k, v = random_qkv(8, num_heads=2, seq_q=8, head_dim=4)
    out = jax.jit(lambda q, k, v: lite_attention(q, k, v, causal=True))(q, k, v)
    assert relative_error(out, lite_reference(q, k, v, causal=True)) < 1e-5


@pytest.mark.parametrize("mod", sorted(PAIR_SCORE_MODS))
def test_score_mod_raises(mod: str) -> None:
    """A mod other than causal masking is refused, naming the backends that apply it.

    (Before issue 19 item 5 the causal mod was refused too; it is now applied, below.)
    """
    q, k, v = random_qkv(9, num_heads=2, seq_q=8, head_dim=4)
    with pytest.raises(NotImplementedError, match="score_mod") as error:
        lite_attention(q, k, v, score_mod=PAIR_SCORE_MODS[mod]())
    for backend in softmax_backend_names():
        assert repr(backend) in str(error.value)


@pytest.mark.parametrize("causal", [False, True])
def test_causal_mod_is_applied(causal: bool) -> None:
    """causal_mod() is the causal form, whatever ``causal`` says."""
    q, k, v = random_qkv(9, num_heads=2, num_kv_heads=1, seq_q=8, head_dim=4)
    out = lite_attention(q, k, v, causal=causal, score_mod=causal_mod())
    assert relative_error(out, lite_reference(q, k, v, causal=True)) < 1e-5


def test_active_dropout_raises() -> None:
    q, k, v = random_qkv(10, num_heads=2, seq_q=8, head_dim=4)
    with pytest.raises(NotImplementedError, match="dropout"):
        lite_attention(
            q, k, v, dropout_rate=0.1, deterministic=False, dropout_rng=jax.random.key(0)
        )


@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (2, 2, 1, 8)])
def test_non_padding_mask_raises(shape: tuple[int, ...]) -> None:
    q, k, v = random_qkv(11, batch=2, num_heads=2, seq_q=8, head_dim=4)
    with pytest.raises(NotImplementedError, match="standard_attention"):
        lite_attention(q, k, v, mask=jnp.ones(shape, bool))


def test_causal_unequal_lengths_raises() -> None:
    q, k, v = random_qkv(12, num_heads=2, seq_q=4, seq_kv=8, head_dim=4)
    with pytest.raises(NotImplementedError, match="causal"):
        lite_attention(q, k, v, causal=True)


def test_gate_with_wrong_shape_raises() -> None:
    q, k, v = random_qkv(13, num_heads=2, seq_q=8, head_dim=4)
    # With shape checks on (as in the suite), jaxtyping reports the mismatch as a TypeError.
    with pytest.raises((TypeError, ValueError)):
        lite_attention(q, k, v, gate=jnp.ones((2, 2, 8, 5)))


def _largest_intermediate(fn: Any, *args: jax.Array) -> int:
    """Largest array (in elements) in the jaxpr of fn, inner jaxprs (jit, scan) included."""
    sizes: list[int] = []

    def visit(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            sizes.extend(int(np.prod(var.aval.shape)) for var in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return max(sizes)


@pytest.mark.parametrize("causal", [False, True])
def test_memory_is_linear_in_length(causal: bool) -> None:
    seq, head_dim = 256, 4
    q, k, v = random_qkv(14, batch=1, num_heads=1, seq_q=seq, head_dim=head_dim)

    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.sum(lite_attention(q, k, v, causal=causal))

    largest = _largest_intermediate(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    assert largest <= seq * head_dim
