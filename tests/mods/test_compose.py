"""Composition, the mask/value split, shifted positions and mask AND (``attnax._mods.compose``)."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _mods as mods

from ._grids import B, H, S, T, apply_mod, dense_mask, numpy_grid, paper_slopes


def test_compose_none_handling() -> None:
    alibi = mods.alibi_mod(H)
    assert mods.compose_score_mods() is None
    assert mods.compose_score_mods(None, None) is None
    assert mods.compose_score_mods(None, alibi, None) is alibi
    assert isinstance(mods.compose_score_mods(alibi, mods.causal_mod()), mods.ComposedScoreMod)


def test_compose_masks_exclude_regardless_of_order() -> None:
    q, kv = numpy_grid()
    scores = 10.0 * jax.random.normal(jax.random.key(5), (B, H, T, S))
    causal, softcap, alibi = mods.causal_mod(), mods.softcap_mod(3.0), mods.alibi_mod(H)
    slopes = np.asarray(paper_slopes(H)).reshape(1, H, 1, 1)
    values = 3.0 * np.tanh(np.asarray(scores) / 3.0) - slopes * np.abs(q - kv)
    expected = np.where(q >= kv, values, -np.inf)
    for order in ((causal, softcap, alibi), (softcap, causal, alibi), (softcap, alibi, causal)):
        out = apply_mod(mods.compose_score_mods(*order), scores)
        np.testing.assert_allclose(out, expected, rtol=1e-5)
    # Two masks intersect; split recovers an AndMask and the value chain.
    window = mods.sliding_window_mod(2)
    composed = mods.compose_score_mods(window, softcap, causal)
    mask_mod, value_mod = mods.split_score_mod(composed)
    assert isinstance(mask_mod, mods.AndMask) and len(mask_mod.mask_mods) == 2
    assert value_mod is softcap
    np.testing.assert_array_equal(dense_mask(mask_mod)[0, 0], (q >= kv) & (q - kv < 2))


def test_mask_mod_to_score_mod_and_boolean_mask() -> None:
    def even_keys(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (kv % 2 == 0) | (b + h + q < 0)

    mod = mods.mask_mod_to_score_mod(even_keys)
    mask_mod, value_mod = mods.split_score_mod(mod)
    assert mask_mod is even_keys and value_mod is None
    dense = dense_mask(even_keys)
    assert dense.shape == (B, H, T, S) and dense.dtype == np.bool_
    np.testing.assert_array_equal(dense[1, 2], np.broadcast_to(np.arange(S) % 2 == 0, (T, S)))
    out = apply_mod(mod, jnp.zeros((B, H, T, S)))
    np.testing.assert_array_equal(np.isinf(out), ~dense)
    for name in ("batch", "num_heads", "seq_q", "seq_kv"):
        with pytest.raises(ValueError, match=name):
            dense_mask(even_keys, **{name: 0})


def test_shift_positions() -> None:
    shifted = mods.shift_positions(mods.causal_mod(), q_offset=jnp.array([2, 0]), kv_offset=0)
    assert mods.shift_positions(None, q_offset=3) is None
    mask_mod, _ = mods.split_score_mod(shifted)
    q, kv = numpy_grid()
    dense = dense_mask(mask_mod)
    np.testing.assert_array_equal(dense[0, 0], q + 2 >= kv)
    np.testing.assert_array_equal(dense[1, 0], q >= kv)


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
