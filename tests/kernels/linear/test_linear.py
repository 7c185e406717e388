"""linear_attention against an independent float64 NumPy quadratic form of the same formula."""

from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from attnax._backends import softmax_backend_names
from attnax._mods import causal_mod
from attnax.kernels.linear import fused as fused_module
from attnax.kernels.linear import linear_attention
from attnax.kernels.linear import pallas as pallas_module
from attnax.kernels.linear.checks import SOFTMAX_BACKEND_NAMES
from attnax.kernels.linear.fused import fused_chunk
from tests._reference import PAIR_SCORE_MODS, random_qkv, relative_error


def _phi_np(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def linear_reference(
    query: Any,
    key: Any,
    value: Any,
    *,
    causal: bool,
    key_mask: Any = None,
    scale: float = 1.0,
) -> np.ndarray:
    """float64 quadratic form: weights phi(s q_t)·phi(k_j) over allowed j, row-normalised."""
    q = np.asarray(query, np.float64)
    k = np.asarray(key, np.float64)
    v = np.asarray(value, np.float64)
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    weights = np.einsum("bhtd,bhsd->bhts", _phi_np(q * scale), _phi_np(k))
    allowed = np.ones(weights.shape, bool)
    if causal:
        allowed &= np.tril(np.ones(weights.shape[-2:], bool))
    if key_mask is not None:
        allowed &= np.asarray(key_mask, bool)[:, None, None, :]
    weights = np.where(allowed, weights, 0.0)
    numerator = np.einsum("bhts,bhsd->bhtd", weights, v)
    denominator = weights.sum(-1, keepdims=True)
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 0.0)


def _linear_quadratic_jax(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    causal: bool,
    key_mask: jax.Array | None = None,
) -> jax.Array:
    """The same quadratic form in JAX (float32, highest precision), for reference gradients."""
    group = query.shape[1] // key.shape[1]
    k = jnp.repeat(key, group, axis=1)
    v = jnp.repeat(value, group, axis=1)
    hi = jax.lax.Precision.HIGHEST
    weights = jnp.einsum("bhtd,bhsd->bhts", jax.nn.elu(query) + 1, jax.nn.elu(k) + 1, precision=hi)
    allowed = jnp.ones(weights.shape, bool)
    if causal:
        allowed &= jnp.tril(jnp.ones(weights.shape[-2:], bool))
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :]
    weights = jnp.where(allowed, weights, 0.0)
    numerator = jnp.einsum("bhts,bhsd->bhtd", weights, v, precision=hi)
    denominator = weights.sum(-1, keepdims=True)
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_matches_reference(causal: bool, num_kv_heads: int) -> None:
    q, k, v = random_qkv(0, num_heads=4, num_kv_heads=num_kv_heads, seq_q=16, head_dim=8)
    out = linear_attention(q, k, v, causal=causal, chunk_size=4)
    expected = linear_reference(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("chunk_size", [1, 16])
def test_chunk_size_does_not_change_result(chunk_size: int) -> None:
    q, k, v = random_qkv(1, num_heads=2, seq_q=16, head_dim=8)
    out = linear_attention(q, k, v, chunk_size=chunk_size)
    assert relative_error(out, linear_reference(q, k, v, causal=True)) < 1e-5


def test_scale_multiplies_query_before_feature_map() -> None:
    q, k, v = random_qkv(2, num_heads=2, seq_q=8, head_dim=8)
    out = linear_attention(q, k, v, causal=False, scale=0.5)
    assert relative_error(out, linear_reference(q, k, v, causal=False, scale=0.5)) < 1e-5
    default = linear_attention(q, k, v, causal=False)
    assert relative_error(default, linear_reference(q, k, v, causal=False, scale=1.0)) < 1e-5


def test_unequal_lengths_non_causal_ignores_chunk_size() -> None:
    q, k, v = random_qkv(3, num_heads=4, num_kv_heads=2, seq_q=5, seq_kv=11, head_dim=8)
    out = linear_attention(q, k, v, causal=False, chunk_size=4)
    assert relative_error(out, linear_reference(q, k, v, causal=False)) < 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_padding_mask_and_fully_padded_row(causal: bool) -> None:
    q, k, v = random_qkv(4, batch=3, num_heads=4, num_kv_heads=2, seq_q=8, head_dim=8)
    lengths = jnp.array([8, 5, 0])  # the last batch row has no key at all
    key_mask = jnp.arange(8)[None, :] < lengths[:, None]
    # Garbage in padded slots must not leak into the result.
    k = jnp.where(key_mask[:, None, :, None], k, jnp.nan)
    v = jnp.where(key_mask[:, None, :, None], v, jnp.inf)
    mask = key_mask[:, None, None, :]
    out = linear_attention(q, k, v, mask=mask, causal=causal, chunk_size=4)
    expected = linear_reference(
        q, np.nan_to_num(k), np.nan_to_num(v), causal=causal, key_mask=key_mask
    )
    assert relative_error(out, expected) < 1e-5
    assert np.all(np.asarray(out[2]) == 0.0)


def test_padding_mask_broadcast_over_batch() -> None:
    q, k, v = random_qkv(5, batch=2, num_heads=2, seq_q=8, head_dim=8)
    key_mask = jnp.arange(8) < 6
    out = linear_attention(q, k, v, mask=key_mask[None, None, None, :], chunk_size=4)
    expected = linear_reference(
        q, k, v, causal=True, key_mask=np.broadcast_to(np.asarray(key_mask), (2, 8))
    )
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_bf16(causal: bool) -> None:
    q, k, v = random_qkv(6, num_heads=4, num_kv_heads=2, seq_q=16, head_dim=8, dtype=jnp.bfloat16)
    out = linear_attention(q, k, v, causal=causal, chunk_size=4)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, linear_reference(q, k, v, causal=causal)) < 2e-2


