"""The public entries of ring attention: :func:`ring_attention` inside ``shard_map`` and
:func:`sharded_ring_attention` on global arrays.

Inside :func:`jax.shard_map`, with the sequence axis (axis 2 of ``(B, H, T, D)``) of query, key
and value sharded over ``axis_name``, every device keeps its query shard and the key/value
shards travel around the ring (Liu et al., "Ring Attention with Blockwise Transformers for
Near-Infinite Context", 2023). :func:`ring_attention` validates the call, plans it
(:mod:`attnax.kernels.ring.plan`) and runs one of three rings: one cuDNN call per shard pair
(:mod:`attnax.kernels.ring.cudnn`), PALLAS_FLASH kernels per pair
(:mod:`attnax.kernels.ring.pallas`) or blockwise XLA tiles, which take any score mod
(:mod:`attnax.kernels.ring.xla`).
"""

from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
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
from .._common import default_scale
from .._dtypes import promote_qkv
from .._fallback import fallback
from .layout import RingLayout, check_divides, check_layout, from_ring_layout, to_ring_layout
from .plan import (
    FusedPairs,
    bound_axis_size,
    check_ring_arguments,
    check_ring_shards,
    pair_ring_for,
)
from .xla import blockwise_ring


# Over 100 lines with its docstring, which is the public contract (72 lines); the body only
# validates (plan.py), falls back to one device or runs the ring (_run_ring).
@shape_checked
def ring_attention(
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
    fused_pairs: FusedPairs = None,
) -> AttentionOutput:
    r"""Exact softmax attention over a sequence sharded on mesh axis ``axis_name``.

    Call it inside :func:`jax.shard_map` with axis 2 (the sequence) of query, key, value (and a
    key-padding mask) sharded over ``axis_name``, in the order of ``layout`` (see
    :func:`to_ring_layout`). Each device returns the output rows of its own queries. Score
    and mask mods see global positions; key/value shards and their gradients rotate with
    ``lax.ppermute`` (``P`` steps forward, ``P`` steps backward); memory per device is
    ``O(T / P)``.

    Without ``axis_name``, or with one that no enclosing ``shard_map``/``pmap`` binds, this is
    single-device attention on the arrays given (``memory_efficient_attention``, the fallback the
    backend table registers; dropout and any dense mask supported there).

    Args:
      query: local shard (batch, heads, seq_q / P, head_dim).
      key: local shard (batch, kv_heads, seq_kv / P, head_dim); ``kv_heads`` divides
        ``heads``; only these heads travel the ring (GQA is never repeated).
      value: like ``key``.
      axis_name: the mesh axis the sequence is sharded over.
      mask: in the ring, a key-padding mask broadcastable to (batch, heads, 1, seq_kv / P),
        sharded like the keys (it travels with them). Dense (T, S) masks raise
        ``NotImplementedError``; use a mask mod instead.
      score_mod: applied to scaled scores with global (batch, head, query, key) positions;
        masking mods (causal, window, prefix, document) also skip tiles and whole shard pairs.
      dropout_rng: dropout key (local path only).
      dropout_rate: dropout probability (local path only; the ring raises for active dropout).
      deterministic: no dropout when True.
      layout: "contiguous", "zigzag" (device ``i`` holds chunks ``i`` and ``2P - 1 - i``) or
        "striped" (device ``i`` holds ``i, i + P, ...``); balanced layouts even out causal work.
      block_size: tile size of the blockwise compute (per device, in tokens); unused by the
        fused pairs.
      scale: score scale, ``1 / sqrt(head_dim)`` by default.
      fused_pairs: how each (query shard, key shard) pair is computed. ``None`` (default):
        one cuDNN flash call per pair whenever the call qualifies (an NVIDIA GPU, bf16/fp16,
        no mask, a score mod that is None or causal, equal query and key shard lengths, layout
        zigzag or contiguous under causal; backward from the global log-sum-exp, see
        :mod:`attnax.kernels.ring.cudnn`), else blockwise XLA tiles, which take any score
        mod. ``False``: always XLA tiles. ``True`` or ``"cudnn"``: cuDNN pairs or
        ``NotImplementedError`` with the reason. ``"pallas"``: PALLAS_FLASH kernels per pair
        (:mod:`attnax.kernels.ring.pallas`; a GPU, no mask, a score mod that is None or
        causal, equal shard lengths, layout zigzag or contiguous under causal): slower than
        cuDNN but the leanest in memory (gradients accumulated in place, no cuDNN workspace),
        so it trains the longest sequences: on two H100s about 7.2 (B, H, T/P, D) arrays per
        device in a causal training step against 13.0 for the cuDNN pairs, at 0.7-0.8x their
        speed (benchmarks/NOTES.md, Ring); ``NotImplementedError`` with the reason otherwise.

    Returns:
      (batch, heads, seq_q / P, head_dim) in the query's dtype: this device's output rows.
      Rows with no allowed key are zeros with finite gradients.

    Raises:
      ValueError: bad shapes, dropout arguments, layout or block size; a zigzag shard of odd
        length.
      NotImplementedError: active dropout or a dense query-dependent mask in the ring;
        ``fused_pairs=True`` for a call the fused pairs cannot serve.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> from jax.sharding import Mesh, PartitionSpec
      >>> mesh = Mesh(jax.devices()[:2], ("seq",))  # needs 2 devices
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> kv = jax.random.normal(jax.random.key(1), (1, 2, 8, 4))
      >>> spec = PartitionSpec(None, None, "seq", None)  # shard the sequence axis
      >>> ring = jax.jit(jax.shard_map(
      ...     lambda q, k, v: attnax.ring_attention(
      ...         q, k, v, axis_name="seq", score_mod=attnax.causal_mod()),
      ...     mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec))
      >>> out = ring(q, kv, kv)  # contiguous layout: no reordering needed
      >>> ref = attnax.standard_attention(q, kv, kv, score_mod=attnax.causal_mod())
      >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
      ((1, 2, 8, 4), True)
    """
    name = "ring_attention"
    query, key, value = promote_qkv(query, key, value, name=name)
    dropout_active = check_ring_arguments(
        query,
        key,
        value,
        mask=mask,
        dropout_rng=dropout_rng,
        dropout_rate=dropout_rate,
        deterministic=deterministic,
        layout=layout,
        block_size=block_size,
        name=name,
    )
    num_shards = bound_axis_size(axis_name)
    if num_shards is None or num_shards == 1:
        # The single-device path: no ring to run; the backend table names what serves it
        # (MEMORY_EFFICIENT), so this kernel imports no other kernel.
        single_device: AttentionOutput = fallback("ring_attention")(
            query,
            key,
            value,
            mask=mask,
            score_mod=score_mod,
            dropout_rng=dropout_rng,
            dropout_rate=dropout_rate,
            deterministic=deterministic,
            block_size=block_size,
            scale=scale,
        )
        return single_device
    key_mask = check_ring_shards(
        query,
        key,
        mask=mask,
        dropout_active=dropout_active,
        layout=layout,
        num_shards=num_shards,
        fused_pairs=fused_pairs,
        name=name,
    )
    return _run_ring(
        query,
        key,
        value,
        key_mask,
        score_mod,
        axis_name=axis_name,
        num_shards=num_shards,
        layout=layout,
        block_size=block_size,
        scale=default_scale(query.shape[-1], scale),
        fused_pairs=fused_pairs,
        name=name,
    )


