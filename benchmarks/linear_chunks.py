"""LINEAR beside cuDNN FLASH (B1 S16384 H16 D128 bf16 causal; forward and forward+backward).

``linear chunk N`` is the default dispatch (fused Pallas forward and backward on a GPU); the
other rows change one knob of it (``xla bwd``: the XLA formulation's autodiff as backward,
``vsplit``: value columns per output program, ``warps``: Triton warps of a kernel) or force the
XLA formulation (``xla``). ``--stages`` adds each fused stage jitted alone at chunk 128.

Timing: each sample dispatches ``--calls`` calls back to back and waits for the last, so the
host's per-call wait is not in the figure; the median of ``--samples`` samples is reported.
Every row of a run is in one process on one card. Each kernel gets its inputs in its own
layout, as the layer's projections produce them: FLASH (B, T, H, D), LINEAR (B, H, T, D).

Writes $OUT/linear_chunks.json (or --out); prints a table.
"""

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from _timing import median_seconds  # benchmarks/_timing.py (scripts run from benchmarks/)

from attnax import causal_mod, linear_attention
from attnax.kernels._flash import flash_attention_bthd
from attnax.kernels.linear import fused, pallas, pallas_vjp, xla

parser = argparse.ArgumentParser()
parser.add_argument("--calls", type=int, default=10)
parser.add_argument("--samples", type=int, default=7)
parser.add_argument("--stages", action="store_true")
parser.add_argument("--seq", type=int, default=16384)
parser.add_argument(
    "--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "linear_chunks.json")
)
args = parser.parse_args()

B, H, S, D = 1, 16, args.seq, 128
keys = jax.random.split(jax.random.key(0), 4)
q, k, v, g = (jax.random.normal(key, (B, S, H, D), jnp.bfloat16) for key in keys)
q_h, k_h, v_h, g_h = (jnp.swapaxes(x, 1, 2) for x in (q, k, v, g))
DEFAULTS = tuple(
    dict(d)
    for d in (
        pallas.NUM_WARPS,
        pallas.NUM_STAGES,
        pallas.CHUNKS_PER_PROGRAM,
    )
)


def timed(fn: Callable[..., Any], *inputs: Any) -> float:
    return median_seconds(fn, *inputs, samples=args.samples, calls=args.calls) * 1e3


def fwd_and_bwd(fn: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def both(q: Any, k: Any, v: Any, g: Any) -> Any:
        _, vjp = jax.vjp(fn, q, k, v)
        return vjp(g)

    return jax.jit(fn), jax.jit(both)


def configure(
    warps: dict[str, int] | None = None,
    stages: dict[str, int] | None = None,
    per_program: dict[str, int] | None = None,
    fused_bwd: bool = True,
    min_chunk: int = 128,
) -> None:
    for knob, default, override in zip(
        (pallas.NUM_WARPS, pallas.NUM_STAGES, pallas.CHUNKS_PER_PROGRAM),
        DEFAULTS,
        (warps, stages, per_program),
        strict=True,
    ):
        knob.clear()
        knob.update(default, **(override or {}))
    fused.FUSED_BACKWARD = fused_bwd
    fused.FUSED_MIN_CHUNK = min_chunk
    # The knobs are read when the kernels are traced; inner jits cache their traces.
    jax.clear_caches()


def linear(chunk: int, **knobs: Any) -> tuple[Callable[..., Any], dict[str, Any]]:
    return (lambda q, k, v: linear_attention(q, k, v, causal=True, chunk_size=chunk)), knobs


ONE_PER_PROGRAM = {name: 1 for name in pallas.CHUNKS_PER_PROGRAM}
impls: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "flash (cuDNN)": (lambda q, k, v: flash_attention_bthd(q, k, v, score_mod=causal_mod()), {}),
    "linear default (chunk_size=64)": linear(64),
    "linear chunk 64 kernels": linear(64, min_chunk=0),
    "linear chunk 128 one chunk per program": linear(
        128, per_program=ONE_PER_PROGRAM, stages={"states": 1}
    ),
    "linear chunk 128 xla bwd": linear(128, fused_bwd=False),
    "linear chunk 128 states 4/program 3 stages": linear(
        128, per_program={"states": 4}, stages={"states": 3}
    ),
    "linear chunk 128 grad_states 2/program 2 stages": linear(
        128, per_program={"grad_states": 2}, stages={"grad_states": 2}
    ),
    "linear chunk 128 grad_query 2/program": linear(128, per_program={"grad_query": 2}),
    "linear chunk 128 grad_key_value 2/program": linear(128, per_program={"grad_key_value": 2}),
    "linear chunk 128 grad_query 4 warps": linear(128, warps={"grad_query": 4}),
    "linear chunk 128 xla": (
        lambda q, k, v: linear_attention(q, k, v, causal=True, chunk_size=128, use_pallas=False),
        {},
    ),
}
rows: list[dict[str, Any]] = []
for name, (fn, knobs) in impls.items():
    configure(**knobs)
    forward, both = fwd_and_bwd(fn)
    inputs = (q, k, v, g) if name.startswith("flash") else (q_h, k_h, v_h, g_h)
    try:
        row: dict[str, Any] = {
            "impl": name, "fwd_ms": timed(forward, *inputs[:3]), "fwdbwd_ms": timed(both, *inputs)
        }
    except Exception as error:  # noqa: BLE001 - a probe records failures and goes on
        row = {"impl": name, "error": str(error).splitlines()[0][:300]}
    rows.append(row)
    print(row, flush=True)
