"""The backward pass (FlashAttention-2, Alg. 2): key blocks (outer loop) by query blocks (inner).

Each probability tile is recomputed from the saved log-sum-exp; dQ, dK and dV (and the value
mod's leaf gradients) are accumulated blockwise, so activation memory stays O(T * D).
"""

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp

from ..._mods import BLOCK_EMPTY
from .._common import accumulation_dtype, vary_like, varying_axes
from .plan import (
    Config,
    Inputs,
    Operands,
    block_classes,
    is_float,
    pad_axis,
    prepare,
    visit_range,
    zero_cotangent,
)
from .tiles import dropout_scale, raw_scores, tile_allowed, tile_indices

# dQ (whole), dK and dV of one key block, and the float value-mod leaves' gradients.
GradState = tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, ...]]


@dataclasses.dataclass(frozen=True)
class _BackwardPass:
    """What every tile of one backward pass shares (traced values of the enclosing trace)."""

    config: Config
    inputs: Inputs
    value_leaves: tuple[jax.Array, ...]
    diff_flags: tuple[bool, ...]  # which value-mod leaves are floats (receive gradients)
    classes: jax.Array  # (NQ, NK) block classes
    grad_out: jax.Array  # (B, Hk, G, Tp, D)
    lse: jax.Array  # (B, Hk, G, Tp)
    delta: jax.Array  # (B, Hk, G, Tp)
    row_shape: tuple[int, int, int, int]  # (B, Hk, G, block_q)
    acc: jnp.dtype
    axes: frozenset[Hashable]

    @property
    def num_heads(self) -> int:
        return self.row_shape[1] * self.row_shape[2]

    def value_mod_of(self, float_leaves: tuple[jax.Array, ...]) -> Any:
        """The value mod rebuilt with ``float_leaves`` in place of its float leaves."""
        float_iter = iter(float_leaves)
        leaves = tuple(
            next(float_iter) if flag else leaf
            for leaf, flag in zip(self.value_leaves, self.diff_flags)
        )
        return self.config.value_mod.rebuild(leaves)


