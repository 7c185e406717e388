"""The Mosaic-GPU forward and backward: lowering for CUDA on CPU (alone, under vmap, as
dispatched on a Hopper GPU), shared-memory refusals, and values on a GPU."""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import pytest

from attnax.kernels._standard import standard_attention
from attnax.kernels.pallas_flash import (
    FlashConfig,
    default_config,
    flash_attention_with_config,
    pallas_flash_attention,
    prepare,
)
from attnax.kernels.pallas_flash import plan
from attnax.kernels.pallas_flash.mosaic import mosaic_forward, mosaic_gpu_available
from attnax.kernels.pallas_flash.mosaic_vjp import mosaic_backward
from attnax.kernels.pallas_flash.plan import mosaic_backward_applies, mosaic_forward_applies
from tests._reference import output_and_vjp, random_qkv, relative_error
from tests.kernels.pallas_flash._cases import HIGHEST, gpu_case, half_spec, lowered_for_cuda


@pytest.mark.skipif(not mosaic_gpu_available(), reason="this jax has no Mosaic GPU")
def test_mosaic_forward_lowers_for_cuda() -> None:
    # Lowering the Mosaic-GPU kernel (not compiling it) needs no GPU: it catches any
    # primitive, layout or shared-memory slicing Mosaic GPU cannot express, in the forward
    # alone and under vmap (its batching rule folds the mapped axis into the batch).
    q, kv = half_spec(2, 4, 256, 128), half_spec(2, 2, 256, 128)
    batched, batched_kv = half_spec(3, *q.shape), half_spec(3, *kv.shape)

    def forward(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        return mosaic_forward(q, k, v, scale=0.1, block_kv=128, stages=2)

    assert "mosaic_gpu" in lowered_for_cuda(forward, q, kv, kv)
    assert "mosaic_gpu" in lowered_for_cuda(jax.vmap(forward), batched, batched_kv, batched_kv)


@pytest.mark.skipif(not mosaic_gpu_available(), reason="this jax has no Mosaic GPU")
@pytest.mark.parametrize(
    "config",
    [
        FlashConfig(),
        FlashConfig(mosaic_dkv_block_q=128, mosaic_dq_block_kv=64),
        FlashConfig(mosaic_dkv_stages=3, mosaic_dq_stages=3, mosaic_dq_block_kv=64),
        FlashConfig(use_mosaic_backward=False),
    ],
    ids=["default", "other tiles", "three slots", "triton backward"],
)
def test_mosaic_backward_lowers_for_cuda(
    config: FlashConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As dispatched on a Hopper GPU: full attention's forward+backward (GQA) lowers to Mosaic
    # GPU alone, under vmap too; with use_mosaic_backward off, the backward stays Triton.

    q, kv = half_spec(2, 4, 256, 128), half_spec(2, 2, 256, 128)
    monkeypatch.setattr(plan, "hopper_gpu", lambda: True)

    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> Any:
        return flash_attention_with_config(q, k, v, config=config).astype(jnp.float32).sum()

    grad = jax.grad(loss, argnums=(0, 1, 2))
    for fn, shapes in ((grad, (q, kv, kv)), (jax.vmap(grad), (half_spec(3, *q.shape),
                                                               half_spec(3, *kv.shape),
                                                               half_spec(3, *kv.shape)))):
        text = lowered_for_cuda(fn, *shapes)
        assert "mosaic_gpu" in text
        assert ("__gpu$xla.gpu.triton" in text) is not config.use_mosaic_backward
    real = random_qkv(8, batch=1, num_heads=4, num_kv_heads=2, seq_q=256, head_dim=128,
                      dtype=jnp.bfloat16)
    prepared = prepare(config, *real, None, None)
    assert mosaic_backward_applies(config, prepared, 0.1) is config.use_mosaic_backward


@pytest.mark.skipif(not mosaic_gpu_available(), reason="this jax has no Mosaic GPU")
def test_mosaic_tiles_over_shared_memory_name_the_setting() -> None:
    # Tiles that overflow a block's shared memory are refused when traced, naming the
    # FlashConfig fields to lower (Mosaic GPU itself would fail only when compiling); at
    # head_dim 64 the same settings fit.
    def shapes(head_dim: int) -> tuple[Any, ...]:
        q = half_spec(1, 2, 512, head_dim)
        f32 = jax.ShapeDtypeStruct((1, 2, 512), jnp.float32)  # type: ignore[no-untyped-call]
        return q, q, q, q, f32, f32

    def backward(dkv_block_q: int, dq_block_kv: int) -> Callable[..., Any]:
        return functools.partial(mosaic_backward, scale=0.1, dkv_block_q=dkv_block_q,
                                 dq_block_kv=dq_block_kv, dkv_stages=3, dq_stages=3)

    with pytest.raises(ValueError, match="dK/dV kernel.*`mosaic_dkv_stages` or "
                       "`mosaic_dkv_block_q`"):
        jax.eval_shape(backward(128, 64), *shapes(128))
    with pytest.raises(ValueError, match="dQ kernel.*`mosaic_dq_stages` or `mosaic_dq_block_kv`"):
        jax.eval_shape(backward(64, 128), *shapes(128))
    assert len(jax.eval_shape(backward(128, 128), *shapes(64))) == 3
    q = half_spec(1, 2, 512, 128)
    with pytest.raises(ValueError, match="forward.*`mosaic_stages` or `mosaic_block_kv`"):
        jax.eval_shape(functools.partial(mosaic_forward, scale=0.1, block_kv=256, stages=2),
                       q, q, q)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("seq", "dtype", "num_kv_heads", "head_dim", "mosaic"),
    [
        (1024, jnp.bfloat16, 8, 128, True),
        (512, jnp.float16, 2, 64, True),
        (1000, jnp.bfloat16, 8, 128, False),  # padded tiles: the Triton forward
    ],
)
def test_gpu_full_attention_mosaic_forward(
    seq: int, dtype: Any, num_kv_heads: int, head_dim: int, mosaic: bool
) -> None:
    # Full attention on a Hopper GPU takes the Mosaic-GPU forward and backward (the latter
    # reads the former's log-sum-exp); a padded length takes Triton's for both.
    q, k, v = random_qkv(24, num_heads=8, num_kv_heads=num_kv_heads, seq_q=seq,
                         head_dim=head_dim, dtype=dtype)
    config = default_config(head_dim, 128, 128, False)
    prepared = prepare(config, q, k, v, None, None)
    hopper = jax.devices()[0].compute_capability.startswith("9.")
    assert mosaic_forward_applies(config, prepared, head_dim**-0.5) is (mosaic and hopper)
    assert mosaic_backward_applies(config, prepared, head_dim**-0.5) is (mosaic and hopper)
    gpu_case(None, seq=seq, dtype=dtype, num_kv_heads=num_kv_heads, head_dim=head_dim)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("seq", "dtype", "num_kv_heads", "head_dim", "config"),
    [
        (1024, jnp.bfloat16, 8, 128, FlashConfig(mosaic_dkv_block_q=128, mosaic_dq_block_kv=64)),
        (512, jnp.float16, 2, 64, FlashConfig(mosaic_dkv_block_q=128, mosaic_dkv_stages=3,
                                              mosaic_dq_stages=3)),
        (512, jnp.bfloat16, 2, 128, FlashConfig(use_mosaic_backward=False)),
    ],
    ids=["other tiles", "three slots at head_dim 64", "triton backward"],
)
def test_gpu_mosaic_backward_configs(
    seq: int, dtype: Any, num_kv_heads: int, head_dim: int, config: FlashConfig
) -> None:
    # The Mosaic-GPU backward's other tiles and slots, and the Triton backward reading the
    # Mosaic-GPU forward's log-sum-exp (use_mosaic_backward off): values and gradients.
    gpu_case(None, seq=seq, dtype=dtype, num_kv_heads=num_kv_heads, head_dim=head_dim,
              config=config, seed=26)


