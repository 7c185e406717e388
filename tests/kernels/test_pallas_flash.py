"""pallas_flash_attention: the real Pallas kernels in interpret mode on CPU, Triton on GPU.

Interpret mode compiles slowly (several seconds per kernel), so each CPU case below covers
several features at once (a mod, a head grouping, uneven lengths, a block size) and checks the
forward against the float64 reference and query/key/value (and bias) gradients against
``jax.grad`` of ``standard_attention`` at highest precision, in one jitted call.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _mods as mods
from attnax.kernels._pallas_flash import (
    FlashConfig,
    _build_plan,
    block_classes,
    block_lists,
    block_ranges,
    default_config,
    flash_attention_with_config,
    forward_stages,
    full_blocks_consecutive,
    mosaic_forward_applies,
    pallas_flash_attention,
    prepare,
)
from attnax.kernels._pallas_flash_mgpu import mosaic_forward, mosaic_gpu_available
from attnax.kernels._pallas_flash_vjp import backward_stages, dq_launch, mosaic_backward_applies
from attnax.kernels._standard import standard_attention
from tests._reference import output_and_vjp, random_qkv, reference_attention, relative_error

HIGHEST = jax.lax.Precision.HIGHEST


def _check(
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


# --------------------------------------------------------------------------- CPU, interpret


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
    _check(seed=0, score_mod_of=lambda: mods.causal_mod(), seq_q=40, seq_kv=56)


def test_full_mqa_mixed_blocks() -> None:
    # No mask at all, one KV head for four query heads, unequal forward tiles, head_dim 32.
    _check(seed=1, num_kv_heads=1, seq_q=24, seq_kv=72, head_dim=32, block_q=32, block_kv=16)


@pytest.mark.parametrize("window", [None, 80])
@pytest.mark.parametrize(
    ("dtype", "head_dim", "dq_rows", "tol"),
    [
        (jnp.float32, 16, 64, 1e-5),
        # bf16 at head_dim 128: the dQ kernel takes FlashConfig.wide_dq's 128-row tiles, two
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
    _check(
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


@pytest.mark.parametrize(
    ("score_mod", "seq", "head_dim", "dtype", "wide_dq", "expected_rows"),
    [
        (None, 256, 128, jnp.bfloat16, True, 128),
        ("causal", 256, 96, jnp.float16, True, 128),  # head_dim 96 pads to 128
        ("causal", 256, 64, jnp.bfloat16, True, 64),  # head_dim 64: the configured tile
        ("causal", 256, 256, jnp.bfloat16, True, 64),  # head_dim 256: the configured tile
        ("causal", 256, 128, jnp.float32, True, 64),  # float32 tiles: shared memory
        ("bias", 256, 128, jnp.bfloat16, True, 64),  # a bias tile: left out as a precaution
        ("causal", 256, 128, jnp.bfloat16, False, 64),  # switched off
        ("causal", 190, 128, jnp.bfloat16, True, 64),  # a padding of 192: no whole wide tiles
        ("causal", 100, 128, jnp.bfloat16, True, 128),  # one wide tile over 128 padded rows
        ("causal", 60, 128, jnp.bfloat16, True, 64),  # shorter than a wide tile
        ("documents", 256, 128, jnp.bfloat16, True, 64),  # block lists keep 64-row tiles
    ],
)
def test_wide_dq_tiles_only_where_chosen(
    score_mod: str | None, seq: int, head_dim: int, dtype: Any, wide_dq: bool,
    expected_rows: int,
) -> None:
    """FlashConfig.wide_dq's 128-row dQ tiles go to 2-byte interval-mask calls without a bias
    whose padding holds them; every other call keeps the configured tile. (The wide tiles'
    values: test_runs_of_full_blocks_in_every_kernel in bf16, and the GPU tests.)"""
    q, k, v = random_qkv(5, batch=1, num_heads=2, num_kv_heads=2, seq_q=seq, seq_kv=seq,
                         head_dim=head_dim, dtype=dtype)
    mod: Any = {
        None: None,
        "causal": mods.causal_mod(),
        "bias": mods.additive_bias_mod(jnp.ones((1, 2, seq, seq), jnp.bfloat16)),
        "documents": mods.document_mask_mod(jnp.zeros((1, seq), jnp.int32)),
    }[score_mod]
    config = FlashConfig(block_q=16, block_kv=16, wide_dq=wide_dq, interpret=True)
    rows, _, _ = dq_launch(config, prepare(config, q, k, v, None, mod))
    assert rows == expected_rows


@pytest.mark.parametrize(
    ("score_mod", "head_dim", "dtype", "expected"),
    [
        ("documents", 128, jnp.bfloat16, 3),
        ("documents", 96, jnp.float16, 3),  # head_dim 96 pads to 128
        ("custom", 128, jnp.bfloat16, 3),  # a callable mask: block lists too
        ("documents", 64, jnp.bfloat16, 2),  # not measured at head_dim 64
        ("documents", 128, jnp.float32, 2),  # float32 tiles: shared memory
        ("documents+bias", 128, jnp.bfloat16, 2),  # a plane tile per stage
        ("dense", 128, jnp.bfloat16, 2),  # likewise
        ("causal", 128, jnp.bfloat16, 2),  # block ranges keep two
        (None, 128, jnp.bfloat16, 2),
    ],
)
def test_listed_stages_only_where_chosen(
    score_mod: str | None, head_dim: int, dtype: Any, expected: int
) -> None:
    seq = 96
    q, k, v = random_qkv(6, batch=1, num_heads=2, num_kv_heads=2, seq_q=seq, seq_kv=seq,
                         head_dim=head_dim, dtype=dtype)
    documents = mods.document_mask_mod(jnp.zeros((1, seq), jnp.int32))
    mod: Any = {
        None: None,
        "causal": mods.causal_mod(),
        "documents": documents,
        "custom": mods.mask_mod_to_score_mod(lambda b, h, qi, ki: (qi // 7) >= (ki // 7)),
        "documents+bias": mods.compose_score_mods(
            mods.additive_bias_mod(jnp.ones((1, 2, seq, seq), jnp.bfloat16)), documents
        ),
        "dense": None,
    }[score_mod]
    mask = jnp.tril(jnp.ones((seq, seq), bool))[None, None] if score_mod == "dense" else None
    config = FlashConfig(block_q=16, block_kv=16, interpret=True)
    prepared = prepare(config, q, k, v, mask, mod)
    ranged = full_blocks_consecutive(prepared.plan)
    assert forward_stages(config, prepared) == expected
    # Both backward kernels: dK/dV's stages, and dQ's launch where rows keep lists (interval
    # masks take the wide dQ tile's own three stages).
    assert backward_stages(config, prepared, 2) == expected
    if not ranged:
        assert dq_launch(config, prepared)[1:] == (4, expected)
    off = FlashConfig(
        block_q=16, block_kv=16, interpret=True, num_stages_listed=None,
        num_stages_bwd_listed=None,
    )
    assert forward_stages(off, prepared) == 2
    assert backward_stages(off, prepared, 2) == 2


@pytest.mark.parametrize("transposed_dkv", [True, False])
def test_dkv_tile_orientations(transposed_dkv: bool) -> None:
    # The dK/dV kernel in (keys, queries) form (the default) and in the (queries, keys) form
    # kept to measure against, with everything whose tiles depend on the orientation: a bias
    # plane (and its gradient), document-id rows and a value mod, under GQA with several
    # blocks per row and column.
    ids = jnp.asarray(np.repeat(np.array([[0, 1, 0], [2, 2, 3]]), [20, 26, 18], axis=1))
    bias = 0.5 * jax.random.normal(jax.random.key(12), (1, 4, 64, 64), jnp.float32)
    config = FlashConfig(
        block_q=16, block_kv=16, block_q_dkv=16, block_kv_dkv=32, block_q_dq=16,
        block_kv_dq=16, transposed_dkv=transposed_dkv, interpret=True,
    )

    def score_mod(b: jax.Array) -> Any:
        return mods.compose_score_mods(
            mods.additive_bias_mod(b), mods.softcap_mod(3.0), mods.document_mask_mod(ids)
        )

    q, k, v = random_qkv(13, batch=2, num_heads=4, num_kv_heads=2, seq_q=64, seq_kv=64,
                         head_dim=16)
    cotangent = jax.random.normal(jax.random.key(14), q.shape, jnp.float32)
    args = (q, k, v, bias)
    _, grads = output_and_vjp(
        lambda q, k, v, b: flash_attention_with_config(
            q, k, v, config=config, score_mod=score_mod(b)
        ),
        args,
        cotangent,
    )
    _, want = output_and_vjp(
        lambda q, k, v, b: standard_attention(q, k, v, score_mod=score_mod(b), precision=HIGHEST),
        args,
        cotangent,
    )
    for name, got, expected in zip(("query", "key", "value", "bias"), grads, want, strict=True):
        assert relative_error(got, expected) < 1e-5, name


def test_sliding_window_with_alibi() -> None:
    score_mod = mods.compose_score_mods(mods.alibi_mod(4), mods.sliding_window_mod(12))
    _check(seed=2, score_mod_of=lambda: score_mod, seq_q=64, seq_kv=64)


def test_softcap_with_documents() -> None:
    ids = jnp.asarray(np.repeat(np.array([[0, 1, 2], [0, 0, 1]]), [13, 20, 15], axis=1))
    score_mod = mods.compose_score_mods(mods.softcap_mod(2.0), mods.document_mask_mod(ids))
    _check(seed=3, score_mod_of=lambda: score_mod, seq_q=48, seq_kv=48, num_kv_heads=4)


def test_prefix_lm_with_int_offsets() -> None:
    # Prefix-LM composed with a causal mask seen from shifted positions (a cache's view).
    score_mod = mods.compose_score_mods(
        mods.prefix_lm_mod(jnp.array([5, 30])),
        mods.shift_positions(mods.causal_mod(), q_offset=16, kv_offset=0),
    )
    _check(seed=4, score_mod_of=lambda: score_mod, seq_q=24, seq_kv=40, block_q=16, block_kv=32)


def test_prefix_lm_and_window_walk_block_ranges() -> None:
    # Prefix-LM masks are interval masks: the three kernels walk them by block ranges. Per-batch
    # prefixes that end inside a tile and past several, alone and with a two-sided window.
    prefix = mods.prefix_lm_mod(jnp.array([7, 50]))
    _check(seed=21, score_mod_of=lambda: prefix, seq_q=96, seq_kv=96)
    windowed = mods.compose_score_mods(
        mods.prefix_lm_mod(jnp.array([40, 3])), mods.sliding_window_mod(20, causal=False)
    )
    _check(seed=22, score_mod_of=lambda: windowed, seq_q=80, seq_kv=96)


def test_additive_bias_gradient() -> None:
    # A learnable (1, H, T, S) bias under causal masking gets its gradient (summed over batch).
    bias = 0.5 * jax.random.normal(jax.random.key(7), (1, 4, 32, 48), jnp.float32)
    _, grads = _check(
        seed=5,
        score_mod_of=lambda b: mods.compose_score_mods(
            mods.additive_bias_mod(b), mods.causal_mod()
        ),
        extra=(bias,),
        seq_q=32,
        seq_kv=48,
    )
    assert grads[3].shape == bias.shape


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
    _check(seed=6, mask=mask_array, seq_q=seq, seq_kv=seq)


def test_bfloat16_causal_head_dim_64() -> None:
    _check(
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


def _plan_and_classes(
    score_mod: Any, *, batch: int, seq_q: int, seq_kv: int, block_q: int, block_kv: int
) -> tuple[Any, jax.Array]:
    """A mask's plan (no dense mask) and its block classes at these tiles, the classes
    compiled as one call (op by op, every new shape compiles each primitive anew)."""
    padded_q = -(-seq_q // block_q) * block_q
    padded_kv = -(-seq_kv // block_kv) * block_kv
    lengths = {"seq_q": seq_q, "seq_kv": seq_kv}
    plan = _build_plan(
        None, score_mod, batch=batch, padded_q=padded_q, padded_kv=padded_kv, **lengths
    )
    tiles = {"block_q": block_q, "block_kv": block_kv, "num_q_blocks": padded_q // block_q}
    classes = jax.jit(
        functools.partial(block_classes, plan, batch=batch, num_heads=1, **lengths, **tiles)
    )()
    return plan, classes


def test_block_lists_skip_empty_and_order_partial_first() -> None:
    _, classes = _plan_and_classes(
        mods.causal_mod(), batch=1, seq_q=64, seq_kv=64, block_q=16, block_kv=16
    )
    indices, counts = block_lists(classes)
    # Query block i: one partial (the diagonal), i full blocks, the rest never listed.
    assert np.asarray(counts)[0, 0].tolist() == [[1, 0], [1, 1], [1, 2], [1, 3]]
    assert np.asarray(indices)[0, 0, 3, :4].tolist() == [3, 0, 1, 2]


def _full_runs_are_consecutive(classes: jax.Array, *, ranged: bool) -> list[bool]:
    """For every row of block classes and every column: whether its listed full blocks are
    consecutive. With ``ranged``, also that :func:`block_ranges`' four bounds and counts name
    exactly the blocks :func:`block_lists` lists, partial ones and full ones, in order."""
    runs_ok = []
    for table in (classes, jnp.swapaxes(classes, -1, -2)):
        # One compiled call per table shape (the random test below has a dozen shapes).
        indices, counts = (np.asarray(x) for x in jax.jit(block_lists)(table))
        bounds, range_counts = (np.asarray(x) for x in jax.jit(block_ranges)(table))
        for row, (n_partial, n_full), (first, first_full, end_full, end), range_count in zip(
            indices.reshape(-1, indices.shape[-1]),
            counts.reshape(-1, 2),
            bounds.reshape(-1, 4),
            range_counts.reshape(-1, 2),
            strict=True,
        ):
            full = row[n_partial : n_partial + n_full]
            runs_ok.append(bool(np.all(np.diff(full) == 1)))
            if ranged:
                partial = [*range(first, first_full), *range(end_full, end)]
                assert range_count.tolist() == [n_partial, n_full]
                assert partial == row[:n_partial].tolist()
                assert list(range(first_full, end_full)) == full.tolist()
    return runs_ok


@pytest.mark.parametrize(
    ("mod_name", "seq_q", "seq_kv"),
    [
        ("none", 70, 100),
        ("causal", 100, 100),
        ("causal", 60, 100),
        ("window", 100, 100),
        ("window-both-sides", 90, 100),
        ("causal-and-window", 100, 100),
        ("documents", 96, 96),
        ("box", 100, 90),
        ("prefix", 100, 100),
        ("prefix-and-window", 90, 100),
    ],
)
def test_full_blocks_consecutive_is_what_the_lists_hold(
    mod_name: str, seq_q: int, seq_kv: int
) -> None:
    """The kernels step through full blocks by arithmetic only where the lists allow it.

    Where ``full_blocks_consecutive`` says so, every row's full blocks (and, transposed, every
    column's) are consecutive ascending indices, padding included; for a document mask it
    must say no (its rows skip blocks). There the four bounds of :func:`block_ranges` name
    exactly the lists' partial and full blocks.
    """
    ids = jnp.asarray(np.repeat(np.array([[0, 1, 0]]), [32, 32, 32], axis=1))
    score_mod = {
        "none": None,
        "causal": mods.causal_mod(),
        "window": mods.sliding_window_mod(40),
        "window-both-sides": mods.sliding_window_mod(24, causal=False),
        "causal-and-window": mods.compose_score_mods(
            mods.causal_mod(), mods.sliding_window_mod(50)
        ),
        "documents": mods.document_mask_mod(ids),
        "prefix": mods.prefix_lm_mod(jnp.array([37])),
        "prefix-and-window": mods.compose_score_mods(
            mods.prefix_lm_mod(jnp.array([45])), mods.sliding_window_mod(30, causal=False)
        ),
        "box": mods.MaskScoreMod(
            mods.BoxMask(jnp.int32(21), jnp.int32(83), jnp.int32(7), jnp.int32(61))
        ),
    }[mod_name]
    plan, classes = _plan_and_classes(
        score_mod, batch=1, seq_q=seq_q, seq_kv=seq_kv, block_q=16, block_kv=16
    )
    consecutive = full_blocks_consecutive(plan)
    assert consecutive == (mod_name != "documents")
    runs_ok = _full_runs_are_consecutive(classes, ranged=consecutive)
    assert all(runs_ok) if consecutive else not all(runs_ok)


def test_block_ranges_name_the_lists_blocks_for_random_interval_masks() -> None:
    """For every mask ``full_blocks_consecutive`` admits, on random sizes and tiles (batch 2,
    per-batch prefixes), the four bounds name exactly the partial and full blocks of every row
    and every column; a mask it wrongly admitted would fail here."""
    rng = np.random.default_rng(7)

    def random_interval_mask(seq_q: int, seq_kv: int) -> Any:
        kind = int(rng.integers(0, 5))
        if kind == 0:
            return mods.causal_mod()
        if kind == 1:
            return mods.sliding_window_mod(int(rng.integers(1, 40)), causal=bool(rng.integers(2)))
        if kind == 2:
            return mods.prefix_lm_mod(jnp.asarray(rng.integers(0, seq_kv + 1, size=2)))
        if kind == 3:
            q_lo, q_hi = np.sort(rng.integers(0, seq_q + 1, size=2))
            kv_lo, kv_hi = np.sort(rng.integers(0, seq_kv + 1, size=2))
            bounds = (jnp.int32(x) for x in (q_lo, q_hi, kv_lo, kv_hi))
            return mods.MaskScoreMod(mods.BoxMask(*bounds))
        return mods.compose_score_mods(
            random_interval_mask(seq_q, seq_kv), random_interval_mask(seq_q, seq_kv)
        )

    for _ in range(12):
        seq_q, seq_kv = (int(x) for x in rng.integers(20, 120, size=2))
        block_q, block_kv = (int(x) for x in rng.choice([16, 32], size=2))
        plan, classes = _plan_and_classes(
            random_interval_mask(seq_q, seq_kv),
            batch=2,
            seq_q=seq_q,
            seq_kv=seq_kv,
            block_q=block_q,
            block_kv=block_kv,
        )
        assert full_blocks_consecutive(plan)
        _full_runs_are_consecutive(classes, ranged=True)


def test_padded_last_key_block_is_partial() -> None:
    _, classes = _plan_and_classes(None, batch=1, seq_q=20, seq_kv=20, block_q=16, block_kv=16)
    assert np.asarray(classes)[0, 0].tolist() == [[2, 1], [2, 1]]


def test_dropout_is_not_implemented() -> None:
    q, k, v = random_qkv(9)
    with pytest.raises(NotImplementedError, match="memory_efficient_attention"):
        pallas_flash_attention(
            q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0), deterministic=False
        )


@jax.tree_util.register_pytree_node_class
class _TableMod:
    """A user mod holding an array the kernel cannot tile."""

    def __init__(self, table: jax.Array) -> None:
        self.table = table

    def __call__(self, s: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
        return s + self.table[h]

    def tree_flatten(self) -> tuple[tuple[jax.Array], None]:
        return (self.table,), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: tuple[jax.Array]) -> "_TableMod":
        return cls(*children)


def test_array_holding_user_mod_is_rejected_by_name() -> None:
    q, k, v = random_qkv(10)
    with pytest.raises(NotImplementedError, match="_TableMod.*memory_efficient_attention"):
        pallas_flash_attention(q, k, v, score_mod=_TableMod(jnp.ones(4)), interpret=True)


def test_fallback_matches_reference() -> None:
    # force_fallback (and any non-GPU backend without interpret) uses memory_efficient_attention.
    q, k, v = random_qkv(11, seq_q=20, seq_kv=28, num_kv_heads=1)
    out = pallas_flash_attention(q, k, v, score_mod=mods.causal_mod(), force_fallback=True)
    expected = reference_attention(q, k, v, score_mod=mods.causal_mod())
    assert relative_error(out, expected) < 1e-5


def test_bad_block_size_names_the_argument() -> None:
    q, k, v = random_qkv(12)
    with pytest.raises(ValueError, match="block_q"):
        pallas_flash_attention(q, k, v, block_q=48, interpret=True)
    with pytest.raises(ValueError, match="mosaic_block_kv.*multiple of 64"):
        FlashConfig(mosaic_block_kv=32)
    with pytest.raises(ValueError, match="mosaic_stages"):
        FlashConfig(mosaic_stages=1)


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


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("full", True),
        ("gqa head_dim 64 float16", True),
        ("head_dim 96", True),  # padded to 128 with zero columns, as for Triton
        ("causal", False),
        ("alibi", False),
        ("dense mask", False),
        ("float32", False),
        ("mixed half types", False),  # wgmma takes one operand type
        ("head_dim 256", False),
        ("query length 200", False),  # padded query rows
        ("key length 320", False),  # a padded key tile would need a mask
        ("switched off", False),
        ("interpret", False),
        ("stepped", False),
        ("not hopper", False),
    ],
)
def test_mosaic_forward_only_where_chosen(case: str, expected: bool) -> None:
    """The Mosaic-GPU forward takes full attention on 2-byte inputs at head_dim 64/128 in
    whole tiles; everything else stays on Triton. (Its values: the GPU tests below.)"""
    head_dim = {"gqa head_dim 64 float16": 64, "head_dim 256": 256, "head_dim 96": 96}.get(
        case, 128
    )
    dtype = {"float32": jnp.float32, "gqa head_dim 64 float16": jnp.float16}.get(
        case, jnp.bfloat16
    )
    seq_q = 200 if case == "query length 200" else 256
    seq_kv = 320 if case == "key length 320" else 256
    q, k, v = random_qkv(7, batch=1, num_heads=4, num_kv_heads=2 if "gqa" in case else 4,
                         seq_q=seq_q, seq_kv=seq_kv, head_dim=head_dim, dtype=dtype)
    if case == "mixed half types":
        k, v = k.astype(jnp.float16), v.astype(jnp.float16)
    mod: Any = {
        "causal": mods.causal_mod(),
        "alibi": mods.alibi_mod(4),
    }.get(case)
    mask = jnp.ones((1, 1, seq_q, seq_kv), bool) if case == "dense mask" else None
    config = FlashConfig(
        mosaic_forward=case != "switched off",
        interpret=case == "interpret",
        key_step_blocks=2 if case == "stepped" else 0,
    )
    prepared = prepare(config, q, k, v, mask, mod)
    scale = head_dim**-0.5
    assert mosaic_forward_applies(config, prepared, scale, hopper=case != "not hopper") is expected
    # Without a Hopper GPU (this machine) nothing takes it.
    if jax.default_backend() == "cpu":
        assert not mosaic_forward_applies(config, prepared, scale)


@pytest.mark.skipif(not mosaic_gpu_available(), reason="this jax has no Mosaic GPU")
def test_mosaic_forward_lowers_for_cuda() -> None:
    # Lowering the Mosaic-GPU kernel (not compiling it) needs no GPU: it catches any
    # primitive, layout or shared-memory slicing Mosaic GPU cannot express, in the forward
    # alone and under vmap (its batching rule folds the mapped axis into the batch).
    q, kv = _half_spec(2, 4, 256, 128), _half_spec(2, 2, 256, 128)
    batched, batched_kv = _half_spec(3, *q.shape), _half_spec(3, *kv.shape)

    def forward(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        return mosaic_forward(q, k, v, scale=0.1, block_kv=128, stages=2)

    assert "mosaic_gpu" in _lowered_for_cuda(forward, q, kv, kv)
    assert "mosaic_gpu" in _lowered_for_cuda(jax.vmap(forward), batched, batched_kv, batched_kv)


def _half_spec(*shape: int) -> Any:
    return jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # type: ignore[no-untyped-call]


def _lowered_for_cuda(fn: Callable[..., Any], *shapes: Any) -> str:
    text: str = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    return text


@pytest.mark.skipif(not mosaic_gpu_available(), reason="this jax has no Mosaic GPU")
@pytest.mark.parametrize(
    "config",
    [
        FlashConfig(),
        FlashConfig(mosaic_dkv_block_q=128, mosaic_dq_block_kv=64),
        FlashConfig(mosaic_dkv_stages=3, mosaic_dq_stages=3, mosaic_dq_block_kv=64),
        FlashConfig(mosaic_backward=False),
    ],
    ids=["default", "other tiles", "three slots", "triton backward"],
)
def test_mosaic_backward_lowers_for_cuda(
    config: FlashConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As dispatched on a Hopper GPU: full attention's forward+backward (GQA) lowers to Mosaic
    # GPU alone, under vmap too; with mosaic_backward off, the backward stays Triton.
    from attnax.kernels import _pallas_flash

    q, kv = _half_spec(2, 4, 256, 128), _half_spec(2, 2, 256, 128)
    monkeypatch.setattr(_pallas_flash, "hopper_gpu", lambda: True)

    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> Any:
        return flash_attention_with_config(q, k, v, config=config).astype(jnp.float32).sum()

    grad = jax.grad(loss, argnums=(0, 1, 2))
    for fn, shapes in ((grad, (q, kv, kv)), (jax.vmap(grad), (_half_spec(3, *q.shape),
                                                               _half_spec(3, *kv.shape),
                                                               _half_spec(3, *kv.shape)))):
        text = _lowered_for_cuda(fn, *shapes)
        assert "mosaic_gpu" in text
        assert ("__gpu$xla.gpu.triton" in text) is not config.mosaic_backward
    real = random_qkv(8, batch=1, num_heads=4, num_kv_heads=2, seq_q=256, head_dim=128,
                      dtype=jnp.bfloat16)
    prepared = prepare(config, *real, None, None)
    assert mosaic_backward_applies(config, prepared, 0.1) is config.mosaic_backward


@pytest.mark.skipif(not mosaic_gpu_available(), reason="this jax has no Mosaic GPU")
def test_mosaic_tiles_over_shared_memory_name_the_setting() -> None:
    # Tiles that overflow a block's shared memory are refused when traced, naming the
    # FlashConfig fields to lower (Mosaic GPU itself would fail only when compiling); at
    # head_dim 64 the same settings fit.
    from attnax.kernels._pallas_flash_mgpu_vjp import mosaic_backward

    def shapes(head_dim: int) -> tuple[Any, ...]:
        q = _half_spec(1, 2, 512, head_dim)
        f32 = jax.ShapeDtypeStruct((1, 2, 512), jnp.float32)  # type: ignore[no-untyped-call]
        return q, q, q, q, f32, f32

    def backward(dkv_block_q: int, dq_block_kv: int) -> Callable[..., Any]:
        return functools.partial(mosaic_backward, scale=0.1, dkv_block_q=dkv_block_q,
                                 dq_block_kv=dq_block_kv, dkv_stages=3, dq_stages=3)

    with pytest.raises(ValueError, match="dK/dV kernel.*`mosaic_dkv_stages` or "
                       "`mosaic_dkv_block_q`"):
        jax.eval_shape(backward(128, 64), *shapes(128))
    with pytest.raises(ValueError, match="dQ kernel.*`mosaic_dq_stages` or `mosaic_dq_block_kv`"):
        jax.eval_shape(backward(64, 128), *shapes(128))
    assert len(jax.eval_shape(backward(128, 128), *shapes(64))) == 3
    q = _half_spec(1, 2, 512, 128)
    with pytest.raises(ValueError, match="forward.*`mosaic_stages` or `mosaic_block_kv`"):
        jax.eval_shape(functools.partial(mosaic_forward, scale=0.1, block_kv=256, stages=2),
                       q, q, q)


# --------------------------------------------------------------------------- GPU, compiled


def _gpu_case(
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


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [256, 64, 128])
def test_gpu_causal_head_dims(head_dim: int) -> None:
    _gpu_case(mods.causal_mod(), seq=1000, dtype=jnp.bfloat16, head_dim=head_dim)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("seq", "dtype", "num_kv_heads", "head_dim", "mosaic"),
    [
        (1024, jnp.bfloat16, 8, 128, True),
        (512, jnp.float16, 2, 64, True),
        (1000, jnp.bfloat16, 8, 128, False),  # padded tiles: the Triton forward
    ],
)
def test_gpu_full_attention_mosaic_forward(
    seq: int, dtype: Any, num_kv_heads: int, head_dim: int, mosaic: bool
) -> None:
    # Full attention on a Hopper GPU takes the Mosaic-GPU forward and backward (the latter
    # reads the former's log-sum-exp); a padded length takes Triton's for both.
    q, k, v = random_qkv(24, num_heads=8, num_kv_heads=num_kv_heads, seq_q=seq,
                         head_dim=head_dim, dtype=dtype)
    config = default_config(head_dim, 128, 128, False)
    prepared = prepare(config, q, k, v, None, None)
    hopper = jax.devices()[0].compute_capability.startswith("9.")
    assert mosaic_forward_applies(config, prepared, head_dim**-0.5) is (mosaic and hopper)
    assert mosaic_backward_applies(config, prepared, head_dim**-0.5) is (mosaic and hopper)
    _gpu_case(None, seq=seq, dtype=dtype, num_kv_heads=num_kv_heads, head_dim=head_dim)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("seq", "dtype", "num_kv_heads", "head_dim", "config"),
    [
        (1024, jnp.bfloat16, 8, 128, FlashConfig(mosaic_dkv_block_q=128, mosaic_dq_block_kv=64)),
        (512, jnp.float16, 2, 64, FlashConfig(mosaic_dkv_block_q=128, mosaic_dkv_stages=3,
                                              mosaic_dq_stages=3)),
        (512, jnp.bfloat16, 2, 128, FlashConfig(mosaic_backward=False)),
    ],
    ids=["other tiles", "three slots at head_dim 64", "triton backward"],
)
def test_gpu_mosaic_backward_configs(
    seq: int, dtype: Any, num_kv_heads: int, head_dim: int, config: FlashConfig
) -> None:
    # The Mosaic-GPU backward's other tiles and slots, and the Triton backward reading the
    # Mosaic-GPU forward's log-sum-exp (mosaic_backward off): values and gradients.
    _gpu_case(None, seq=seq, dtype=dtype, num_kv_heads=num_kv_heads, head_dim=head_dim,
              config=config, seed=26)


@pytest.mark.gpu
def test_gpu_full_attention_under_vmap() -> None:
    q, k, v = random_qkv(25, batch=6, num_heads=4, num_kv_heads=2, seq_q=512, head_dim=128,
                         dtype=jnp.bfloat16)
    shaped = [x.reshape(3, 2, *x.shape[1:]) for x in (q, k, v)]
    cotangent = jax.random.normal(jax.random.key(28), shaped[0].shape).astype(jnp.bfloat16)
    mapped = jax.vmap(pallas_flash_attention)
    reference = jax.vmap(functools.partial(standard_attention, precision=HIGHEST))
    if jax.devices()[0].compute_capability.startswith("9."):
        # On Hopper the mapped forward and backward stay Mosaic GPU (their custom_vmap rules).
        def gradients(*qkv: jax.Array) -> Any:
            return jax.vjp(mapped, *qkv)[1](cotangent)

        text = jax.jit(gradients).lower(*shaped).as_text()
        assert "mosaic_gpu" in text and "__gpu$xla.gpu.triton" not in text
    got, grads = output_and_vjp(mapped, tuple(shaped), cotangent)
    f32 = tuple(x.astype(jnp.float32) for x in shaped)
    want, want_grads = output_and_vjp(reference, f32, cotangent)
    assert relative_error(got, want) < 2e-2
    for grad, expected in zip(grads, want_grads, strict=True):
        assert relative_error(grad, expected) < 4e-2


@pytest.mark.gpu
def test_gpu_alibi_window_gqa() -> None:
    score_mod = mods.compose_score_mods(mods.alibi_mod(8), mods.sliding_window_mod(256))
    _gpu_case(score_mod, seq=2048, dtype=jnp.bfloat16, num_kv_heads=2)


@pytest.mark.gpu
def test_gpu_documents_softcap_float32() -> None:
    ids = jnp.asarray(np.repeat(np.arange(4), [300, 500, 200, 24])[None].repeat(2, 0))
    score_mod = mods.compose_score_mods(mods.softcap_mod(20.0), mods.document_mask_mod(ids))
    _gpu_case(score_mod, seq=1024, dtype=jnp.float32, num_kv_heads=1, head_dim=64)


@pytest.mark.gpu
def test_gpu_documents_bfloat16_three_forward_stages() -> None:
    # Block lists on bf16 at head_dim 128: all three kernels pipeline three stages
    # (FlashConfig.num_stages_listed, num_stages_bwd_listed), and the dK/dV kernel walks the
    # transposed lists.
    ids = jnp.asarray(np.repeat(np.arange(3), [700, 900, 448])[None].repeat(2, 0))
    score_mod = mods.document_mask_mod(ids)
    q, k, v = random_qkv(23, num_heads=8, num_kv_heads=2, seq_q=2048, head_dim=128,
                         dtype=jnp.bfloat16)
    config = default_config(128, 128, 128, False)
    prepared = prepare(config, q, k, v, None, score_mod)
    assert forward_stages(config, prepared) == 3
    assert backward_stages(config, prepared, 2) == 3
    _gpu_case(score_mod, seq=2048, dtype=jnp.bfloat16, num_kv_heads=2, head_dim=128)


@pytest.mark.gpu
def test_gpu_bias_gradient() -> None:
    bias = jax.random.normal(jax.random.key(3), (1, 8, 512, 512), jnp.float32)
    query, key, value = random_qkv(22, num_heads=8, num_kv_heads=4, seq_q=512, head_dim=64)

    def loss(b: jax.Array, fn: Callable[..., jax.Array], **kw: Any) -> jax.Array:
        score_mod = mods.compose_score_mods(mods.additive_bias_mod(b), mods.causal_mod())
        return jnp.sum(fn(query, key, value, score_mod=score_mod, **kw) ** 2)

    got = jax.jit(jax.grad(lambda b: loss(b, pallas_flash_attention)))(bias)
    want = jax.jit(jax.grad(lambda b: loss(b, standard_attention, precision=HIGHEST)))(bias)
    assert relative_error(got, want) < 5e-3