def _run_ring(
    query: Array,
    key: Array,
    value: Array,
    key_mask: Array | None,
    score_mod: ScoreMod | None,
    *,
    axis_name: Hashable,
    num_shards: int,
    layout: str,
    block_size: int,
    scale: float,
    fused_pairs: FusedPairs,
    name: str,
) -> Array:
    """Run the fused pair ring :func:`pair_ring_for` picks, else the XLA tiles."""
    pair_ring = pair_ring_for(
        query,
        key,
        value,
        key_mask=key_mask,
        score_mod=score_mod,
        layout=layout,
        fused_pairs=fused_pairs,
        name=name,
    )
    if pair_ring is not None:
        return pair_ring(
            query,
            key,
            value,
            axis_name=axis_name,
            num_shards=num_shards,
            layout=layout,
            scale=scale,
        )
    return blockwise_ring(
        query,
        key,
        value,
        key_mask,
        score_mod,
        axis_name=axis_name,
        num_shards=num_shards,
        layout=layout,
        scale=scale,
        block_size=block_size,
    )


def _check_sharded_call(
    query: Array,
    key: Array,
    *,
    mesh: Mesh,
    axis_name: str,
    mask: AttentionMask | None,
    layout: str,
    name: str,
) -> int:
    """The size of ``mesh[axis_name]`` once the global arrays are known to shard over it."""
    if axis_name not in mesh.shape:
        raise ValueError(
            f"{name}: `axis_name` {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}."
        )
    num_shards = int(mesh.shape[axis_name])
    check_layout(layout, name=name)
    check_divides(query.shape[2], num_shards, layout, name=name, what="query sequence")
    check_divides(key.shape[2], num_shards, layout, name=name, what="key/value sequence")
    if mask is not None and mask.ndim == 4 and mask.shape[2] != 1:
        raise NotImplementedError(
            f"{name}: only key-padding masks (batch, 1, 1, seq_kv) travel the ring; got "
            f"{mask.shape}. Use a mask mod for query-dependent masking."
        )
    return num_shards


