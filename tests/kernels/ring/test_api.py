"""The public entries on 4 (and 2) virtual CPU devices: the reference, the single-device path,
the errors, the layer with a ring attention_fn and the dispatch between the rings.

conftest.py starts JAX with 8 host devices and highest matmul precision.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec

from attnax._mods import causal_mod
from attnax.kernels._standard import standard_attention
from attnax.kernels.ring import (
    from_ring_layout,
    ring_attention,
    ring_attention_reference,
    sharded_ring_attention,
    to_ring_layout,
)
from tests._reference import random_qkv, relative_error
from tests.kernels.ring._mesh import in_global_order as _global, ring_mesh as _mesh


TOL = 2e-5


def test_ring_attention_reference_matches_standard_inside_shard_map() -> None:
    mesh = _mesh(4)
    q, k, v = random_qkv(2, batch=1, num_heads=2, seq_q=16, head_dim=8)
    spec = PartitionSpec(None, None, "ring", None)  # type: ignore[no-untyped-call]

    def body(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return ring_attention_reference(q, k, v, axis_name="ring", score_mod=causal_mod(), layout="striped")

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
    ordered = [to_ring_layout(x, 4, "striped") for x in (q, k, v)]
    out = from_ring_layout(jax.jit(mapped)(*ordered), 4, "striped")
    assert relative_error(out, standard_attention(q, k, v, score_mod=causal_mod())) < TOL


def test_local_path_without_axis_name_and_with_unbound_axis() -> None:
    q, k, v = random_qkv(4, batch=1, num_heads=4, num_kv_heads=2, seq_q=12, head_dim=8)
    expected = standard_attention(q, k, v, score_mod=causal_mod())
    local = ring_attention(q, k, v, score_mod=causal_mod())
    unbound = jax.jit(lambda q, k, v: ring_attention(q, k, v, axis_name="ring", score_mod=causal_mod()))(q, k, v)
    assert relative_error(local, expected) < TOL
    assert relative_error(unbound, expected) < TOL
    # The local path keeps the single-device features: dense masks and dropout.
    dense = jnp.tril(jnp.ones((12, 12), bool))[None, None]
    assert relative_error(ring_attention(q, k, v, mask=dense), expected) < TOL
    dropped = ring_attention(
        q, k, v, dropout_rng=jax.random.key(0), dropout_rate=0.5, deterministic=False
    )
    assert dropped.shape == q.shape


def test_errors() -> None:
    mesh = _mesh(4)
    q, k, v = random_qkv(6, batch=1, num_heads=2, seq_q=12, head_dim=8)
    with pytest.raises(ValueError, match="not divisible by 8"):
        to_ring_layout(q, 4, "zigzag")
    with pytest.raises(ValueError, match="not divisible by 8"):
        sharded_ring_attention(q, k, v, mesh=mesh, axis_name="ring", layout="zigzag")
    # ValueError from the kernel; TypeError from the shape/type checks when they are on.
    with pytest.raises((ValueError, TypeError), match="layout"):
        ring_attention(q, k, v, layout="spiral")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not an axis"):
        sharded_ring_attention(q, k, v, mesh=mesh, axis_name="sequence")
    spec = PartitionSpec(None, None, "ring", None)  # type: ignore[no-untyped-call]

    def run(body: Callable[..., jax.Array], seq: int) -> None:
        qkv = random_qkv(6, batch=1, num_heads=2, seq_q=seq, head_dim=8)
        jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(*qkv)

    # 12 tokens over 4 devices: 3 per device, which zigzag cannot split into two chunks.
    with pytest.raises(ValueError, match="even local shard length"):
        run(lambda q, k, v: ring_attention(q, k, v, axis_name="ring", layout="zigzag"), 12)
    dense = jnp.ones((1, 1, 4, 4), bool)
    with pytest.raises(NotImplementedError, match="key-padding mask"):
        run(lambda q, k, v: ring_attention(q, k, v, axis_name="ring", mask=dense), 16)
    with pytest.raises(NotImplementedError, match="dropout"):
        run(
            lambda q, k, v: ring_attention(
                q, k, v, axis_name="ring", dropout_rate=0.1, dropout_rng=jax.random.key(0),
                deterministic=False,
            ),
            16,
        )


def test_layer_with_ring_attention_fn_inside_shard_map() -> None:
    """MultiHeadAttention(attention_fn=partial(ring_attention, ...)) with RoPE at global positions."""
    import functools

    from flax import nnx

    from attnax import MultiHeadAttention

    mesh = _mesh(4)
    seq, features = 16, 16

    def layer(attention_fn: Any) -> MultiHeadAttention:
        return MultiHeadAttention(
            nnx.Rngs(0), num_heads=4, num_kv_heads=2, in_features=features, use_rope=True,
            attention_fn=attention_fn, score_mod=causal_mod(),
        )

    x = jax.random.normal(jax.random.key(1), (2, seq, features))
    expected = layer(None)(x)
    ring_layer = layer(functools.partial(ring_attention, axis_name="ring", layout="zigzag"))
    graphdef, state = nnx.split(ring_layer)
    positions = to_ring_layout(jnp.arange(seq)[None, None, :, None], 4, "zigzag")[0, 0, :, 0]
    x_ring = to_ring_layout(x[:, None], 4, "zigzag")[:, 0]
    seq_spec = PartitionSpec(None, "ring", None)  # type: ignore[no-untyped-call]

    def body(state: Any, x: jax.Array, positions: jax.Array) -> jax.Array:
        module = nnx.merge(graphdef, state)
        return module(x, position_ids_q=positions[None], position_ids_kv=positions[None])

    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(PartitionSpec(), seq_spec, PartitionSpec("ring")),  # type: ignore[no-untyped-call]
        out_specs=seq_spec,
    )
    out = jax.jit(mapped)(state, x_ring, positions)
    out = from_ring_layout(out[:, None], 4, "zigzag")[:, 0]
    assert relative_error(out, expected) < TOL


def test_ring_attention_dispatch_stays_generic_on_cpu() -> None:
    """Without a GPU, ring_attention keeps the generic (XLA tile) ring: same values."""
    mesh = _mesh(2)
    q, k, v = random_qkv(4, num_heads=2, num_kv_heads=2, seq_q=16, head_dim=8)
    body = functools.partial(
        ring_attention, axis_name="ring", score_mod=causal_mod(), layout="zigzag"
    )
    out = jax.jit(_global(body, mesh, "zigzag", check_vma=True))(q, k, v)
    assert relative_error(out, standard_attention(q, k, v, score_mod=causal_mod())) < 2e-5


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU refusal")
def test_fused_pairs_true_names_the_reason() -> None:
    mesh = _mesh(2)
    q, k, v = random_qkv(4, num_heads=2, num_kv_heads=2, seq_q=16, head_dim=8)
    body = functools.partial(
        ring_attention, axis_name="ring", score_mod=causal_mod(), fused_pairs=True
    )
    with pytest.raises(NotImplementedError, match="fused_pairs=True.*NVIDIA GPU"):
        _global(body, mesh, "contiguous", check_vma=True)(q, k, v)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU refusal")
def test_public_entry_names_what_is_missing() -> None:
    mesh = _mesh(2)
    q, k, v = random_qkv(23, num_heads=2, seq_q=16, head_dim=8)

    def call(**kwargs: Any) -> jax.Array:
        body = functools.partial(ring_attention, axis_name="ring", **kwargs)
        return _global(body, mesh, "zigzag", check_vma=True)(q, k, v)

    with pytest.raises(NotImplementedError, match="fused_pairs='pallas'.*need a GPU"):
        call(score_mod=causal_mod(), layout="zigzag", fused_pairs="pallas")
    # The global-array wrapper hands the choice through.
    with pytest.raises(NotImplementedError, match="fused_pairs='pallas'.*need a GPU"):
        sharded_ring_attention(
            q, k, v, mesh=mesh, axis_name="ring", score_mod=causal_mod(), fused_pairs="pallas"
        )
    # The runtime type check (when on) or the entry's own check names the argument.
    with pytest.raises((ValueError, TypeError), match="fused_pairs"):
        call(fused_pairs="triton")
