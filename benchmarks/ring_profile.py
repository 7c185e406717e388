"""Where the default ring's forward spends its time: its parts timed alone, and traces.

The zigzag ring's forward on two GPUs (B1, H16, D128, bf16, causal, total length T) is one
diagonal pair (causal cuDNN on the T/2 local tokens), one K/V transfer that should overlap it,
one off-diagonal pair (cuDNN, unmasked, T/2 x T/4 or T/4 x T/2) and a float32 merge. Its floor
is the two pair kernels' time. This script measures, in interleaved samples of 3 calls each:
that floor on one GPU, the ring, and one GPU's cuDNN call on the whole sequence (forward and
forward+backward). It then traces three forward calls of the ring and of the single GPU with
JAX's profiler. It writes each GPU's per-stream kernel timeline and its device time per call,
so the gap (transfer, merge, copies, the conditional) can be named; their ratio is the
throughput ratio without host time.

Usage (nvidia-h100-x2)::

    python benchmarks/ring_profile.py --seq 65536      # writes $OUT/ring_profile_2xh100.json
    python benchmarks/ring_profile.py --smoke          # CPU, 2 virtual devices, tiny sizes
"""

import argparse
import glob
import gzip
import json
import os
import statistics
import sys

if "--smoke" in sys.argv:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _timing import sample_seconds
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ring import causal_ring, random_qkv, with_grad

from attnax._mods import causal_mod
from attnax.kernels.ring import pair_kernels
from attnax.kernels._flash import flash_attention


def interleaved_ms(fns: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]], samples: int,
                   calls: int) -> dict[str, float]:
    """Median ms per call of each function, samples of all functions taken in turn."""
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(samples):
        for name, (fn, args) in fns.items():
            times[name].append(sample_seconds(fn, args, calls) * 1e3)
    return {name: round(statistics.median(t), 3) for name, t in times.items()}


