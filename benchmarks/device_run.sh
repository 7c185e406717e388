#!/usr/bin/env bash
# One device call on `nvidia-h100-x2` (two H100s): the single-GPU benchmarks run side by side,
# one chain per GPU, each script timing its own peers in the same process; logs and JSON in $OUT.
#   bash benchmarks/device_run.sh single | ring | recheck (GPU tests and prefill again) | probe
#   | kernels (GPU tests, LINEAR chunks, decode sweep) | round2..round11 (the sessions' calls)
set -u
source "$(ls -d ../shared shared .device_shared 2>/dev/null | head -1)/gpu/setup-device.sh"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

# The PALLAS_FLASH table (128 x 64 forward tiles; ONLY: config-name tokens, "" for all) then
# FlexAttention's rows, on the current GPU:
# table_and_flex TAG ONLY TABLE_TIMEOUT TABLE_BUDGET FLEX_TIMEOUT FLEX_BUDGET
table_and_flex() {
  local only=()
  [ -n "$2" ] && only=(--only "$2")
  timeout "$3" python3 benchmarks/pallas_flash.py --fwd-block-kv 64 "${only[@]}" --tag "$1" --budget "$4"
  timeout "$5" python3 benchmarks/torch_peers.py "$6" $2
}
# pytest's GPU tests on the current GPU, the summary's last lines: gpu_tests TIMEOUT PYTEST_ARGS...
gpu_tests() {
  local limit=$1
  shift
  timeout "$limit" python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 "$@" --timeout 150 -rf 2>&1 | tail -15
}
# One of pallas_flash.py's sweeps (no table, no peers, 128 x 64 forward tiles) on the current
# GPU: sweep TAG TIMEOUT BUDGET SWEEP_ARGS...
sweep() {
  local tag=$1 limit=$2 budget=$3
  shift 3
  timeout "$limit" python3 benchmarks/pallas_flash.py --skip-table --no-peers --fwd-block-kv 64 "$@" --tag "$tag" --budget "$budget"
}
# The table then FlexAttention on GPU 0, beside pytest's GPU tests on GPU 1:
# table_beside_tests TAG TABLE_TIMEOUT TABLE_BUDGET FLEX_TIMEOUT FLEX_BUDGET TEST_TIMEOUT
# PYTEST_PATHS...
table_beside_tests() {
  local tag=$1 table_timeout=$2 table_budget=$3 flex_timeout=$4 flex_budget=$5 test_timeout=$6
  shift 6
  (
    export CUDA_VISIBLE_DEVICES=0
    table_and_flex "$tag" "" "$table_timeout" "$table_budget" "$flex_timeout" "$flex_budget"
  ) >"$OUT/table.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    gpu_tests "$test_timeout" "$@"
  ) >"$OUT/gpu_tests.log" 2>&1 &
  wait
}
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
kernels)
  (
    export CUDA_VISIBLE_DEVICES=0
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests --timeout 120 -rf 2>&1 | tail -30
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/linear/test_linear.py tests/kernels/ring/test_cudnn.py --timeout 120 -rf 2>&1 | tail -15
    timeout 150 python3 benchmarks/linear_chunks.py
  ) >"$OUT/gpu0.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    timeout 420 python3 benchmarks/decode.py --sweep
  ) >"$OUT/gpu1.log" 2>&1 &
  wait
  ;;
round2)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -n 0 tests/kernels/ring/test_cudnn.py --timeout 120 -rf >"$OUT/ring_tests.log" 2>&1
  tail -5 "$OUT/ring_tests.log"
  timeout 330 python3 benchmarks/ring.py --budget 270 >"$OUT/ring.log" 2>&1
  (
    export CUDA_VISIBLE_DEVICES=0
    timeout 100 python3 benchmarks/linear_chunks.py
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/kernels/linear/test_linear.py tests/kernels/decode/test_paged.py --timeout 60 -rf 2>&1 | tail -5
  ) >"$OUT/gpu0.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    timeout 200 python3 benchmarks/decode.py --sweep --skip-e2e
  ) >"$OUT/gpu1.log" 2>&1 &
  wait
  ;;
round3)
  (
    export CUDA_VISIBLE_DEVICES=0
    timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests --timeout 120 -rf >"$OUT/gpu_tests.log" 2>&1
    tail -5 "$OUT/gpu_tests.log"
  ) >"$OUT/gpu0.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    timeout 120 python3 benchmarks/linear_profile.py
    timeout 300 python3 benchmarks/decode.py --sweep
  ) >"$OUT/gpu1.log" 2>&1 &
  wait
  ;;
