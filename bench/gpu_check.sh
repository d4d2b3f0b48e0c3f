#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (no network needed), build the extension with
# its CUDA kernels, run the CUDA tests, compute-sanitizer (memcheck, racecheck, synccheck) over
# the routing and pool CUDA tests when it is installed, and the GPU benchmarks; write
# bench/results/gpu-<date>.json (also copied to $OUT when that is set, with the logs) and print
# a short table.
#
# It cannot hide a failure: the exit status is non-zero when the build, the tests, a sanitizer
# run or the benchmarks fail (each step's own status, never a pipe's), a collection error in one
# file does not stop the others, and the results file is rewritten after every step. A step
# that runs out of time is interrupted with SIGINT, so pytest still writes what it has.
# Budget: under 8 minutes on an H200, build included: the steps' time limits (build 120 s, tests
# 120 s, sanitizer 3 x 45 s, benchmarks 80 s) add up to 7.6 minutes at the very worst.
# Usage: bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=$(date -u +%Y-%m-%d)
work=$(mktemp -d)
result=bench/results/gpu-$stamp.json
mkdir -p bench/results
# Logs go where a cut-short run still returns them: $OUT when the caller collects it.
logs=${OUT:-$work}
# TORCH_CUDA_ARCH_LIST unset: setup.py builds for the visible GPU's own architecture.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
# O_DIRECT tests need a real disk; /tmp is often tmpfs on GPU machines.
basetemp="$PWD/.gpu-check-tmp"
rm -rf "$basetemp"
failed=()

report() {  # (re)write the results file from what exists so far
  $PY -P bench/gpu_report.py --tests "$work/tests.xml" --bench "$work/bench.json" \
    --build-log "$logs/build.log" --sanitizer "$logs" --out "$result" || failed+=("report")
  if [ -n "${OUT:-}" ] && [ -f "$result" ]; then cp "$result" "$OUT/"; fi
}

echo "::: GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
  || { echo "GPU CHECK FAILED: nvidia-smi sees no GPU"; exit 1; }

echo "::: build (REMOE_BUILD_CUDA=1: fail if the CUDA kernels cannot be built)"
t0=$(date +%s)
# --no-deps: the machine has no network; what the tests import must already be there.
timeout -s INT -k 10 120 env REMOE_BUILD_CUDA=1 \
  $PY -m pip install --no-build-isolation --no-deps -q . >"$logs/build.log" 2>&1
build_rc=$?
tail -5 "$logs/build.log"
echo "build rc=$build_rc in $(( $(date +%s) - t0 )) s"
if [ $build_rc -ne 0 ]; then
  report
  echo "GPU CHECK FAILED: build (log in $logs/build.log)"
  exit 1
fi

# -P: do not put the source tree on sys.path, so the installed package (with _C) is tested.
echo "::: CUDA tests"
timeout -s INT -k 10 120 $PY -P -m pytest tests -m cuda -q -p no:cacheprovider \
  --continue-on-collection-errors --basetemp="$basetemp/tests" --junitxml="$work/tests.xml" \
  >"$logs/tests.log" 2>&1
tests_rc=$?
tail -25 "$logs/tests.log"
# 0: passed; 5: nothing collected (no CUDA test ran: a failure here too); 124: timed out.
[ $tests_rc -eq 0 ] || failed+=("tests (pytest rc=$tests_rc)")
report

echo "::: compute-sanitizer (routing and pool CUDA tests)"
if command -v compute-sanitizer >/dev/null; then
  # A few small cases only (instrumented kernels run 10-100x slower), and no test that keeps the
  # GPU busy with a sleep kernel on purpose. test_route_previous runs both routing kernels (its
  # reference loop calls route_topk); the pool tests run the copy engine on both tiers.
  sanitized=(tests/test_route_previous.py tests/test_pool.py tests/test_gpu_ready.py)
  pick="cuda-continued-3-33 or half_precision or nan_rows or loads_exact_bytes"
  pick+=" or pinned_and_pageable or non_default or prefetch_then or more_misses"
  for tool in memcheck racecheck synccheck; do
    # --error-exitcode: a hazard the tool reports fails the step even if every test passes.
    timeout -s INT -k 5 45 compute-sanitizer --tool "$tool" --error-exitcode 86 \
      $PY -P -m pytest "${sanitized[@]}" -m "cuda and not slow" -k "$pick" -q \
      -p no:cacheprovider --basetemp="$basetemp/$tool" >"$logs/sanitizer-$tool.log" 2>&1
    rc=$?
    echo "$rc" >"$logs/sanitizer-$tool.rc"
    echo "$tool rc=$rc: $(grep -E 'ERROR SUMMARY|passed|failed' "$logs/sanitizer-$tool.log" \
      | tail -2 | tr '\n' ' ')"
    # 86: the tool found a hazard; 124: timed out; else pytest's own status.
    [ $rc -eq 0 ] || failed+=("compute-sanitizer $tool (rc=$rc)")
  done
else
  echo "compute-sanitizer not found: skipped (it ships with the CUDA toolkit)"
fi
report

echo "::: GPU benchmarks"
# Files named explicitly: bench_*.py are not collected by directory discovery (test_*.py).
timeout -s INT -k 10 80 $PY -P -m pytest bench/bench_*.py -m cuda -q -p no:cacheprovider \
  --continue-on-collection-errors --basetemp="$basetemp/bench" --benchmark-max-time=0.05 \
  --benchmark-min-rounds=20 --benchmark-json="$work/bench.json" >"$logs/bench.log" 2>&1
bench_rc=$?
tail -5 "$logs/bench.log"
[ $bench_rc -eq 0 ] || failed+=("benchmarks (pytest rc=$bench_rc)")
report
rm -rf "$basetemp"

echo "::: wrote $result"
if [ ${#failed[@]} -gt 0 ]; then
  echo "GPU CHECK FAILED: ${failed[*]}"
  exit 1
fi
echo "GPU CHECK PASSED"
