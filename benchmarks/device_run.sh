#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# One call on a lent GPU machine (no registry there): install carried wheels, build the extension for the visible
# card, run the whole test suite (CUDA included), the microbenchmarks, the step benchmarks, the peers, and
# compute-sanitizer memcheck over the CUDA kernel tests, each stage under a time cap so the script ends by itself
# inside DEADLINE seconds. Files in $OUT (default ./device-out): summary.txt, and logs.tgz holding build.log,
# tests.log, failures.log, bench.log, bench-cuda-*.json, steps.log, prof-*.txt, peers.log, memcheck.log.
#
#   WHEELS=.whl DEADLINE=540 benchmarks/device_run.sh
#
# WHEELS: a folder of wheels the machine lacks, installed without dependencies (no registry there): diffusers,
# trimesh, nerfacc (the peer), imageio-ffmpeg (else the turntable is a GIF and two CUDA tests check for that).
#
# Seen on an H200 (2026-11-26): the machine starts in ~30 s, wheels 5 s, build 115-125 s (16 jobs, sm_90a), the
# CUDA tests (TEST_ARGS="-k cuda", 15 workers) 31 s, the microbenchmarks 50 s, each step benchmark 15-30 s
# (model setup dominates), memcheck 50-60 s. A 15-minute device budget holds one full call (~400 s) and a
# shorter second one after a fix (~320 s). Session 5 (H200): build 135-140 s; an SD step benchmark ~20 s each.
# A/B runs of the SD settings in one call, e.g.:
#   STAGES=steps STEP_LIST=builtin STEP_EXTRA="a:--model sd --cuda-graphs --steps 20 --warmup 5;b:--model sd \
#     --cuda-graphs --steps 20 --warmup 5 --vae-groupnorm split --profile %OUT%/prof-b.txt" benchmarks/device_run.sh
# Session 9 (H100): the CUDA tests (-k cuda, 15 workers) 76 s, memcheck of two test files 57 s, sdgen of 1000
# steps ~75 s with the model folder; a second call on the still-warm machine built the extension in full again
# (125 s; why the first build was not reused is not known). Not yet run on a GPU: the SD VAE encoder compiled by inductor
# (sd-cvae*, sd-compiled: compile ~1-2 min each, so STEP_CAP=200), and session 9's fixes (no graph destroyed
# during a capture; shaded/textureless in one render graph; reuse of a larger bucket), and session 10's hybrid
# hash-grid table gradient (FASTDREAM_HASH_BACKWARD=hybrid) and cuDNN's autotuning (sd-cudnn: --cudnn-benchmark;
# the convolutions ran on cuDNN's heuristic choice so far). The next call:
#   STAGES=tests,steps,hash,sdgen TEST_K="cuda or graphs" STEP_CAP=200 \
#     HASH_K="forward_backward and rays and not reference and not triton" HASH_HEADS=16,32 \
#     STEP_LIST=sd-best,sd-vcl,sd-cudnn,sd-cvae,builtin-rgraphs SDGEN_STEPS=1000 benchmarks/device_run.sh
# Session 11 (no GPU): sd-vcl, the SD VAE in channels_last with the split GroupNorm's new channels_last path (no
# NCHW copies; tests/test_groupnorm.py has its CUDA fp16 error test); if it beats sd-best, make it the default.
# Session 12 (H100, three calls, 769 s of device time): sd-vcl 1.02x sd-best (not adopted), sd-cudnn 0.97x,
# sd-cvae 0.92x (now also generate --compile-vae), hybrid hash 1.0x; the in-place tree lacked fastdream/kernels
# (linked below now). A second call on the warm machine reused the build (12 s). After session 12's call the
# trainer no longer waits for the GPU at its loss and gradient checks or its loss readout (read a step late);
# the bench's --host-checks puts the waits back. The next call:
#   STAGES=tests,steps,sdgen TEST_K="cuda or graphs or triton" STEP_CAP=200 \
#     STEP_LIST=sd-best,sd-hostchecks,builtin-rgraphs,builtin-hostchecks,sd-cvae SDGEN_STEPS=1000 benchmarks/device_run.sh
# then, on the warm machine (the build is reused): sd-cunet, which is sd-cvae plus the UNet compiled by inductor in
# its CUDA-graph mode (--compile; never yet timed on a GPU; the UNet's 10.2 ms is the step's largest part), beside
# sd-cvae, and generate with the compiled encoder:
#   STAGES=steps,sdgen STEP_CAP=240 STEP_LIST=sd-cvae,sd-cvae-fresh,sd-cunet SDGEN_ARGS="--cuda-graphs --compile-vae" \
#     SDGEN_STEPS=1000 benchmarks/device_run.sh
# Session 16 (no GPU): fastdream bench now renders an object-sized field by default (--scene object, 20-30k samples a
# step, as trained fields give; sessions up to 15 timed the fresh blob, ~9.7k: --scene fresh, step sd-cvae-fresh);
# bench_step.py's test_sds_step_amortised times the goals' configurations as pytest-benchmark rounds of 16 steps;
# bench_hash_grid.py's "march" points are the renderer's own. With time left, a third call:
#   STAGES=hash,micro HASH_K="forward_backward and not reference and not triton" benchmarks/device_run.sh
# Session 17 (no GPU): a lending now has 15 minutes of device time in all, so the first call above matters most (its
# TEST_K takes the new CUDA-only tests: Triton's fp16 table under graph capture, the shading and compositing edge
# cases on CUDA; the --device cuda:N fix has only a CPU wiring test, and one GPU cannot show it). micro runs
# bench_step.py as its own pytest (a killed pytest writes no JSON); a misspelt STAGES name stops the script, a
# misspelt STEP_LIST name is logged. STEP_REPEAT=2 runs STEP_LIST twice in turn, for A/B ratios from interleaved
# runs (e.g. STEP_LIST=sd-best,sd-cvae STEP_REPEAT=2).
# Session 19 (no GPU): the extension's CUDA part gained a probe (csrc/cuda/probe.cu: does the driver find its kernels'
# code for this GPU?) that the dispatcher asks before it picks the cuda backend; never run on a GPU. If it answered
# wrongly, every op would fall back to Triton or the reference and the timings would show it: the first call's
# TEST_K takes test_the_cuda_probe_on_a_real_gpu, and fastdream info (in summary.txt) says "compiled by nvcc ...".
# generate's closing line now gives the time a step after the warm-up (the 10,000-step goal's rate).
# Session 20 (H200, three calls on one warm machine, 659 s of device time): the first call above (build 158 s,
# tests 70 s: 3 failures, all in the tests, fixed after the call and not yet run on a GPU; the deadline cut sd-cvae),
# then STAGES=sdgen,steps STEP_LIST=sd-cvae (138 s) and STAGES=tests,hash (75 s). The probe answered right. The hybrid
# table gradient is now the default (0.88x the warp kernel on the renderer's samples), not yet timed in a step. The
# next call, on an H100 if one can be had (the goals name it; kind=nvidia-h100-x1), checks the fixed tests and times
# every goal's configuration side by side, including the hybrid kernel's A/B in the builtin step (~430 s):
#   STAGES=tests,steps,sdgen TEST_K="cuda or graphs or triton" STEP_CAP=150 STEP_REPEAT=2 \
#     STEP_LIST=sd-best,sd-cvae,builtin-rgraphs,builtin-warp SDGEN_STEPS=1000 DEADLINE=520 benchmarks/device_run.sh
# Session 21 (H100, two calls on one warm machine, 746 s of device time): the call above (build 211 s, tests 86 s, all
# passed; its deadline cut round 2 after sd-best), then STAGES=sdgen,steps,hash STEP_LIST=sd-cvae,sd-best (185 s).
# No H100 goal is met (benchmarks/RESULTS.md). Never yet timed on a GPU: bench_step.py's pipelined rounds (new stage
# amortised), the UNet compiled (sd-cunet), generate with --compile-vae (its compile time included, in the new
# command time), generate without previews and checkpoints (what it adds to the step benchmark's 29-31 ms), and
# session 21's grid update (a mask instead of a sort, 2^19-point chunks). Stages run in a fixed order (tests, steps,
# amortised, ..., sdgen), so two calls, ~800 s in all with the start (build 125-211 s):
#   STAGES=tests,amortised TEST_K="cuda or graphs or triton or occupancy" DEADLINE=500 benchmarks/device_run.sh
# then, on the warm machine (the build is reused):
#   STAGES=steps,sdgen STEP_CAP=180 STEP_LIST=sd-cunet,builtin-rgraphs SDGEN_STEPS=1000 \
#     SDGEN_ARGS="--cuda-graphs --compile-vae;--cuda-graphs --compile-vae --preview-every 0 --save-every 100000" \
#     DEADLINE=330 benchmarks/device_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
DEADLINE=${DEADLINE:-540}
WHEELS=${WHEELS:-.whl}
# STAGES: which of tests,steps,amortised,hash,generate,sdgen,micro,peers,memcheck,compile to run, in that order
# (default all but amortised, bench_step.py's pipelined 16-step rounds alone, hash, which is the hash-grid part of
# micro alone, generate, a default builtin run timed end to end with GEN_ARGS, and sdgen, an SD-shaped random-weight
# run of generate timed end to end); TEST_K: a pytest -k
# expression (e.g. "cuda": only the CUDA parametrisations, the CPU ones run in CI; spaces allowed); TEST_ARGS: other
# pytest arguments, split at spaces (no quoting: session 9's TEST_ARGS="-k 'cuda or graphs'" selected nothing).
# The tests stage fails loudly when no test ran (pytest's exit status 5).
STAGES=${STAGES:-steps,tests,micro,peers,memcheck,compile}
TEST_ARGS=${TEST_ARGS:-}
TEST_K=${TEST_K:-}
HASH_K=${HASH_K:-}
HASH_HEADS=${HASH_HEADS:-}
TEST_CAP=${TEST_CAP:-200}
STEP_CAP=${STEP_CAP:-90}
has() { [[ ",$STAGES," == *",$1,"* ]]; }
for s in ${STAGES//,/ }; do # a misspelt stage would cost device time and bring nothing back, without a word
  [[ ",tests,steps,amortised,hash,generate,sdgen,micro,peers,memcheck,compile," == *",$s,"* ]] || {
    echo "STAGES: unknown stage '$s'" >&2
    exit 2
  }
done
mkdir -p "$OUT"
T0=$(date +%s)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PY:-python3}
log() { printf '==== [%4ss] %s\n' "$(($(date +%s) - T0))" "$*" | tee -a "$OUT/summary.txt"; }
left() { echo $((DEADLINE - ($(date +%s) - T0))); }
# cap N: the smaller of N and the time left minus a margin (at least 1 s).
cap() { local l; l=$(($(left) - 15)); ((l < $1)) && echo $((l > 1 ? l : 1)) || echo "$1"; }

