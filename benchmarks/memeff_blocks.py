"""MEMORY_EFFICIENT block-size probe beside XLA, B1 S16384 H16 D128 bf16, causal and full, fwd.

Both paths of ``memory_efficient_attention``: the fused GPU tile (an XLA scan over steps of
``block_size`` keys, one stepped Pallas kernel per step) and the XLA tiles
(``implementation="xla"``), beside XLA's dense attention and PALLAS_FLASH (the same kernel in
one step) in the same process on the same card. Timer: two warm-up calls, then samples of 10
calls dispatched back to back; median over 10 samples.

Writes $OUT/memeff_blocks.json; prints a table.
"""

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from _timing import median_seconds  # benchmarks/_timing.py (scripts run from benchmarks/)

from attnax import causal_mod, memory_efficient_attention, pallas_flash_attention

OUT = os.environ.get("OUT", "benchmarks/results")
SMOKE = "--smoke" in sys.argv
B, H, S, D = (1, 2, 512, 32) if SMOKE else (1, 16, 16384, 128)
CALLS, SAMPLES = (2, 3) if SMOKE else (10, 10)
keys = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(key, (B, H, S, D), jnp.bfloat16) for key in keys)
rows: list[dict[str, Any]] = []


def timed(fn: Callable[..., Any]) -> float:
    return median_seconds(fn, q, k, v, samples=SAMPLES, calls=CALLS, warmup=2) * 1e3


def impls(causal: bool) -> dict[str, Callable[..., Any]]:
    mod = causal_mod() if causal else None

    def xla(q: Any, k: Any, v: Any) -> Any:
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
        return jnp.swapaxes(out, 1, 2)

    table: dict[str, Callable[..., Any]] = {"xla": jax.jit(xla)}
    for block in (512, 4096):
        table[f"memeff xla tiles {block}"] = jax.jit(
            lambda q, k, v, block=block: memory_efficient_attention(
                q, k, v, score_mod=mod, block_size=block, implementation="xla"
            )
        )
    for block in (128, 256, 512, 1024, 2048, 4096, S):
        table[f"memeff fused {block}"] = jax.jit(
            lambda q, k, v, block=block: memory_efficient_attention(
                q, k, v, score_mod=mod, block_size=block
            )
        )
    table["pallas_flash"] = jax.jit(lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=mod))
    return table


device = jax.devices()[0]
print(f"device: {device.device_kind}, jax {jax.__version__}", flush=True)
for causal in (True, False):
    flops = 4 * B * H * S * S * D / (2 if causal else 1)
    xla_ms = None
    for name, fn in impls(causal).items():
        row: dict[str, Any] = {"impl": name, "causal": causal}
        try:
            ms = timed(fn)
            xla_ms = ms if name == "xla" else xla_ms
            row.update(ms=ms, tflops=flops / ms / 1e9)
            if xla_ms is not None:
                row["xla_over_time"] = xla_ms / ms
            ratio = row.get("xla_over_time", float("nan"))
            print(f"{'causal' if causal else 'full':6s} {name:24s} {ms:9.3f} ms "
                  f"{flops / ms / 1e9:7.1f} TF/s  xla/this {ratio:5.2f}", flush=True)
        except Exception as error:  # noqa: BLE001 - a probe records failures and goes on
            row["error"] = str(error).splitlines()[0][:200]
            print(name, "FAILED", row["error"], flush=True)
        rows.append(row)
with open(os.path.join(OUT, "memeff_blocks.json"), "w") as fh:
    config = f"B{B} S{S} H{H} D{D} bf16 fwd"
    json.dump({"device": device.device_kind, "jax": jax.__version__, "config": config,
               "calls_per_sample": CALLS, "samples": SAMPLES, "rows": rows}, fh, indent=1)
