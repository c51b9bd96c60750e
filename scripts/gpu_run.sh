#!/usr/bin/env bash
# One call on the GPU machine: install what is missing, run the GPU tests against the
# oracle, run the benchmark, write everything under $OUT (JSON + logs).
#
#   bash scripts/gpu_run.sh [all|tests|bench|train|quick|explore|explore-bwd|explore-cupy|stress|tune|tuned|cp|profile|host|ncu]   (OUT defaults to ./gpu_out)
#
# The TVM backend needs .carry/tvm (scripts/pack_tvm_runtime.sh, run on the CPU
# machine; pass carry=[".carry/tvm"]): TVM's runtime and exported kernels.
#
# Through the device tool: run(command="bash scripts/gpu_run.sh all").
set -uo pipefail
mode="${1:-all}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GMAGEN_CACHE_DIR="${GMAGEN_CACHE_DIR:-/tmp/gmagen-cache}"
# The copy of the tree on the GPU machine may carry older git metadata than its
# files: pass the commit in, run(command="GMAGEN_COMMIT=<sha> bash scripts/gpu_run.sh ...").
export GMAGEN_COMMIT="${GMAGEN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
PY=python3

# gmagen itself: the machine has numpy, torch, triton, cupy, pytest, hypothesis, rich
# and no network, so install without dependencies or build isolation.
if ! $PY -c "import gmagen.ir" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { echo "install failed"; tail -20 "$OUT/install.log"; exit 1; }
fi
# TVM's runtime alone (the machine has no TVM): the stripped package, the ffi wheel,
# and the kernels exported on the CPU machine
tvm_bench=()
if [[ -f .carry/tvm/compiler/site.tar.xz && ! -d .carry/tvm/site ]]; then
  # pack_tvm_runtime.sh --full: the package as one archive, TVM's compiler beside it
  $PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
      .carry/tvm/compiler/site.tar.xz .carry/tvm/site || echo "unpacking TVM's package failed"
