r"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Softmax is replaced by the positive feature map :math:`\phi(x) = \mathrm{elu}(x) + 1`, so
attention factorises through a (head_dim × head_dim) state per head and never forms the
(T, S) score matrix:

.. math::

    o_t = \frac{\phi(s\,q_t)^\top \sum_{s' \in A(t)} \phi(k_{s'})\, v_{s'}^\top}
               {\phi(s\,q_t)^\top \sum_{s' \in A(t)} \phi(k_{s'})}

where :math:`A(t)` is the set of allowed keys (all unpadded keys, and only those up to
:math:`t` when causal) and :math:`s` the query scale.

The causal form is chunkwise parallel: inside a chunk of ``chunk_size`` positions a masked
(chunk × chunk) quadratic term, across chunks the (D × D) state of all earlier chunks.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .._checks import shape_checked
from .._typing import (
    AttentionMask,
    AttentionOutput,
    KeyArray,
    PRNGKeyArray,
    QueryArray,
    ScoreMod,
    ValueArray,
)
from ._common import accumulation_dtype, check_dropout, check_mask, check_qkv

__all__ = ["linear_attention"]


def key_padding_mask(
    mask: AttentionMask | None, query: Array, key: Array, *, name: str
) -> Bool[Array, "B S"] | None:
    """Reduce a key-padding ``mask`` (broadcastable to (B, 1, 1, S)) to a (B, S) boolean.

    Kernels that never form per-(query, key) scores can only honour masks that depend on the
    key alone; anything that varies over heads or query positions is refused by name.
    """
    check_mask(mask, query, key, name=name)
    if mask is None:
        return None
    if mask.shape[1] != 1 or mask.shape[2] != 1:
        raise NotImplementedError(
            f"{name} supports only key-padding masks, broadcastable to (batch, 1, 1, seq_kv), "
            f"got a mask of shape {mask.shape} that varies over heads or query positions; use "
            "causal=True for causal masking, or standard_attention (or another softmax kernel) "
            "for general masks."
        )
    return jnp.broadcast_to(mask[:, 0, 0, :], (query.shape[0], key.shape[2]))


def check_causal_lengths(causal: bool, seq_q: int, seq_kv: int, *, name: str) -> None:
    """Causal kernels without per-pair scores need query t aligned with key t."""
    if causal and seq_q != seq_kv:
        raise NotImplementedError(
            f"{name} with causal=True needs equal query and key lengths (query t sees keys "
            f"0..t), got seq_q={seq_q} and seq_kv={seq_kv}; for single-token decoding against "
            "a cache, call it with causal=False and a key-padding mask of the filled cache "
            "slots, or use standard_attention with a shifted causal mod."
        )


