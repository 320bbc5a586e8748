#!/usr/bin/env bash
# GPU check: on a bare NVIDIA machine with torch and triton preinstalled, build spae_fast, run the GPU tests (the
# per-op tests' cuda / triton cases: tests/ops -m gpu), print the benchmark table (benchmarks/bench_gpu.py), then
# check the vocabulary-parallel ops over NCCL (benchmarks/distributed_check.py) and time spae_fast.nn against
# vector-quantize-pytorch (bench_vq) - in that order of importance, each step under its own timeout, and every
# step's results copied to $OUT as soon as it ends, so a run stopped by an outer time limit still returns what it
# finished.
#
#   bash benchmarks/gpu_check.sh            # build + GPU tests + benchmark
#   QUICK=1 bash benchmarks/gpu_check.sh    # smaller benchmark shapes (smoke run)
#   TUNE=1 bash benchmarks/gpu_check.sh     # also sweep Triton tile configurations on the big shape
#
# Offline machines: the build needs scikit-build-core, pybind11, ninja, cmake and pytest. When they are not
# installed, they come from a wheelhouse in .whl/ (prepare it anywhere with internet access:
#   pip download -d .whl scikit-build-core pybind11 ninja cmake pytest
# - all pure-Python or manylinux wheels, fit for any Python 3) or, failing that, from the package index.
# The CUDA module is built when nvcc is on PATH (or CUDACXX is set); without it only the Triton backend runs
# and the cuda rows of the table say so. Results land in benchmarks/results/ (and $OUT when set).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
START=$(date +%s)
PYTHON=${PYTHON:-python3}
elapsed() { echo "$(( $(date +%s) - START ))s"; }
save_out() {  # copies what the steps so far wrote to $OUT (when set)
  [ -n "${OUT:-}" ] && cp benchmarks/results/gpu_* benchmarks/results/bench_vq_cuda* BENCHMARKS.md "$OUT"/ 2>/dev/null
  return 0
}

echo "== GPU check ($(date -u +%FT%TZ)), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__, 'devices', torch.cuda.device_count())" \
  || { echo "torch / triton not importable with $PYTHON"; exit 1; }

# A venv that sees the preinstalled torch / triton, so nothing of the machine is modified (or $PYTHON's own
# venv when it already is one).
if [ -z "${VENV:-}" ] && "$PYTHON" -c "import sys; sys.exit(sys.prefix == sys.base_prefix)"; then
  VENV=$("$PYTHON" -c "import sys; print(sys.prefix)")
fi
VENV=${VENV:-$ROOT/.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV" || exit 1
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
need=()
"$PY" -c "import scikit_build_core" 2>/dev/null || need+=("scikit-build-core>=0.10")
"$PY" -c "import pybind11" 2>/dev/null || need+=("pybind11>=2.12")
"$PY" -c "import pytest" 2>/dev/null || need+=("pytest>=7")
command -v ninja >/dev/null 2>&1 || "$PY" -c "import ninja" 2>/dev/null || need+=(ninja)
command -v cmake >/dev/null 2>&1 || "$PY" -c "import cmake" 2>/dev/null || need+=("cmake>=3.18")
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing build tools: ${need[*]}"
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --find-links .whl "${need[@]}" || exit 1
  else
    "$PY" -m pip install -q "${need[@]}" || exit 1
  fi
fi

echo "== build ($(elapsed))"
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
command -v nvcc >/dev/null 2>&1 && echo "nvcc: $(nvcc --version | tail -1)" || echo "no nvcc: building without the CUDA module"
BUILD_START=$(date +%s)
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} SPAE_CUDA=${SPAE_CUDA:-AUTO} \
  "$PY" -m pip install -q --no-build-isolation --no-deps --config-settings=build-dir=build/gpu-check . 2>&1 \
  | grep -v "Location 'file" || true
