"""Score mods, mask mods, mask builders and block sparsity, checked against NumPy."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _mods as mods

B, H, T, S = 2, 3, 7, 9


def _grid(batch: int = B, heads: int = H, seq_q: int = T, seq_kv: int = S) -> tuple[Any, ...]:
    return (
        jnp.arange(batch).reshape(-1, 1, 1, 1),
        jnp.arange(heads).reshape(1, -1, 1, 1),
        jnp.arange(seq_q).reshape(1, 1, -1, 1),
        jnp.arange(seq_kv).reshape(1, 1, 1, -1),
    )


def _np_grid(seq_q: int = T, seq_kv: int = S) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(seq_q)[:, None], np.arange(seq_kv)[None, :]


def _dense(mask_mod: Any, **sizes: int) -> np.ndarray:
    shape = {"batch": B, "num_heads": H, "seq_q": T, "seq_kv": S}
    shape.update(sizes)
    return np.asarray(mods.mask_mod_to_boolean_mask(mask_mod, **shape))


def _apply(score_mod: Any, scores: Any = None) -> np.ndarray:
    if scores is None:
        scores = jax.random.normal(jax.random.key(0), (B, H, T, S))
    return np.broadcast_to(np.asarray(score_mod(scores, *_grid())), (B, H, T, S))


# --------------------------------------------------------------------------- mask mods


def test_causal_mod() -> None:
    mod = mods.causal_mod()
    assert isinstance(mod, mods.MaskScoreMod) and isinstance(mod.mask_mod, mods.CausalMask)
    q, kv = _np_grid()
    np.testing.assert_array_equal(_dense(mod.mask_mod), np.broadcast_to(q >= kv, (B, H, T, S)))
    scores = jax.random.normal(jax.random.key(1), (B, H, T, S))
    out = _apply(mod, scores)
    np.testing.assert_array_equal(out, np.where(q >= kv, np.asarray(scores), -np.inf))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 3])
def test_sliding_window_mod(causal: bool, window: int) -> None:
    mod = mods.sliding_window_mod(window, causal=causal)
    q, kv = _np_grid()
    if causal:
        expected = (q - kv >= 0) & (q - kv < window)
    else:
        expected = np.abs(q - kv) < window
    np.testing.assert_array_equal(_dense(mod.mask_mod)[0, 0], expected)
    np.testing.assert_array_equal(
        np.asarray(mods.make_sliding_window_mask(T, window_size=window, causal=causal))[0, 0],
        expected[:, :T],
    )


def _paper_slopes(n: int) -> list[float]:
    """ALiBi slopes exactly as in Press et al.'s reference code."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_two(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_two(closest) + _paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("num_heads", [1, 2, 4, 8, 16, 3, 5, 6, 12, 24])
def test_alibi_slopes_match_the_paper(num_heads: int) -> None:
    np.testing.assert_allclose(
        np.asarray(mods.alibi_slopes(num_heads)), _paper_slopes(num_heads), rtol=1e-6
    )


def test_alibi_mod() -> None:
    mod = mods.alibi_mod(H)
    slopes = np.asarray(_paper_slopes(H)).reshape(1, H, 1, 1)
    q, kv = _np_grid()
    out = _apply(mod, jnp.zeros((B, H, T, S)))
    np.testing.assert_allclose(out, np.broadcast_to(-slopes * np.abs(q - kv), out.shape), rtol=1e-6)
    with pytest.raises(ValueError, match="num_heads"):
        mods.alibi_mod(0)


def test_prefix_lm_mod() -> None:
    lengths = jnp.array([0, 4])
    mod = mods.prefix_lm_mod(lengths)
    q, kv = _np_grid()
    for b, length in enumerate([0, 4]):
        expected = (kv < length) | (q >= kv)
        np.testing.assert_array_equal(_dense(mod.mask_mod)[b, 0], expected)
    with pytest.raises(ValueError, match="prefix_lengths"):
        mods.prefix_lm_mod(jnp.zeros((2, 1), jnp.int32))