@pytest.mark.parametrize(("causal", "num_kv_heads"), [(True, 1), (False, 2), (True, 2)])
def test_gradients(causal: bool, num_kv_heads: int) -> None:
    q, k, v = random_qkv(7, batch=2, num_heads=2, num_kv_heads=num_kv_heads, seq_q=8, head_dim=4)
    lengths = jnp.array([8, 3])
    key_mask = jnp.arange(8)[None, :] < lengths[:, None]
    cotangent = jax.random.normal(jax.random.key(70), q.shape)

    def loss_kernel(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        out = linear_attention(
            q, k, v, mask=key_mask[:, None, None, :], causal=causal, chunk_size=4
        )
        return jnp.sum(out * cotangent)

    def loss_reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        out = _linear_quadratic_jax(q, k, v, causal=causal, key_mask=key_mask)
        return jnp.sum(out * cotangent)

    grads = jax.grad(loss_kernel, argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss_reference, argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected, strict=True):
        assert relative_error(got, want) < 1e-4


def test_fully_padded_row_has_finite_zero_gradients() -> None:
    q, k, v = random_qkv(8, batch=1, num_heads=2, seq_q=4, head_dim=4)
    mask = jnp.zeros((1, 1, 1, 4), bool)

    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.sum(linear_attention(q, k, v, mask=mask, chunk_size=2) ** 2)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for grad in grads:
        assert np.all(np.asarray(grad) == 0.0)


def test_under_jit() -> None:
    q, k, v = random_qkv(9, num_heads=2, seq_q=8, head_dim=4)
    out = jax.jit(lambda q, k, v: linear_attention(q, k, v, chunk_size=4))(q, k, v)
    assert relative_error(out, linear_reference(q, k, v, causal=True)) < 1e-5


def test_length_not_multiple_of_chunk_size_raises() -> None:
    q, k, v = random_qkv(10, num_heads=2, seq_q=12, head_dim=4)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, chunk_size=8)
    # Non-causal attention has no chunks, and a sequence shorter than a chunk is one chunk.
    linear_attention(q, k, v, causal=False, chunk_size=8)
    linear_attention(q, k, v, chunk_size=64)


@pytest.mark.parametrize("chunk_size", [0, -4])
def test_bad_chunk_size_raises(chunk_size: int) -> None:
    q, k, v = random_qkv(11, num_heads=2, seq_q=8, head_dim=4)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, chunk_size=chunk_size)


@pytest.mark.parametrize("mod", sorted(PAIR_SCORE_MODS))
def test_score_mod_raises(mod: str) -> None:
    """A mod other than causal masking is refused, naming the backends that apply it.

    (Before issue 19 item 5 the causal mod was refused too; it is now applied, below.)
    """
    q, k, v = random_qkv(12, num_heads=2, seq_q=8, head_dim=4)
    with pytest.raises(NotImplementedError, match="score_mod") as error:
        linear_attention(q, k, v, score_mod=PAIR_SCORE_MODS[mod]())
    for backend in softmax_backend_names():
        assert repr(backend) in str(error.value)
    assert "standard_attention" in str(error.value)


