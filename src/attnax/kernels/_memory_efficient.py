"""Memory-efficient attention: online softmax over tiles, FlashAttention-2 style backward.

The forward walks query blocks (outer loop) and key blocks (inner loop) with ``lax.fori_loop``,
keeping a float32 running maximum, denominator and accumulator per query row, so no (T, S)
matrix ever exists and the compiled program does not grow with the sequence length. It saves
only the output and the per-row log-sum-exp. The backward (a ``jax.custom_vjp``) walks key
blocks (outer) and query blocks (inner), recomputes each probability tile from the saved
log-sum-exp and accumulates dQ, dK and dV blockwise (Dao, "FlashAttention-2", 2023, Alg. 2), so
activation memory is O(T * D) in both passes.

Masks are described per tile: the mask part of the score mod and the dense ``mask`` are turned
into block classes (:func:`attnax._mods.block_sparsity`); query blocks only visit the range of
key blocks that holds an allowed pair, ``lax.switch`` skips empty tiles inside that range, and
full tiles skip the mask evaluation. Grouped-query heads are handled by viewing the query as
(B, Hk, G, T, D), never by repeating key/value heads.

On an NVIDIA GPU the tiles above are XLA fusions that write every float32 score tile to memory
and read it back three times, which caps them below XLA's own dense attention's speed times two
(``benchmarks/NOTES.md``). There, for half-precision inputs without dropout and with built-in
mods, the same loop runs with a fused tile: an XLA ``lax.scan`` over steps of ``block_size``
keys, each step one Pallas kernel (PALLAS_FLASH's forward, reading and writing the float32
running maximum, denominator and accumulator in place) and the FlashAttention-2 backward
kernels given the saved log-sum-exp. ``implementation`` picks a path explicitly.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import positive_int, shape_checked
from .._mods import (
    BLOCK_EMPTY,
    BLOCK_FULL,
    block_sparsity,
    block_sparsity_from_mask,
    split_score_mod,
)
from .._typing import (
    AttentionMask,
    AttentionOutput,
    KeyArray,
    PRNGKeyArray,
    QueryArray,
    ScoreMod,
    ValueArray,
)
from ._common import (
    accumulation_dtype,
    check_dropout,
    check_mask,
    check_qkv,
    cuda_compute_capability,
    default_scale,
    vary_like,
    varying_axes,
)
from .pallas_flash import flash_attention_with_config, kernel_can_tile, stepped_config

__all__ = ["memory_efficient_attention"]

_NAME = "memory_efficient_attention"


# --------------------------------------------------------------------------- static plumbing


@dataclasses.dataclass(frozen=True)
class _Partitioned:
    """A pytree split into its array leaves (traced) and everything else (static, hashable)."""

    treedef: Any
    is_array: tuple[bool, ...]
    static_leaves: tuple[Any, ...]

    def rebuild(self, arrays: tuple[jax.Array, ...]) -> Any:
        array_iter = iter(arrays)
        static_iter = iter(self.static_leaves)
        leaves = [next(array_iter) if flag else next(static_iter) for flag in self.is_array]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _partition(tree: Any) -> tuple[tuple[jax.Array, ...], _Partitioned]:
    """Arrays become traced arguments; Python leaves (ints, plain callables) stay static."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    is_array = tuple(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves)
    arrays = tuple(jnp.asarray(leaf) for leaf, flag in zip(leaves, is_array) if flag)
    static = tuple(leaf for leaf, flag in zip(leaves, is_array) if not flag)
    return arrays, _Partitioned(treedef, is_array, static)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: a ``jax.jit`` static argument)."""

    scale: float
    seq_q: int
    seq_kv: int
    block_q: int
    block_kv: int
    dropout_rate: float
    mask_mod: _Partitioned
    value_mod: _Partitioned
    has_mask_mod: bool
    has_value_mod: bool

    @property
    def num_q_blocks(self) -> int:
        return -(-self.seq_q // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.seq_kv // self.block_kv)

    @property
    def padded_q(self) -> int:
        return self.num_q_blocks * self.block_q

    @property
    def padded_kv(self) -> int:
        return self.num_kv_blocks * self.block_kv


def _fit_block(length: int, block_size: int) -> int:
    """The smallest tile <= ``block_size`` covering ``length`` in the same number of tiles.

    Rounded up to a multiple of 8 where that stays within ``block_size`` (friendlier matmul
    shapes); this keeps padding below one tile's worth of 8 rows instead of up to a whole tile.
    """
    num_blocks = -(-length // block_size)
    block = -(-length // num_blocks)
    rounded = -(-block // 8) * 8
    return rounded if rounded <= block_size else block


def _is_float(x: jax.Array) -> bool:
    return bool(jnp.issubdtype(x.dtype, jnp.inexact))


def _zero_cotangent(x: jax.Array) -> Any:
    """The cotangent of a non-differentiable input (float0 for integers, bools and keys)."""
    if _is_float(x):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


# --------------------------------------------------------------------------- tiles


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """The traced, padded operands one tile needs (built once per pass)."""

    query: jax.Array  # (B, Hk, G, Tp, D)
    key: jax.Array  # (B, Hk, Sp, D)
    value: jax.Array  # (B, Hk, Sp, D)
    mask: jax.Array | None  # (#B, #H, Tp or 1, Sp or 1), padded with False
    mask_leaves: tuple[jax.Array, ...]
    dropout_rng: jax.Array | None


def _pad_axis(
    x: jax.Array, axis: int, target: int, value: Any = 0, *, broadcast: bool = False
) -> jax.Array:
    """Pad ``axis`` to ``target``; with ``broadcast`` a size-1 axis (a mask's) stays as it is.

    Only masks broadcast: a query or key of length 1 is padded like any other (its tile is 8
    rows), or the tiles would be sliced past its end."""
    if x.shape[axis] == target or (broadcast and x.shape[axis] == 1):
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, target - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _prepare(
    config: _Config,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    mask_leaves: tuple[jax.Array, ...],
    dropout_rng: jax.Array | None,
) -> _Inputs:
    batch, num_heads, _, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    grouped = query.reshape(batch, num_kv_heads, group, config.seq_q, head_dim)
    padded_mask = None
    if mask is not None:
        padded_mask = _pad_axis(
            _pad_axis(mask, 2, config.padded_q, False, broadcast=True),
            3,
            config.padded_kv,
            False,
            broadcast=True,
        )
    return _Inputs(
        query=_pad_axis(grouped, 3, config.padded_q),
        key=_pad_axis(key, 2, config.padded_kv),
        value=_pad_axis(value, 2, config.padded_kv),
        mask=padded_mask,
        mask_leaves=mask_leaves,
        dropout_rng=dropout_rng,
    )


def _tile_indices(
    config: _Config, batch: int, num_heads: int, q_block: jax.Array, kv_block: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Absolute indices of one tile, broadcasting to (B, H, block_q, block_kv).

    Padded positions are clamped to the last real one so that mods that index arrays (a bias,
    document ids) stay in bounds; padded keys are excluded separately and padded query rows
    are discarded.
    """
    q_pos = q_block * config.block_q + jnp.arange(config.block_q)
    kv_pos = kv_block * config.block_kv + jnp.arange(config.block_kv)
    return (
        jnp.arange(batch).reshape(batch, 1, 1, 1),
        jnp.arange(num_heads).reshape(1, num_heads, 1, 1),
        jnp.minimum(q_pos, config.seq_q - 1).reshape(1, 1, -1, 1),
        jnp.minimum(kv_pos, config.seq_kv - 1).reshape(1, 1, 1, -1),
    )


def _tile_allowed(
    config: _Config,
    inputs: _Inputs,
    q_block: jax.Array,
    kv_block: jax.Array,
    indices: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    *,
    evaluate_masks: bool,
) -> jax.Array | None:
    """The boolean mask of one tile, or None when every pair is allowed."""
    allowed: jax.Array | None = None
    if config.padded_kv != config.seq_kv:
        kv_pos = kv_block * config.block_kv + jnp.arange(config.block_kv)
        allowed = (kv_pos < config.seq_kv).reshape(1, 1, 1, -1)
    if not evaluate_masks:
        return allowed
    if config.has_mask_mod:
        mask_mod = config.mask_mod.rebuild(inputs.mask_leaves)
        mod_allowed = jnp.asarray(mask_mod(*indices), bool)
        allowed = mod_allowed if allowed is None else allowed & mod_allowed
    if inputs.mask is not None:
        tile = inputs.mask
        if tile.shape[2] != 1:
            tile = jax.lax.dynamic_slice_in_dim(tile, q_block * config.block_q, config.block_q, 2)
        if tile.shape[3] != 1:
            tile = jax.lax.dynamic_slice_in_dim(
                tile, kv_block * config.block_kv, config.block_kv, 3
            )
        allowed = tile if allowed is None else allowed & tile
    return allowed


def _dropout_scale(
    config: _Config, rng: jax.Array, q_block: jax.Array, kv_block: jax.Array, shape: tuple[int, ...]
) -> jax.Array:
    """keep / (1 - rate) for one tile; the same key (hence mask) in the forward and backward."""
    tile_key = jax.random.fold_in(jax.random.fold_in(rng, q_block), kv_block)
    keep = jax.random.bernoulli(tile_key, 1.0 - config.dropout_rate, shape)
    return jnp.where(keep, 1.0 / (1.0 - config.dropout_rate), 0.0)


def _raw_scores(config: _Config, q_tile: jax.Array, k_tile: jax.Array, acc: jnp.dtype) -> jax.Array:
    """Scaled scores of one tile as (B, H, block_q, block_kv)."""
    batch, num_kv_heads, group, block_q, _ = q_tile.shape
    scores = jnp.einsum("bkgqd,bksd->bkgqs", q_tile, k_tile, preferred_element_type=acc)
    scores = scores * jnp.asarray(config.scale, acc)
    return scores.reshape(batch, num_kv_heads * group, block_q, k_tile.shape[2])


def _block_classes(
    config: _Config,
    batch: int,
    num_heads: int,
    mask: jax.Array | None,
    mask_leaves: tuple[jax.Array, ...],
) -> jax.Array:
    """(NQ, NK) tile classes, reduced over batch and heads (a tile is processed for all)."""
    shape = (config.num_q_blocks, config.num_kv_blocks)
    classes = jnp.full((1, 1, *shape), BLOCK_FULL, jnp.int8)
    common = {
        "block_q": config.block_q,
        "block_kv": config.block_kv,
        "seq_q": config.seq_q,
        "seq_kv": config.seq_kv,
    }
    if config.has_mask_mod:
        mask_mod = config.mask_mod.rebuild(mask_leaves)
        classes = jnp.minimum(
            classes, block_sparsity(mask_mod, batch=batch, num_heads=num_heads, **common)
        )
    if mask is not None:
        classes = jnp.minimum(classes, block_sparsity_from_mask(mask, **common))
    lowest = jnp.min(classes, axis=(0, 1))
    highest = jnp.max(classes, axis=(0, 1))
    return jnp.where(
        highest == BLOCK_EMPTY, BLOCK_EMPTY, jnp.where(lowest == BLOCK_FULL, BLOCK_FULL, 1)
    ).astype(jnp.int32)


def _visit_range(nonempty: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First and one-past-last True along the last axis (0, 0 when there is none)."""
    count = nonempty.shape[-1]
    positions = jnp.arange(count)
    first = jnp.min(jnp.where(nonempty, positions, count), axis=-1)
    last = jnp.max(jnp.where(nonempty, positions + 1, 0), axis=-1)
    return jnp.minimum(first, last), last


# --------------------------------------------------------------------------- forward


def _forward(
    config: _Config,
    inputs: _Inputs,
    value_leaves: tuple[jax.Array, ...],
    classes: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Padded output (B, Hk, G, Tp, D) in float32 and log-sum-exp (B, Hk, G, Tp)."""
    query, key, value = inputs.query, inputs.key, inputs.value
    batch, num_kv_heads, group, padded_q, head_dim = query.shape
    num_heads = num_kv_heads * group
    acc = accumulation_dtype(query.dtype)
    value_mod = config.value_mod.rebuild(value_leaves) if config.has_value_mod else None
    kv_first, kv_last = _visit_range(classes != BLOCK_EMPTY)
    row_shape = (batch, num_kv_heads, group, config.block_q)
    axes = varying_axes(query, key, value, *value_leaves)

    def query_block(
        i: jax.Array, carry: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        out_all, lse_all = carry
        q_tile = jax.lax.dynamic_slice_in_dim(query, i * config.block_q, config.block_q, 3)

        def tile(
            j: jax.Array, state: tuple[jax.Array, jax.Array, jax.Array], evaluate_masks: bool
        ) -> tuple[jax.Array, jax.Array, jax.Array]:
            row_max, denominator, accumulator = state
            k_tile = jax.lax.dynamic_slice_in_dim(key, j * config.block_kv, config.block_kv, 2)
            v_tile = jax.lax.dynamic_slice_in_dim(value, j * config.block_kv, config.block_kv, 2)
            indices = _tile_indices(config, batch, num_heads, i, j)
            scores = _raw_scores(config, q_tile, k_tile, acc)
            if value_mod is not None:
                scores = value_mod(scores, *indices).astype(acc)
            allowed = _tile_allowed(config, inputs, i, j, indices, evaluate_masks=evaluate_masks)
            if allowed is not None:
                scores = jnp.where(allowed, scores, -jnp.inf)
            scores = scores.reshape(*row_shape, config.block_kv)
            new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))
            # Rows with nothing allowed so far keep max -inf; subtract 0 so exp() gives 0.
            safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            probs = jnp.exp(scores - safe_max[..., None])
            correction = jnp.exp(row_max - safe_max)
            denominator = correction * denominator + jnp.sum(probs, axis=-1)
            if inputs.dropout_rng is not None:
                probs = probs * _dropout_scale(
                    config,
                    inputs.dropout_rng,
                    i,
                    j,
                    (batch, num_heads, config.block_q, config.block_kv),
                ).reshape(probs.shape)
            update = jnp.einsum(
                "bkgqs,bksd->bkgqd",
                probs.astype(v_tile.dtype) if v_tile.dtype != acc else probs,
                v_tile,
                preferred_element_type=acc,
            )
            return new_max, denominator, correction[..., None] * accumulator + update

        def kv_block(
            j: jax.Array, state: tuple[jax.Array, jax.Array, jax.Array]
        ) -> tuple[jax.Array, jax.Array, jax.Array]:
            new_state: tuple[jax.Array, jax.Array, jax.Array] = jax.lax.switch(
                classes[i, j],
                [
                    lambda s: s,
                    lambda s: tile(j, s, True),
                    lambda s: tile(j, s, False),
                ],
                state,
            )
            return new_state

        init = (
            vary_like(jnp.full(row_shape, -jnp.inf, acc), axes),
            vary_like(jnp.zeros(row_shape, acc), axes),
            vary_like(jnp.zeros((*row_shape, head_dim), acc), axes),
        )
        row_max, denominator, accumulator = jax.lax.fori_loop(
            kv_first[i], kv_last[i], kv_block, init
        )
        nonempty = denominator > 0.0
        out_tile = accumulator / jnp.where(nonempty, denominator, 1.0)[..., None]
        # +inf for empty rows: exp(s - lse) is then exactly 0 in the backward.
        lse_tile = jnp.where(
            nonempty, row_max + jnp.log(jnp.where(nonempty, denominator, 1.0)), jnp.inf
        )
        out_all = jax.lax.dynamic_update_slice_in_dim(out_all, out_tile, i * config.block_q, 3)
        lse_all = jax.lax.dynamic_update_slice_in_dim(lse_all, lse_tile, i * config.block_q, 3)
        return out_all, lse_all

    init_out = vary_like(jnp.zeros((batch, num_kv_heads, group, padded_q, head_dim), acc), axes)
    init_lse = vary_like(jnp.zeros((batch, num_kv_heads, group, padded_q), acc), axes)
    out_lse: tuple[jax.Array, jax.Array] = jax.lax.fori_loop(
        0, config.num_q_blocks, query_block, (init_out, init_lse)
    )
    return out_lse


# --------------------------------------------------------------------------- backward


def _backward(
    config: _Config,
    inputs: _Inputs,
    value_leaves: tuple[jax.Array, ...],
    classes: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    grad_out: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, ...]]:
    """dQ (B, Hk, G, Tp, D), dK, dV (B, Hk, Sp, D) in float32 and the value-mod leaf grads."""
    query, key, value = inputs.query, inputs.key, inputs.value
    batch, num_kv_heads, group, _, head_dim = query.shape
    num_heads = num_kv_heads * group
    acc = accumulation_dtype(query.dtype)
    row_shape = (batch, num_kv_heads, group, config.block_q)
    # delta_i = rowsum(dO_i * O_i) = rowsum(P_i * dP_i), also with dropout (FA2, Alg. 2).
    delta = jnp.sum(grad_out.astype(acc) * out.astype(acc), axis=-1)
    diff_flags = tuple(_is_float(leaf) for leaf in value_leaves)
    q_first, q_last = _visit_range((classes != BLOCK_EMPTY).T)
    axes = varying_axes(query, key, value, grad_out, *value_leaves)

    def value_mod_of(float_leaves: tuple[jax.Array, ...]) -> Any:
        float_iter = iter(float_leaves)
        leaves = tuple(
            next(float_iter) if flag else leaf for leaf, flag in zip(value_leaves, diff_flags)
        )
        return config.value_mod.rebuild(leaves)

    float_leaves = tuple(leaf for leaf, flag in zip(value_leaves, diff_flags) if flag)

    def kv_block(
        j: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, ...]]
    ) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, ...]]:
        grad_query, grad_key, grad_value, grad_leaves = carry
        k_tile = jax.lax.dynamic_slice_in_dim(key, j * config.block_kv, config.block_kv, 2)
        v_tile = jax.lax.dynamic_slice_in_dim(value, j * config.block_kv, config.block_kv, 2)

        State = tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, ...]]

        def tile(i: jax.Array, state: State, evaluate_masks: bool) -> State:
            grad_query, dk_tile, dv_tile, grad_leaves = state
            start = i * config.block_q
            q_tile = jax.lax.dynamic_slice_in_dim(query, start, config.block_q, 3)
            do_tile = jax.lax.dynamic_slice_in_dim(grad_out, start, config.block_q, 3)
            lse_tile = jax.lax.dynamic_slice_in_dim(lse, start, config.block_q, 3)
            delta_tile = jax.lax.dynamic_slice_in_dim(delta, start, config.block_q, 3)
            indices = _tile_indices(config, batch, num_heads, i, j)
            raw = _raw_scores(config, q_tile, k_tile, acc)
            mod_vjp: Callable[[jax.Array], tuple[jax.Array, tuple[jax.Array, ...]]] | None = None
            if config.has_value_mod:

                def modded(s: jax.Array, leaves: tuple[jax.Array, ...]) -> jax.Array:
                    return jnp.asarray(value_mod_of(leaves)(s, *indices)).astype(acc)

                scores, mod_vjp = jax.vjp(modded, raw, float_leaves)
            else:
                scores = raw
            allowed = _tile_allowed(config, inputs, i, j, indices, evaluate_masks=evaluate_masks)
            if allowed is not None:
                scores = jnp.where(allowed, scores, -jnp.inf)
            scores = scores.reshape(*row_shape, config.block_kv)
            probs = jnp.exp(scores - lse_tile[..., None])
            grad_probs = jnp.einsum(
                "bkgqd,bksd->bkgqs", do_tile, v_tile, preferred_element_type=acc
            )
            dropped = probs
            if inputs.dropout_rng is not None:
                keep_scale = _dropout_scale(
                    config,
                    inputs.dropout_rng,
                    i,
                    j,
                    (batch, num_heads, config.block_q, config.block_kv),
                ).reshape(probs.shape)
                dropped = probs * keep_scale
                grad_probs = grad_probs * keep_scale
            dv_tile = dv_tile + jnp.einsum(
                "bkgqs,bkgqd->bksd",
                dropped.astype(do_tile.dtype) if do_tile.dtype != acc else dropped,
                do_tile,
                preferred_element_type=acc,
            )
            grad_scores = probs * (grad_probs - delta_tile[..., None])
            if mod_vjp is not None:
                grad_raw, leaf_grads = mod_vjp(
                    grad_scores.reshape(batch, num_heads, *grad_scores.shape[-2:])
                )
                grad_raw = grad_raw.reshape(grad_scores.shape)
                grad_leaves = tuple(
                    total + g.astype(total.dtype) for total, g in zip(grad_leaves, leaf_grads)
                )
            else:
                grad_raw = grad_scores
            grad_raw = grad_raw * jnp.asarray(config.scale, acc)
            mm_raw = grad_raw.astype(query.dtype) if query.dtype != acc else grad_raw
            dq_tile = jnp.einsum("bkgqs,bksd->bkgqd", mm_raw, k_tile, preferred_element_type=acc)
            grad_query = jax.lax.dynamic_update_slice_in_dim(
                grad_query,
                jax.lax.dynamic_slice_in_dim(grad_query, start, config.block_q, 3) + dq_tile,
                start,
                3,
            )
            dk_tile = dk_tile + jnp.einsum(
                "bkgqs,bkgqd->bksd", mm_raw, q_tile, preferred_element_type=acc
            )
            return grad_query, dk_tile, dv_tile, grad_leaves

        def q_block(i: jax.Array, state: State) -> State:
            new_state: State = jax.lax.switch(
                classes[i, j],
                [
                    lambda s: s,
                    lambda s: tile(i, s, True),
                    lambda s: tile(i, s, False),
                ],
                state,
            )
            return new_state

        tile_shape = (batch, num_kv_heads, config.block_kv, head_dim)
        init: State = (
            grad_query,
            vary_like(jnp.zeros(tile_shape, acc), axes),
            vary_like(jnp.zeros(tile_shape, acc), axes),
            grad_leaves,
        )
        grad_query, dk_tile, dv_tile, grad_leaves = jax.lax.fori_loop(
            q_first[j], q_last[j], q_block, init
        )
        start = j * config.block_kv
        grad_key = jax.lax.dynamic_update_slice_in_dim(grad_key, dk_tile, start, 2)
        grad_value = jax.lax.dynamic_update_slice_in_dim(grad_value, dv_tile, start, 2)
        return grad_query, grad_key, grad_value, grad_leaves

    init = (
        vary_like(jnp.zeros(query.shape, acc), axes),
        vary_like(jnp.zeros(key.shape, acc), axes),
        vary_like(jnp.zeros(value.shape, acc), axes),
        tuple(
            vary_like(jnp.zeros(leaf.shape, jnp.promote_types(leaf.dtype, jnp.float32)), axes)
            for leaf in float_leaves
        ),
    )
    grad_query, grad_key, grad_value, grad_float_leaves = jax.lax.fori_loop(
        0, config.num_kv_blocks, kv_block, init
    )
    float_iter = iter(grad_float_leaves)
    grad_leaves = tuple(
        next(float_iter).astype(leaf.dtype) if flag else _zero_cotangent(leaf)
        for leaf, flag in zip(value_leaves, diff_flags)
    )
    return grad_query, grad_key, grad_value, grad_leaves