echo "build took $(( $(date +%s) - BUILD_START ))s"
# From outside the source tree, so the installed package (with its native modules) is what runs.
(cd /tmp && "$PY" -c "import spae_fast; [print(f'  {k:7s}', 'yes' if v.available else 'no ', v.reason) for k, v in spae_fast.available().items()]") || exit 1

echo "== GPU tests ($(elapsed))"
# The console script keeps the source tree off sys.path (tests import the installed package). `-m gpu`: the
# cases of backends "cuda" and "triton" in tests/ops (marked by tests/ops/conftest.py), nothing CPU-only.
timeout "${TEST_TIMEOUT:-300}" "$VENV/bin/pytest" tests/ops -m gpu -q -x --durations=10 -p no:cacheprovider
TESTS=$?
echo "GPU tests exit code $TESTS ($(elapsed))"

echo "== benchmark ($(elapsed))"
mkdir -p benchmarks/results
ARGS=(--out "$ROOT/benchmarks/results" --update-benchmarks-md)
[ "${QUICK:-0}" = 1 ] && ARGS+=(--quick)
if [ "${TUNE:-0}" = 1 ]; then
  (cd /tmp && timeout 300 "$PY" "$ROOT/benchmarks/bench_gpu.py" --tune)
fi
(cd /tmp && timeout "${BENCH_TIMEOUT:-300}" "$PY" "$ROOT/benchmarks/bench_gpu.py" "${ARGS[@]}")
BENCH=$?
save_out

# Vocabulary-parallel ops (spae_fast.distributed) against the single-process ops on the GPU: NCCL with one rank
# per GPU (NCCL refuses two ranks on one device, so one GPU means world size 1: every collective goes through
# NCCL, nothing is split), then gloo with 2 ranks sharing GPU 0 (CUDA tensors; the table split in two).
echo "== distributed: NCCL, then gloo on CUDA ($(elapsed))"
(cd /tmp && timeout "${DIST_TIMEOUT:-180}" "$PY" "$ROOT/benchmarks/distributed_check.py" --backend nccl \
  && timeout "${DIST_TIMEOUT:-180}" "$PY" "$ROOT/benchmarks/distributed_check.py" --backend gloo --world 2 --device cuda)
DIST=$?
echo "distributed check exit code $DIST ($(elapsed))"

# spae_fast.nn vs vector-quantize-pytorch, training step on the GPU (bench_vq --device cuda; BENCHMARKS.md section
# "... on CUDA"). vector-quantize-pytorch comes from .whl/ when offline (pip download -d .whl vector-quantize-pytorch).
echo "== bench_vq --device cuda ($(elapsed))"
VQ=skipped
"$PY" -c "import vector_quantize_pytorch" 2>/dev/null \
  || { [ -d .whl ] && "$PY" -m pip install -q --no-index --find-links .whl vector-quantize-pytorch; } \
  || "$PY" -m pip install -q --timeout 15 --retries 1 vector-quantize-pytorch || echo "vector-quantize-pytorch not installable: bench_vq skipped"
if "$PY" -c "import vector_quantize_pytorch" 2>/dev/null; then
  VQ_ARGS=(--device cuda --out "$ROOT/benchmarks/results" --sizes 1024,16384,65536,262144 --dims 64,256,1024)
  [ "${QUICK:-0}" = 1 ] && VQ_ARGS=(--device cuda --out "$ROOT/benchmarks/results" --quick)
  (cd /tmp && timeout "${VQ_TIMEOUT:-300}" "$PY" "$ROOT/benchmarks/bench_vq.py" "${VQ_ARGS[@]}")
  VQ=$?
fi
save_out
echo "== done in $(elapsed): tests exit $TESTS, distributed exit $DIST, benchmark exit $BENCH, bench_vq exit $VQ"
[ "$TESTS" = 0 ] && [ "$DIST" = 0 ] && [ "$BENCH" = 0 ] && { [ "$VQ" = 0 ] || [ "$VQ" = skipped ]; }