log "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1)"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/summary.txt"
nvcc --version | tail -2 | tee -a "$OUT/summary.txt"

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  log "carried wheels: $(ls "$WHEELS" | tr '\n' ' ')"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    >>"$OUT/build.log" 2>&1 || log "wheel install FAILED"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH
fi

# The extension is built in place (fastdream/_C*.so, found through PYTHONPATH as the tests' CLI calls find it).
# A later call on the same warm machine, with the same sources, architectures and torch, reuses it: the build is
# ~125 s of a 15-minute device budget, and session 9's second call paid it again under pip install -e. The key
# is a hash of the sources, not their times (the working tree is copied afresh each call). REBUILD=1 forces a
# build; BUILD=pip builds through pip install -e as before.
export FASTDREAM_CUDA=1 FASTDREAM_CUDA_ARCHS=$TORCH_CUDA_ARCH_LIST FASTDREAM_BUILD_JOBS=$(nproc)
BUILD_KEY="$( (cat setup.py; find csrc -type f | LC_ALL=C sort | xargs cat) | sha256sum | cut -c1-16) \
$TORCH_CUDA_ARCH_LIST $($PY -c 'import torch; print(torch.__version__)' 2>&1)"
if [ "${BUILD:-inplace}" = pip ]; then
  log "build (pip install -e, archs $TORCH_CUDA_ARCH_LIST)"
  timeout "$(cap 300)" $PY -m pip install --no-deps --no-build-isolation -e . >>"$OUT/build.log" 2>&1 ||
    { log "build FAILED"; tail -40 "$OUT/build.log" | tee -a "$OUT/summary.txt"; exit 1; }
