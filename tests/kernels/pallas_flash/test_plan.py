"""The trace-time planning: block classes, lists and ranges, and which kernel and launch each
call takes (wide dQ tiles, listed stages, the Mosaic-GPU forward)."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _mods as mods
from attnax.kernels.pallas_flash import FlashConfig, prepare
from attnax.kernels.pallas_flash.plan import (
    backward_stages,
    block_classes,
    block_lists,
    block_ranges,
    dq_launch,
    forward_stages,
    full_blocks_consecutive,
    mosaic_forward_applies,
)
from attnax.kernels.pallas_flash.tile_mods import build_plan
from tests._reference import random_qkv


@pytest.mark.parametrize(
    ("score_mod", "seq", "head_dim", "dtype", "expected_rows"),
    [
        (None, 256, 128, jnp.bfloat16, 128),
        ("causal", 256, 96, jnp.float16, 128),  # head_dim 96 pads to 128
        ("causal", 256, 64, jnp.bfloat16, 64),  # head_dim 64: the configured tile
        ("causal", 256, 256, jnp.bfloat16, 64),  # head_dim 256: the configured tile
        ("causal", 256, 128, jnp.float32, 64),  # float32 tiles: shared memory
        ("bias", 256, 128, jnp.bfloat16, 64),  # a bias tile: left out as a precaution
        ("causal", 190, 128, jnp.bfloat16, 64),  # a padding of 192: no whole wide tiles
        ("causal", 100, 128, jnp.bfloat16, 128),  # one wide tile over 128 padded rows
        ("causal", 60, 128, jnp.bfloat16, 64),  # shorter than a wide tile
        ("documents", 256, 128, jnp.bfloat16, 64),  # block lists keep 64-row tiles
    ],
)
def test_wide_dq_tiles_only_where_chosen(
    score_mod: str | None, seq: int, head_dim: int, dtype: Any, expected_rows: int
) -> None:
    """The wide dQ launch's 128-row dQ tiles go to 2-byte interval-mask calls without a bias
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
    config = FlashConfig(block_q=16, block_kv=16, interpret=True)
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
    assert backward_stages(prepared, 2) == expected
    if not ranged:
        assert dq_launch(config, prepared)[1:] == (4, expected)


def _plan_and_classes(
    score_mod: Any, *, batch: int, seq_q: int, seq_kv: int, block_q: int, block_kv: int
) -> tuple[Any, jax.Array]:
    """A mask's plan (no dense mask) and its block classes at these tiles, the classes
    compiled as one call (op by op, every new shape compiles each primitive anew)."""
    padded_q = -(-seq_q // block_q) * block_q
    padded_kv = -(-seq_kv // block_kv) * block_kv
    lengths = {"seq_q": seq_q, "seq_kv": seq_kv}
    plan = build_plan(
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
        use_mosaic_forward=case != "switched off",
        interpret=case == "interpret",
        key_step_blocks=2 if case == "stepped" else 0,
    )
    prepared = prepare(config, q, k, v, mask, mod)
    scale = head_dim**-0.5
    assert mosaic_forward_applies(config, prepared, scale, hopper=case != "not hopper") is expected
    # Without a Hopper GPU (this machine) nothing takes it.
    if jax.default_backend() == "cpu":
        assert not mosaic_forward_applies(config, prepared, scale)
