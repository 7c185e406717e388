"""Fused Pallas backward of causal chunkwise linear attention (the forward's two-pass shape).

With :math:`n_t = \\phi(q_t)^\\top S_t` and :math:`d_t = \\phi(q_t)^\\top z_t` (S and z the sums
over keys ``s <= t``), the output is :math:`o_t = n_t / d_t`. For an output cotangent
:math:`g_t`, write :math:`u_t = g_t / d_t` and :math:`w_t = -(g_t \\cdot o_t) / d_t`, and
:math:`B_{ts} = u_t \\cdot v_s + w_t`. Then

* :math:`\\partial\\phi(q_t) = \\sum_{s \\le t} B_{ts}\\,\\phi(k_s)` — a causal sum, whose
  earlier-chunk part is the forward's prefix state: :math:`S_c u_t + z_c w_t`;
* :math:`\\partial\\phi(k_s) = \\sum_{t \\ge s} B_{ts}\\,\\phi(q_t)` and
  :math:`\\partial v_s = \\sum_{t \\ge s} (\\phi(q_t) \\cdot \\phi(k_s))\\,u_t` — anti-causal
  sums, whose later-chunk parts come from the suffix sums :math:`G_c = \\sum \\phi(q_t) u_t^\\top`
  and :math:`h_c = \\sum \\phi(q_t) w_t` over the later chunks:
  :math:`G_c v_s + h_c` and :math:`G_c^\\top \\phi(k_s)`.

So the backward has the forward's shape: ``grad_states`` (one program per chunk) writes each
chunk's :math:`(G, h)` terms, one XLA matmul forms the exclusive suffix sums, and two kernels
(``grad_query``; ``grad_key_value``) finish each chunk with its (C, C) intra-chunk weights on
chip. Every kernel is one program per (batch, query head, chunk) with no loop; key and value
gradients of grouped heads are per query head and summed over the group afterwards. Rounding
follows the forward: half-precision operands into every matmul, float32 accumulation, float32
feature maps and sums.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from ._linear_pallas import ForwardResiduals, compiler_params, feature_map

__all__ = ["fused_causal_backward"]


def _feature_map_slope(x: Any) -> Any:
    # d/dx (elu(x) + 1): 1 above zero, exp(x) at or below.
    return jnp.where(x > 0, 1.0, jnp.exp(jnp.minimum(x, 0.0)))


def _output_cotangents(g_ref: Any, o_ref: Any, denominator_ref: Any) -> tuple[Any, Any]:
    """u = g / d (C, Dv) and w = -(g . o) / d (C,), zero for rows whose denominator is 0."""
    denominator = denominator_ref[...]
    positive = denominator > 0.0
    inverse = jnp.where(positive, 1.0 / jnp.where(positive, denominator, 1.0), 0.0)
    g = g_ref[...].astype(jnp.float32)
    u = g * inverse[:, None]
    w = -jnp.sum(g * o_ref[...].astype(jnp.float32), axis=1) * inverse
    return u, w


def _causal(weights: Any) -> Any:
    chunk = weights.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    return jnp.where(rows >= cols, weights, 0.0)


def _dot(a: Any, b: Any, contract: tuple[int, int]) -> Any:
    return jax.lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32
    )


def _phi_query(q_ref: Any, scale: float) -> tuple[Any, Any]:
    q = q_ref[...].astype(jnp.float32)
    if scale != 1.0:
        q = q * scale
    return q, feature_map(q)


def _grad_state_kernel(
    q_ref: Any,
    g_ref: Any,
    o_ref: Any,
    denominator_ref: Any,
    state_ref: Any,
    norm_ref: Any,
    *,
    scale: float,
) -> None:
    operand = state_ref.dtype
    _, phi_q = _phi_query(q_ref, scale)
    u, w = _output_cotangents(g_ref, o_ref, denominator_ref)
    phi_q = phi_q.astype(operand)
    state_ref[...] = _dot(phi_q, u.astype(operand), (0, 0)).astype(operand)
    norm_ref[...] = jnp.sum(phi_q.astype(jnp.float32) * w[:, None], axis=0)


def _grad_query_kernel(
    q_ref: Any,
    k_ref: Any,
    v_ref: Any,
    g_ref: Any,
    o_ref: Any,
    denominator_ref: Any,
    state_ref: Any,
    norm_ref: Any,
    dq_ref: Any,
    *,
    scale: float,
) -> None:
    operand = v_ref.dtype
    u, w = _output_cotangents(g_ref, o_ref, denominator_ref)
    u_op = u.astype(operand)
    phi_k = feature_map(k_ref[...].astype(jnp.float32)).astype(operand)
    coupling = _causal(_dot(u_op, v_ref[...], (1, 1)) + w[:, None]).astype(operand)
    norm = norm_ref[...].astype(operand).astype(jnp.float32)
    d_phi_q = (
        _dot(coupling, phi_k, (1, 0))
        + _dot(u_op, state_ref[...], (1, 1))
        + w[:, None] * norm[None, :]
    )
    q, _ = _phi_query(q_ref, scale)
    dq = d_phi_q * _feature_map_slope(q)
    if scale != 1.0:
        dq = dq * scale
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _grad_key_value_kernel(
    q_ref: Any,
    k_ref: Any,
    v_ref: Any,
    g_ref: Any,
    o_ref: Any,
    denominator_ref: Any,
    state_ref: Any,
    norm_ref: Any,
    dk_ref: Any,
    dv_ref: Any,
    *,
    scale: float,
) -> None:
    operand = v_ref.dtype
    _, phi_q = _phi_query(q_ref, scale)
    phi_q = phi_q.astype(operand)
    k = k_ref[...].astype(jnp.float32)
    phi_k = feature_map(k).astype(operand)
    u, w = _output_cotangents(g_ref, o_ref, denominator_ref)
    u_op = u.astype(operand)
    later_state = state_ref[...]
    # dV first, so its (C, C) weights are dead before the coupling matrix is formed.
    weights = _causal(_dot(phi_q, phi_k, (1, 1))).astype(operand)
    dv = _dot(weights, u_op, (0, 0)) + _dot(phi_k, later_state, (1, 0))
    dv_ref[...] = dv.astype(dv_ref.dtype)
    coupling = _causal(_dot(u_op, v_ref[...], (1, 1)) + w[:, None]).astype(operand)
    norm = norm_ref[...].astype(operand).astype(jnp.float32)
    d_phi_k = (
        _dot(coupling, phi_q, (0, 0)) + _dot(v_ref[...], later_state, (1, 1)) + norm[None, :]
    )
    dk_ref[...] = (d_phi_k * _feature_map_slope(k)).astype(dk_ref.dtype)


def fused_causal_backward(
    query: Float[Array, "B H T D"],
    key: Float[Array, "B Hk S D"],
    value: Float[Array, "B Hk S D"],
    out: Float[Array, "B H T D"],
    residuals: ForwardResiduals,
    d_out: Float[Array, "B H T D"],
    *,
    chunk: int,
    scale: float,
    exclusive_prefix_sum: Any,
    interpret: bool,
) -> tuple[Float[Array, "B H T D"], Float[Array, "B Hk S D"], Float[Array, "B Hk S D"]]:
    """Gradients of query, key and value of :func:`fused_causal_forward`'s output."""
    batch, num_heads, seq, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    num_chunks = seq // chunk
    grid = (batch, num_heads, num_chunks)
    row_tile = pl.BlockSpec((None, None, chunk, head_dim), lambda b, h, n: (b, h, n, 0))
    kv_tile = pl.BlockSpec((None, None, chunk, head_dim), lambda b, h, n: (b, h // group, n, 0))
    row_scalars = pl.BlockSpec((None, None, chunk), lambda b, h, n: (b, h, n))
    state_tile = pl.BlockSpec(
        (None, None, None, head_dim, head_dim), lambda b, h, n: (b, h, n, 0, 0)
    )
    norm_tile = pl.BlockSpec((None, None, None, head_dim), lambda b, h, n: (b, h, n, 0))
    kv_state_tile = pl.BlockSpec(
        (None, None, None, head_dim, head_dim), lambda b, h, n: (b, h // group, n, 0, 0)
    )
    kv_norm_tile = pl.BlockSpec((None, None, None, head_dim), lambda b, h, n: (b, h // group, n, 0))
    d_out = d_out.astype(query.dtype)
    cotangent_inputs = (d_out, out, residuals.denominator)

    chunk_states, chunk_norms = pl.pallas_call(
        functools.partial(_grad_state_kernel, scale=scale),
        grid=grid,
        in_specs=[row_tile, row_tile, row_tile, row_scalars],
        out_specs=[state_tile, norm_tile],
        out_shape=[
            jax.ShapeDtypeStruct((batch, num_heads, num_chunks, head_dim, head_dim), value.dtype),  # type: ignore[no-untyped-call]
            jax.ShapeDtypeStruct((batch, num_heads, num_chunks, head_dim), jnp.float32),  # type: ignore[no-untyped-call]
        ],
        compiler_params=compiler_params("grad_states", interpret),
        interpret=interpret,
        name="attnax_linear_grad_states",
    )(query, *cotangent_inputs)
    later_states = exclusive_prefix_sum(chunk_states, out_dtype=value.dtype, reverse=True)
    later_norms = exclusive_prefix_sum(chunk_norms, reverse=True)

    dq: Array = pl.pallas_call(
        functools.partial(_grad_query_kernel, scale=scale),
        grid=grid,
        in_specs=[
            row_tile,
            kv_tile,
            kv_tile,
            row_tile,
            row_tile,
            row_scalars,
            kv_state_tile,
            kv_norm_tile,
        ],
        out_specs=row_tile,
        out_shape=jax.ShapeDtypeStruct(query.shape, query.dtype),  # type: ignore[no-untyped-call]
        compiler_params=compiler_params("grad_query", interpret),
        interpret=interpret,
        name="attnax_linear_grad_query",
    )(query, key, value, *cotangent_inputs, residuals.prefix_states, residuals.prefix_norms)

    # Grouped heads: each query head's share is summed over its group below, in float32.
    kv_grad_dtype = key.dtype if group == 1 else jnp.float32
    dk, dv = pl.pallas_call(
        functools.partial(_grad_key_value_kernel, scale=scale),
        grid=grid,
        in_specs=[
            row_tile,
            kv_tile,
            kv_tile,
            row_tile,
            row_tile,
            row_scalars,
            state_tile,
            norm_tile,
        ],
        out_specs=[row_tile, row_tile],
        out_shape=[
            jax.ShapeDtypeStruct((batch, num_heads, seq, head_dim), kv_grad_dtype),  # type: ignore[no-untyped-call]
            jax.ShapeDtypeStruct((batch, num_heads, seq, head_dim), kv_grad_dtype),  # type: ignore[no-untyped-call]
        ],
        compiler_params=compiler_params("grad_key_value", interpret),
        interpret=interpret,
        name="attnax_linear_grad_key_value",
    )(query, key, value, *cotangent_inputs, later_states, later_norms)
    if group > 1:
        shape = (batch, num_kv_heads, group, seq, head_dim)
        dk = dk.reshape(shape).sum(axis=2).astype(key.dtype)
        dv = dv.reshape(shape).sum(axis=2).astype(value.dtype)
    return dq, dk, dv
