"""memory_efficient_attention's fused GPU tile: an XLA scan of stepped Pallas kernels.

On CPU the stepped kernels run in interpret mode (through ``flash_attention_with_config`` with
the configuration the public function builds), with tiles small enough that every case takes
several scan steps, against the float64 reference and ``standard_attention``'s gradients. The
dispatch rules are checked with the GPU test faked; the GPU cases run the real Triton kernels.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _mods as mods
from attnax.kernels.memory_efficient import fused as fused_module
from attnax.kernels.memory_efficient import memory_efficient_attention
from attnax.kernels.pallas_flash import flash_attention_with_config, stepped_config
from attnax.kernels._standard import standard_attention
from tests._reference import output_and_vjp, random_qkv, reference_attention, relative_error

HIGHEST = jax.lax.Precision.HIGHEST


def _check_stepped(
    seed: int,
    *,
    score_mod: Any = None,
    mask: jax.Array | None = None,
    block_size: int = 32,
    tile: int = 16,
    dtype: Any = jnp.float32,
    value_tol: float = 1e-5,
    grad_tol: float = 1e-5,
    **shape: Any,
) -> jax.Array:
    query, key, value = random_qkv(seed, dtype=dtype, **shape)
    config = stepped_config(
        query.shape[-1], key.shape[2], block_size, interpret=True, block_q=tile, block_kv=tile
    )
    # Several steps, or the scan's carry would never be read back.
    assert -(-key.shape[2] // tile) > config.key_step_blocks
    cotangent = jax.random.normal(jax.random.key(seed + 500), query.shape, jnp.float32)

    def kernel(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return flash_attention_with_config(
            q, k, v, config=config, mask=mask, score_mod=score_mod
        )

    def reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        return standard_attention(*f32, mask=mask, score_mod=score_mod, precision=HIGHEST)

    out, grads = output_and_vjp(kernel, (query, key, value), cotangent)
    assert out.dtype == query.dtype and out.shape == query.shape
    expected = reference_attention(query, key, value, mask=mask, score_mod=score_mod)
    assert relative_error(out, expected) < value_tol
    f32_args = tuple(x.astype(jnp.float32) for x in (query, key, value))
    _, want = output_and_vjp(reference, f32_args, cotangent)
    for name, got, expected_grad in zip(("query", "key", "value"), grads, want, strict=True):
        assert got.shape == expected_grad.shape
        assert relative_error(got, expected_grad) < grad_tol, name
    return out


# --------------------------------------------------------------------------- CPU, interpret


def test_stepped_causal_gqa_uneven_lengths() -> None:
    # 72 keys in 16-key tiles, 2 tiles a step: 3 steps, the last one short; queries end
    # before the keys do, so the last steps reach no query row and must leave the state alone.
    _check_stepped(
        0, score_mod=mods.causal_mod(), num_heads=4, num_kv_heads=2, seq_q=40, seq_kv=72
    )


def test_stepped_no_mask_mqa_one_tile_per_step() -> None:
    _check_stepped(1, block_size=16, num_heads=4, num_kv_heads=1, seq_q=24, seq_kv=64)


def test_stepped_window_alibi_and_documents_softcap() -> None:
    window = mods.compose_score_mods(mods.alibi_mod(4), mods.sliding_window_mod(20))
    _check_stepped(2, score_mod=window, num_heads=4, num_kv_heads=2, seq_q=64, seq_kv=64)
    ids = jnp.asarray(np.repeat(np.array([[0, 1, 2], [0, 0, 1]]), [13, 20, 15], axis=1))
    documents = mods.compose_score_mods(mods.softcap_mod(2.0), mods.document_mask_mod(ids))
    _check_stepped(3, score_mod=documents, num_heads=2, num_kv_heads=2, seq_q=48, seq_kv=48)


def test_stepped_dense_mask_with_empty_rows() -> None:
    seq = 48
    mask = np.random.default_rng(0).random((2, 1, seq, seq)) < 0.5
    mask[0, 0, [3, 17], :] = False
    out = _check_stepped(4, mask=jnp.asarray(mask), num_heads=2, num_kv_heads=1, seq_q=seq, seq_kv=seq)
    assert np.all(np.asarray(out)[0, :, [3, 17]] == 0.0)


def test_stepped_bfloat16() -> None:
    _check_stepped(
        5,
        score_mod=mods.causal_mod(),
        dtype=jnp.bfloat16,
        num_heads=2,
        num_kv_heads=2,
        seq_q=64,
        seq_kv=64,
        head_dim=32,
        value_tol=2e-2,
        grad_tol=4e-2,
    )


# --------------------------------------------------------------------------- dispatch


def _spy(monkeypatch: pytest.MonkeyPatch, gpu: bool) -> list[Any]:
    """Fake the GPU test and record the fused path's configurations instead of running it."""
    calls: list[Any] = []

    def fake_fused(query: jax.Array, *args: Any, config: Any, **kwargs: Any) -> jax.Array:
        calls.append(config)
        return jnp.zeros_like(query)

    monkeypatch.setattr(fused_module, "cuda_compute_capability", lambda: (9, 0) if gpu else None)
    monkeypatch.setattr(fused_module, "flash_attention_with_config", fake_fused)
    return calls


