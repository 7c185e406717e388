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

So the backward has the forward's shape: ``grad_states`` writes each chunk's :math:`(G, h)`
terms, one XLA matmul forms the exclusive suffix sums, and two kernels (``grad_query``;
``grad_key_value``) finish each chunk with its (C, C) intra-chunk weights on chip. Every kernel
works per (batch, query head, chunk), one chunk per program by default (``CHUNKS_PER_PROGRAM``
of :mod:`.pallas`; two per program measured no faster); key and value gradients of
grouped heads are per query head and summed over the group afterwards. Rounding
follows the forward: half-precision operands into every matmul, float32 accumulation, float32
feature maps and sums.
"""

import functools
from typing import Any

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from .._common import kernel_outputs
from .pallas import (
    ForwardResiduals,
    causal_in_chunk,
    chunk_dot,
    chunks_per_program,
    compiler_params,
    feature_map,
    for_each_chunk,
    scaled_query,
)

__all__ = ["fused_causal_backward"]


def _feature_map_slope(x: Any) -> Any:
    # d/dx (elu(x) + 1): 1 above zero, exp(x) at or below.
    return jnp.where(x > 0, 1.0, jnp.exp(jnp.minimum(x, 0.0)))


def _output_cotangents(g_ref: Any, o_ref: Any, denominator_ref: Any, rows: Any) -> tuple[Any, Any]:
    """u = g / d (C, Dv) and w = -(g . o) / d (C,), zero for rows whose denominator is 0."""
    denominator = denominator_ref[rows]
    positive = denominator > 0.0
    inverse = jnp.where(positive, 1.0 / jnp.where(positive, denominator, 1.0), 0.0)
    g = g_ref[rows, :].astype(jnp.float32)
    u = g * inverse[:, None]
    w = -jnp.sum(g * o_ref[rows, :].astype(jnp.float32), axis=1) * inverse
    return u, w


def _grad_state_kernel(
    q_ref: Any,
    g_ref: Any,
    o_ref: Any,
    denominator_ref: Any,
    state_ref: Any,
    norm_ref: Any,
    *,
    chunk: int,
    scale: float,
) -> None:
    operand = state_ref.dtype

    def one_chunk(i: Any) -> None:
        rows = pl.ds(i * chunk, chunk)
        phi_q = feature_map(scaled_query(q_ref, rows, scale)).astype(operand)
        u, w = _output_cotangents(g_ref, o_ref, denominator_ref, rows)
        state_ref[i] = chunk_dot(phi_q, u.astype(operand), (0, 0)).astype(operand)
        norm_ref[i] = jnp.sum(phi_q.astype(jnp.float32) * w[:, None], axis=0)

    for_each_chunk(q_ref.shape[0], chunk, one_chunk)


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
    chunk: int,
    scale: float,
) -> None:
    operand = v_ref.dtype

    def one_chunk(i: Any) -> None:
        rows = pl.ds(i * chunk, chunk)
        u, w = _output_cotangents(g_ref, o_ref, denominator_ref, rows)
        u_op = u.astype(operand)
        phi_k = feature_map(k_ref[rows, :].astype(jnp.float32)).astype(operand)
        coupling = causal_in_chunk(chunk_dot(u_op, v_ref[rows, :], (1, 1)) + w[:, None]).astype(operand)
        norm = norm_ref[i].astype(operand).astype(jnp.float32)
        d_phi_q = (
            chunk_dot(coupling, phi_k, (1, 0))
            + chunk_dot(u_op, state_ref[i], (1, 1))
            + w[:, None] * norm[None, :]
        )
        dq = d_phi_q * _feature_map_slope(scaled_query(q_ref, rows, scale))
        if scale != 1.0:
            dq = dq * scale
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)

    for_each_chunk(q_ref.shape[0], chunk, one_chunk)


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
    chunk: int,
    scale: float,
) -> None:
    operand = v_ref.dtype

    def one_chunk(i: Any) -> None:
        rows = pl.ds(i * chunk, chunk)
        phi_q = feature_map(scaled_query(q_ref, rows, scale)).astype(operand)
        k = k_ref[rows, :].astype(jnp.float32)
        phi_k = feature_map(k).astype(operand)
        v = v_ref[rows, :]
        u, w = _output_cotangents(g_ref, o_ref, denominator_ref, rows)
        u_op = u.astype(operand)
        later_state = state_ref[i]
        # dV first, so its (C, C) weights are dead before the coupling matrix is formed.
        weights = causal_in_chunk(chunk_dot(phi_q, phi_k, (1, 1))).astype(operand)
        dv = chunk_dot(weights, u_op, (0, 0)) + chunk_dot(phi_k, later_state, (1, 0))
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        coupling = causal_in_chunk(chunk_dot(u_op, v, (1, 1)) + w[:, None]).astype(operand)
        norm = norm_ref[i].astype(operand).astype(jnp.float32)
        d_phi_k = chunk_dot(coupling, phi_q, (0, 0)) + chunk_dot(v, later_state, (1, 1)) + norm[None, :]
        dk_ref[rows, :] = (d_phi_k * _feature_map_slope(k)).astype(dk_ref.dtype)

    for_each_chunk(q_ref.shape[0], chunk, one_chunk)


class _Tiles:
    """Block specs of one kernel whose programs take ``per_program`` chunks each."""

    def __init__(self, chunk: int, per_program: int, head_dim: int, group: int) -> None:
        rows = chunk * per_program
        self.rows = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, n: (b, h, n, 0))
        self.kv_rows = pl.BlockSpec(
            (None, None, rows, head_dim), lambda b, h, n: (b, h // group, n, 0)
        )
        self.row_scalars = pl.BlockSpec((None, None, rows), lambda b, h, n: (b, h, n))
        self.states = pl.BlockSpec(
            (None, None, per_program, head_dim, head_dim), lambda b, h, n: (b, h, n, 0, 0)
        )
        self.norms = pl.BlockSpec((None, None, per_program, head_dim), lambda b, h, n: (b, h, n, 0))
        self.kv_states = pl.BlockSpec(
            (None, None, per_program, head_dim, head_dim),
            lambda b, h, n: (b, h // group, n, 0, 0),
        )
        self.kv_norms = pl.BlockSpec(
            (None, None, per_program, head_dim), lambda b, h, n: (b, h // group, n, 0)
        )


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

    def launch(kernel_name: str, kernel: Any, specs: Any, out_specs: Any, out_shape: Any) -> Any:
        per_program = chunks_per_program(kernel_name, num_chunks)
        tiles = _Tiles(chunk, per_program, head_dim, group)
        return pl.pallas_call(
            functools.partial(kernel, chunk=chunk, scale=scale),
            grid=(batch, num_heads, num_chunks // per_program),
            in_specs=specs(tiles),
            out_specs=out_specs(tiles),
            out_shape=out_shape,
            compiler_params=compiler_params(kernel_name, interpret),
            interpret=interpret,
            name=f"attnax_linear_{kernel_name}",
        )

    d_out = d_out.astype(query.dtype)
    cotangent_inputs = (d_out, out, residuals.denominator)
    inputs = (query, key, value, *cotangent_inputs)  # what every output varies with (shard_map)

    def cotangent_specs(t: _Tiles) -> list[Any]:
        return [t.rows, t.rows, t.row_scalars]

    chunk_states, chunk_norms = launch(
        "grad_states",
        _grad_state_kernel,
        lambda t: [t.rows, *cotangent_specs(t)],
        lambda t: [t.states, t.norms],
        kernel_outputs(
            inputs,
            ((batch, num_heads, num_chunks, head_dim, head_dim), value.dtype),
            ((batch, num_heads, num_chunks, head_dim), jnp.float32),
        ),
    )(query, *cotangent_inputs)
    later_states = exclusive_prefix_sum(chunk_states, out_dtype=value.dtype, reverse=True)
    later_norms = exclusive_prefix_sum(chunk_norms, reverse=True)

    dq: Array = launch(
        "grad_query",
        _grad_query_kernel,
        lambda t: [t.rows, t.kv_rows, t.kv_rows, *cotangent_specs(t), t.kv_states, t.kv_norms],
        lambda t: t.rows,
        kernel_outputs(inputs, (query.shape, query.dtype))[0],
    )(query, key, value, *cotangent_inputs, residuals.prefix_states, residuals.prefix_norms)

    # Grouped heads: each query head's share is summed over its group below, in float32.
    kv_grad_dtype = key.dtype if group == 1 else jnp.float32
    dk, dv = launch(
        "grad_key_value",
        _grad_key_value_kernel,
        lambda t: [t.rows, t.kv_rows, t.kv_rows, *cotangent_specs(t), t.states, t.norms],
        lambda t: [t.rows, t.rows],
        kernel_outputs(inputs, *[((batch, num_heads, seq, head_dim), kv_grad_dtype)] * 2),
    )(query, key, value, *cotangent_inputs, later_states, later_norms)
    if group > 1:
        shape = (batch, num_kv_heads, group, seq, head_dim)
        dk = dk.reshape(shape).sum(axis=2).astype(key.dtype)
        dv = dv.reshape(shape).sum(axis=2).astype(value.dtype)
    return dq, dk, dv
