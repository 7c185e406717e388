"""The fused Pallas path of causal linear attention: its ``custom_vjp`` and when it runs.

Forward (:mod:`.pallas`) and backward (:mod:`.pallas_vjp`) are Pallas kernels around the XLA
prefix sum over chunks (:func:`.xla.exclusive_prefix_sum`); :func:`use_fused` decides, per call,
whether they serve it.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .pallas import ForwardResiduals, fused_causal_forward, fused_unsupported_reason
from .pallas_vjp import fused_causal_backward
from .xla import exclusive_prefix_sum, xla_linear

__all__ = ["FUSED_BACKWARD", "FUSED_MIN_CHUNK", "fused_causal", "fused_chunk", "use_fused"]


# The fused kernels' shortest chunk. Chunks only set how the sums are split (the result is
# the same up to rounding), and on an H100 at head_dim 128 the kernels run fastest at 128 (chunk
# 64 writes twice the (D, D) states: 0.63 ms against 0.48 forward, benchmarks/NOTES.md), so a
# shorter chunk_size is raised to this where the length is a multiple of it. 0 turns it off.
FUSED_MIN_CHUNK = 128


def fused_chunk(chunk_size: int, seq: int) -> int:
    """The chunk the fused kernels run for ``chunk_size`` at length ``seq`` (see above)."""
    chunk = min(chunk_size, seq)
    if chunk < FUSED_MIN_CHUNK and seq % FUSED_MIN_CHUNK == 0:
        return FUSED_MIN_CHUNK
    return chunk


# Whether the fused forward's backward is the fused Pallas one (else the XLA formulation's
# autodiff); read at trace time, so benchmarks/linear_chunks.py can time both.
FUSED_BACKWARD = True


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def fused_causal(
    query: Float[Array, "B H T D"],
    key: Float[Array, "B Hk S D"],
    value: Float[Array, "B Hk S D"],
    chunk: int,
    scale: float,
    precision: jax.lax.PrecisionLike,
    interpret: bool,
) -> Float[Array, "B H T D"]:
    """Pallas forward (:mod:`.pallas`) and backward (:mod:`.pallas_vjp`)."""
    return _fused_causal_fwd(query, key, value, chunk, scale, precision, interpret)[0]


_FusedResiduals = tuple[Array, Array, Array, Array, ForwardResiduals]


def _fused_causal_fwd(
    query: Array,
    key: Array,
    value: Array,
    chunk: int,
    scale: float,
    precision: jax.lax.PrecisionLike,
    interpret: bool,
) -> tuple[Array, _FusedResiduals]:
    out, saved = fused_causal_forward(
        query,
        key,
        value,
        chunk=chunk,
        scale=scale,
        exclusive_prefix_sum=exclusive_prefix_sum,
        interpret=interpret,
    )
    return out, (query, key, value, out, saved)


def _fused_causal_bwd(
    chunk: int,
    scale: float,
    precision: jax.lax.PrecisionLike,
    interpret: bool,
    residuals: _FusedResiduals,
    d_out: Array,
) -> tuple[Array, Array, Array]:
    query, key, value, out, saved = residuals
    if FUSED_BACKWARD:
        return fused_causal_backward(
            query,
            key,
            value,
            out,
            saved,
            d_out,
            chunk=chunk,
            scale=scale,
            exclusive_prefix_sum=exclusive_prefix_sum,
            interpret=interpret,
        )

    def xla_forward(q: Array, k: Array, v: Array) -> Array:
        return xla_linear(
            q, k, v, None, causal=True, chunk_size=chunk, scale=scale, precision=precision
        )

    _, vjp = jax.vjp(xla_forward, query, key, value)
    grads: tuple[Array, Array, Array] = vjp(d_out)
    return grads


fused_causal.defvjp(_fused_causal_fwd, _fused_causal_bwd)


def use_fused(
    use_pallas: bool | None,
    interpret: bool,
    *,
    causal: bool,
    key_mask: Array | None,
    dtype: Any,
    head_dim: int,
    chunk: int,
    name: str,
) -> bool:
    """Whether the fused Pallas forward serves this call (see ``use_pallas``)."""
    if use_pallas is False:
        return False
    reason: str | None = None
    if not causal:
        reason = "the non-causal form is two global matmuls already"
    elif key_mask is not None:
        reason = "a key-padding mask is given"
    elif not interpret and jax.default_backend() != "gpu":
        reason = "it needs a GPU (or interpret=True)"
    elif not (interpret and jnp.dtype(dtype) == jnp.dtype(jnp.float32)):
        reason = fused_unsupported_reason(dtype=dtype, head_dim=head_dim, chunk=chunk)
    if use_pallas and reason is not None:
        raise NotImplementedError(
            f"{name}: use_pallas=True, but the fused kernels cannot run this call: {reason}; "
            "pass use_pallas=None (or False) for the XLA formulation."
        )
    return reason is None