round4)
  timeout 200 python3 benchmarks/ring.py --memory >"$OUT/ring_memory.log" 2>&1
  (
    export CUDA_VISIBLE_DEVICES=0
    timeout 100 python3 -m pytest -q -p no:cacheprovider -n 0 tests/kernels/linear/test_linear.py --timeout 60 -rf 2>&1 | tail -4
    timeout 100 python3 benchmarks/linear_profile.py
    timeout 100 python3 benchmarks/linear_chunks.py
  ) >"$OUT/gpu0.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    timeout 200 python3 benchmarks/decode.py
  ) >"$OUT/gpu1.log" 2>&1 &
  wait
  ;;
round5)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -n 0 tests/kernels/ring/test_cudnn.py --timeout 120 -rf >"$OUT/ring_tests.log" 2>&1
  tail -3 "$OUT/ring_tests.log"
  timeout 150 python3 benchmarks/ring.py --no-tiles --lengths 65536,131072 --budget 120 >"$OUT/ring.log" 2>&1
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 200 python3 benchmarks/ring.py --memory \
    --lengths 1048576,1310720,1572864,2097152,2621440,3145728 >"$OUT/ring_memory.log" 2>&1
  ;;
round6|round7)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -n 0 tests/kernels/linear/test_linear.py --timeout 100 -rf 2>&1 | tail -25
  timeout 150 python3 benchmarks/linear_chunks.py
  ;;
round8)
  # Third session, call 1: GPU tests after the review mends; the ring's lean schedule on both
  # GPUs (tests, then compile-only memory); paged decode over sorted vs shuffled tables.
  (
    export CUDA_VISIBLE_DEVICES=0
    timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests --timeout 150 -rf 2>&1 | tail -30
  ) >"$OUT/gpu_tests.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    timeout 200 python3 benchmarks/decode.py --skip-e2e --paged-sorted
  ) >"$OUT/decode.log" 2>&1 &
  (
    timeout 150 python3 -m pytest -q -p no:cacheprovider -n 0 tests/kernels/ring/test_cudnn.py --timeout 120 -rf 2>&1 | tail -8
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 280 python3 benchmarks/ring.py --memory \
      --lengths 1310720,1441792,1572864 --ring-lengths 2621440,2883584,3145728,3407872 --kv-pieces 1,2
  ) >"$OUT/ring.log" 2>&1 &
  wait
  ;;
round11)
  # Third session, last call: the ring after the in-place dQ and P - 1 hop dK/dV changes:
  # tests on both GPUs, compile-only memory around the fit limits, timings at 64k and 128k.
  # (Calls 2-3 of this session also ran a "kv_pieces" memory-lean variant, since removed, and
  # LINEAR's fused-chunk kernels, reverted; see NOTES.md.)
  timeout 150 python3 -X faulthandler -m pytest -q -p no:cacheprovider -n 0 tests/kernels/ring/test_cudnn.py --timeout 120 -rf >"$OUT/ring_tests.log" 2>&1
  tail -3 "$OUT/ring_tests.log"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 150 python3 benchmarks/ring.py --memory \
    --lengths 1310720,1572864,1966080 --ring-lengths 2621440,2752512,2883584,3014656,3145728 >"$OUT/ring_memory.log" 2>&1
  timeout 200 python3 benchmarks/ring.py --lengths 65536,131072 --no-tiles --budget 170 >"$OUT/ring.log" 2>&1
  ;;
gputests)
  # The GPU-marked tests on the final tree, split over the two GPUs.
  (
    export CUDA_VISIBLE_DEVICES=0
    timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests/kernels/pallas_flash --timeout 150 -rf 2>&1 | tail -6
  ) >"$OUT/gpu_tests_0.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests --deselect tests/kernels/pallas_flash --ignore tests/kernels/pallas_flash --timeout 150 -rf 2>&1 | tail -6
  ) >"$OUT/gpu_tests_1.log" 2>&1 &
  wait
  ;;
paged)
  # Paged decode GPU tests, then the kernel table (the sweep's best rows too). Call 9 of the
  # third session ran this with a --paged-packed variant (since reverted), call 10 with the
  # 2-D row gather.
  timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests/kernels/decode/test_paged.py tests/kernels/decode/test_decode.py --timeout 100 -rf 2>&1 | tail -4
  timeout 200 python3 benchmarks/decode.py --skip-e2e --sweep >"$OUT/decode.log" 2>&1
  ;;
