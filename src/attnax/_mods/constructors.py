"""The public constructors of built-in score mods (``causal_mod``, ``alibi_mod``, ...)."""

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .._typing import MaskMod
from .masks import CausalMask, DocumentMask, PrefixLMMask, SlidingWindowMask
from .values import AdditiveBiasMod, AlibiMod, MaskScoreMod, SoftcapMod


def causal_mod() -> MaskScoreMod:
    """Causal masking as a score mod (kernels skip the blocks above the diagonal).

    Returns:
      A :class:`MaskScoreMod` over ``q_idx >= kv_idx``.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> out = attnax.standard_attention(q, q, q, score_mod=attnax.causal_mod())
      >>> bool(jnp.allclose(out[:, :, 0], q[:, :, 0]))  # the first query sees only itself
      True
    """
    return MaskScoreMod(CausalMask())


def sliding_window_mod(window_size: int, *, causal: bool = True) -> MaskScoreMod:
    """Sliding-window masking; see :class:`SlidingWindowMask`.

    Args:
      window_size: keys closer than this many positions are kept (the query itself counts).
      causal: keep only keys at or before the query.

    Returns:
      A :class:`MaskScoreMod` over a :class:`SlidingWindowMask`.

    Raises:
      ValueError: when ``window_size`` is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mask_mod, _ = attnax.split_score_mod(attnax.sliding_window_mod(2))
      >>> mask = attnax.mask_mod_to_boolean_mask(mask_mod, batch=1, num_heads=1, seq_q=4, seq_kv=4)
      >>> mask[0, 0].astype(int).tolist()
      [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    return MaskScoreMod(SlidingWindowMask(window_size, causal))


def alibi_slopes(num_heads: int) -> Float[Array, " H"]:
    """The ALiBi paper's per-head slopes (geometric; interleaved for non-powers of two).

    Args:
      num_heads: number of query heads.

    Returns:
      (num_heads,) float32 slopes.

    Raises:
      ValueError: when ``num_heads`` is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> attnax.alibi_slopes(4).tolist()
      [0.25, 0.0625, 0.015625, 0.00390625]
    """
    return AlibiMod(num_heads).slope(jnp.arange(num_heads))


def alibi_mod(num_heads: int) -> AlibiMod:
    """ALiBi position bias; see :class:`AlibiMod`.

    Args:
      num_heads: number of query heads (the slopes depend on it).

    Returns:
      An :class:`AlibiMod` (a value mod: it masks nothing).

    Raises:
      ValueError: when ``num_heads`` is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mod = attnax.alibi_mod(4)
      >>> scores = jnp.zeros((1, 4, 1, 3))  # query 2 against keys 0, 1, 2
      >>> b, h = jnp.arange(1).reshape(1, 1, 1, 1), jnp.arange(4).reshape(1, 4, 1, 1)
      >>> q_idx, kv_idx = jnp.full((1, 1, 1, 1), 2), jnp.arange(3).reshape(1, 1, 1, 3)
      >>> mod(scores, b, h, q_idx, kv_idx)[0, 0, 0].tolist()  # head 0: slope 1/4
      [-0.5, -0.25, 0.0]
    """
    return AlibiMod(num_heads)


def prefix_lm_mod(prefix_lengths: Int[Array, " B"]) -> MaskScoreMod:
    """Prefix-LM masking with one prefix length per batch row.

    Args:
      prefix_lengths: (batch,) int; row ``b`` sees its first ``prefix_lengths[b]`` keys from
        every query, the rest causally.

    Returns:
      A :class:`MaskScoreMod` over a :class:`PrefixLMMask`.

    Raises:
      ValueError: when ``prefix_lengths`` is not rank 1.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mod = attnax.prefix_lm_mod(jnp.array([2]))  # the first 2 keys are visible to all
      >>> mask_mod, _ = attnax.split_score_mod(mod)
      >>> mask = attnax.mask_mod_to_boolean_mask(mask_mod, batch=1, num_heads=1, seq_q=4, seq_kv=4)
      >>> mask[0, 0].astype(int).tolist()
      [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    """
    prefix_lengths = jnp.asarray(prefix_lengths)
    if prefix_lengths.ndim != 1:
        raise ValueError(
            f"`prefix_lengths` must have shape (batch,), got {prefix_lengths.shape}."
        )
    return MaskScoreMod(PrefixLMMask(prefix_lengths))


def document_mask_mod(
    document_ids: Int[Array, "B T"], kv_document_ids: Int[Array, "B S"] | None = None
) -> MaskScoreMod:
    """Packed-sequence masking from (batch, seq) document ids.

    Args:
      document_ids: (batch, seq_q) int document id of every query position.
      kv_document_ids: (batch, seq_kv) ids of the keys; defaults to ``document_ids``
        (self-attention).

    Returns:
      A :class:`MaskScoreMod` over a :class:`DocumentMask`.

    Raises:
      ValueError: when the ids are not (batch, seq) arrays with one batch size.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mod = attnax.document_mask_mod(jnp.array([[0, 0, 1, 1]]))  # two packed documents
      >>> mask_mod, _ = attnax.split_score_mod(mod)
      >>> mask = attnax.mask_mod_to_boolean_mask(mask_mod, batch=1, num_heads=1, seq_q=4, seq_kv=4)
      >>> mask[0, 0].astype(int).tolist()
      [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    """
    document_ids = jnp.asarray(document_ids)
    kv_ids = document_ids if kv_document_ids is None else jnp.asarray(kv_document_ids)
    if document_ids.ndim != 2 or kv_ids.ndim != 2 or kv_ids.shape[0] != document_ids.shape[0]:
        raise ValueError(
            "`document_ids` must have shape (batch, seq) (and `kv_document_ids` (batch, seq_kv)), "
            f"got {document_ids.shape} and {kv_ids.shape}."
        )
    return MaskScoreMod(DocumentMask(document_ids, kv_ids))


def additive_bias_mod(bias: Float[Array, "#B #H #T #S"]) -> AdditiveBiasMod:
    """Add a (differentiable) bias broadcastable to (batch, heads, seq_q, seq_kv).

    Args:
      bias: float, rank 4, broadcastable to (batch, heads, seq_q, seq_kv).

    Returns:
      An :class:`AdditiveBiasMod` whose bias is a pytree leaf (it receives gradients).

    Raises:
      ValueError: when ``bias`` is not rank 4.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 4, 4))
      >>> bias = jnp.zeros((1, 1, 4, 4))  # shared by the batch and the heads
      >>> def loss(bias):
      ...     out = attnax.standard_attention(q, q, q, score_mod=attnax.additive_bias_mod(bias))
      ...     return jnp.sum(out ** 2)
      >>> jax.jit(jax.grad(loss))(bias).shape  # the bias is differentiable
      (1, 1, 4, 4)
    """
    bias = jnp.asarray(bias)
    if bias.ndim != 4:
        raise ValueError(
            f"`bias` must be rank 4, broadcastable to (batch, heads, seq_q, seq_kv); got shape "
            f"{bias.shape}. Add leading axes of size 1."
        )
    return AdditiveBiasMod(bias)


def softcap_mod(cap: float) -> SoftcapMod:
    """Soft-capping ``cap * tanh(s / cap)``.

    Args:
      cap: the positive, finite bound of the scores.

    Returns:
      A :class:`SoftcapMod`.

    Raises:
      ValueError: when ``cap`` is not positive and finite.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> mod = attnax.softcap_mod(2.0)
      >>> index = jnp.zeros((), jnp.int32)
      >>> capped = mod(jnp.array([0.0, 1.0, 100.0]), index, index, index, index)
      >>> [round(float(s), 4) for s in capped]
      [0.0, 0.9242, 2.0]
    """
    return SoftcapMod(float(cap))


def mask_mod_to_score_mod(mask_mod: MaskMod) -> MaskScoreMod:
    """Turn a mask mod into a masking score mod (kernels can still see the mask).

    Args:
      mask_mod: any :class:`MaskMod`.

    Returns:
      A :class:`MaskScoreMod` that sets disallowed scores to ``-inf``.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> def local(b_idx, h_idx, q_idx, kv_idx):
      ...     return jnp.abs(q_idx - kv_idx) <= 1
      >>> score_mod = attnax.mask_mod_to_score_mod(local)
      >>> attnax.split_score_mod(score_mod)[0] is local  # kernels can still skip blocks
      True
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> attnax.standard_attention(q, q, q, score_mod=score_mod).shape
      (1, 2, 8, 4)
    """
    return MaskScoreMod(mask_mod)
