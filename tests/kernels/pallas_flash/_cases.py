"""Shared cases of the PALLAS_FLASH tests: one call checked against the float64 reference
(values, and query/key/value (and bias) gradients against ``jax.grad`` of ``standard_attention``
at highest precision, in one jitted call), the GPU case, and CUDA lowering helpers.

Interpret mode compiles slowly (several seconds per kernel), so each CPU case covers several
features at once (a mod, a head grouping, uneven lengths, a block size)."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attnax.kernels.pallas_flash import FlashConfig, flash_attention_with_config
from attnax.kernels.pallas_flash import pallas_flash_attention
from attnax.kernels._standard import standard_attention
from tests._reference import output_and_vjp, random_qkv, reference_attention, relative_error

__all__ = ["HIGHEST", "check_case", "gpu_case", "half_spec", "lowered_for_cuda"]

HIGHEST = jax.lax.Precision.HIGHEST


def check_case(
    *,
    seed: int,
    score_mod_of: Callable[..., Any] = lambda *extra: None,
    extra: tuple[jax.Array, ...] = (),
    mask: jax.Array | None = None,
    batch: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seq_q: int = 40,
    seq_kv: int = 40,
    head_dim: int = 16,
    block_q: int = 16,
    block_kv: int = 16,
    dtype: Any = jnp.float32,
    value_tol: float = 1e-5,
    grad_tol: float = 1e-5,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    query, key, value = random_qkv(
        seed,
        batch=batch,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        seq_q=seq_q,
        seq_kv=seq_kv,
        head_dim=head_dim,
        dtype=dtype,
    )
    cotangent = jax.random.normal(jax.random.key(seed + 1000), query.shape, jnp.float32)

    def kernel(q: jax.Array, k: jax.Array, v: jax.Array, *e: jax.Array) -> jax.Array:
        return pallas_flash_attention(
            q,
            k,
            v,
            mask=mask,
            score_mod=score_mod_of(*e),
            block_q=block_q,
            block_kv=block_kv,
            interpret=True,
        )

    def reference(q: jax.Array, k: jax.Array, v: jax.Array, *e: jax.Array) -> jax.Array:
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        return standard_attention(*f32, mask=mask, score_mod=score_mod_of(*e), precision=HIGHEST)

    args = (query, key, value, *extra)
    out, grads = output_and_vjp(kernel, args, cotangent)
    assert out.dtype == query.dtype and out.shape == query.shape
    expected = reference_attention(query, key, value, mask=mask, score_mod=score_mod_of(*extra))
    assert relative_error(out, expected) < value_tol
    _, expected_grads = output_and_vjp(reference, tuple(a.astype(jnp.float32) for a in args), cotangent)
    for name, got, want in zip(("query", "key", "value", "extra"), grads, expected_grads):
        assert got.shape == want.shape
        assert relative_error(got, want) < grad_tol, name
    return out, grads


def half_spec(*shape: int) -> Any:
    return jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # type: ignore[no-untyped-call]


def lowered_for_cuda(fn: Callable[..., Any], *shapes: Any) -> str:
    text: str = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    return text


def gpu_case(
    score_mod: Any,
    *,
    seq: int,
    dtype: Any,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    config: FlashConfig | None = None,
    seed: int = 20,
) -> None:
    """Values and gradients against the float32 reference: through the public entry, or with
    ``config`` through the configured one."""
    query, key, value = random_qkv(
        seed,
        batch=2,
        num_heads=8,
        num_kv_heads=num_kv_heads,
        seq_q=seq,
        head_dim=head_dim,
        dtype=dtype,
    )
    cotangent = jax.random.normal(jax.random.key(seed + 1), query.shape, jnp.float32)
    cotangent = cotangent.astype(dtype)

    def kernel(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        if config is None:
            return pallas_flash_attention(q, k, v, score_mod=score_mod)
        return flash_attention_with_config(q, k, v, score_mod=score_mod, config=config)

    def reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        return standard_attention(*f32, score_mod=score_mod, precision=HIGHEST)

    out, grads = output_and_vjp(kernel, (query, key, value), cotangent)
    want, want_grads = output_and_vjp(reference, (query, key, value), cotangent)
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3
    assert relative_error(out, want) < tol
    for got, expected in zip(grads, want_grads, strict=True):
        assert relative_error(got, expected) < 2 * tol