# --------------------------------------------------------------------------- custom_vjp


_Operands = tuple[
    jax.Array,
    jax.Array,
    jax.Array,
    jax.Array | None,
    tuple[jax.Array, ...],
    tuple[jax.Array, ...],
    jax.Array | None,
]


def _attention(config: _Config, *operands: Any) -> jax.Array:
    out, _ = _attention_fwd(config, *operands)
    return out


def _attention_fwd(
    config: _Config,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    mask_leaves: tuple[jax.Array, ...],
    value_leaves: tuple[jax.Array, ...],
    dropout_rng: jax.Array | None,
) -> tuple[jax.Array, tuple[_Operands, jax.Array, jax.Array]]:
    batch, num_heads, seq_q, head_dim = query.shape
    inputs = _prepare(config, query, key, value, mask, mask_leaves, dropout_rng)
    classes = _block_classes(config, batch, num_heads, mask, mask_leaves)
    out_padded, lse = _forward(config, inputs, value_leaves, classes)
    out_padded = out_padded.astype(query.dtype)
    out = out_padded[:, :, :, :seq_q].reshape(batch, num_heads, seq_q, head_dim)
    operands: _Operands = (query, key, value, mask, mask_leaves, value_leaves, dropout_rng)
    return out, (operands, out_padded, lse)


