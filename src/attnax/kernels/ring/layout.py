"""Ring layouts: which global positions each device of the ring holds.

Under a causal mask the contiguous layout leaves device 0 with one tile of work and device
``P - 1`` with ``P``. ``layout="zigzag"`` gives device ``i`` the chunks ``i`` and ``2P - 1 - i``
of ``2P`` equal chunks; ``layout="striped"`` gives it positions ``i, i + P, i + 2P, ...``. Both
balance causal work. Put a global sequence into the layout's order with :func:`to_ring_layout`
before sharding it contiguously, and undo it with :func:`from_ring_layout`; score and mask mods
always see the true global positions (:func:`shard_positions`).
"""

from typing import Literal, TypeAlias

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from ..._checks import positive_int

RingLayout: TypeAlias = Literal["contiguous", "zigzag", "striped"]
_LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag", "striped")

# Positions are int32 everywhere (score mods index arrays with them).
Positions: TypeAlias = Int[Array, " L"]


def check_layout(layout: str, *, name: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"{name}: `layout` must be one of {_LAYOUTS}, got {layout!r}.")


def _layout_divisor(num_shards: int, layout: str) -> int:
    # zigzag cuts the sequence into 2P chunks; the others into P shards.
    return 2 * num_shards if layout == "zigzag" else num_shards


def check_divides(length: int, num_shards: int, layout: str, *, name: str, what: str) -> None:
    divisor = _layout_divisor(num_shards, layout)
    if length % divisor != 0:
        raise ValueError(
            f"{name}: {what} length {length} is not divisible by {divisor} "
            f"({'2 x ' if layout == 'zigzag' else ''}{num_shards} shards, layout={layout!r}); "
            "pad the sequence to a multiple of it (and mask the padding with a key-padding mask) "
            "or use a mesh axis whose size divides it."
        )


def _layout_order(length: int, num_shards: int, layout: str) -> np.ndarray:
    """``order[j]`` = the global position stored at slot ``j`` of the ring layout."""
    positions = np.arange(length)
    if layout == "contiguous":
        return positions
    if layout == "zigzag":
        chunks = positions.reshape(2 * num_shards, -1)
        pairs = [(i, 2 * num_shards - 1 - i) for i in range(num_shards)]
        return np.concatenate([np.concatenate([chunks[a], chunks[b]]) for a, b in pairs])
    # striped: device i holds i, i + P, i + 2P, ...
    return positions.reshape(-1, num_shards).T.reshape(-1)


def to_ring_layout(
    x: Array, num_shards: int, layout: RingLayout = "contiguous", axis: int = 2
) -> Array:
    """Reorder a global sequence so that contiguous sharding gives each device its layout's part.

    ``shard_map`` with the sequence axis sharded over ``num_shards`` devices then hands device
    ``i`` chunk ``i`` and chunk ``2P - 1 - i`` (zigzag) or positions ``i, i + P, ...`` (striped),
    the order :func:`ring_attention` expects for the same ``layout``.

    Args:
      x: any array with the sequence on ``axis`` (query, key, value, a key-padding mask, ids).
      num_shards: size of the mesh axis the sequence will be sharded over.
      layout: "contiguous" (identity), "zigzag" or "striped".
      axis: the sequence axis (2 for ``(B, H, T, D)``; 3 for a ``(B, 1, 1, S)`` mask).

    Returns:
      ``x`` with its sequence axis permuted.

    Raises:
      ValueError: for an unknown layout or a length the layout cannot split evenly.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> x = jnp.arange(8).reshape(1, 1, 8, 1)
      >>> zigzag = attnax.to_ring_layout(x, num_shards=2, layout="zigzag")
      >>> zigzag[0, 0, :, 0].tolist()  # device 0 gets chunks 0 and 3, device 1 chunks 1 and 2
      [0, 1, 6, 7, 2, 3, 4, 5]
      >>> attnax.to_ring_layout(x, num_shards=2, layout="striped")[0, 0, :, 0].tolist()
      [0, 2, 4, 6, 1, 3, 5, 7]
    """
    name = "to_ring_layout"
    check_layout(layout, name=name)
    positive_int(num_shards, "num_shards", caller=name)
    length = x.shape[axis]
    check_divides(length, num_shards, layout, name=name, what="sequence")
    return jnp.take(x, jnp.asarray(_layout_order(length, num_shards, layout)), axis=axis)


def from_ring_layout(
    x: Array, num_shards: int, layout: RingLayout = "contiguous", axis: int = 2
) -> Array:
    """Undo :func:`to_ring_layout`: put a sequence in ring order back into global order.

    Args:
      x: an array whose sequence axis is in ``layout`` order.
      num_shards: size of the mesh axis the sequence was sharded over.
      layout: "contiguous" (identity), "zigzag" or "striped".
      axis: the sequence axis.

    Returns:
      ``x`` with its sequence axis in global order.

    Raises:
      ValueError: for an unknown layout or a length the layout cannot split evenly.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> x = jnp.arange(8).reshape(1, 1, 8, 1)
      >>> ring = attnax.to_ring_layout(x, num_shards=2, layout="zigzag")
      >>> bool(jnp.array_equal(attnax.from_ring_layout(ring, num_shards=2, layout="zigzag"), x))
      True
    """
    name = "from_ring_layout"
    check_layout(layout, name=name)
    positive_int(num_shards, "num_shards", caller=name)
    length = x.shape[axis]
    check_divides(length, num_shards, layout, name=name, what="sequence")
    inverse = np.argsort(_layout_order(length, num_shards, layout))
    return jnp.take(x, jnp.asarray(inverse), axis=axis)


def shard_positions(
    layout: str, shard: Int[Array, ""], num_shards: int, local_length: int
) -> Positions:
    """Global positions of the ``local_length`` slots held by ``shard`` (a traced index)."""
    slots = jnp.arange(local_length, dtype=jnp.int32)
    shard = jnp.asarray(shard, jnp.int32)
    if layout == "contiguous":
        return shard * local_length + slots
    if layout == "zigzag":
        chunk = local_length // 2
        mirror = 2 * num_shards - 1 - shard
        return jnp.where(slots < chunk, shard * chunk + slots, mirror * chunk + slots - chunk)
    return slots * num_shards + shard
