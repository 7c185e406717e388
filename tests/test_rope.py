"""RoPE: rotation against complex multiplication, relative-position property, table bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax._rope import apply_rope, rope_table
from tests._reference import relative_error


def test_rotation_equals_complex_multiplication() -> None:
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
    positions = jnp.array([[0, 1, 2, 3, 4], [7, 3, 9, 0, 11]])
    out = apply_rope(x, positions, rope_table(16, 8, 100.0))
    xn = np.asarray(x, np.float64)
    freqs = 100.0 ** (-np.arange(0, 8, 2) / 8)
    z = (xn[..., :4] + 1j * xn[..., 4:]) * np.exp(1j * np.asarray(positions)[..., None, None] * freqs)
    assert relative_error(out, np.concatenate([z.real, z.imag], -1)) < 1e-5


def test_scores_depend_only_on_relative_position() -> None:
    q = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(2), (1, 1, 1, 16))
    table = rope_table(64, 16)

    def score(pq: int, pk: int) -> float:
        rq = apply_rope(q, jnp.array([[pq]]), table)
        rk = apply_rope(k, jnp.array([[pk]]), table)
        return float(jnp.sum(rq * rk))

    assert abs(score(5, 2) - score(40, 37)) < 1e-4
    assert abs(score(5, 2) - score(5, 3)) > 1e-4


def test_bf16_input_keeps_dtype_and_out_of_table_positions_raise() -> None:
    x = jnp.ones((1, 2, 1, 4), jnp.bfloat16)
    assert apply_rope(x, jnp.array([[0, 1]]), rope_table(4, 4)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="rope_max_positions"):
        apply_rope(x, jnp.array([[0, 4]]), rope_table(4, 4))
    with pytest.raises(ValueError, match="even head_dim"):
        rope_table(4, 3)
