"""Prefill attention benchmark: FLASH, MEMORY_EFFICIENT and LINEAR against cuDNN and XLA.

bf16, 16 heads, head_dim 128; B4 S4096 and B1 S16384; causal and full; forward and
forward+backward, for

* ``flash_bthd``: attnax ``flash_attention_bthd`` on (B, T, H, D) inputs (the layer's path),
* ``flash``: attnax ``flash_attention`` on (B, H, T, D) inputs (transposes around cuDNN),
* ``cudnn``: raw ``jax.nn.dot_product_attention(implementation="cudnn")``, (B, T, H, D),
* ``xla``: raw ``jax.nn.dot_product_attention(implementation="xla")`` (S <= --xla-max-seq),
* ``memeff``: attnax ``memory_efficient_attention`` (B, H, T, D), its default path (on an
  NVIDIA GPU for bf16: the fused tile, an XLA scan of stepped Pallas kernels),
* ``memeff_xla``: the same with ``implementation="xla"`` (XLA tiles);

plus GQA 32/8 and a causal 1024-token sliding window (FLASH against raw cuDNN),
``memeff`` at S=131072 (B1, 16 heads; XLA is tried there too and its out-of-memory error is
recorded), and ``linear`` causal at S=16384 when ``attnax.kernels.linear.linear_attention`` is
importable.

Timing: after two warm-up calls, each sample dispatches 10 calls back to back (1 for
configs whose call takes 0.1 s or more) on one set of random inputs and waits for the last; the median over >= 20
samples (fewer only where 20 would exceed the per-config budget; ``n_timed`` and
``calls_per_sample`` record it, and ``--smoke``
uses 3). TFLOP/s in the FlashAttention convention: forward 4*B*H*S^2*D, halved when causal,
4*B*H*D*(S*w - w(w-1)/2) for a causal window w; forward+backward 3.5x the forward. LINEAR's
TFLOP/s use the softmax-attention count of the same shape (an equivalent rate, for comparison
only). Relative error: forward output (or the (dQ, dK, dV) gradients for fwd+bwd) against raw
cuDNN on the same inputs; none for LINEAR (a different function).

Usage (on the H100)::

    python benchmarks/prefill.py            # ~4 minutes
    python benchmarks/prefill.py --smoke    # tiny shapes, any backend (CPU check)

Writes ``$OUT/prefill.json`` (``OUT`` defaults to ``benchmarks/results``) with the device, the
jax version, every row (errors included: each config runs in its own try/except so one
failure does not hide the others) and the ratios FLASH/cuDNN, XLA/MEMEFF and FLASH/LINEAR.
"""

import argparse
import json
import math
import os
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from _timing import median_seconds, sample_seconds  # benchmarks/_timing.py

from attnax import _mods as mods
from attnax.kernels._flash import flash_attention, flash_attention_bthd
from attnax.kernels.memory_efficient import memory_efficient_attention

ROWS: list[dict[str, Any]] = []
START = time.perf_counter()


# --------------------------------------------------------------------------- implementations


def _score_mod(causal: bool, window: int | None) -> Any:
    if window is not None:
        return mods.sliding_window_mod(window)
    return mods.causal_mod() if causal else None


def make_impl(name: str, causal: bool, window: int | None) -> tuple[Callable[..., Any], str]:
    """(attention function, layout) for an implementation name; layout "bthd" or "bhtd"."""
    score_mod = _score_mod(causal, window)
    local = None if window is None else (window - 1, 0)
    if name == "flash_bthd":
        return lambda q, k, v: flash_attention_bthd(q, k, v, score_mod=score_mod), "bthd"
    if name == "flash":
        return lambda q, k, v: flash_attention(q, k, v, score_mod=score_mod), "bhtd"
    if name in ("cudnn", "xla"):
        impl: Literal["cudnn", "xla"] = "cudnn" if name == "cudnn" else "xla"

        def raw(q: Any, k: Any, v: Any) -> Any:
            return jax.nn.dot_product_attention(
                q,
                k,
                v,
                is_causal=causal or window is not None,
                local_window_size=local,
                implementation=impl,
            )

        return raw, "bthd"
    if name == "memeff":
        return lambda q, k, v: memory_efficient_attention(q, k, v, score_mod=score_mod), "bhtd"
    if name == "memeff_xla":
        return (
            lambda q, k, v: memory_efficient_attention(
                q, k, v, score_mod=score_mod, implementation="xla"
            ),
            "bhtd",
        )
    if name == "linear":
        from attnax.kernels.linear import linear_attention

        return lambda q, k, v: linear_attention(q, k, v, causal=causal), "bhtd"
    raise ValueError(f"unknown implementation {name!r}")


