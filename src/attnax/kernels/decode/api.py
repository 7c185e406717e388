"""The public entry of contiguous-cache decoding: :func:`decode_attention`.

Positions are absolute: key ``j`` of row ``b`` sits at position ``j`` and query ``i`` at
``q_offset[b] + i`` (by default ``lengths[b] - T + i``: the new tokens are the last ``T`` of
each row). Keys at or beyond ``lengths[b]`` are never attended; ``causal=True`` (the default)
adds ``kv <= q``, ``attention_window=w`` adds ``q - kv < w`` and skips the tiles before the
window. Score mods see the same absolute positions.
"""

from jaxtyping import Array, Int

from ..._checks import shape_checked
from ..._typing import AttentionOutput, KeyArray, QueryArray, ScoreMod, ValueArray
from .._common import default_scale
from .._dtypes import promote_floats
from .checks import check_contiguous_arguments, pallas_unsupported_reason, resolve_use_pallas
from .pallas import pallas_contiguous
from .plan import cache_tile, query_tile_rows
from .xla import xla_contiguous

__all__ = ["decode_attention"]


# Over 100 lines: half of it is the docstring; the body is one check and two dispatches that
# pass every argument by name.
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
      (batch, heads, seq_q, head_dim) in the promoted dtype of query, keys and values (the
      query's, when the cache shares it); float32 softmax and accumulation.
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
    # The dtype rule and mixed-float promotion every kernel applies (a cache narrower than the
    # query is upcast here, a copy per call: keep the cache in the query's dtype to avoid it).
    query, keys, values = promote_floats(name, query=query, keys=keys, values=values)
    check_contiguous_arguments(
        query,
        keys,
        values,
        lengths,
        q_offset,
        attention_window=attention_window,
        num_splits=num_splits,
        block_kv=block_kv,
        name=name,
    )
    _, num_heads, seq_q, head_dim = query.shape
    num_kv_heads, cache_len = keys.shape[1], keys.shape[2]
    scale_value = default_scale(head_dim, scale)
    offsets = lengths - seq_q if q_offset is None else q_offset
    rows = query_tile_rows(num_heads, num_kv_heads, seq_q)
    tile = cache_tile(block_kv, cache_len)
    reason = pallas_unsupported_reason(head_dim=head_dim, rows=rows, tile=tile, score_mod=score_mod)
    if reason is None and cache_len % tile != 0:
        reason = f"max_len {cache_len} is not a multiple of 16"
    if resolve_use_pallas(use_pallas, interpret, reason, name=name):
        return pallas_contiguous(
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
    return xla_contiguous(
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
