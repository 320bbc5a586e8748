#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the test suite against the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The console script (not `python -m pytest`) keeps the source tree off sys.path, so the tests import the
# installed package, native modules included.
exec .venv/bin/pytest "$@"
