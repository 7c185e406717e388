"""LINEAR chunk-size probe beside cuDNN FLASH (B1 S16384 H16 D128 bf16 causal; fwd and fwd+bwd).

Writes $OUT/linear_chunks.json; prints a table. Same process, same card for every row.
"""

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from attnax import causal_mod, linear_attention
from attnax.kernels._flash import flash_attention_bthd

OUT = os.environ.get("OUT", "benchmarks/results")
B, H, S, D = 1, 16, 16384, 128
keys = jax.random.split(jax.random.key(0), 4)
q, k, v, g = (jax.random.normal(key, (B, S, H, D), jnp.bfloat16) for key in keys)
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


swap = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
impls = {"flash (cuDNN)": lambda q, k, v: flash_attention_bthd(q, k, v, score_mod=causal_mod())}
for chunk in (64, 128, 256, 512):
    impls[f"linear chunk {chunk}"] = lambda q, k, v, chunk=chunk: swap(
        linear_attention(swap(q), swap(k), swap(v), causal=True, chunk_size=chunk)
    )
for name, fn in impls.items():
    forward, both = fwd_and_bwd(fn)
    try:
        row = dict(impl=name, fwd_ms=timed(forward, q, k, v), fwdbwd_ms=timed(both, q, k, v, g))
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