linear)
  # Fourth session: LINEAR's fused Pallas backward (and forward knobs): its GPU tests, then the
  # table beside cuDNN FLASH with each fused stage timed alone.
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests/kernels/linear/test_linear.py --timeout 120 -rf 2>&1 | tail -6
  timeout 300 python3 benchmarks/linear_chunks.py --stages >"$OUT/linear.log" 2>&1
  if [ "${2:-}" = prefill ]; then
    timeout 240 python3 benchmarks/prefill.py --xla-max-seq 16384 >"$OUT/prefill.log" 2>&1
  fi
  ;;
final)
  # Fourth session: every GPU test but PALLAS_FLASH's (those run in `pallasflash`), then the
  # prefill table with the back-to-back timer.
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests --ignore tests/kernels/pallas_flash --timeout 150 -rf >"$OUT/gpu_tests.log" 2>&1
  tail -4 "$OUT/gpu_tests.log"
  timeout 250 python3 benchmarks/prefill.py --xla-max-seq 16384 >"$OUT/prefill.log" 2>&1
  ;;
pallasflash)
  timeout 500 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests/kernels/pallas_flash --timeout 200 -rf >"$OUT/gpu_tests_pallas_flash.log" 2>&1
  tail -4 "$OUT/gpu_tests_pallas_flash.log"
  ;;
flex64)
  # Fourth session, last call: one GPU's compile-only memory of causal fwd+bwd for both FLASH
  # entry points (the (B, H, T, D) one no longer transposes), then PALLAS_FLASH's table with
  # 128 x 64 forward tiles beside torch's FlexAttention.
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 120 python3 benchmarks/ring.py --memory --single-only --lengths 1572864,1966080 >"$OUT/memory.log" 2>&1
  timeout 300 python3 benchmarks/pallas_flash.py --fwd-block-kv 64 --budget 260 >"$OUT/pallas_flash.log" 2>&1
  timeout 220 python3 benchmarks/torch_peers.py 190 >"$OUT/torch_peers.log" 2>&1
  ;;
consecutive)
  # Fourth session, call 9: PALLAS_FLASH's forward stepping through consecutive full blocks by
  # arithmetic (the flag then named CONSECUTIVE_FULL_BLOCKS, now BLOCK_RANGES) against the
  # indexed loop, dense configs, no peers;
  # then PALLAS_FLASH's GPU tests.
  ONLY="B4 S4096 causal,B4 S4096 full,B1 S16384 causal,B1 S16384 full"
  for kv in 64 128; do
    timeout 100 python3 benchmarks/pallas_flash.py --only "$ONLY" --no-peers --fwd-block-kv $kv --tag consecutive >"$OUT/pf_kv${kv}_consecutive.log" 2>&1
    timeout 100 python3 benchmarks/pallas_flash.py --only "$ONLY" --no-peers --fwd-block-kv $kv --indexed-full --tag indexed >"$OUT/pf_kv${kv}_indexed.log" 2>&1
  done
  grep -h "attnax pallas_flash" "$OUT"/pf_*.log
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests/kernels/pallas_flash --timeout 200 -rf >"$OUT/gpu_tests_pallas_flash.log" 2>&1
  tail -2 "$OUT/gpu_tests_pallas_flash.log"
  ;;
consecutive2)
  # Call 10: the same comparison with the backward kernels also stepping by arithmetic
  # (128 x 64 forward tiles), then PALLAS_FLASH's GPU tests.
  ONLY="B4 S4096 causal,B4 S4096 full,B1 S16384 causal,B1 S16384 full"
  timeout 100 python3 benchmarks/pallas_flash.py --only "$ONLY" --no-peers --fwd-block-kv 64 --tag consecutive2 >"$OUT/pf_consecutive.log" 2>&1
  timeout 100 python3 benchmarks/pallas_flash.py --only "$ONLY" --no-peers --fwd-block-kv 64 --indexed-full --tag indexed2 >"$OUT/pf_indexed.log" 2>&1
  grep -h "attnax pallas_flash" "$OUT"/pf_*.log
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests/kernels/pallas_flash --timeout 200 -rf >"$OUT/gpu_tests_pallas_flash.log" 2>&1
  tail -2 "$OUT/gpu_tests_pallas_flash.log"
  ;;
