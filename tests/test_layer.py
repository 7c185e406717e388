"""MultiHeadAttention against an independent float64 NumPy reference of the whole layer."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnax
import attnax._backends
from attnax.kernels.pallas_flash import pallas_flash_attention
from tests._reference import reference_attention, relative_error


def _params(linear: nnx.Linear) -> tuple[np.ndarray, np.ndarray]:
    assert linear.bias is not None
    return np.asarray(linear.kernel[...], np.float64), np.asarray(linear.bias[...], np.float64)


def _rope_np(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Half-split rotation as complex multiplication (an independent formulation)."""
    half = x.shape[-1] // 2
    freqs = base ** (-np.arange(0, x.shape[-1], 2) / x.shape[-1])
    angle = positions[..., None].astype(np.float64) * freqs  # (B|1, T, half)
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angle)[:, :, None, :]
    rotated: np.ndarray = np.concatenate([z.real, z.imag], axis=-1)
    return rotated


def reference_layer(
    layer: attnax.MultiHeadAttention,
    x: jax.Array,
    *,
    context: jax.Array | None = None,
    score_mod: Any = None,
    mask: Any = None,
    position_ids_q: np.ndarray | None = None,
    position_ids_kv: np.ndarray | None = None,
) -> np.ndarray:
    spec = layer.spec
    xq = np.asarray(x, np.float64)
    xkv = xq if context is None else np.asarray(context, np.float64)
    batch, seq_q, _ = xq.shape
    seq_kv = xkv.shape[1]
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (
        _params(layer.query), _params(layer.key), _params(layer.value), _params(layer.out)
    )
    q = (xq @ wq + bq).reshape(batch, seq_q, spec.num_heads, spec.head_dim)
    k = (xkv @ wk + bk).reshape(batch, seq_kv, spec.resolved_num_kv_heads, spec.head_dim)
    v = (xkv @ wv + bv).reshape(batch, seq_kv, spec.resolved_num_kv_heads, spec.head_dim)
    if spec.use_rope:
        pos_q = np.arange(seq_q)[None] if position_ids_q is None else position_ids_q
        if position_ids_kv is not None:
            pos_kv = position_ids_kv
        else:
            pos_kv = pos_q if context is None else np.arange(seq_kv)[None]
        q = _rope_np(q, pos_q, spec.rope_base)
        k = _rope_np(k, pos_kv, spec.rope_base)
    mods = [spec.score_mod, score_mod]
    if spec.attention_window is not None:
        mods.append(attnax.sliding_window_mod(spec.attention_window))
    combined = attnax.compose_score_mods(*mods)
    attended = reference_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
        score_mod=combined, mask=mask,
    )
    projected: np.ndarray = attended.transpose(0, 2, 1, 3).reshape(batch, seq_q, -1) @ wo + bo
    return projected


SOFTMAX_TYPES = ["standard", "memory_efficient", "flash", "pallas_flash"]


@pytest.mark.parametrize("attention_type", SOFTMAX_TYPES)
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads"), [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"]
)
def test_self_attention_with_rope_window_and_mods(
    attention_type: str, num_heads: int, num_kv_heads: int
) -> None:
    layer = attnax.MultiHeadAttention(
        nnx.Rngs(1), num_heads=num_heads, in_features=32, num_kv_heads=num_kv_heads,
        use_rope=True, attention_window=5, score_mod=attnax.alibi_mod(num_heads),
        attention_type=attention_type, attention_block_size=8,
    )
    x = jax.random.normal(jax.random.key(2), (2, 13, 32))
    call_mod = attnax.softcap_mod(3.0)
    out = layer(x, score_mod=call_mod)
    assert out.shape == (2, 13, 32)
    assert relative_error(out, reference_layer(layer, x, score_mod=call_mod)) < 1e-4


@pytest.mark.parametrize("attention_type", ["standard", "memory_efficient"])
def test_cross_attention_with_mask_and_positions(attention_type: str) -> None:
    layer = attnax.MultiHeadAttention(
        nnx.Rngs(3), num_heads=4, in_features=16, qkv_features=32, out_features=8,
        num_kv_heads=2, use_rope=True, attention_type=attention_type, attention_block_size=8,
    )
    x = jax.random.normal(jax.random.key(4), (2, 6, 16))
    context = jax.random.normal(jax.random.key(5), (2, 11, 16))
    mask = jax.random.bernoulli(jax.random.key(6), 0.7, (2, 1, 6, 11))
    pos_q = np.array([[3, 4, 5, 6, 7, 8], [0, 2, 4, 6, 8, 10]])
    pos_kv = np.arange(11)[None] + 1
    out = layer(x, context=context, mask=mask, position_ids_q=jnp.asarray(pos_q), position_ids_kv=jnp.asarray(pos_kv))
    expected = reference_layer(layer, x, context=context, mask=mask, position_ids_q=pos_q, position_ids_kv=pos_kv)
    assert out.shape == (2, 6, 8)
    assert relative_error(out, expected) < 1e-4