elif [ "${REBUILD:-0}" != 1 ] && [ "$(cat build/device-build-key 2>/dev/null)" = "$BUILD_KEY" ] &&
  compgen -G "fastdream/_C*.so" >/dev/null; then
  log "build reused: the same sources, archs and torch as this machine's last build"
else
  log "build in place (archs $TORCH_CUDA_ARCH_LIST)"
  rm -f build/device-build-key
  timeout "$(cap 300)" $PY setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 ||
    { log "build FAILED"; tail -40 "$OUT/build.log" | tee -a "$OUT/summary.txt"; exit 1; }
  mkdir -p build && echo "$BUILD_KEY" >build/device-build-key
fi
# An installed fastdream has its Triton kernels at fastdream/kernels (setup.py maps the top-level kernels/ there); an
# in-place tree does not, so link them (session 12's call: without it the 14 Triton shading tests on CUDA failed
# with "No module named 'fastdream.kernels'"). The link is ignored by git.
[ "${BUILD:-inplace}" = pip ] || [ -e fastdream/kernels ] || ln -s ../kernels fastdream/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import fastdream.kernels.shading, fastdream.kernels.hash_grid" 2>&1 | tail -1 | sed 's/^/kernels import: /' |
  tee -a "$OUT/summary.txt"
log "built"
$PY -m fastdream info 2>&1 | tee -a "$OUT/summary.txt"

