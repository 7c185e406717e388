"""flash_attention: the CPU fallback, the cuDNN argument mapping (run through jax's XLA
implementation on CPU), the path choice, and GPU-only tests of the cuDNN path itself."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _mods as mods
from attnax.kernels import standard_attention
from attnax.kernels._flash import (
    _call_dot_product_attention,
    _CudnnPlan,
    cudnn_plan,
    flash_attention,
    flash_attention_bthd,
    heads_major_cudnn_available,
)
from tests._reference import random_qkv, reference_attention, relative_error

TOL = 2e-5


def _bthd(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, 1, 2)


def _value_and_grads(
    fn: Callable[..., jax.Array], *args: jax.Array, **kwargs: Any
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    def loss(*inner: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = fn(*inner, **kwargs)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    argnums = tuple(range(len(args)))
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(*args)
    return out, grads


# --------------------------------------------------------------------------- CPU fallback
# Values and gradients of the fallback (block_size=4) over every case: the shared base,
# tests/kernels/test_softmax_kernels.py.


def test_bthd_layout_matches_bhtd() -> None:
    query, key, value = random_qkv(1, num_heads=4, num_kv_heads=1, seq_q=9, dtype=jnp.bfloat16)
    mask = jax.random.bernoulli(jax.random.key(0), 0.7, (2, 1, 9, 9))
    out = flash_attention_bthd(_bthd(query), _bthd(key), _bthd(value), mask=mask, block_size=4)
    assert out.shape == (2, 9, 4, 16) and out.dtype == jnp.bfloat16
    assert relative_error(_bthd(out), reference_attention(query, key, value, mask=mask)) < 2e-2


def test_dropout_runs_on_the_fallback() -> None:
    query, key, value = random_qkv(2, seq_q=8)
    out = flash_attention(
        query, key, value, dropout_rng=jax.random.key(0), dropout_rate=0.5, deterministic=False
    )
    assert out.shape == query.shape and bool(jnp.all(jnp.isfinite(out)))


def test_bad_arguments() -> None:
    query, key, value = random_qkv(3, seq_q=4)
    with pytest.raises(ValueError, match="block_size"):
        flash_attention(query, key, value, block_size=0)
    # ValueError from the kernel's own checks, TypeError from jaxtyping when checks are on.
    with pytest.raises((ValueError, TypeError)):
        flash_attention_bthd(_bthd(query), _bthd(key[:, :3]), _bthd(value[:, :3]))
    with pytest.raises((ValueError, TypeError), match="mask"):
        flash_attention_bthd(
            _bthd(query), _bthd(key), _bthd(value), mask=jnp.ones((1, 1, 4, 5), bool)
        )


# --------------------------------------------------------------------------- path choice

HOPPER = (9, 0)


def _plan(score_mod: Any, *, dtype: Any = jnp.bfloat16, **overrides: Any) -> _CudnnPlan | None:
    kwargs: dict[str, Any] = {
        "dtypes": (dtype, dtype, dtype),
        "head_dim": 128,
        "seq_q": 64,
        "seq_kv": 64,
        "score_mod": score_mod,
        "compute_capability": HOPPER,
    }
    kwargs.update(overrides)
    return cudnn_plan(**kwargs)


def test_plan_recognises_what_cudnn_expresses() -> None:
    assert _plan(None) == _CudnnPlan(is_causal=False, window_size=None, biases=())
    assert _plan(mods.causal_mod()) == _CudnnPlan(True, None, ())
    assert _plan(mods.sliding_window_mod(16)) == _CudnnPlan(True, 16, ())
    composed = mods.compose_score_mods(
        mods.sliding_window_mod(32), mods.causal_mod(), mods.sliding_window_mod(8)
    )
    assert _plan(composed) == _CudnnPlan(True, 8, ())
    bias = jnp.ones((1, 1, 64, 64))
    plan = _plan(mods.compose_score_mods(mods.causal_mod(), mods.additive_bias_mod(bias)))
    assert plan is not None and plan.is_causal and len(plan.biases) == 1


@pytest.mark.parametrize(
    ("score_mod", "overrides"),
    [
        (mods.sliding_window_mod(16, causal=False), {}),
        (mods.alibi_mod(4), {}),
        (mods.softcap_mod(30.0), {}),
        (mods.document_mask_mod(jnp.zeros((1, 64), jnp.int32)), {}),
        (mods.prefix_lm_mod(jnp.array([3])), {}),
        (mods.shift_positions(mods.causal_mod(), q_offset=4), {}),
        (lambda s, b, h, q, kv: s, {}),
        (None, {"dtype": jnp.float32}),
        (None, {"head_dim": 12}),
        (None, {"head_dim": 512}),
        (None, {"compute_capability": None}),
        (None, {"compute_capability": (7, 5)}),
        (mods.additive_bias_mod(jnp.ones((1, 1, 63, 64))), {"seq_q": 63}),
    ],
)
def test_plan_falls_back(score_mod: Any, overrides: dict[str, Any]) -> None:
    assert _plan(score_mod, **overrides) is None


# --------------------------------------------------------------------------- cuDNN mapping


@pytest.mark.parametrize(
    ("name", "seq_q", "seq_kv", "score_mod", "with_mask"),
    [
        ("causal-gqa-unequal", 12, 16, mods.causal_mod(), False),
        ("window", 16, 16, mods.sliding_window_mod(5), False),
        ("window-past-the-keys", 20, 8, mods.sliding_window_mod(3), False),
        ("bias-mask-empty-rows", 10, 12, "bias", True),
        ("causal-window-mask", 12, 12, mods.sliding_window_mod(4), True),
    ],
)
@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_argument_mapping_through_xla(
    name: str, seq_q: int, seq_kv: int, score_mod: Any, with_mask: bool, layout: Any
) -> None:
    """The exact arguments the cuDNN path passes, run by jax's XLA implementation."""
    query, key, value = random_qkv(4, num_heads=4, num_kv_heads=2, seq_q=seq_q, seq_kv=seq_kv)
    if score_mod == "bias":
        bias = jax.random.normal(jax.random.key(5), (1, 4, seq_q, seq_kv))
        score_mod = mods.compose_score_mods(mods.causal_mod(), mods.additive_bias_mod(bias))
    mask = None
    if with_mask:
        mask = jax.random.bernoulli(jax.random.key(6), 0.6, (2, 1, seq_q, seq_kv))
        mask = mask.at[0, :, 2].set(False)
    plan = cudnn_plan(
        dtypes=(jnp.bfloat16,) * 3,
        head_dim=16,
        seq_q=seq_q,
        seq_kv=seq_kv,
        score_mod=score_mod,
        compute_capability=HOPPER,
    )
    assert plan is not None, name
    mapped = jax.jit(
        lambda q, k, v: _call_dot_product_attention(
            q, k, v, mask=mask, plan=plan, scale=0.25, implementation="xla", layout=layout
        )
    )
    to_layout = _bthd if layout == "bthd" else (lambda x: x)
    out = mapped(to_layout(query), to_layout(key), to_layout(value))
    expected = reference_attention(query, key, value, mask=mask, score_mod=score_mod)
    assert relative_error(to_layout(out), expected) < TOL, name


