"""The dtype rule (issue 22): non-float query/key/value are refused by every kernel, the layer
and the caches with a TypeError naming the argument; mixed floats are promoted as
``jnp.result_type`` promotes them."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnax
from tests._reference import random_qkv, reference_attention

Kernel = Callable[..., jax.Array]

# Every kernel that takes (query, key, value) in (B, H, T, D); pallas_flash interpreted on CPU.
QKV_KERNELS: dict[str, Kernel] = {
    "standard_attention": attnax.standard_attention,
    "memory_efficient_attention": attnax.memory_efficient_attention,
    "flash_attention": attnax.flash_attention,
    "pallas_flash_attention": lambda q, k, v, **kw: attnax.pallas_flash_attention(
        q, k, v, interpret=True, **kw
    ),
    "linear_attention": attnax.linear_attention,
    "lite_attention": attnax.lite_attention,
    "ring_attention": attnax.ring_attention,
    "decode_attention": lambda q, k, v, **kw: attnax.kernels.decode_attention(
        q, k, v, jnp.full((q.shape[0],), k.shape[2], jnp.int32), causal=False, **kw
    ),
}

BAD_DTYPES = {
    "int32": lambda x: (x * 3).astype(jnp.int32),
    "bool": lambda x: x > 0,
    "complex64": lambda x: x.astype(jnp.complex64),
}


@pytest.mark.parametrize("checks", [False, True], ids=["checks-off", "checks-on"])
@pytest.mark.parametrize("bad", sorted(BAD_DTYPES))
@pytest.mark.parametrize("argument", ["query", "key", "value"])
@pytest.mark.parametrize("kernel_name", sorted(QKV_KERNELS))
def test_non_float_input_is_refused_naming_the_argument(
    kernel_name: str, argument: str, bad: str, checks: bool
) -> None:
    q, k, v = random_qkv(0, batch=1, num_heads=2, seq_q=8, head_dim=8)
    arrays = {"query": q, "key": k, "value": v}
    arrays[argument] = BAD_DTYPES[bad](arrays[argument])
    bad_dtype = str(jnp.result_type(arrays[argument]))
    with attnax.shape_checks(checks):
        with pytest.raises(TypeError) as error:
            QKV_KERNELS[kernel_name](arrays["query"], arrays["key"], arrays["value"])
    message = str(error.value)
    # The decode kernel names its cache operands in the plural (keys, values).
    named = argument + "s" if kernel_name == "decode_attention" and argument != "query" else argument
    assert f"`{named}` must have a floating dtype" in message
    assert bad_dtype in message
    assert f"{named}.astype(jnp.float32)" in message
    assert message.startswith(kernel_name.removesuffix("_attention")) or kernel_name in message


def test_issue_example_integer_inputs_raise() -> None:
    """The issue's own reproduction: q = k = v = arange % 5 in int32."""
    x = jnp.arange(128, dtype=jnp.int32).reshape(2, 2, 4, 8) % 5
    for kernel in (
        attnax.standard_attention,
        attnax.memory_efficient_attention,
        attnax.flash_attention,
    ):
        with pytest.raises(TypeError, match=r"`query` must have a floating dtype.*got int32"):
            kernel(x, x, x)


@pytest.mark.parametrize(
    "kernel_name",
    [
        "standard_attention",
        "memory_efficient_attention",
        "flash_attention",
        "pallas_flash_attention",
        "ring_attention",
        "decode_attention",
    ],
)
def test_mixed_floats_promote_like_result_type(kernel_name: str) -> None:
    """bf16 query with float32 key/value computes and returns in float32, as if cast first."""
    q, k, v = random_qkv(1, batch=1, num_heads=2, seq_q=8, head_dim=8)
    q_half = q.astype(jnp.bfloat16)
    out = QKV_KERNELS[kernel_name](q_half, k, v)
    assert out.dtype == jnp.float32
    expected = reference_attention(np.asarray(q_half.astype(jnp.float32)), k, v)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5)
    cast_first = QKV_KERNELS[kernel_name](q_half.astype(jnp.float32), k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(cast_first), atol=1e-6, rtol=1e-6)


def test_mixed_floats_gradient_flows_to_each_input_dtype() -> None:
    q, k, v = random_qkv(2, batch=1, num_heads=2, seq_q=8, head_dim=8)
    q_half = q.astype(jnp.bfloat16)

    def loss(query: Any, key: Any, value: Any) -> jax.Array:
        return jnp.sum(attnax.memory_efficient_attention(query, key, value) * v[:, :, :8])

    dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q_half, k, v)
    assert (dq.dtype, dk.dtype, dv.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    ref = jax.grad(loss, argnums=(0, 1, 2))(q_half.astype(jnp.float32), k, v)
    np.testing.assert_allclose(np.asarray(dk), np.asarray(ref[1]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(dq, np.float32), np.asarray(ref[0].astype(jnp.bfloat16), np.float32)
    )


def test_layer_refuses_integer_inputs() -> None:
    layer = attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=2, in_features=8)
    x = jnp.arange(16, dtype=jnp.int32).reshape(1, 2, 8)
    with pytest.raises(TypeError, match=r"`x` must have a floating dtype"):
        layer(x)
    with pytest.raises(TypeError, match=r"`context` must have a floating dtype"):
        layer(x.astype(jnp.float32), context=x)


def test_caches_refuse_integer_keys() -> None:
    cache = attnax.init_kv_layer_cache(1, 2, 8, 16)
    keys = jnp.ones((1, 2, 3, 8), jnp.int32)
    with pytest.raises(TypeError, match=r"`keys_new` must have a floating dtype"):
        attnax.update_kv_layer_cache(cache, keys, keys.astype(jnp.float32), 0)
    paged = attnax.init_paged_kv_cache(
        num_blocks=4, block_size=4, num_kv_heads=2, head_dim=8, batch_size=1, max_blocks_per_seq=4
    )
    paged, _ = attnax.allocate_blocks(
        paged, sequence_idx=0, num_new_tokens=3, free_block_ids=[0, 1, 2, 3]
    )
    with pytest.raises(TypeError, match=r"`values_new` must have a floating dtype"):
        attnax.append_kv(paged, 0, keys[0].astype(jnp.float32), keys[0])
