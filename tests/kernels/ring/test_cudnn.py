"""The fused-pair ring schedule (``ring.cudnn``) against single-device standard attention.

On CPU the pairs run through the dense XLA pair kernels (``pair="xla"``), which take and return
exactly what the cuDNN pair kernels do (pair output and log-sum-exp forward; dQ/dK/dV from the
*global* output and log-sum-exp backward), so these tests check the ring schedule itself: the
zigzag pair shapes, the exact merges, the dK/dV accumulators that travel home. The GPU tests
check the cuDNN pair kernels against the XLA ones and the ring over two GPUs.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, PartitionSpec

from attnax._mods import causal_mod
from attnax.kernels._standard import standard_attention
from attnax.kernels.ring import RingLayout, from_ring_layout, ring_attention, to_ring_layout
from attnax.kernels.ring import cudnn, pair_kernels
from tests._reference import random_qkv, relative_error
from tests.kernels.ring._mesh import ring_mesh as _mesh


def _weighted_sum(out: jax.Array) -> jax.Array:
    weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
    return jnp.sum(out.astype(jnp.float32) * weights)


def _sharded(
    body: Callable[..., jax.Array], mesh: Mesh, layout: RingLayout
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    num_shards = mesh.shape["ring"]
    spec = PartitionSpec(None, None, "ring", None)  # type: ignore[no-untyped-call]
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)

    def run(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        arranged = (to_ring_layout(x, num_shards, layout) for x in (q, k, v))
        return from_ring_layout(mapped(*arranged), num_shards, layout)

    return run


@pytest.mark.parametrize(
    ("layout", "causal", "num_shards", "kv_heads"),
    [
        ("zigzag", True, 4, 2),
        ("zigzag", True, 2, 4),
        ("contiguous", True, 4, 1),
        ("contiguous", False, 4, 2),
        ("striped", False, 2, 4),
        ("zigzag", True, 8, 2),
    ],
)
def test_schedule_matches_standard(
    layout: RingLayout, causal: bool, num_shards: int, kv_heads: int
) -> None:
    mesh = _mesh(num_shards)
    q, k, v = random_qkv(11, num_heads=4, num_kv_heads=kv_heads, seq_q=32, head_dim=8)
    scale = 8**-0.5
    body = functools.partial(
        cudnn.flash_ring,
        axis_name="ring",
        num_shards=num_shards,
        layout=layout,
        causal=causal,
        scale=scale,
        pair="xla",
    )
    ring = _sharded(body, mesh, layout)
    mod = causal_mod() if causal else None

    def standard(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return standard_attention(q, k, v, score_mod=mod)

    out = jax.jit(ring)(q, k, v)
    assert relative_error(out, standard(q, k, v)) < 2e-5
    got = jax.jit(jax.grad(lambda *a: _weighted_sum(ring(*a)), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *a: _weighted_sum(standard(*a)), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert relative_error(g, w) < 2e-5, name


def test_causal_pairs_refuse_an_unplanned_layout() -> None:
    q, k, v = random_qkv(13, num_heads=4, num_kv_heads=2, seq_q=16, head_dim=8)
    with pytest.raises(ValueError, match="causal pairs need layout contiguous or zigzag, got striped"):
        cudnn.flash_ring(
            q, k, v, axis_name="ring", num_shards=2, layout="striped", causal=True,
            scale=8**-0.5, pair="xla",
        )


@pytest.mark.parametrize("num_shards", [2, 4])
def test_bf16_accumulators(num_shards: int) -> None:
    """bf16 inputs: on 2 devices dK/dV travel in bf16 (exact there), on more in float32."""
    mesh = _mesh(num_shards)
    q, k, v = (
        x.astype(jnp.bfloat16)
        for x in random_qkv(12, num_heads=4, num_kv_heads=2, seq_q=32, head_dim=8)
    )
    body = functools.partial(
        cudnn.flash_ring,
        axis_name="ring",
        num_shards=num_shards,
        layout="zigzag",
        causal=True,
        scale=8**-0.5,
        pair="xla",
    )
    ring = _sharded(body, mesh, "zigzag")
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))

    def standard(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return standard_attention(q, k, v, score_mod=causal_mod())

    got = jax.jit(jax.grad(lambda *a: _weighted_sum(ring(*a)), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *a: _weighted_sum(standard(*a)), argnums=(0, 1, 2))(*f32)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        assert relative_error(g, w) < 2e-2, name


def test_xla_pair_backward_uses_global_statistics() -> None:
    """The pair backward given the global out/lse returns that pair's share of the gradient."""
    q, k, v = random_qkv(3, num_heads=4, num_kv_heads=2, seq_q=16, head_dim=8)
    d_out = jax.random.normal(jax.random.key(5), q.shape)
    scale = 0.3

    def full(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return standard_attention(q, k, v, scale=scale)

    out, vjp = jax.vjp(full, q, k, v)
    want_dq, want_dk, want_dv = vjp(d_out)
    halves = [(slice(0, 8)), (slice(8, 16))]
    lse = jax.nn.logsumexp(
        jnp.einsum("bhtd,bhsd->bhts", q, jnp.repeat(k, 2, axis=1)) * scale, axis=-1
    )
    dq = jnp.zeros_like(q)
    for keys in halves:
        part_dq, part_dk, part_dv = pair_kernels.xla_backward(
            q, k[:, :, keys], v[:, :, keys], out, lse, d_out, causal=False, scale=scale
        )
        dq = dq + part_dq
        assert relative_error(part_dk, want_dk[:, :, keys]) < 1e-5
        assert relative_error(part_dv, want_dv[:, :, keys]) < 1e-5
    assert relative_error(dq, want_dq) < 1e-5

# --------------------------------------------------------------------------- GPU

def _bf16_qkv(seed: int, seq: int, kv_heads: int) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = [(2, 8, seq, 64), (2, kv_heads, seq, 64), (2, kv_heads, seq, 64)]
    return tuple(
        jax.random.normal(key, s, jnp.bfloat16) for key, s in zip(keys, shapes, strict=True)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_pair_kernels_match_xla(causal: bool) -> None:
    if not pair_kernels.cudnn_pairs_available():
        pytest.fail("this JAX lacks the cuDNN entry points the fused ring binds")
    q, k, v = _bf16_qkv(0, 256, 2)
    scale = 64**-0.5
    out, lse = jax.jit(functools.partial(pair_kernels.cudnn_forward, causal=causal, scale=scale))(
        q, k, v
    )
    want_out, want_lse = pair_kernels.xla_forward(q, k, v, causal=causal, scale=scale)
    assert relative_error(out, want_out) < 1e-2
    assert relative_error(lse, want_lse) < 1e-3
    # The backward with statistics from a *different* (global) softmax: use a half of the keys.
    d_out = jax.random.normal(jax.random.key(9), q.shape, jnp.bfloat16)
    half = slice(0, 128)
    args = (q, k[:, :, half], v[:, :, half], want_out, want_lse, d_out)
    got = jax.jit(functools.partial(pair_kernels.cudnn_backward, causal=causal, scale=scale))(*args)
    want = pair_kernels.xla_backward(*args, causal=causal, scale=scale)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert relative_error(g, w) < 2e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_cudnn_ring_on_two_gpus(layout: RingLayout) -> None:
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 GPUs (device kind nvidia-h100-x2)")
    mesh = _mesh(2)
    q, k, v = _bf16_qkv(1, 1024, 2)
    body = functools.partial(
        ring_attention, axis_name="ring", score_mod=causal_mod(), layout=layout
    )
    ring = _sharded(body, mesh, layout)
    jaxpr = str(jax.make_jaxpr(ring)(q, k, v))
    assert "dot_product_attention" in jaxpr  # the fused pair path, not the XLA tiles
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))

    def standard(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return standard_attention(q, k, v, score_mod=causal_mod())

    assert relative_error(jax.jit(ring)(q, k, v), standard(*f32)) < 2e-2
    got = jax.jit(jax.grad(lambda *a: _weighted_sum(ring(*a)), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *a: _weighted_sum(standard(*a)), argnums=(0, 1, 2))(*f32)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert relative_error(g, w) < 3e-2, name
