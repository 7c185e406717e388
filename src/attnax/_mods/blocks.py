"""Block sparsity: each (query block, key block) tile classed empty, partial or full.

Block-sparse kernels skip empty tiles and skip the element-wise mask on full ones.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, Int8

from .._typing import AttentionMask, MaskMod
from .masks import AndMask, BlockOverlapMask

# Block classes in a block-sparsity map.
BLOCK_EMPTY = 0  # no allowed pair: never load or compute
BLOCK_PARTIAL = 1  # some pairs allowed: evaluate the mask element-wise
BLOCK_FULL = 2  # every real pair allowed: skip the mask evaluation


def block_sparsity(
    mask_mod: MaskMod,
    *,
    batch: int,
    num_heads: int,
    seq_q: int,
    seq_kv: int,
    block_q: int,
    block_kv: int,
) -> Int8[Array, "#B #H NQ NK"]:
    """Classify each (query block, key block) as empty (0), partial (1) or full (2).

    Mods with ``block_overlap`` are classified analytically in O(NQ * NK); other mask mods are
    evaluated one query block at a time (memory O(B * H * block_q * S)). Blocks that run past
    ``seq_q`` / ``seq_kv`` are classified on their real positions only: a kernel that pads must
    still exclude padded keys itself.
    """
    num_q_blocks = -(-seq_q // block_q)
    num_kv_blocks = -(-seq_kv // block_kv)
    q_lo = (jnp.arange(num_q_blocks) * block_q).reshape(1, 1, -1, 1)
    q_hi = jnp.minimum(q_lo + block_q, seq_q)
    kv_lo = (jnp.arange(num_kv_blocks) * block_kv).reshape(1, 1, 1, -1)
    kv_hi = jnp.minimum(kv_lo + block_kv, seq_kv)
    b_idx = jnp.arange(batch).reshape(-1, 1, 1, 1)
    h_idx = jnp.arange(num_heads).reshape(1, -1, 1, 1)
    analytic = isinstance(mask_mod, BlockOverlapMask) and not (
        isinstance(mask_mod, AndMask) and not mask_mod.has_block_overlap
    )
    if analytic:
        assert isinstance(mask_mod, BlockOverlapMask)
        any_allowed, all_allowed = mask_mod.block_overlap(b_idx, h_idx, q_lo, q_hi, kv_lo, kv_hi)
    else:
        dense = _dense_block_overlap(
            mask_mod, batch, num_heads, seq_q, seq_kv, block_q, block_kv
        )
        any_allowed, all_allowed = dense
    classes = jnp.where(all_allowed, BLOCK_FULL, jnp.where(any_allowed, BLOCK_PARTIAL, BLOCK_EMPTY))
    return jnp.asarray(classes, jnp.int8)


def _dense_block_overlap(
    mask_mod: MaskMod,
    batch: int,
    num_heads: int,
    seq_q: int,
    seq_kv: int,
    block_q: int,
    block_kv: int,
) -> tuple[Bool[Array, "B H NQ NK"], Bool[Array, "B H NQ NK"]]:
    num_q_blocks = -(-seq_q // block_q)
    num_kv_blocks = -(-seq_kv // block_kv)
    kv_pad = num_kv_blocks * block_kv
    b_idx = jnp.arange(batch).reshape(-1, 1, 1, 1)
    h_idx = jnp.arange(num_heads).reshape(1, -1, 1, 1)
    kv_idx = jnp.arange(kv_pad).reshape(1, 1, 1, -1)

    def one_query_block(q_block: Int[Array, ""]) -> tuple[Bool[Array, "B H NK"], Bool[Array, "B H NK"]]:
        q_idx = (q_block * block_q + jnp.arange(block_q)).reshape(1, 1, -1, 1)
        real = (q_idx < seq_q) & (kv_idx < seq_kv)
        allowed = jnp.broadcast_to(
            jnp.asarray(mask_mod(b_idx, h_idx, q_idx, kv_idx), bool),
            (batch, num_heads, block_q, kv_pad),
        )
        tiles = (allowed & real).reshape(batch, num_heads, block_q, num_kv_blocks, block_kv)
        full = (allowed | ~real).reshape(batch, num_heads, block_q, num_kv_blocks, block_kv)
        return jnp.any(tiles, axis=(2, 4)), jnp.all(full, axis=(2, 4))

    any_allowed, all_allowed = jax.lax.map(one_query_block, jnp.arange(num_q_blocks))
    # lax.map stacks along a new leading axis: (NQ, B, H, NK) -> (B, H, NQ, NK).
    return (
        jnp.moveaxis(any_allowed, 0, 2),
        jnp.moveaxis(all_allowed, 0, 2),
    )


def block_sparsity_from_mask(
    mask: AttentionMask, *, seq_q: int, seq_kv: int, block_q: int, block_kv: int
) -> Int8[Array, "#B #H NQ NK"]:
    """Block classes (see :func:`block_sparsity`) of a dense boolean mask."""
    mask = jnp.asarray(mask, bool)
    num_q_blocks = -(-seq_q // block_q)
    num_kv_blocks = -(-seq_kv // block_kv)
    lead = mask.shape[:2]
    full_shape = (*lead, seq_q, seq_kv)
    mask = jnp.broadcast_to(mask, full_shape)
    pad = ((0, 0), (0, 0), (0, num_q_blocks * block_q - seq_q), (0, num_kv_blocks * block_kv - seq_kv))
    padded_false = jnp.pad(mask, pad, constant_values=False)
    padded_true = jnp.pad(mask, pad, constant_values=True)
    tiles_shape = (*lead, num_q_blocks, block_q, num_kv_blocks, block_kv)
    any_allowed = jnp.any(padded_false.reshape(tiles_shape), axis=(3, 5))
    all_allowed = jnp.all(padded_true.reshape(tiles_shape), axis=(3, 5))
    classes = jnp.where(all_allowed, BLOCK_FULL, jnp.where(any_allowed, BLOCK_PARTIAL, BLOCK_EMPTY))
    return jnp.asarray(classes, jnp.int8)
