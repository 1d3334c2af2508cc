#!/usr/bin/env bash
# Issue 7: everything only a GPU can show, in one call of the device tool, from the repository root:
#     run(command="bash bench/gpu_suite.sh", timeout_s=600)
# Writes under $OUT (default /tmp/fcnkern-gpu): env.txt, build.log, tests.log, memcheck.log, racecheck.log,
# bench.json (pytest-benchmark, PyTorch baselines in the same run), floors.json (copy bandwidth, bf16 GEMM rate),
# and prints a summary last. Each step runs even if an earlier one failed; the exit code is the first failure's.
set -uo pipefail
OUT=${OUT:-/tmp/fcnkern-gpu}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME LOGFILE COMMAND...: run, log, remember the first failure
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  "$@" > "$log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s (log: $(basename "$log"))" | tee -a "$OUT/summary.txt"
  [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
  return 0
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| device', torch.cuda.get_device_name())"
  nvcc --version | tail -2; echo "command: bash bench/gpu_suite.sh"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step build "$OUT/build.log" python3 -m pip install --no-build-isolation --no-deps -e .
step info "$OUT/info.log" python3 -m fcnkern info
step tests "$OUT/tests.log" python3 -m pytest tests -q -p no:cacheprovider -x --timeout=300
step memcheck "$OUT/memcheck.log" compute-sanitizer --tool memcheck --error-exitcode 1 python3 bench/gpu_sanitize_run.py
step racecheck "$OUT/racecheck.log" compute-sanitizer --tool racecheck --error-exitcode 1 python3 bench/gpu_sanitize_run.py
step floors "$OUT/floors.log" python3 bench/gpu_floors.py "$OUT/floors.json"
step bench "$OUT/bench.log" python3 -m pytest bench/ --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=min,median,max
step bench-cli "$OUT/bench-cli.log" python3 -m fcnkern bench --rounds 20 --json "$OUT/bench-cli.json"

echo "== summary"; cat "$OUT/summary.txt"; tail -3 "$OUT/tests.log"; grep -E "ERROR SUMMARY" "$OUT"/*check.log
grep -E "^(cross_entropy|op) " "$OUT/bench-cli.log"; cat "$OUT/floors.json" 2>/dev/null
exit $status