# The peer nerfacc compiles its CUDA code on first import: start that now, beside the tests.
if has peers && $PY -c "import nerfacc" 2>/dev/null; then
  (MAX_JOBS=4 timeout "$(cap 300)" $PY -c "from nerfacc.cuda import _backend as b; print('nerfacc _C:', b._C)" \
    >>"$OUT/peers.log" 2>&1; echo "nerfacc build rc=$?" >>"$OUT/peers.log") &
  NERFACC_PID=$!
fi

stage_tests() {
  log "tests ${TEST_K:+-k \"$TEST_K\" }$TEST_ARGS"
  local xdist=""
  $PY -c "import xdist" 2>/dev/null && xdist="-n ${TEST_WORKERS:-15}"
  FASTDREAM_FAILURE_LOG="$OUT/failures.log" timeout "$(cap "$TEST_CAP")" $PY -m pytest -v -p no:cacheprovider $xdist \
    --tb=short -rfEs --durations=15 ${TEST_K:+-k "$TEST_K"} $TEST_ARGS tests >"$OUT/tests.log" 2>&1
  local rc=$?
  echo "tests rc=$rc$( ((rc == 5)) && echo ' (NO TESTS RAN: check TEST_K/TEST_ARGS)')" | tee -a "$OUT/summary.txt"
  grep -E "passed|failed|error" "$OUT/tests.log" | tail -3 | tee -a "$OUT/summary.txt"
  grep -E "^(FAILED|ERROR)|\] (FAILED|ERROR)" "$OUT/tests.log" | head -40 | tee -a "$OUT/summary.txt"
}

micro() {
  local name=$1 cap_s=$2
  shift 2
  log "microbenchmarks ($name): $*"
  timeout "$(cap "$cap_s")" $PY -m pytest "$@" --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/bench-cuda-$name.json" --benchmark-columns=median,iqr,min,rounds --benchmark-sort=name \
    >>"$OUT/bench.log" 2>&1
  echo "bench $name rc=$?" | tee -a "$OUT/summary.txt"
  grep -E "passed|failed|error" "$OUT/bench.log" | tail -1 | tee -a "$OUT/summary.txt"
}

step() {
  local name=$1${STEP_TAG:-}
  shift
  echo "#### fastdream bench $*" >>"$OUT/steps.log"
  local from
  from=$(($(wc -l <"$OUT/steps.log") + 1))
  rm -f "/tmp/step-$name.json"
  timeout "$(cap "$STEP_CAP")" $PY -m fastdream bench --device cuda --json "/tmp/step-$name.json" "$@" >>"$OUT/steps.log" 2>&1
  local rc=$?
  echo "#### rc=$rc json:" >>"$OUT/steps.log"
  cat "/tmp/step-$name.json" >>"$OUT/steps.log" 2>/dev/null
  # only this benchmark's lines (a killed one printed none: say so rather than repeat the previous one's)
  tail -n +"$from" "$OUT/steps.log" | grep -E "^step \(sum|^field side|peak memory" | tail -3 | sed "s/^/$name: /" |
    grep . | tee -a "$OUT/summary.txt" || echo "$name: no result" | tee -a "$OUT/summary.txt"
  echo "bench $name rc=$rc" | tee -a "$OUT/summary.txt"
}

