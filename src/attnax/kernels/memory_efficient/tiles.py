"""What one (query block, key block) tile needs in both passes: absolute indices, the mask,
the dropout scale and the scaled scores."""

import jax
import jax.numpy as jnp

from .plan import Config, Inputs


def tile_indices(
    config: Config, batch: int, num_heads: int, q_block: jax.Array, kv_block: jax.Array
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


def tile_allowed(
    config: Config,
    inputs: Inputs,
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


def dropout_scale(
    config: Config, rng: jax.Array, q_block: jax.Array, kv_block: jax.Array, shape: tuple[int, ...]
) -> jax.Array:
    """keep / (1 - rate) for one tile; the same key (hence mask) in the forward and backward."""
    tile_key = jax.random.fold_in(jax.random.fold_in(rng, q_block), kv_block)
    keep = jax.random.bernoulli(tile_key, 1.0 - config.dropout_rate, shape)
    return jnp.where(keep, 1.0 / (1.0 - config.dropout_rate), 0.0)


def raw_scores(config: Config, q_tile: jax.Array, k_tile: jax.Array, acc: jnp.dtype) -> jax.Array:
    """Scaled scores of one tile as (B, H, block_q, block_kv)."""
    batch, num_kv_heads, group, block_q, _ = q_tile.shape
    scores = jnp.einsum("bkgqd,bksd->bkgqs", q_tile, k_tile, preferred_element_type=acc)
    scores = scores * jnp.asarray(config.scale, acc)
    return scores.reshape(batch, num_kv_heads * group, block_q, k_tile.shape[2])
