"""Benchmark attnax's Pallas FlashAttention against JAX's Pallas ``mha`` and cuDNN (one GPU).

bf16, 16 heads, head_dim 128 unless noted. TFLOP/s in the FlashAttention convention: forward
4*B*H*S^2*D, halved when causal (ALiBi+causal too), x3.5 for forward+backward; the sliding
window and document configs report the *dense* number (full 4*B*H*S^2*D), so their time ratio
against cuDNN-with-a-dense-mask is the figure to read. Median over 10 samples of 10
back-to-back calls, after warm-up. Relative error of each forward against cuDNN (the same mask/bias).

Usage (on the device)::

    python benchmarks/pallas_flash.py [--sweep] [--fwd-sweep] [--bwd-sweep] [--skip-table]
        [--only NAME,...]
        [--budget SECONDS]

Writes ``$OUT/pallas_flash_h100.json`` (``OUT`` defaults to ``benchmarks/results``).
"""

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from _timing import median_seconds  # benchmarks/_timing.py (scripts run from benchmarks/)

from attnax import _mods as mods
from attnax.kernels.pallas_flash import FlashConfig, flash_attention_with_config
from attnax.kernels.pallas_flash import plan as pallas_plan

HEADS, HEAD_DIM = 16, 128
rows: list[dict[str, Any]] = []
START = time.perf_counter()


def timed(fn: Callable[..., Any], *args: Any, samples: int = 10, calls: int = 10) -> float:
    """Median milliseconds per call (``_timing``: back-to-back calls, two warm-up calls)."""
    return median_seconds(fn, *args, samples=samples, calls=calls, warmup=2) * 1e3


def record(impl: str, cfg: str, mode: str, ms: float, flops: float, **extra: Any) -> None:
    tflops = flops / (ms * 1e-3) / 1e12
    rows.append(dict(impl=impl, cfg=cfg, mode=mode, ms=round(ms, 4), tflops=round(tflops, 1), **extra))
    note = " ".join(f"{k}={v}" for k, v in extra.items())
    print(f"{impl:26s} {cfg:34s} {mode:8s} {ms:9.3f} ms {tflops:7.1f} TF/s {note}", flush=True)


def failed(impl: str, cfg: str, mode: str, error: BaseException) -> None:
    message = (type(error).__name__ + ": " + str(error)).splitlines()[0][:300]
    rows.append({"impl": impl, "cfg": cfg, "mode": mode, "error": message})
    print(f"{impl:26s} {cfg:34s} {mode:8s} FAILED {message}", flush=True)
    traceback.print_exc(limit=3)


def grad_of(fn: Callable[..., jax.Array]) -> Callable[..., Any]:
    return jax.jit(
        jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    )


def config_list() -> list[dict[str, Any]]:
    ids16k = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 16384 // 4)[None]
    return [
        {"name": "B4 S4096 causal", "B": 4, "S": 4096, "kind": "causal"},
        {"name": "B4 S4096 full", "B": 4, "S": 4096, "kind": "full"},
        {"name": "B1 S16384 causal", "B": 1, "S": 16384, "kind": "causal"},
        {"name": "B1 S16384 full", "B": 1, "S": 16384, "kind": "full"},
        {"name": "B4 S4096 alibi+causal", "B": 4, "S": 4096, "kind": "alibi"},
        {"name": "B1 S16384 window1024", "B": 1, "S": 16384, "kind": "window", "window": 1024},
        {"name": "B1 S16384 4docs", "B": 1, "S": 16384, "kind": "docs", "ids": ids16k},
        {"name": "B4 S4096 causal GQA32/8", "B": 4, "S": 4096, "kind": "causal", "H": 32, "Hk": 8},
    ]


def attnax_mod(cfg: dict[str, Any]) -> Any:
    kind = cfg["kind"]
    if kind == "causal":
        return mods.causal_mod()
    if kind == "alibi":
        return mods.compose_score_mods(mods.alibi_mod(cfg.get("H", HEADS)), mods.causal_mod())
    if kind == "window":
        return mods.sliding_window_mod(cfg["window"])
    if kind == "docs":
        return mods.document_mask_mod(cfg["ids"])
    return None


