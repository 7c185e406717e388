"""Ring attention over 2 GPUs (zigzag, causal) against the best single-GPU attnax kernels.

B1, H16, D128, bf16, causal; forward and forward+backward at total length 65536 and longer.
Single GPU: ``flash_attention`` (cuDNN) and ``memory_efficient_attention`` on the whole
sequence on device 0 (memory-efficient at the first length only). Ring: ``ring_attention``
inside ``jax.shard_map`` over both GPUs, the sequence already in zigzag (and, for comparison,
contiguous) order, as a data loader would deliver it (the permutation is not timed). The ring's
default dispatch computes each shard pair with one cuDNN call (``attnax.kernels.ring.cudnn``); the
``_xla_tiles`` rows force the blockwise XLA pairs (``fused_pairs=False``) for comparison.

Throughput ratio = single-GPU time / ring time on the same total length; parallel efficiency =
ratio / number of GPUs. TFLOP/s in the FlashAttention convention (causal forward
2*B*H*T^2*D, x3.5 for forward+backward).

Usage::

    python benchmarks/ring.py                 # on nvidia-h100-x2; writes $OUT/ring_2xh100.json
    python benchmarks/ring.py --smoke         # CPU, 2 virtual devices, tiny sizes

Each configuration runs in its own try/except; once ``--budget`` seconds have passed the rest
are recorded as skipped, and the table is printed last.
"""

import argparse
import os
import sys

if "--smoke" in sys.argv:
    # Before JAX starts: two virtual CPU devices stand in for the two GPUs.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"

import json
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _timing import median_seconds, sample_seconds  # benchmarks/_timing.py
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attnax._mods import causal_mod
from attnax.kernels._flash import flash_attention, flash_attention_bthd
from attnax.kernels.memory_efficient import memory_efficient_attention
from attnax.kernels.ring import ring_attention

START = time.perf_counter()
rows: list[dict[str, Any]] = []


# Calls per sample: dispatched back to back, one wait for the last (the timer every other
# script here uses, NOTES "Timer change"). Until the seventh session this script waited for
# every call, which put the host's round trip, larger for a program on two GPUs with a
# conditional in it, into each figure.
CALLS_PER_SAMPLE = 10


def timed(fn: Callable[..., Any], *args: Any, n: int) -> float:
    """Median milliseconds per call over ``n`` samples of ``CALLS_PER_SAMPLE`` calls, after
    one warm-up (compile) call."""
    return median_seconds(fn, *args, samples=n, calls=CALLS_PER_SAMPLE) * 1e3


def causal_flops(batch: int, heads: int, seq: int, head_dim: int, mode: str) -> float:
    forward = 2.0 * batch * heads * seq * seq * head_dim  # 4*B*H*T^2*D halved for causal
    return forward * (3.5 if mode == "fwd+bwd" else 1.0)


