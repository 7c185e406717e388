"""The Triton forward (and, through the same calls, the backward): every supported mod in
interpret mode on CPU against the reference, lowering to Triton IR, and compiled on a GPU."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _mods as mods
from attnax.kernels.pallas_flash import (
    FlashConfig,
    default_config,
    flash_attention_with_config,
    pallas_flash_attention,
    prepare,
)
from attnax.kernels.pallas_flash.plan import backward_stages, dq_launch, forward_stages
from tests._reference import random_qkv, reference_attention, relative_error
from tests.kernels.pallas_flash._cases import check_case, gpu_case


@pytest.mark.parametrize("with_value_mod", [False, True])
def test_exact_on_scores_that_grow_past_float32_exponents(with_value_mod: bool) -> None:
    # Key norms grow 600-fold along the sequence, so a row's maximum grows from one key block
    # to the next by more than 2^128: exp2 overflows float32 unless the running maximum moves
    # with it and the accumulator is rescaled exactly.
    query, key, value = random_qkv(41, batch=1, num_heads=2, seq_q=96, seq_kv=96, head_dim=16)
    key = key * jnp.linspace(0.1, 60.0, 96)[None, None, :, None]
    query = 10.0 * query
    score_mod: Any = mods.causal_mod()
    if with_value_mod:
        score_mod = mods.compose_score_mods(mods.softcap_mod(400.0), score_mod)
    config = FlashConfig(block_q=16, block_kv=16, interpret=True)
    out = flash_attention_with_config(query, key, value, config=config, score_mod=score_mod)
    expected = reference_attention(query, key, value, score_mod=score_mod)
    assert relative_error(out, expected) < 1e-5


def test_causal_gqa_uneven_lengths() -> None:
    # T < S and neither a multiple of the block: padded queries and padded keys.
    check_case(seed=0, score_mod_of=lambda: mods.causal_mod(), seq_q=40, seq_kv=56)


def test_full_mqa_mixed_blocks() -> None:
    # No mask at all, one KV head for four query heads, unequal forward tiles, head_dim 32.
    check_case(seed=1, num_kv_heads=1, seq_q=24, seq_kv=72, head_dim=32, block_q=32, block_kv=16)


@pytest.mark.parametrize("window", [None, 80])
@pytest.mark.parametrize(
    ("dtype", "head_dim", "dq_rows", "tol"),
    [
        (jnp.float32, 16, 64, 1e-5),
        # bf16 at head_dim 128: the dQ kernel takes the wide dQ launch's 128-row tiles, two
        # per head, over several key blocks.
        (jnp.bfloat16, 128, 128, 2e-2),
    ],
)
def test_runs_of_full_blocks_in_every_kernel(
    window: int | None, dtype: Any, head_dim: int, dq_rows: int, tol: float
) -> None:
    # Long enough for several full blocks per row and per column in all three kernels (the
    # backward's 64-row tiles too), which they step through by arithmetic.
    score_mod = mods.causal_mod() if window is None else mods.sliding_window_mod(window)
    q, k, v = random_qkv(9, batch=2, num_heads=4, num_kv_heads=2, seq_q=256, seq_kv=256,
                         head_dim=head_dim, dtype=dtype)
    config = default_config(head_dim, 32, 32, True)
    assert dq_launch(config, prepare(config, q, k, v, None, score_mod))[0] == dq_rows
    check_case(
        seed=9,
        score_mod_of=lambda: score_mod,
        seq_q=256,
        seq_kv=256,
        head_dim=head_dim,
        num_kv_heads=2,
        block_q=32,
        block_kv=32,
        dtype=dtype,
        value_tol=tol,
        grad_tol=tol,
    )


def test_sliding_window_with_alibi() -> None:
    score_mod = mods.compose_score_mods(mods.alibi_mod(4), mods.sliding_window_mod(12))
    check_case(seed=2, score_mod_of=lambda: score_mod, seq_q=64, seq_kv=64)


def test_softcap_with_documents() -> None:
    ids = jnp.asarray(np.repeat(np.array([[0, 1, 2], [0, 0, 1]]), [13, 20, 15], axis=1))
    score_mod = mods.compose_score_mods(mods.softcap_mod(2.0), mods.document_mask_mod(ids))
    check_case(seed=3, score_mod_of=lambda: score_mod, seq_q=48, seq_kv=48, num_kv_heads=4)


def test_prefix_lm_with_int_offsets() -> None:
    # Prefix-LM composed with a causal mask seen from shifted positions (a cache's view).
    score_mod = mods.compose_score_mods(
        mods.prefix_lm_mod(jnp.array([5, 30])),
        mods.shift_positions(mods.causal_mod(), q_offset=16, kv_offset=0),
    )
    check_case(seed=4, score_mod_of=lambda: score_mod, seq_q=24, seq_kv=40, block_q=16, block_kv=32)


def test_prefix_lm_and_window_walk_block_ranges() -> None:
    # Prefix-LM masks are interval masks: the three kernels walk them by block ranges. Per-batch
    # prefixes that end inside a tile and past several, alone and with a two-sided window.
    prefix = mods.prefix_lm_mod(jnp.array([7, 50]))
    check_case(seed=21, score_mod_of=lambda: prefix, seq_q=96, seq_kv=96)
    windowed = mods.compose_score_mods(
        mods.prefix_lm_mod(jnp.array([40, 3])), mods.sliding_window_mod(20, causal=False)
    )
    check_case(seed=22, score_mod_of=lambda: windowed, seq_q=80, seq_kv=96)


def test_dense_mask_empty_rows_and_skipped_blocks() -> None:
    # Rows 3 and 17 of batch 0 see nothing (zeros, finite gradients). Keys 16..31 are masked
    # for every query, a whole key block, so the kernel must never read it: their values are
    # NaN and any load-and-multiply-by-zero would poison the output.
    batch, seq = 2, 48
    rng = np.random.default_rng(0)
    mask = rng.random((batch, 1, seq, seq)) < 0.6
    mask[0, 0, [3, 17], :] = False
    mask[:, :, :, 16:32] = False
    mask_array = jnp.asarray(mask)
    query, key, value = random_qkv(6, batch=batch, seq_q=seq, num_kv_heads=2)
    poisoned = value.at[:, :, 16:32].set(jnp.nan)
    out = pallas_flash_attention(
        query, key, poisoned, mask=mask_array, interpret=True, block_q=16, block_kv=16
    )
    expected = reference_attention(query, key, value, mask=mask_array)
    assert relative_error(out, expected) < 1e-5
    assert np.all(np.asarray(out)[0, :, [3, 17]] == 0.0)
    check_case(seed=6, mask=mask_array, seq_q=seq, seq_kv=seq)


def test_bfloat16_causal_head_dim_64() -> None:
    check_case(
        seed=8,
        score_mod_of=lambda: mods.causal_mod(),
        seq_q=48,
        seq_kv=48,
        head_dim=64,
        block_q=32,
        block_kv=32,
        dtype=jnp.bfloat16,
        value_tol=2e-2,
        grad_tol=3e-2,
    )


def test_every_supported_mod_lowers_to_triton() -> None:
    # Lowering (not compiling) the forward and backward to Triton IR needs no GPU: it catches
    # any primitive or indexing the Triton backend cannot express, for every supported mod.
    batch, heads, seq, head_dim = 2, 4, 200, 128
    q = jnp.zeros((batch, heads, seq, head_dim), jnp.bfloat16)
    k = jnp.zeros((batch, 2, seq, head_dim), jnp.bfloat16)
    ids = jnp.zeros((batch, seq), jnp.int32)
    score_mod = mods.compose_score_mods(
        mods.additive_bias_mod(jnp.zeros((1, heads, seq, seq))),
        mods.alibi_mod(heads),
        mods.softcap_mod(30.0),
        mods.sliding_window_mod(64),
        mods.document_mask_mod(ids),
        mods.prefix_lm_mod(jnp.array([3, 5])),
        mods.shift_positions(mods.causal_mod(), q_offset=jnp.array([2, 3]), kv_offset=1),
        lambda s, b, h, qi, ki: s + 0.1 * jnp.cos(qi * 0.1),
    )
    mask = jnp.ones((batch, 1, 1, seq), bool)

    def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return flash_attention_with_config(
            q, k, v, config=FlashConfig(), mask=mask, score_mod=score_mod
        )

    def grads(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
        out, pullback = jax.vjp(attend, q, k, v)
        result: tuple[jax.Array, ...] = pullback(out)
        return result

    for fn in (attend, grads):
        text = jax.jit(fn).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text


@pytest.mark.gpu
def test_gpu_documents_bfloat16_three_forward_stages() -> None:
    # Block lists on bf16 at head_dim 128: all three kernels pipeline three stages
    # (plan.LISTED_STAGES), and the dK/dV kernel walks the
    # transposed lists.
    ids = jnp.asarray(np.repeat(np.arange(3), [700, 900, 448])[None].repeat(2, 0))
    score_mod = mods.document_mask_mod(ids)
    q, k, v = random_qkv(23, num_heads=8, num_kv_heads=2, seq_q=2048, head_dim=128,
                         dtype=jnp.bfloat16)
    config = default_config(128, 128, 128, False)
    prepared = prepare(config, q, k, v, None, score_mod)
    assert forward_stages(config, prepared) == 3
    assert backward_stages(prepared, 2) == 3
    gpu_case(score_mod, seq=2048, dtype=jnp.bfloat16, num_kv_heads=2, head_dim=128)
