#!/usr/bin/env bash
# One device call on `nvidia-h100-x2` (two H100s): the single-GPU benchmarks run side by side,
# one chain per GPU, each script timing its own peers in the same process; logs and JSON in $OUT.
#   bash benchmarks/device_run.sh single | ring | recheck (GPU tests and prefill again) | probe
set -u
source "$(ls -d ../shared shared .device_shared 2>/dev/null | head -1)/gpu/setup-device.sh"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "${1:-single}" in
single)
  (
    export CUDA_VISIBLE_DEVICES=0
    timeout 230 python3 benchmarks/pallas_flash.py --budget 190
    timeout 200 python3 benchmarks/torch_peers.py 170
  ) >"$OUT/gpu0.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests --timeout 60 2>&1 | tail -40
    timeout 190 python3 benchmarks/prefill.py --xla-max-seq 16384
    timeout 170 python3 benchmarks/decode.py
  ) >"$OUT/gpu1.log" 2>&1 &
  wait
  ;;
recheck)
  (
    export CUDA_VISIBLE_DEVICES=0
    timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests --timeout 120 -rf 2>&1 | tail -40
  ) >"$OUT/gpu_tests.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    timeout 200 python3 benchmarks/prefill.py --xla-max-seq 16384
    timeout 90 python3 benchmarks/memeff_blocks.py
  ) >"$OUT/prefill.log" 2>&1 &
  wait
  ;;
probe)
  (
    export CUDA_VISIBLE_DEVICES=0
    timeout 150 python3 benchmarks/linear_chunks.py
  ) >"$OUT/linear.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    timeout 80 python3 -m attnax._cli demo
    timeout 110 python3 -m attnax._cli bench --seq 4096 --repeats 5 --backends flash,pallas_flash,memory_efficient,linear --out "$OUT/bench_cli.json"
  ) >"$OUT/cli.log" 2>&1 &
  wait
  ;;
ring)
  timeout 240 python3 benchmarks/ring.py --budget 200 >"$OUT/ring.log" 2>&1
  ;;
esac
tail -n 25 "$OUT"/*.log
