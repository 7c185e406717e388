"""Every Pallas kernel inside ``jax.shard_map`` (``check_vma`` on, the default).

There a ``pallas_call`` must declare how its outputs vary over the mesh axes; these tests fail
with "manual_axis_type ... must not be None" (or a scan-carry type mismatch) if a kernel does
not. On CPU, PALLAS_FLASH's forward (whole and stepped) runs in interpret mode on two devices,
sharded over the batch. JAX 0.10's interpreter cannot discharge the other kernels inside
``shard_map`` (a scan-carry or dynamic_slice type mismatch inside JAX: the backward kernels,
LINEAR's and decode's), so those, and every gradient, are checked on the GPU, where the kernels
lower to Triton, on a one-device mesh that still types every output.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from attnax import _mods as mods
from attnax.kernels.memory_efficient import memory_efficient_attention
from attnax.kernels.pallas_flash import (
    FlashConfig,
    flash_attention_with_config,
    pallas_flash_attention,
    stepped_config,
)
from attnax.kernels.decode import decode_attention
from attnax.kernels.linear import linear_attention
from tests._reference import random_qkv, relative_error

BATCH = PartitionSpec("data")  # type: ignore[no-untyped-call]


def _sharded(fn: Callable[..., jax.Array], num_devices: int, num_args: int = 3) -> Any:
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("data",))
    return jax.shard_map(fn, mesh=mesh, in_specs=(BATCH,) * num_args, out_specs=BATCH)


@pytest.mark.parametrize("stepped", [False, True], ids=["pallas_flash", "memeff_stepped"])
def test_flash_forward_kernels_interpreted_on_two_devices(stepped: bool) -> None:
    query, key, value = random_qkv(0, batch=2, num_heads=2, seq_q=64, head_dim=16)
    config = (
        stepped_config(16, 64, 32, interpret=True, block_q=16, block_kv=16)
        if stepped
        else FlashConfig(block_q=16, block_kv=16, interpret=True)
    )
    causal = mods.causal_mod()

    def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return flash_attention_with_config(q, k, v, config=config, score_mod=causal)

    inside = jax.jit(_sharded(attend, 2))(query, key, value)
    assert relative_error(inside, attend(query, key, value)) < 1e-6


@pytest.mark.gpu
def test_gpu_kernels_and_gradients_inside_shard_map() -> None:
    query, key, value = random_qkv(
        2, batch=2, num_heads=4, num_kv_heads=2, seq_q=512, head_dim=64, dtype=jnp.bfloat16
    )
    causal = mods.causal_mod()
    kernels: dict[str, Callable[..., jax.Array]] = {
        "pallas_flash": lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=causal),
        "memeff_fused": lambda q, k, v: memory_efficient_attention(
            q, k, v, score_mod=causal, block_size=128
        ),
        "linear_fused": lambda q, k, v: linear_attention(q, k, v, chunk_size=128),
    }
    for name, fn in kernels.items():

        def loss(q: jax.Array, k: jax.Array, v: jax.Array, fn: Any = fn) -> jax.Array:
            return jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)

        sharded = _sharded(fn, 1)

        def sharded_loss(q: jax.Array, k: jax.Array, v: jax.Array, s: Any = sharded) -> jax.Array:
            return jnp.sum(s(q, k, v).astype(jnp.float32) ** 2)

        grads = jax.jit(jax.grad(sharded_loss, argnums=(0, 1, 2)))(query, key, value)
        want = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(query, key, value)
        for got, expected in zip(grads, want, strict=True):
            assert relative_error(got, expected) < 1e-3, name

    lengths = jnp.array([300, 512], jnp.int32)

    def decode(q: jax.Array, k: jax.Array, v: jax.Array, n: jax.Array) -> jax.Array:
        return decode_attention(q, k, v, n, use_pallas=True)

    step = query[:, :, :1]
    inside = jax.jit(_sharded(decode, 1, num_args=4))(step, key, value, lengths)
    assert relative_error(inside, decode(step, key, value, lengths)) < 1e-3