def _attention_bwd(
    config: _Config,
    residuals: tuple[_Operands, jax.Array, jax.Array],
    grad_out: jax.Array,
) -> tuple[Any, ...]:
    operands, out_padded, lse = residuals
    query, key, value, mask, mask_leaves, value_leaves, dropout_rng = operands
    batch, num_heads, seq_q, head_dim = query.shape
    num_kv_heads = key.shape[1]
    inputs = _prepare(config, query, key, value, mask, mask_leaves, dropout_rng)
    classes = _block_classes(config, batch, num_heads, mask, mask_leaves)
    grad_grouped = grad_out.reshape(batch, num_kv_heads, num_heads // num_kv_heads, seq_q, head_dim)
    grad_padded = _pad_axis(grad_grouped, 3, config.padded_q)
    grad_query, grad_key, grad_value, grad_leaves = _backward(
        config, inputs, value_leaves, classes, out_padded, lse, grad_padded
    )
    grad_query = grad_query[:, :, :, :seq_q].reshape(query.shape).astype(query.dtype)
    grad_key = grad_key[:, :, : config.seq_kv].astype(key.dtype)
    grad_value = grad_value[:, :, : config.seq_kv].astype(value.dtype)
    return (
        grad_query,
        grad_key,
        grad_value,
        None if mask is None else _zero_cotangent(mask),
        tuple(_zero_cotangent(leaf) for leaf in mask_leaves),
        grad_leaves,
        None if dropout_rng is None else _zero_cotangent(dropout_rng),
    )


_attention_vjp = jax.custom_vjp(_attention, nondiff_argnums=(0,))
_attention_vjp.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.jit, static_argnums=(0,))
def _attention_jit(config: _Config, *operands: Any) -> jax.Array:
    out: jax.Array = _attention_vjp(config, *operands)
    return out


