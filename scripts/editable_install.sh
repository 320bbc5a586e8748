#!/usr/bin/env bash
# The fast inner loop: a second venv (default .venv-edit) with spae_fast installed in editable mode
# (scikit-build-core's redirect mode). Python edits are live; C++ / CUDA / Triton sources are rebuilt
# incrementally (ninja, build/editable) on the next `import spae_fast`. It reuses .venv's dependencies through
# a .pth file, so .venv itself keeps the normal install that CI and the tests use.
#   bash scripts/editable_install.sh            # once (a full native build); SPAE_CUDA=OFF skips the CUDA module
#   .venv-edit/bin/python -c "import spae_fast"
set -euo pipefail
cd "$(dirname "$0")/.."
EDIT_VENV=${EDIT_VENV:-.venv-edit}
[ -x .venv/bin/python ] || { echo "run scripts/setup.sh first (it creates .venv)" >&2; exit 1; }
[ -x "$EDIT_VENV/bin/python" ] || .venv/bin/python -m venv "$EDIT_VENV"
purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'
.venv/bin/python -c "$purelib" > "$("$EDIT_VENV/bin/python" -c "$purelib")/_spae_fast_shared_venv.pth"
# --ignore-installed: never touch the normal install that the .pth makes visible.
SPAE_CUDA="${SPAE_CUDA:-AUTO}" "$EDIT_VENV/bin/python" -m pip install -q --no-build-isolation --no-deps \
  --ignore-installed -e . -Cbuild-dir=build/editable -Ceditable.rebuild=true -Ceditable.verbose=false
