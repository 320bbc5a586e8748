"""Build facts: which backends report themselves available, and the CUDA module importing on a GPU-less
machine with a clean "no device" answer."""

from __future__ import annotations

import importlib
import os
import shutil

import pytest
import torch

import spae_fast
from spae_fast import _native


def _machine_has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def test_installed_package_is_tested():
    """The tests must exercise the installed package (with its native modules), not a source checkout."""
    assert _native._C is not None, _native._CPU_IMPORT_ERROR
    assert "site-packages" in spae_fast.__file__ or "dist-packages" in spae_fast.__file__, spae_fast.__file__


def test_available_reports():
    report = spae_fast.available()
    assert set(report) >= {"torch", "cpu", "cuda", "triton"}
    for name, status in report.items():
        assert isinstance(status, spae_fast.BackendStatus)
        assert isinstance(status.reason, str) and status.reason, f"{name} has no reason"
    assert report["torch"].available and torch.__version__ in report["torch"].reason
    assert report["cpu"].available, report["cpu"].reason
    isa = _native.cpu_module().get_isa()
    assert isa in report["cpu"].reason and isa in ("portable", "avx2")
    count, _ = _native.cuda_device_count()
    if count == 0:  # a GPU-less machine: the cuda backend cannot run, and says why (non-empty, checked above)
        assert not report["cuda"].available, report["cuda"].reason


def test_available_reason_follows_thread_count(set_threads):
    set_threads(1)
    assert "1 threads" in spae_fast.available()["cpu"].reason
    set_threads(2)
    assert "2 threads" in spae_fast.available()["cpu"].reason


def test_auto_backend_is_native_on_cpu():
    assert spae_fast.ops.resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert spae_fast.ops.resolve_backend("torch", torch.device("cpu")) == "torch"
    assert spae_fast.ops.resolve_backend("auto", torch.device("meta")) == "torch"
    with pytest.raises(ValueError, match="backend 'cpu' needs tensors on the CPU"):
        spae_fast.ops.resolve_backend("cpu", torch.device("meta"))


def test_native_cpu_module_facts():
    native = _native.cpu_module()
    assert native.PANEL_WIDTH == 16 and native.TILE_ROWS == 6
    assert isinstance(native.cpu_supports_avx2(), bool)
    assert native.openmp_max_threads() >= 1


def test_cuda_module_imports_and_reports_no_device():
    """Built in CI with SPAE_CUDA=ON: it must import without a GPU or driver and report (0, reason)."""
    try:
        cuda = importlib.import_module("spae_fast._cuda")
    except ImportError as error:
        if shutil.which("nvcc") is None:
            pytest.skip(f"no nvcc on this machine and spae_fast._cuda not built ({error})")
        pytest.fail(f"nvcc is present but spae_fast._cuda is not importable: {error}")
    count, reason = cuda.device_count()
    assert isinstance(count, int) and count >= 0 and isinstance(reason, str)
    if count == 0:
        assert reason, "zero devices must come with a reason"
    if not _machine_has_nvidia_gpu():
        assert count == 0, "no NVIDIA device node on this machine, yet devices were reported"
    assert _native.cuda_device_count() == (count, reason)
    assert isinstance(cuda.runtime_version(), int)
    assert cuda.ARCHITECTURES
