"""Ring attention with one fused flash call per (query shard, key shard) pair.

The XLA ring (:mod:`attnax.kernels.ring.xla`) computes every pair with XLA tiles, which is
exact for any score mod but runs at a fraction of a fused kernel's speed. For the common
training case (no mask, no score mod other than causal, bf16/fp16 on an NVIDIA GPU) each pair
is one fused attention call instead (:mod:`attnax.kernels.ring.pair_kernels`):

* forward: cuDNN flash attention returning the pair's normalised output and log-sum-exp; the
  pairs are merged exactly in float32 through the log-sum-exp, as in the XLA ring;
* backward: cuDNN's flash backward given the *global* output and log-sum-exp (not the pair's),
  which makes its probabilities ``exp(s - lse_global)`` and its ``rowsum(dO * O)`` the global
  ones, so the pair's dQ/dK/dV are exactly its share of the full gradient (the same
  recurrences as FlashAttention-2's backward, split over key shards).

Under a causal mask every pair is one of three shapes (:mod:`attnax.kernels.ring.pairs`),
each a plain cuDNN call picked by a ``lax.cond`` on whether the visiting shard is earlier.
"""

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._common import merge_partials, rotate_ring, vary_like, varying_axes
from .pair_kernels import PAIR_BACKWARD, PAIR_FORWARD, PairImpl
from .pairs import Grads, PairRing, exact_ring


@dataclasses.dataclass(frozen=True)
class _RingConfig(PairRing):
    pair: PairImpl


# Which (query rows, key rows of the visiting shard) a pair step computes, or None when the
# whole shard is in the causal future of every local query.
_Block: TypeAlias = tuple[slice, slice] | None


def _pair_block(cfg: _RingConfig, earlier: bool, seq: int) -> _Block:
    """What the pair (local queries, visiting shard) computes; see the module doc.

    ``earlier``: the visiting shard ``j`` precedes this device's shard ``i`` (``j < i``).
    """
    everything = slice(None)
    if not cfg.causal:
        return everything, everything
    if cfg.layout == "contiguous":
        return (everything, everything) if earlier else None
    # zigzag: the first key chunk of an earlier shard is in the past of every local query, its
    # second chunk in their future; a later shard is in the past of the second query chunk only.
    half = seq // 2
    return (everything, slice(0, half)) if earlier else (slice(half, None), everything)


def _run_pair(
    cfg: _RingConfig,
    earlier: Array,
    seq: int,
    branch: Callable[[_Block], Callable[..., Any]],
    *operands: Array,
) -> Any:
    """Run ``branch(block)(*operands)`` for the pair's block: one branch without a causal mask,
    else a ``lax.cond`` on ``earlier`` between the earlier-shard and later-shard blocks."""
    if not cfg.causal:
        return branch(_pair_block(cfg, True, seq))(*operands)
    return jax.lax.cond(
        earlier,
        branch(_pair_block(cfg, True, seq)),
        branch(_pair_block(cfg, False, seq)),
        *operands,
    )


def _with_rows(array: Array, rows: slice, value: Array) -> Array:
    """``array`` with positions ``rows`` of axis 2 replaced by ``value``."""
    start, stop, _ = rows.indices(array.shape[2])
    if start == 0 and stop == array.shape[2]:
        return value
    parts = [array[:, :, :start], value, array[:, :, stop:]]
    return jnp.concatenate([part for part in parts if part.shape[2]], axis=2)


def _forward_step(
    cfg: _RingConfig,
    earlier: Array,
    q: Array,
    k_s: Array,
    v_s: Array,
    out: Array,
    lse: Array,
    out_dtype: jnp.dtype,
) -> tuple[Array, Array]:
    """Merge the pair (local queries, visiting shard) into (out, lse); out in ``out_dtype``.

    The merge reads ``out`` in whatever dtype it has and works in float32; the conversions in
    and out happen inside the merge's fusion, where separate conversions of the whole output
    cost 2 x 0.13 ms of the 14.3 ms forward at 65536 tokens on two H100s (NOTES, Ring).
    """
    forward = PAIR_FORWARD[cfg.pair]
    seq = q.shape[2]

    def branch(block: _Block) -> Callable[[Array, Array, Array, Array], tuple[Array, Array]]:
        def run(out: Array, lse: Array, k_s: Array, v_s: Array) -> tuple[Array, Array]:
            if block is None:
                return out.astype(out_dtype), lse
            rows, keys = block
            part = forward(
                q[:, :, rows], k_s[:, :, keys], v_s[:, :, keys], causal=False, scale=cfg.scale
            )
            merged, merged_lse = merge_partials(
                out[:, :, rows].astype(jnp.float32), lse[:, :, rows], *part
            )
            return (
                _with_rows(out.astype(out_dtype), rows, merged.astype(out_dtype)),
                _with_rows(lse, rows, merged_lse),
            )

        return run

    return _run_pair(cfg, earlier, seq, branch, out, lse, k_s, v_s)  # type: ignore[no-any-return]


