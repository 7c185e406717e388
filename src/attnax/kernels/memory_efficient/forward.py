"""The forward pass: query blocks (outer loop) by key blocks (inner loop) with an online softmax.

Only the output and the per-row log-sum-exp are kept, so no (T, S) matrix ever exists.
"""

import dataclasses
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp

from ..._mods import BLOCK_EMPTY
from .._common import accumulation_dtype, vary_like, varying_axes
from .plan import Config, Inputs, Operands, block_classes, prepare, visit_range
from .tiles import dropout_scale, raw_scores, tile_allowed, tile_indices

# Running maximum, denominator and accumulator of one query block.
SoftmaxState = tuple[jax.Array, jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class _ForwardPass:
    """What every tile of one forward pass shares (traced values of the enclosing trace)."""

    config: Config
    inputs: Inputs
    value_mod: Any  # the rebuilt value mod, or None
    classes: jax.Array  # (NQ, NK) block classes
    kv_first: jax.Array  # (NQ,) first key block each query block visits
    kv_last: jax.Array  # (NQ,) one past its last
    row_shape: tuple[int, int, int, int]  # (B, Hk, G, block_q)
    acc: jnp.dtype
    axes: frozenset[Hashable]

    @property
    def num_heads(self) -> int:
        return self.row_shape[1] * self.row_shape[2]


def _tile(
    fwd: _ForwardPass,
    i: jax.Array,
    q_tile: jax.Array,
    j: jax.Array,
    state: SoftmaxState,
    evaluate_masks: bool,
) -> SoftmaxState:
    """One online-softmax step: fold key block ``j`` into query block ``i``'s running state."""
    config, inputs, acc = fwd.config, fwd.inputs, fwd.acc
    batch = fwd.row_shape[0]
    num_heads = fwd.num_heads
    row_max, denominator, accumulator = state
    k_tile = jax.lax.dynamic_slice_in_dim(inputs.key, j * config.block_kv, config.block_kv, 2)
    v_tile = jax.lax.dynamic_slice_in_dim(inputs.value, j * config.block_kv, config.block_kv, 2)
    indices = tile_indices(config, batch, num_heads, i, j)
    scores = raw_scores(config, q_tile, k_tile, acc)
    if fwd.value_mod is not None:
        scores = fwd.value_mod(scores, *indices).astype(acc)
    allowed = tile_allowed(config, inputs, i, j, indices, evaluate_masks=evaluate_masks)
    if allowed is not None:
        scores = jnp.where(allowed, scores, -jnp.inf)
    scores = scores.reshape(*fwd.row_shape, config.block_kv)
    new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))
    # Rows with nothing allowed so far keep max -inf; subtract 0 so exp() gives 0.
    safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    probs = jnp.exp(scores - safe_max[..., None])
    correction = jnp.exp(row_max - safe_max)
    denominator = correction * denominator + jnp.sum(probs, axis=-1)
    if inputs.dropout_rng is not None:
        probs = probs * dropout_scale(
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


def _query_block(
    fwd: _ForwardPass, i: jax.Array, carry: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """Run query block ``i`` over the key blocks it visits; write its output and log-sum-exp."""
    config = fwd.config
    out_all, lse_all = carry
    q_tile = jax.lax.dynamic_slice_in_dim(fwd.inputs.query, i * config.block_q, config.block_q, 3)

    def kv_block(j: jax.Array, state: SoftmaxState) -> SoftmaxState:
        new_state: SoftmaxState = jax.lax.switch(
            fwd.classes[i, j],
            [
                lambda s: s,
                lambda s: _tile(fwd, i, q_tile, j, s, True),
                lambda s: _tile(fwd, i, q_tile, j, s, False),
            ],
            state,
        )
        return new_state

    head_dim = fwd.inputs.query.shape[-1]
    init = (
        vary_like(jnp.full(fwd.row_shape, -jnp.inf, fwd.acc), fwd.axes),
        vary_like(jnp.zeros(fwd.row_shape, fwd.acc), fwd.axes),
        vary_like(jnp.zeros((*fwd.row_shape, head_dim), fwd.acc), fwd.axes),
    )
    row_max, denominator, accumulator = jax.lax.fori_loop(
        fwd.kv_first[i], fwd.kv_last[i], kv_block, init
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


def forward(
    config: Config,
    inputs: Inputs,
    value_leaves: tuple[jax.Array, ...],
    classes: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Padded output (B, Hk, G, Tp, D) in float32 and log-sum-exp (B, Hk, G, Tp)."""
    query, key, value = inputs.query, inputs.key, inputs.value
    batch, num_kv_heads, group, padded_q, head_dim = query.shape
    acc = accumulation_dtype(query.dtype)
    value_mod = config.value_mod.rebuild(value_leaves) if config.has_value_mod else None
    kv_first, kv_last = visit_range(classes != BLOCK_EMPTY)
    axes = varying_axes(query, key, value, *value_leaves)
    fwd = _ForwardPass(
        config=config,
        inputs=inputs,
        value_mod=value_mod,
        classes=classes,
        kv_first=kv_first,
        kv_last=kv_last,
        row_shape=(batch, num_kv_heads, group, config.block_q),
        acc=acc,
        axes=axes,
    )

    def query_block(
        i: jax.Array, carry: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        return _query_block(fwd, i, carry)

    init_out = vary_like(jnp.zeros((batch, num_kv_heads, group, padded_q, head_dim), acc), axes)
    init_lse = vary_like(jnp.zeros((batch, num_kv_heads, group, padded_q), acc), axes)
    out_lse: tuple[jax.Array, jax.Array] = jax.lax.fori_loop(
        0, config.num_q_blocks, query_block, (init_out, init_lse)
    )
    return out_lse


def attention_fwd(
    config: Config,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    mask_leaves: tuple[jax.Array, ...],
    value_leaves: tuple[jax.Array, ...],
    dropout_rng: jax.Array | None,
) -> tuple[jax.Array, tuple[Operands, jax.Array, jax.Array]]:
    """The custom_vjp's forward: the output and the residuals the backward recomputes from."""
    batch, num_heads, seq_q, head_dim = query.shape
    inputs = prepare(config, query, key, value, mask, mask_leaves, dropout_rng)
    classes = block_classes(config, batch, num_heads, mask, mask_leaves)
    out_padded, lse = forward(config, inputs, value_leaves, classes)
    out_padded = out_padded.astype(query.dtype)
    out = out_padded[:, :, :, :seq_q].reshape(batch, num_heads, seq_q, head_dim)
    operands: Operands = (query, key, value, mask, mask_leaves, value_leaves, dropout_rng)
    return out, (operands, out_padded, lse)
