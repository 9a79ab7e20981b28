#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# One call on a lent GPU machine: build the extension for the visible card, run the whole test suite on
# CUDA, run compute-sanitizer memcheck over the kernel tests, run the microbenchmarks and the step benchmark,
# and leave every log and JSON under $OUT (default: ./device-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
log() { printf '==== %s\n' "$*" | tee -a "$OUT/summary.txt"; }

log "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/summary.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/summary.txt"

log "build"
python -m pip install -q --no-build-isolation -e ".[dev]" > "$OUT/build.log" 2>&1 || { log "build FAILED"; tail -50 "$OUT/build.log"; exit 1; }
fastdream info | tee "$OUT/info.txt"

log "tests on CUDA"
python -m pytest -q -x -p no:cacheprovider > "$OUT/tests.log" 2>&1; echo "tests rc=$?" | tee -a "$OUT/summary.txt"
tail -3 "$OUT/tests.log" | tee -a "$OUT/summary.txt"

if command -v compute-sanitizer >/dev/null 2>&1; then
  log "compute-sanitizer memcheck over the kernel tests"
  FASTDREAM_BACKEND=cuda compute-sanitizer --tool memcheck --error-exitcode 1 \
    python -m pytest -q -p no:cacheprovider tests/test_shading.py tests/test_raymarch.py tests/test_composite.py \
    tests/test_hash_grid.py > "$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$?" | tee -a "$OUT/summary.txt"
  grep -E "ERROR SUMMARY" "$OUT/memcheck.log" | tail -1 | tee -a "$OUT/summary.txt"
fi

log "microbenchmarks"
python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider --benchmark-json="$OUT/bench-cuda.json" \
  --benchmark-columns=median,iqr,rounds > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/summary.txt"

log "step benchmark"
for model in builtin sd if; do
  timeout 300 fastdream bench --model "$model" --device cuda --json "$OUT/step-$model.json" > "$OUT/step-$model.log" 2>&1
  echo "bench $model rc=$?" | tee -a "$OUT/summary.txt"
done
log "done"