def _sync(tree: Any) -> Any:
    """``jax.block_until_ready`` (untyped in jax's stubs)."""
    return jax.block_until_ready(tree)  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------- measuring


def fwd_flops(
    batch: int, heads: int, seq: int, dim: int, causal: bool, window: int | None
) -> float:
    if window is not None:
        w = min(window, seq)
        return 4.0 * batch * heads * dim * (seq * w - w * (w - 1) / 2)
    full = 4.0 * batch * heads * seq * seq * dim
    return full / 2 if causal else full


def make_inputs(
    seed: int, layout: str, batch: int, heads: int, kv_heads: int, seq: int, dim: int
) -> tuple[jax.Array, ...]:
    """The same values for both layouts: drawn as (B, T, H, D), transposed for "bhtd", so the
    error column compares every implementation on identical inputs."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q_shape, kv_shape = (batch, seq, heads, dim), (batch, seq, kv_heads, dim)
    q = jax.random.normal(keys[0], q_shape, jnp.bfloat16)
    k = jax.random.normal(keys[1], kv_shape, jnp.bfloat16)
    v = jax.random.normal(keys[2], kv_shape, jnp.bfloat16)
    grad_out = jax.random.normal(keys[3], q_shape, jnp.bfloat16)
    arrays = (q, k, v, grad_out)
    if layout == "bhtd":
        arrays = tuple(jnp.swapaxes(x, 1, 2) for x in arrays)
    return arrays


def to_bthd(x: jax.Array, layout: str) -> jax.Array:
    return x if layout == "bthd" else jnp.swapaxes(x, 1, 2)


def build(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
    if mode == "fwd":
        return jax.jit(lambda q, k, v, g: fn(q, k, v))

    def fwd_bwd(q: Any, k: Any, v: Any, g: Any) -> Any:
        _, vjp = jax.vjp(fn, q, k, v)
        return vjp(g)

    return jax.jit(fwd_bwd)


def relative_error(actual: Any, expected: Any) -> float:
    a = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(actual)])
    e = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(expected)])
    if not np.all(np.isfinite(a)):
        return math.inf
    return float(np.linalg.norm(a - e) / max(float(np.linalg.norm(e)), 1e-30))


def bench(
    *,
    group: str,
    impl: str,
    batch: int,
    seq: int,
    heads: int,
    kv_heads: int,
    dim: int,
    causal: bool,
    window: int | None,
    mode: str,
    args: argparse.Namespace,
    reference: dict[tuple[Any, ...], Any],
) -> None:
    row: dict[str, Any] = {
        "group": group,
        "impl": impl,
        "batch": batch,
        "seq": seq,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": dim,
        "causal": causal,
        "window": window,
        "mode": mode,
    }
    label = f"{group:8s} {impl:10s} B{batch} S{seq} H{heads}/{kv_heads} " + (
        f"w{window}" if window else ("causal" if causal else "full")
    )
    try:
        fn, layout = make_impl(impl, causal, window)
        step = build(fn, mode)
        dims = (batch, heads, kv_heads, seq, dim)
        # Warm-up (compile) on seed 0, also the error check against cuDNN's output.
        check_inputs = make_inputs(0, layout, *dims)
        out = _sync(step(*check_inputs))
        start = time.perf_counter()
        _sync(step(*make_inputs(1, layout, *dims)))
        one_call = time.perf_counter() - start
        # Each sample dispatches `calls` calls back to back and waits for the last, so the
        # host's wait between calls (which a multi-kernel program pays once per call) is not
        # in the figure. The same count for every row of a config (one_call includes making
        # the inputs, so it only tells the 100 ms-class configs apart).
        calls = 10 if one_call < 0.1 else 1
        if args.smoke:
            n = 3
        else:
            n = max(5, min(args.iters, int(args.config_budget / max(one_call * calls, 1e-6))))
        inputs = _sync(make_inputs(2, layout, *dims))
        median = median_seconds(step, *inputs, samples=n, calls=calls, warmup=0)
        flops = fwd_flops(batch, heads, seq, dim, causal, window) * (3.5 if mode == "fwdbwd" else 1)
        row.update(
            median_ms=median * 1e3,
            tflops=flops / median / 1e12,
            n_timed=n,
            calls_per_sample=calls,
        )
        # Compare in the (B, T, H, D) layout against raw cuDNN on the same seed-0 inputs.
        key = (batch, seq, heads, kv_heads, dim, causal, window, mode)
        canonical = jax.tree.map(lambda x: np.asarray(to_bthd(x, layout), np.float32), out)
        if impl == "cudnn":
            reference[key] = canonical
        if impl != "linear" and key in reference:
            row["rel_err_vs_cudnn"] = relative_error(canonical, reference[key])
        print(
            f"{label:48s} {mode:7s} {median * 1e3:10.3f} ms {row['tflops']:7.1f} TF/s "
            f"n={n} err={row.get('rel_err_vs_cudnn', '-')}",
            flush=True,
        )
        del out, check_inputs
    except Exception as error:  # noqa: BLE001 - a benchmark records every failure and goes on
        message = (type(error).__name__ + ": " + str(error)).splitlines()[0][:400]
        row["error"] = message
        print(f"{label:48s} {mode:7s} FAILED {message}", flush=True)
        if args.verbose:
            traceback.print_exc(limit=4)
    ROWS.append(row)


PAIRED: list[dict[str, Any]] = []


def paired(run: dict[str, Any], args: argparse.Namespace, samples: int) -> None:
    """FLASH's layer path against raw cuDNN with their samples interleaved (A B A B ...).

    The two are the same cuDNN call, and sequential medians of ~1 ms calls drift by a few
    percent between configs' runs (clocks, temperature); a ratio of adjacent samples cancels
    that drift. Records the median and the spread of the per-pair ratios.
    """
    dims = (run["batch"], run["heads"], run["kv_heads"], run["seq"], run["dim"])
    entry: dict[str, Any] = {
        k: run[k] for k in ("group", "batch", "seq", "heads", "kv_heads", "causal", "window", "mode")
    }
    try:
        steps = [build(make_impl(name, run["causal"], run["window"])[0], run["mode"]) for name in ("cudnn", "flash_bthd")]
        inputs = _sync(make_inputs(2, "bthd", *dims))
        for step in steps:
            _sync(step(*inputs))
            _sync(step(*inputs))
        calls = 3 if args.smoke else 10
        ratios_seen: list[float] = []
        for _ in range(samples):
            cudnn, flash = (sample_seconds(step, inputs, calls) for step in steps)
            ratios_seen.append(flash / cudnn)
        ordered = sorted(ratios_seen)
        entry.update(
            flash_bthd_over_cudnn_time=statistics.median(ratios_seen),
            quartiles=[ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]],
            samples=samples,
            calls_per_sample=calls,
        )
        print(
            f"paired   {entry['group']:8s} B{run['batch']} S{run['seq']} "
            f"{'w' + str(run['window']) if run['window'] else ('causal' if run['causal'] else 'full'):7s} "
            f"{run['mode']:7s} flash_bthd/cudnn {entry['flash_bthd_over_cudnn_time']:.3f} "
            f"(quartiles {entry['quartiles'][0]:.3f}-{entry['quartiles'][1]:.3f})",
            flush=True,
        )
    except Exception as error:  # noqa: BLE001 - recorded, the run goes on
        entry["error"] = (type(error).__name__ + ": " + str(error)).splitlines()[0][:400]
        print(f"paired   {entry} FAILED", flush=True)
    PAIRED.append(entry)


def flash_configs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per FLASH config of the plan (the ones with a flash_bthd row)."""
    return [run for run in runs if run["impl"] == "flash_bthd" and run["group"] != "linear"]


