"""The XLA path of the decode kernels: the same math as the Pallas kernel, in a loop of tiles.

A chunked online softmax that also skips the tiles beyond each batch's longest row (and, with
a window, before it). It runs anywhere; the decode entries pick it off the GPU, and for the
configurations the Pallas kernel cannot run.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ..._mods import split_score_mod
from ..._typing import AttentionOutput, KeyArray, QueryArray, ScoreMod, ValueArray
from .._common import accumulation_dtype
from .plan import group_query_rows, row_indices, tile_range, ungroup_rows
from .softmax import NEG_INF_FINITE, online_softmax_step, tile_scores


def xla_decode_loop(
    query: QueryArray,
    load_tile: Callable[[Any], tuple[Float[Array, "B Hk C D"], Float[Array, "B Hk C D"], Any, Any]],
    *,
    num_kv_heads: int,
    num_tiles: int,
    tile: int,
    lengths: Int[Array, " B"],
    q_offset: Int[Array, " B"],
    score_mod: ScoreMod | None,
    scale: float,
    causal: bool,
    attention_window: int | None,
) -> AttentionOutput:
    """Online softmax over KV tiles in XLA; ``load_tile(i) -> (k, v, kv_pos, extra_allowed)``.

    Only the tiles that some row can attend are visited (a while loop with traced bounds).
    """
    batch, num_heads, seq_q, head_dim = query.shape
    group = num_heads // num_kv_heads
    rows = group * seq_q
    acc = accumulation_dtype(query.dtype)
    q_rows = group_query_rows(query, num_kv_heads, rows)
    b_idx = jnp.arange(batch).reshape(batch, 1, 1, 1)
    kv_head = jnp.arange(num_kv_heads).reshape(1, num_kv_heads, 1, 1)
    offsets = q_offset.reshape(batch, 1, 1, 1)
    h_idx, q_pos = row_indices(
        jnp.arange(rows).reshape(1, 1, rows, 1),
        group=group,
        seq_q=seq_q,
        kv_head=kv_head,
        q_offset=offsets,
    )
    length = lengths.reshape(batch, 1, 1, 1)
    mask_mod, value_mod = split_score_mod(score_mod)
    lo, hi = tile_range(
        length=lengths,
        q_offset=q_offset,
        seq_q=seq_q,
        tile=tile,
        causal=causal,
        attention_window=attention_window,
    )
    first = jnp.min(lo)
    last = jnp.minimum(jnp.max(hi), num_tiles)

    def body(index: Any, carry: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
        out_prev, max_prev, sum_prev = carry
        k, v, kv_pos, extra = load_tile(index)
        scores = jnp.einsum("bkrd,bkcd->bkrc", q_rows, k, preferred_element_type=acc) * jnp.asarray(
            scale, acc
        )
        scores = tile_scores(
            scores,
            b_idx=b_idx,
            h_idx=h_idx,
            q_pos=q_pos,
            kv_pos=kv_pos,
            length=length,
            causal=causal,
            attention_window=attention_window,
            mask_mod=mask_mod,
            value_mod=value_mod,
            extra_allowed=extra,
        ).astype(acc)

        def value_product(weights: Any) -> Any:
            return jnp.einsum(
                "bkrc,bkcd->bkrd", weights.astype(v.dtype), v, preferred_element_type=acc
            )

        return online_softmax_step(scores, max_prev, sum_prev, out_prev, value_product)

    init = (
        jnp.zeros((batch, num_kv_heads, rows, head_dim), acc),
        jnp.full((batch, num_kv_heads, rows), NEG_INF_FINITE, acc),
        jnp.zeros((batch, num_kv_heads, rows), acc),
    )
    out, _, row_sum = jax.lax.fori_loop(first, last, body, init)
    out = out / jnp.where(row_sum > 0.0, row_sum, 1.0)[..., None]
    return ungroup_rows(out, num_heads, seq_q).astype(query.dtype)


def xla_contiguous(
    query: QueryArray,
    keys: KeyArray,
    values: ValueArray,
    lengths: Int[Array, " B"],
    q_offset: Int[Array, " B"],
    *,
    score_mod: ScoreMod | None,
    scale: float,
    causal: bool,
    attention_window: int | None,
    block_kv: int,
) -> AttentionOutput:
    """The XLA path over a contiguous (B, Hk, max_len, D) cache, ``block_kv`` keys per step."""
    cache_len = keys.shape[2]
    tile = min(block_kv, cache_len)
    num_tiles = -(-cache_len // tile)

    def load_tile(index: Any) -> tuple[Any, Any, Any, Any]:
        # The last tile is shifted back to stay in bounds; keys it shares with the previous
        # tile are excluded so that none is counted twice.
        nominal = index * tile
        start = jnp.minimum(nominal, cache_len - tile)
        k = jax.lax.dynamic_slice_in_dim(keys, start, tile, axis=2)
        v = jax.lax.dynamic_slice_in_dim(values, start, tile, axis=2)
        kv_pos = (start + jnp.arange(tile)).reshape(1, 1, 1, tile)
        return k, v, kv_pos, kv_pos >= nominal

    return xla_decode_loop(
        query,
        load_tile,
        num_kv_heads=keys.shape[1],
        num_tiles=num_tiles,
        tile=tile,
        lengths=lengths,
        q_offset=q_offset,
        score_mod=score_mod,
        scale=scale,
        causal=causal,
        attention_window=attention_window,
    )