def _tile(
    bwd: _BackwardPass,
    j: jax.Array,
    k_tile: jax.Array,
    v_tile: jax.Array,
    float_leaves: tuple[jax.Array, ...],
    i: jax.Array,
    state: GradState,
    evaluate_masks: bool,
) -> GradState:
    """Recompute tile (``i``, ``j``)'s probabilities and add its share of every gradient."""
    config, inputs, acc = bwd.config, bwd.inputs, bwd.acc
    query = inputs.query
    batch = bwd.row_shape[0]
    num_heads = bwd.num_heads
    grad_query, dk_tile, dv_tile, grad_leaves = state
    start = i * config.block_q
    q_tile = jax.lax.dynamic_slice_in_dim(query, start, config.block_q, 3)
    do_tile = jax.lax.dynamic_slice_in_dim(bwd.grad_out, start, config.block_q, 3)
    lse_tile = jax.lax.dynamic_slice_in_dim(bwd.lse, start, config.block_q, 3)
    delta_tile = jax.lax.dynamic_slice_in_dim(bwd.delta, start, config.block_q, 3)
    indices = tile_indices(config, batch, num_heads, i, j)
    raw = raw_scores(config, q_tile, k_tile, acc)
    mod_vjp: Callable[[jax.Array], tuple[jax.Array, tuple[jax.Array, ...]]] | None = None
    if config.has_value_mod:

        def modded(s: jax.Array, leaves: tuple[jax.Array, ...]) -> jax.Array:
            return jnp.asarray(bwd.value_mod_of(leaves)(s, *indices)).astype(acc)

        scores, mod_vjp = jax.vjp(modded, raw, float_leaves)
    else:
        scores = raw
    allowed = tile_allowed(config, inputs, i, j, indices, evaluate_masks=evaluate_masks)
    if allowed is not None:
        scores = jnp.where(allowed, scores, -jnp.inf)
    scores = scores.reshape(*bwd.row_shape, config.block_kv)
    probs = jnp.exp(scores - lse_tile[..., None])
    grad_probs = jnp.einsum("bkgqd,bksd->bkgqs", do_tile, v_tile, preferred_element_type=acc)
    dropped = probs
    if inputs.dropout_rng is not None:
        keep_scale = dropout_scale(
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
    dk_tile = dk_tile + jnp.einsum("bkgqs,bkgqd->bksd", mm_raw, q_tile, preferred_element_type=acc)
    return grad_query, dk_tile, dv_tile, grad_leaves


def _kv_block(
    bwd: _BackwardPass,
    q_first: jax.Array,
    q_last: jax.Array,
    float_leaves: tuple[jax.Array, ...],
    j: jax.Array,
    carry: GradState,
) -> GradState:
    """Run key block ``j`` over the query blocks that visit it; write its dK and dV."""
    config, inputs, acc = bwd.config, bwd.inputs, bwd.acc
    grad_query, grad_key, grad_value, grad_leaves = carry
    k_tile = jax.lax.dynamic_slice_in_dim(inputs.key, j * config.block_kv, config.block_kv, 2)
    v_tile = jax.lax.dynamic_slice_in_dim(inputs.value, j * config.block_kv, config.block_kv, 2)

    def q_block(i: jax.Array, state: GradState) -> GradState:
        new_state: GradState = jax.lax.switch(
            bwd.classes[i, j],
            [
                lambda s: s,
                lambda s: _tile(bwd, j, k_tile, v_tile, float_leaves, i, s, True),
                lambda s: _tile(bwd, j, k_tile, v_tile, float_leaves, i, s, False),
            ],
            state,
        )
        return new_state

    batch, num_kv_heads = bwd.row_shape[:2]
    tile_shape = (batch, num_kv_heads, config.block_kv, inputs.query.shape[-1])
    init: GradState = (
        grad_query,
        vary_like(jnp.zeros(tile_shape, acc), bwd.axes),
        vary_like(jnp.zeros(tile_shape, acc), bwd.axes),
        grad_leaves,
    )
    grad_query, dk_tile, dv_tile, grad_leaves = jax.lax.fori_loop(
        q_first[j], q_last[j], q_block, init
    )
    start = j * config.block_kv
    grad_key = jax.lax.dynamic_update_slice_in_dim(grad_key, dk_tile, start, 2)
    grad_value = jax.lax.dynamic_update_slice_in_dim(grad_value, dv_tile, start, 2)
    return grad_query, grad_key, grad_value, grad_leaves


def backward(
    config: Config,
    inputs: Inputs,
    value_leaves: tuple[jax.Array, ...],
    classes: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    grad_out: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, ...]]:
    """dQ (B, Hk, G, Tp, D), dK, dV (B, Hk, Sp, D) in float32 and the value-mod leaf grads."""
    query, key, value = inputs.query, inputs.key, inputs.value
    batch, num_kv_heads, group, _, head_dim = query.shape
    acc = accumulation_dtype(query.dtype)
    # delta_i = rowsum(dO_i * O_i) = rowsum(P_i * dP_i), also with dropout (FA2, Alg. 2).
    delta = jnp.sum(grad_out.astype(acc) * out.astype(acc), axis=-1)
    diff_flags = tuple(is_float(leaf) for leaf in value_leaves)
    q_first, q_last = visit_range((classes != BLOCK_EMPTY).T)
    axes = varying_axes(query, key, value, grad_out, *value_leaves)
    float_leaves = tuple(leaf for leaf, flag in zip(value_leaves, diff_flags) if flag)
    bwd = _BackwardPass(
        config=config,
        inputs=inputs,
        value_leaves=value_leaves,
        diff_flags=diff_flags,
        classes=classes,
        grad_out=grad_out,
        lse=lse,
        delta=delta,
        row_shape=(batch, num_kv_heads, group, config.block_q),
        acc=acc,
        axes=axes,
    )

    def kv_block(j: jax.Array, carry: GradState) -> GradState:
        return _kv_block(bwd, q_first, q_last, float_leaves, j, carry)

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
        next(float_iter).astype(leaf.dtype) if flag else zero_cotangent(leaf)
        for leaf, flag in zip(value_leaves, diff_flags)
    )
    return grad_query, grad_key, grad_value, grad_leaves


def attention_bwd(
    config: Config,
    residuals: tuple[Operands, jax.Array, jax.Array],
    grad_out: jax.Array,
) -> tuple[Any, ...]:
    """The custom_vjp's backward: cotangents of every operand (float0 for non-float ones)."""
    operands, out_padded, lse = residuals
    query, key, value, mask, mask_leaves, value_leaves, dropout_rng = operands
    batch, num_heads, seq_q, head_dim = query.shape
    num_kv_heads = key.shape[1]
    inputs = prepare(config, query, key, value, mask, mask_leaves, dropout_rng)
    classes = block_classes(config, batch, num_heads, mask, mask_leaves)
    grad_grouped = grad_out.reshape(batch, num_kv_heads, num_heads // num_kv_heads, seq_q, head_dim)
    grad_padded = pad_axis(grad_grouped, 3, config.padded_q)
    grad_query, grad_key, grad_value, grad_leaves = backward(
        config, inputs, value_leaves, classes, out_padded, lse, grad_padded
    )
    grad_query = grad_query[:, :, :, :seq_q].reshape(query.shape).astype(query.dtype)
    grad_key = grad_key[:, :, : config.seq_kv].astype(key.dtype)
    grad_value = grad_value[:, :, : config.seq_kv].astype(value.dtype)
    return (
        grad_query,
        grad_key,
        grad_value,
        None if mask is None else zero_cotangent(mask),
        tuple(zero_cotangent(leaf) for leaf in mask_leaves),
        grad_leaves,
        None if dropout_rng is None else zero_cotangent(dropout_rng),
    )
