"""attnax kernels inside flax.nnx.MultiHeadAttention, against flax's own attention."""

import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import attnax
from attnax._interop import as_flax_attention_fn
from tests._reference import relative_error


def _pair(attention_fn: object) -> tuple[nnx.MultiHeadAttention, nnx.MultiHeadAttention]:
    kwargs = dict(num_heads=4, in_features=32, decode=False)
    ours = nnx.MultiHeadAttention(**kwargs, attention_fn=attention_fn, rngs=nnx.Rngs(0))  # type: ignore[arg-type]
    theirs = nnx.MultiHeadAttention(**kwargs, rngs=nnx.Rngs(0))  # type: ignore[arg-type]
    return ours, theirs


@pytest.mark.parametrize("kernel", ["standard", "memory_efficient"])
def test_flax_layer_with_attnax_kernel_matches_flax(kernel: str) -> None:
    from attnax.kernels.memory_efficient import memory_efficient_attention

    fn = attnax.standard_attention if kernel == "standard" else memory_efficient_attention
    ours, theirs = _pair(as_flax_attention_fn(fn))
    x = jax.random.normal(jax.random.key(1), (2, 9, 32))
    mask = jax.random.bernoulli(jax.random.key(2), 0.8, (2, 1, 9, 9)) | jnp.eye(9, dtype=bool)
    assert relative_error(ours(x, mask=mask), theirs(x, mask=mask)) < 1e-5
    causal = nnx.make_causal_mask(jnp.ones((2, 9)))
    assert relative_error(ours(x, mask=causal), theirs(x, mask=causal)) < 1e-5


def test_is_causal_and_extra_batch_axes() -> None:
    fn = as_flax_attention_fn(attnax.standard_attention)
    q = jax.random.normal(jax.random.key(3), (2, 3, 7, 4, 8))  # two leading batch axes
    k = jax.random.normal(jax.random.key(4), (2, 3, 7, 4, 8))
    out = fn(q, k, k, is_causal=True, deterministic=True)
    expected = nnx.dot_product_attention(q, k, k, mask=nnx.make_causal_mask(jnp.ones((2, 3, 7))))
    assert out.shape == q.shape
    assert relative_error(out, expected) < 1e-5


def test_state_round_trips_through_nnx_state_and_update() -> None:
    layer = attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=4, in_features=16, num_kv_heads=2, use_rope=True)
    other = attnax.MultiHeadAttention(nnx.Rngs(1), num_heads=4, in_features=16, num_kv_heads=2, use_rope=True)
    x = jax.random.normal(jax.random.key(5), (1, 6, 16))
    assert relative_error(other(x), layer(x)) > 1e-3
    nnx.update(other, nnx.state(layer))
    assert bool(jnp.all(other(x) == layer(x)))


def test_sow_weights_is_refused() -> None:
    fn = as_flax_attention_fn(attnax.standard_attention)
    q = jnp.ones((1, 2, 1, 4))
    with pytest.raises(NotImplementedError, match="sow_weights"):
        fn(q, q, q, module=object())


def test_state_round_trips_through_orbax_when_installed(tmp_path: pathlib.Path) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    layer = attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=4, in_features=16, num_kv_heads=2, use_rope=True)
    other = attnax.MultiHeadAttention(nnx.Rngs(1), num_heads=4, in_features=16, num_kv_heads=2, use_rope=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "layer", nnx.state(layer))
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "layer", nnx.state(other))
    nnx.update(other, restored)
    x = jax.random.normal(jax.random.key(5), (1, 6, 16))
    assert bool(jnp.all(other(x) == layer(x)))