flexfinal)
  # Call 11: the final PALLAS_FLASH (consecutive full blocks in all kernels), whole table with
  # the default 128 x 128 forward tiles and with 128 x 64, beside torch's FlexAttention.
  timeout 200 python3 benchmarks/pallas_flash.py --fwd-block-kv 64 --no-peers --tag final --budget 170 >"$OUT/pallas_flash_kv64.log" 2>&1
  timeout 200 python3 benchmarks/pallas_flash.py --no-peers --tag final --budget 170 >"$OUT/pallas_flash_kv128.log" 2>&1
  timeout 180 python3 benchmarks/torch_peers.py 150 >"$OUT/torch_peers.log" 2>&1
  ;;
flex)
  # Fourth session: PALLAS_FLASH's table (back-to-back timer) with a forward tile sweep, then
  # torch's FlexAttention and SDPA on the same card.
  timeout 330 python3 benchmarks/pallas_flash.py --fwd-sweep --budget 290 >"$OUT/pallas_flash.log" 2>&1
  timeout 220 python3 benchmarks/torch_peers.py 190 >"$OUT/torch_peers.log" 2>&1
  ;;
memeff)
  # Fifth session, call 1: MEMORY_EFFICIENT's fused GPU tile. Its tests (fused file and the
  # XLA-path file, whose bf16 cases now take the fused tile on a GPU), the block probe beside
  # XLA and PALLAS_FLASH, then the prefill table.
  timeout 110 python3 -m pytest -q -p no:cacheprovider -n 0 -m gpu tests/kernels/memory_efficient/test_memory_efficient_fused.py --timeout 100 -rf >"$OUT/memeff_tests.log" 2>&1
  timeout 60 python3 -m pytest -q -p no:cacheprovider -n 0 tests/kernels/memory_efficient/test_memory_efficient.py -k "bfloat16 or vmap or shard_map" --timeout 50 -rf >>"$OUT/memeff_tests.log" 2>&1
  timeout 110 python3 benchmarks/memeff_blocks.py >"$OUT/memeff_blocks.log" 2>&1
  timeout 260 python3 benchmarks/prefill.py --xla-max-seq 16384 >"$OUT/prefill.log" 2>&1
  ;;
memeff2)
  # Fifth session, call 2: every GPU test but PALLAS_FLASH's (the layer's MEMORY_EFFICIENT and
  # the ring's local path now take the fused tile for bf16), FLASH against raw cuDNN with
  # interleaved samples, and a PALLAS_FLASH backward tile sweep.
  timeout 280 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests --ignore tests/kernels/pallas_flash --timeout 150 -rf >"$OUT/gpu_tests.log" 2>&1
  timeout 100 python3 benchmarks/prefill.py --paired-only --paired 20 >"$OUT/prefill_paired.log" 2>&1
  timeout 190 python3 benchmarks/pallas_flash.py --skip-table --bwd-sweep --no-peers --tag bwdsweep --budget 175 >"$OUT/pallas_flash_bwdsweep.log" 2>&1
  ;;
pftests)
  # Fifth session, call 4: PALLAS_FLASH's GPU tests on the final kernel (its forward() now also
  # serves MEMORY_EFFICIENT's stepped calls).
  timeout 280 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests/kernels/pallas_flash tests/kernels/memory_efficient/test_memory_efficient_fused.py --timeout 250 -rf >"$OUT/gpu_tests_pallas_flash.log" 2>&1
  ;;
ringlean)
  # The PALLAS_FLASH-pair ring: its GPU tests (and PALLAS_FLASH's, whose backward was split),
  # compile-only memory of one GPU at T against the rings at 2T, then speed at 65536.
  timeout 200 python3 -m pytest -q -p no:cacheprovider -n 0 -m gpu tests/kernels/ring/test_pallas.py tests/kernels/pallas_flash --timeout 150 -rf >"$OUT/ring_pallas_tests.log" 2>&1
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 220 python3 benchmarks/ring.py --memory --pairs default,pallas --lengths 1900544,1966080 --ring-lengths 3801088,3932160 >"$OUT/ring_memory.log" 2>&1
  timeout 200 python3 benchmarks/ring.py --lengths 65536 --pairs pallas --no-contiguous --no-tiles --budget 150 >"$OUT/ring_time.log" 2>&1
  ;;
