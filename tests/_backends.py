"""The backend axis of the per-op tests (tests/ops/test_<op>*.py); the fixtures are in tests/ops/conftest.py.

Every op runs on up to five implementations, each a pytest parameter:

- fixture ``impl`` (tests/conftest.py), the CPU ones: "torch" (the reference), "cpu-portable", "cpu-avx2"
  (the native kernel with each micro-kernel; skipped where the CPU lacks it);
- fixture ``gpu_backend`` (tests/ops/conftest.py), the GPU ones: "cuda" (spae_fast._cuda; skipped, with the reason, without a
  CUDA device or module) and "triton": on a CUDA device for real; without one under the Triton interpreter
  (TRITON_INTERPRET=1, set by tests/conftest.py before Triton is first imported), which runs every program in
  numpy on CPU tensors. Their tensors go to ``DEVICE``. Interpreted, a test gets tiny fp32 shapes only (the
  interpreter's bf16 ``tl.dot`` is wrong): GPU-sized, 16-bit or stream cases carry ``needs_device``. An op without a CUDA kernel narrows the list with
  ``@pytest.mark.parametrize("gpu_backend", ["triton"], indirect=True)``.

A test whose backend is "cuda" or "triton", or that carries ``needs_device``, is marked ``gpu``:
benchmarks/gpu_check.sh runs ``-m gpu``.
"""

from __future__ import annotations

import pytest
import torch

import spae_fast
from spae_fast.ops import gpu_search

ON_DEVICE = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_DEVICE else "cpu")
INTERPRETED = not ON_DEVICE  # where "triton" runs, it runs in the interpreter
GPU_BACKENDS = ("cuda", "triton")

needs_device = pytest.mark.skipif(
    INTERPRETED,
    reason="needs a CUDA device: GPU-sized, 16-bit or stream case (the interpreter runs the tiny fp32 ones)",
)
interpreter_only = pytest.mark.skipif(
    ON_DEVICE, reason="checks the interpreter's own arithmetic (numpy, no fma); a device has its own"
)


def require_gpu_backend(name: str) -> str:
    """Skips the test, naming why, unless backend `name` ("cuda" / "triton") can run here."""
    status = spae_fast.available()[name]
    if name == "cuda" and not ON_DEVICE:
        pytest.skip(f"cuda backend needs a CUDA device ({status.reason})")
    if not status.available:
        pytest.skip(f"{name} backend not available: {status.reason}")
    if name == "triton" and INTERPRETED and "interpreter" not in status.reason:
        pytest.skip(f"triton is not in interpreter mode here ({status.reason}); run this file on its own")
    return name


def count_gpu_operands(monkeypatch) -> list:
    """Counts the `gpu_search.GpuOperands` built from now on (their metrics)."""
    built = []
    original = gpu_search.GpuOperands.__init__

    def counting(self, *args):
        built.append(args[1])  # the metric
        original(self, *args)

    monkeypatch.setattr(gpu_search.GpuOperands, "__init__", counting)
    return built