configure()

flash = rows[0]
for row in rows[1:]:
    if "fwd_ms" in row and "fwd_ms" in flash:
        row["speedup_vs_flash_fwd"] = flash["fwd_ms"] / row["fwd_ms"]
        row["speedup_vs_flash_fwdbwd"] = flash["fwdbwd_ms"] / row["fwdbwd_ms"]
print(f"{'impl':44s} {'fwd ms':>8s} {'f+b ms':>8s} {'fwd x':>6s} {'f+b x':>6s}")
for row in rows:
    if "fwd_ms" in row:
        print(
            f"{row['impl']:44s} {row['fwd_ms']:8.3f} {row['fwdbwd_ms']:8.3f} "
            f"{row.get('speedup_vs_flash_fwd', 1.0):6.2f} {row.get('speedup_vs_flash_fwdbwd', 1.0):6.2f}"
        )

stages: list[dict[str, Any]] = []
if args.stages:
    chunk, scale = 128, 1.0
    INTERPRET = jax.default_backend() != "gpu"  # a CPU smoke run of this script
    prefix = xla.exclusive_prefix_sum
    forward = jax.jit(
        lambda q, k, v: pallas.fused_causal_forward(
            q, k, v, chunk=chunk, scale=scale, exclusive_prefix_sum=prefix, interpret=INTERPRET
        )
    )
    out, saved = forward(q_h, k_h, v_h)
    states, norms = jax.jit(
        lambda k, v: pallas.chunk_states(k, v, chunk=chunk, interpret=INTERPRET)
    )(k_h, v_h)
    stage_fns: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
        "fwd: chunk_states kernel": (
            jax.jit(
                lambda k, v: pallas.chunk_states(k, v, chunk=chunk, interpret=INTERPRET)
            ),
            (k_h, v_h),
        ),
        "fwd: prefix sums, before (unbatched 0/1 matrix, HIGHEST)": (
            jax.jit(
                lambda s, n: tuple(
                    jnp.einsum(
                        "nm,bkm...->bkn...",
                        jnp.tril(jnp.ones((x.shape[2],) * 2, x.dtype), k=-1),
                        x,
                        precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=t,
                    )
                    for x, t in ((s, s.dtype), (n, jnp.float32))
                )
            ),
            (states, norms),
        ),
        "fwd: prefix sums (XLA)": (
            jax.jit(lambda s, n: (prefix(s, out_dtype=s.dtype), prefix(n))),
            (states, norms),
        ),
        "fwd: chunk_outputs kernel": (
            jax.jit(
                lambda q, k, v, s, n: pallas.chunk_outputs(
                    q, k, v, s, n, chunk=chunk, scale=scale, interpret=INTERPRET
                )
            ),
            (q_h, k_h, v_h, saved.prefix_states, saved.prefix_norms),
        ),
        "fwd: whole": (forward, (q_h, k_h, v_h)),
        "bwd: whole (fused)": (
            jax.jit(
                lambda q, k, v, o, r, g: pallas_vjp.fused_causal_backward(
                    q,
                    k,
                    v,
                    o,
                    r,
                    g,
                    chunk=chunk,
                    scale=scale,
                    exclusive_prefix_sum=prefix,
                    interpret=INTERPRET,
                )
            ),
            (q_h, k_h, v_h, out, saved, g_h),
        ),
    }
    for name, (fn, inputs) in stage_fns.items():
        try:
            stage = {"stage": name, "ms": timed(fn, *inputs)}
        except Exception as error:  # noqa: BLE001 - as above
            stage = {"stage": name, "error": str(error).splitlines()[0][:300]}
        stages.append(stage)
        print(stage, flush=True)

os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
with open(args.out, "w") as fh:
    json.dump(
        {
            "device": jax.devices()[0].device_kind,
            "config": f"B1 S{S} H16 D128 bf16 causal",
            "timer": f"median of {args.samples} samples of {args.calls} back-to-back calls",
            "rows": rows,
            "stages": stages,
        },
        fh,
        indent=1,
    )
