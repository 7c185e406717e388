"""Probe: how fast can a Mosaic-GPU forward be on the full-attention configs (one GPU)?

Times JAX's own Mosaic-GPU FlashAttention-3 example (``attention_mgpu``, forward only, fp16:
its shared-memory scratch is declared float16) at several tunings, beside attnax's Triton
forward (``block_kv=64``) in fp16 and bf16, same process, same timer. The answer decides
whether a Mosaic-GPU forward for PALLAS_FLASH is worth writing (benchmarks/NOTES.md).

Writes ``$OUT/mgpu_probe_h100.json``.
"""

import json
import os
import sys
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
from _timing import median_seconds

from attnax.kernels._pallas_flash import FlashConfig, flash_attention_with_config

HEADS, HEAD_DIM = 16, 128
START = time.perf_counter()
rows: list[dict[str, Any]] = []


def record(impl: str, cfg: str, fn: Any, args: tuple[Any, ...], flops: float) -> None:
    try:
        jitted = jax.jit(fn)
        jax.block_until_ready(jitted(*args))
        ms = median_seconds(jitted, *args, samples=10, calls=10, warmup=2) * 1e3
        tf = flops / (ms * 1e-3) / 1e12
        rows.append({"impl": impl, "cfg": cfg, "mode": "fwd", "ms": round(ms, 4), "tflops": round(tf, 1)})
        print(f"{impl:44s} {cfg:16s} {ms:8.3f} ms {tf:6.1f} TF/s", flush=True)
    except Exception as error:  # noqa: BLE001 - a probe records failures and moves on
        message = (type(error).__name__ + ": " + str(error)).splitlines()[0][:300]
        rows.append({"impl": impl, "cfg": cfg, "mode": "fwd", "error": message})
        print(f"{impl:44s} {cfg:16s} FAILED {message}", flush=True)
        traceback.print_exc(limit=2)


def main() -> None:
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 200.0
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

    tunings = [(64, 128, 2), (64, 64, 2), (64, 128, 3), (64, 64, 3), (64, 64, 4), (64, 256, 2)]
    for batch, seq in ((4, 4096), (1, 16384)):
        cfg = f"B{batch} S{seq} full"
        flops = 4 * batch * HEADS * seq**2 * HEAD_DIM
        keys = jax.random.split(jax.random.key(0), 3)
        shape = (batch, HEADS, seq, HEAD_DIM)
        for dtype in (jnp.bfloat16, jnp.float16):
            q, k, v = (jax.random.normal(key, shape, dtype) for key in keys)
            config = FlashConfig(block_kv=64)
            record(
                f"attnax triton 128x64 {jnp.dtype(dtype).name}",
                cfg,
                lambda q, k, v, config=config: flash_attention_with_config(q, k, v, config=config),
                (q, k, v),
                flops,
            )
        # attention_mgpu takes (B, T, H, D).
        q, k, v = (jax.random.normal(key, (batch, seq, HEADS, HEAD_DIM), jnp.float16) for key in keys)
        for block_q, block_kv, stages in tunings:
            if time.perf_counter() - START > budget:
                break
            tuning = mgpu.TuningConfig(
                block_q=block_q, block_kv=block_kv, max_concurrent_steps=stages, causal=False
            )
            record(
                f"attention_mgpu {2 * block_q}x{block_kv} s{stages} fp16",
                cfg,
                lambda q, k, v, tuning=tuning: mgpu.attention(q, k, v, tuning),
                (q, k, v),
                flops,
            )
    out = os.environ.get("OUT", "benchmarks/results")
    with open(os.path.join(out, "mgpu_probe_h100.json"), "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