# --------------------------------------------------------------------------- GPU (cuDNN)

GPU_CASES: dict[str, tuple[dict[str, Any], Any]] = {
    "full": ({}, None),
    "causal": ({}, mods.causal_mod()),
    "causal-unequal": ({"seq_q": 96, "seq_kv": 128}, mods.causal_mod()),
    "window": ({}, mods.sliding_window_mod(32)),
    "gqa-causal": ({"num_heads": 8, "num_kv_heads": 2}, mods.causal_mod()),
    "mqa": ({"num_heads": 8, "num_kv_heads": 1}, None),
}


def _gpu_qkv(seed: int, **shape: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    defaults: dict[str, Any] = {
        "batch": 2,
        "num_heads": 4,
        "seq_q": 128,
        "head_dim": 64,
        "dtype": jnp.bfloat16,
    }
    defaults.update(shape)
    return random_qkv(seed, **defaults)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_cudnn_matches_reference(case: str) -> None:
    shape, score_mod = GPU_CASES[case]
    query, key, value = _gpu_qkv(10, **shape)
    out, grads = _value_and_grads(flash_attention, query, key, value, score_mod=score_mod)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, reference_attention(query, key, value, score_mod=score_mod)) < 2e-2
    f32 = [x.astype(jnp.float32) for x in (query, key, value)]
    _, want = _value_and_grads(standard_attention, *f32, score_mod=score_mod)
    for got, expected in zip(grads, want, strict=True):
        assert relative_error(got, expected) < 3e-2, case
    # The bthd entry point is the same computation without transposes.
    out_bthd = flash_attention_bthd(_bthd(query), _bthd(key), _bthd(value), score_mod=score_mod)
    assert relative_error(_bthd(out_bthd), out) < 1e-2
    # And so is the bhtd one: cuDNN takes the heads-major layout itself.
    assert heads_major_cudnn_available()
    jaxpr = str(
        jax.make_jaxpr(lambda *a: flash_attention(*a, score_mod=score_mod))(query, key, value)
    )
    assert "transpose" not in jaxpr, case


