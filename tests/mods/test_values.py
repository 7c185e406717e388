"""Value score mods (``attnax._mods.values`` / ``constructors``), checked against NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _mods as mods

from ._grids import B, H, S, T, apply_mod, index_grid, numpy_grid, paper_slopes


@pytest.mark.parametrize("num_heads", [1, 2, 4, 8, 16, 3, 5, 6, 12, 24])
def test_alibi_slopes_match_the_paper(num_heads: int) -> None:
    np.testing.assert_allclose(
        np.asarray(mods.alibi_slopes(num_heads)), paper_slopes(num_heads), rtol=1e-6
    )


def test_alibi_mod() -> None:
    mod = mods.alibi_mod(H)
    slopes = np.asarray(paper_slopes(H)).reshape(1, H, 1, 1)
    q, kv = numpy_grid()
    out = apply_mod(mod, jnp.zeros((B, H, T, S)))
    np.testing.assert_allclose(out, np.broadcast_to(-slopes * np.abs(q - kv), out.shape), rtol=1e-6)
    with pytest.raises(ValueError, match="num_heads"):
        mods.alibi_mod(0)


def test_additive_bias_mod_broadcasts_and_differentiates() -> None:
    bias = jax.random.normal(jax.random.key(2), (1, H, 1, S))
    scores = jax.random.normal(jax.random.key(3), (B, H, T, S))
    out = apply_mod(mods.additive_bias_mod(bias), scores)
    np.testing.assert_allclose(out, np.asarray(scores) + np.asarray(bias), rtol=1e-6)
    grad = jax.grad(lambda b: jnp.sum(mods.additive_bias_mod(b)(scores, *index_grid()) ** 2))(bias)
    expected = np.sum(2 * (np.asarray(scores) + np.asarray(bias)), axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="rank 4"):
        mods.additive_bias_mod(jnp.zeros((T, S)))


def test_softcap_mod() -> None:
    scores = 10.0 * jax.random.normal(jax.random.key(4), (B, H, T, S))
    out = apply_mod(mods.softcap_mod(5.0), scores)
    np.testing.assert_allclose(out, 5.0 * np.tanh(np.asarray(scores) / 5.0), rtol=1e-5)
    assert np.all(np.abs(out) <= 5.0)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="cap"):
            mods.softcap_mod(bad)
