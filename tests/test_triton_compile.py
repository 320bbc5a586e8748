"""The Triton kernels compile ahead of time for sm_80 and sm_90 on a machine without a GPU (Triton's own
ptxas), with tensor cores (mma on sm_80, wgmma on sm_90) and the cp.async pipeline where expected.

Runs `python -m spae_fast.triton_kernels.compile_check` in a subprocess without TRITON_INTERPRET: the process
running the tests has Triton in interpreter mode (no CUDA device: tests/conftest.py), which cannot compile.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "spae_fast.triton_kernels.compile_check", "--json"],
        capture_output=True, text=True, cwd="/", env=env, timeout=900, check=False,
    )  # fmt: skip
    assert result.stdout.strip(), result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_variant_compiles(report):
    failed = [f"sm_{e['arch']} {e['kernel']}: {e.get('error', '')[:500]}" for e in report if not e["ok"]]
    assert not failed, "\n".join(failed)
    assert {e["arch"] for e in report} == {80, 90}


def test_tensor_cores_and_pipeline(report):
    for entry in report:
        if not entry["kernel"].startswith("search"):
            continue
        exact_fp32 = "exact" in entry["kernel"]
        if entry["arch"] == 90 and not exact_fp32:
            assert entry["wgmma"], entry
        if entry["arch"] == 80 and not exact_fp32:
            assert entry["mma"], entry
        assert entry["cp_async"], entry
