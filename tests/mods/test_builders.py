"""Dense boolean mask builders (``attnax._mods.builders``)."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _mods as mods


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
