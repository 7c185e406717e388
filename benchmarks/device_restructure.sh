#!/usr/bin/env bash
# Issue 19's device check in one call on one GPU: the PALLAS_FLASH table of the tree before the
# restructure (.old_main, carried: `git archive 4fb7df2 src benchmarks`) and of this tree,
# interleaved old, new, old, new on four configs (Triton masked, Mosaic full, GQA, documents),
# then the GPU tests of this tree until the time runs out. Logs and JSON in $OUT.
set -u
source "$(ls -d ../shared shared 2>/dev/null | head -1)/gpu/setup-device.sh"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
ONLY="B4 S4096 causal,B1 S16384 full,B1 S16384 4docs"
table() {  # table TREE TAG
  PYTHONPATH="$PWD/$1/src" timeout 110 python3 "$1/benchmarks/pallas_flash.py" --fwd-block-kv 64 \
    --no-peers --only "$ONLY" --tag "$2" --budget 80 2>&1 | tail -25
}
python3 -c "import attnax; print('new tree', attnax.__file__)"
PYTHONPATH="$PWD/.old_main/src" python3 -c "import attnax; print('old tree', attnax.__file__)"
# ROUNDS=1 (a short lease) times each tree once; 2 (default) interleaves old, new, old, new.
old_files="" new_files=""
for round in $(seq 1 "${ROUNDS:-2}"); do
  table .old_main "old$round"
  table . "new$round"
  old_files="$old_files${old_files:+,}$OUT/pallas_flash_kv64_old${round}_h100.json"
  new_files="$new_files${new_files:+,}$OUT/pallas_flash_kv64_new${round}_h100.json"
done
python3 benchmarks/compare_trees.py "$OUT" "$old_files" "$new_files"
timeout "${TEST_SECONDS:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider -n 0 --timeout 150 -rf \
  tests/kernels/pallas_flash tests/test_dtypes.py tests/kernels/memory_efficient tests/kernels/test_flash.py \
  tests/kernels/decode tests/kernels/test_pallas_in_shard_map.py tests/kernels/linear tests \
  >"$OUT/gpu_tests_restructure_h100.log" 2>&1
tail -15 "$OUT/gpu_tests_restructure_h100.log"
