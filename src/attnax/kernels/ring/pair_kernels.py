"""The per-pair kernels of the cuDNN ring: cuDNN flash attention and its dense XLA twin.

* forward: the pair's normalised output and log-sum-exp;
* backward: dQ/dK/dV given the *global* output and log-sum-exp (not the pair's), which makes
  the probabilities ``exp(s - lse_global)`` and ``rowsum(dO * O)`` the global ones, so the
  pair's gradients are exactly its share of the full gradient (the same recurrences as
  FlashAttention-2's backward, split over key shards).

The pair kernels are swappable: ``pair="cudnn"`` (GPU) or ``pair="xla"`` (dense XLA math with
the same inputs and outputs, used to test the ring schedule on CPU).
"""

from collections.abc import Callable
from typing import Literal, TypeAlias

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._common import cudnn_internals, cudnn_internals_have

PairImpl: TypeAlias = Literal["cudnn", "xla"]

# (out, lse) of one pair: out (B, H, Tq, D) in the input dtype, lse (B, H, Tq) float32.
PairOut: TypeAlias = tuple[Array, Float[Array, "B H T"]]


def cudnn_pairs_available() -> bool:
    """Whether this JAX exposes the cuDNN forward (with log-sum-exp) and backward entry points.

    The backward takes the forward's output and log-sum-exp as inputs; JAX has no public API
    for that, so the ring binds the primitive JAX's own cuDNN attention uses. When a JAX
    release moves it, this returns False and the ring keeps its XLA pair path.
    """
    return cudnn_internals_have(
        "dot_product_attention",
        "_dot_product_attention_bwd_p_wrapper",
        "MaskType",
        "AttentionLayout",
    )


def cudnn_forward(q: Array, k: Array, v: Array, *, causal: bool, scale: float) -> PairOut:
    cudnn = cudnn_internals
    mask_type = cudnn.MaskType.CAUSAL if causal else cudnn.MaskType.NO_MASK
    out, lse = cudnn.dot_product_attention(
        q, k, v, scale=scale, mask_type=mask_type, qkv_layout="BNTH", return_residual=True
    )
    return out, lse.reshape(q.shape[:3])


def cudnn_backward(
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    d_out: Array,
    *,
    causal: bool,
    scale: float,
) -> tuple[Array, Array, Array]:
    cudnn = cudnn_internals
    mask_type = cudnn.MaskType.CAUSAL if causal else cudnn.MaskType.NO_MASK
    unused = jnp.zeros((0,), q.dtype)
    grads = cudnn._dot_product_attention_bwd_p_wrapper.bind(
        q,
        k,
        v,
        unused,  # bias
        unused,  # q_seqlen
        unused,  # kv_seqlen
        unused,  # q_offsets
        unused,  # kv_offsets
        unused,  # page_table_k
        unused,  # page_table_v
        lse,  # softmax statistics: the global log-sum-exp
        out.astype(q.dtype),  # the global output (cuDNN forms rowsum(dO * O) from it)
        d_out.astype(q.dtype),
        scale=scale,
        seed=42,
        dropout_rate=0.0,
        variadic_args=(False, False),
        mask_type=mask_type,
        layout=cudnn.AttentionLayout.BNTH.value,
        sliding_window_length=None,
    )
    dq, dk, dv = grads[:3]
    return dq, dk, dv


def _xla_scores(q: Array, k: Array, *, causal: bool, scale: float) -> tuple[Array, Array | None]:
    """(B, Hk, G, Tq, S) float32 scaled scores and the causal (top-left) mask, if any."""
    batch, num_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_kv = k.shape[1], k.shape[2]
    grouped = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, seq_q, head_dim)
    scores = jnp.einsum(
        "bkgtd,bksd->bkgts", grouped, k, preferred_element_type=jnp.float32
    ) * jnp.float32(scale)
    allowed = None
    if causal:
        allowed = jnp.arange(seq_q)[:, None] >= jnp.arange(seq_kv)[None, :]
        scores = jnp.where(allowed, scores, -jnp.inf)
    return scores, allowed


def xla_forward(q: Array, k: Array, v: Array, *, causal: bool, scale: float) -> PairOut:
    scores, _ = _xla_scores(q, k, causal=causal, scale=scale)
    lse = jax.nn.logsumexp(scores, axis=-1)
    weights = jnp.exp(scores - lse[..., None])
    out = jnp.einsum("bkgts,bksd->bkgtd", weights, v.astype(jnp.float32))
    return out.reshape(q.shape).astype(q.dtype), lse.reshape(q.shape[:3])


def xla_backward(
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    d_out: Array,
    *,
    causal: bool,
    scale: float,
) -> tuple[Array, Array, Array]:
    batch, num_heads, seq_q, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group_shape = (batch, num_kv_heads, num_heads // num_kv_heads, seq_q)
    scores, allowed = _xla_scores(q, k, causal=causal, scale=scale)
    weights = jnp.exp(scores - lse.reshape(group_shape)[..., None])
    if allowed is not None:
        weights = jnp.where(allowed, weights, 0.0)
    d_out32 = d_out.astype(jnp.float32).reshape(*group_shape, head_dim)
    out32 = out.astype(jnp.float32).reshape(*group_shape, head_dim)
    dv = jnp.einsum("bkgts,bkgtd->bksd", weights, d_out32)
    d_weights = jnp.einsum("bkgtd,bksd->bkgts", d_out32, v.astype(jnp.float32))
    delta = jnp.sum(d_out32 * out32, axis=-1, keepdims=True)
    d_scores = weights * (d_weights - delta) * jnp.float32(scale)
    dq = jnp.einsum("bkgts,bksd->bkgtd", d_scores, k.astype(jnp.float32)).reshape(q.shape)
    dk = jnp.einsum("bkgts,bkgtd->bksd", d_scores, q.astype(jnp.float32).reshape(d_out32.shape))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


PAIR_FORWARD: dict[str, Callable[..., PairOut]] = {"cudnn": cudnn_forward, "xla": xla_forward}
PAIR_BACKWARD: dict[str, Callable[..., tuple[Array, Array, Array]]] = {
    "cudnn": cudnn_backward,
    "xla": xla_backward,
}
