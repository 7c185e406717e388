"""Ring attention: exact softmax attention over a sequence sharded across a device mesh axis.

Inside :func:`jax.shard_map`, with the sequence axis (axis 2 of ``(B, H, T, D)``) of query, key
and value sharded over ``axis_name``, every device keeps its query shard and the key/value
shards travel around the ring with :func:`jax.lax.ppermute` (Liu et al., "Ring Attention with
Blockwise Transformers for Near-Infinite Context", 2023). Each step computes the attention of
the local queries to the visiting key/value shard blockwise (online softmax over tiles, no
``(T, S)`` matrix) and merges it into the running result exactly through the log-sum-exp, in
float32. The transfer of the next shard is issued before the current shard's compute so XLA can
overlap them.

The backward (a :func:`jax.custom_vjp`) rotates key/value around the ring again, together with
their ``dK``/``dV`` accumulators, which arrive back on the key/value's home device after ``P``
steps; it recomputes scores from the saved log-sum-exp (FlashAttention-2 style), so memory per
device stays ``O(T / P)`` in training too.

Layouts. Under a causal mask the contiguous layout leaves device 0 with one tile of work and
device ``P - 1`` with ``P``. ``layout="zigzag"`` gives device ``i`` the chunks ``i`` and
``2P - 1 - i`` of ``2P`` equal chunks; ``layout="striped"`` gives it positions
``i, i + P, i + 2P, ...``. Both balance causal work. Put a global sequence into the layout's
order with :func:`to_ring_layout` before sharding it contiguously, and undo it with
:func:`from_ring_layout`; score and mask mods always see the true global positions.

The package, by piece:

* ``api.py``: the public entries :func:`ring_attention` and :func:`sharded_ring_attention`;
* ``reference.py``: :func:`ring_attention_reference`, the math on the gathered sequence;
* ``layout.py``: the layouts, :func:`to_ring_layout` / :func:`from_ring_layout` and each
  shard's global positions;
* ``plan.py``: validation, and which ring serves a call (or why a requested one cannot);
* ``xla.py``: the XLA ring loop and its ``custom_vjp``, over ``blockwise.py`` (one pair's
  blockwise forward and backward) and ``tiles.py`` (a pair's tiles, scores and skipped tiles);
* ``pairs.py``: what every fused pair ring shares (its schedule, its exact custom VJP);
* ``cudnn.py`` over ``pair_kernels.py``: one cuDNN call per shard pair (an XLA twin on CPU);
* ``pallas.py``: PALLAS_FLASH kernels per shard pair, the leanest in memory.
"""

from .api import ring_attention as ring_attention
from .api import sharded_ring_attention as sharded_ring_attention
from .layout import RingLayout as RingLayout
from .layout import from_ring_layout as from_ring_layout
from .layout import to_ring_layout as to_ring_layout
from .plan import FusedPairs as FusedPairs
from .reference import ring_attention_reference as ring_attention_reference

__all__ = [
    "FusedPairs",
    "RingLayout",
    "from_ring_layout",
    "ring_attention",
    "ring_attention_reference",
    "sharded_ring_attention",
    "to_ring_layout",
]
