"""Split-KV ("flash-decoding") attention for a few query tokens against a long KV cache.

Decoding reads the whole cache for one new token, so it is bound by memory bandwidth, not by
FLOPs. The kernel splits the cache's sequence axis into ``num_splits`` chunks that run as
separate programs (so a small batch still fills the GPU), each program streams its chunk in
tiles of ``block_kv`` keys with an online softmax, and the float32 partial results are merged
by log-sum-exp in XLA:

.. math::

    M = \\max_s m_s, \\quad \\ell = \\sum_s e^{m_s - M} \\ell_s, \\quad
    o = \\frac{1}{\\ell} \\sum_s e^{m_s - M} o_s .

Grouped-query attention shares every key/value tile across the ``H / Hk`` query heads of its
group: the group's query heads (times the query length ``T``) are the rows of the query tile,
padded to at least 16 rows (a power of two) so that every dot has Triton-friendly shapes.

Positions are absolute: key ``j`` of row ``b`` sits at position ``j`` and query ``i`` at
``q_offset[b] + i`` (by default ``lengths[b] - T + i``: the new tokens are the last ``T`` of
each row). Keys at or beyond ``lengths[b]`` are never attended; ``causal=True`` (the default)
adds ``kv <= q``, ``attention_window=w`` adds ``q - kv < w`` and skips the tiles before the
window. Score mods see the same absolute positions.

Backends: a Pallas kernel (Triton lowering on GPU; ``interpret=True`` runs it on CPU for
tests) and an XLA path with the same math (chunked online softmax, also skipping tiles beyond
each batch's longest row). ``use_pallas=None`` picks Pallas on GPU when the configuration is
supported (see :func:`decode_attention`) and XLA otherwise; ``use_pallas=True`` raises
``NotImplementedError`` instead of falling back. These kernels are forward-only (inference):
their loops have data-dependent trip counts, which ``jax.grad`` cannot reverse; train with
``standard_attention`` or a flash kernel.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from .._checks import positive_int, shape_checked
from .._mods import split_score_mod
from .._typing import AttentionOutput, KeyArray, MaskMod, QueryArray, ScoreMod, ValueArray
from ._common import accumulation_dtype, apply_score_mods, default_scale, kernel_outputs

__all__ = ["decode_attention"]

# A finite "minus infinity" for running maxima: masked scores are -inf, and exp(-inf - NEG)
# is 0 while exp(NEG - NEG) of two empty tiles is 1 times a zero sum, so nothing becomes NaN.
NEG_INF_FINITE = -0.7 * float(np.finfo(np.float32).max)
MIN_ROWS = 16  # Triton's dot needs at least 16 rows.
MAX_ROWS = 128  # beyond this the query tile stops fitting comfortably in registers
TARGET_PROGRAMS = 528  # ~4 waves of the 132 SMs of an H100


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def has_array_leaves(score_mod: ScoreMod | None) -> bool:
    """Whether a score mod carries arrays (which a Pallas kernel cannot close over)."""
    if score_mod is None:
        return False
    return any(
        isinstance(leaf, (jax.Array, np.ndarray)) and np.ndim(leaf) > 0
        for leaf in jax.tree_util.tree_leaves(score_mod)
    )


def default_num_splits(batch: int, num_kv_heads: int, num_tiles: int) -> int:
    """Enough splits to give the GPU a few waves of programs, never more than tiles."""
    wanted = _next_power_of_two(max(1, -(-TARGET_PROGRAMS // max(1, batch * num_kv_heads))))
    return max(1, min(wanted, num_tiles))


# --------------------------------------------------------------------------- shared math


def row_indices(
    rows: Int[Array, "*#r"], *, group: int, seq_q: int, kv_head: Any, q_offset: Any
) -> tuple[Int[Array, "*#r"], Int[Array, "*#r"]]:
    """Query head and absolute query position of each tile row (row = g * T + t).

    Padding rows (beyond ``group * seq_q``) are clamped onto the last real row, so that score
    mods never see a head index or a position that does not exist.
    """
    real = jnp.minimum(rows, group * seq_q - 1)
    h_idx = kv_head * group + real // seq_q
    q_pos = q_offset + real % seq_q
    return h_idx, q_pos


def tile_scores(
    scores: Float[Array, "*#tile"],
    *,
    b_idx: Any,
    h_idx: Any,
    q_pos: Any,
    kv_pos: Any,
    length: Any,
    causal: bool,
    attention_window: int | None,
    mask_mod: MaskMod | None,
    value_mod: ScoreMod | None,
    extra_allowed: Any = None,
) -> Float[Array, "*#tile"]:
    """Scores with the value mod applied and every disallowed pair set to -inf."""
    allowed = kv_pos < length
    if extra_allowed is not None:
        allowed = allowed & extra_allowed
    if causal:
        allowed = allowed & (kv_pos <= q_pos)
    if attention_window is not None:
        allowed = allowed & (q_pos - kv_pos < attention_window)
    masked, _ = apply_score_mods(
        scores,
        mask_mod=mask_mod,
        value_mod=value_mod,
        b_idx=b_idx,
        h_idx=h_idx,
        q_idx=q_pos,
        kv_idx=kv_pos,
        allowed=allowed,
    )
    return masked


def online_softmax_step(
    scores: Float[Array, "*rows C"],
    max_prev: Float[Array, "*rows"],
    sum_prev: Float[Array, "*rows"],
    out_prev: Float[Array, "*rows D"],
    value_product: Callable[[Float[Array, "*rows C"]], Float[Array, "*rows D"]],
) -> tuple[Float[Array, "*rows D"], Float[Array, "*rows"], Float[Array, "*rows"]]:
    """One tile of the online softmax; the running max stays finite (see NEG_INF_FINITE)."""
    max_next = jnp.maximum(max_prev, jnp.max(scores, axis=-1))
    correction = jnp.exp(max_prev - max_next)
    weights = jnp.exp(scores - max_next[..., None])
    sum_next = correction * sum_prev + jnp.sum(weights, axis=-1)
    out_next = correction[..., None] * out_prev + value_product(weights)
    return out_next, max_next, sum_next


def merge_splits(
    out: Float[Array, "*lead S R D"],
    row_max: Float[Array, "*lead S R"],
    row_sum: Float[Array, "*lead S R"],
) -> Float[Array, "*lead R D"]:
    """Log-sum-exp merge of per-split partials; rows with nothing allowed give exact zeros."""
    global_max = jnp.max(row_max, axis=-2, keepdims=True)
    weight = jnp.exp(row_max - global_max)
    total = jnp.sum(weight * row_sum, axis=-2)
    merged = jnp.sum(weight[..., None] * out, axis=-3)
    return merged / jnp.where(total > 0.0, total, 1.0)[..., None]


def group_query_rows(query: QueryArray, num_kv_heads: int, rows: int) -> Float[Array, "B Hk R D"]:
    """(B, H, T, D) -> (B, Hk, R, D) with row g * T + t, zero-padded to ``rows`` rows."""
    batch, num_heads, seq_q, head_dim = query.shape
    group = num_heads // num_kv_heads
    grouped = query.reshape(batch, num_kv_heads, group * seq_q, head_dim)
    if rows > group * seq_q:
        grouped = jnp.pad(grouped, ((0, 0), (0, 0), (0, rows - group * seq_q), (0, 0)))
    return grouped


def ungroup_rows(
    out: Float[Array, "B Hk R D"], num_heads: int, seq_q: int
) -> Float[Array, "B H T D"]:
    batch, num_kv_heads, _, head_dim = out.shape
    group = num_heads // num_kv_heads
    return out[:, :, : group * seq_q].reshape(batch, num_heads, seq_q, head_dim)


def tile_range(
    *,
    length: Any,
    q_offset: Any,
    seq_q: int,
    tile: int,
    causal: bool,
    attention_window: int | None,
) -> tuple[Any, Any]:
    """Half-open range of KV tiles that can hold an allowed key (as traced ints)."""
    hi = (length + tile - 1) // tile
    if causal:
        hi = jnp.minimum(hi, (q_offset + seq_q - 1) // tile + 1)
    lo = jnp.zeros_like(hi)
    if attention_window is not None:
        lo = jnp.maximum(q_offset - attention_window + 1, 0) // tile
    return lo, hi


def check_decode_arguments(
    query: Array,
    lengths: Array,
    q_offset: Array | None,
    *,
    num_kv_heads: int,
    head_dim: int,
    attention_window: int | None,
    num_splits: int | None,
    name: str,
) -> None:
    """Static checks shared by the contiguous and the paged decode kernels."""
    if query.ndim != 4:
        raise ValueError(
            f"{name}: `query` must have rank 4 (batch, heads, seq_q, head_dim), got {query.shape}."
        )
    batch, num_heads, _, query_dim = query.shape
    if query_dim != head_dim:
        raise ValueError(
            f"{name}: `query` head_dim {query_dim} differs from the cache's head_dim {head_dim}."
        )
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"{name}: the cache has {num_kv_heads} KV heads, which does not divide the query's "
            f"{num_heads} heads; use a key/value head count that divides it."
        )
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"{name}: `lengths` must be an integer array of shape (batch,) = ({batch},), got "
            f"{lengths.dtype}{list(lengths.shape)}."
        )
    if q_offset is not None and (
        q_offset.shape != (batch,) or not jnp.issubdtype(q_offset.dtype, jnp.integer)
    ):
        raise ValueError(
            f"{name}: `q_offset` must be an integer array of shape (batch,) = ({batch},), got "
            f"{q_offset.dtype}{list(q_offset.shape)}."
        )
    if attention_window is not None:
        positive_int(attention_window, "attention_window", caller=name)
    if num_splits is not None:
        positive_int(num_splits, "num_splits", caller=name)


def pallas_unsupported_reason(
    *,
    head_dim: int,
    rows: int,
    tile: int,
    score_mod: ScoreMod | None,
) -> str | None:
    """Why the Pallas kernel cannot run this configuration (None when it can)."""
    if not _is_power_of_two(head_dim) or head_dim < 16:
        return f"head_dim {head_dim} is not a power of two >= 16"
    if rows > MAX_ROWS:
        return (
            f"the query tile needs {rows} rows (query heads per KV head times seq_q, padded to a "
            f"power of two), more than {MAX_ROWS}; decode fewer tokens per call"
        )
    if not _is_power_of_two(tile) or tile < 16:
        return f"the KV tile of {tile} keys is not a power of two >= 16"
    if has_array_leaves(score_mod):
        return "the score mod carries arrays, which a Pallas kernel cannot close over"
    return None


def resolve_use_pallas(
    use_pallas: bool | None, interpret: bool, reason: str | None, *, name: str
) -> bool:
    if use_pallas is None:
        return reason is None and (interpret or jax.default_backend() == "gpu")
    if use_pallas and reason is not None:
        raise NotImplementedError(
            f"{name}: the Pallas kernel does not support this call ({reason}); pass "
            "use_pallas=False for the XLA path."
        )
    return use_pallas


# --------------------------------------------------------------------------- Pallas kernel


def split_kv_body(
    *,
    load_tile: Any,
    length: Any,
    q_offset: Any,
    q: Any,
    out_ref: Any,
    max_ref: Any,
    sum_ref: Any,
    score_mod: ScoreMod | None,
    scale: float,
    group: int,
    seq_q: int,
    tile: int,
    steps_per_split: int,
    num_steps_total: int,
    causal: bool,
    attention_window: int | None,
) -> None:
    """One split-KV program: online softmax over this split's visible tiles, partials out.

    Shared by the contiguous and the paged kernel, which differ only in ``load_tile(index)``:
    how the keys and values of tile ``index`` (``tile`` rows each) are read.
    """
    b = pl.program_id(0)
    kv_head = pl.program_id(1)
    split = pl.program_id(2)
    rows, head_dim = q.shape
    h_idx, q_pos = row_indices(
        jnp.arange(rows)[:, None], group=group, seq_q=seq_q, kv_head=kv_head, q_offset=q_offset
    )
    mask_mod, value_mod = split_score_mod(score_mod)
    lo, hi = tile_range(
        length=length,
        q_offset=q_offset,
        seq_q=seq_q,
        tile=tile,
        causal=causal,
        attention_window=attention_window,
    )
    first = jnp.maximum(split * steps_per_split, lo)
    last = jnp.minimum(jnp.minimum((split + 1) * steps_per_split, num_steps_total), hi)
    num_steps = jnp.maximum(last - first, 0)
    kv_offsets = jnp.arange(tile)[None, :]

    def body(step: Any, carry: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
        out_prev, max_prev, sum_prev = carry
        index = first + step
        k, v = load_tile(index)
        scores = (
            jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            * scale
        )
        scores = tile_scores(
            scores,
            b_idx=b,
            h_idx=h_idx,
            q_pos=q_pos,
            kv_pos=index * tile + kv_offsets,
            length=length,
            causal=causal,
            attention_window=attention_window,
            mask_mod=mask_mod,
            value_mod=value_mod,
        )

        def value_product(weights: Any) -> Any:
            return jax.lax.dot_general(
                weights.astype(v.dtype),
                v,
                (((1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32,
            )

        return online_softmax_step(scores, max_prev, sum_prev, out_prev, value_product)

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), NEG_INF_FINITE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    out, row_max, row_sum = jax.lax.fori_loop(0, num_steps, body, init)
    out_ref[...] = out
    max_ref[...] = row_max
    sum_ref[...] = row_sum


def _decode_kernel(
    length_ref: Any,
    q_offset_ref: Any,
    q_ref: Any,
    k_ref: Any,
    v_ref: Any,
    out_ref: Any,
    max_ref: Any,
    sum_ref: Any,
    *,
    score_mod: ScoreMod | None,
    scale: float,
    group: int,
    seq_q: int,
    block_kv: int,
    tiles_per_split: int,
    num_tiles: int,
    causal: bool,
    attention_window: int | None,
) -> None:
    def load_tile(index: Any) -> tuple[Any, Any]:
        # The alignment hint lets Triton emit wide vectorised loads.
        start = pl.multiple_of(index * block_kv, block_kv)
        return k_ref[pl.ds(start, block_kv), :], v_ref[pl.ds(start, block_kv), :]

    split_kv_body(
        load_tile=load_tile,
        length=length_ref[0],
        q_offset=q_offset_ref[0],
        q=q_ref[...],
        out_ref=out_ref,
        max_ref=max_ref,
        sum_ref=sum_ref,
        score_mod=score_mod,
        scale=scale,
        group=group,
        seq_q=seq_q,
        tile=block_kv,
        steps_per_split=tiles_per_split,
        num_steps_total=num_tiles,
        causal=causal,
        attention_window=attention_window,
    )


def _pallas_contiguous(
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
    num_splits: int | None,
    block_kv: int,
    rows: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
) -> AttentionOutput:
    batch, num_heads, seq_q, head_dim = query.shape
    num_kv_heads, cache_len = keys.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    num_tiles = cache_len // block_kv
    splits = num_splits or default_num_splits(batch, num_kv_heads, num_tiles)
    splits = min(splits, num_tiles)
    tiles_per_split = -(-num_tiles // splits)
    kernel = functools.partial(
        _decode_kernel,
        score_mod=score_mod,
        scale=scale,
        group=group,
        seq_q=seq_q,
        block_kv=block_kv,
        tiles_per_split=tiles_per_split,
        num_tiles=num_tiles,
        causal=causal,
        attention_window=attention_window,
    )
    kv_spec = pl.BlockSpec((None, None, cache_len, head_dim), lambda b, h, s: (b, h, 0, 0))
    return run_split_kv(
        kernel,
        [(keys, kv_spec), (values, kv_spec)],
        query=query,
        lengths=lengths,
        q_offset=q_offset,
        num_kv_heads=num_kv_heads,
        splits=splits,
        rows=rows,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="attnax_decode_attention",
    )


def run_split_kv(
    kernel: Any,
    cache_inputs: list[tuple[Array, Any]],
    *,
    query: QueryArray,
    lengths: Int[Array, " B"],
    q_offset: Int[Array, " B"],
    num_kv_heads: int,
    splits: int,
    rows: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
    name: str,
) -> AttentionOutput:
    """Launch a split-KV kernel over (batch, kv_head, split) and merge its partials.

    The kernel's operands are each row's length and first query position, the grouped query
    rows, then ``cache_inputs`` ((array, BlockSpec) pairs: the contiguous cache, or the block
    table and the pools); its outputs are the per-split float32 (out, max, sum) partials.
    """
    batch, num_heads, seq_q, head_dim = query.shape
    row_scalar = pl.BlockSpec((1,), lambda b, h, s: (b,))
    q_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0))
    partial_shape = (batch, num_kv_heads, splits, rows)
    operands = (
        lengths.astype(jnp.int32),
        q_offset.astype(jnp.int32),
        group_query_rows(query, num_kv_heads, rows),
        *(array for array, _ in cache_inputs),
    )
    out, row_max, row_sum = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, splits),
        in_specs=[row_scalar, row_scalar, q_spec, *(spec for _, spec in cache_inputs)],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=kernel_outputs(
            operands,
            ((*partial_shape, head_dim), jnp.float32),
            (partial_shape, jnp.float32),
            (partial_shape, jnp.float32),
        ),
        compiler_params=_gpu_compiler_params(num_warps, num_stages, interpret),
        interpret=interpret,
        name=name,
    )(*operands)
    merged = merge_splits(out, row_max, row_sum)
    return ungroup_rows(merged, num_heads, seq_q).astype(query.dtype)


def _gpu_compiler_params(num_warps: int, num_stages: int, interpret: bool) -> Any:
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# --------------------------------------------------------------------------- XLA path


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


def _xla_contiguous(
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


# --------------------------------------------------------------------------- public


@shape_checked
def decode_attention(
    query: QueryArray,
    keys: KeyArray,
    values: ValueArray,
    lengths: Int[Array, " B"],
    *,
    score_mod: ScoreMod | None = None,
    q_offset: Int[Array, " B"] | None = None,
    causal: bool = True,
    attention_window: int | None = None,
    num_splits: int | None = None,
    block_kv: int = 128,
    num_warps: int = 4,
    num_stages: int = 2,
    use_pallas: bool | None = None,
    interpret: bool = False,
    scale: float | None = None,
) -> AttentionOutput:
    r"""Attention of a few new query tokens against a contiguous KV cache (flash-decoding).

    Args:
      query: (batch, heads, seq_q, head_dim); ``seq_q`` is small (1 for decoding, a few for
        speculative decoding; the Pallas kernel takes up to ``128 / (heads / kv_heads)``).
      keys: (batch, kv_heads, max_len, head_dim), the cache after RoPE; ``kv_heads`` divides
        ``heads`` (GQA/MQA: each KV tile is read once for its whole query-head group).
      values: like ``keys``.
      lengths: (batch,) int, the number of valid cache entries of each row; keys at or beyond
        it are never attended (their contents do not matter).
      score_mod: applied to the scaled scores with absolute (batch, head, query, key) indices.
      q_offset: (batch,) absolute position of each row's first query token; default
        ``lengths - seq_q`` (the queries are the last ``seq_q`` tokens of each row).
      causal: mask keys after each query's absolute position (default True).
      attention_window: if given, also mask keys ``attention_window`` or more positions before
        the query (sliding window, the query itself counts); tiles wholly outside are skipped.
      num_splits: how many programs share one row's cache (split-KV); default: enough for
        about four waves of an H100, at most one per tile.
      block_kv: keys per tile (a power of two >= 16 for Pallas); reduced to the largest power
        of two dividing ``max_len`` when needed.
      num_warps: Triton warps per program (GPU only).
      num_stages: Triton software-pipelining stages (GPU only).
      use_pallas: True: the Pallas kernel (``NotImplementedError`` when unsupported: head_dim
        not a power of two >= 16, ``max_len`` not a multiple of 16, more than 128 query rows per
        group, or a score mod that carries arrays); False: the XLA path; None (default):
        Pallas on GPU or with ``interpret=True`` when supported, XLA otherwise.
      interpret: run the Pallas kernel in the interpreter (CPU tests).
      scale: score scale, ``1 / sqrt(head_dim)`` by default.

    Returns:
      (batch, heads, seq_q, head_dim) in the query's dtype; float32 softmax and accumulation.
      A query with no allowed key (for example ``lengths == 0``) returns zeros.

    Raises:
      ValueError: for shapes or arguments that do not fit together.
      NotImplementedError: for ``use_pallas=True`` with a configuration Pallas cannot run.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> keys = jax.random.normal(jax.random.key(0), (2, 1, 16, 4))  # capacity 16, one KV head
      >>> values = jax.random.normal(jax.random.key(1), (2, 1, 16, 4))
      >>> query = jax.random.normal(jax.random.key(2), (2, 2, 1, 4))  # one new token per row
      >>> lengths = jnp.array([5, 9])  # rows hold 5 and 9 tokens (the new one included)
      >>> out = jax.jit(attnax.decode_attention)(query, keys, values, lengths)
      >>> out.shape
      (2, 2, 1, 4)
      >>> ref = attnax.standard_attention(query[:1], keys[:1, :, :5], values[:1, :, :5])
      >>> bool(jnp.allclose(out[:1], ref, atol=1e-5))
      True
    """
    name = "decode_attention"
    if keys.ndim != 4 or keys.shape != values.shape:
        raise ValueError(
            f"{name}: `keys` {keys.shape} and `values` {values.shape} must have the same shape "
            "(batch, kv_heads, max_len, head_dim)."
        )
    if keys.shape[0] != query.shape[0]:
        raise ValueError(
            f"{name}: `query` batch {query.shape[0]} differs from `keys` batch {keys.shape[0]}."
        )
    check_decode_arguments(
        query,
        lengths,
        q_offset,
        num_kv_heads=keys.shape[1],
        head_dim=keys.shape[3],
        attention_window=attention_window,
        num_splits=num_splits,
        name=name,
    )
    if not _is_power_of_two(block_kv) or block_kv < 1:
        raise ValueError(f"{name}: `block_kv` must be a power of two, got {block_kv}.")
    _, num_heads, seq_q, head_dim = query.shape
    num_kv_heads, cache_len = keys.shape[1], keys.shape[2]
    scale_value = default_scale(head_dim, scale)
    offsets = lengths - seq_q if q_offset is None else q_offset
    rows = max(MIN_ROWS, _next_power_of_two((num_heads // num_kv_heads) * seq_q))
    tile = block_kv
    while tile > 16 and cache_len % tile != 0:
        tile //= 2
    reason = pallas_unsupported_reason(head_dim=head_dim, rows=rows, tile=tile, score_mod=score_mod)
    if reason is None and cache_len % tile != 0:
        reason = f"max_len {cache_len} is not a multiple of 16"
    if resolve_use_pallas(use_pallas, interpret, reason, name=name):
        return _pallas_contiguous(
            query,
            keys,
            values,
            lengths,
            offsets,
            score_mod=score_mod,
            scale=scale_value,
            causal=causal,
            attention_window=attention_window,
            num_splits=num_splits,
            block_kv=tile,
            rows=rows,
            num_warps=num_warps,
            num_stages=num_stages,
            interpret=interpret,
        )
    return _xla_contiguous(
        query,
        keys,
        values,
        lengths,
        offsets,
        score_mod=score_mod,
        scale=scale_value,
        causal=causal,
        attention_window=attention_window,
        block_kv=block_kv,
    )
