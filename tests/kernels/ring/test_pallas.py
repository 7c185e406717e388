"""The ring with PALLAS_FLASH pairs (``ring.pallas``) against attention on the whole sequence.

On CPU the pair kernels run in interpret mode inside ``shard_map`` on virtual devices. JAX
0.10's interpreter cannot type the backward kernels' loops under ``check_vma`` (see
``test_pallas_in_shard_map.py``), so these maps turn it off; the GPU tests keep it on. Inputs
are fresh normal draws; values and the gradients of query, key and value are compared with
``standard_attention`` at HIGHEST precision on the gathered sequence.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import pytest

from attnax._mods import causal_mod
from attnax.kernels.pallas_flash import FlashConfig
from attnax.kernels._standard import standard_attention
from attnax.kernels.ring import RingLayout, ring_attention
from attnax.kernels.ring.pallas import pallas_ring
from tests._reference import output_and_vjp, random_qkv, relative_error
from tests.kernels.ring._mesh import in_global_order as _global, ring_mesh as _mesh


# Small tiles, so a shard spans several blocks and the zigzag halves fall inside a block
# when the shard length is not a multiple of 2 x 16.
_TILES = FlashConfig(
    block_q=16,
    block_kv=16,
    block_q_dkv=16,
    block_kv_dkv=16,
    block_q_dq=16,
    block_kv_dq=16,
    interpret=True,
)


def _standard(causal: bool) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    mod = causal_mod() if causal else None
    return functools.partial(
        standard_attention, score_mod=mod, precision=jax.lax.Precision.HIGHEST
    )


def _compare(
    ring: Callable[..., jax.Array],
    inputs: tuple[jax.Array, ...],
    causal: bool,
    tolerance: float,
) -> None:
    d_out = jax.random.normal(jax.random.key(99), inputs[0].shape, jnp.float32)
    out, grads = output_and_vjp(ring, inputs, d_out)
    exact = tuple(x.astype(jnp.float32) for x in inputs)
    want_out, want_grads = output_and_vjp(_standard(causal), exact, d_out)
    assert out.dtype == inputs[0].dtype
    assert relative_error(out, want_out) < tolerance
    for name, got, want in zip("qkv", grads, want_grads, strict=True):
        assert got.dtype == inputs[0].dtype, name
        assert relative_error(got, want) < tolerance, name


@pytest.mark.parametrize(
    ("layout", "causal", "num_shards", "kv_heads", "seq"),
    [
        ("zigzag", True, 2, 2, 64),  # GQA; the two-device backward works in place
        ("zigzag", True, 4, 1, 128),  # MQA; float32 accumulators travel the ring
        ("zigzag", True, 2, 4, 40),  # shards of 20: padded keys, halves inside a tile
        ("contiguous", True, 2, 4, 64),  # the later shard is skipped entirely
        ("contiguous", False, 4, 2, 64),
    ],
)
def test_values_and_gradients_match_standard(
    layout: RingLayout, causal: bool, num_shards: int, kv_heads: int, seq: int
) -> None:
    mesh = _mesh(num_shards)
    inputs = random_qkv(21, num_heads=4, num_kv_heads=kv_heads, seq_q=seq, head_dim=8)
    body = functools.partial(
        pallas_ring,
        axis_name="ring",
        num_shards=num_shards,
        layout=layout,
        causal=causal,
        scale=8**-0.5,
        config=_TILES,
    )
    _compare(_global(body, mesh, layout, check_vma=False), inputs, causal, 2e-5)


@pytest.mark.parametrize("num_shards", [2, 4])
def test_bf16_inputs(num_shards: int) -> None:
    """On two devices dQ holds one pair's bf16 share between the pairs; on more, float32."""
    mesh = _mesh(num_shards)
    inputs = random_qkv(
        22, num_heads=4, num_kv_heads=2, seq_q=64, head_dim=16, dtype=jnp.bfloat16
    )
    body = functools.partial(
        pallas_ring,
        axis_name="ring",
        num_shards=num_shards,
        layout="zigzag",
        causal=True,
        scale=16**-0.5,
        config=_TILES,
    )
    _compare(_global(body, mesh, "zigzag", check_vma=False), inputs, True, 1.5e-2)

# --------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_pallas_ring_on_two_gpus(layout: RingLayout) -> None:
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 GPUs (device kind nvidia-h100-x2)")
    mesh = _mesh(2)
    inputs = random_qkv(
        25, num_heads=8, num_kv_heads=2, seq_q=2048, head_dim=64, dtype=jnp.bfloat16
    )
    body = functools.partial(
        ring_attention,
        axis_name="ring",
        score_mod=causal_mod(),
        layout=layout,
        fused_pairs="pallas",
    )
    ring = _global(body, mesh, layout, check_vma=True)
    assert "attnax_flash_dkv" in str(jax.jit(jax.grad(lambda *a: jnp.sum(ring(*a)))).lower(
        *inputs
    ).as_text())
    _compare(ring, inputs, True, 2e-2)