def _ring_forward(cfg: _RingConfig, q: Array, k: Array, v: Array) -> tuple[Array, Array]:
    """(output in the query's dtype, float32 log-sum-exp) of the local queries; partial
    outputs are float32 between steps."""
    me = jax.lax.axis_index(cfg.axis_name)
    out, lse = PAIR_FORWARD[cfg.pair](q, k, v, causal=cfg.causal, scale=cfg.scale)
    visiting = (k, v)
    for step in range(1, cfg.num_shards):
        # Device i now holds the shard of device (i - step) mod P, an earlier shard (j < i)
        # exactly when step <= i.
        visiting = rotate_ring(visiting, cfg.axis_name, cfg.num_shards)
        k_s, v_s = visiting
        out_dtype = q.dtype if step == cfg.num_shards - 1 else jnp.dtype(jnp.float32)
        out, lse = _forward_step(cfg, me >= step, q, k_s, v_s, out, lse, out_dtype)
    return out, lse


def _backward_step(
    cfg: _RingConfig,
    earlier: Array,
    residuals: tuple[Array, Array, Array, Array],
    k_s: Array,
    v_s: Array,
) -> Grads:
    """The pair's dQ (every local row, zeros where it has no share) and its dK, dV.

    The caller adds dQ to its accumulator outside the conditional: a conditional's outputs are
    fresh buffers, so passing the accumulator through it held a second copy of it (3 of the 16
    (T/P, H, D) units the backward held per device at 2.6M tokens on two H100s).
    """
    q, out, lse, d_out = residuals
    backward = PAIR_BACKWARD[cfg.pair]
    seq = q.shape[2]
    axes = varying_axes(q, k_s, v_s, d_out)

    def zeros_like(x: Array) -> Array:
        return vary_like(jnp.zeros(x.shape, x.dtype), axes)

    def branch(block: _Block) -> Callable[[Array, Array], Grads]:
        def run(k_s: Array, v_s: Array) -> Grads:
            if block is None:
                return zeros_like(q), zeros_like(k_s), zeros_like(v_s)
            rows, keys = block
            pdq, pdk, pdv = backward(
                q[:, :, rows],
                k_s[:, :, keys],
                v_s[:, :, keys],
                out[:, :, rows],
                lse[:, :, rows],
                d_out[:, :, rows],
                causal=False,
                scale=cfg.scale,
            )
            start, stop, _ = rows.indices(seq)
            unseen = k_s.shape[2] - pdk.shape[2]  # keys of the shard this pair never sees
            return (
                jnp.pad(pdq.astype(q.dtype), ((0, 0), (0, 0), (start, seq - stop), (0, 0))),
                jnp.pad(pdk.astype(k_s.dtype), ((0, 0), (0, 0), (0, unseen), (0, 0))),
                jnp.pad(pdv.astype(v_s.dtype), ((0, 0), (0, 0), (0, unseen), (0, 0))),
            )

        return run

    return _run_pair(cfg, earlier, seq, branch, k_s, v_s)  # type: ignore[no-any-return]


def _ring_backward(
    cfg: _RingConfig, q: Array, k: Array, v: Array, out: Array, lse: Array, d_out: Array
) -> Grads:
    me = jax.lax.axis_index(cfg.axis_name)
    f32 = jnp.float32
    num_shards = cfg.num_shards
    # The dK/dV accumulator of a shard starts at its first visitor, travels the ring gathering
    # each visitor's share and makes its last hop home, where the diagonal pair's share is
    # added: P - 1 hops. On two devices that is one hop carrying a single pair's gradient,
    # already in the input dtype, so sending it in that dtype is exact; longer rings carry
    # partial sums, which stay in float32.
    travel = k.dtype if num_shards == 2 else f32
    dq, dk, dv = PAIR_BACKWARD[cfg.pair](
        q, k, v, out, lse, d_out, causal=cfg.causal, scale=cfg.scale
    )
    dq = dq.astype(f32)
    visiting = (k, v)
    accumulators: tuple[Array, Array] | None = None
    residuals = (q, out, lse, d_out)
    for step in range(1, num_shards):
        if accumulators is None:
            visiting = rotate_ring(visiting, cfg.axis_name, num_shards)
            arriving = None
        else:
            # The accumulators arrive from the previous device while this step computes: they
            # are added after the pair kernel, not fed into it.
            visiting, arriving = rotate_ring((visiting, accumulators), cfg.axis_name, num_shards)
        pdq, pdk, pdv = _backward_step(cfg, me >= step, residuals, *visiting)
        dq = dq + pdq.astype(f32)
        if arriving is None:
            accumulators = (pdk.astype(travel), pdv.astype(travel))
        else:
            accumulators = (
                (arriving[0].astype(f32) + pdk.astype(f32)).astype(travel),
                (arriving[1].astype(f32) + pdv.astype(f32)).astype(travel),
            )
    if accumulators is not None:
        # Home: each accumulator sits one device short of its shard.
        home_k, home_v = rotate_ring(accumulators, cfg.axis_name, num_shards)
        dk = (dk.astype(f32) + home_k.astype(f32)).astype(dk.dtype)
        dv = (dv.astype(f32) + home_v.astype(f32)).astype(dv.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def flash_ring(
    query: Array,
    key: Array,
    value: Array,
    *,
    axis_name: Hashable,
    num_shards: int,
    layout: str,
    causal: bool,
    scale: float,
    pair: PairImpl,
) -> Array:
    """The ring with one fused call per shard pair; call inside ``shard_map``.

    Arguments are already validated by :func:`attnax.ring_attention`: (B, H, T/P, D) shards
    (``kv_heads`` dividing ``heads``), equal query and key shard lengths (even for zigzag),
    ``layout`` "contiguous" or "zigzag" when ``causal``.
    """
    cfg = _RingConfig(axis_name, num_shards, layout, causal, scale, pair)
    return exact_ring(cfg, _ring_forward, _ring_backward, query, key, value)
