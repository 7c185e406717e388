"""What every pair ring shares: its static schedule and its exact custom VJP.

A pair ring computes each (query shard, key shard) pair with one fused kernel call
(:mod:`attnax.kernels.ring.cudnn`, :mod:`attnax.kernels.ring.pallas`) and merges the pairs
exactly through the log-sum-exp; its backward gives each pair the *global* output and
log-sum-exp, so the pair's dQ/dK/dV are exactly its share of the full gradient.

Under a causal mask every pair is one of three shapes, all plain (unmasked or causal) calls:

* the diagonal pair (a device's own keys): causal on local indices. This holds for the zigzag
  layout too: device ``i`` holds chunks ``i`` and ``2P - 1 - i``, in increasing order, so
  "local key index <= local query index" is exactly "global key <= global query";
* zigzag, visiting shard ``j < i``: all local queries against the first key chunk (chunk ``j``,
  entirely in the past of both query chunks), unmasked; the second key chunk (``2P - 1 - j``) is
  in the future of both query chunks;
* zigzag, ``j > i``: the second query chunk (``2P - 1 - i``) against both key chunks, unmasked;
  the first query chunk sees neither.

So under zigzag every device computes the same amount at every step (balanced), and with the
contiguous layout a pair is either full (``j < i``) or skipped (``j > i``).
"""

import dataclasses
from collections.abc import Callable, Hashable
from typing import TypeAlias, TypeVar

import jax
from jaxtyping import Array

RingT = TypeVar("RingT", bound="PairRing")


@dataclasses.dataclass(frozen=True)
class PairRing:
    """The schedule every pair ring shares (:mod:`.cudnn`'s and :mod:`.pallas`'s).

    Causal pair schedules are planned for the contiguous and zigzag layouts only; any layout
    serves without a mask.
    """

    axis_name: Hashable
    num_shards: int
    layout: str
    causal: bool
    scale: float

    def __post_init__(self) -> None:
        if self.causal and self.layout not in ("contiguous", "zigzag"):
            raise ValueError(
                f"{type(self).__name__}: causal pairs need layout contiguous or zigzag, "
                f"got {self.layout}"
            )


# (dQ, dK, dV) of a pair or of the whole ring.
Grads: TypeAlias = tuple[Array, Array, Array]

# A pair ring's forward: (output, natural log-sum-exp) of the local queries over every shard,
# the output in float32 or already in the query's dtype; its backward: (q, k, v, out, lse, dO)
# -> (dQ, dK, dV).
RingForward: TypeAlias = Callable[[RingT, Array, Array, Array], tuple[Array, Array]]
RingBackward: TypeAlias = Callable[[RingT, Array, Array, Array, Array, Array, Array], Grads]


def exact_ring(
    ring: RingT,
    forward: RingForward[RingT],
    backward: RingBackward[RingT],
    query: Array,
    key: Array,
    value: Array,
) -> Array:
    """A pair ring on (query, key, value), with a custom VJP: ``forward(ring, q, k, v)`` runs
    it and saves the output (in the query's dtype) and the log-sum-exp, which
    ``backward(ring, q, k, v, out, lse, dO)`` takes."""

    @jax.custom_vjp
    def attend(q: Array, k: Array, v: Array) -> Array:
        out, _ = forward(ring, q, k, v)
        return out.astype(q.dtype)

    def fwd(q: Array, k: Array, v: Array) -> tuple[Array, tuple[Array, ...]]:
        out, lse = forward(ring, q, k, v)
        out = out.astype(q.dtype)
        return out, (q, k, v, out, lse)

    def bwd(res: tuple[Array, ...], d_out: Array) -> Grads:
        q, k, v, out, lse = res
        return backward(ring, q, k, v, out, lse, d_out)

    attend.defvjp(fwd, bwd)
    return attend(query, key, value)

