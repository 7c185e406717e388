"""LINEAR chunk-size and fused-design probe beside cuDNN FLASH (B1 S16384 H16 D128 bf16 causal).

Every row times the forward and the forward+backward. ``linear chunk N`` is the default dispatch
(on a GPU the fused-chunk Pallas kernels, forward and backward); ``... two_pass`` rows force the
earlier fused design (chunk states, XLA prefix matmul, chunk outputs; XLA-autodiff backward),
``... xla`` rows the XLA formulation, and ``fused_chunk c.. bv.. w.. s..`` rows sweep the
fused-chunk launch knobs (chunk, column block, warps, pipeline stages; the same knobs for its
forward and backward kernels).

Writes $OUT/linear_chunks.json; prints a table. Same process, same card for every row.
Each kernel gets its inputs in its own layout, as the layer's projections produce them: FLASH
(B, T, H, D), LINEAR (B, H, T, D).

``--only a,b`` runs the FLASH row and the rows whose names contain ``a`` or ``b``.
``--smoke`` checks every row's code path on a CPU: tiny shapes, the Pallas interpreter, one
timed call per row (the times mean nothing).
"""

import argparse
import copy
import itertools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from attnax import causal_mod, linear_attention
from attnax.kernels import _linear_pallas
from attnax.kernels._flash import flash_attention_bthd

parser = argparse.ArgumentParser()
parser.add_argument("--only", default="", help="comma-separated substrings of row names")
parser.add_argument("--smoke", action="store_true", help="tiny interpreted run (CPU check)")
cli = parser.parse_args()
OUT = os.environ.get("OUT", "benchmarks/results")
B, H, S, D = (1, 2, 256, 32) if cli.smoke else (1, 16, 16384, 128)
REPEATS = 1 if cli.smoke else 20
INTERPRET = cli.smoke
keys = jax.random.split(jax.random.key(0), 4)
q, k, v, g = (jax.random.normal(key, (B, S, H, D), jnp.bfloat16) for key in keys)
bhtd = {id(x): jnp.swapaxes(x, 1, 2) for x in (q, k, v, g)}
rows = []
# The module's knob defaults; every LINEAR row starts from these, then applies its own.
KNOBS = ("NUM_WARPS", "NUM_STAGES", "BLOCK_V", "FUSED_DESIGN", "BACKWARD_LAUNCHES")
DEFAULTS = {name: copy.deepcopy(getattr(_linear_pallas, name)) for name in KNOBS}


def timed(fn, *args):  # type: ignore[no-untyped-def]
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def fwd_and_bwd(fn):  # type: ignore[no-untyped-def]
    forward = jax.jit(fn)

    def both(q, k, v, g):  # type: ignore[no-untyped-def]
        _, vjp = jax.vjp(fn, q, k, v)
        return vjp(g)

    return forward, jax.jit(both)


def linear(chunk, use_pallas=None, **knobs):  # type: ignore[no-untyped-def]
    """LINEAR with the module knobs at their defaults updated by ``knobs`` (set at trace time).

    Dict knobs (NUM_WARPS, ...) are merged key by key, others replaced.
    """

    def fn(q, k, v):  # type: ignore[no-untyped-def]
        for name in KNOBS:
            value = copy.deepcopy(DEFAULTS[name])
            if isinstance(value, dict):
                value.update(knobs.get(name, {}))
            elif name in knobs:
                value = knobs[name]
            setattr(_linear_pallas, name, value)
        return linear_attention(
            q, k, v, causal=True, chunk_size=chunk, use_pallas=use_pallas, interpret=INTERPRET
        )

    return fn


impls = {"flash (cuDNN)": lambda q, k, v: flash_attention_bthd(q, k, v, score_mod=causal_mod())}
for chunk in (64, 128, 256):
    impls[f"linear chunk {chunk}"] = linear(chunk)
for chunk in (64, 128):
    impls[f"linear chunk {chunk} two_pass"] = linear(chunk, FUSED_DESIGN="two_pass")
for warps in ((4, 4), (4, 8), (8, 4)):  # two-pass warps (states, outputs); default (8, 8)
    impls[f"linear chunk 128 two_pass warps {warps}"] = linear(
        128, FUSED_DESIGN="two_pass", NUM_WARPS={"states": warps[0], "outputs": warps[1]}
    )
for chunk, block, warps, stages in itertools.product((64, 128), (64, 32), (4, 8), (1, 2)):
    both_kernels = ("fused_forward", "fused_backward")
    impls[f"fused_chunk c{chunk} bv{block} w{warps} s{stages}"] = linear(
        chunk,
        FUSED_DESIGN="fused_chunk",
        NUM_WARPS=dict.fromkeys(both_kernels, warps),
        NUM_STAGES=dict.fromkeys(both_kernels, stages),
        BLOCK_V=dict.fromkeys(both_kernels, block),
    )
impls["fused_chunk c64 default knobs, 3 backward launches"] = linear(64, BACKWARD_LAUNCHES=3)
for chunk in (64, 128):  # the XLA formulation, for comparison with the fused kernels
    impls[f"linear chunk {chunk} xla"] = linear(chunk, use_pallas=False)
only = [part for part in cli.only.split(",") if part]
for name, fn in impls.items():
    if only and not name.startswith("flash") and not any(part in name for part in only):
        continue
    if name.startswith(("linear", "fused")):
        # The knobs are read when the kernels are traced; inner jits cache their traces by
        # argument types, so each LINEAR row starts from empty caches.
        jax.clear_caches()
    forward, both = fwd_and_bwd(fn)
    args = (q, k, v, g) if name.startswith("flash") else tuple(bhtd[id(x)] for x in (q, k, v, g))
    try:
        row = dict(impl=name, fwd_ms=timed(forward, *args[:3]), fwdbwd_ms=timed(both, *args))
    except Exception as error:  # a probe records failures and goes on
        row = dict(impl=name, error=str(error).splitlines()[0][:200])
    rows.append(row)
    print(row, flush=True)
flash = rows[0]
for row in rows[1:]:
    if "fwd_ms" in row and "fwd_ms" in flash:
        row["speedup_vs_flash_fwd"] = flash["fwd_ms"] / row["fwd_ms"]
        row["speedup_vs_flash_fwdbwd"] = flash["fwdbwd_ms"] / row["fwdbwd_ms"]
        print(f"{row['impl']:50s} fwd {row['speedup_vs_flash_fwd']:.2f}x  fwd+bwd {row['speedup_vs_flash_fwdbwd']:.2f}x", flush=True)
name = "linear_chunks_smoke.json" if cli.smoke else "linear_chunks.json"
with open(os.path.join(OUT, name), "w") as fh:
    config = f"B{B} S{S} H{H} D{D} bf16 causal" + (" (interpreted smoke run)" if cli.smoke else "")
    json.dump({"device": jax.devices()[0].device_kind, "config": config, "rows": rows}, fh, indent=1)