# Over 100 lines only through its docstring, the public contract; the body is short.
def sharded_ring_attention(
    query: QueryArray,
    key: KeyArray,
    value: ValueArray,
    *,
    mesh: Mesh,
    axis_name: str,
    mask: AttentionMask | None = None,
    score_mod: ScoreMod | None = None,
    layout: RingLayout = "contiguous",
    block_size: int = 512,
    scale: float | None = None,
    batch_axis: str | None = None,
    fused_pairs: FusedPairs = None,
) -> AttentionOutput:
    """Run :func:`ring_attention` on global (unsharded-order) arrays over ``mesh[axis_name]``.

    A convenience wrapper: permutes the sequences into ``layout`` order, shards them with
    :func:`jax.shard_map` (sequence over ``axis_name``, batch over ``batch_axis`` if given),
    runs the ring and restores the global order. ``mask`` must be a key-padding mask
    (batch, 1, 1, seq_kv) or None. ``score_mod`` arrays are replicated.

    Args:
      query: (batch, heads, seq_q, head_dim) in global order.
      key: (batch, kv_heads, seq_kv, head_dim); ``kv_heads`` divides ``heads``.
      value: like ``key``.
      mesh: the device mesh.
      axis_name: the mesh axis to shard the sequence over.
      mask: a key-padding mask (batch, 1, 1, seq_kv), or None.
      score_mod: applied with global positions (masking mods also skip work).
      layout: "contiguous", "zigzag" or "striped" (see :func:`to_ring_layout`).
      block_size: tile size of the per-device blockwise compute.
      scale: score scale, ``1 / sqrt(head_dim)`` by default.
      batch_axis: optional mesh axis to shard the batch over.
      fused_pairs: how each shard pair is computed, as in :func:`ring_attention`
        (``"pallas"``: the leanest in memory).

    Returns:
      (batch, heads, seq_q, head_dim) in global order and the query's dtype.

    Raises:
      ValueError: when the mesh axis size does not divide the sequence lengths (zigzag: twice
        the axis size), or ``axis_name`` is not an axis of ``mesh``.
      NotImplementedError: for a ``mask`` that is not a key-padding mask.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> from jax.sharding import Mesh
      >>> mesh = Mesh(jax.devices()[:2], ("seq",))  # needs 2 devices
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> kv = jax.random.normal(jax.random.key(1), (1, 2, 8, 4))
      >>> @jax.jit
      ... def zigzag_causal(q, k, v):
      ...     return attnax.sharded_ring_attention(
      ...         q, k, v, mesh=mesh, axis_name="seq", layout="zigzag",
      ...         score_mod=attnax.causal_mod())
      >>> out = zigzag_causal(q, kv, kv)
      >>> ref = attnax.standard_attention(q, kv, kv, score_mod=attnax.causal_mod())
      >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
      ((1, 2, 8, 4), True)
    """
    name = "sharded_ring_attention"
    num_shards = _check_sharded_call(
        query, key, mesh=mesh, axis_name=axis_name, mask=mask, layout=layout, name=name
    )
    seq_spec = PartitionSpec(batch_axis, None, axis_name, None)  # type: ignore[no-untyped-call]
    q = to_ring_layout(query, num_shards, layout)
    k = to_ring_layout(key, num_shards, layout)
    v = to_ring_layout(value, num_shards, layout)
    mask_in = None
    mask_spec: PartitionSpec | None = None
    if mask is not None:
        full_mask = jnp.broadcast_to(mask, (*mask.shape[:3], key.shape[2]))
        mask_in = to_ring_layout(full_mask, num_shards, layout, axis=3)
        mask_spec = PartitionSpec(  # type: ignore[no-untyped-call]
            batch_axis if mask.shape[0] != 1 else None, None, None, axis_name
        )

    # The score mod is closed over (replicated): it may be a plain callable, not a pytree.
    def body(q: Array, k: Array, v: Array, m: Array | None) -> Array:
        return ring_attention(
            q,
            k,
            v,
            axis_name=axis_name,
            mask=m,
            score_mod=score_mod,
            layout=layout,
            block_size=block_size,
            scale=scale,
            fused_pairs=fused_pairs,
        )

    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(seq_spec, seq_spec, seq_spec, mask_spec),
        out_specs=seq_spec,
    )
    out = mapped(q, k, v, mask_in)
    return from_ring_layout(out, num_shards, layout)