def test_document_mask_mod() -> None:
    ids = np.array([[0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]])
    mod = mods.document_mask_mod(jnp.asarray(ids))
    expected = ids[:, :, None] == ids[:, None, :]
    np.testing.assert_array_equal(_dense(mod.mask_mod, seq_kv=T)[:, 0], expected)
    np.testing.assert_array_equal(
        np.asarray(mods.make_document_mask(jnp.asarray(ids)))[:, 0], expected
    )
    kv_ids = np.array([[0] * 4 + [1] * 5, [1] * 9])
    cross = mods.document_mask_mod(jnp.asarray(ids), jnp.asarray(kv_ids))
    np.testing.assert_array_equal(
        _dense(cross.mask_mod)[:, 0], ids[:, :, None] == kv_ids[:, None, :]
    )
    with pytest.raises(ValueError, match="document_ids"):
        mods.document_mask_mod(jnp.zeros((7,), jnp.int32))
    with pytest.raises(ValueError, match="document_ids"):
        mods.document_mask_mod(jnp.zeros((2, 7), jnp.int32), jnp.zeros((3, 9), jnp.int32))
    with pytest.raises(ValueError, match="document_ids"):
        mods.make_document_mask(jnp.zeros((7,), jnp.int32))


# --------------------------------------------------------------------------- value mods


def test_additive_bias_mod_broadcasts_and_differentiates() -> None:
    bias = jax.random.normal(jax.random.key(2), (1, H, 1, S))
    scores = jax.random.normal(jax.random.key(3), (B, H, T, S))
    out = _apply(mods.additive_bias_mod(bias), scores)
    np.testing.assert_allclose(out, np.asarray(scores) + np.asarray(bias), rtol=1e-6)
    grad = jax.grad(lambda b: jnp.sum(mods.additive_bias_mod(b)(scores, *_grid()) ** 2))(bias)
    expected = np.sum(2 * (np.asarray(scores) + np.asarray(bias)), axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="rank 4"):
        mods.additive_bias_mod(jnp.zeros((T, S)))


def test_softcap_mod() -> None:
    scores = 10.0 * jax.random.normal(jax.random.key(4), (B, H, T, S))
    out = _apply(mods.softcap_mod(5.0), scores)
    np.testing.assert_allclose(out, 5.0 * np.tanh(np.asarray(scores) / 5.0), rtol=1e-5)
    assert np.all(np.abs(out) <= 5.0)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="cap"):
            mods.softcap_mod(bad)


# --------------------------------------------------------------------------- composition


def test_compose_none_handling() -> None:
    alibi = mods.alibi_mod(H)
    assert mods.compose_score_mods() is None
    assert mods.compose_score_mods(None, None) is None
    assert mods.compose_score_mods(None, alibi, None) is alibi
    assert isinstance(mods.compose_score_mods(alibi, mods.causal_mod()), mods.ComposedScoreMod)


def test_compose_masks_exclude_regardless_of_order() -> None:
    q, kv = _np_grid()
    scores = 10.0 * jax.random.normal(jax.random.key(5), (B, H, T, S))
    causal, softcap, alibi = mods.causal_mod(), mods.softcap_mod(3.0), mods.alibi_mod(H)
    slopes = np.asarray(_paper_slopes(H)).reshape(1, H, 1, 1)
    values = 3.0 * np.tanh(np.asarray(scores) / 3.0) - slopes * np.abs(q - kv)
    expected = np.where(q >= kv, values, -np.inf)
    for order in ((causal, softcap, alibi), (softcap, causal, alibi), (softcap, alibi, causal)):
        out = _apply(mods.compose_score_mods(*order), scores)
        np.testing.assert_allclose(out, expected, rtol=1e-5)
    # Two masks intersect; split recovers an AndMask and the value chain.
    window = mods.sliding_window_mod(2)
    composed = mods.compose_score_mods(window, softcap, causal)
    mask_mod, value_mod = mods.split_score_mod(composed)
    assert isinstance(mask_mod, mods.AndMask) and len(mask_mod.mask_mods) == 2
    assert value_mod is softcap
    np.testing.assert_array_equal(_dense(mask_mod)[0, 0], (q >= kv) & (q - kv < 2))


