"""The Triton backward kernels: the dK/dV kernel's transposed tiles and the additive bias's
gradient, in interpret mode on CPU and compiled on a GPU."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _mods as mods
from attnax.kernels._standard import standard_attention
from attnax.kernels.pallas_flash import FlashConfig, flash_attention_with_config
from attnax.kernels.pallas_flash import pallas_flash_attention
from tests._reference import output_and_vjp, random_qkv, relative_error
from tests.kernels.pallas_flash._cases import HIGHEST, check_case


def test_dkv_tile_orientation() -> None:
    # The dK/dV kernel's (keys, queries) tiles, with everything whose tiles depend on the
    # orientation: a bias plane (and its gradient), document-id rows and a value mod, under
    # GQA with several blocks per row and column.
    ids = jnp.asarray(np.repeat(np.array([[0, 1, 0], [2, 2, 3]]), [20, 26, 18], axis=1))
    bias = 0.5 * jax.random.normal(jax.random.key(12), (1, 4, 64, 64), jnp.float32)
    config = FlashConfig(
        block_q=16, block_kv=16, block_q_dkv=16, block_kv_dkv=32, block_q_dq=16,
        block_kv_dq=16, interpret=True,
    )

    def score_mod(b: jax.Array) -> Any:
        return mods.compose_score_mods(
            mods.additive_bias_mod(b), mods.softcap_mod(3.0), mods.document_mask_mod(ids)
        )

    q, k, v = random_qkv(13, batch=2, num_heads=4, num_kv_heads=2, seq_q=64, seq_kv=64,
                         head_dim=16)
    cotangent = jax.random.normal(jax.random.key(14), q.shape, jnp.float32)
    args = (q, k, v, bias)
    _, grads = output_and_vjp(
        lambda q, k, v, b: flash_attention_with_config(
            q, k, v, config=config, score_mod=score_mod(b)
        ),
        args,
        cotangent,
    )
    _, want = output_and_vjp(
        lambda q, k, v, b: standard_attention(q, k, v, score_mod=score_mod(b), precision=HIGHEST),
        args,
        cotangent,
    )
    for name, got, expected in zip(("query", "key", "value", "bias"), grads, want, strict=True):
        assert relative_error(got, expected) < 1e-5, name


def test_additive_bias_gradient() -> None:
    # A learnable (1, H, T, S) bias under causal masking gets its gradient (summed over batch).
    bias = 0.5 * jax.random.normal(jax.random.key(7), (1, 4, 32, 48), jnp.float32)
    _, grads = check_case(
        seed=5,
        score_mod_of=lambda b: mods.compose_score_mods(
            mods.additive_bias_mod(b), mods.causal_mod()
        ),
        extra=(bias,),
        seq_q=32,
        seq_kv=48,
    )
    assert grads[3].shape == bias.shape


@pytest.mark.gpu
def test_gpu_bias_gradient() -> None:
    bias = jax.random.normal(jax.random.key(3), (1, 8, 512, 512), jnp.float32)
    query, key, value = random_qkv(22, num_heads=8, num_kv_heads=4, seq_q=512, head_dim=64)

    def loss(b: jax.Array, fn: Callable[..., jax.Array], **kw: Any) -> jax.Array:
        score_mod = mods.compose_score_mods(mods.additive_bias_mod(b), mods.causal_mod())
        return jnp.sum(fn(query, key, value, score_mod=score_mod, **kw) ** 2)

    got = jax.jit(jax.grad(lambda b: loss(b, pallas_flash_attention)))(bias)
    want = jax.jit(jax.grad(lambda b: loss(b, standard_attention, precision=HIGHEST)))(bias)
    assert relative_error(got, want) < 5e-3
