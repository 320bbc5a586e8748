"""Fixtures of the per-op tests: `gpu_backend` (cuda, triton) beside tests/conftest.py's `impl` (torch and each
CPU micro-kernel), and the `gpu` mark on every GPU-backend case and every `needs_device` one. What each backend
needs: tests/_backends.py."""

from __future__ import annotations

import pytest
from _backends import GPU_BACKENDS, needs_device, require_gpu_backend


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request) -> str:
    """The GPU backends ("cuda", "triton"); yields the `backend=` value. Tensors belong on `DEVICE`."""
    return require_gpu_backend(request.param)


def pytest_collection_modifyitems(config, items):
    # A conftest hook sees every collected item, so select the GPU-backend cases by their parameter, and the
    # device-only ones (some compare both GPU backends without the fixture) by their `needs_device` skip.
    device_only = needs_device.kwargs["reason"]
    for item in items:
        backend = getattr(getattr(item, "callspec", None), "params", {}).get("gpu_backend")
        if backend in GPU_BACKENDS or any(m.kwargs.get("reason") == device_only for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)