# --------------------------------------------------------------------------- plan


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    heads, dim = (2, 32) if args.smoke else (16, 128)
    shapes = [(1, 128)] if args.smoke else [(4, 4096), (1, 16384)]
    runs: list[dict[str, Any]] = []
    modes = ("fwd", "fwdbwd")
    # cuDNN first in every group: it is the reference for the errors.
    for batch, seq in shapes:
        for causal in (True, False):
            impls = ["cudnn", "flash_bthd", "flash", "memeff", "memeff_xla"]
            if seq <= args.xla_max_seq:
                impls.append("xla")
            for mode in modes:
                for impl in impls:
                    runs.append(
                        {
                            "group": "main",
                            "impl": impl,
                            "batch": batch,
                            "seq": seq,
                            "heads": heads,
                            "kv_heads": heads,
                            "dim": dim,
                            "causal": causal,
                            "window": None,
                            "mode": mode,
                        }
                    )
    batch, seq = shapes[0]
    gqa_heads, gqa_kv = (4, 2) if args.smoke else (32, 8)
    window = 32 if args.smoke else 1024
    for mode in modes:
        for impl in ("cudnn", "flash_bthd", "flash"):
            runs.append(
                {
                    "group": "gqa",
                    "impl": impl,
                    "batch": batch,
                    "seq": seq,
                    "heads": gqa_heads,
                    "kv_heads": gqa_kv,
                    "dim": dim,
                    "causal": True,
                    "window": None,
                    "mode": mode,
                }
            )
        for impl in ("cudnn", "flash_bthd", "flash"):
            runs.append(
                {
                    "group": "window",
                    "impl": impl,
                    "batch": batch,
                    "seq": seq,
                    "heads": heads,
                    "kv_heads": heads,
                    "dim": dim,
                    "causal": True,
                    "window": window,
                    "mode": mode,
                }
            )
    long_batch, long_seq = shapes[-1]
    for mode in modes:
        for impl in ("cudnn", "flash_bthd", "linear"):
            runs.append(
                {
                    "group": "linear",
                    "impl": impl,
                    "batch": long_batch,
                    "seq": long_seq,
                    "heads": heads,
                    "kv_heads": heads,
                    "dim": dim,
                    "causal": True,
                    "window": None,
                    "mode": mode,
                }
            )
    huge = 512 if args.smoke else args.long_seq
    for impl in ("cudnn", "memeff", "memeff_xla", "xla"):
        runs.append(
            {
                "group": "long",
                "impl": impl,
                "batch": 1,
                "seq": huge,
                "heads": args.long_heads if not args.smoke else heads,
                "kv_heads": args.long_heads if not args.smoke else heads,
                "dim": dim,
                "causal": True,
                "window": None,
                "mode": "fwd",
            }
        )
    return runs