# --------------------------------------------------------------------------- GPU path


_HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _use_fused_tile(
    implementation: Any, query: jax.Array, score_mod: Any, dropout_active: bool
) -> bool:
    """Whether the fused Pallas tile serves this call; ValueError if asked for and it cannot."""
    if implementation not in (None, "xla", "pallas"):
        raise ValueError(
            f"{_NAME}: `implementation` must be None, 'xla' or 'pallas', got {implementation!r}."
        )
    if implementation == "xla":
        return False
    refusal = None
    if cuda_compute_capability() is None:
        refusal = "it runs on an NVIDIA GPU only"
    elif dropout_active:
        refusal = "the fused tile has no attention dropout"
    elif not kernel_can_tile(score_mod):
        refusal = (
            "the score mod is not built from attnax's mods (a plain callable may capture "
            "arrays, which a Pallas kernel cannot take)"
        )
    if implementation == "pallas":
        if refusal is not None:
            raise ValueError(
                f"{_NAME}: implementation='pallas' cannot serve this call: {refusal}; use "
                "implementation='xla' (or None to choose automatically)."
            )
        return True
    return refusal is None and jnp.dtype(query.dtype) in _HALF_DTYPES


# --------------------------------------------------------------------------- public


@shape_checked
def memory_efficient_attention(
    query: QueryArray,
    key: KeyArray,
    value: ValueArray,
    *,
    mask: AttentionMask | None = None,
    score_mod: ScoreMod | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    block_size: int = 512,
    scale: float | None = None,
    implementation: Literal["xla", "pallas"] | None = None,
) -> AttentionOutput:
    r"""Softmax attention in O(T * D) memory, forward and backward.

    Computes :math:`\mathrm{softmax}(\mathrm{mod}(s QK^\top)) V` tile by tile with an online
    softmax (running maximum and denominator in float32), never forming the (T, S) score
    matrix. The backward is a ``custom_vjp`` that recomputes each probability tile from the
    saved per-row log-sum-exp (FlashAttention-2).

    Args:
      query: (batch, heads, seq_q, head_dim).
      key: (batch, kv_heads, seq_kv, head_dim); ``kv_heads`` divides ``heads`` (GQA/MQA: query
        head ``h`` reads key head ``h // (heads // kv_heads)``; key heads are never repeated,
        and their gradients are summed over the group).
      value: like ``key``.
      mask: boolean, broadcastable to (batch, heads, seq_q, seq_kv); True means attend. Tiles
        it rules out entirely are skipped.
      score_mod: applied to the scaled scores of each tile with absolute indices. Its mask
        part (causal, sliding window, prefix-LM, document, any mask mod) is turned into block
        classes so that empty tiles are skipped and full tiles skip the mask evaluation; its
        value part (ALiBi, softcap, a bias, a plain callable) is applied per tile, and its
        array leaves (for example the bias of :func:`~attnax.additive_bias_mod`) receive
        gradients. Arrays closed over by a plain callable receive no gradient: wrap them in
        a pytree mod instead.
      dropout_rng: key for dropout on the attention weights.
      dropout_rate: probability of dropping a weight, in [0, 1). Each tile draws its mask from
        ``fold_in(fold_in(dropout_rng, query_block), key_block)``, in the forward and again in
        the backward, so the masks agree without being stored; the random stream therefore
        differs from :func:`~attnax.standard_attention`'s for the same key.
      deterministic: no dropout when True.
      block_size: the largest tile edge, for query and key blocks. Shorter sequences use one
        tile; otherwise the smallest tile that covers the sequence in the same number of
        tiles is used, and the sequence is padded internally (padded keys are excluded).
      scale: score scale, ``1 / sqrt(head_dim)`` by default.
      implementation: ``"xla"`` runs the tiles as XLA loops (any backend, any mod, dropout).
        ``"pallas"`` runs the fused GPU tile: an XLA scan over steps of ``block_size`` keys,
        one Pallas kernel per step keeping the float32 softmax state in HBM between steps, and
        Pallas FlashAttention-2 backward kernels; it needs an NVIDIA GPU, no dropout and a
        score mod built from attnax's mods (plain callables may capture arrays, which a
        kernel cannot take). ``None`` (default) picks ``"pallas"`` when those hold and the
        inputs are bf16 or fp16, and ``"xla"`` otherwise (float32 keeps XLA's exact products).
        A Pallas kernel has no partitioning rule, so ``jit``'s automatic sharding does not
        split it over devices as it splits the XLA tiles: call it inside ``shard_map`` for
        data or tensor parallelism, or pass ``"xla"``.

    Returns:
      (batch, heads, seq_q, head_dim) in the query's dtype. Softmax statistics and
      accumulators are float32 for bf16/fp16 inputs. A query row with no allowed key returns
      zeros, with finite (zero) gradients.

    Raises:
      ValueError: for shapes that do not fit together, bad dropout arguments, a non-positive
        ``block_size``, an unknown ``implementation``, or ``implementation="pallas"`` for a
        call the fused tile cannot serve (the message says why).

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> kv = jax.random.normal(jax.random.key(1), (1, 2, 8, 4))
      >>> out = attnax.memory_efficient_attention(
      ...     q, kv, kv, score_mod=attnax.causal_mod(), block_size=4)  # 2 x 2 tiles
      >>> ref = attnax.standard_attention(q, kv, kv, score_mod=attnax.causal_mod())
      >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
      ((1, 2, 8, 4), True)
    """
    check_qkv(query, key, value, name=_NAME)
    check_mask(mask, query, key, name=_NAME)
    dropout_active = check_dropout(dropout_rate, dropout_rng, deterministic, name=_NAME)
    positive_int(block_size, "block_size", caller=_NAME)
    seq_q, head_dim = query.shape[2], query.shape[3]
    seq_kv = key.shape[2]
    if _use_fused_tile(implementation, query, score_mod, dropout_active):
        fused: AttentionOutput = flash_attention_with_config(
            query,
            key,
            value,
            config=stepped_config(head_dim, seq_kv, block_size),
            mask=mask,
            score_mod=score_mod,
            scale=scale,
        )
        return fused
    mask_mod, value_mod = split_score_mod(score_mod)
    mask_leaves, mask_static = _partition(mask_mod)
    value_leaves, value_static = _partition(value_mod)
    config = _Config(
        scale=default_scale(head_dim, scale),
        seq_q=seq_q,
        seq_kv=seq_kv,
        block_q=_fit_block(seq_q, block_size),
        block_kv=_fit_block(seq_kv, block_size),
        dropout_rate=float(dropout_rate) if dropout_active else 0.0,
        mask_mod=mask_static,
        value_mod=value_static,
        has_mask_mod=mask_mod is not None,
        has_value_mod=value_mod is not None,
    )
    rng = dropout_rng if dropout_active else None
    out: AttentionOutput = _attention_jit(
        config, query, key, value, mask, mask_leaves, value_leaves, rng
    )
    return out