ranges)
  # Sixth session, call 2: block ranges. One GPU each: PALLAS_FLASH's table with ranges and
  # FlexAttention (GPU 0); the single-GPU tests and the same table with indexed lists (GPU 1).
  # Then both GPUs: the PALLAS_FLASH-pair ring's tests, compile-only memory, speed at 65536.
  (
    export CUDA_VISIBLE_DEVICES=0
    timeout 170 python3 benchmarks/pallas_flash.py --fwd-block-kv 64 --no-peers --tag ranges --budget 140
    timeout 160 python3 benchmarks/torch_peers.py 130
  ) >"$OUT/gpu0.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests/kernels/pallas_flash tests/kernels/memory_efficient/test_memory_efficient_fused.py tests/kernels/test_pallas_in_shard_map.py --timeout 140 -rf 2>&1 | tail -15
    timeout 170 python3 benchmarks/pallas_flash.py --fwd-block-kv 64 --no-peers --indexed-full --tag indexed --budget 140
  ) >"$OUT/gpu1.log" 2>&1 &
  wait
  timeout 90 python3 -m pytest -q -p no:cacheprovider -n 0 -m gpu tests/kernels/ring/test_pallas.py --timeout 80 -rf >"$OUT/ring_pallas_tests.log" 2>&1
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 120 python3 benchmarks/ring.py --memory --pairs pallas --lengths 1966080 --ring-lengths 3801088,3932160,4194304 >"$OUT/ring_memory.log" 2>&1
  timeout 100 python3 benchmarks/ring.py --lengths 65536 --pairs pallas --no-contiguous --no-tiles --budget 70 >"$OUT/ring_time.log" 2>&1
  ;;
ringrun)
  # Sixth session, call 3: the PALLAS_FLASH-pair ring really run once at 2 x 1,966,080 tokens
  # (one GPU's compile-time figure does not fit at 1,966,080), with the allocator's peak.
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 500 python3 benchmarks/ring.py --memory --run --ring-only --pairs pallas --ring-lengths 3932160 >"$OUT/ring_run.log" 2>&1
  ;;
final6)
  # Sixth session, call 4: the GPU tests after block ranges and the Pallas-pair ring (one GPU
  # each, then both), and the ring's speed table with both pair kernels.
  (
    export CUDA_VISIBLE_DEVICES=0
    timeout 190 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests/kernels/pallas_flash tests/kernels/memory_efficient/test_memory_efficient_fused.py --timeout 180 -rf 2>&1 | tail -8
    timeout 90 python3 benchmarks/pallas_flash.py --skip-table --bwd-sweep2 --no-peers --fwd-block-kv 64 --tag bwdsweep2 --budget 75
  ) >"$OUT/gpu_tests_pallas.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests --ignore=tests/kernels/pallas_flash --ignore=tests/kernels/memory_efficient/test_memory_efficient_fused.py --timeout 220 -rf 2>&1 | tail -8
  ) >"$OUT/gpu_tests_rest.log" 2>&1 &
  wait
  timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests/kernels/ring/test_pallas.py tests/kernels/ring/test_cudnn.py tests/kernels/ring/test_xla.py --timeout 90 -rf 2>&1 | tail -8 >"$OUT/gpu_tests_ring.log"
  timeout 130 python3 benchmarks/ring.py --lengths 65536,131072 --pairs pallas --no-contiguous --no-tiles --budget 100 >"$OUT/ring_time.log" 2>&1  # kept as results/ring_pairs_sixth_2xh100.json
  ;;
ringpaired)
  # For the next session: the default (cuDNN-pair) ring against one GPU with interleaved
  # samples, where sequential medians put the 65536-token forward at 1.74-1.93x over three calls.
  timeout 300 python3 benchmarks/ring.py --lengths 65536,131072 --no-contiguous --no-tiles --paired 15 --budget 150 >"$OUT/ring_paired.log" 2>&1
  ;;