def with_grad(fn: Callable[..., jax.Array]) -> Callable[..., Any]:
    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.sum(fn(q, k, v).astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def single_gpu_kernels(block_size: int) -> dict[str, Callable[..., jax.Array]]:
    return {
        "flash_cudnn": lambda q, k, v: flash_attention(q, k, v, score_mod=causal_mod()),
        "memory_efficient": lambda q, k, v: memory_efficient_attention(
            q, k, v, score_mod=causal_mod(), block_size=block_size
        ),
    }


def causal_ring(
    mesh: Mesh, spec: PartitionSpec, *, layout: str, pairs: Any, block_size: int
) -> Callable[..., jax.Array]:
    """Causal ``ring_attention`` in ``shard_map`` over the mesh's "seq" axis (its
    ``fused_pairs`` is ``pairs``), on shards already in ``layout`` order."""

    def body(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return ring_attention(
            q, k, v, axis_name="seq", score_mod=causal_mod(),
            layout=layout, block_size=block_size,  # type: ignore[arg-type]
            fused_pairs=pairs,
        )

    return jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)


def random_qkv(
    dims: tuple[int, ...], dtype: Any, sharding: Any, seed: int
) -> tuple[jax.Array, ...]:
    """Fresh normal q, k, v of shape ``dims``, made on their devices (never on the host)."""
    make = jax.jit(lambda key: jax.random.normal(key, dims, dtype), out_shardings=sharding)
    return tuple(make(key) for key in jax.random.split(jax.random.key(seed), 3))


def run_config(
    impl: str, seq: int, mode: str, build: Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]],
    *, heads: int, head_dim: int, iters: int, budget: float, devices: int,
) -> None:
    row: dict[str, Any] = {"impl": impl, "seq": seq, "mode": mode, "devices": devices}
    if time.perf_counter() - START > budget:
        row["error"] = "skipped (time budget)"
        rows.append(row)
        print(f"{impl:28s} T={seq:<7d} {mode:8s} skipped (time budget)", flush=True)
        return
    try:
        fn, args = build()
        ms = timed(fn, *args, n=iters)
        flops = causal_flops(1, heads, seq, head_dim, mode)
        row.update(ms=round(ms, 3), tflops=round(flops / (ms * 1e-3) / 1e12, 1),
                   tokens_per_s=round(seq / (ms * 1e-3)))
        print(f"{impl:28s} T={seq:<7d} {mode:8s} {ms:10.2f} ms {row['tflops']:7.1f} TF/s", flush=True)
    except Exception as error:  # noqa: BLE001 - a benchmark records each failure (OOM) and goes on
        message = (type(error).__name__ + ": " + str(error)).splitlines()[0][:300]
        row["error"] = message
        print(f"{impl:28s} T={seq:<7d} {mode:8s} FAILED {message}", flush=True)
        traceback.print_exc(limit=2)
    rows.append(row)


