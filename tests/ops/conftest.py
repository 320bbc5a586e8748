"""Fixtures of the per-op tests: `gpu_backend` (cuda, triton) beside tests/conftest.py's `impl` (torch and each
CPU micro-kernel), and the `gpu` mark on every GPU-backend case. What each backend needs: tests/_backends.py."""

from __future__ import annotations

import pytest
from _backends import GPU_BACKENDS, require_gpu_backend


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request) -> str:
    """The GPU backends ("cuda", "triton"); yields the `backend=` value. Tensors belong on `DEVICE`."""
    return require_gpu_backend(request.param)


def pytest_collection_modifyitems(config, items):
    # A conftest hook sees every collected item, so select the GPU-backend cases by their parameter.
    for item in items:
        if getattr(getattr(item, "callspec", None), "params", {}).get("gpu_backend") in GPU_BACKENDS:
            item.add_marker(pytest.mark.gpu)
