"""Mask-mod constructors (``attnax._mods.masks`` / ``constructors``), checked against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _mods as mods

from ._grids import B, H, S, T, apply_mod, dense_mask, numpy_grid


def test_causal_mod() -> None:
    mod = mods.causal_mod()
    assert isinstance(mod, mods.MaskScoreMod) and isinstance(mod.mask_mod, mods.CausalMask)
    q, kv = numpy_grid()
    np.testing.assert_array_equal(dense_mask(mod.mask_mod), np.broadcast_to(q >= kv, (B, H, T, S)))
    scores = jax.random.normal(jax.random.key(1), (B, H, T, S))
    out = apply_mod(mod, scores)
    np.testing.assert_array_equal(out, np.where(q >= kv, np.asarray(scores), -np.inf))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 3])
def test_sliding_window_mod(causal: bool, window: int) -> None:
    mod = mods.sliding_window_mod(window, causal=causal)
    q, kv = numpy_grid()
    if causal:
        expected = (q - kv >= 0) & (q - kv < window)
    else:
        expected = np.abs(q - kv) < window
    np.testing.assert_array_equal(dense_mask(mod.mask_mod)[0, 0], expected)
    np.testing.assert_array_equal(
        np.asarray(mods.make_sliding_window_mask(T, window_size=window, causal=causal))[0, 0],
        expected[:, :T],
    )


def test_prefix_lm_mod() -> None:
    lengths = jnp.array([0, 4])
    mod = mods.prefix_lm_mod(lengths)
    q, kv = numpy_grid()
    for b, length in enumerate([0, 4]):
        expected = (kv < length) | (q >= kv)
        np.testing.assert_array_equal(dense_mask(mod.mask_mod)[b, 0], expected)
    with pytest.raises(ValueError, match="prefix_lengths"):
        mods.prefix_lm_mod(jnp.zeros((2, 1), jnp.int32))


def test_document_mask_mod() -> None:
    ids = np.array([[0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]])
    mod = mods.document_mask_mod(jnp.asarray(ids))
    expected = ids[:, :, None] == ids[:, None, :]
    np.testing.assert_array_equal(dense_mask(mod.mask_mod, seq_kv=T)[:, 0], expected)
    np.testing.assert_array_equal(
        np.asarray(mods.make_document_mask(jnp.asarray(ids)))[:, 0], expected
    )
    kv_ids = np.array([[0] * 4 + [1] * 5, [1] * 9])
    cross = mods.document_mask_mod(jnp.asarray(ids), jnp.asarray(kv_ids))
    np.testing.assert_array_equal(
        dense_mask(cross.mask_mod)[:, 0], ids[:, :, None] == kv_ids[:, None, :]
    )
    with pytest.raises(ValueError, match="document_ids"):
        mods.document_mask_mod(jnp.zeros((7,), jnp.int32))
    with pytest.raises(ValueError, match="document_ids"):
        mods.document_mask_mod(jnp.zeros((2, 7), jnp.int32), jnp.zeros((3, 9), jnp.int32))
    with pytest.raises(ValueError, match="document_ids"):
        mods.make_document_mask(jnp.zeros((7,), jnp.int32))
