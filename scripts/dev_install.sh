#!/usr/bin/env bash
# Rebuilds and reinstalls the package into .venv after a source change (incremental: build/ is reused).
# Serialised with a lock so concurrent rebuilds from several shells do not clobber the shared build dir.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
exec flock /tmp/spae_fast_build.lock env SPAE_CUDA="${SPAE_CUDA:-ON}" \
  pip install -q --no-build-isolation --no-deps . 2>&1 | grep -v "Location 'file" || true
