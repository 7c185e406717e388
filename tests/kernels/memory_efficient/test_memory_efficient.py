"""memory_efficient_attention against the float64 reference, values and gradients."""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _mods as mods
from attnax.kernels import standard_attention
from attnax.kernels.memory_efficient import memory_efficient_attention
from attnax.kernels.memory_efficient.plan import fit_block
from tests._reference import random_qkv, reference_attention, relative_error

# float32 kernels at HIGHEST precision: values to ~1e-6 of the float64 reference.
TOL = 2e-5


def _loss(fn: Callable[..., jax.Array], **kwargs: Any) -> Callable[..., jax.Array]:
    def loss(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
        # sin() so that every output element gets a different cotangent.
        return jnp.sum(jnp.sin(fn(query, key, value, **kwargs).astype(jnp.float32)))

    return loss


def _value_and_grads(
    fn: Callable[..., jax.Array], *args: jax.Array, **kwargs: Any
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Output and gradients of every positional argument, in one compiled program."""

    def loss(*inner: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = fn(*inner, **kwargs)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    argnums = tuple(range(len(args)))
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(*args)
    return out, grads


def _assert_matches(
    seed: int,
    *,
    score_mod: Any = None,
    mask: Any = None,
    block_size: int = 4,
    **shape: Any,
) -> None:
    query, key, value = random_qkv(seed, **shape)
    out, grads = _value_and_grads(
        memory_efficient_attention,
        query,
        key,
        value,
        mask=mask,
        score_mod=score_mod,
        block_size=block_size,
    )
    expected = reference_attention(query, key, value, mask=mask, score_mod=score_mod)
    assert out.shape == query.shape and out.dtype == query.dtype
    assert relative_error(out, expected) < TOL
    _, expected_grads = _value_and_grads(
        standard_attention, query, key, value, mask=mask, score_mod=score_mod
    )
    for name, got, want in zip(("query", "key", "value"), grads, expected_grads, strict=True):
        assert got.shape == want.shape, name
        assert relative_error(got, want) < TOL, name


# Head groupings, uneven lengths, windows, ALiBi, softcap, document/prefix masks and plain
# callables at block_size=4 are the shared base's (tests/kernels/test_softmax_kernels.py).


def test_single_block_and_large_block_size() -> None:
    # The default block_size is clamped to the (short) sequence: one tile.
    _assert_matches(11, score_mod=mods.causal_mod(), block_size=512, seq_q=7, seq_kv=7)


@pytest.mark.parametrize(("seq_q", "seq_kv"), [(1, 1), (1, 5), (6, 1)])
def test_length_one_sequences(seq_q: int, seq_kv: int) -> None:
    # A length-1 query or key still gets 8-row tiles: it must be padded to them (a property
    # test once found a crash here: a size-1 axis was taken for a broadcast mask's).
    mask = jnp.asarray(np.random.default_rng(0).random((2, 1, seq_q, seq_kv)) < 0.7)
    mask = mask.at[..., 0].set(True)
    if seq_kv > 1:
        _assert_matches(12, score_mod=mods.alibi_mod(4), block_size=8, seq_q=seq_q, seq_kv=seq_kv)
        _assert_matches(13, mask=mask, block_size=8, seq_q=seq_q, seq_kv=seq_kv)
        return
    # One key: every output row is its value row, and the query and key gradients vanish
    # (the softmax is 1 whatever the score), so they are compared absolutely.
    query, key, value = random_qkv(14, seq_q=seq_q, seq_kv=seq_kv)
    out, grads = _value_and_grads(
        memory_efficient_attention, query, key, value, mask=mask, block_size=8
    )
    _, want = _value_and_grads(standard_attention, query, key, value, mask=mask)
    assert relative_error(out, reference_attention(query, key, value, mask=mask)) < TOL
    assert float(jnp.max(jnp.abs(grads[0]))) < 1e-6
    assert float(jnp.max(jnp.abs(grads[1]))) < 1e-6
    assert relative_error(grads[2], want[2]) < TOL


def test_bias_gradient_dense_mask_and_empty_rows() -> None:
    query, key, value = random_qkv(3, num_heads=4, num_kv_heads=2, seq_q=10, seq_kv=9)
    bias = jax.random.normal(jax.random.key(1), (2, 1, 10, 9))
    mask = jax.random.bernoulli(jax.random.key(2), 0.6, (2, 1, 10, 9))
    mask = mask.at[:, :, 3].set(False).at[1, :, 8].set(False)  # fully masked rows

    def with_bias(fn: Callable[..., jax.Array], **kwargs: Any) -> Callable[..., jax.Array]:
        def attend(q: jax.Array, k: jax.Array, v: jax.Array, b: jax.Array) -> jax.Array:
            mod = mods.compose_score_mods(mods.causal_mod(), mods.additive_bias_mod(b))
            return fn(q, k, v, mask=mask, score_mod=mod, **kwargs)

        return attend

    args = (query, key, value, bias)
    out, grads = _value_and_grads(with_bias(memory_efficient_attention, block_size=4), *args)
    mod = mods.compose_score_mods(mods.causal_mod(), mods.additive_bias_mod(bias))
    expected = reference_attention(query, key, value, mask=mask, score_mod=mod)
    assert relative_error(out, expected) < TOL
    assert np.all(np.asarray(out[:, :, 3]) == 0.0)
    assert np.all(np.asarray(out[1, :, 8]) == 0.0)
    _, want = _value_and_grads(with_bias(standard_attention), *args)
    for name, got, expected_grad in zip(("q", "k", "v", "bias"), grads, want, strict=True):
        assert np.all(np.isfinite(np.asarray(got))), name
        assert relative_error(got, expected_grad) < TOL, name
    assert np.all(np.asarray(grads[0][:, :, 3]) == 0.0)


def test_every_row_masked_gives_zeros_and_finite_grads() -> None:
    query, key, value = random_qkv(4, num_heads=2, seq_q=6)
    mask = jnp.zeros((1, 1, 6, 6), bool)
    out, grads = _value_and_grads(
        memory_efficient_attention, query, key, value, mask=mask, block_size=4
    )
    assert np.all(np.asarray(out) == 0.0)
    for grad in grads:
        assert np.all(np.asarray(grad) == 0.0)


def test_bfloat16_inputs() -> None:
    query, key, value = random_qkv(5, num_heads=4, num_kv_heads=2, seq_q=12, dtype=jnp.bfloat16)
    mod = mods.causal_mod()
    out, grads = _value_and_grads(
        memory_efficient_attention, query, key, value, score_mod=mod, block_size=4
    )
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, reference_attention(query, key, value, score_mod=mod)) < 2e-2
    f32 = [x.astype(jnp.float32) for x in (query, key, value)]
    _, want = _value_and_grads(standard_attention, *f32, score_mod=mod)
    for got, expected in zip(grads, want, strict=True):
        assert got.dtype == jnp.bfloat16
        assert relative_error(got, expected) < 3e-2


def _dense_dropout_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    keep: jax.Array,
    rate: float,
) -> jax.Array:
    group = query.shape[1] // key.shape[1]
    key = jnp.repeat(key, group, axis=1)
    value = jnp.repeat(value, group, axis=1)
    scores = jnp.einsum("bhtd,bhsd->bhts", query, key) / math.sqrt(query.shape[-1])
    weights = jax.nn.softmax(scores, axis=-1) * jnp.where(keep, 1.0 / (1.0 - rate), 0.0)
    return jnp.einsum("bhts,bhsd->bhtd", weights, value)


def test_dropout_uses_per_tile_keys_in_forward_and_backward() -> None:
    query, key, value = random_qkv(6, num_heads=4, num_kv_heads=2, seq_q=10, seq_kv=7)
    rng, rate, block_size = jax.random.key(9), 0.4, 4
    batch, num_heads, seq_q, _ = query.shape
    seq_kv = key.shape[2]
    block_q, block_kv = fit_block(seq_q, block_size), fit_block(seq_kv, block_size)
    rows = []
    for i in range(-(-seq_q // block_q)):
        row = [
            jax.random.bernoulli(
                jax.random.fold_in(jax.random.fold_in(rng, i), j),
                1.0 - rate,
                (batch, num_heads, block_q, block_kv),
            )
            for j in range(-(-seq_kv // block_kv))
        ]
        rows.append(jnp.concatenate(row, axis=3))
    keep = jnp.concatenate(rows, axis=2)[:, :, :seq_q, :seq_kv]
    kwargs = {
        "dropout_rng": rng,
        "dropout_rate": rate,
        "deterministic": False,
        "block_size": block_size,
    }
    out, grads = _value_and_grads(memory_efficient_attention, query, key, value, **kwargs)
    expected = _dense_dropout_attention(query, key, value, keep, rate)
    assert relative_error(out, expected) < TOL
    _, want = _value_and_grads(_dense_dropout_attention, query, key, value, keep=keep, rate=rate)
    for got, expected_grad in zip(grads, want, strict=True):
        assert relative_error(got, expected_grad) < TOL
    # deterministic=True ignores the rate
    plain = memory_efficient_attention(
        query, key, value, dropout_rng=rng, dropout_rate=rate, block_size=block_size
    )
    assert relative_error(plain, reference_attention(query, key, value)) < TOL


def test_empty_tiles_skipped_and_full_tiles_skip_mask() -> None:
    calls = {"tiles": 0, "mask": 0}

    def count(name: str) -> Callable[[], None]:
        def bump() -> None:
            calls[name] += 1

        return bump

    class CountingCausal(mods.CausalMask):
        def __call__(self, b: Any, h: Any, q: Any, kv: Any, /) -> Any:
            jax.debug.callback(count("mask"))
            return super().__call__(b, h, q, kv)

    def counting_value(s: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
        jax.debug.callback(count("tiles"))
        return s

    query, key, value = random_qkv(7, batch=1, num_heads=1, seq_q=16)
    mod = mods.compose_score_mods(mods.mask_mod_to_score_mod(CountingCausal()), counting_value)
    out = memory_efficient_attention(query, key, value, score_mod=mod, block_size=4)
    np.asarray(out)  # wait for the computation (and its callbacks)
    # 4 x 4 tiles: 10 on or below the diagonal are computed, 4 of them (the diagonal) masked.
    assert calls == {"tiles": 10, "mask": 4}
    assert (
        relative_error(out, reference_attention(query, key, value, score_mod=mods.causal_mod()))
        < TOL
    )


def test_program_size_does_not_grow_with_length() -> None:
    def size(seq: int) -> int:
        spec = jnp.zeros((1, 2, seq, 8), jnp.float32)
        loss = _loss(memory_efficient_attention, score_mod=mods.causal_mod(), block_size=16)
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(spec, spec, spec)
        return len(str(jaxpr))

    small, large = size(64), size(4096)
    assert abs(large - small) < 0.05 * small


def test_memory_is_linear_in_sequence_length() -> None:
    """Compile (do not run) forward + backward at T = 32k: no buffer of T^2 elements."""
    seq, head_dim = 32768, 64
    spec = jnp.zeros((1, 1, seq, head_dim), jnp.float32)  # only lowered, never run
    loss = _loss(memory_efficient_attention, score_mod=mods.causal_mod())
    compiled = (
        jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    )
    stats = compiled.memory_analysis()
    assert stats is not None
    square = seq * seq * 4
    linear = seq * head_dim * 4
    assert stats.temp_size_in_bytes < square // 100
    assert stats.temp_size_in_bytes < 16 * linear
    assert stats.argument_size_in_bytes <= 3 * linear + 1024
    assert stats.output_size_in_bytes <= 3 * linear + 1024


def test_jit_and_vmap() -> None:
    query, key, value = random_qkv(8, num_heads=2, seq_q=9)
    fn = jax.jit(lambda q, k, v: memory_efficient_attention(q, k, v, block_size=4))
    assert relative_error(fn(query, key, value), reference_attention(query, key, value)) < TOL
    stacked = jax.vmap(fn)(query[None], key[None], value[None])[0]
    assert relative_error(stacked, reference_attention(query, key, value)) < TOL


def test_bad_arguments() -> None:
    query, key, value = random_qkv(0, seq_q=4)
    with pytest.raises(ValueError, match="block_size"):
        memory_efficient_attention(query, key, value, block_size=0)
    with pytest.raises(ValueError, match="dropout_rng"):
        memory_efficient_attention(query, key, value, dropout_rate=0.1, deterministic=False)
    with pytest.raises((ValueError, TypeError), match="key"):
        memory_efficient_attention(query, key[:, :3], value[:, :3])


def test_inside_shard_map_data_parallel_and_one_device_ring() -> None:
    """Loop carries keep the inputs' manual-axis type: no switch/fori type errors in shard_map."""
    import functools

    from jax.sharding import Mesh, PartitionSpec

    import attnax

    query, key, value = random_qkv(31, batch=2, num_heads=2, seq_q=16)
    causal = attnax.causal_mod()
    expected = attnax.standard_attention(query, key, value, score_mod=causal)
    batch_spec = PartitionSpec("data")  # type: ignore[no-untyped-call]
    seq_spec = PartitionSpec(None, None, "seq", None)  # type: ignore[no-untyped-call]

    def data_parallel(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        mapped = jax.shard_map(
            lambda q, k, v: memory_efficient_attention(q, k, v, score_mod=causal, block_size=8),
            mesh=Mesh(np.array(jax.devices()[:2]), ("data",)),
            in_specs=batch_spec,
            out_specs=batch_spec,
        )
        out: jax.Array = mapped(q, k, v)  # type: ignore[no-untyped-call]
        return out

    assert relative_error(data_parallel(query, key, value), expected) < 1e-5
    grad = jax.grad(lambda q: data_parallel(q, key, value).sum())(query)
    want = jax.grad(lambda q: attnax.standard_attention(q, key, value, score_mod=causal).sum())(query)
    assert relative_error(grad, want) < 1e-5

    ring = jax.shard_map(
        functools.partial(attnax.ring_attention, axis_name="seq", score_mod=causal),
        mesh=Mesh(np.array(jax.devices()[:1]), ("seq",)),
        in_specs=seq_spec,
        out_specs=seq_spec,
    )
    assert relative_error(ring(query, key, value), expected) < 1e-5
