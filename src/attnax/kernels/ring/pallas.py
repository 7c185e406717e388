"""Ring attention with PALLAS_FLASH kernels per shard pair, holding as little as one GPU does.

The cuDNN pairs (:mod:`attnax.kernels.ring.cudnn`) are the fastest ring, but per device they
hold 13 (T/P, H, D) units at 2.6M tokens on two H100s where one GPU holds 10: the visiting K/V,
the pair's fresh gradients, cuDNN's float32 dQ workspace, and each ``lax.cond`` branch's fresh
outputs. Here every pair is computed by PALLAS_FLASH's kernels, which can work in place:

* **No conditionals.** What a pair may see is data, not control flow: the zigzag and
  contiguous pair shapes (see :mod:`attnax.kernels.ring.pairs`) become a
  :class:`~attnax._mods.BoxMask` whose bounds depend on whether the visiting shard is earlier,
  so the kernels skip the unseen blocks and every step is the same kernel call.
* **Backward in place.** dQ is one buffer the dQ kernel adds each pair's share to (aliased).
  On two devices the visiting shard's dK/dV are written over the visiting K/V (the pair's dQ
  kernel has read them by then: an optimisation barrier orders the two), sent home, and the
  diagonal pair's dK/dV kernel adds its share into what arrived (aliased): no buffer holds a
  second copy of a gradient. Longer rings carry float32 accumulators with the K/V, as the
  cuDNN ring does, and add into them in place.
* **No output in the backward.** The row term ``rowsum(dO * O)`` is formed once, after which
  the output is dead; the kernels take it with the global log-sum-exp, so each pair's
  gradients are exactly its share of the full gradient.

On two devices the dQ buffer is in the input dtype: it holds one pair's rounded share, to which
the diagonal pair adds its own in float32 before the one final rounding (the cuDNN pairs round
both shares). Longer rings keep dQ in float32.

The price is speed: PALLAS_FLASH's backward is slower than cuDNN's, and the dK/dV's trip home
is not hidden behind compute (it is one transfer of a shard's size). ``ring_attention`` uses
these pairs only when asked (``fused_pairs="pallas"``).
"""

import dataclasses
import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ..._mods import BoxMask, MaskScoreMod, causal_mod
from ..._typing import ScoreMod
from .._common import merge_partials, rotate_ring
from ..pallas_flash import (
    FlashConfig,
    default_config,
    dkv_call,
    dq_call,
    forward,
    prepare,
    row_terms,
)
from .pairs import PairRing, exact_ring

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def pallas_ring_config(head_dim: int, *, interpret: bool = False) -> FlashConfig:
    """PALLAS_FLASH's tiles for the pairs: 128 x 64 forward (faster than 128 x 128 on the
    H100 for full and causal attention, benchmarks/NOTES.md), the backward's own defaults."""
    return default_config(head_dim, 128, 64, interpret)


@dataclasses.dataclass(frozen=True)
class _Ring(PairRing):
    config: FlashConfig


def _diagonal_mod(ring: _Ring) -> ScoreMod | None:
    # A device's own keys: causal on local indices (also under zigzag, whose two chunks are
    # stored in increasing order).
    return causal_mod() if ring.causal else None


def _visiting_mod(ring: _Ring, earlier: Array, seq: int) -> ScoreMod | None:
    """What the local queries may see of a visiting shard, as data (no branch): a box.

    Zigzag: an earlier shard's first chunk is in the past of every local query and its second
    chunk in their future; a later shard is in the past of the second query chunk only.
    Contiguous: an earlier shard is entirely visible, a later one not at all. A box is an
    interval mask, so the kernels describe each row by four block bounds.
    """
    if not ring.causal:
        return None
    half = seq // 2 if ring.layout == "zigzag" else seq

    def bound(if_earlier: int, if_later: int) -> Array:
        return jnp.where(earlier, jnp.int32(if_earlier), jnp.int32(if_later))

    if ring.layout == "zigzag":
        box = BoxMask(bound(0, half), bound(seq, seq), bound(0, 0), bound(half, seq))
    else:
        box = BoxMask(bound(0, seq), bound(seq, seq), bound(0, 0), bound(seq, seq))
    return MaskScoreMod(box)


def _pair_forward(
    ring: _Ring, q: Array, k: Array, v: Array, score_mod: ScoreMod | None
) -> tuple[Array, Array]:
    """(out, natural log-sum-exp) of the local queries over one shard; empty rows give
    zeros and -inf, as :func:`merge_partials` expects."""
    prepared = prepare(ring.config, q, k, v, None, score_mod)
    out, lse2 = forward(ring.config, prepared, ring.scale)
    seq, head_dim = q.shape[2], q.shape[3]
    lse2 = lse2[:, :, :seq]
    lse = jnp.where(lse2 == jnp.inf, -jnp.inf, lse2 * _LN2)
    return out[:, :, :seq, :head_dim], lse