def _feature_map(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    return jax.nn.elu(x) + 1.0


def _safe_divide(
    numerator: Float[Array, "*rows D"], denominator: Float[Array, "*rows"]
) -> Float[Array, "*rows D"]:
    # A row with no allowed key has denominator exactly 0 (every phi term is positive), so
    # it gets zeros; the where keeps NaN out of the value and out of the gradient.
    positive = denominator > 0.0
    safe = jnp.where(positive, denominator, 1.0)
    return jnp.where(positive[..., None], numerator / safe[..., None], 0.0)


@functools.partial(jax.jit, static_argnames=("causal", "chunk_size", "scale", "precision"))
def _linear_attention(
    query: Float[Array, "B H T D"],
    key: Float[Array, "B Hk S D"],
    value: Float[Array, "B Hk S D"],
    key_mask: Bool[Array, "B S"] | None,
    *,
    causal: bool,
    chunk_size: int,
    scale: float,
    precision: jax.lax.PrecisionLike,
) -> Float[Array, "B H T D"]:
    batch, num_heads, seq_q, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    acc = accumulation_dtype(query.dtype)

    # GQA: query heads are grouped over their key head, key/value are never repeated.
    grouped_query = query.astype(acc).reshape(batch, num_kv_heads, group, seq_q, head_dim)
    if scale != 1.0:
        grouped_query = grouped_query * jnp.asarray(scale, acc)
    phi_q = _feature_map(grouped_query)
    k = key.astype(acc)
    v = value.astype(acc)
    if key_mask is not None:
        keep = key_mask[:, None, :, None]
        # Zeroing padded keys and values before use keeps garbage in unused cache slots
        # (inf, NaN) out of the sums and out of the gradient.
        k = jnp.where(keep, k, 0.0)
        v = jnp.where(keep, v, 0.0)
        phi_k = jnp.where(keep, _feature_map(k), 0.0)
    else:
        phi_k = _feature_map(k)

    def einsum(spec: str, *operands: Array) -> Array:
        return jnp.einsum(spec, *operands, precision=precision, preferred_element_type=acc)

    if not causal:
        state = einsum("bksd,bkse->bkde", phi_k, v)
        normaliser = jnp.sum(phi_k, axis=2)
        numerator = einsum("bkgtd,bkde->bkgte", phi_q, state)
        denominator = einsum("bkgtd,bkd->bkgt", phi_q, normaliser)
        out = _safe_divide(numerator, denominator)
        return out.reshape(batch, num_heads, seq_q, head_dim).astype(query.dtype)

    chunk = min(chunk_size, seq_q)
    num_chunks = seq_q // chunk
    q_c = phi_q.reshape(batch, num_kv_heads, group, num_chunks, chunk, head_dim)
    k_c = phi_k.reshape(batch, num_kv_heads, num_chunks, chunk, head_dim)
    v_c = v.reshape(batch, num_kv_heads, num_chunks, chunk, head_dim)

    # Inter-chunk recurrence state_{c+1} = state_c + K_c^T V_c is a prefix sum, so it is
    # evaluated as one parallel (exclusive) cumulative sum over the chunk axis rather than a
    # sequential lax.scan: a few large batched matmuls instead of T/chunk_size small steps,
    # with the same O(T/chunk_size · D²) states that a scan saves for its backward anyway.
    chunk_state = einsum("bkncd,bknce->bknde", k_c, v_c)
    chunk_normaliser = jnp.sum(k_c, axis=3)
    state = jnp.cumsum(chunk_state[:, :, :-1], axis=2)
    state = jnp.pad(state, ((0, 0), (0, 0), (1, 0), (0, 0), (0, 0)))
    normaliser = jnp.cumsum(chunk_normaliser[:, :, :-1], axis=2)
    normaliser = jnp.pad(normaliser, ((0, 0), (0, 0), (1, 0), (0, 0)))

    causal_in_chunk = jnp.tril(jnp.ones((chunk, chunk), bool))
    weights = einsum("bkgncd,bknjd->bkgncj", q_c, k_c)
    weights = jnp.where(causal_in_chunk, weights, 0.0)
    numerator = einsum("bkgncj,bknje->bkgnce", weights, v_c) + einsum(
        "bkgncd,bknde->bkgnce", q_c, state
    )
    denominator = jnp.sum(weights, axis=-1) + einsum("bkgncd,bknd->bkgnc", q_c, normaliser)
    out = _safe_divide(numerator, denominator)
    return out.reshape(batch, num_heads, seq_q, head_dim).astype(query.dtype)


@shape_checked
def linear_attention(
    query: QueryArray,
    key: KeyArray,
    value: ValueArray,
    *,
    mask: AttentionMask | None = None,
    score_mod: ScoreMod | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    causal: bool = True,
    chunk_size: int = 64,
    scale: float | None = None,
    precision: jax.lax.PrecisionLike = None,
) -> AttentionOutput:
    r"""Linear attention with :math:`\phi(x) = \mathrm{elu}(x) + 1` (Katharopoulos et al. 2020).

    .. math::

        o_t = \frac{\phi(s\,q_t)^\top \sum_{j \in A(t)} \phi(k_j) v_j^\top}
                   {\phi(s\,q_t)^\top \sum_{j \in A(t)} \phi(k_j)}

    with :math:`A(t)` the unpadded keys (those with :math:`j \le t` when causal). Causal
    attention is computed chunkwise: a masked quadratic term inside each chunk of
    ``chunk_size`` positions plus the (head_dim × head_dim) state of all earlier chunks, so
    memory is O(T·D + T/chunk_size·D²) per head and no (T, S) matrix exists. Non-causal
    attention uses the global sums (``chunk_size`` is then ignored). Gradients come from
    autodiff through this computation.

    Args:
      query: (batch, heads, seq_q, head_dim).
      key: (batch, kv_heads, seq_kv, head_dim); ``kv_heads`` divides ``heads`` (GQA/MQA by a
        grouped einsum, key/value heads are never repeated).
      value: like ``key``.
      mask: a key-padding mask only, boolean and broadcastable to (batch, 1, 1, seq_kv); True
        means attend. Padded keys contribute nothing.
      score_mod: unsupported (NotImplementedError); must be None.
      dropout_rng: unused (dropout is unsupported).
      dropout_rate: must be 0 unless ``deterministic``.
      deterministic: dropout is off when True.
      causal: query ``t`` attends to keys ``0..t`` (needs seq_q == seq_kv).
      chunk_size: chunk length of the causal form; seq_q must be a multiple of it, or at most
        it (one chunk). Ignored when not causal.
      scale: multiplies the query before the feature map. Default None means 1.0, as in the
        paper: unlike softmax, :math:`\phi` has no temperature to correct, and
        ``1/sqrt(head_dim)`` would only squash queries towards :math:`\phi(0) = 1`.
      precision: matmul precision (``jax.lax.Precision.HIGHEST`` for float32 references).

    Returns:
      (batch, heads, seq_q, head_dim) in the query's dtype; feature maps, states and sums are
      float32 for bf16/fp16 inputs. A query with no allowed key returns zeros, with finite
      gradients.

    Raises:
      ValueError: for shapes that do not fit, a bad mask, bad dropout arguments, a
        non-positive ``chunk_size``, or a causal seq_q that is not a multiple of
        ``chunk_size`` (pad the sequence, as the layer does).
      NotImplementedError: for a ``score_mod``, active dropout, a mask that is not a
        key-padding mask, or causal attention with seq_q != seq_kv.

    Example:
      >>> import jax, jax.numpy as jnp, attnax
      >>> q = jax.random.normal(jax.random.key(0), (1, 2, 8, 4))
      >>> kv = jax.random.normal(jax.random.key(1), (1, 2, 8, 4))
      >>> out = attnax.linear_attention(q, kv, kv, causal=True, chunk_size=4)
      >>> out.shape
      (1, 2, 8, 4)
      >>> # The first query sees only the first key: its output is that key's value.
      >>> bool(jnp.allclose(out[:, :, 0], kv[:, :, 0], atol=1e-5))
      True
    """
    name = "linear_attention"
    check_qkv(query, key, value, name=name)
    key_mask = key_padding_mask(mask, query, key, name=name)
    if check_dropout(dropout_rate, dropout_rng, deterministic, name=name):
        raise NotImplementedError(
            f"{name} does not implement attention dropout (there are no attention weights to "
            "drop); pass deterministic=True or dropout_rate=0.0, and use dropout on the output "
            "projection, or standard_attention for dropout on the weights."
        )
    if score_mod is not None:
        raise NotImplementedError(
            f"{name} does not support `score_mod`: it never forms the (seq_q, seq_kv) scores a "
            "score mod rewrites (phi(q)·phi(k) factorises through a head_dim × head_dim "
            "state). Use causal=True for causal masking and `mask` for key padding, or a "
            "softmax kernel (standard_attention, memory_efficient_attention) for score mods."
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: `chunk_size` must be a positive int, got {chunk_size!r}.")
    seq_q, seq_kv = query.shape[2], key.shape[2]
    check_causal_lengths(causal, seq_q, seq_kv, name=name)
    if causal and seq_q > chunk_size and seq_q % chunk_size != 0:
        raise ValueError(
            f"{name}: seq_q={seq_q} is not a multiple of chunk_size={chunk_size}; pad the "
            f"sequence to a multiple of `chunk_size` (padding at the end does not change the "
            "earlier positions of causal attention) or choose a `chunk_size` that divides it."
        )
    out: AttentionOutput = _linear_attention(
        query,
        key,
        value,
        key_mask,
        causal=causal,
        chunk_size=chunk_size,
        scale=1.0 if scale is None else float(scale),
        precision=precision,
    )
    return out