ringprof)
  # The default ring (seventh session): GPU tests; its parts, traces of the ring's and one GPU's
  # forward with device time per call; then ring.py (10 calls per sample) with both pair kernels
  # and interleaved ratios.
  timeout 150 python3 -m pytest -q -p no:cacheprovider -n 0 tests/kernels/ring/test_cudnn.py --timeout 120 -rf >"$OUT/ring_tests.log" 2>&1
  timeout 150 python3 benchmarks/ring_profile.py --seq 65536 >"$OUT/ring_profile.log" 2>&1
  mv "$OUT/ring_profile_2xh100.json" "$OUT/ring_profile_65k.json"
  (cd "$OUT" && tar czf traces_65k.tgz ./*_hlo.txt ./*_timeline.txt && rm ./*_hlo.txt ./*_timeline.txt)
  timeout 330 python3 benchmarks/ring.py --lengths 65536,131072 --no-contiguous --no-tiles --pairs default,pallas --paired 7 --budget 250 >"$OUT/ring.log" 2>&1
  ;;
bwdsweep3)
  # Seventh session: the dQ kernel's launch parameters apart from dK/dV's, half the variants
  # on each GPU (each with the default as its baseline).
  for part in 0 1; do
    (
      export CUDA_VISIBLE_DEVICES=$part
      sweep bwdsweep3_part$part 280 250 --bwd-sweep3 $part
    ) >"$OUT/bwdsweep3_part$part.log" 2>&1 &
  done
  wait
  ;;
sweep8)
  # Eighth session: the (keys, queries) dK/dV kernel against the old form and its launch
  # variants, half on each GPU (each with both baselines); the kernels' GPU tests first on GPU 1.
  (
    export CUDA_VISIBLE_DEVICES=0
    sweep bwdsweep4_part0 420 395 --bwd-sweep4 0
  ) >"$OUT/bwdsweep4_part0.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    gpu_tests 140 tests/kernels/pallas_flash tests/kernels/memory_efficient/test_memory_efficient_fused.py
    sweep bwdsweep4_part1 290 265 --bwd-sweep4 1
  ) >"$OUT/bwdsweep4_part1.log" 2>&1 &
  wait
  ;;
final8)
  # Eighth session's table: PALLAS_FLASH (128 x 64 forward tiles; (keys, queries) dK/dV; three
  # forward stages for block lists) then FlexAttention on GPU 0; every single-GPU test on GPU 1.
  table_beside_tests eighth 240 215 170 150 380 tests --ignore tests/kernels/ring/test_cudnn.py --ignore tests/kernels/ring/test_pallas.py
  ;;
docs8)
  # Eighth session, call 3, run with code since dropped (documents' rows walked by their bounds
  # behind an in-kernel branch, slower; NOTES "Eighth session"): its --docs-sweep flags are
  # gone. What remains of it: the table then FlexAttention on GPU 0, the kernel tests on GPU 1.
  table_beside_tests eighth2 240 225 150 135 400 tests/kernels/pallas_flash tests/kernels/test_pallas_in_shard_map.py tests/kernels/memory_efficient/test_memory_efficient_fused.py tests/kernels/test_flash.py
  ;;
probe9)
  # Ninth session, call 1: the forward with 8 warps (128 x 64 and 256 x 64) against 4 warps on
  # the full configs on GPU 0; JAX's Mosaic-GPU FlashAttention-3 example at several tunings
  # beside our Triton forward on GPU 1 (is a Mosaic-GPU forward worth writing? Run then by
  # benchmarks/mgpu_probe.py, since folded into pallas_flash.py's --mosaic example).
  (
    export CUDA_VISIBLE_DEVICES=0
    sweep warps9 240 220 --warps-sweep
  ) >"$OUT/warps.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    cp "$(python3 -c 'import jax.experimental.pallas.ops.gpu.attention_mgpu as m; print(m.__file__)')" "$OUT/attention_mgpu_device.py.txt"
    sweep mgpuprobe9 240 200 --mosaic example
  ) >"$OUT/probe.log" 2>&1 &
  wait
  ;;
mosaic9)
  # Ninth session, call 2: the Mosaic-GPU forward (full attention) against Triton, then the
  # full rows of the table and FlexAttention's on GPU 0; the PALLAS_FLASH GPU tests on GPU 1.
  (
    export CUDA_VISIBLE_DEVICES=0
    sweep mosaic9 150 130 --mosaic forward
    table_and_flex ninth1 full 120 105 90 80
  ) >"$OUT/table.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    gpu_tests 330 tests/kernels/pallas_flash
  ) >"$OUT/gpu_tests.log" 2>&1 &
  wait
  ;;
mosaic9b)
  # Ninth session, call 3: the Mosaic-GPU forward's reduction reserve and K/V slots (and then
  # the grid's order) beside JAX's own Mosaic-GPU example on GPU 0; the whole table
  # (Mosaic-GPU forward on the full configs) and FlexAttention on GPU 1.
  (
    export CUDA_VISIBLE_DEVICES=0
    sweep mosaic9b 200 180 --mosaic reserve
  ) >"$OUT/sweep.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    table_and_flex ninth2 "" 240 225 150 135
  ) >"$OUT/table.log" 2>&1 &
  wait
  ;;
tests9)
  # Ninth session, call 4: the ring tests on both GPUs (full-attention pairs now take the
  # Mosaic-GPU forward), then the GPU tests of every kernel built on PALLAS_FLASH's on GPU 1
  # (decode, paged and LINEAR share nothing with it) beside the Mosaic-GPU forward's dtype
  # probe on GPU 0.
  gpu_tests 150 tests/kernels/ring/test_cudnn.py tests/kernels/ring/test_pallas.py tests/kernels/ring/test_xla.py >"$OUT/ring_tests.log"
  (
    export CUDA_VISIBLE_DEVICES=0
    sweep mosaicdtype9 150 130 --mosaic dtypes
  ) >"$OUT/probe.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    gpu_tests 400 tests/kernels/pallas_flash tests/kernels/test_pallas_in_shard_map.py tests/kernels/memory_efficient/test_memory_efficient_fused.py tests/kernels/test_flash.py
  ) >"$OUT/gpu_tests.log" 2>&1 &
  wait
  ;;
final9)
  # Ninth session's last call, final code: on GPU 0 the scale probe, then the full rows of the
  # table and FlexAttention's again; on GPU 1 the whole table then FlexAttention.
  (
    export CUDA_VISIBLE_DEVICES=0 OUT="$OUT/gpu0"  # its own torch_peers.json
    mkdir -p "$OUT"
    sweep mosaicscale9 90 75 --mosaic scale
    table_and_flex ninth3 full 120 105 90 80
  ) >"$OUT/gpu0.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    table_and_flex ninth4 "" 240 225 150 135
  ) >"$OUT/table.log" 2>&1 &
  wait
  ;;
draft10)
  # Tenth session, call 1 (queued in the ninth): the draft Mosaic-GPU backward's GPU tests on
  # GPU 1, its forward+backward against the Triton backward and JAX's example on GPU 0.
  (
    export CUDA_VISIBLE_DEVICES=0
    sweep mosaicbwd10 200 180 --mosaic backward
  ) >"$OUT/sweep.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    gpu_tests 200 tests/kernels/pallas_flash -k "mosaic"
  ) >"$OUT/gpu_tests.log" 2>&1 &
  wait
  ;;
bwd10)
  # Tenth session, call 2, the Mosaic-GPU backward on by default: its tiles and slots against
  # the Triton backward on GPU 0; every PALLAS_FLASH GPU test on GPU 1.
  (
    export CUDA_VISIBLE_DEVICES=0
    sweep mosaicbwd10b 260 240 --mosaic backward
  ) >"$OUT/sweep.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    gpu_tests 260 tests/kernels/pallas_flash
  ) >"$OUT/gpu_tests.log" 2>&1 &
  wait
  ;;
final10)
  # Tenth session, call 3, final code (128-key dQ tiles by default): on GPU 0 the Mosaic and
  # vmap GPU tests, three dK/dV slots against two, then the full rows of the table and
  # FlexAttention's; on GPU 1 the whole table then FlexAttention.
  (
    export CUDA_VISIBLE_DEVICES=0 OUT="$OUT/gpu0"  # its own torch_peers.json
    mkdir -p "$OUT"
    gpu_tests 150 tests/kernels/pallas_flash -k "mosaic or vmap"
    sweep mosaicslots10 100 85 --mosaic slots
    table_and_flex tenth1 full 120 105 90 80
  ) >"$OUT/gpu0.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    table_and_flex tenth2 "" 240 225 150 135
  ) >"$OUT/table.log" 2>&1 &
  wait
  ;;
thin10)
  # Tenth session, call 4, final code: the table's thinnest ratios against FlexAttention (the
  # documents' and the causal rows, Triton kernels) again, on both GPUs at once.
  for gpu in 0 1; do
    (
      export CUDA_VISIBLE_DEVICES=$gpu OUT="$OUT/gpu$gpu"
      mkdir -p "$OUT"
      table_and_flex "tenth$((gpu + 3))" 4docs,causal 200 185 120 105
    ) >"$OUT/gpu$gpu.log" 2>&1 &
  done
  wait
  ;;
tiles10)
  # Tenth session, call 5: the Triton forward's key tile, 128 (the kernel's signature default)
  # against 64 (the tables'), on the masked rows, no peers; each GPU alternates the two, in
  # opposite orders.
  masked=causal,window,4docs
  for gpu in 0 1; do
    (
      export CUDA_VISIBLE_DEVICES=$gpu OUT="$OUT/gpu$gpu"
      mkdir -p "$OUT"
      if [ "$gpu" = 0 ]; then order="128 64 128"; else order="64 128 64"; fi
      run=0
      for kv in $order; do
        run=$((run + 1))
        timeout 150 python3 benchmarks/pallas_flash.py --no-peers --only "$masked" \
          --fwd-block-kv "$kv" --tag "tiles10_run$run" --budget 130
      done
    ) >"$OUT/gpu$gpu.log" 2>&1 &
  done
  wait
  ;;
tests10)
  # Tenth session, call 6, final code: FLASH (its Pallas path now at 64-key forward tiles),
  # shard_map and MEMORY_EFFICIENT's fused GPU tests on GPU 0; every PALLAS_FLASH GPU test on
  # GPU 1.
  (
    export CUDA_VISIBLE_DEVICES=0
    gpu_tests 280 tests/kernels/test_flash.py tests/kernels/test_pallas_in_shard_map.py \
      tests/kernels/memory_efficient/test_memory_efficient_fused.py
  ) >"$OUT/gpu_tests0.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    gpu_tests 280 tests/kernels/pallas_flash
  ) >"$OUT/gpu_tests1.log" 2>&1 &
  wait
  ;;
last8)
  # Eighth session's last call, on the final code: the ring tests on both GPUs (the dK/dV
  # kernel in place), then the documents and full rows beside FlexAttention on GPU 0 and the
  # PALLAS_FLASH GPU tests on GPU 1.
  gpu_tests 150 tests/kernels/ring/test_cudnn.py tests/kernels/ring/test_pallas.py >"$OUT/ring_tests.log"
  (
    export CUDA_VISIBLE_DEVICES=0
    table_and_flex eighth3 4docs,full 120 105 90 80
  ) >"$OUT/table.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    gpu_tests 220 tests/kernels/pallas_flash
  ) >"$OUT/gpu_tests.log" 2>&1 &
  wait
  ;;
stages8)
  # Eighth session, call 5: both backward kernels at three stages for block lists against two
  # (documents, interleaved twice) on GPU 0; the documents GPU tests with three on GPU 1.
  (
    export CUDA_VISIBLE_DEVICES=0
    sweep listedstages 150 135 --listed-sweep
  ) >"$OUT/listed.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    gpu_tests 150 tests/kernels/pallas_flash -k "documents"
  ) >"$OUT/gpu_tests.log" 2>&1 &
  wait
  ;;
final7)
  # Seventh session's last call: the PALLAS_FLASH table (128 x 64 forward tiles, wide dQ for
  # interval masks) then FlexAttention on GPU 0; every single-GPU test on GPU 1; then the ring
  # tests on both GPUs.
  table_beside_tests seventh 200 170 170 150 360 tests --ignore tests/kernels/ring/test_cudnn.py --ignore tests/kernels/ring/test_pallas.py
  gpu_tests 150 tests/kernels/ring/test_cudnn.py tests/kernels/ring/test_pallas.py >"$OUT/ring_tests.log"
  ;;
last7)
  # The float32 bias-gradient test after wide dQ was limited to 2-byte inputs without a bias
  # tile, and the GQA row the final7 table ran out of budget for, beside Flex, on one GPU.
  timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 tests/kernels/pallas_flash -k "bias_gradient" --timeout 100 -rf 2>&1 | tail -4 >"$OUT/gpu_test_bias.log"
  timeout 90 python3 benchmarks/pallas_flash.py --fwd-block-kv 64 --only GQA --tag seventh_gqa --budget 80 >"$OUT/gqa.log" 2>&1
  timeout 90 python3 benchmarks/torch_peers.py 80 GQA >>"$OUT/gqa.log" 2>&1
  ;;
ring)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -n 0 tests/kernels/ring/test_cudnn.py --timeout 120 -rf >"$OUT/ring_tests.log" 2>&1
  timeout 400 python3 benchmarks/ring.py --budget 330 >"$OUT/ring.log" 2>&1
  ;;
esac
tail -n 25 "$OUT"/*.log