def trace_timeline(
    fn: Callable[..., Any], args: tuple[Any, ...], tag: str
) -> tuple[list[str], list[float]]:
    """Per-device, per-stream GPU events of three calls from a perfetto trace, as text lines,
    and each GPU's milliseconds per call (first event's start to last event's end, over 3)."""
    log_dir = os.path.join("/tmp", f"ring_trace_{tag}")
    jax.block_until_ready(fn(*args))
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(3):
            result = fn(*args)
        jax.block_until_ready(result)
    paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        return [f"no perfetto trace under {log_dir}: {os.listdir(log_dir)}"], []
    with gzip.open(paths[0]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {}
    threads = {}
    for event in events:
        if event.get("ph") == "M" and event.get("name") == "process_name":
            names[event["pid"]] = event["args"]["name"]
        if event.get("ph") == "M" and event.get("name") == "thread_name":
            threads[(event["pid"], event["tid"])] = event["args"]["name"]
    lines: list[str] = []
    periods: list[float] = []
    gpu_pids = [pid for pid, name in names.items() if "/device:GPU" in name]
    if not gpu_pids:
        return [f"no GPU process in the trace; processes: {sorted(names.values())}"], []
    for pid in sorted(gpu_pids):
        spans = sorted((e for e in events if e.get("pid") == pid and e.get("ph") == "X"),
                       key=lambda e: e["ts"])
        if not spans:
            continue
        origin = spans[0]["ts"]
        end = max(e["ts"] + e["dur"] for e in spans)
        periods.append(round((end - origin) / 3 / 1e3, 3))
        lines.append(f"== {names[pid]}: {periods[-1]} ms per call")
        for e in spans:
            thread = threads.get((pid, e["tid"]), str(e["tid"]))
            lines.append(f"{e['ts'] - origin:10.1f} us {e['dur']:9.1f} us  [{thread[:28]:28s}] "
                         f"{e['name'][:90]}")
    return lines, periods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--no-trace", action="store_true")
    args = parser.parse_args()
    heads, head_dim = (2, 16) if args.smoke else (16, 128)
    seq = 64 if args.smoke else args.seq
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    devices = jax.devices()[:2]
    mesh = Mesh(np.array(devices), ("seq",))
    spec = PartitionSpec(None, None, "seq", None)  # type: ignore[no-untyped-call]
    sharded = NamedSharding(mesh, spec)
    single = jax.sharding.SingleDeviceSharding(devices[0])
    out_dir = os.environ.get("OUT", "benchmarks/results")
    report: dict[str, Any] = {"devices": [d.device_kind for d in devices],
                              "jax_version": jax.__version__, "seq": seq}

    ring_args = random_qkv((1, heads, seq, head_dim), dtype, sharded, seq)
    full_args = random_qkv((1, heads, seq, head_dim), dtype, single, seq)
    # The default ring and one GPU's cuDNN, forward and forward+backward.
    fns: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {}
    single_fn = lambda q, k, v: flash_attention(q, k, v, score_mod=causal_mod())  # noqa: E731
    ring_fn = causal_ring(mesh, spec, layout="zigzag", pairs=None, block_size=512)
    for mode in ("fwd", "fwd+bwd"):
        fns[f"ring_{mode}"] = (jax.jit(ring_fn if mode == "fwd" else with_grad(ring_fn)),
                               ring_args)
        fns[f"single_{mode}"] = (
            jax.jit(single_fn if mode == "fwd" else with_grad(single_fn)), full_args)
    if devices[0].platform == "gpu":
        # The ring's two pair kernels alone on one GPU (the local shard is T/2, a chunk T/4).
        local = random_qkv((1, heads, seq // 2, head_dim), dtype, single, seq + 1)
        quarter = random_qkv((1, heads, seq // 4, head_dim), dtype, single, seq + 2)
        scale = head_dim**-0.5
        pair = pair_kernels.cudnn_forward
        fns["diagonal_causal_T/2"] = (
            jax.jit(lambda q, k, v: pair(q, k, v, causal=True, scale=scale)), local)
        fns["pair_T/2_x_T/4"] = (
            jax.jit(lambda q, k, v: pair(q, k, v, causal=False, scale=scale)),
            (local[0], quarter[1], quarter[2]))
        fns["pair_T/4_x_T/2"] = (
            jax.jit(lambda q, k, v: pair(q, k, v, causal=False, scale=scale)),
            (quarter[0], local[1], local[2]))
    report["ms"] = interleaved_ms(fns, args.samples, 3)
    ms = report["ms"]
    if "diagonal_causal_T/2" in ms:
        floor = ms["diagonal_causal_T/2"] + max(ms["pair_T/2_x_T/4"], ms["pair_T/4_x_T/2"])
        report["pair_floor_ms"] = round(floor, 3)
        report["ratio_at_floor"] = round(ms["single_fwd"] / floor, 3)
    report["ratios"] = {
        mode: round(ms[f"single_{mode}"] / ms[f"ring_{mode}"], 3) for mode in ("fwd", "fwd+bwd")
    }
    for name, value in report.items():
        print(f"{name:24s} {value}", flush=True)

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "ring_fwd_hlo.txt"), "w") as f:
        f.write(fns["ring_fwd"][0].lower(*ring_args).compile().as_text() or "")
    for name in ("ring_fwd", "single_fwd"):
        if args.no_trace:
            break
        fn, fn_args = fns[name]
        try:
            lines, periods = trace_timeline(fn, fn_args, name)
            if periods:
                report[f"{name}_device_ms_per_call"] = periods
        except Exception as error:  # noqa: BLE001 - the timings above stand without a trace
            lines = [f"trace failed: {type(error).__name__}: {error}"]
        with open(os.path.join(out_dir, f"{name}_timeline.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    if "ring_fwd_device_ms_per_call" in report and "single_fwd_device_ms_per_call" in report:
        report["device_time_ratio_fwd"] = round(
            report["single_fwd_device_ms_per_call"][0]
            / max(report["ring_fwd_device_ms_per_call"]), 3)
    print(f"device time per call: {report.get('ring_fwd_device_ms_per_call')} (ring), "
          f"{report.get('single_fwd_device_ms_per_call')} (single), "
          f"ratio {report.get('device_time_ratio_fwd')}", flush=True)
    name = "ring_profile_smoke.json" if args.smoke else "ring_profile_2xh100.json"
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
