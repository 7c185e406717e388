"""torch peers for the PALLAS_FLASH configs (run on the device in the same call as pallas_flash.py).

FlexAttention (torch.compile'd, block masks) and SDPA (FlashAttention-2) on every config of
`benchmarks/pallas_flash.py`: B4 S4096 and B1 S16384 causal/full, ALiBi+causal, a 1024-token
sliding window and a 4-document packed mask at B1 S16384, GQA 32/8. bf16, D=128.
TFLOP/s in the FlashAttention convention (dense count, halved when causal; x3.5 for fwd+bwd), so
the numbers line up with pallas_flash.py's rows. Writes $OUT/torch_peers.json.
"""

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from triton.testing import do_bench

OUT = os.environ.get("OUT", "benchmarks/results")
BUDGET = float(sys.argv[1]) if len(sys.argv) > 1 else 220.0
# Run only configs whose name contains one of these comma-separated tokens.
ONLY = [token for token in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if token]
START = time.time()
D = 128
rows: list[dict[str, object]] = []
flex = torch.compile(flex_attention, dynamic=False)
print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)


def emit(impl: str, cfg: str, ms: float, flops: float) -> None:
    tf = flops / (ms * 1e-3) / 1e12
    rows.append(dict(impl=impl, cfg=cfg, ms=ms, tflops=tf))
    print(f"{impl:28s} {cfg:34s} {ms:9.3f} ms {tf:8.1f} TF/s", flush=True)


def bench(impl: str, cfg: str, fn, flops: float) -> None:  # type: ignore[no-untyped-def]
    if ONLY and not any(token in cfg for token in ONLY):
        return
    if time.time() - START > BUDGET:
        print(f"{impl} {cfg} skipped: budget", flush=True)
        return
    try:
        emit(impl + " fwd", cfg, do_bench(fn, warmup=25, rep=100, return_mode="median"), flops)
        out = fn()
        grad = torch.randn_like(out)
        emit(
            impl + " fwd+bwd", cfg,
            do_bench(lambda: torch.autograd.backward(fn(), grad), warmup=25, rep=100, return_mode="median"),
            3.5 * flops,
        )
    except Exception as error:  # a benchmark records a peer's failure and goes on
        rows.append(dict(impl=impl, cfg=cfg, error=str(error).splitlines()[0][:200]))
        print(impl, cfg, "FAILED", str(error).splitlines()[0][:200], flush=True)


def qkv(batch: int, heads: int, kv_heads: int, seq: int) -> tuple[torch.Tensor, ...]:
    make = lambda h: torch.randn(batch, h, seq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def causal(b, h, q, kv):  # type: ignore[no-untyped-def]
    return q >= kv


for batch, seq in ((4, 4096), (1, 16384)):
    for is_causal in (True, False):
        cfg = f"B{batch} S{seq} {'causal' if is_causal else 'full'}"
        flops = 4 * batch * 16 * seq * seq * D / (2 if is_causal else 1)
        q, k, v = qkv(batch, 16, 16, seq)
        bm = create_block_mask(causal, None, None, seq, seq) if is_causal else None
        bench("torch flex", cfg, lambda: flex(q, k, v, block_mask=bm), flops)
        bench("torch sdpa", cfg, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal), flops)

# ALiBi + causal
q, k, v = qkv(4, 16, 16, 4096)
slopes = 2.0 ** (-8.0 * (torch.arange(1, 17, device="cuda") / 16))


def alibi(score, b, h, qi, ki):  # type: ignore[no-untyped-def]
    return score - slopes[h] * (qi - ki).abs()


bm = create_block_mask(causal, None, None, 4096, 4096)
bench("torch flex", "B4 S4096 alibi+causal", lambda: flex(q, k, v, score_mod=alibi, block_mask=bm),
      4 * 4 * 16 * 4096 * 4096 * D / 2)

# Sliding window 1024 (causal) and 4 packed documents at B1 S16384, dense-convention FLOPs (causal).
seq = 16384
q, k, v = qkv(1, 16, 16, seq)


def window(b, h, qi, ki):  # type: ignore[no-untyped-def]
    return (qi >= ki) & (qi - ki < 1024)


documents = torch.arange(seq, device="cuda") // (seq // 4)


def same_document(b, h, qi, ki):  # type: ignore[no-untyped-def]
    return documents[qi] == documents[ki]


# pallas_flash.py counts these two with the full dense FLOPs; so do we (time ratios are what count).
dense = 4 * 1 * 16 * seq * seq * D
window_blocks = create_block_mask(window, None, None, seq, seq)
document_blocks = create_block_mask(same_document, None, None, seq, seq)
bench("torch flex", "B1 S16384 window1024", lambda: flex(q, k, v, block_mask=window_blocks), dense)
bench("torch flex", "B1 S16384 4docs", lambda: flex(q, k, v, block_mask=document_blocks), dense)

# GQA 32/8, causal, B4 S4096
q, k, v = qkv(4, 32, 8, 4096)
bm = create_block_mask(causal, None, None, 4096, 4096)
bench("torch flex", "B4 S4096 causal GQA32/8", lambda: flex(q, k, v, block_mask=bm, enable_gqa=True), 4 * 4 * 32 * 4096 * 4096 * D / 2)

os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, "torch_peers.json"), "w") as fh:
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)
print("TORCH PEERS DONE", flush=True)