def _ring_forward(ring: _Ring, q: Array, k: Array, v: Array) -> tuple[Array, Array]:
    me = jax.lax.axis_index(ring.axis_name)
    seq = q.shape[2]
    out, lse = _pair_forward(ring, q, k, v, _diagonal_mod(ring))
    out = out.astype(jnp.float32)
    visiting = (k, v)
    for step in range(1, ring.num_shards):
        # Device i now holds the shard of device (i - step) mod P: earlier exactly when step <= i.
        visiting = rotate_ring(visiting, ring.axis_name, ring.num_shards)
        mod = _visiting_mod(ring, me >= step, seq)
        part = _pair_forward(ring, q, visiting[0], visiting[1], mod)
        out, lse = merge_partials(out, lse, *part)
    return out, lse


def _ring_backward(
    ring: _Ring, q: Array, k: Array, v: Array, out: Array, lse: Array, d_out: Array
) -> tuple[Array, Array, Array]:
    me = jax.lax.axis_index(ring.axis_name)
    config, scale, num_shards = ring.config, ring.scale, ring.num_shards
    seq, head_dim = q.shape[2], q.shape[3]
    seq_kv = k.shape[2]
    two = num_shards == 2
    diagonal = prepare(config, q, k, v, None, _diagonal_mod(ring))
    do, delta = row_terms(diagonal, out, d_out)
    padded_q = diagonal.query.shape[2]
    # The kernels' base-2 log-sum-exp; a row with no key at all gets +inf (probabilities 0).
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * _LOG2E)
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, padded_q - seq)))
    rows = (do, lse2, delta)

    dq: Array | None = None
    accumulators: tuple[Array, Array] | None = None
    visiting = (k, v)
    for step in range(1, num_shards):
        if accumulators is None:
            visiting = rotate_ring(visiting, ring.axis_name, num_shards)
        else:
            visiting, accumulators = rotate_ring(
                (visiting, accumulators), ring.axis_name, num_shards
            )
        mod = _visiting_mod(ring, me >= step, seq)
        # Padding (only for lengths that are not whole tiles) copies; the accumulators are
        # padded like every shard's keys.
        pair = prepare(config, q, visiting[0], visiting[1], None, mod)
        dq, _ = dq_call(
            config, pair, scale, *rows, accumulate=dq, out_dtype=q.dtype if two else jnp.float32
        )
        if two:
            # The visiting K/V are read for the last time by the dQ kernel above: the barrier
            # puts the dK/dV kernel after it, so it can overwrite them with their gradients.
            k_s, v_s, dq = jax.lax.optimization_barrier(  # type: ignore[no-untyped-call]
                (pair.key, pair.value, dq)
            )
            pair = dataclasses.replace(pair, key=k_s, value=v_s)
            accumulators = dkv_call(config, pair, scale, *rows, in_place=True)
        else:
            accumulators = dkv_call(
                config, pair, scale, *rows, accumulate=accumulators, out_dtype=jnp.float32
            )
    home = None
    if accumulators is not None:
        # Each accumulator sits one device short of its shard.
        home = rotate_ring(accumulators, ring.axis_name, num_shards)
    dq, _ = dq_call(config, diagonal, scale, *rows, accumulate=dq)
    dk, dv = dkv_call(config, diagonal, scale, *rows, accumulate=home)
    return (
        dq[:, :, :seq, :head_dim].astype(q.dtype),
        dk[:, :, :seq_kv, :head_dim].astype(k.dtype),
        dv[:, :, :seq_kv, :head_dim].astype(v.dtype),
    )


def pallas_ring(
    query: Array,
    key: Array,
    value: Array,
    *,
    axis_name: Hashable,
    num_shards: int,
    layout: str,
    causal: bool,
    scale: float,
    config: FlashConfig | None = None,
) -> Array:
    """The ring with PALLAS_FLASH kernels per shard pair; call inside ``shard_map``.

    Arguments are already validated by :func:`attnax.ring_attention`: (B, H, T/P, D) shards
    (``kv_heads`` dividing ``heads``), equal query and key shard lengths (even for zigzag),
    ``layout`` "contiguous" or "zigzag" when ``causal``. ``config`` defaults to
    :func:`pallas_ring_config` (pass one with ``interpret=True`` to run the kernels on CPU).
    """
    ring = _Ring(
        axis_name, num_shards, layout, causal, scale, config or pallas_ring_config(query.shape[-1])
    )
    return exact_ring(ring, _ring_forward, _ring_backward, query, key, value)