def test_automatic_path_takes_the_fused_tile_only_where_it_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _spy(monkeypatch, gpu=True)
    half = random_qkv(0, seq_q=300, dtype=jnp.bfloat16)
    single = random_qkv(0, seq_q=300)
    causal = mods.causal_mod()
    memory_efficient_attention(*half, score_mod=causal, block_size=256)
    assert len(calls) == 1 and calls[0].key_step_blocks == 2  # 256 keys = 2 tiles of 128
    memory_efficient_attention(*half, score_mod=mods.compose_score_mods(causal, mods.alibi_mod(2)))
    assert len(calls) == 2 and calls[1].key_step_blocks == 4  # default block_size 512
    # float32, dropout, a plain callable and an explicit "xla" all keep the XLA tiles.
    memory_efficient_attention(*single, score_mod=causal)
    memory_efficient_attention(
        *half, dropout_rng=jax.random.key(0), dropout_rate=0.1, deterministic=False
    )
    memory_efficient_attention(*half, score_mod=lambda s, b, h, q, k: s * 0.5)
    memory_efficient_attention(*half, score_mod=causal, implementation="xla")
    assert len(calls) == 2
    # Explicitly asked, float32 is served too.
    memory_efficient_attention(*single, implementation="pallas")
    assert len(calls) == 3


def test_explicit_pallas_refusals_name_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    query, key, value = random_qkv(1, seq_q=16, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="NVIDIA GPU.*implementation='xla'"):
        memory_efficient_attention(query, key, value, implementation="pallas")
    # The shape checker (debug) or the function itself refuses an unknown name.
    with pytest.raises((ValueError, TypeError), match="implementation"):
        memory_efficient_attention(query, key, value, implementation="cuda")  # type: ignore[arg-type]
    _spy(monkeypatch, gpu=True)
    with pytest.raises(ValueError, match="dropout"):
        memory_efficient_attention(
            query,
            key,
            value,
            dropout_rng=jax.random.key(0),
            dropout_rate=0.1,
            deterministic=False,
            implementation="pallas",
        )
    with pytest.raises(ValueError, match="plain callable"):
        memory_efficient_attention(
            query, key, value, score_mod=lambda s, b, h, q, k: s, implementation="pallas"
        )


def test_cpu_default_is_the_xla_path() -> None:
    query, key, value = random_qkv(2, seq_q=33, dtype=jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: memory_efficient_attention(q, k, v))(query, key, value))
    assert "pallas_call" not in jaxpr


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case", ["causal_gqa", "window_alibi", "documents", "full_uneven"]
)
def test_gpu_fused_tile_matches_reference(case: str) -> None:
    seq_q = seq_kv = 2048
    num_heads, num_kv_heads, head_dim = 8, 8, 128
    score_mod: Any = None
    if case == "causal_gqa":
        score_mod, num_kv_heads = mods.causal_mod(), 2
    elif case == "window_alibi":
        score_mod = mods.compose_score_mods(mods.alibi_mod(8), mods.sliding_window_mod(300))
    elif case == "documents":
        ids = jnp.asarray(np.repeat(np.arange(4), [300, 900, 700, 148])[None].repeat(2, 0))
        score_mod = mods.document_mask_mod(ids)
    else:
        seq_q, seq_kv, head_dim = 1000, 1777, 64
    query, key, value = random_qkv(
        11,
        batch=2,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        seq_q=seq_q,
        seq_kv=seq_kv,
        head_dim=head_dim,
        dtype=jnp.bfloat16,
    )
    cotangent = jax.random.normal(jax.random.key(12), query.shape, jnp.float32)

    def fused(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return memory_efficient_attention(q, k, v, score_mod=score_mod)

    def reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        return standard_attention(*f32, score_mod=score_mod, precision=HIGHEST)

    jaxpr = str(jax.make_jaxpr(fused)(query, key, value))
    assert "pallas_call" in jaxpr and "scan" in jaxpr  # the fused tile, stepped
    out, grads = output_and_vjp(fused, (query, key, value), cotangent)
    want, want_grads = output_and_vjp(reference, (query, key, value), cotangent)
    assert relative_error(out, want) < 2e-2
    for got, expected in zip(grads, want_grads, strict=True):
        assert relative_error(got, expected) < 4e-2


@pytest.mark.gpu
def test_gpu_fused_tile_memory_is_linear() -> None:
    """Compile forward + backward at T = 65536, bf16: no buffer of T^2 elements."""
    seq, heads, head_dim = 65536, 4, 128
    spec = jax.ShapeDtypeStruct((1, heads, seq, head_dim), jnp.bfloat16)  # type: ignore[no-untyped-call]

    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        out = memory_efficient_attention(q, k, v, score_mod=mods.causal_mod())
        return jnp.sum(out.astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    stats = compiled.memory_analysis()
    assert stats is not None
    unit = seq * heads * head_dim * 2  # one bf16 (T, H, D) array
    assert stats.temp_size_in_bytes < 16 * unit  # the T^2 scores alone would be 512 units


@pytest.mark.gpu
def test_gpu_fused_tile_under_vmap_and_in_the_layer() -> None:
    from flax import nnx

    import attnax

    query, key, value = random_qkv(
        13, batch=2, num_heads=4, seq_q=700, head_dim=64, dtype=jnp.bfloat16
    )
    causal = mods.causal_mod()
    fused = jax.jit(
        jax.vmap(
            lambda q, k, v: memory_efficient_attention(
                q, k, v, score_mod=causal, block_size=256
            )
        )
    )
    stacked = fused(query[None], key[None], value[None])[0]
    assert relative_error(stacked, reference_attention(query, key, value, score_mod=causal)) < 2e-2

    fused_layer, reference_layer = (
        attnax.MultiHeadAttention(
            num_heads=4,
            in_features=64,
            attention_type=attention_type,
            dtype="bfloat16",
            rngs=nnx.Rngs(0),  # the same parameters for both
        )
        for attention_type in (attnax.AttentionType.MEMORY_EFFICIENT, attnax.AttentionType.STANDARD)
    )
    inputs = jax.random.normal(jax.random.key(14), (2, 700, 64), jnp.bfloat16)
    got = fused_layer(inputs, score_mod=causal)
    want = reference_layer(inputs, score_mod=causal)
    assert relative_error(got, want) < 3e-2
