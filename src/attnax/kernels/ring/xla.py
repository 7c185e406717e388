"""The XLA ring: blockwise pairs merged around the ring, with its own ``custom_vjp``.

Every device keeps its query shard and the key/value shards travel around the ring with
:func:`jax.lax.ppermute`. Each step computes the attention of the local queries to the visiting
shard blockwise (:mod:`attnax.kernels.ring.blockwise`) and merges it into the running result
exactly through the log-sum-exp, in float32. The transfer of the next shard is issued before
the current shard's compute so XLA can overlap them.

The backward rotates key/value around the ring again, together with their ``dK``/``dV``
accumulators, which arrive back on the key/value's home device after ``P`` steps; it
recomputes scores from the saved log-sum-exp, so memory per device stays ``O(T / P)`` in
training too. This path takes any score mod and key-padding mask.
"""

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from ..._typing import ScoreMod
from .._common import accumulation_dtype, merge_partials, rotate_ring, vary_like
from .blockwise import blockwise_pair_backward, blockwise_pair_forward
from .layout import shard_positions
from .tiles import BlockwiseConfig, TiledPair, tile_classes, varying_zero


def _vary_over_ring(array: Array, axis_name: Hashable) -> Array:
    """Mark a replicated (ring-invariant) array as varying over ``axis_name``.

    Each device's backward produces only its own queries' share of a score-mod array's
    gradient. Casting the array to "varying" before the custom_vjp makes JAX transpose the cast
    into the psum that adds those shares (:func:`~attnax.kernels._common.vary_like` does the
    cast, in whichever spelling this JAX has).
    """
    if not jnp.issubdtype(array.dtype, jnp.floating):
        return array
    return vary_like(array, frozenset({axis_name}))


def _partition_mod(
    score_mod: ScoreMod | None,
) -> tuple[list[Array], Callable[[Sequence[Array]], ScoreMod | None]]:
    """Split a score mod into its array leaves (differentiable inputs) and a rebuild function.

    Everything that is not an array (a plain callable, static fields) stays in the closure, so
    the custom_vjp only sees arrays.
    """
    if score_mod is None:
        return [], lambda arrays: None
    leaves, treedef = jax.tree_util.tree_flatten(score_mod)
    array_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))]
    arrays = [jnp.asarray(leaves[i]) for i in array_slots]

    def rebuild(new_arrays: Sequence[Array]) -> ScoreMod | None:
        filled = list(leaves)
        for slot, array in zip(array_slots, new_arrays, strict=True):
            filled[slot] = array
        rebuilt: ScoreMod = jax.tree_util.tree_unflatten(treedef, filled)
        return rebuilt

    return arrays, rebuild


def _ring_forward(
    cfg: BlockwiseConfig,
    q: Float[Array, "B Hk G T D"],
    k: Array,
    v: Array,
    key_mask: Array | None,
    mod_arrays: Sequence[Array],
) -> tuple[Array, Array]:
    me = jax.lax.axis_index(cfg.axis_name)
    seq_q, seq_kv = q.shape[3], k.shape[2]
    q_pos = shard_positions(cfg.layout, me, cfg.num_shards, seq_q)
    acc_dtype = accumulation_dtype(q.dtype)
    zero = varying_zero(q, k, v, key_mask, q_pos, *mod_arrays).astype(acc_dtype)

    def ring_step(carry: Any, step: Array) -> tuple[Any, None]:
        visiting, out, lse = carry
        # Issue the next transfer first: it does not depend on this step's compute, so XLA can
        # overlap it. (The last step's transfer only brings K/V home; it costs no extra time
        # while it overlaps the last compute, and keeps one compiled loop body for any P.)
        upcoming = rotate_ring(visiting, cfg.axis_name, cfg.num_shards)
        source = (me - step) % cfg.num_shards
        kv_pos = shard_positions(cfg.layout, source, cfg.num_shards, seq_kv)
        pair = TiledPair(cfg, q, visiting[0], visiting[1], visiting[2], q_pos, kv_pos, mod_arrays)
        nonempty = tile_classes(cfg, pair, mod_arrays)
        if nonempty is None:
            part_out, part_lse = blockwise_pair_forward(cfg, pair, mod_arrays, None)
        else:
            # A (query shard, key shard) pair entirely in the masked future is not computed.
            part_out, part_lse = jax.lax.cond(
                jnp.any(nonempty),
                lambda: blockwise_pair_forward(cfg, pair, mod_arrays, nonempty),
                lambda: (
                    jnp.zeros(q.shape, acc_dtype) + pair.zero,
                    jnp.full(q.shape[:-1], -jnp.inf, acc_dtype) + pair.zero,
                ),
            )
        out, lse = merge_partials(out, lse, part_out, part_lse)
        return (upcoming, out, lse), None

    init = (
        (k, v, key_mask),
        jnp.zeros(q.shape, acc_dtype) + zero,
        jnp.full(q.shape[:-1], -jnp.inf, acc_dtype) + zero,
    )
    (_, out, lse), _ = jax.lax.scan(ring_step, init, jnp.arange(cfg.num_shards))
    return out, lse


