#!/usr/bin/env bash
# Issue 7: everything only a GPU can show, in one call of the device tool, from the repository root:
#     run(command="bash bench/gpu_suite.sh", timeout_s=600)
# Writes under $OUT (default /tmp/fcnkern-gpu): env.txt, build.log, tests.log, memcheck.log, racecheck.log,
# bench.json (pytest-benchmark, PyTorch baselines in the same run), floors.json (copy bandwidth, bf16 GEMM rate),
# and prints a summary last. Each step runs even if an earlier one failed; the exit code is the first failure's.
# A task's device time is 15 minutes in all, machine start included, so the call must end inside its 600 s: each
# step has its own time limit (most important first: build, GPU parity, memcheck, benchmarks, floors, racecheck),
# and only the CUDA-device tests and benchmarks run here (`-k cuda`; CI runs the CPU ones). A step that runs out
# of time says so (rc=124) and the next one starts. STEPS="build tests" (say) runs a subset.
# On a machine already warm from an earlier call the build is kept; otherwise every call needs "build" first.
set -uo pipefail
OUT=${OUT:-/tmp/fcnkern-gpu}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONUNBUFFERED=1
status=0
STEPS=${STEPS:-build info tests memcheck bench floors racecheck}
step() {  # step NAME SECONDS LOGFILE COMMAND...: run within SECONDS, log, remember the first failure
  local name=$1 limit=$2 log=$3; shift 3
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s (log: $(basename "$log"))" | tee -a "$OUT/summary.txt"
  [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
  return 0
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| device', torch.cuda.get_device_name())"
  nvcc --version | tail -2; echo "command: bash bench/gpu_suite.sh"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step build 200 "$OUT/build.log" python3 -m pip install --no-build-isolation --no-deps -e .
step info 20 "$OUT/info.log" python3 -m fcnkern info
# -v: each result is logged as it comes, so a run cut off by its limit still shows what passed.
step tests 140 "$OUT/tests.log" python3 -m pytest tests -v -p no:cacheprovider -n 8 --timeout=120 \
  -k "cuda and not cuda_problems and not cuda_elements"  # those two check CUDA index maths on the CPU (CI)
step memcheck 60 "$OUT/memcheck.log" compute-sanitizer --tool memcheck --error-exitcode 1 python3 bench/gpu_sanitize_run.py
bench_args=(--benchmark-only -q -p no:cacheprovider --benchmark-max-time=0.5 --benchmark-columns=min,median,max)
step bench 90 "$OUT/bench.log" python3 -m pytest bench/ "${bench_args[@]}" -k "cuda and not compile" \
  --benchmark-json="$OUT/bench.json"
step floors 20 "$OUT/floors.log" python3 bench/gpu_floors.py "$OUT/floors.json"
step racecheck 50 "$OUT/racecheck.log" compute-sanitizer --tool racecheck --error-exitcode 1 python3 bench/gpu_sanitize_run.py
# Not in the default STEPS (compiling the twin takes about a minute per mode): STEPS=bench-compile in a later call.
step bench-compile 240 "$OUT/bench-compile.log" python3 -m pytest bench/test_bench_models.py "${bench_args[@]}" \
  -k "cuda and (compile or fcnkern)" --benchmark-json="$OUT/bench-compile.json"

echo "== summary"; cat "$OUT/summary.txt"; tail -3 "$OUT/tests.log"; grep -cE " PASSED " "$OUT/tests.log"
grep -E " (FAILED|ERROR) " "$OUT/tests.log" | head -20; grep -E "ERROR SUMMARY" "$OUT"/*check.log
cat "$OUT/floors.json" 2>/dev/null
exit $status