def test_mask_mod_to_score_mod_and_boolean_mask() -> None:
    def even_keys(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (kv % 2 == 0) | (b + h + q < 0)

    mod = mods.mask_mod_to_score_mod(even_keys)
    mask_mod, value_mod = mods.split_score_mod(mod)
    assert mask_mod is even_keys and value_mod is None
    dense = _dense(even_keys)
    assert dense.shape == (B, H, T, S) and dense.dtype == np.bool_
    np.testing.assert_array_equal(dense[1, 2], np.broadcast_to(np.arange(S) % 2 == 0, (T, S)))
    out = _apply(mod, jnp.zeros((B, H, T, S)))
    np.testing.assert_array_equal(np.isinf(out), ~dense)
    for name in ("batch", "num_heads", "seq_q", "seq_kv"):
        with pytest.raises(ValueError, match=name):
            _dense(even_keys, **{name: 0})


def test_shift_positions() -> None:
    shifted = mods.shift_positions(mods.causal_mod(), q_offset=jnp.array([2, 0]), kv_offset=0)
    assert mods.shift_positions(None, q_offset=3) is None
    mask_mod, _ = mods.split_score_mod(shifted)
    q, kv = _np_grid()
    dense = _dense(mask_mod)
    np.testing.assert_array_equal(dense[0, 0], q + 2 >= kv)
    np.testing.assert_array_equal(dense[1, 0], q >= kv)


# --------------------------------------------------------------------------- dense masks


def test_mask_builders() -> None:
    np.testing.assert_array_equal(
        np.asarray(mods.make_causal_mask(4))[0, 0], np.tril(np.ones((4, 4), bool))
    )
    assert mods.make_causal_mask(4).shape == (1, 1, 4, 4)
    ids = jnp.array([[5, 6, 0, 0], [1, 0, 2, 0]])
    padding = mods.make_padding_mask(ids, 0)
    assert padding.shape == (2, 1, 1, 4)
    np.testing.assert_array_equal(np.asarray(padding)[:, 0, 0], np.asarray(ids) != 0)
    with pytest.raises(ValueError, match="ids"):
        mods.make_padding_mask(jnp.zeros((4,), jnp.int32), 0)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="seq"):
            mods.make_causal_mask(bad)
        with pytest.raises(ValueError, match="seq"):
            mods.make_sliding_window_mask(bad, window_size=2)
        with pytest.raises(ValueError, match="window_size"):
            mods.make_sliding_window_mask(4, window_size=bad)
        with pytest.raises(ValueError, match="window_size"):
            mods.sliding_window_mod(bad)


def test_combine_masks() -> None:
    assert mods.combine_masks() is None
    assert mods.combine_masks(None, None) is None
    causal = mods.make_causal_mask(4)
    padding = mods.make_padding_mask(jnp.array([[1, 1, 1, 0]]), 0)
    single = mods.combine_masks(None, causal)
    assert single is not None
    np.testing.assert_array_equal(np.asarray(single), np.asarray(causal))
    combined = mods.combine_masks(causal, None, padding)
    assert combined is not None
    np.testing.assert_array_equal(np.asarray(combined), np.asarray(causal) & np.asarray(padding))
    with pytest.raises(ValueError, match="rank 4"):
        mods.combine_masks(jnp.ones((4, 4), bool))


# --------------------------------------------------------------------------- block sparsity


def _random_mask_mod(
    rng: np.random.Generator, batch: int, seq_q: int, seq_kv: int, kind: int
) -> Any:
    if kind == 0:
        return mods.CausalMask()
    if kind == 1:
        return mods.SlidingWindowMask(int(rng.integers(1, 6)), bool(rng.integers(0, 2)))
    if kind == 2:
        return mods.PrefixLMMask(jnp.asarray(rng.integers(0, seq_kv + 1, size=batch)))
    if kind == 3:
        q_ids = np.sort(rng.integers(0, 3, size=(batch, seq_q)), axis=1)
        kv_ids = np.sort(rng.integers(0, 3, size=(batch, seq_kv)), axis=1)
        return mods.DocumentMask(jnp.asarray(q_ids), jnp.asarray(kv_ids))
    if kind == 4:
        offsets = jnp.asarray(rng.integers(0, 5, size=batch))
        return mods.OffsetMask(mods.CausalMask(), offsets, 0)
    if kind == 5:
        return mods.AndMask((mods.CausalMask(), mods.SlidingWindowMask(int(rng.integers(1, 8)))))
    if kind == 6:
        # No block_overlap: classified by dense evaluation.
        return lambda b, h, q, kv: (q + kv + h) % 3 != 0
    if kind == 7:
        q_start, q_stop = np.sort(rng.integers(0, seq_q + 1, size=2))
        kv_start, kv_stop = np.sort(rng.integers(0, seq_kv + 1, size=2))
        return mods.BoxMask(*(jnp.int32(x) for x in (q_start, q_stop, kv_start, kv_stop)))
    return mods.AndMask((mods.CausalMask(), lambda b, h, q, kv: kv % 2 == 0))


