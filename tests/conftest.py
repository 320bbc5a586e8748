"""Shared fixtures: micro-kernel (ISA) switching and thread-count changes, both restored after each test.

Tests import the *installed* spae_fast (pytest runs with --import-mode=importlib and the console script keeps
the source tree off sys.path). The helpers in `_spae_checks.py` are made importable here.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Triton picks interpreter or GPU mode when it is first imported, and test modules import packages that import
# it at collection (vector-quantize-pytorch does): without a CUDA device, ask for the interpreter before any of
# them, so the Triton backend's cases of the per-op tests run here (tests/_backends.py).
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from spae_fast import _native

ISAS = ("portable", "avx2")


@pytest.fixture
def use_isa():
    """Returns a function that selects the native micro-kernel ("portable" / "avx2"), skipping the test when
    this CPU cannot run it; the ISA active before the test is restored afterwards."""
    native = _native.cpu_module()
    before = native.get_isa()

    def select(name: str) -> None:
        if not native.set_isa(name):
            pytest.skip(f"this CPU cannot run the {name} micro-kernel")
        assert native.get_isa() == name

    yield select
    assert native.set_isa(before)


@pytest.fixture
def set_threads():
    """Returns torch.set_num_threads (the native kernel takes its thread count from torch.get_num_threads());
    the count before the test is restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(params=["torch", "cpu-portable", "cpu-avx2"])
def impl(request, use_isa) -> str:
    """Every CPU implementation runnable on this machine: the torch reference and the native kernel with each
    micro-kernel. Yields the `backend=` value to pass. (The GPU ones: `gpu_backend`, tests/ops/conftest.py.)"""
    if request.param == "torch":
        return "torch"
    use_isa(request.param.removeprefix("cpu-"))
    return "cpu"


@pytest.fixture(params=ISAS)
def isa(request, use_isa) -> str:
    """Runs the test once with each native micro-kernel."""
    use_isa(request.param)
    return request.param