# STEP_LIST: which step benchmarks (default the first six; the *-prof ones also write torch.profiler tables).
STEP_LIST=${STEP_LIST:-builtin,builtin-reference,sd,sd-graphs,sd-reference,if}
# STEP_REPEAT=N: the whole STEP_LIST N times in turn (A B A B ...; names get -r1, -r2, ...), so that an A/B ratio
# is read from interleaved runs rather than one of each (the same sd-best measured 31.4 and 32.2 ms in two calls).
STEP_REPEAT=${STEP_REPEAT:-1}
stage_steps() {
  local rep
  for ((rep = 1; rep <= STEP_REPEAT; rep++)); do
    ((STEP_REPEAT > 1)) && STEP_TAG="-r$rep"
    stage_steps_once
  done
  STEP_TAG=
}
stage_steps_once() {
  log "step benchmarks (fastdream bench): $STEP_LIST${STEP_TAG:+ (round ${STEP_TAG#-r})}"
  local name
  for name in ${STEP_LIST//,/ }; do
    case $name in
    builtin) step builtin --model builtin --steps 30 --warmup 5 ;;
    builtin-reference) step builtin-reference --model builtin --reference --steps 10 ;;
    sd) step sd --model sd --steps 30 --warmup 5 ;;
    sd-graphs) step sd-graphs --model sd --cuda-graphs --steps 30 --warmup 5 ;;
    sd-reference) step sd-reference --model sd --reference --steps 10 ;;
    if) step if --model if --steps 10 ;;
    builtin-prof) step builtin-prof --model builtin --steps 10 --warmup 5 --profile "$OUT/prof-builtin.txt" ;;
    sd-prof) step sd-prof --model sd --steps 10 --warmup 5 --profile "$OUT/prof-sd.txt" ;;
    builtin-fgraphs) step builtin-fgraphs --model builtin --field-graphs --steps 30 --warmup 10 ;;
    builtin-rgraphs) step builtin-rgraphs --model builtin --render-graphs --steps 30 --warmup 10 ;;
    sd-best) step sd-best --model sd --cuda-graphs --render-graphs --steps 30 --warmup 10 ;;
    sd-hostchecks) step sd-hostchecks --model sd --cuda-graphs --render-graphs --host-checks --steps 30 --warmup 10 ;;
    builtin-hostchecks) step builtin-hostchecks --model builtin --render-graphs --host-checks --steps 30 --warmup 10 ;;
    # the table gradient's earlier default kernel, for a step-level A/B of the hybrid one (the default since session 20)
    builtin-warp) FASTDREAM_HASH_BACKWARD=warp step builtin-warp --model builtin --render-graphs --steps 30 --warmup 10 ;;
    sd-vcl) step sd-vcl --model sd --cuda-graphs --render-graphs --vae-layout channels_last --steps 30 --warmup 10 ;;
    sd-cudnn) step sd-cudnn --model sd --cuda-graphs --render-graphs --cudnn-benchmark --steps 30 --warmup 10 ;;
    sd-cvae) step sd-cvae --model sd --cuda-graphs --render-graphs --compile-vae --steps 20 --warmup 10 ;;
    sd-cvae-native) step sd-cvae-native --model sd --cuda-graphs --render-graphs --compile-vae --vae-groupnorm native --steps 20 --warmup 10 ;;
    sd-cvae-cl) step sd-cvae-cl --model sd --cuda-graphs --render-graphs --compile-vae --vae-layout channels_last --vae-groupnorm native --steps 20 --warmup 10 ;;
    sd-cvae-fresh) step sd-cvae-fresh --model sd --cuda-graphs --render-graphs --compile-vae --scene fresh --steps 20 --warmup 10 ;;
    sd-cunet) step sd-cunet --model sd --compile --cuda-graphs --render-graphs --compile-vae --steps 20 --warmup 10 ;;
    sd-compiled) step sd-compiled --model sd --compile --cuda-graphs --render-graphs --compile-vae --vae-groupnorm native --steps 20 --warmup 10 ;;
    sd-best-prof) step sd-best-prof --model sd --cuda-graphs --render-graphs --steps 10 --warmup 10 --profile "$OUT/prof-sd-best.txt" ;;
    sd-graphs-prof) step sd-graphs-prof --model sd --cuda-graphs --steps 10 --warmup 5 --profile "$OUT/prof-sd-graphs.txt" ;;
    *) log "STEP_LIST: unknown step benchmark '$name', skipped" ;;
    esac
  done
  # STEP_EXTRA: more, "name:fastdream bench args;name:args;..." (%OUT% in the args stands for $OUT).
  local entries e args
  IFS=';' read -ra entries <<<"${STEP_EXTRA:-}"
  for e in "${entries[@]}"; do
    [ -n "$e" ] || continue
    args=${e#*:}
    # shellcheck disable=SC2086  # the args are words
    step "${e%%:*}" ${args//%OUT%/$OUT}
  done
}

stage_peers() {
  [ -n "${NERFACC_PID:-}" ] || return 0
  log "peers"
  wait "$NERFACC_PID"
  timeout "$(cap 60)" $PY -m pytest benchmarks/bench_peers.py --benchmark-only -q -s -p no:cacheprovider -rs \
    --benchmark-json=/tmp/peers.json --benchmark-columns=median,iqr,rounds >>"$OUT/peers.log" 2>&1
  echo "peers rc=$?" | tee -a "$OUT/summary.txt"
  grep -E "peer/fastdream|SKIPPED" "$OUT/peers.log" | tee -a "$OUT/summary.txt"
  cat /tmp/peers.json >>"$OUT/peers.log" 2>/dev/null
}

# A default builtin run end to end on the GPU (GEN_ARGS=--cuda-graphs: the renderer replayed from CUDA graphs), timed, then
# scored by fastdream evaluate.
stage_generate() {
  log "generate: a red cube, --model builtin --device cuda ${GEN_ARGS:-}"
  local t0 rc
  t0=$(date +%s)
  # shellcheck disable=SC2086  # the args are words
  timeout "$(cap 120)" $PY -m fastdream generate "a red cube" --model builtin --device cuda --out /tmp/gen-run \
    --overwrite --quiet ${GEN_ARGS:-} >"$OUT/generate.log" 2>&1
  rc=$?
  echo "generate rc=$rc, $(($(date +%s) - t0)) s (dataset, training, export)" | tee -a "$OUT/summary.txt"
  tail -3 "$OUT/generate.log" | tee -a "$OUT/summary.txt"
  timeout "$(cap 60)" $PY -m fastdream evaluate /tmp/gen-run >"$OUT/evaluate.json" 2>>"$OUT/generate.log"
  echo "evaluate rc=$?" | tee -a "$OUT/summary.txt"
  head -c 600 "$OUT/evaluate.json" | tee -a "$OUT/summary.txt"
  echo | tee -a "$OUT/summary.txt"
}

# SD end to end: an SD-2.1-base-shaped folder with random weights (benchmarks/make_sd_shaped.py), then
# SDGEN_STEPS steps (default 1000) of fastdream generate through the real loader, with previews, checkpoints and
# grid updates, timed by the trainer ("done: N steps in S s"), for the "10,000 steps in 5 minutes" target.
# SDGEN_ARGS: generate's options; several runs, one after the other, when separated by ';' (e.g. "--cuda-graphs;
# --cuda-graphs --compile-vae;--cuda-graphs --preview-every 0 --save-every 100000": what previews and checkpoints cost).
stage_sdgen() {
  local n=${SDGEN_STEPS:-1000} runs args i=0
  IFS=';' read -ra runs <<<"${SDGEN_ARGS:---cuda-graphs}"
  if [ -f /tmp/sd-shaped/model_index.json ]; then # an earlier call on this warm machine made it (session 12)
    echo "make_sd_shaped: reusing /tmp/sd-shaped" | tee -a "$OUT/sdgen.log" | tee -a "$OUT/summary.txt"
  else
    timeout "$(cap 120)" $PY benchmarks/make_sd_shaped.py /tmp/sd-shaped --device cuda >>"$OUT/sdgen.log" 2>&1
    echo "make_sd_shaped rc=$?" | tee -a "$OUT/summary.txt"
  fi
  for args in "${runs[@]}"; do
    i=$((i + 1))
    (($(left) > 45)) || { log "out of time before sdgen run $i ($args)"; break; }
    log "sdgen $i: SD-shaped random weights, generate $n steps $args"
    echo "#### sdgen $i: $args" >>"$OUT/sdgen.log"
    local from t0 rc
    from=$(($(wc -l <"$OUT/sdgen.log") + 1))
    t0=$(date +%s%N)
    # shellcheck disable=SC2086  # the args are words
    timeout "$(cap 300)" $PY -m fastdream generate "a red cube" --model /tmp/sd-shaped --device cuda --steps "$n" \
      --no-export --quiet --overwrite --out /tmp/sdgen-run $args >>"$OUT/sdgen.log" 2>&1
    rc=$?
    # the whole command (start-up, model load, any compile, the steps, the last checkpoint), beside generate's own line
    local ms=$((($(date +%s%N) - t0) / 1000000))
    echo "sdgen $i rc=$rc, command $((ms / 1000)).$((ms % 1000 / 100)) s" | tee -a "$OUT/summary.txt"
    tail -n +"$from" "$OUT/sdgen.log" | grep -E "^done:|CUDA graphs|skipped|Error|error:" | tail -5 |
      tee -a "$OUT/summary.txt"
  done
}

stage_memcheck() {
  command -v compute-sanitizer >/dev/null 2>&1 && (($(left) > 60)) || return 0
  log "compute-sanitizer memcheck over the CUDA kernel tests"
  timeout "$(cap 200)" compute-sanitizer --tool memcheck --error-exitcode 99 \
    $PY -m pytest -q -p no:cacheprovider -k "cuda and not triton" ${MEMCHECK_FILES:-tests/test_shading.py \
    tests/test_raymarch.py tests/test_composite.py tests/test_hash_grid.py tests/test_occupancy.py} \
    >"$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$?" | tee -a "$OUT/summary.txt"
  grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -3 | tee -a "$OUT/summary.txt"
}

# HASH_K: a pytest -k expression for the hash stage (e.g. "forward_backward and rays and not reference and not
# triton": the table-gradient kernels alone, ~15 s); HASH_HEADS: FASTDREAM_HASH_MAX_HEADS values (commas) for
# extra runs of the default (hybrid) kernel alone, one JSON each (bench-cuda-hash-heads<N>.json).
stage_hash() {
  micro hash 120 benchmarks/bench_hash_grid.py ${HASH_K:+-k "$HASH_K"}
  local h
  for h in ${HASH_HEADS//,/ }; do
    FASTDREAM_HASH_MAX_HEADS=$h micro "hash-heads$h" 60 benchmarks/bench_hash_grid.py \
      -k "cuda and not fp32 and not plain and not warp and (${HASH_K:-rays})"
  done
}

for s in tests steps amortised hash generate sdgen micro peers memcheck compile; do
  has "$s" || continue
  if (($(left) < 20)); then
    log "out of time before stage $s"
    break
  fi
  # A timed stage must not share the host with the peer's background build (the steps' host-bound parts slowed).
  case $s in
  steps | amortised | hash | generate | sdgen | micro | compile)
    if [ -n "${NERFACC_PID:-}" ] && kill -0 "$NERFACC_PID" 2>/dev/null; then
      log "waiting for the nerfacc build before the timed stage $s"
      wait "$NERFACC_PID"
    fi
    ;;
  esac
  case $s in
  steps) stage_steps ;;
  tests) stage_tests ;;
  # bench_step.py's test_sds_step_amortised alone: the goals' configurations (builtin --cuda-graphs; SD
  # --cuda-graphs --compile-vae) as rounds of 16 steps with one grid update, nothing synchronised inside a round
  amortised) micro amortised 240 benchmarks/bench_step.py -k amortised ;;
  hash) stage_hash ;;
  generate) stage_generate ;;
  sdgen) stage_sdgen ;;
  micro)
    # bench_step.py alone: its SD case compiles the VAE (a minute or two), and a pytest killed by its cap writes
    # no JSON, which would lose the kernels' numbers too
    micro all 200 benchmarks/ --ignore=benchmarks/bench_peers.py --ignore=benchmarks/bench_builtin_quality.py \
      --ignore=benchmarks/bench_step.py
    micro step 240 benchmarks/bench_step.py
    ;;
  peers) stage_peers ;;
  memcheck) stage_memcheck ;;
  compile) (($(left) > 120)) && step sd-compile --model sd --compile --steps 20 ;;
  esac
done

# At most 8 files come back from a device call: keep summary.txt and pack the rest (Chrome traces of the large
# models left out) into logs.tgz.
log "done"
(
  cd "$OUT" || exit
  rm -f prof-sd*.trace.json
  files=$(ls | grep -v -e '^summary.txt$' -e '^logs.tgz$')
  [ -n "$files" ] && tar czf logs.tgz $files && rm -f $files
)
