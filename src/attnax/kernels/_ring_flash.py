"""Ring attention with one fused flash call per (query shard, key shard) pair.

The generic ring (:mod:`attnax.kernels._ring`) computes every pair with XLA tiles, which is
exact for any score mod but runs at a fraction of a fused kernel's speed. For the common
training case (no mask, no score mod other than causal, bf16/fp16 on an NVIDIA GPU) each pair
is one fused attention call instead:

* forward: cuDNN flash attention returning the pair's normalised output and log-sum-exp; the
  pairs are merged exactly in float32 through the log-sum-exp, as in the generic ring;
* backward: cuDNN's flash backward given the *global* output and log-sum-exp (not the pair's),
  which makes its probabilities ``exp(s - lse_global)`` and its ``rowsum(dO * O)`` the global
  ones, so the pair's dQ/dK/dV are exactly its share of the full gradient (the same
  recurrences as FlashAttention-2's backward, split over key shards).

Under a causal mask every pair is one of three shapes, all plain cuDNN calls:

* the diagonal pair (a device's own keys): causal on local indices. This holds for the zigzag
  layout too: device ``i`` holds chunks ``i`` and ``2P - 1 - i``, in increasing order, so
  "local key index <= local query index" is exactly "global key <= global query";
* zigzag, visiting shard ``j < i``: all local queries against the first key chunk (chunk ``j``,
  entirely in the past of both query chunks), unmasked; the second key chunk (``2P - 1 - j``) is
  in the future of both query chunks;
* zigzag, ``j > i``: the second query chunk (``2P - 1 - i``) against both key chunks, unmasked;
  the first query chunk sees neither.

So under zigzag every device computes the same amount at every step (balanced), and with the
contiguous layout a pair is either full (``j < i``) or skipped (``j > i``).

The pair kernels are swappable: ``pair="cudnn"`` (GPU) or ``pair="xla"`` (dense XLA math with
the same inputs and outputs, used to test the ring schedule on CPU).
"""

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any, Literal, TypeAlias

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

# Private JAX internals (see cudnn_pairs_available), typed Any: their signatures are not ours.
_cudnn: Any
try:
    from jax._src.cudnn import fused_attention_stablehlo as _cudnn_module
except ImportError:  # pragma: no cover - a JAX without it keeps the XLA-tile ring
    _cudnn = None
else:
    _cudnn = _cudnn_module

from ._common import merge_partials, rotate_ring, vary_like, varying_axes

__all__ = ["PairImpl", "cudnn_pairs_available", "flash_ring"]

PairImpl: TypeAlias = Literal["cudnn", "xla"]

# (out, lse) of one pair: out (B, H, Tq, D) in the input dtype, lse (B, H, Tq) float32.
_PairOut: TypeAlias = tuple[Array, Float[Array, "B H T"]]


@dataclasses.dataclass(frozen=True)
class _RingConfig:
    axis_name: Hashable
    num_shards: int
    layout: str  # "contiguous" | "zigzag" (any layout when not causal)
    causal: bool
    scale: float
    pair: PairImpl


# --------------------------------------------------------------------------- pair kernels


def cudnn_pairs_available() -> bool:
    """Whether this JAX exposes the cuDNN forward (with log-sum-exp) and backward entry points.

    The backward takes the forward's output and log-sum-exp as inputs; JAX has no public API
    for that, so the ring binds the primitive JAX's own cuDNN attention uses. When a JAX
    release moves it, this returns False and the ring keeps its XLA pair path.
    """
    needed = (
        "dot_product_attention",
        "_dot_product_attention_bwd_p_wrapper",
        "MaskType",
        "AttentionLayout",
    )
    return _cudnn is not None and all(hasattr(_cudnn, name) for name in needed)


def _cudnn_forward(q: Array, k: Array, v: Array, *, causal: bool, scale: float) -> _PairOut:
    cudnn = _cudnn
    mask_type = cudnn.MaskType.CAUSAL if causal else cudnn.MaskType.NO_MASK
    out, lse = cudnn.dot_product_attention(
        q, k, v, scale=scale, mask_type=mask_type, qkv_layout="BNTH", return_residual=True
    )
    return out, lse.reshape(q.shape[:3])