fi
if [[ -d .carry/tvm/site ]]; then
  # --full packs tvm_ffi into site/ (no wheel); the runtime-only pack carries the wheel
  if [[ -d .carry/tvm/wheels ]]; then
    $PY -c "import tvm_ffi" 2>/dev/null || $PY -m pip install -q --no-deps .carry/tvm/wheels/*.whl \
        >>"$OUT/install.log" 2>&1 || echo "tvm-ffi install failed (see install.log)"
  fi
  export PYTHONPATH="$PWD/.carry/tvm/site${PYTHONPATH:+:$PYTHONPATH}"
  lib=.carry/tvm/site/tvm/lib/libtvm_compiler.so
  if [[ -f .carry/tvm/compiler/libtvm_compiler.so.xz && ! -f $lib ]]; then
    # pack_tvm_runtime.sh --full: TVM's compiler too, so TVM builds here in-process
    $PY -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
        .carry/tvm/compiler/libtvm_compiler.so.xz "$lib" || { echo "unpacking TVM's compiler failed"; rm -f "$lib"; }
  fi
  [[ -f $lib ]] || export TVM_USE_RUNTIME_LIB=1  # the runtime alone: exported libraries
  if [[ -d .carry/tvm/exports ]]; then
    export GMAGEN_TVM_EXPORTS="$PWD/.carry/tvm/exports/tests"
    tvm_bench=(--tvm-exports "$PWD/.carry/tvm/exports/bench")
  fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

status=0
if [[ "$mode" == all || "$mode" == tests || "$mode" == quick ]]; then
  sel=""
  [[ "$mode" == quick ]] && sel="-k bidir-row-diag or causal-row-diag or benchmark_lengths or deterministic"
  [[ -n "${TEST_FILTER:-}" ]] && sel="-k $TEST_FILTER"
  # 8 workers: Triton compiles and the float64 oracle are CPU-bound
  GMAGEN_GPU_RESULTS="/tmp/gpu_tests.json" timeout "${TEST_TIMEOUT:-400}" $PY -m pytest tests/gpu -q -n 8 -p no:cacheprovider \
      ${sel:+-k "${sel#-k }"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
  status=${PIPESTATUS[0]}
  $PY -c "import glob, json; json.dump([r for f in sorted(glob.glob('/tmp/gpu_tests.json.*')) for r in json.load(open(f))], open('$OUT/gpu_tests.json', 'w'), indent=1)"
  if [[ -z "${SKIP_CHECK:-}" ]]; then
    $PY -m gmagen.cli.main check --quick >"$OUT/check.log" 2>&1
    tail -5 "$OUT/check.log"
  fi
fi
if [[ "$mode" == all || "$mode" == bench ]]; then
  timeout "${BENCH_TIMEOUT:-480}" $PY benchmarks/bench_triton.py --out "$OUT/bench.json" "${tvm_bench[@]}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -40
fi
if [[ "$mode" == all || "$mode" == train ]]; then
  timeout "${TRAIN_TIMEOUT:-300}" $PY benchmarks/bench_training.py --out "$OUT/bench_training.json" \
      ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/bench_training.log" | tail -40
fi
if [[ "$mode" == tune ]]; then
  # the benchmark grid, both programs; the entries land in $OUT/autotune_<gpu>.json
  # (TUNE_BACKENDS="cupy": those backends only; default every GPU backend here)
  export GMAGEN_CACHE_DIR="$OUT/cache"
  backends=(); for b in ${TUNE_BACKENDS:-}; do backends+=(--backend "$b"); done
  timeout "${TUNE_TIMEOUT:-280}" $PY -m gmagen.cli.main tune --budget "${TUNE_BUDGET:-20}" \
      "${backends[@]}" 2>&1 | tee -a "$OUT/tune.log" | tail -12
  # the causal program; --export writes every entry of this GPU (both programs)
  timeout "${TUNE_TIMEOUT:-280}" $PY -m gmagen.cli.main tune --causal --budget "${TUNE_BUDGET:-20}" \
      "${backends[@]}" --export "$OUT/autotune_export.json" 2>&1 | tee -a "$OUT/tune.log" | tail -12
fi
if [[ "$mode" == tuned ]]; then
  # benchmarks/bench_tuned.py: tune the grid, default/tuned/exhaustive rows, latencies,
  # the cache export; TUNED_ARGS picks steps (--steps) and budgets.  A later call takes
  # up the caches and records of an earlier one carried as .carry/tuned/
  [[ -d .carry/tuned/tuned-work ]] && cp -r .carry/tuned/tuned-work "$OUT/"
  [[ -f .carry/tuned/tuned.json ]] && cp .carry/tuned/tuned.json "$OUT/"
  timeout "${TUNE_TIMEOUT:-560}" $PY benchmarks/bench_tuned.py --out "$OUT/tuned.json" \
      --work "$OUT/tuned-work" --export "$OUT/autotune_export.json" ${TUNED_ARGS:-} 2>&1 \
      | tee "$OUT/tuned.log" | tail -60
  status=${PIPESTATUS[0]}
fi
if [[ "$mode" == cp ]]; then
  # context parallelism on the one GPU this machine has: NCCL with a world of 1 (the
  # sharded code path, its check against one process and its overhead; scaling
  # needs 2 GPUs).  CP_ARGS adds options (e.g. --seq-len).
  for variant in "" "--causal"; do
    timeout "${CP_TIMEOUT:-150}" torchrun --standalone --nproc_per_node=1 examples/context_parallel.py \
        --device cuda --dtype bfloat16 --seq-len 1048576 --heads 16 --dim 64 --components 64 \
        --check-backward $variant ${CP_ARGS:-} 2>&1 | tee -a "$OUT/cp.log" | tail -12
  done
fi
if [[ "$mode" == profile ]]; then
  # per-kernel device times of every GPU backend at the benchmark shape (PROFILE_ARGS: --n ...)
  timeout "${PROFILE_TIMEOUT:-300}" $PY benchmarks/profile_kernels.py --out "$OUT/profile.json" \
      "${tvm_bench[@]}" ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile.log" | tail -60
fi
if [[ "$mode" == host ]]; then
  # host time of an eager call (bidirectional, causal, a decode step) and the
  # functions it goes to (HOST_ARGS: --n ..., --sort cumulative)
  timeout "${HOST_TIMEOUT:-200}" $PY benchmarks/profile_host.py --out "$OUT/host.json" \
      ${HOST_ARGS:-} 2>&1 | tee "$OUT/host.log" | tail -150
fi
if [[ "$mode" == ncu ]]; then
  # Nsight Compute on the kernels of one impl (NCU_IMPL, NCU_CAUSAL=1; ncu replays each
  # launch with caches flushed, so the first call's launches serve),
  # the sections that say what bounds a kernel (NCU_SECTIONS), and why warps stall;
  # CSV in $OUT/ncu.csv
  NCU="$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
  if [[ -z "$NCU" ]]; then
    echo "ncu not found on this machine" | tee "$OUT/ncu.log"
  else
    timeout "${NCU_TIMEOUT:-300}" "$NCU" --csv --page details -k "regex:${NCU_KERNELS:-gma_|main_kernel}" \
        --launch-skip "${NCU_SKIP:-0}" --launch-count "${NCU_COUNT:-12}" \
        $(for sec in ${NCU_SECTIONS:-SpeedOfLight Occupancy LaunchStats MemoryWorkloadAnalysis \
            ComputeWorkloadAnalysis WarpStateStats SchedulerStats InstructionStats}; do
            echo --section "$sec"; done) \
        $PY benchmarks/ncu_target.py --impl "${NCU_IMPL:-gmagen-cupy}" \
        ${NCU_CAUSAL:+--causal} --n "${NCU_N:-65536}" "${tvm_bench[@]}" \
        >"$OUT/ncu.csv" 2>"$OUT/ncu.log"
    echo "ncu rc=$? ($(wc -l <"$OUT/ncu.csv") lines of CSV)"; tail -5 "$OUT/ncu.log"
  fi
fi
if [[ "$mode" == explore-bwd ]]; then
  timeout "${EXPLORE_TIMEOUT:-300}" $PY benchmarks/explore_backward.py 65536 "$OUT/explore_backward.json" 2>&1 \
      | tee "$OUT/explore_backward.log" | tail -80
fi
if [[ "$mode" == stress ]]; then
  # the intermittent NaN of CuPy's float16 bidirectional cases: STRESS_TRIALS fresh inputs
  # per case, where the NaN is and whether the same inputs repeat it
  [[ -z "${STRESS_PROCS:-}" ]] && timeout "${STRESS_TIMEOUT:-200}" $PY scripts/stress_nan.py \
      "$OUT/stress_nan.json" "${STRESS_TRIALS:-100}" 2>&1 | tee "$OUT/stress_nan.log" | tail -20
  # the same with every SM's shared memory NaN-filled before each call (STRESS_POISON=1)
  [[ -n "${STRESS_POISON:-}" ]] && timeout "${STRESS_TIMEOUT:-200}" $PY scripts/stress_nan.py \
      "$OUT/stress_poison.json" "${STRESS_TRIALS:-100}" --poison 2>&1 | tee "$OUT/stress_poison.log" | tail -20
  # or STRESS_PROCS processes at once (odd ones unchecked: no synchronize per launch; the GPU tests' 8 pytest workers): a queue of other
  # contexts' work on the GPU changes the timing of everything
  if [[ -n "${STRESS_PROCS:-}" ]]; then
    for i in $(seq "$STRESS_PROCS"); do
      timeout "${STRESS_TIMEOUT:-200}" $PY scripts/stress_nan.py "/tmp/stress_p$i.json" \
          "${STRESS_TRIALS:-100}" $( ((i % 2)) && echo --no-check) >"/tmp/stress_p$i.log" 2>&1 &
    done
    wait
    for i in $(seq "$STRESS_PROCS"); do echo "-- process $i"; cat "/tmp/stress_p$i.log"; done \
        | tee "$OUT/stress_procs.log" | grep -v "^{" | tail -40
    grep -h "^{" /tmp/stress_p*.log | head -20 >"$OUT/stress_procs_hits.jsonl"
  fi
  # compute-sanitizer: races in shared memory, out-of-bounds accesses, barriers, reads of
  # unwritten memory.  The machine's own CUDA toolkit has it (KINDS.md: it found a planted
  # out-of-bounds write there); else pip's nvidia-cuda-sanitizer-api wheel carried as
  # .carry/san/*.whl, which never attached in two tries ("terminated before first
  # instrumented API call")
  SAN="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
  if [[ -z "$SAN" ]] && ls .carry/san/*.whl >/dev/null 2>&1; then
    for whl in .carry/san/*.whl; do $PY -m zipfile -e "$whl" /tmp/san; done
    SAN="$(find /tmp/san -name compute-sanitizer -type f | head -1)"  # bin/ or compute-sanitizer/
    chmod -R +x "$(dirname "$SAN")"
    # the 13.0 wheel keeps the launcher's injection libraries in ../lib
    export LD_LIBRARY_PATH="$(dirname "$(dirname "$SAN")")/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  if [[ -n "$SAN" ]]; then
    echo "compute-sanitizer: $SAN" | tee -a "$OUT/sanitizer.log"
    for tool in ${SAN_TOOLS:-racecheck memcheck synccheck initcheck}; do
      extra=(); [[ $tool == initcheck ]] && extra=(--no-fill)
      echo "== compute-sanitizer --tool $tool" | tee -a "$OUT/sanitizer.log"
      timeout "${SAN_TIMEOUT:-120}" "$SAN" --tool "$tool" --print-limit 20 \
          $PY scripts/stress_nan.py "/tmp/san_$tool.json" "${SAN_TRIALS:-2}" --no-check "${extra[@]}" \
          >>"$OUT/sanitizer.log" 2>&1
      echo "rc=$?" | tee -a "$OUT/sanitizer.log"
      grep -E "ERROR SUMMARY|Race reported|Invalid|Uninitialized|Barrier" "$OUT/sanitizer.log" | tail -5
    done
  fi
fi
if [[ "$mode" == explore-cupy ]]; then
  # the CuPy register-fragment (mma=2) tiles, one kernel's config at a time (EXPLORE_N)
  # (EXPLORE_ARGS=--causal: the causal plan's segments and scan tiles instead)
  timeout "${EXPLORE_TIMEOUT:-200}" $PY benchmarks/explore_cupy.py "${EXPLORE_N:-65536}" \
      "$OUT/explore_cupy.json" ${EXPLORE_ARGS:-} 2>&1 | tee "$OUT/explore_cupy.log" | tail -20
fi
if [[ "$mode" == explore ]]; then
  timeout 420 $PY benchmarks/explore_triton.py 65536 "$OUT/explore.json" 2>&1 | tee "$OUT/explore.log" | tail -60
fi
if [[ "$mode" == quick ]]; then
  timeout 240 $PY benchmarks/bench_triton.py --out "$OUT/bench.json" --impls gmagen-triton \
      --decode-batches 16 --decode-contexts 4096 2>&1 | tee "$OUT/bench.log" | tail -30
fi
exit $status
