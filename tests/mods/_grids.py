"""Index grids and NumPy-side helpers shared by the mod tests."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnax import _mods as mods

B, H, T, S = 2, 3, 7, 9


def index_grid(batch: int = B, heads: int = H, seq_q: int = T, seq_kv: int = S) -> tuple[Any, ...]:
    return (
        jnp.arange(batch).reshape(-1, 1, 1, 1),
        jnp.arange(heads).reshape(1, -1, 1, 1),
        jnp.arange(seq_q).reshape(1, 1, -1, 1),
        jnp.arange(seq_kv).reshape(1, 1, 1, -1),
    )


def numpy_grid(seq_q: int = T, seq_kv: int = S) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(seq_q)[:, None], np.arange(seq_kv)[None, :]


def dense_mask(mask_mod: Any, **sizes: int) -> np.ndarray:
    shape = {"batch": B, "num_heads": H, "seq_q": T, "seq_kv": S}
    shape.update(sizes)
    return np.asarray(mods.mask_mod_to_boolean_mask(mask_mod, **shape))


def apply_mod(score_mod: Any, scores: Any = None) -> np.ndarray:
    if scores is None:
        scores = jax.random.normal(jax.random.key(0), (B, H, T, S))
    return np.broadcast_to(np.asarray(score_mod(scores, *index_grid())), (B, H, T, S))


def paper_slopes(n: int) -> list[float]:
    """ALiBi slopes exactly as in Press et al.'s reference code."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_two(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_two(closest) + paper_slopes(2 * closest)[0::2][: n - closest]