def paired_ratio(
    seq: int, mode: str, mesh: Mesh, spec: PartitionSpec, ring_args: tuple[jax.Array, ...],
    single_args: tuple[jax.Array, ...], args: argparse.Namespace,
) -> dict[str, Any]:
    """Single-GPU cuDNN time / zigzag ring time (default pairs), samples interleaved.

    Sequential medians of the two drift apart between calls (the single GPU's 65536-token
    forward read 27.7-29.7 ms over three calls of one session), which moved the ratio across
    1.8; the ratio of adjacent samples cancels that drift.
    """
    entry: dict[str, Any] = {"seq": seq, "mode": mode, "samples": args.paired}

    ring = causal_ring(mesh, spec, layout="zigzag", pairs=None, block_size=512)
    single = single_gpu_kernels(0)["flash_cudnn"]
    steps = [jax.jit(fn if mode == "fwd" else with_grad(fn)) for fn in (ring, single)]
    try:
        for step, step_args in zip(steps, (ring_args, single_args), strict=True):
            jax.block_until_ready(step(*step_args))  # type: ignore[no-untyped-call]
        ratios = []
        for _ in range(args.paired):
            ring_s = sample_seconds(steps[0], ring_args, CALLS_PER_SAMPLE)
            single_s = sample_seconds(steps[1], single_args, CALLS_PER_SAMPLE)
            ratios.append(single_s / ring_s)
        ordered = sorted(ratios)
        entry.update(single_over_ring=round(statistics.median(ratios), 3),
                     quartiles=[round(ordered[len(ordered) // 4], 3),
                                round(ordered[(3 * len(ordered)) // 4], 3)])
        print(f"paired T={seq:<7d} {mode:8s} single/ring {entry['single_over_ring']:.3f} "
              f"(quartiles {entry['quartiles'][0]:.3f}-{entry['quartiles'][1]:.3f})", flush=True)
    except Exception as error:  # noqa: BLE001 - recorded, the run goes on
        entry["error"] = (type(error).__name__ + ": " + str(error)).splitlines()[0][:300]
        print(f"paired T={seq} {mode} FAILED {entry['error']}", flush=True)
    return entry


def memory_report(
    args: argparse.Namespace, mesh: Mesh, spec: PartitionSpec, heads: int, head_dim: int,
    dtype: Any, block_size: int,
) -> None:
    """Compile-only: peak bytes per device of causal forward+backward, single GPU vs the ring.

    Nothing runs: XLA's memory analysis of the compiled executables (arguments + outputs +
    temporaries, per device for the sharded ring) says at which total length each one stops
    fitting a card, which timing runs at millions of tokens could not show within the device
    budget. Writes $OUT/ring_memory_2xh100.json.
    """
    devices = list(mesh.devices.flat)
    single = jax.sharding.SingleDeviceSharding(devices[0])
    sharded = NamedSharding(mesh, spec)
    capacity = devices[0].memory_stats().get("bytes_limit") if devices[0].platform == "gpu" else None
    lengths = [int(x) for x in args.lengths.split(",") if x] or (
        [256, 512] if args.smoke else [1 << 20, 1 << 21, 1 << 22, 1 << 23]
    )
    found: list[dict[str, Any]] = []
    used = list(mesh.devices.flat)

    def analyse(
        impl: str, seq: int, fn: Callable[..., Any], sharding: Any, *, devices: int,
        bthd: bool = False,
    ) -> None:
        dims = (1, seq, heads, head_dim) if bthd else (1, heads, seq, head_dim)
        shape = jax.ShapeDtypeStruct(dims, dtype, sharding=sharding)
        row: dict[str, Any] = {"impl": impl, "seq": seq}
        try:
            stats = jax.jit(with_grad(fn)).lower(shape, shape, shape).compile().memory_analysis()
            total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                     + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
            # Per device, in units of one (T / devices, H, D) array of the input dtype: what
            # the schedule holds besides q, k, v, their gradients, the output and dO (8 units).
            local = seq // devices
            unit = local * heads * head_dim * jnp.dtype(dtype).itemsize
            row.update(peak_gib=round(total / 2**30, 2),
                       fits=None if capacity is None else bool(total <= capacity),
                       temp_gib=round(stats.temp_size_in_bytes / 2**30, 2),
                       units=round(total / unit, 2))
            if args.run:
                # One real step: the allocator's own peak per device beside the compiler's
                # figure (run one length per process: the peak counts from the start).
                made = random_qkv(dims, dtype, sharding, seq)
                start = time.perf_counter()
                step = jax.jit(with_grad(fn))
                jax.block_until_ready(step(*made))  # type: ignore[no-untyped-call]
                stats_of = [d.memory_stats() or {} for d in used[:devices]]
                peaks = [device_stats.get("peak_bytes_in_use", 0) for device_stats in stats_of]
                row.update(run_seconds=round(time.perf_counter() - start, 1),
                           run_peak_gib=[round(p / 2**30, 2) for p in peaks],
                           run_units=[round(p / unit, 2) for p in peaks])
        except Exception as error:  # noqa: BLE001 - a too-large compile is a finding, not a crash
            row["error"] = (type(error).__name__ + ": " + str(error)).splitlines()[0][:300]
        found.append(row)
        ran = (f" ran {row['run_seconds']} s, peak {row['run_peak_gib']} GiB"
               f" = {row['run_units']} units" if "run_seconds" in row else "")
        print(f"{impl:30s} T={seq:<9d} {row.get('peak_gib', '-')!s:>8} GiB "
              f"{row.get('units', '-')!s:>6} units  fits={row.get('fits')}{ran}"
              f" {row.get('error', '')}", flush=True)

    ring_lengths = [int(x) for x in args.ring_lengths.split(",") if x] or lengths
    if args.single_only:
        ring_lengths = []
    for seq in [] if args.ring_only else lengths:
        # One GPU, both layouts of the same cuDNN kernel: the public (B, H, T, D) entry point
        # and the layer's (B, T, H, D) one.
        analyse("single_flash_cudnn", seq, single_gpu_kernels(block_size)["flash_cudnn"], single,
                devices=1)
        analyse("single_flash_cudnn_bthd", seq,
                lambda q, k, v: flash_attention_bthd(q, k, v, score_mod=causal_mod()),
                single, devices=1, bthd=True)
    for seq in ring_lengths:
        for pairs in args.pairs.split(","):
            # "default": the default dispatch (cuDNN pairs on a GPU); "pallas": PALLAS_FLASH pairs.
            suffix = "" if pairs == "default" else f"_{pairs}"
            fused = None if pairs == "default" else pairs
            ring = causal_ring(mesh, spec, layout="zigzag", pairs=fused, block_size=block_size)
            analyse(f"ring_2gpu_zigzag{suffix}", seq, ring, sharded, devices=len(devices))
    out_dir = os.environ.get("OUT", "benchmarks/results")
    os.makedirs(out_dir, exist_ok=True)
    name = "ring_memory_single_h100.json" if args.single_only else "ring_memory_2xh100.json"
    if args.run:
        name = name.replace(".json", "_run.json")
    path = os.path.join(out_dir, "ring_memory_smoke.json" if args.smoke else name)
    with open(path, "w") as f:
        json.dump({"devices": [d.device_kind for d in devices], "jax_version": jax.__version__,
                   "bytes_limit_per_device": capacity, "heads": heads, "head_dim": head_dim,
                   "dtype": str(jnp.dtype(dtype)), "mode": "fwd+bwd, causal", "rows": found},
                  f, indent=2)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, 2 virtual devices, tiny sizes")
    parser.add_argument("--lengths", default="", help="comma-separated total lengths")
    parser.add_argument("--block-size", type=int, default=0, help="ring/memory-efficient tile")
    parser.add_argument("--budget", type=float, default=220.0, help="seconds before skipping")
    parser.add_argument("--iters", type=int, default=0)
    parser.add_argument("--no-contiguous", action="store_true", help="skip the contiguous ring")
    parser.add_argument("--memory", action="store_true",
                        help="compile-only peak memory, single GPU vs ring, at 1M-8M tokens")
    parser.add_argument("--ring-lengths", default="",
                        help="--memory: total lengths for the ring rows (default --lengths)")
    parser.add_argument("--single-only", action="store_true",
                        help="--memory: only the single-GPU rows (runs on one GPU)")
    parser.add_argument("--ring-only", action="store_true",
                        help="--memory: only the ring rows")
    parser.add_argument("--paired", type=int, default=0,
                        help="interleaved samples of the zigzag ring and single cuDNN per length "
                             "and mode (their time ratio; 0: none)")
    parser.add_argument("--run", action="store_true",
                        help="--memory: also run each program once and read the allocator's peak")
    parser.add_argument("--no-tiles", action="store_true",
                        help="skip the XLA-tile ring and single-GPU memory_efficient rows")
    parser.add_argument("--pairs", default="default",
                        help="comma-separated ring pair kernels for the zigzag rows: default "
                             "(cuDNN on a GPU), pallas (PALLAS_FLASH pairs)")
    args = parser.parse_args()

    heads, head_dim = (2, 16) if args.smoke else (16, 128)
    lengths = [int(x) for x in args.lengths.split(",") if x] or (
        [64, 128] if args.smoke else [65536, 131072, 262144]
    )
    block_size = args.block_size or (16 if args.smoke else 2048)
    iters = args.iters or (2 if args.smoke else 5)
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    devices = jax.devices()[:2]
    if len(devices) < 2 and not (args.memory and args.single_only):
        sys.exit("benchmarks/ring.py needs 2 devices (run on nvidia-h100-x2, or --smoke on CPU)")
    mesh = Mesh(np.array(devices), ("seq",))
    spec = PartitionSpec(None, None, "seq", None)  # type: ignore[no-untyped-call]
    sharded = NamedSharding(mesh, spec)
    single = jax.sharding.SingleDeviceSharding(devices[0])
    print(f"devices: {[d.device_kind for d in devices]}  jax {jax.__version__}", flush=True)

    def inputs(seq: int, sharding: Any) -> tuple[jax.Array, ...]:
        return random_qkv((1, heads, seq, head_dim), dtype, sharding, seq)

    if args.memory:
        memory_report(args, mesh, spec, heads, head_dim, dtype, block_size)
        return

    for seq in lengths:
        for mode in ("fwd", "fwd+bwd"):
            # Ring variants: the default dispatch (fused cuDNN pairs on a GPU) in both layouts,
            # and the XLA-tile pairs (fused_pairs=False) at the first length only.
            # "pallas" in --pairs adds the PALLAS_FLASH-pair zigzag ring.
            variants: list[tuple[str, Any]] = [
                ("zigzag", None), ("contiguous", None), ("zigzag", False)
            ]
            if "pallas" in args.pairs.split(","):
                variants.append(("zigzag", "pallas"))
            if args.no_contiguous:
                variants = [variant for variant in variants if variant[0] == "zigzag"]
            if seq != lengths[0] or args.no_tiles:
                variants = [variant for variant in variants if variant[1] is not False]
            for layout, fused in variants:

                def build_ring(
                    seq: int = seq, mode: str = mode, layout: str = layout, fused: Any = fused
                ) -> Any:
                    mapped = causal_ring(
                        mesh, spec, layout=layout, pairs=fused, block_size=block_size
                    )
                    fn = jax.jit(mapped if mode == "fwd" else with_grad(mapped))
                    return fn, inputs(seq, sharded)

                suffix = {False: "_xla_tiles", "pallas": "_pallas"}.get(fused, "")
                run_config(f"ring_2gpu_{layout}{suffix}", seq, mode, build_ring, heads=heads,
                           head_dim=head_dim, iters=iters, budget=args.budget, devices=2)
            for name, kernel in single_gpu_kernels(block_size).items():
                if name == "memory_efficient" and (seq != lengths[0] or args.no_tiles):
                    continue

                def build_single(seq: int = seq, mode: str = mode, kernel: Any = kernel) -> Any:
                    fn = jax.jit(kernel if mode == "fwd" else with_grad(kernel))
                    return fn, inputs(seq, single)

                run_config(f"single_{name}", seq, mode, build_single, heads=heads,
                           head_dim=head_dim, iters=iters, budget=args.budget, devices=1)

    paired_rows = [
        paired_ratio(seq, mode, mesh, spec, inputs(seq, sharded), inputs(seq, single), args)
        for seq in (lengths if args.paired else [])
        for mode in ("fwd", "fwd+bwd")
    ]

    # Ratios against the best single-GPU kernel on the same length and mode.
    summary: list[dict[str, Any]] = []
    for seq in lengths:
        for mode in ("fwd", "fwd+bwd"):
            timed_rows = [r for r in rows if r["seq"] == seq and r["mode"] == mode and "ms" in r]
            singles = [r for r in timed_rows if r["devices"] == 1]
            best = min(singles, key=lambda r: r["ms"]) if singles else None
            for ring in (r for r in timed_rows if r["devices"] == 2):
                entry = {"seq": seq, "mode": mode, "ring": ring["impl"], "ring_ms": ring["ms"]}
                if best is not None:
                    ratio = best["ms"] / ring["ms"]
                    entry.update(best_single=best["impl"], single_ms=best["ms"],
                                 throughput_ratio=round(ratio, 3),
                                 parallel_efficiency=round(ratio / 2, 3))
                summary.append(entry)

    out_dir = os.environ.get("OUT", "benchmarks/results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "ring_smoke.json" if args.smoke else "ring_2xh100.json")
    with open(path, "w") as f:
        json.dump(
            {
                "devices": [d.device_kind for d in devices], "platform": devices[0].platform,
                "jax_version": jax.__version__, "heads": heads, "head_dim": head_dim,
                "dtype": str(jnp.dtype(dtype)), "block_size": block_size, "causal": True,
                "rows": rows, "summary": summary, "paired": paired_rows,
                "seconds": round(time.perf_counter() - START, 1),
            },
            f, indent=2,
        )
    print(f"\nwrote {path}\n")
    print(f"{'T':>7s} {'mode':8s} {'ring':22s} {'ring ms':>9s} {'best single':22s} "
          f"{'single ms':>9s} {'ratio':>6s} {'eff':>5s}")
    for e in summary:
        print(f"{e['seq']:7d} {e['mode']:8s} {e['ring']:22s} {e['ring_ms']:9.2f} "
              f"{e.get('best_single', '-'):22s} {e.get('single_ms', float('nan')):9.2f} "
              f"{e.get('throughput_ratio', float('nan')):6.2f} "
              f"{e.get('parallel_efficiency', float('nan')):5.2f}")


if __name__ == "__main__":
    main()
