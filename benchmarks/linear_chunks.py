"""LINEAR chunk-size probe beside cuDNN FLASH (B1 S16384 H16 D128 bf16 causal; fwd and fwd+bwd).

``linear chunk N`` is the default dispatch (fused Pallas forward on a GPU); ``... xla`` rows force
the XLA formulation.

Writes $OUT/linear_chunks.json; prints a table. Same process, same card for every row.
Each kernel gets its inputs in its own layout, as the layer's projections produce them: FLASH
(B, T, H, D), LINEAR (B, H, T, D).
"""

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from attnax import causal_mod, linear_attention
from attnax.kernels import _linear_pallas
from attnax.kernels._flash import flash_attention_bthd

OUT = os.environ.get("OUT", "benchmarks/results")
B, H, S, D = 1, 16, 16384, 128
keys = jax.random.split(jax.random.key(0), 4)
q, k, v, g = (jax.random.normal(key, (B, S, H, D), jnp.bfloat16) for key in keys)
bhtd = {id(x): jnp.swapaxes(x, 1, 2) for x in (q, k, v, g)}
rows = []


def timed(fn, *args):  # type: ignore[no-untyped-def]
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(20):
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


impls = {"flash (cuDNN)": lambda q, k, v: flash_attention_bthd(q, k, v, score_mod=causal_mod())}
for chunk in (64, 128, 256):
    impls[f"linear chunk {chunk}"] = lambda q, k, v, chunk=chunk: linear_attention(
        q, k, v, causal=True, chunk_size=chunk
    )
for warps in ((4, 4), (4, 8), (8, 4)):  # fused-kernel warps (states, outputs); default (8, 8)

    def fused_with_warps(q, k, v, warps=warps):  # type: ignore[no-untyped-def]
        _linear_pallas.NUM_WARPS = {"states": warps[0], "outputs": warps[1]}  # read at trace
        return linear_attention(q, k, v, causal=True, chunk_size=128)

    impls[f"linear chunk 128 warps {warps}"] = fused_with_warps
for chunk in (64, 128):  # the XLA formulation, for comparison with the fused kernels
    impls[f"linear chunk {chunk} xla"] = lambda q, k, v, chunk=chunk: linear_attention(
        q, k, v, causal=True, chunk_size=chunk, use_pallas=False
    )
for name, fn in impls.items():
    if "warps" in name:
        # The warps are read when the kernels are traced; inner jits cache their traces by
        # argument types, so each warps setting starts from empty caches.
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
        print(f"{row['impl']:18s} fwd {row['speedup_vs_flash_fwd']:.2f}x  fwd+bwd {row['speedup_vs_flash_fwdbwd']:.2f}x", flush=True)
with open(os.path.join(OUT, "linear_chunks.json"), "w") as fh:
    json.dump({"device": jax.devices()[0].device_kind, "config": "B1 S16384 H16 D128 bf16 causal", "rows": rows}, fh, indent=1)