def _cudnn_backward(
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
    cudnn = _cudnn
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


def _xla_forward(q: Array, k: Array, v: Array, *, causal: bool, scale: float) -> _PairOut:
    scores, _ = _xla_scores(q, k, causal=causal, scale=scale)
    lse = jax.nn.logsumexp(scores, axis=-1)
    weights = jnp.exp(scores - lse[..., None])
    out = jnp.einsum("bkgts,bksd->bkgtd", weights, v.astype(jnp.float32))
    return out.reshape(q.shape).astype(q.dtype), lse.reshape(q.shape[:3])


def _xla_backward(
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


_FORWARD: dict[str, Callable[..., _PairOut]] = {"cudnn": _cudnn_forward, "xla": _xla_forward}
_BACKWARD: dict[str, Callable[..., tuple[Array, Array, Array]]] = {
    "cudnn": _cudnn_backward,
    "xla": _xla_backward,
}


# --------------------------------------------------------------------------- ring schedule


def _rotate_pair(cfg: _RingConfig, tree: Any) -> Any:
    return rotate_ring(tree, cfg.axis_name, cfg.num_shards)


def _forward_step(
    cfg: _RingConfig, earlier: Array, q: Array, k_s: Array, v_s: Array, out: Array, lse: Array
) -> tuple[Array, Array]:
    """Merge the pair (local queries, visiting shard) into (out, lse); see the module doc."""
    forward = _FORWARD[cfg.pair]

    def full_pair(out: Array, lse: Array, k_s: Array, v_s: Array) -> tuple[Array, Array]:
        return merge_partials(out, lse, *forward(q, k_s, v_s, causal=False, scale=cfg.scale))

    if not cfg.causal:
        return full_pair(out, lse, k_s, v_s)
    if cfg.layout == "contiguous":

        def future(out: Array, lse: Array, k_s: Array, v_s: Array) -> tuple[Array, Array]:
            return out, lse

        return jax.lax.cond(earlier, full_pair, future, out, lse, k_s, v_s)  # type: ignore[no-any-return]
    half = q.shape[2] // 2

    def first_key_chunk(out: Array, lse: Array, k_s: Array, v_s: Array) -> tuple[Array, Array]:
        part = forward(q, k_s[:, :, :half], v_s[:, :, :half], causal=False, scale=cfg.scale)
        return merge_partials(out, lse, *part)

    def second_query_chunk(out: Array, lse: Array, k_s: Array, v_s: Array) -> tuple[Array, Array]:
        part = forward(q[:, :, half:], k_s, v_s, causal=False, scale=cfg.scale)
        merged, merged_lse = merge_partials(out[:, :, half:], lse[:, :, half:], *part)
        return (
            jnp.concatenate([out[:, :, :half], merged], axis=2),
            jnp.concatenate([lse[:, :, :half], merged_lse], axis=2),
        )

    return jax.lax.cond(earlier, first_key_chunk, second_query_chunk, out, lse, k_s, v_s)  # type: ignore[no-any-return]


def _ring_forward(cfg: _RingConfig, q: Array, k: Array, v: Array) -> tuple[Array, Array]:
    me = jax.lax.axis_index(cfg.axis_name)
    out, lse = _FORWARD[cfg.pair](q, k, v, causal=cfg.causal, scale=cfg.scale)
    out = out.astype(jnp.float32)
    visiting = (k, v)
    for step in range(1, cfg.num_shards):
        # Device i now holds the shard of device (i - step) mod P, an earlier shard (j < i)
        # exactly when step <= i.
        visiting = _rotate_pair(cfg, visiting)
        k_s, v_s = visiting
        out, lse = _forward_step(cfg, me >= step, q, k_s, v_s, out, lse)
    return out, lse


_Grads: TypeAlias = tuple[Array, Array, Array]


def _backward_step(
    cfg: _RingConfig,
    earlier: Array,
    residuals: tuple[Array, Array, Array, Array],
    k_s: Array,
    v_s: Array,
    dq: Array,
) -> _Grads:
    """(dq updated in float32, this pair's dK and dV for the visiting shard in their dtype)."""
    q, out, lse, d_out = residuals
    backward = _BACKWARD[cfg.pair]
    f32 = jnp.float32

    def grads(rows: slice, k_part: Array, v_part: Array) -> _Grads:
        pdq, pdk, pdv = backward(
            q[:, :, rows],
            k_part,
            v_part,
            out[:, :, rows],
            lse[:, :, rows],
            d_out[:, :, rows],
            causal=False,
            scale=cfg.scale,
        )
        return pdq.astype(f32), pdk.astype(k_s.dtype), pdv.astype(v_s.dtype)

    def full_pair(dq: Array, k_s: Array, v_s: Array) -> _Grads:
        pdq, pdk, pdv = grads(slice(None), k_s, v_s)
        return dq + pdq, pdk, pdv

    if not cfg.causal:
        return full_pair(dq, k_s, v_s)
    if cfg.layout == "contiguous":
        axes = varying_axes(q, k_s, v_s, d_out)

        def future(dq: Array, k_s: Array, v_s: Array) -> _Grads:
            zeros_k = vary_like(jnp.zeros(k_s.shape, k_s.dtype), axes)
            return dq, zeros_k, vary_like(jnp.zeros(v_s.shape, v_s.dtype), axes)

        return jax.lax.cond(earlier, full_pair, future, dq, k_s, v_s)  # type: ignore[no-any-return]
    half = q.shape[2] // 2
    pad = ((0, 0), (0, 0), (0, half), (0, 0))

    def first_key_chunk(dq: Array, k_s: Array, v_s: Array) -> _Grads:
        pdq, pdk, pdv = grads(slice(None), k_s[:, :, :half], v_s[:, :, :half])
        return dq + pdq, jnp.pad(pdk, pad), jnp.pad(pdv, pad)

    def second_query_chunk(dq: Array, k_s: Array, v_s: Array) -> _Grads:
        pdq, pdk, pdv = grads(slice(half, None), k_s, v_s)
        return jnp.concatenate([dq[:, :, :half], dq[:, :, half:] + pdq], axis=2), pdk, pdv

    return jax.lax.cond(earlier, first_key_chunk, second_query_chunk, dq, k_s, v_s)  # type: ignore[no-any-return]


def _ring_backward(
    cfg: _RingConfig, q: Array, k: Array, v: Array, out: Array, lse: Array, d_out: Array
) -> _Grads:
    me = jax.lax.axis_index(cfg.axis_name)
    f32 = jnp.float32
    # The dK/dV accumulators travel the ring. On two devices a shard's accumulator makes one
    # hop carrying a single pair's gradient (already in the input dtype) and one hop home
    # carrying the final sum, which is rounded to the input dtype on arrival anyway: sending
    # both in the input dtype is bit-identical to float32 and halves their memory and traffic.
    # Longer rings carry partial sums between additions, so they stay in float32.
    travel = k.dtype if cfg.num_shards == 2 else f32
    dq, dk, dv = _BACKWARD[cfg.pair](q, k, v, out, lse, d_out, causal=cfg.causal, scale=cfg.scale)
    dq, dk_dv = dq.astype(f32), (dk.astype(travel), dv.astype(travel))
    visiting = (k, v)
    for step in range(1, cfg.num_shards):
        visiting = _rotate_pair(cfg, visiting)
        # The visiting shard's dK/dV accumulators arrive from the previous device while this
        # step computes: they are added after the pair kernel, not fed into it.
        arriving = _rotate_pair(cfg, dk_dv)
        k_s, v_s = visiting
        dq, pdk, pdv = _backward_step(cfg, me >= step, (q, out, lse, d_out), k_s, v_s, dq)
        dk_dv = (
            (arriving[0].astype(f32) + pdk.astype(f32)).astype(travel),
            (arriving[1].astype(f32) + pdv.astype(f32)).astype(travel),
        )
    # After the last step the accumulators sit one device short of home.
    dk, dv = _rotate_pair(cfg, dk_dv) if cfg.num_shards > 1 else dk_dv
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _ring_core(cfg: _RingConfig) -> Callable[[Array, Array, Array], Array]:
    @jax.custom_vjp
    def ring(q: Array, k: Array, v: Array) -> Array:
        out, _ = _ring_forward(cfg, q, k, v)
        return out.astype(q.dtype)

    def fwd(q: Array, k: Array, v: Array) -> tuple[Array, tuple[Array, ...]]:
        out, lse = _ring_forward(cfg, q, k, v)
        out = out.astype(q.dtype)
        return out, (q, k, v, out, lse)

    def bwd(res: tuple[Array, ...], d_out: Array) -> tuple[Array, Array, Array]:
        q, k, v, out, lse = res
        return _ring_backward(cfg, q, k, v, out, lse, d_out)

    ring.defvjp(fwd, bwd)
    return ring


def flash_ring(
    query: Array,
    key: Array,
    value: Array,
    *,
    axis_name: Hashable,
    num_shards: int,
    layout: str,
    causal: bool,
    scale: float,
    pair: PairImpl,
) -> Array:
    """The ring with one fused call per shard pair; call inside ``shard_map``.

    Arguments are already validated by :func:`attnax.ring_attention`: (B, H, T/P, D) shards
    (``kv_heads`` dividing ``heads``), equal query and key shard lengths (even for zigzag),
    ``layout`` "contiguous" or "zigzag" when ``causal``.
    """
    if causal and layout not in ("contiguous", "zigzag"):
        raise ValueError(f"flash_ring: causal pairs need layout contiguous or zigzag, got {layout}")
    cfg = _RingConfig(
        axis_name=axis_name,
        num_shards=num_shards,
        layout=layout,
        causal=causal,
        scale=scale,
        pair=pair,
    )
    return _ring_core(cfg)(query, key, value)