def flops_of(cfg: dict[str, Any]) -> float:
    heads = cfg.get("H", HEADS)
    dense = 4 * cfg["B"] * heads * cfg["S"] ** 2 * HEAD_DIM
    return dense / 2 if cfg["kind"] in ("causal", "alibi") else dense


def dense_mask(cfg: dict[str, Any]) -> jax.Array | None:
    """The config's mask as a dense (B, 1, S, S) boolean (cuDNN's comparison input)."""
    S = cfg["S"]
    if cfg["kind"] == "window":
        return mods.make_sliding_window_mask(S, window_size=cfg["window"])
    if cfg["kind"] == "docs":
        return mods.make_document_mask(cfg["ids"])
    return None


def run_config(
    cfg: dict[str, Any], flash: FlashConfig, peers: bool, budget: float, backward: bool = True
) -> None:
    B, S = cfg["B"], cfg["S"]
    H, Hk = cfg.get("H", HEADS), cfg.get("Hk", cfg.get("H", HEADS))
    name, flops = cfg["name"], flops_of(cfg)
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, H, S, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, Hk, S, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, Hk, S, HEAD_DIM), jnp.bfloat16)
    score_mod = attnax_mod(cfg)

    def ours(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return flash_attention_with_config(q, k, v, config=flash, score_mod=score_mod)

    # cuDNN in its (B, T, N, H) layout; masks and the ALiBi bias materialised densely.
    causal = cfg["kind"] in ("causal", "alibi")
    mask = dense_mask(cfg)
    bias = None
    if cfg["kind"] == "alibi":
        slopes = mods.alibi_slopes(H)
        pos = jnp.arange(S)
        bias = (-slopes[:, None, None] * jnp.abs(pos[:, None] - pos[None, :])).astype(jnp.bfloat16)[None]

    def cudnn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        out = jax.nn.dot_product_attention(
            q.transpose(0, 2, 1, 3),
            k.transpose(0, 2, 1, 3),
            v.transpose(0, 2, 1, 3),
            bias=bias,
            mask=mask,
            is_causal=causal,
            implementation="cudnn",
        )
        return out.transpose(0, 2, 1, 3)

    impls: dict[str, Callable[..., jax.Array]] = {"attnax pallas_flash": ours}
    if peers:
        impls["cudnn" + (" dense-mask" if mask is not None else "")] = cudnn
        if cfg["kind"] in ("causal", "full", "docs"):
            from jax.experimental.pallas.ops.gpu import attention as jax_mha

            group = H // Hk
            segment_ids = cfg.get("ids")

            def mha(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
                # JAX's mha has no GQA: its K/V heads are repeated (its cost, not ours).
                kk = jnp.repeat(k, group, axis=1) if group > 1 else k
                vv = jnp.repeat(v, group, axis=1) if group > 1 else v
                out = jax_mha.mha(
                    q.transpose(0, 2, 1, 3),
                    kk.transpose(0, 2, 1, 3),
                    vv.transpose(0, 2, 1, 3),
                    segment_ids,
                    sm_scale=HEAD_DIM**-0.5,
                    causal=cfg["kind"] == "causal",
                    block_sizes=jax_mha.BlockSizes(
                        block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64,
                        block_q_dq=64, block_kv_dq=64,
                    ),
                )
                return out.transpose(0, 2, 1, 3)

            impls["jax pallas mha"] = mha

    reference = None
    for impl, fn in impls.items():
        if time.perf_counter() - START > budget:
            print(f"budget exhausted, skipping {impl} {name}", flush=True)
            continue
        try:
            jitted = jax.jit(fn)
            out = jitted(q, k, v)
            if reference is None and impl.startswith("cudnn"):
                reference = out.astype(jnp.float32)
            extra: dict[str, Any] = {}
            ms = timed(jitted, q, k, v)
            record(impl, name, "fwd", ms, flops, **extra)
            rows[-1]["out"] = out  # replaced by the error below once cuDNN's output exists
        except Exception as error:  # noqa: BLE001 - a benchmark records failures and moves on
            failed(impl, name, "fwd", error)
        if not backward:
            continue
        try:
            ms = timed(grad_of(fn), q, k, v)
            record(impl, name, "fwd+bwd", ms, 3.5 * flops)
        except Exception as error:  # noqa: BLE001
            failed(impl, name, "fwd+bwd", error)
    for row in rows:
        out = row.pop("out", None)
        if out is not None and reference is not None:
            err = jnp.linalg.norm(out.astype(jnp.float32) - reference) / jnp.linalg.norm(reference)
            row["relerr_vs_cudnn"] = float(f"{float(err):.2e}")


def _fwd_tag(flash: FlashConfig) -> str:
    return f"fwd {flash.block_q}x{flash.block_kv} w{flash.num_warps} s{flash.num_stages}"


def _bwd_tag(flash: FlashConfig) -> str:
    tag = (
        f"dkv{flash.block_q_dkv}x{flash.block_kv_dkv} dq{flash.block_q_dq}x"
        f"{flash.block_kv_dq} w{flash.num_warps_bwd} s{flash.num_stages_bwd}"
    )
    return tag


def _both_tags(flash: FlashConfig) -> str:
    return _fwd_tag(flash) + " " + _bwd_tag(flash)


def run_variants(
    cfgs: list[dict[str, Any]],
    variants: list[FlashConfig],
    fwd_tag: Callable[[FlashConfig], str] | None,
    bwd_tag: Callable[[FlashConfig], str] | None,
    budget: float,
    backward: bool,
) -> None:
    """Each config with each FlashConfig (no peers); rows named by the knobs that vary."""
    for cfg in cfgs:
        for flash in variants:
            if time.perf_counter() - START > budget:
                return
            parts = [tag(flash) for tag in (fwd_tag, bwd_tag) if tag is not None]
            tag = "sweep " + " ".join(parts)
            print(tag, flush=True)
            before = len(rows)
            run_config(cfg, flash, peers=False, budget=budget, backward=backward)
            for row in rows[before:]:
                row["impl"] = tag
                row["tag"] = "sweep"


def sweep(budget: float) -> None:
    """Tile/warp/stage variants on two configs (forward and forward+backward)."""
    variants = [
        FlashConfig(num_stages_bwd=3),
        FlashConfig(num_warps_bwd=8),
        FlashConfig(block_q_dkv=32, block_kv_dkv=64, block_q_dq=64, block_kv_dq=32),
        FlashConfig(block_q_dkv=64, block_kv_dkv=128, block_q_dq=128, block_kv_dq=64),
        FlashConfig(num_warps=8, num_stages=3),
    ]
    run_variants([config_list()[0]], variants, _fwd_tag, _bwd_tag, budget, backward=True)


def forward_sweep(budget: float) -> None:
    """Forward tile/warp/stage variants on the two configs furthest from FlexAttention."""
    variants = [
        FlashConfig(),
        FlashConfig(block_kv=64, num_warps=4, num_stages=3),
        FlashConfig(block_kv=64, num_warps=8, num_stages=3),
        FlashConfig(block_kv=64, num_warps=4, num_stages=2),
        FlashConfig(block_kv=64, num_warps=8, num_stages=4),
        FlashConfig(num_warps=8, num_stages=3),
        FlashConfig(block_q=64, block_kv=64, num_warps=4, num_stages=3),
        FlashConfig(block_kv=32, num_warps=4, num_stages=4),
    ]
    chosen = [c for c in config_list() if c["name"] in ("B4 S4096 full", "B1 S16384 causal")]
    run_variants(chosen, variants, _fwd_tag, None, budget, backward=False)


def backward_sweep(budget: float, second: bool = False) -> None:
    """Backward tile/warp/stage variants (forward 128 x 64) on the forward+backward gaps to Flex.

    Flex's own H100 choice at head_dim 128 is 64 x 128 dK/dV and 128 x 64 dQ tiles with 8 warps
    and 3 stages; ours is 64 x 64 with 4 warps and 2 stages (chosen in run 1, before the
    back-to-back timer and the consecutive full blocks).
    """
    base: dict[str, Any] = dict(block_kv=64)
    variants = [
        FlashConfig(**base),
        FlashConfig(**base, num_stages_bwd=3),
        FlashConfig(**base, num_warps_bwd=8),
        FlashConfig(**base, block_kv_dkv=128, block_q_dq=128, num_warps_bwd=8),
        FlashConfig(**base, block_kv_dkv=128, block_q_dq=128, num_warps_bwd=8, num_stages_bwd=3),
        FlashConfig(**base, block_kv_dkv=128, block_q_dq=128, num_warps_bwd=4),
        FlashConfig(**base, block_q_dkv=32, block_kv_dkv=128, num_warps_bwd=4),
    ]
    if second:
        # Sixth session: longer steps with the same accumulators. A dK/dV program's float32
        # accumulators are (block_kv_dkv, D) whatever its query tile, and a dQ program's
        # (block_q_dq, D) whatever its key tile, so these double the work per loop step without
        # growing them (only the scores tile grows).
        variants = [
            FlashConfig(**base),
            FlashConfig(**base, block_q_dkv=128),
            FlashConfig(**base, block_kv_dq=128),
            FlashConfig(**base, block_q_dkv=128, block_kv_dq=128),
            FlashConfig(**base, block_q_dkv=128, block_kv_dq=128, num_warps_bwd=8),
        ]
    chosen = [c for c in config_list() if c["name"] in ("B4 S4096 full", "B1 S16384 4docs")]
    run_variants(chosen, variants, None, _bwd_tag, budget, backward=True)


def warps_sweep(budget: float) -> None:
    """Queued for the next session: the forward at 128 x 64 with 8 warps (two warpgroups of 64
    rows), FlexAttention's H100 choice at head_dim 128 in bf16. It lost 38% in the fourth
    session, before consecutive blocks and ranges; the two full configs are the gap to Flex."""
    variants = [
        FlashConfig(block_kv=64),
        FlashConfig(block_kv=64, num_warps=8, num_stages=2),
        FlashConfig(block_kv=64, num_warps=8, num_stages=3),
        # Ninth session: 256 query rows with 8 warps, each warpgroup holding the 128 rows one
        # 4-warp program holds now, the two sharing every K/V tile loaded.
        FlashConfig(block_q=256, block_kv=64, num_warps=8, num_stages=2),
        FlashConfig(block_q=256, block_kv=64, num_warps=8, num_stages=3),
        FlashConfig(block_kv=64),
    ]
    chosen = [c for c in config_list() if c["name"] in ("B4 S4096 full", "B1 S16384 full")]
    run_variants(chosen, variants, _fwd_tag, None, budget, backward=False)


# The ninth session's Mosaic-GPU probes, each on the two full configs: ``--mosaic NAME``.
_FULL = ("B4 S4096 full", "B1 S16384 full")


def _full_configs() -> list[dict[str, Any]]:
    return [c for c in config_list() if c["name"] in _FULL]


def mosaic_forward_sweep(budget: float) -> None:
    """Call 2: the Mosaic-GPU forward against the Triton one, and its key tile and pipeline
    slots, forward only."""
    variants = [
        FlashConfig(block_kv=64, use_mosaic_forward=False),
        FlashConfig(block_kv=64),
        FlashConfig(block_kv=64, mosaic_stages=3),
        FlashConfig(block_kv=64, mosaic_block_kv=64, mosaic_stages=3),
        FlashConfig(block_kv=64, mosaic_block_kv=64, mosaic_stages=4),
        FlashConfig(block_kv=64, use_mosaic_forward=False),
        FlashConfig(block_kv=64),
    ]
    run_variants(_full_configs(), variants, _mosaic_tag, None, budget, backward=False)


def mosaic_reserve_sweep(budget: float) -> None:
    """Call 3: the Mosaic-GPU forward without the reduction reserve, and three K/V slots once
    that frees their shared memory, beside JAX's example. (Call 3 also ran the grid with heads
    fastest, no different; that switch is gone.)"""
    from attnax.kernels.pallas_flash import mosaic as mgpu_kernel

    variants = [
        ("mosaic kv128 s2", FlashConfig(block_kv=64), None),
        ("mosaic kv128 s2 no reserve", FlashConfig(block_kv=64), 0),
        ("mosaic kv128 s3 no reserve", FlashConfig(block_kv=64, mosaic_stages=3), 0),
        ("mosaic kv128 s2", FlashConfig(block_kv=64), None),
    ]
    kept = mgpu_kernel.REDUCTION_SCRATCH_BYTES
    for cfg in _full_configs():
        _jax_mosaic_example(cfg)
        for label, flash, reserve in variants:
            if time.perf_counter() - START > budget:
                break
            mgpu_kernel.REDUCTION_SCRATCH_BYTES = reserve
            print("sweep " + label, flush=True)
            before = len(rows)
            run_config(cfg, flash, peers=False, budget=budget, backward=False)
            for row in rows[before:]:
                row["impl"], row["tag"] = "sweep " + label, "sweep"
        _jax_mosaic_example(cfg)
    mgpu_kernel.REDUCTION_SCRATCH_BYTES = kept


def _timed_forwards(budget: float, forwards: list[tuple[str, Any, Callable[..., Any]]]) -> None:
    """On each full config: JAX's example, then every ``(label, dtype, fn)`` forward on
    (B, H, S, D) inputs of that dtype, then the example again."""
    keys = jax.random.split(jax.random.key(0), 3)
    for cfg in _full_configs():
        shape = (cfg["B"], HEADS, cfg["S"], HEAD_DIM)
        _jax_mosaic_example(cfg)
        for label, dtype, fn in forwards:
            if time.perf_counter() - START > budget:
                return
            q, k, v = (jax.random.normal(key, shape, dtype) for key in keys)
            record("sweep " + label, cfg["name"], "fwd", timed(jax.jit(fn), q, k, v), flops_of(cfg))
            rows[-1]["tag"] = "sweep"
        _jax_mosaic_example(cfg)


def _public(**kwargs: Any) -> Callable[..., Any]:
    """The public path with 128 x 64 Triton tiles (the Mosaic-GPU forward where it applies)."""
    return lambda q, k, v: flash_attention_with_config(q, k, v, config=FlashConfig(block_kv=64), **kwargs)


def mosaic_dtype_probe(budget: float) -> None:
    """Call 4: is the Mosaic-GPU forward's gap to JAX's example the dtype (the example runs
    fp16 only) or our wrapper? The kernel called directly and through the public path, in bf16
    and fp16."""
    from attnax.kernels.pallas_flash.mosaic import mosaic_forward

    def direct(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return mosaic_forward(q, k, v, scale=HEAD_DIM**-0.5, block_kv=128, stages=2)[0]

    forwards = []
    for dtype in (jnp.bfloat16, jnp.float16) * 2:
        name = jnp.dtype(dtype).name
        forwards += [(f"mosaic_forward direct {name}", dtype, direct),
                     (f"public path {name}", dtype, _public())]
    _timed_forwards(budget, forwards)


def mosaic_scale_probe(budget: float) -> None:
    """Call 5: JAX's example computes softmax(Q Kᵀ) with no 1/sqrt(D) scale, so on random
    normal inputs its probabilities are nearly one-hot (mostly exact zeros into the P V
    product). Prediction: the same kernel at scale 1 runs as fast as the example, i.e. the gap
    in calls 3-4 is the inputs' values (the tensor cores' power draw), not the kernel."""
    _timed_forwards(budget, [
        (f"public path {jnp.dtype(dtype).name} scale {scale or 'default'}", dtype, _public(scale=scale))
        for dtype in (jnp.bfloat16, jnp.float16)
        for scale in (None, 1.0, None, 1.0)
    ])


def mosaic_example_probe(budget: float) -> None:
    """Call 1 (then ``benchmarks/mgpu_probe.py``, ``results/mgpu_probe_ninth_h100.json``): is a
    Mosaic-GPU forward worth writing? JAX's example at several tunings beside our Triton
    forward in bf16 and fp16."""
    triton = FlashConfig(block_kv=64, use_mosaic_forward=False)
    forwards = [
        (f"attnax triton 128x64 {jnp.dtype(dtype).name}", dtype,
         lambda q, k, v: flash_attention_with_config(q, k, v, config=triton))
        for dtype in (jnp.bfloat16, jnp.float16)
    ]
    _timed_forwards(budget, forwards)
    for cfg in _full_configs():
        for block_kv, stages in ((64, 2), (128, 3), (64, 3), (64, 4), (256, 2)):
            if time.perf_counter() - START > budget:
                return
            _jax_mosaic_example(cfg, block_kv=block_kv, stages=stages)


def mosaic_backward_sweep(budget: float) -> None:
    """Tenth session, call 2: the Mosaic-GPU backward against the Triton backward
    (``use_mosaic_backward=False``) and its own tiles and slots, forward+backward, the first
    default measured first and last; JAX's example's own forward+backward (fp16) in the same
    process. (Call 2's default dQ key tile was 64 rows; it chose 128. Call 2 set both kernels'
    slots through one field, since split in two: the same settings.)"""
    base: dict[str, Any] = {"block_kv": 64, "mosaic_dq_block_kv": 64}
    variants = [
        ("mosaic backward", FlashConfig(**base)),
        ("triton backward", FlashConfig(**base, use_mosaic_backward=False)),
        ("mosaic bwd s3", FlashConfig(**base, mosaic_dkv_stages=3, mosaic_dq_stages=3)),
        ("mosaic bwd dq kv128", FlashConfig(block_kv=64)),
        ("mosaic bwd dkv q128", FlashConfig(**base, mosaic_dkv_block_q=128)),
        ("mosaic bwd both128", FlashConfig(block_kv=64, mosaic_dkv_block_q=128)),
        ("mosaic backward", FlashConfig(**base)),
    ]
    _backward_variants(variants, budget)


def mosaic_backward_slots_sweep(budget: float) -> None:
    """Tenth session, call 3: three dK/dV slots beside the default (128-key dQ tiles, two
    slots each), interleaved twice, forward+backward."""
    variants = [
        ("mosaic backward", FlashConfig(block_kv=64)),
        ("mosaic bwd dkv s3", FlashConfig(block_kv=64, mosaic_dkv_stages=3)),
    ] * 2
    _backward_variants(variants, budget, example=False)


def _backward_variants(
    variants: list[tuple[str, FlashConfig]], budget: float, example: bool = True
) -> None:
    for cfg in _full_configs():
        if example:
            _jax_mosaic_example(cfg, backward=True)
        for label, flash in variants:
            if time.perf_counter() - START > budget:
                return
            print("sweep " + label, flush=True)
            before = len(rows)
            run_config(cfg, flash, peers=False, budget=budget, backward=True)
            for row in rows[before:]:
                row["impl"], row["tag"] = "sweep " + label, "sweep"


def _jax_mosaic_example(
    cfg: dict[str, Any], block_kv: int = 128, stages: int = 2, backward: bool = False
) -> None:
    """JAX's Mosaic-GPU FlashAttention-3 example's forward: fp16 (its shared memory is
    declared float16), its (B, T, H, D) layout, no log-sum-exp output, 2 x 64 query rows; with
    ``backward``, its forward+backward too (64 x 64 backward tiles)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    shape = (cfg["B"], cfg["S"], HEADS, HEAD_DIM)
    q, k, v = (jax.random.normal(key, shape, jnp.float16) for key in jax.random.split(jax.random.key(0), 3))
    tuning = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=stages)
    fn = jax.jit(lambda q, k, v: attention_mgpu.attention(q, k, v, tuning))
    impl = f"sweep jax attention_mgpu fp16 kv{block_kv} s{stages}"
    try:
        record(impl, cfg["name"], "fwd", timed(fn, q, k, v), flops_of(cfg))
        rows[-1]["tag"] = "sweep"
    except Exception as error:  # noqa: BLE001 - a benchmark records failures and moves on
        failed(impl, cfg["name"], "fwd", error)
    if not backward:
        return
    # Its backward needs its backward tiles (64 x 64 in both kernels, as ours).
    tuning = attention_mgpu.TuningConfig(
        block_q=64, block_kv=block_kv, max_concurrent_steps=stages, block_q_dkv=64,
        block_kv_dkv=64, block_q_dq=64, block_kv_dq=64,
    )
    example = grad_of(lambda q, k, v: attention_mgpu.attention(q, k, v, tuning))
    try:
        record(impl, cfg["name"], "fwd+bwd", timed(example, q, k, v), 3.5 * flops_of(cfg))
        rows[-1]["tag"] = "sweep"
    except Exception as error:  # noqa: BLE001
        failed(impl, cfg["name"], "fwd+bwd", error)


def _mosaic_tag(flash: FlashConfig) -> str:
    if not flash.use_mosaic_forward:
        return "triton " + _fwd_tag(flash)
    return f"mosaic kv{flash.mosaic_block_kv} s{flash.mosaic_stages}"


MOSAIC_PROBES: dict[str, Callable[[float], None]] = {
    "example": mosaic_example_probe,
    "forward": mosaic_forward_sweep,
    "reserve": mosaic_reserve_sweep,
    "dtypes": mosaic_dtype_probe,
    "scale": mosaic_scale_probe,
    "backward": mosaic_backward_sweep,
    "slots": mosaic_backward_slots_sweep,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--fwd-sweep", action="store_true")
    parser.add_argument("--bwd-sweep", action="store_true")
    parser.add_argument("--bwd-sweep2", action="store_true",
                        help="the sixth session's backward variants (longer steps)")
    parser.add_argument("--warps-sweep", action="store_true",
                        help="the forward with 8 warps on the full configs (queued)")
    parser.add_argument("--mosaic", choices=sorted(MOSAIC_PROBES), default=None,
                        help="one of the ninth and tenth sessions' Mosaic-GPU probes (full configs)")
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument("--fwd-block-kv", type=int, default=128)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--indexed-full", action="store_true",
                        help="block lists for every mask (BLOCK_RANGES off)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--only", default="")
    parser.add_argument("--budget", type=float, default=330.0)
    args = parser.parse_args()
    device = jax.devices()[0].device_kind
    print("jax", jax.__version__, device, flush=True)
    # --fwd-block-kv 64: the table with 128 x 64 forward tiles (4 warps, 2 stages), the
    # forward sweep's best; the backward keeps its defaults.
    flash = FlashConfig(block_kv=args.fwd_block_kv)
    pallas_plan.BLOCK_RANGES = not args.indexed_full
    for cfg in [] if args.skip_table else config_list():
        if args.only and not any(token in cfg["name"] for token in args.only.split(",")):
            continue
        run_config(cfg, flash, peers=not args.no_peers, budget=args.budget)
    if args.fwd_sweep:
        forward_sweep(args.budget)
    if args.sweep:
        sweep(args.budget)
    if args.bwd_sweep or args.bwd_sweep2:
        backward_sweep(args.budget, second=args.bwd_sweep2)
    if args.warps_sweep:
        warps_sweep(args.budget)
    if args.mosaic is not None:
        MOSAIC_PROBES[args.mosaic](args.budget)
    # Ratios: ours over each peer, same config and mode.
    ratios = []
    for row in rows:
        if row["impl"] != "attnax pallas_flash" or "ms" not in row or "sweep" in row.get("tag", ""):
            continue
        for peer in rows:
            same = peer["cfg"] == row["cfg"] and peer["mode"] == row["mode"] and "ms" in peer
            if same and peer["impl"] in ("cudnn", "cudnn dense-mask", "jax pallas mha"):
                ratios.append(
                    {"cfg": row["cfg"], "mode": row["mode"], "peer": peer["impl"],
                     "speedup": round(peer["ms"] / row["ms"], 3)}
                )
    print("\nattnax speed-up over peers (peer time / our time):")
    for r in ratios:
        print(f"  {r['cfg']:34s} {r['mode']:8s} vs {r['peer']:18s} {r['speedup']:6.2f}x")
    out_dir = os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results"))
    os.makedirs(out_dir, exist_ok=True)
    name = "pallas_flash_h100.json" if args.fwd_block_kv == 128 else f"pallas_flash_kv{args.fwd_block_kv}_h100.json"
    if args.tag:
        name = name.replace("_h100.json", f"_{args.tag}_h100.json")
    path = os.path.join(out_dir, name)
    with open(path, "w") as fh:
        json.dump({"device": device, "jax": jax.__version__, "rows": rows, "ratios": ratios}, fh, indent=1)
    print("wrote", path, file=sys.stderr)


if __name__ == "__main__":
    main()
