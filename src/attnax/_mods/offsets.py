"""Position offsets shared by the shifted mask and score mods (a KV cache's absolute positions)."""

import jax.numpy as jnp
from jaxtyping import Array, Int

from .._typing import ScoreIndex

# An int, or one offset per batch row.
Offset = int | Int[Array, "#B"]


def offset_for(offset: Offset, b_idx: ScoreIndex) -> ScoreIndex:
    """``offset`` as an index array: a scalar, or row ``b_idx`` of a (batch,) array."""
    if isinstance(offset, int):
        return jnp.asarray(offset)
    offset_array = jnp.asarray(offset)
    if offset_array.ndim == 0:
        return offset_array
    return offset_array[b_idx]
