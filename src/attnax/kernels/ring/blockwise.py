"""Blockwise attention of the local queries to one key/value shard, forward and backward.

The forward is an online softmax over key tiles (no ``(T, S)`` matrix) returning the pair's
normalised output and log-sum-exp, which the ring merges exactly; the backward recomputes the
scores from the *global* log-sum-exp (FlashAttention-2 style), so each pair's gradients are its
share of the full gradient. Tile pairs that :func:`~attnax.kernels.ring.tiles.tile_classes`
finds fully masked are skipped.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._common import accumulation_dtype, safe_normaliser
from .tiles import BlockwiseConfig, TiledPair, pad_axis, raw_scores, tile_scores


def blockwise_pair_forward(
    cfg: BlockwiseConfig,
    pair: TiledPair,
    mod_arrays: Sequence[Array],
    nonempty: Array | None,
) -> tuple[Float[Array, "B Hk G T D"], Float[Array, "B Hk G T"]]:
    """Normalised output and log-sum-exp of the local queries over one key/value shard."""
    batch, num_kv_heads, group, head_dim = pair.shape
    bq = cfg.block_q
    acc_dtype = accumulation_dtype(pair.q_tiles.dtype)
    value_dtype = pair.v_tiles.dtype

    def one_query_tile(
        args: tuple[Array, Array, Array],
    ) -> tuple[Array, Array]:
        q_tile, q_pos, qi = args
        zero = pair.zero.astype(acc_dtype)
        init = (
            jnp.zeros((batch, num_kv_heads, group, bq, head_dim), acc_dtype) + zero,
            jnp.full((batch, num_kv_heads, group, bq), -jnp.inf, acc_dtype) + zero,
            jnp.zeros((batch, num_kv_heads, group, bq), acc_dtype) + zero,
        )

        def update(carry: tuple[Array, Array, Array], kj: Array) -> tuple[Array, Array, Array]:
            acc, row_max, row_sum = carry
            mask_tile = None if pair.mask_tiles is None else pair.mask_tiles[kj]
            scores = tile_scores(
                cfg,
                raw_scores(cfg, q_tile, pair.k_tiles[kj]),
                mod_arrays,
                q_pos,
                pair.kv_pos[kj],
                pair.kv_real[kj],
                mask_tile,
            )
            new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))
            safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            weights = jnp.exp(scores - safe_max[..., None])
            correction = jnp.exp(row_max - safe_max)
            row_sum = row_sum * correction + jnp.sum(weights, axis=-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgqs,bksd->bkgqd",
                weights.astype(value_dtype),
                pair.v_tiles[kj],
                preferred_element_type=acc_dtype,
            )
            return acc, new_max, row_sum

        def step(carry: tuple[Array, Array, Array], kj: Array) -> tuple[Any, None]:
            if nonempty is None:
                return update(carry, kj), None
            return jax.lax.cond(nonempty[qi, kj], update, lambda c, _: c, carry, kj), None

        (acc, row_max, row_sum), _ = jax.lax.scan(step, init, jnp.arange(pair.nk))
        out = acc / safe_normaliser(row_sum)[..., None]
        safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        lse = jnp.where(row_sum > 0.0, safe_max + jnp.log(safe_normaliser(row_sum)), -jnp.inf)
        return out, lse

    outs, lses = jax.lax.map(
        one_query_tile, (pair.q_tiles, pair.q_pos, jnp.arange(pair.nq))
    )  # (NQ, B, Hk, G, BQ, D), (NQ, B, Hk, G, BQ)
    out = jnp.moveaxis(outs, 0, 3).reshape(batch, num_kv_heads, group, -1, head_dim)
    lse = jnp.moveaxis(lses, 0, 3).reshape(batch, num_kv_heads, group, -1)
    return out[..., : pair.seq_q, :], lse[..., : pair.seq_q]


# One query tile's rows for the backward: (q_tile, q_pos, do_tile, lse_tile, delta_tile).
_QueryRows = tuple[Array, Array, Array, Array, Array]


def _tile_gradients(
    cfg: BlockwiseConfig,
    pair: TiledPair,
    mod_arrays: Sequence[Array],
    float_slots: Sequence[int],
    rows: _QueryRows,
    kj: Array,
) -> tuple[Array, Array, Array, list[Array]]:
    """One (query tile, key tile) of the backward: its dQ share, dK, dV and float mod grads.

    ``P = exp(S - lse)`` with the global ``lse``; ``dV = P^T dO``, ``dS = P (dO V^T - delta)``;
    the score mods' own gradients come from ``jax.vjp`` of the tile's mod application.
    """
    q_tile, q_pos, do_tile, lse_tile, delta_tile = rows
    acc_dtype = accumulation_dtype(pair.q_tiles.dtype)
    in_dtype = pair.q_tiles.dtype
    k_tile, v_tile = pair.k_tiles[kj], pair.v_tiles[kj]
    mask_tile = None if pair.mask_tiles is None else pair.mask_tiles[kj]

    def modded(raw: Array, floats: list[Array]) -> Array:
        arrays = list(mod_arrays)
        for slot, array in zip(float_slots, floats, strict=True):
            arrays[slot] = array
        return tile_scores(cfg, raw, arrays, q_pos, pair.kv_pos[kj], pair.kv_real[kj], mask_tile)

    floats = [mod_arrays[i] for i in float_slots]
    scores, mods_vjp = jax.vjp(modded, raw_scores(cfg, q_tile, k_tile), floats)
    weights = jnp.exp(scores - lse_tile[..., None])
    dv = jnp.einsum(
        "bkgqs,bkgqd->bksd",
        weights.astype(in_dtype),
        do_tile.astype(in_dtype),
        preferred_element_type=acc_dtype,
    )
    dp = jnp.einsum(
        "bkgqd,bksd->bkgqs",
        do_tile.astype(in_dtype),
        v_tile,
        preferred_element_type=acc_dtype,
    )
    d_scores = weights * (dp - delta_tile[..., None])
    d_raw, d_floats = mods_vjp(d_scores)
    d_raw = (d_raw * jnp.asarray(cfg.scale, acc_dtype)).astype(in_dtype)
    dq = jnp.einsum("bkgqs,bksd->bkgqd", d_raw, k_tile, preferred_element_type=acc_dtype)
    dk = jnp.einsum("bkgqs,bkgqd->bksd", d_raw, q_tile, preferred_element_type=acc_dtype)
    return dq, dk, dv, d_floats


def blockwise_pair_backward(
    cfg: BlockwiseConfig,
    pair: TiledPair,
    mod_arrays: Sequence[Array],
    nonempty: Array | None,
    d_out: Float[Array, "B Hk G T D"],
    lse: Float[Array, "B Hk G T"],
    delta: Float[Array, "B Hk G T"],
) -> tuple[Array, Array, Array, list[Array]]:
    """Gradients of the pair: dQ (B, Hk, G, T, D), dK and dV (B, Hk, S, D), mod arrays.

    FlashAttention-2 recurrences with the *global* log-sum-exp and ``delta = rowsum(dO * O)``
    of the merged output: ``P = exp(S - lse)``, ``dV += P^T dO``, ``dS = P (dO V^T - delta)``;
    score mods are differentiated by ``jax.vjp`` of the tile's mod application.
    """
    batch, num_kv_heads, group, head_dim = pair.shape
    bq, bk = cfg.block_q, cfg.block_kv
    acc_dtype = accumulation_dtype(pair.q_tiles.dtype)
    tq = pair.nq * bq

    def tiles_of(x: Array) -> Array:
        x = pad_axis(x, 3, tq)
        return jnp.moveaxis(x.reshape(*x.shape[:3], pair.nq, bq, *x.shape[4:]), 3, 0)

    # Padded query rows get lse = +inf so their weights are exactly zero.
    do_tiles = tiles_of(d_out.astype(acc_dtype))
    lse_tiles = tiles_of(jnp.where(jnp.isfinite(lse), lse, jnp.inf))
    lse_tiles = jnp.where(
        (jnp.arange(tq) < pair.seq_q).reshape(pair.nq, 1, 1, 1, bq), lse_tiles, jnp.inf
    )
    delta_tiles = tiles_of(delta)
    float_slots = [i for i, a in enumerate(mod_arrays) if jnp.issubdtype(a.dtype, jnp.floating)]

    def mod_grads_zero() -> list[Array]:
        return [jnp.zeros(mod_arrays[i].shape, acc_dtype) + zero for i in float_slots]

    zero = pair.zero.astype(acc_dtype)
    dk0 = jnp.zeros((pair.nk, batch, num_kv_heads, bk, head_dim), acc_dtype) + zero

    def one_query_tile(
        carry: tuple[Array, Array, list[Array]], args: tuple[Array, ...]
    ) -> tuple[tuple[Array, Array, list[Array]], Array]:
        q_tile, q_pos, do_tile, lse_tile, delta_tile, qi = args
        rows = (q_tile, q_pos, do_tile, lse_tile, delta_tile)

        def update(
            inner: tuple[Array, Array, Array, list[Array]], kj: Array
        ) -> tuple[Array, Array, Array, list[Array]]:
            dq, dk_all, dv_all, dmods = inner
            part_dq, dk, dv, d_floats = _tile_gradients(
                cfg, pair, mod_arrays, float_slots, rows, kj
            )
            dq = dq + part_dq
            dk_all = dk_all.at[kj].add(dk)
            dv_all = dv_all.at[kj].add(dv)
            dmods = [a + b.astype(acc_dtype) for a, b in zip(dmods, d_floats, strict=True)]
            return dq, dk_all, dv_all, dmods

        def step(inner: Any, kj: Array) -> tuple[Any, None]:
            if nonempty is None:
                return update(inner, kj), None
            return jax.lax.cond(nonempty[qi, kj], update, lambda c, _: c, inner, kj), None

        dk_all, dv_all, dmods = carry
        dq0 = jnp.zeros((batch, num_kv_heads, group, bq, head_dim), acc_dtype) + zero
        (dq, dk_all, dv_all, dmods), _ = jax.lax.scan(
            step, (dq0, dk_all, dv_all, dmods), jnp.arange(pair.nk)
        )
        return (dk_all, dv_all, dmods), dq

    (dk_tiles, dv_tiles, dmods), dq_tiles = jax.lax.scan(
        one_query_tile,
        (dk0, dk0, mod_grads_zero()),
        (pair.q_tiles, pair.q_pos, do_tiles, lse_tiles, delta_tiles, jnp.arange(pair.nq)),
    )
    dq = jnp.moveaxis(dq_tiles, 0, 3).reshape(batch, num_kv_heads, group, -1, head_dim)
    seq_kv = pair.kv_real.size  # padded; sliced by the caller's shape below

    def untile_kv(x: Array) -> Array:
        return jnp.moveaxis(x, 0, 2).reshape(batch, num_kv_heads, seq_kv, head_dim)

    full_mods: list[Array] = []
    it = iter(dmods)
    for i in range(len(mod_arrays)):
        full_mods.append(next(it) if i in float_slots else jnp.zeros((), acc_dtype))
    return dq[..., : pair.seq_q, :], untile_kv(dk_tiles), untile_kv(dv_tiles), full_mods