# --------------------------------------------------------------------------- report


def _median(group: str, impl: str, match: dict[str, Any]) -> float | None:
    for row in ROWS:
        same = row["group"] == group and row["impl"] == impl
        if same and "median_ms" in row and all(row[k] == v for k, v in match.items()):
            return float(row["median_ms"])
    return None


def ratios() -> list[dict[str, Any]]:
    """Time ratios per config: FLASH/cuDNN (target <= 1.03), XLA/MEMEFF (>= 2), FLASH/LINEAR (>= 4).

    XLA/MEMEFF is given for both MEMORY_EFFICIENT paths (``memeff`` default, ``memeff_xla``).
    """
    out: list[dict[str, Any]] = []
    keys = ("batch", "seq", "heads", "kv_heads", "causal", "window", "mode")
    seen: set[tuple[Any, ...]] = set()
    for row in ROWS:
        config = {k: row[k] for k in keys}
        ident = (row["group"], *config.values())
        if ident in seen:
            continue
        seen.add(ident)
        group = row["group"]
        entry: dict[str, Any] = {"group": group, **config}
        cudnn = _median(group, "cudnn", config)
        for impl in ("flash_bthd", "flash"):
            mine = _median(group, impl, config)
            if mine is not None and cudnn is not None:
                entry[f"{impl}_over_cudnn_time"] = mine / cudnn
        xla = _median(group, "xla", config)
        for impl in ("memeff", "memeff_xla"):
            mine = _median(group, impl, config)
            if xla is not None and mine is not None:
                entry[f"xla_over_{impl}_time"] = xla / mine
        flash, linear = _median(group, "flash_bthd", config), _median(group, "linear", config)
        if flash is not None and linear is not None:
            entry["flash_over_linear_time"] = flash / linear
        if len(entry) > len(config) + 1:
            out.append(entry)
    return out


