"""Where the XLA formulation of LINEAR spends its forward: stages timed one by one (B1 S16384 H16 D128 bf16, causal).

Each stage is its own jitted function on the previous stage's outputs, so the stage times add up
to more than the fused forward (no fusion across stages) but rank the stages. Prints a table and
writes $OUT/linear_profile.json. ``--smoke`` runs tiny sizes on CPU.
"""

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from _timing import median_seconds  # benchmarks/_timing.py (scripts run from benchmarks/)

from attnax import linear_attention
from attnax.kernels.linear import xla

SMOKE = "--smoke" in sys.argv
B, H, S, D = (1, 2, 256, 16) if SMOKE else (1, 16, 16384, 128)
CHUNK = 64 if SMOKE else 128
OUT = os.environ.get("OUT", "benchmarks/results")
ACC = jnp.float32
OPERAND = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32


def timed(fn: Callable[..., Any], *args: Any) -> float:
    """Median ms over 10 rounds of 10 back-to-back calls."""
    return median_seconds(fn, *args) * 1e3


def einsum(spec: str, *xs: jax.Array) -> jax.Array:
    return jnp.einsum(spec, *xs, preferred_element_type=ACC)


@jax.jit
def features(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
    phi_q = (jax.nn.elu(q.astype(ACC)) + 1).astype(OPERAND)
    phi_k = (jax.nn.elu(k.astype(ACC)) + 1).astype(OPERAND)
    return phi_q, phi_k, v.astype(OPERAND)


def chunked(x: jax.Array) -> jax.Array:
    return x.reshape(B, H, S // CHUNK, CHUNK, D)


@jax.jit
def chunk_states(k_c: jax.Array, v_c: jax.Array) -> tuple[jax.Array, jax.Array]:
    states = jnp.einsum("bkncd,bknce->bknde", k_c, v_c, preferred_element_type=OPERAND)
    return states, jnp.sum(k_c, axis=3, dtype=ACC)


@jax.jit
def chunk_states_f32(k_c: jax.Array, v_c: jax.Array) -> tuple[jax.Array, jax.Array]:
    return einsum("bkncd,bknce->bknde", k_c, v_c), jnp.sum(k_c, axis=3, dtype=ACC)


@jax.jit
def prefix(states: jax.Array, norms: jax.Array) -> tuple[jax.Array, jax.Array]:
    return (
        xla.exclusive_prefix_sum(states).astype(OPERAND),
        xla.exclusive_prefix_sum(norms).astype(OPERAND),
    )


@jax.jit
def prefix_cumsum(states: jax.Array, norms: jax.Array) -> tuple[jax.Array, jax.Array]:
    return (
        (jnp.cumsum(states, axis=2) - states).astype(OPERAND),
        (jnp.cumsum(norms, axis=2) - norms).astype(OPERAND),
    )


@jax.jit
def intra(q_c: jax.Array, k_c: jax.Array) -> tuple[jax.Array, jax.Array]:
    weights = jnp.einsum("bkncd,bknjd->bkncj", q_c, k_c, preferred_element_type=OPERAND)
    weights = jnp.where(jnp.tril(jnp.ones((CHUNK, CHUNK), bool)), weights, 0)
    return weights, jnp.sum(weights, axis=-1, dtype=ACC)


@jax.jit
def intra_f32(q_c: jax.Array, k_c: jax.Array) -> tuple[jax.Array, jax.Array]:
    weights = einsum("bkncd,bknjd->bkncj", q_c, k_c)
    weights = jnp.where(jnp.tril(jnp.ones((CHUNK, CHUNK), bool)), weights, 0.0)
    return weights.astype(OPERAND), jnp.sum(weights, axis=-1)


@jax.jit
def combine(
    weights: jax.Array, row_sums: jax.Array, q_c: jax.Array, v_c: jax.Array, state: jax.Array,
    norm: jax.Array,
) -> jax.Array:
    numerator = einsum("bkncj,bknje->bknce", weights, v_c) + einsum(
        "bkncd,bknde->bknce", q_c, state
    )
    denominator = row_sums + einsum("bkncd,bknd->bknc", q_c, norm)
    return (numerator / denominator[..., None]).astype(jnp.bfloat16)


def main() -> None:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (B, H, S, D), jnp.bfloat16) for key in keys)
    rows: list[dict[str, Any]] = []

    def add(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        ms = timed(fn, *args)
        rows.append({"stage": name, "ms": round(ms, 4)})
        print(f"{name:42s} {ms:8.3f} ms", flush=True)
        return fn(*args)

    full = jax.jit(
        lambda q, k, v: linear_attention(q, k, v, causal=True, chunk_size=CHUNK, use_pallas=False)
    )
    add("full forward (linear_attention)", full, q, k, v)
    phi_q, phi_k, v_op = add("feature maps and casts", features, q, k, v)
    q_c, k_c, v_c = chunked(phi_q), chunked(phi_k), chunked(v_op)
    states_f32, norms = add("chunk states K_c^T V_c (float32 out)", chunk_states_f32, k_c, v_c)
    add("exclusive prefix (float32 states, cumsum)", prefix_cumsum, states_f32, norms)
    add("exclusive prefix (float32 states, matmul)", prefix, states_f32, norms)
    states, norms = add("chunk states K_c^T V_c (operand dtype out)", chunk_states, k_c, v_c)
    state, norm = add("exclusive prefix (operand-dtype states, matmul)", prefix, states, norms)
    add("intra-chunk weights + mask (float32 out)", intra_f32, q_c, k_c)
    weights, row_sums = add("intra-chunk weights + mask (operand dtype out)", intra, q_c, k_c)
    add("numerators, denominator, divide", combine, weights, row_sums, q_c, v_c, state, norm)
    grad = jax.jit(
        jax.grad(
            lambda q, k, v: jnp.sum(
                linear_attention(q, k, v, causal=True, chunk_size=CHUNK).astype(ACC)
            ),
            argnums=(0, 1, 2),
        )
    )
    add("full forward+backward", grad, q, k, v)
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "linear_profile_smoke.json" if SMOKE else "linear_profile.json")
    with open(path, "w") as fh:
        json.dump(
            {
                "device": jax.devices()[0].device_kind,
                "config": f"B{B} S{S} H{H} D{D} chunk {CHUNK} bf16 causal",
                "rows": rows,
            },
            fh,
            indent=1,
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
