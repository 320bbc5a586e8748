#!/usr/bin/env bash
# The sanitizer job: builds the native CPU core (spae_fast._C) with AddressSanitizer and
# UndefinedBehaviorSanitizer into build-asan/site (a copy of the package from this working tree; .venv's
# installed package is left alone) and runs the CPU op tests against it with .venv's python, the ASan
# runtime preloaded. torch itself is not instrumented.
#
# Any sanitizer report fails the job: ASan and UBSan (-fno-sanitize-recover=all) stop the process at the
# first error, and every report, also one from a subprocess whose exit status a test might swallow, is
# written under build-asan/logs/, which must be empty at the end.
#
# Usage (after scripts/setup.sh): bash scripts/sanitize.sh [pytest options] [test paths; default: the CPU op tests]
# (options with a value in one word: -kEXPR, --deselect=ID).
# Needs GCC (its libasan / libubsan). SPAE_SANITIZE_REBUILD=0 reuses build-asan/site as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/build-asan
SITE=$OUT/site
LOGS=$OUT/logs
CXX=${CXX:-c++}
SANITIZE="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all -g"

ASAN_LIB=$("$CXX" -print-file-name=libasan.so)
STDCXX_LIB=$("$CXX" -print-file-name=libstdc++.so)
if [[ $ASAN_LIB != /* || ! -e $ASAN_LIB ]]; then
  echo "sanitize.sh: $CXX has no libasan.so (GCC with AddressSanitizer is needed)" >&2
  exit 2
fi

start=$SECONDS
if [[ ${SPAE_SANITIZE_REBUILD:-1} != 0 || ! -d $SITE/spae_fast ]]; then
  echo "== building spae_fast with $SANITIZE into $SITE"
  rm -rf "$SITE"
  # The CUDA module is not sanitized (and not needed here); build-asan/cmake keeps incremental rebuilds fast.
  # RelWithDebInfo: pybind11 strips modules built as Release, and reports need the symbols.
  SPAE_CUDA=OFF CXX="$CXX" .venv/bin/python -m pip install -q --no-build-isolation --no-deps --no-compile \
    --target "$SITE" -C build-dir="$OUT/cmake" -C cmake.build-type=RelWithDebInfo -C install.strip=false \
    -C "cmake.define.CMAKE_CXX_FLAGS=$SANITIZE" -C "cmake.define.CMAKE_SHARED_LINKER_FLAGS=$SANITIZE" . \
    2>&1 | grep -v "Location 'file" || true
  [[ -d $SITE/spae_fast ]] || { echo "sanitize.sh: the sanitized build failed" >&2; exit 1; }
  echo "   built in $((SECONDS - start)) s"
fi

# The CPU op tests, unless test paths are given (arguments starting with "-" are pytest options only).
paths_given=0
for argument in "$@"; do
  [[ $argument == -* ]] || paths_given=1
done
if [[ $paths_given -eq 0 ]]; then
  set -- "$@" tests/ops tests/test_bad_inputs.py tests/test_native_boundary.py tests/test_property_fp64.py \
    tests/test_bad_input_cases.py tests/test_sanitizer_active.py
fi

rm -rf "$LOGS"
mkdir -p "$LOGS"
echo "== pytest under ASan + UBSan: $*"
test_start=$SECONDS
status=0
# libasan must come first; libstdc++ is preloaded too because python does not link it, and ASan's
# __cxa_throw interceptor fails ("real___cxa_throw != 0") when libstdc++ arrives after ASan started.
# detect_leaks=0: CPython and torch keep memory until exit by design.
env LD_PRELOAD="$ASAN_LIB $STDCXX_LIB" \
  PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" \
  ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:log_path=$LOGS/asan" \
  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$LOGS/ubsan" \
  SPAE_FAST_SANITIZED_SITE="$SITE" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" \
  .venv/bin/pytest -q -p no:cacheprovider "$@" || status=$?
echo "   tests took $((SECONDS - test_start)) s (job total $((SECONDS - start)) s)"

reports=$(find "$LOGS" -type f | sort)
if [[ -n $reports ]]; then
  for report in $reports; do
    echo "---- sanitizer report $report"
    cat "$report"
  done
  echo "sanitize.sh: FAILED: the sanitizers reported errors (above)" >&2
  exit 1
fi
if [[ $status -ne 0 ]]; then
  echo "sanitize.sh: FAILED: pytest exited with status $status" >&2
  exit "$status"
fi
echo "sanitize.sh: no sanitizer reports"
