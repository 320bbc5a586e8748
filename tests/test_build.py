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


@pytest.mark.parametrize("name", ["nearest", "saq", "semantic_loss"])
def test_triton_kernels_import_from_installed_package(name):
    """kernels/triton/<name>.py is installed as spae_fast.triton_kernels.<name>."""
    pytest.importorskip("triton")
    module = importlib.import_module(f"spae_fast.triton_kernels.{name}")
    package_dir = os.path.dirname(spae_fast.__file__)
    assert os.path.dirname(module.__file__) == os.path.join(package_dir, "triton_kernels")
    assert "site-packages" in module.__file__ or "dist-packages" in module.__file__, module.__file__
    entry_points = {
        "nearest": ("search", "pair_dot64"),
        "saq": ("layer_args",),
        "semantic_loss": ("softmax_stats", "set_means"),
    }[name]
    for entry_point in entry_points:
        assert callable(getattr(module, entry_point)), entry_point


def test_triton_interpreter_reported_and_auto_stays_on_cpu():
    """Without a CUDA device Triton runs interpreted (tests/conftest.py asks for it); "auto" keeps CPU tensors
    on the native CPU backend all the same."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: Triton runs on it, not interpreted")
    pytest.importorskip("triton")
    status = spae_fast.available()["triton"]
    assert status.available and "interpreter" in status.reason
    weight = torch.randn(9, 5, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    assert spae_fast.ops.resolve_backend("auto", x.device) == "cpu"
    auto, cpu = spae_fast.nearest(x, weight), spae_fast.nearest(x, weight, backend="cpu")
    assert torch.equal(auto[0], cpu[0]) and torch.equal(auto[1], cpu[1])
