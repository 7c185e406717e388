"""The ring's reference: :func:`ring_attention`'s math on the gathered global sequence."""

from collections.abc import Hashable

import jax
from jaxtyping import Array

from ..._checks import shape_checked
from ..._typing import (
    AttentionMask,
    AttentionOutput,
    KeyArray,
    PRNGKeyArray,
    QueryArray,
    ScoreMod,
    ValueArray,
)
from .._common import check_dropout, check_mask, check_qkv
from .._standard import standard_attention
from .layout import RingLayout, check_layout, from_ring_layout, to_ring_layout
from .plan import bound_axis_size, ring_key_mask


@shape_checked
def ring_attention_reference(
    query: QueryArray,
    key: KeyArray,
    value: ValueArray,
    *,
    axis_name: Hashable | None = None,
    mask: AttentionMask | None = None,
    score_mod: ScoreMod | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    layout: RingLayout = "contiguous",
    block_size: int = 512,
    scale: float | None = None,
) -> AttentionOutput:
    """:func:`ring_attention`'s math on the gathered global sequence (for tests and docs).

    Inside shard_map it all-gathers query, key, value (and a key-padding mask) along the
    sequence, puts them back into global order, runs :func:`standard_attention` at
    ``precision=HIGHEST`` and returns this device's rows. Memory is ``O(T * S)``: a reference,
    not a kernel. ``block_size`` is accepted for signature parity and ignored.

    Args:
      query: local shard (batch, heads, seq_q / P, head_dim), or the whole query outside
        ``shard_map``.
      key: local shard (batch, kv_heads, seq_kv / P, head_dim).
      value: like ``key``.
      axis_name: the mesh axis the sequence is sharded over.
      mask: a key-padding mask sharded like the keys, as in :func:`ring_attention`.
      score_mod: applied with global positions.
      dropout_rng: dropout key (local path only).
      dropout_rate: dropout probability (local path only).
      deterministic: no dropout when True.
      layout: the shards' order, as in :func:`ring_attention`.
      block_size: ignored.
      scale: score scale, ``1 / sqrt(head_dim)`` by default.

    Returns:
      (batch, heads, seq_q / P, head_dim): this device's output rows.

    Raises:
      ValueError, NotImplementedError: as :func:`ring_attention`.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> # Outside shard_map it is standard attention on the arrays given:
      >>> out = attnax.ring_attention_reference(q, q, q, score_mod=attnax.causal_mod())
      >>> ref = attnax.standard_attention(q, q, q, score_mod=attnax.causal_mod())
      >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
      ((1, 2, 8, 4), True)
    """
    name = "ring_attention_reference"
    query, key, value = check_qkv(query, key, value, name=name)
    check_mask(mask, query, key, name=name)
    check_layout(layout, name=name)
    num_shards = bound_axis_size(axis_name)
    if num_shards is None or num_shards == 1:
        return standard_attention(
            query,
            key,
            value,
            mask=mask,
            score_mod=score_mod,
            dropout_rng=dropout_rng,
            dropout_rate=dropout_rate,
            deterministic=deterministic,
            scale=scale,
            precision=jax.lax.Precision.HIGHEST,
        )
    if check_dropout(dropout_rate, dropout_rng, deterministic, name=name):
        raise NotImplementedError(f"{name}: dropout is not implemented in the ring.")
    key_mask = ring_key_mask(mask, query, key, name=name)

    def gather(x: Array, axis: int) -> Array:
        full = jax.lax.all_gather(x, axis_name, axis=axis, tiled=True)
        return from_ring_layout(full, num_shards, layout, axis=axis)

    global_mask = None
    if key_mask is not None:
        global_mask = gather(key_mask, 3)
    out = standard_attention(
        gather(query, 2),
        gather(key, 2),
        gather(value, 2),
        mask=global_mask,
        score_mod=score_mod,
        scale=scale,
        precision=jax.lax.Precision.HIGHEST,
    )
    ordered = to_ring_layout(out, num_shards, layout, axis=2)
    me = jax.lax.axis_index(axis_name)
    seq_q = query.shape[2]
    return jax.lax.dynamic_slice_in_dim(ordered, me * seq_q, seq_q, axis=2)