def test_gradients_match_float64_reference() -> None:
    layer = attnax.MultiHeadAttention(
        nnx.Rngs(7), num_heads=4, in_features=16, num_kv_heads=2, use_rope=True,
        score_mod=attnax.causal_mod(),
    )
    x = jax.random.normal(jax.random.key(8), (2, 9, 16))
    cot = jax.random.normal(jax.random.key(9), (2, 9, 16))

    grads = nnx.grad(lambda m, x: jnp.sum(m(x) * cot), argnums=(0, 1))(layer, x)
    layer_grads, x_grad = grads

    def reference_loss(params: dict[str, Any], x64: jax.Array) -> jax.Array:
        q = (x64 @ params["wq"] + params["bq"]).reshape(2, 9, 4, 4)
        k = (x64 @ params["wk"] + params["bk"]).reshape(2, 9, 2, 4)
        v = (x64 @ params["wv"] + params["bv"]).reshape(2, 9, 2, 4)
        freqs = 10000.0 ** (-jnp.arange(0, 4, 2) / 4)
        rot = jnp.exp(1j * jnp.arange(9)[:, None] * freqs)[None, :, None, :]

        def rope(t: jax.Array) -> jax.Array:
            z = (t[..., :2] + 1j * t[..., 2:]) * rot
            return jnp.concatenate([z.real, z.imag], axis=-1)

        q, k = rope(q), rope(k)
        k = jnp.repeat(k, 2, axis=2)
        v = jnp.repeat(v, 2, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", q, k) / 2.0
        s = jnp.where(jnp.tril(jnp.ones((9, 9), bool)), s, -jnp.inf)
        o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v).reshape(2, 9, 16)
        return jnp.sum((o @ params["wo"] + params["bo"]) * cot)

    with jax.enable_x64(True):
        names = {"q": layer.query, "k": layer.key, "v": layer.value, "o": layer.out}
        params = {}
        for short, lin in names.items():
            w, b = _params(lin)
            params["w" + short], params["b" + short] = jnp.asarray(w), jnp.asarray(b)
        want_params, want_x = jax.grad(reference_loss, argnums=(0, 1))(params, jnp.asarray(np.asarray(x), jnp.float64))
        want_params = {k: np.asarray(v) for k, v in want_params.items()}
        want_x = np.asarray(want_x)
    assert relative_error(x_grad, want_x) < 1e-4
    for short in "qkvo":
        lin_grads = getattr(layer_grads, {"q": "query", "k": "key", "v": "value", "o": "out"}[short])
        assert relative_error(lin_grads.kernel[...], want_params["w" + short]) < 1e-4
        assert relative_error(lin_grads.bias[...], want_params["b" + short]) < 1e-4


@pytest.mark.parametrize(
    ("block_size", "tiles"), [(512, (128, 64)), (48, (32, 32)), (8, (16, 16))]
)
def test_pallas_flash_tiles_from_the_block_size(
    block_size: int, tiles: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # PALLAS_FLASH's query tile is the block size rounded down to a power of two in [16, 128];
    # its forward's key tile is at most 64 (the faster one on an H100).
    seen: list[tuple[int, int]] = []

    def recording(query, key, value, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((kwargs["block_q"], kwargs["block_kv"]))
        return pallas_flash_attention(query, key, value, **kwargs)

    monkeypatch.setattr(attnax._backends, "pallas_flash_attention", recording)
    layer = attnax.MultiHeadAttention(
        nnx.Rngs(3), num_heads=2, in_features=16, attention_type="pallas_flash",
        attention_block_size=block_size,
    )
    x = jax.random.normal(jax.random.key(4), (1, 9, 16))
    out = layer(x, score_mod=attnax.causal_mod())
    assert seen == [tiles]
    assert relative_error(out, reference_layer(layer, x, score_mod=attnax.causal_mod())) < 1e-4


def test_attention_fn_beats_attention_type() -> None:
    calls: list[tuple[int, ...]] = []

    def spy(query, key, value, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(tuple(query.shape))
        return attnax.standard_attention(query, key, value, **kwargs)

    layer = attnax.MultiHeadAttention(
        nnx.Rngs(0), num_heads=2, in_features=8, attention_type="linear", attention_fn=spy
    )
    x = jax.random.normal(jax.random.key(1), (1, 5, 8))
    out = layer(x)
    assert calls == [(1, 2, 5, 4)]
    assert relative_error(out, reference_layer(layer, x)) < 1e-4


def test_output_dropout_broadcast_and_train_eval_state() -> None:
    layer = attnax.MultiHeadAttention(
        nnx.Rngs(params=0, dropout=1), num_heads=2, in_features=64, dropout_rate=0.5,
        broadcast_dropout=True,
    )
    row = jax.random.normal(jax.random.key(2), (1, 4, 64))
    x = jnp.concatenate([row, row, row], axis=0)
    clean = layer(x, deterministic=True)
    dropped = layer(x, deterministic=False)
    zeros = np.asarray(dropped == 0)
    assert zeros.any() and not zeros.all()
    assert (zeros == zeros[:1]).all(), "broadcast_dropout must share the mask across the batch"
    kept = ~zeros
    np.testing.assert_allclose(np.asarray(dropped)[kept], 2.0 * np.asarray(clean)[kept], rtol=1e-5)

    layer.eval()  # type: ignore[no-untyped-call]
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(clean))
    layer.train()  # type: ignore[no-untyped-call]
    assert bool(jnp.any(layer(x) == 0))

    independent = attnax.MultiHeadAttention(
        nnx.Rngs(params=0, dropout=1), num_heads=2, in_features=64, dropout_rate=0.5,
        broadcast_dropout=False,
    )
    zeros = np.asarray(independent(x, deterministic=False) == 0)
    assert not (zeros == zeros[:1]).all()


def test_from_spec_and_spec_property() -> None:
    spec = attnax.AttentionSpec(num_heads=4, in_features=16, num_kv_heads=2, use_rope=True)
    layer = attnax.MultiHeadAttention.from_spec(spec, rngs=nnx.Rngs(0))
    assert layer.spec == spec
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    assert relative_error(layer(x), reference_layer(layer, x)) < 1e-4


def test_jit_vmap_and_bf16_compute() -> None:
    layer = attnax.MultiHeadAttention(
        nnx.Rngs(0), num_heads=4, in_features=32, num_kv_heads=2, dtype="bfloat16",
        score_mod=attnax.causal_mod(),
    )
    x = jax.random.normal(jax.random.key(3), (2, 16, 32))
    out = nnx.jit(lambda m, x: m(x))(layer, x)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, reference_layer(layer, x, score_mod=None)) < 2e-2
    batched = jax.vmap(lambda xi: layer(xi[None])[0])(x)
    assert relative_error(batched, out) < 1e-2


def test_rope_positions_outside_the_table_are_an_error() -> None:
    layer = attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=2, in_features=8, use_rope=True, rope_max_positions=8)
    with pytest.raises(ValueError, match="rope_max_positions"):
        layer(jnp.ones((1, 9, 8)))
    out = jax.jit(lambda x, p: layer(x, position_ids_q=p))(jnp.ones((1, 2, 8)), jnp.array([[7, 8]]))
    assert bool(jnp.all(jnp.isnan(out[:, 1]))), "under jit an out-of-table position is NaN, never silent"