@pytest.mark.parametrize("causal", [False, True])
def test_causal_mod_is_applied(causal: bool) -> None:
    """causal_mod() is the causal form, whatever ``causal`` says."""
    q, k, v = random_qkv(12, num_heads=2, num_kv_heads=1, seq_q=8, head_dim=4)
    out = linear_attention(q, k, v, causal=causal, chunk_size=4, score_mod=causal_mod())
    assert relative_error(out, linear_reference(q, k, v, causal=True)) < 1e-5


def test_softmax_backend_names_match_the_table() -> None:
    """The kernels' constant (kernels never import the table) is the table's list."""
    assert SOFTMAX_BACKEND_NAMES == softmax_backend_names()


def test_active_dropout_raises() -> None:
    q, k, v = random_qkv(13, num_heads=2, seq_q=8, head_dim=4)
    with pytest.raises(NotImplementedError, match="dropout"):
        linear_attention(
            q, k, v, dropout_rate=0.1, deterministic=False, dropout_rng=jax.random.key(0)
        )
    # Inactive dropout is fine.
    linear_attention(q, k, v, dropout_rate=0.1, deterministic=True, chunk_size=4)


@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (2, 2, 1, 8)])
def test_non_padding_mask_raises(shape: tuple[int, ...]) -> None:
    q, k, v = random_qkv(14, batch=2, num_heads=2, seq_q=8, head_dim=4)
    with pytest.raises(NotImplementedError, match="standard_attention"):
        linear_attention(q, k, v, mask=jnp.ones(shape, bool))


def test_causal_unequal_lengths_raises() -> None:
    q, k, v = random_qkv(15, num_heads=2, seq_q=4, seq_kv=8, head_dim=4)
    with pytest.raises(NotImplementedError, match="causal"):
        linear_attention(q, k, v)


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