@pytest.mark.gpu
def test_gpu_full_attention_under_vmap() -> None:
    q, k, v = random_qkv(25, batch=6, num_heads=4, num_kv_heads=2, seq_q=512, head_dim=128,
                         dtype=jnp.bfloat16)
    shaped = [x.reshape(3, 2, *x.shape[1:]) for x in (q, k, v)]
    cotangent = jax.random.normal(jax.random.key(28), shaped[0].shape).astype(jnp.bfloat16)
    mapped = jax.vmap(pallas_flash_attention)
    reference = jax.vmap(functools.partial(standard_attention, precision=HIGHEST))
    if jax.devices()[0].compute_capability.startswith("9."):
        # On Hopper the mapped forward and backward stay Mosaic GPU (their custom_vmap rules).
        def gradients(*qkv: jax.Array) -> Any:
            return jax.vjp(mapped, *qkv)[1](cotangent)

        text = jax.jit(gradients).lower(*shaped).as_text()
        assert "mosaic_gpu" in text and "__gpu$xla.gpu.triton" not in text
    got, grads = output_and_vjp(mapped, tuple(shaped), cotangent)
    f32 = tuple(x.astype(jnp.float32) for x in shaped)
    want, want_grads = output_and_vjp(reference, f32, cotangent)
    assert relative_error(got, want) < 2e-2
    for grad, expected in zip(grads, want_grads, strict=True):
        assert relative_error(grad, expected) < 4e-2