def test_bad_inputs_name_the_argument() -> None:
    layer = attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=2, in_features=8)
    with pytest.raises(ValueError, match="`x`"):
        layer(jnp.ones((1, 3, 7)))
    with pytest.raises(ValueError, match="`context`"):
        layer(jnp.ones((1, 3, 8)), context=jnp.ones((2, 3, 8)))


@pytest.mark.parametrize("cache_kind", ["contiguous", "paged", "ring"])
def test_prefill_then_decode_equals_full_causal_pass(cache_kind: str) -> None:
    from attnax._cache import BlockAllocator, init_kv_layer_cache, init_paged_kv_cache

    window = 5
    layer = attnax.MultiHeadAttention(
        nnx.Rngs(0), num_heads=4, in_features=32, num_kv_heads=2, use_rope=True,
        score_mod=attnax.compose_score_mods(attnax.causal_mod(), attnax.alibi_mod(4)),
        attention_window=window,
    )
    x = jax.random.normal(jax.random.key(1), (2, 11, 32))
    full = layer(x)
    cache: Any
    if cache_kind == "contiguous":
        cache = init_kv_layer_cache(2, 2, 8, 16, jnp.float32)
    elif cache_kind == "ring":
        cache = init_kv_layer_cache(2, 2, 8, window, jnp.float32, ring_buffer=True)
    else:
        cache = init_paged_kv_cache(
            num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8, batch_size=2,
            max_blocks_per_seq=4, dtype=jnp.float32,
        )
        allocator = BlockAllocator.for_cache(cache)
        for row in range(2):
            cache = allocator.reserve(cache, sequence_idx=row, num_new_tokens=11)
    out, cache = layer(x[:, :4], kv_cache=cache)
    outs = [out]
    step = nnx.jit(lambda m, xi, c: m(xi, kv_cache=c))
    for t in range(4, 11):
        out, cache = step(layer, x[:, t : t + 1], cache)
        outs.append(out)
    assert relative_error(jnp.concatenate(outs, axis=1), full) < 1e-4


def test_cache_decoding_refuses_what_it_cannot_do() -> None:
    from attnax._cache import init_kv_layer_cache

    cache = init_kv_layer_cache(1, 2, 4, 8, jnp.float32)
    layer = attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=2, in_features=8, attention_type="linear")
    with pytest.raises(NotImplementedError, match="linear"):
        layer(jnp.ones((1, 2, 8)), kv_cache=cache)
    softmax = attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=2, in_features=8)
    with pytest.raises(NotImplementedError, match="mask"):
        softmax(jnp.ones((1, 2, 8)), kv_cache=cache, mask=jnp.ones((1, 1, 2, 2), bool))
    with pytest.raises(ValueError, match="capacity"):
        softmax(jnp.ones((1, 9, 8)), kv_cache=cache)
