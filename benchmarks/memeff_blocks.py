"""MEMORY_EFFICIENT block-size probe beside XLA on one config (B1 S16384 H16 D128 bf16 causal).

Writes $OUT/memeff_blocks.json; prints a table. Same process, same card for every row.
"""

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from attnax import causal_mod, memory_efficient_attention

OUT = os.environ.get("OUT", "benchmarks/results")
B, H, S, D = 1, 16, 16384, 128
keys = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(key, (B, H, S, D), jnp.bfloat16) for key in keys)
flops = 4 * B * H * S * S * D / 2
rows = []


def timed(fn):  # type: ignore[no-untyped-def]
    jax.block_until_ready(fn(q, k, v))
    times = []
    for _ in range(10):
        start = time.perf_counter()
        jax.block_until_ready(fn(q, k, v))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def xla(q, k, v):  # type: ignore[no-untyped-def]
    t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    return t(jax.nn.dot_product_attention(t(q), t(k), t(v), is_causal=True, implementation="xla"))


impls = {"xla": jax.jit(xla)}
for block in (256, 512, 1024, 2048, 4096):
    impls[f"memeff block {block}"] = jax.jit(
        lambda q, k, v, block=block: memory_efficient_attention(q, k, v, score_mod=causal_mod(), block_size=block)
    )
for name, fn in impls.items():
    try:
        ms = timed(fn)
        rows.append(dict(impl=name, ms=ms, tflops=flops / ms / 1e9))
        print(f"{name:22s} {ms:9.3f} ms {flops / ms / 1e9:7.1f} TF/s", flush=True)
    except Exception as error:  # a probe records failures and goes on
        rows.append(dict(impl=name, error=str(error).splitlines()[0][:200]))
        print(name, "FAILED", str(error).splitlines()[0][:200], flush=True)
with open(os.path.join(OUT, "memeff_blocks.json"), "w") as fh:
    json.dump({"device": jax.devices()[0].device_kind, "config": "B1 S16384 H16 D128 bf16 causal fwd", "rows": rows}, fh, indent=1)
