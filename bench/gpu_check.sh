#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (no network needed), build the extension with
# its CUDA kernels, run the CUDA tests and the GPU benchmarks, write
# bench/results/gpu-<date>.json (also copied to $OUT when that is set) and print a short table.
#
# It cannot hide a failure: the exit status is non-zero when the build, the tests or the
# benchmarks fail (each step's own status, never a pipe's), a collection error in one file does
# not stop the others, and the results file is written after the tests and again after the
# benchmarks, so a run cut short by a time limit still leaves what it measured.
# Budget: under 8 minutes. Usage: bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=$(date -u +%Y-%m-%d)
work=$(mktemp -d)
result=bench/results/gpu-$stamp.json
mkdir -p bench/results
# TORCH_CUDA_ARCH_LIST unset: setup.py builds for the visible GPU's own architecture.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
# O_DIRECT tests need a real disk; /tmp is often tmpfs on GPU machines.
basetemp="$PWD/.gpu-check-tmp"
rm -rf "$basetemp"
failed=()

report() {  # (re)write the results file from what exists so far
  $PY -P bench/gpu_report.py --tests "$work/tests.xml" --bench "$work/bench.json" \
    --build-log "$work/build.log" --out "$result" || failed+=("report")
  if [ -n "${OUT:-}" ] && [ -f "$result" ]; then cp "$result" "$OUT/"; fi
}

echo "::: GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
  || { echo "GPU CHECK FAILED: nvidia-smi sees no GPU"; exit 1; }

echo "::: build (REMOE_BUILD_CUDA=1: fail if the CUDA kernels cannot be built)"
t0=$(date +%s)
# --no-deps: the machine has no network; what the tests import must already be there.
REMOE_BUILD_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -q . >"$work/build.log" 2>&1
build_rc=$?
tail -5 "$work/build.log"
echo "build rc=$build_rc in $(( $(date +%s) - t0 )) s"
if [ $build_rc -ne 0 ]; then
  report
  echo "GPU CHECK FAILED: build (log in $work/build.log)"
  exit 1
fi

# -P: do not put the source tree on sys.path, so the installed package (with _C) is tested.
echo "::: CUDA tests"
timeout 240 $PY -P -m pytest tests -m cuda -q -p no:cacheprovider --continue-on-collection-errors \
  --basetemp="$basetemp/tests" --junitxml="$work/tests.xml" >"$work/tests.log" 2>&1
tests_rc=$?
tail -25 "$work/tests.log"
# 0: passed; 5: nothing collected (no CUDA test ran: a failure here too); 124: timed out.
[ $tests_rc -eq 0 ] || failed+=("tests (pytest rc=$tests_rc)")
report

echo "::: GPU benchmarks"
# Files named explicitly: bench_*.py are not collected by directory discovery (test_*.py).
timeout 240 $PY -P -m pytest bench/bench_*.py -m cuda -q -p no:cacheprovider \
  --continue-on-collection-errors --basetemp="$basetemp/bench" --benchmark-max-time=0.05 \
  --benchmark-min-rounds=20 --benchmark-json="$work/bench.json" >"$work/bench.log" 2>&1
bench_rc=$?
tail -5 "$work/bench.log"
[ $bench_rc -eq 0 ] || failed+=("benchmarks (pytest rc=$bench_rc)")
report
rm -rf "$basetemp"

echo "::: wrote $result"
if [ ${#failed[@]} -gt 0 ]; then
  echo "GPU CHECK FAILED: ${failed[*]}"
  exit 1
fi
echo "GPU CHECK PASSED"