def test_no_quadratic_intermediate_forward_and_backward() -> None:
    seq = 256
    q, k, v = random_qkv(16, batch=1, num_heads=1, seq_q=seq, head_dim=4)

    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.sum(linear_attention(q, k, v, chunk_size=16))

    largest = _largest_intermediate(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    assert largest < seq * seq // 8


# --------------------------------------------------------------------------- fused kernels


@pytest.mark.parametrize(
    ("num_kv_heads", "seq", "chunk_size", "scale"),
    [(4, 64, 16, None), (2, 64, 32, 0.5), (1, 16, 64, None)],
)
def test_fused_kernels_match_reference_interpreted(
    num_kv_heads: int, seq: int, chunk_size: int, scale: float | None
) -> None:
    """The Pallas forward (run by the interpreter) and its backward against float64."""
    q, k, v = random_qkv(21, num_heads=4, num_kv_heads=num_kv_heads, seq_q=seq, head_dim=16)

    def fused(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return linear_attention(
            q, k, v, chunk_size=chunk_size, scale=scale, use_pallas=True, interpret=True
        )

    expected = linear_reference(q, k, v, causal=True, scale=1.0 if scale is None else scale)
    assert relative_error(fused(q, k, v), expected) < 1e-5
    weights = jnp.cos(jnp.arange(q.size, dtype=q.dtype).reshape(q.shape))
    got = jax.grad(lambda *a: jnp.sum(fused(*a) * weights), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(
        lambda *a: jnp.sum(
            linear_attention(*a, chunk_size=chunk_size, scale=scale, use_pallas=False) * weights
        ),
        argnums=(0, 1, 2),
    )(q, k, v)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert relative_error(g, w) < 1e-5, name


def test_fused_kernels_bf16_interpreted() -> None:
    q, k, v = random_qkv(22, num_heads=4, num_kv_heads=2, seq_q=64, head_dim=16, dtype=jnp.bfloat16)
    out = linear_attention(q, k, v, chunk_size=16, use_pallas=True, interpret=True)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, linear_reference(q, k, v, causal=True)) < 2e-2
    weights = jnp.sin(jnp.arange(q.size, dtype=jnp.float32).reshape(q.shape))

    def loss(use_pallas: bool) -> Any:
        return lambda *a: jnp.sum(
            linear_attention(*a, chunk_size=16, use_pallas=use_pallas, interpret=use_pallas).astype(
                jnp.float32
            )
            * weights
        )

    got = jax.grad(loss(True), argnums=(0, 1, 2))(q, k, v)
    as_f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.grad(loss(False), argnums=(0, 1, 2))(*as_f32)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        assert relative_error(g, w) < 3e-2, name


def test_fused_kernels_raise_short_chunks_to_128_interpreted() -> None:
    """chunk_size=16 over 256 positions runs the kernels with 128-position chunks, same result."""
    assert [fused_chunk(c, t) for c, t in [(64, 16384), (16, 256), (16, 192), (256, 512)]] == [
        128,
        128,
        16,
        256,
    ]
    q, k, v = random_qkv(26, num_heads=2, num_kv_heads=1, seq_q=256, head_dim=8)
    out = linear_attention(q, k, v, chunk_size=16, use_pallas=True, interpret=True)
    assert relative_error(out, linear_reference(q, k, v, causal=True)) < 1e-5


def test_fused_kernels_under_vmap_and_grad_interpreted() -> None:
    """vmap over an extra leading axis batches the Pallas calls, forward and backward."""
    keys = jax.random.split(jax.random.key(27), 3)
    q, k, v = (jax.random.normal(key, (3, 1, 2, 64, 16)) for key in keys)

    def batched(use_pallas: bool) -> Any:
        return jax.vmap(
            lambda *a: linear_attention(
                *a, chunk_size=16, use_pallas=use_pallas, interpret=use_pallas
            )
        )

    assert relative_error(batched(True)(q, k, v), batched(False)(q, k, v)) < 1e-5
    got = jax.grad(lambda *a: jnp.sum(jnp.sin(batched(True)(*a))), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(jnp.sin(batched(False)(*a))), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert relative_error(g, w) < 1e-5, name


@pytest.mark.parametrize("per_program", [2, 3])
def test_fused_several_chunks_per_program_interpreted(
    monkeypatch: pytest.MonkeyPatch, per_program: int
) -> None:
    """Every kernel looping over several chunks per program (3 rounds down to 2 of 4)."""
    q, k, v = random_qkv(25, num_heads=4, num_kv_heads=2, seq_q=64, head_dim=16)
    for kernel in pallas_module.CHUNKS_PER_PROGRAM:
        monkeypatch.setitem(pallas_module.CHUNKS_PER_PROGRAM, kernel, per_program)

    def fused(*a: jax.Array) -> jax.Array:
        return linear_attention(*a, chunk_size=16, use_pallas=True, interpret=True)

    assert relative_error(fused(q, k, v), linear_reference(q, k, v, causal=True)) < 1e-5
    got = jax.grad(lambda *a: jnp.sum(jnp.sin(fused(*a))), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(
        lambda *a: jnp.sum(jnp.sin(linear_attention(*a, chunk_size=16, use_pallas=False))),
        argnums=(0, 1, 2),
    )(q, k, v)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert relative_error(g, w) < 1e-5, name


@pytest.mark.parametrize(
    ("causal", "padded", "match"),
    [(False, False, "non-causal"), (True, True, "key-padding mask")],
)
def test_fused_refusals_name_the_reason(causal: bool, padded: bool, match: str) -> None:
    q, k, v = random_qkv(23, num_heads=2, num_kv_heads=2, seq_q=16, head_dim=8)
    mask = jnp.ones((2, 1, 1, 16), bool) if padded else None
    with pytest.raises(NotImplementedError, match=f"use_pallas=True.*{match}"):
        linear_attention(q, k, v, causal=causal, mask=mask, use_pallas=True, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize(("num_kv_heads", "head_dim", "chunk_size"), [(2, 64, 64), (8, 128, 128)])
def test_fused_kernels_on_gpu(
    monkeypatch: pytest.MonkeyPatch, num_kv_heads: int, head_dim: int, chunk_size: int
) -> None:
    """Compiled Triton kernels (bf16) against the XLA formulation, values and gradients."""
    monkeypatch.setattr(fused_module, "FUSED_MIN_CHUNK", 0)  # run the chunk asked for
    q, k, v = random_qkv(
        24,
        num_heads=8,
        num_kv_heads=num_kv_heads,
        seq_q=512,
        head_dim=head_dim,
        dtype=jnp.bfloat16,
    )
    weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32).reshape(q.shape))

    def loss(use_pallas: bool) -> Any:
        return lambda *a: jnp.sum(
            linear_attention(*a, chunk_size=chunk_size, use_pallas=use_pallas).astype(jnp.float32)
            * weights
        )

    grad_jaxpr = str(jax.make_jaxpr(jax.grad(loss(True), argnums=(0, 1, 2)))(q, k, v))
    for kernel in ("chunk_outputs", "grad_states", "grad_query", "grad_key_value"):
        assert f"attnax_linear_{kernel}" in grad_jaxpr, kernel
    fused = jax.jit(lambda *a: linear_attention(*a, chunk_size=chunk_size, use_pallas=True))(
        q, k, v
    )
    assert relative_error(fused, linear_reference(q, k, v, causal=True)) < 2e-2
    got = jax.jit(jax.grad(loss(True), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(False), argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert relative_error(g, w) < 1e-2, name
