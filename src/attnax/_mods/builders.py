"""Dense boolean mask builders: a mask mod evaluated on the full grid, and the ``make_*`` masks."""

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from .._checks import positive_int
from .._typing import MaskMod
from .masks import CausalMask, SlidingWindowMask


def _tile_indices(
    batch: int, num_heads: int, seq_q: int, seq_kv: int
) -> tuple[Int[Array, "B 1 1 1"], Int[Array, "1 H 1 1"], Int[Array, "1 1 T 1"], Int[Array, "1 1 1 S"]]:
    return (
        jnp.arange(batch).reshape(batch, 1, 1, 1),
        jnp.arange(num_heads).reshape(1, num_heads, 1, 1),
        jnp.arange(seq_q).reshape(1, 1, seq_q, 1),
        jnp.arange(seq_kv).reshape(1, 1, 1, seq_kv),
    )


def mask_mod_to_boolean_mask(
    mask_mod: MaskMod, *, batch: int, num_heads: int, seq_q: int, seq_kv: int
) -> Bool[Array, "B H T S"]:
    """Evaluate a mask mod densely to a (batch, heads, seq_q, seq_kv) boolean mask.

    Args:
      mask_mod: any :class:`MaskMod`.
      batch: batch size.
      num_heads: number of heads.
      seq_q: query length.
      seq_kv: key length.

    Returns:
      A (batch, num_heads, seq_q, seq_kv) boolean array; True means attend.

    Raises:
      ValueError: when a size is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> def same_parity(b_idx, h_idx, q_idx, kv_idx):
      ...     return (q_idx % 2) == (kv_idx % 2)
      >>> mask = attnax.mask_mod_to_boolean_mask(
      ...     same_parity, batch=2, num_heads=1, seq_q=3, seq_kv=3)
      >>> mask.shape, mask.dtype
      ((2, 1, 3, 3), dtype('bool'))
      >>> mask[0, 0].astype(int).tolist()
      [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    """
    for value, name in ((batch, "batch"), (num_heads, "num_heads"), (seq_q, "seq_q"), (seq_kv, "seq_kv")):
        positive_int(value, name)
    b, h, q, kv = _tile_indices(batch, num_heads, seq_q, seq_kv)
    allowed = jnp.asarray(mask_mod(b, h, q, kv), dtype=bool)
    return jnp.broadcast_to(allowed, (batch, num_heads, seq_q, seq_kv))


def make_causal_mask(seq: int) -> Bool[Array, "1 1 T T"]:
    """A (1, 1, seq, seq) lower-triangular mask.

    Args:
      seq: sequence length.

    Returns:
      (1, 1, seq, seq) boolean, True on and below the diagonal.

    Raises:
      ValueError: when ``seq`` is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mask = attnax.make_causal_mask(3)
      >>> mask.shape
      (1, 1, 3, 3)
      >>> mask[0, 0].astype(int).tolist()
      [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    positive_int(seq, "seq")
    return mask_mod_to_boolean_mask(CausalMask(), batch=1, num_heads=1, seq_q=seq, seq_kv=seq)


def make_sliding_window_mask(
    seq: int, *, window_size: int, causal: bool = True
) -> Bool[Array, "1 1 T T"]:
    """A (1, 1, seq, seq) sliding-window mask; see :class:`SlidingWindowMask`.

    Args:
      seq: sequence length.
      window_size: keys closer than this many positions are kept (the query itself counts).
      causal: keep only keys at or before the query.

    Returns:
      (1, 1, seq, seq) boolean; True means attend.

    Raises:
      ValueError: when ``seq`` or ``window_size`` is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mask = attnax.make_sliding_window_mask(4, window_size=2, causal=False)
      >>> mask[0, 0].astype(int).tolist()
      [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    """
    positive_int(seq, "seq")
    return mask_mod_to_boolean_mask(
        SlidingWindowMask(window_size, causal), batch=1, num_heads=1, seq_q=seq, seq_kv=seq
    )


def make_padding_mask(ids: Int[Array, "B S"], pad_token_id: int) -> Bool[Array, "B 1 1 S"]:
    """Key-padding mask (batch, 1, 1, seq): False where ``ids == pad_token_id``.

    Args:
      ids: (batch, seq) token ids.
      pad_token_id: the id of padding tokens.

    Returns:
      (batch, 1, 1, seq) boolean, False at padding keys.

    Raises:
      ValueError: when ``ids`` is not rank 2.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mask = attnax.make_padding_mask(jnp.array([[5, 7, 0, 0]]), pad_token_id=0)
      >>> mask.shape
      (1, 1, 1, 4)
      >>> mask[0, 0, 0].tolist()
      [True, True, False, False]
    """
    ids = jnp.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"`ids` must have shape (batch, seq), got {ids.shape}.")
    return (ids != pad_token_id)[:, None, None, :]


def make_document_mask(document_ids: Int[Array, "B T"]) -> Bool[Array, "B 1 T T"]:
    """Block-diagonal mask (batch, 1, seq, seq) from packed-sequence document ids.

    Args:
      document_ids: (batch, seq) int document id of every position.

    Returns:
      (batch, 1, seq, seq) boolean, True where query and key share a document.

    Raises:
      ValueError: when ``document_ids`` is not rank 2.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mask = attnax.make_document_mask(jnp.array([[0, 0, 1]]))
      >>> mask.shape
      (1, 1, 3, 3)
      >>> mask[0, 0].astype(int).tolist()
      [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """
    document_ids = jnp.asarray(document_ids)
    if document_ids.ndim != 2:
        raise ValueError(f"`document_ids` must have shape (batch, seq), got {document_ids.shape}.")
    return (document_ids[:, :, None] == document_ids[:, None, :])[:, None]
