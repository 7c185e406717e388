"""The ring layouts: to_ring_layout and from_ring_layout are inverse permutations."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels.ring import from_ring_layout, to_ring_layout


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_layout_round_trip(layout: str) -> None:
    x = jnp.arange(2 * 3 * 24).reshape(2, 3, 24, 1)
    moved = to_ring_layout(x, 4, layout)  # type: ignore[arg-type]
    assert np.array_equal(np.asarray(from_ring_layout(moved, 4, layout)), np.asarray(x))  # type: ignore[arg-type]
    if layout == "zigzag":
        # Device 0 holds chunks 0 and 7 of 8 (3 tokens each).
        assert list(np.asarray(moved[0, 0, :6, 0])) == [0, 1, 2, 21, 22, 23]
    if layout == "striped":
        assert list(np.asarray(moved[0, 0, :6, 0])) == [0, 4, 8, 12, 16, 20]
