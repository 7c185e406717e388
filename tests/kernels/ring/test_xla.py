"""Ring attention on 4 (and 8) virtual CPU devices against single-device standard attention.

conftest.py starts JAX with 8 host devices and highest matmul precision, so the ring's float32
values and gradients match ``standard_attention`` (and the float64 reference) to ~1e-6.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax._mods import (
    additive_bias_mod,
    alibi_mod,
    causal_mod,
    compose_score_mods,
    sliding_window_mod,
    softcap_mod,
)
from attnax.kernels._standard import standard_attention
from attnax.kernels.ring import sharded_ring_attention
from tests._reference import random_qkv, reference_attention, relative_error
from tests.kernels.ring._mesh import ring_mesh as _mesh


TOL = 2e-5


def _loss(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        out = fn(q, k, v)
        weights = jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))
        return jnp.sum(out * weights)

    return loss


def _assert_matches(ring: Callable[..., jax.Array], standard: Callable[..., jax.Array], qkv: Any) -> None:
    out = jax.jit(ring)(*qkv)
    expected = standard(*qkv)
    assert out.shape == expected.shape
    assert relative_error(out, expected) < TOL
    ring_grads = jax.jit(jax.grad(_loss(ring), argnums=(0, 1, 2)))(*qkv)
    standard_grads = jax.grad(_loss(standard), argnums=(0, 1, 2))(*qkv)
    for name, got, want in zip("qkv", ring_grads, standard_grads, strict=True):
        assert np.all(np.isfinite(np.asarray(got))), name
        assert relative_error(got, want) < TOL, name

CASES = [
    ("contiguous", "none", 32, 4),
    ("contiguous", "causal", 32, 4),
    ("contiguous", "alibi_causal", 32, 4),
    ("contiguous", "window", 24, 4),  # local length 6, tiles of 4: padded tiles
    ("zigzag", "causal", 32, 2),
    ("zigzag", "alibi_causal", 32, 4),
    ("zigzag", "window", 24, 4),
    ("striped", "causal", 32, 4),
]


def _mod(kind: str, num_heads: int) -> Any:
    return {
        "none": None,
        "causal": causal_mod(),
        "alibi_causal": compose_score_mods(alibi_mod(num_heads), causal_mod()),
        "window": sliding_window_mod(5),
    }[kind]


@pytest.mark.parametrize(("layout", "kind", "seq", "block_size"), CASES)
def test_ring_matches_standard_gqa(layout: str, kind: str, seq: int, block_size: int) -> None:
    mesh = _mesh(4)
    qkv = random_qkv(hash((layout, kind)) % 1000, batch=2, num_heads=4, num_kv_heads=2, seq_q=seq, head_dim=8)
    score_mod = _mod(kind, 4)

    def ring(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return sharded_ring_attention(
            q, k, v, mesh=mesh, axis_name="ring", score_mod=score_mod, layout=layout,  # type: ignore[arg-type]
            block_size=block_size,
        )

    def standard(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return standard_attention(q, k, v, score_mod=score_mod)

    _assert_matches(ring, standard, qkv)
    np.testing.assert_allclose(
        np.asarray(jax.jit(ring)(*qkv)),
        reference_attention(*qkv, score_mod=score_mod),
        rtol=1e-4,
        atol=1e-5,
    )


def test_ring_eight_devices_zigzag_causal_mqa() -> None:
    mesh = _mesh(8)
    qkv = random_qkv(8, batch=1, num_heads=2, num_kv_heads=1, seq_q=32, head_dim=8)

    def ring(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return sharded_ring_attention(
            q, k, v, mesh=mesh, axis_name="ring", score_mod=causal_mod(), layout="zigzag"
        )

    def standard(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return standard_attention(q, k, v, score_mod=causal_mod())

    _assert_matches(ring, standard, qkv)


def test_ring_key_padding_mask_softcap_and_empty_rows() -> None:
    """A key-padding mask travels with the keys; a batch row with no keys gives zeros."""
    mesh = _mesh(4)
    qkv = random_qkv(3, batch=2, num_heads=2, seq_q=16, head_dim=8)
    keep = np.ones((2, 1, 1, 16), bool)
    keep[0, ..., 11:] = False
    keep[1] = False  # every key masked: output zeros, gradients finite (zero)
    mask = jnp.asarray(keep)
    score_mod = compose_score_mods(softcap_mod(2.0), causal_mod())

    def ring(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return sharded_ring_attention(
            q, k, v, mesh=mesh, axis_name="ring", mask=mask, score_mod=score_mod, block_size=2
        )

    def standard(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return standard_attention(q, k, v, mask=mask, score_mod=score_mod)

    _assert_matches(ring, standard, qkv)
    assert np.all(np.asarray(jax.jit(ring)(*qkv))[1] == 0.0)


def test_ring_bias_gradient_is_summed_over_devices() -> None:
    """A replicated score-mod array (a learnable bias) receives the full gradient."""
    mesh = _mesh(4)
    q, k, v = random_qkv(5, batch=1, num_heads=2, seq_q=16, head_dim=8)
    bias = jax.random.normal(jax.random.key(7), (1, 2, 16, 16))

    def ring_loss(bias: jax.Array) -> jax.Array:
        mod = compose_score_mods(additive_bias_mod(bias), causal_mod())
        out = sharded_ring_attention(q, k, v, mesh=mesh, axis_name="ring", score_mod=mod, layout="zigzag")
        return jnp.sum(out * jnp.sin(out))

    def standard_loss(bias: jax.Array) -> jax.Array:
        mod = compose_score_mods(additive_bias_mod(bias), causal_mod())
        out = standard_attention(q, k, v, score_mod=mod)
        return jnp.sum(out * jnp.sin(out))

    got = jax.jit(jax.grad(ring_loss))(bias)
    want = jax.grad(standard_loss)(bias)
    assert relative_error(got, want) < TOL


def test_ring_bf16_forward() -> None:
    mesh = _mesh(4)
    qkv = random_qkv(11, batch=1, num_heads=4, num_kv_heads=2, seq_q=32, head_dim=16, dtype=jnp.bfloat16)
    out = jax.jit(
        lambda q, k, v: sharded_ring_attention(
            q, k, v, mesh=mesh, axis_name="ring", score_mod=causal_mod(), layout="zigzag"
        )
    )(*qkv)
    assert out.dtype == jnp.bfloat16
    expected = reference_attention(*qkv, score_mod=causal_mod())
    assert relative_error(out, expected) < 2e-2
