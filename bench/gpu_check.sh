#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (no network needed), build the extension with
# its CUDA kernels, run the CUDA tests and the GPU benchmarks, write
# bench/results/gpu-<date>.json (also copied to $OUT when that is set) and print a short table.
# Budget: under 8 minutes. Usage: bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=$(date -u +%Y-%m-%d)
work=$(mktemp -d)
result=bench/results/gpu-$stamp.json
mkdir -p bench/results
export MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONUNBUFFERED=1

echo "::: GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || exit 1

echo "::: build (REMOE_BUILD_CUDA=1: fail if the CUDA kernels cannot be built)"
t0=$(date +%s)
# --no-deps: the machine has no network; what the tests import must already be there.
REMOE_BUILD_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -q . >"$work/build.log" 2>&1
build_rc=$?
tail -5 "$work/build.log"
echo "build rc=$build_rc in $(( $(date +%s) - t0 )) s"
[ $build_rc -eq 0 ] || exit 1

# -P: do not put the source tree on sys.path, so the installed package (with _C) is tested.
echo "::: CUDA tests"
timeout 240 $PY -P -m pytest tests -m cuda -q -p no:cacheprovider --junitxml="$work/tests.xml" \
  2>&1 | tail -25
echo "::: GPU benchmarks"
# Files named explicitly: bench_*.py are not collected by directory discovery (test_*.py).
timeout 240 $PY -P -m pytest bench/bench_*.py -m cuda -q -p no:cacheprovider --benchmark-max-time=0.05 \
  --benchmark-min-rounds=20 --benchmark-json="$work/bench.json" 2>&1 | tail -5

$PY -P bench/gpu_report.py --tests "$work/tests.xml" --bench "$work/bench.json" \
  --build-log "$work/build.log" --out "$result"
if [ -n "${OUT:-}" ]; then cp "$result" "$OUT/"; fi
echo "::: wrote $result"