@pytest.mark.gpu
def test_cudnn_bias_gradient() -> None:
    query, key, value = _gpu_qkv(11, num_heads=4, num_kv_heads=2)
    bias = jax.random.normal(jax.random.key(1), (1, 4, 128, 128), jnp.float32)

    def attend(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
        def inner(q: jax.Array, k: jax.Array, v: jax.Array, b: jax.Array) -> jax.Array:
            mod = mods.compose_score_mods(mods.causal_mod(), mods.additive_bias_mod(b))
            return fn(q, k, v, score_mod=mod)

        return inner

    out, grads = _value_and_grads(attend(flash_attention), query, key, value, bias)
    mod = mods.compose_score_mods(mods.causal_mod(), mods.additive_bias_mod(bias))
    assert relative_error(out, reference_attention(query, key, value, score_mod=mod)) < 2e-2
    f32 = [x.astype(jnp.float32) for x in (query, key, value)]
    _, want = _value_and_grads(attend(standard_attention), *f32, bias)
    for name, got, expected in zip(("q", "k", "v", "bias"), grads, want, strict=True):
        assert relative_error(got, expected) < 3e-2, name


@pytest.mark.gpu
def test_cudnn_dense_mask_empty_rows_are_zero() -> None:
    query, key, value = _gpu_qkv(12)
    mask = jax.random.bernoulli(jax.random.key(2), 0.5, (2, 1, 128, 128)).at[:, :, 5].set(False)
    out, grads = _value_and_grads(flash_attention, query, key, value, mask=mask)
    assert np.all(np.asarray(out[:, :, 5], np.float32) == 0.0)
    assert relative_error(out, reference_attention(query, key, value, mask=mask)) < 2e-2
    for grad in grads:
        assert np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.gpu
def test_cudnn_path_rejects_dropout() -> None:
    query, key, value = _gpu_qkv(13)
    with pytest.raises(NotImplementedError, match="memory_efficient_attention"):
        flash_attention(
            query, key, value, dropout_rng=jax.random.key(0), dropout_rate=0.1, deterministic=False
        )


@pytest.mark.gpu
def test_gpu_fallbacks_match_reference() -> None:
    # ALiBi goes to Pallas (or memory-efficient), float32 to memory-efficient.
    query, key, value = _gpu_qkv(14)
    mod = mods.compose_score_mods(mods.causal_mod(), mods.alibi_mod(4))
    out = flash_attention(query, key, value, score_mod=mod)
    assert relative_error(out, reference_attention(query, key, value, score_mod=mod)) < 2e-2
    f32 = [x.astype(jnp.float32) for x in (query, key, value)]
    out32 = flash_attention(*f32, score_mod=mods.causal_mod())
    expected = reference_attention(*f32, score_mod=mods.causal_mod())
    assert relative_error(out32, expected) < 1e-3