def _ring_backward(
    cfg: BlockwiseConfig,
    q: Array,
    k: Array,
    v: Array,
    key_mask: Array | None,
    mod_arrays: Sequence[Array],
    out: Array,
    lse: Array,
    d_out: Array,
) -> tuple[Array, Array, Array, list[Array]]:
    me = jax.lax.axis_index(cfg.axis_name)
    seq_q, seq_kv = q.shape[3], k.shape[2]
    q_pos = shard_positions(cfg.layout, me, cfg.num_shards, seq_q)
    acc_dtype = accumulation_dtype(q.dtype)
    zero = varying_zero(q, k, v, key_mask, q_pos, d_out, *mod_arrays).astype(acc_dtype)
    delta = jnp.sum(d_out.astype(acc_dtype) * out.astype(acc_dtype), axis=-1)

    def ring_step(carry: Any, step: Array) -> tuple[Any, None]:
        visiting, dq, dk, dv, dmods = carry
        upcoming = rotate_ring(visiting, cfg.axis_name, cfg.num_shards)
        source = (me - step) % cfg.num_shards
        kv_pos = shard_positions(cfg.layout, source, cfg.num_shards, seq_kv)
        pair = TiledPair(cfg, q, visiting[0], visiting[1], visiting[2], q_pos, kv_pos, mod_arrays)
        nonempty = tile_classes(cfg, pair, mod_arrays)

        def compute() -> Any:
            return blockwise_pair_backward(cfg, pair, mod_arrays, nonempty, d_out, lse, delta)

        if nonempty is None:
            part = compute()
        else:
            part = jax.lax.cond(
                jnp.any(nonempty),
                compute,
                lambda: jax.tree_util.tree_map(
                    lambda s: jnp.zeros(s.shape, s.dtype) + pair.zero.astype(s.dtype),
                    jax.eval_shape(compute),
                ),
            )
        part_dq, part_dk, part_dv, part_mods = part
        dq = dq + part_dq
        dmods = [a + b for a, b in zip(dmods, part_mods, strict=True)]
        # dK/dV travel with their key/value shard; after P hops they are home again.
        dk, dv = rotate_ring(
            (dk + part_dk[:, :, :seq_kv], dv + part_dv[:, :, :seq_kv]),
            cfg.axis_name,
            cfg.num_shards,
        )
        return (upcoming, dq, dk, dv, dmods), None

    init_mods = [
        jnp.zeros(a.shape if jnp.issubdtype(a.dtype, jnp.floating) else (), acc_dtype) + zero
        for a in mod_arrays
    ]
    init = (
        (k, v, key_mask),
        jnp.zeros(q.shape, acc_dtype) + zero,
        jnp.zeros(k.shape, acc_dtype) + zero,
        jnp.zeros(v.shape, acc_dtype) + zero,
        init_mods,
    )
    (_, dq, dk, dv, dmods), _ = jax.lax.scan(ring_step, init, jnp.arange(cfg.num_shards))
    # No psum here: mod arrays enter the ring device-varying (see _vary_over_ring), so JAX's
    # own transpose of that cast sums the per-device contributions exactly once.
    reduced = [
        grad.astype(primal.dtype) if jnp.issubdtype(primal.dtype, jnp.floating) else grad
        for grad, primal in zip(dmods, mod_arrays, strict=True)
    ]
    return dq, dk, dv, reduced


def _ring_core(cfg: BlockwiseConfig) -> Callable[..., Array]:
    @jax.custom_vjp
    def ring(
        q: Array, k: Array, v: Array, key_mask: Array | None, mod_arrays: list[Array]
    ) -> Array:
        out, _ = _ring_forward(cfg, q, k, v, key_mask, mod_arrays)
        return out.astype(q.dtype)

    def fwd(
        q: Array, k: Array, v: Array, key_mask: Array | None, mod_arrays: list[Array]
    ) -> tuple[Array, tuple[Any, ...]]:
        out, lse = _ring_forward(cfg, q, k, v, key_mask, mod_arrays)
        out = out.astype(q.dtype)
        return out, (q, k, v, key_mask, mod_arrays, out, lse)

    def bwd(res: tuple[Any, ...], d_out: Array) -> tuple[Any, ...]:
        q, k, v, key_mask, mod_arrays, out, lse = res
        dq, dk, dv, dmods = _ring_backward(cfg, q, k, v, key_mask, mod_arrays, out, lse, d_out)
        mod_cts = [
            g if jnp.issubdtype(a.dtype, jnp.floating) else None
            for g, a in zip(dmods, mod_arrays, strict=True)
        ]
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, mod_cts

    ring.defvjp(fwd, bwd)
    return ring



def blockwise_ring(
    query: Float[Array, "B H T D"],
    key: Float[Array, "B Hk S D"],
    value: Float[Array, "B Hk S D"],
    key_mask: Bool[Array, "#B #H 1 S"] | None,
    score_mod: ScoreMod | None,
    *,
    axis_name: Hashable,
    num_shards: int,
    layout: str,
    scale: float,
    block_size: int,
) -> Float[Array, "B H T D"]:
    """The XLA ring on this device's shards; call inside ``shard_map``.

    Arguments are already validated by :func:`attnax.ring_attention` (``scale`` resolved,
    zigzag shards of even length).
    """
    batch, num_heads, seq_q, head_dim = query.shape
    num_kv_heads, seq_kv = key.shape[1], key.shape[2]
    mod_arrays, rebuild = _partition_mod(score_mod)
    mod_arrays = [_vary_over_ring(array, axis_name) for array in mod_arrays]
    unit_q = seq_q // 2 if layout == "zigzag" else seq_q
    unit_kv = seq_kv // 2 if layout == "zigzag" else seq_kv
    cfg = BlockwiseConfig(
        axis_name=axis_name,
        num_shards=num_shards,
        layout=layout,
        scale=scale,
        # Tiles no longer than a zigzag chunk, so a tile never straddles two chunks.
        block_q=min(block_size, unit_q),
        block_kv=min(block_size, unit_kv),
        rebuild=rebuild,
        num_heads=num_heads,
    )
    grouped = query.reshape(batch, num_kv_heads, num_heads // num_kv_heads, seq_q, head_dim)
    out = _ring_core(cfg)(grouped, key, value, key_mask, mod_arrays)
    return out.reshape(batch, num_heads, seq_q, head_dim)