def _check_classes(classes: np.ndarray, dense: np.ndarray, block_q: int, block_kv: int) -> None:
    batch, heads = dense.shape[:2]
    classes = np.broadcast_to(classes, (batch, heads, *classes.shape[2:]))
    for i in range(classes.shape[2]):
        for j in range(classes.shape[3]):
            tile = dense[:, :, i * block_q : (i + 1) * block_q, j * block_kv : (j + 1) * block_kv]
            cls = classes[:, :, i, j]
            any_allowed = tile.any(axis=(2, 3))
            all_allowed = tile.all(axis=(2, 3))
            assert not np.any((cls == mods.BLOCK_EMPTY) & any_allowed), (i, j)
            assert not np.any((cls == mods.BLOCK_FULL) & ~all_allowed), (i, j)


def test_block_sparsity_agrees_with_dense_evaluation() -> None:
    rng = np.random.default_rng(0)
    # Every kind of mask mod once, on random sizes (each eager config costs seconds of dispatch).
    for kind in range(9):
        batch, heads = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        seq_q, seq_kv = int(rng.integers(1, 20)), int(rng.integers(1, 20))
        block_q, block_kv = int(rng.integers(1, 8)), int(rng.integers(1, 8))
        mask_mod = _random_mask_mod(rng, batch, seq_q, seq_kv, kind)
        sizes = {"batch": batch, "num_heads": heads, "seq_q": seq_q, "seq_kv": seq_kv}
        classes = np.asarray(
            mods.block_sparsity(mask_mod, block_q=block_q, block_kv=block_kv, **sizes)
        )
        assert classes.shape[2:] == (-(-seq_q // block_q), -(-seq_kv // block_kv))
        dense = np.asarray(mods.mask_mod_to_boolean_mask(mask_mod, **sizes))
        _check_classes(classes, dense, block_q, block_kv)


def test_block_sparsity_is_exact_for_dense_masks() -> None:
    rng = np.random.default_rng(1)
    for _ in range(12):
        seq_q, seq_kv = int(rng.integers(1, 20)), int(rng.integers(1, 20))
        block_q, block_kv = int(rng.integers(1, 8)), int(rng.integers(1, 8))
        density = float(rng.choice([0.0, 0.3, 0.95, 1.0]))
        mask = rng.random((2, 1, seq_q, seq_kv)) < density
        classes = np.asarray(
            mods.block_sparsity_from_mask(
                jnp.asarray(mask), seq_q=seq_q, seq_kv=seq_kv, block_q=block_q, block_kv=block_kv
            )
        )
        _check_classes(classes, mask, block_q, block_kv)
        # Exact: a partial block has some but not all pairs allowed.
        for i in range(classes.shape[2]):
            for j in range(classes.shape[3]):
                tile = mask[
                    :, :, i * block_q : (i + 1) * block_q, j * block_kv : (j + 1) * block_kv
                ]
                partial = tile.any(axis=(2, 3)) & ~tile.all(axis=(2, 3))
                np.testing.assert_array_equal(classes[:, :, i, j] == mods.BLOCK_PARTIAL, partial)


def test_causal_block_sparsity_is_tight() -> None:
    classes = np.asarray(
        mods.block_sparsity(
            mods.CausalMask(), batch=1, num_heads=1, seq_q=8, seq_kv=8, block_q=4, block_kv=4
        )
    )[0, 0]
    np.testing.assert_array_equal(classes, [[1, 0], [2, 1]])