def table() -> str:
    lines = [
        (
            f"{'group':8s} {'impl':10s} {'B':>2s} {'S':>7s} {'H/Hk':>6s} {'mask':>7s} {'mode':7s}"
            f" {'ms':>10s} {'TF/s':>7s} {'err':>9s}"
        )
    ]
    for row in ROWS:
        mask = f"w{row['window']}" if row["window"] else ("causal" if row["causal"] else "full")
        head = (
            f"{row['group']:8s} {row['impl']:10s} {row['batch']:>2d} {row['seq']:>7d} "
            f"{str(row['heads']) + '/' + str(row['kv_heads']):>6s} {mask:>7s} {row['mode']:7s}"
        )
        if "error" in row:
            lines.append(f"{head} ERROR {row['error'][:80]}")
            continue
        err = row.get("rel_err_vs_cudnn")
        err_text = f"{err:9.2e}" if isinstance(err, float) else f"{'-':>9s}"
        lines.append(f"{head} {row['median_ms']:10.3f} {row['tflops']:7.1f} {err_text}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 3 timed calls")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per config")
    parser.add_argument("--config-budget", type=float, default=8.0, help="seconds per config")
    parser.add_argument("--xla-max-seq", type=int, default=8192, help="largest S for XLA")
    parser.add_argument("--long-seq", type=int, default=131072)
    parser.add_argument("--long-heads", type=int, default=16)
    parser.add_argument("--verbose", action="store_true", help="print tracebacks")
    parser.add_argument(
        "--paired", type=int, default=20, help="interleaved FLASH/cuDNN samples per config (0: none)"
    )
    parser.add_argument(
        "--paired-only", action="store_true", help="only the interleaved FLASH/cuDNN pass"
    )
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
    reference: dict[tuple[Any, ...], Any] = {}
    runs = plan(args)
    if not args.paired_only:
        for run in runs:
            bench(**run, args=args, reference=reference)
    if args.paired:
        for run in flash_configs(runs):
            paired(run, args, args.paired)
    out_dir = os.environ.get("OUT", "benchmarks/results")
    os.makedirs(out_dir, exist_ok=True)
    result = {
        "device": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "smoke": args.smoke,
        "dtype": "bfloat16",
        "flops_convention": "fwd 4*B*H*S^2*D (causal /2, window 4*B*H*D*(S*w-w(w-1)/2)); "
        "fwd+bwd 3.5x fwd",
        "wall_seconds": time.perf_counter() - START,
        "rows": ROWS,
        "ratios": ratios(),
        "paired_flash_over_cudnn": PAIRED,
    }
    path = os.path.join(out_dir, "prefill_paired.json" if args.paired_only else "prefill.json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"\nwrote {path} in {result['wall_seconds']:.0f} s\n")
    for entry in result["ratios"]:
        print(json.dumps(entry))
    print()
    print(table())


if __name__ == "__main__":
    main()
