"""Which backends exist, which can run here, and which one ``backend="auto"`` means.

A backend is a family of kernels: "torch" (the plain-PyTorch reference, `spae_fast._ref`, any device),
"cpu" (the native C++ / OpenMP core), "cuda" (spae_fast._cuda, torch-free CUDA C++) and "triton"
(spae_fast.triton_kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). The device of the tensors
picks the kernel each op registered for it (``register_kernel("cpu" | "cuda")``); the op's ``backend``
argument picks among the kernels that run on that device.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import os

import torch

from .. import _native

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
GPU_BACKENDS = ("cuda", "triton")
PRECISIONS = ("default", "exact", "tf32", "bf16")  # of the GPU search (nearest / topk); see gpu_search

# Measured default for backend="auto" on CUDA devices: compute capability major -> backend. Filled from
# benchmarks/gpu_check.sh runs (it prints which backend was faster); empty until a GPU run is recorded,
# then "triton" when it is importable, else "cuda". SPAE_FAST_AUTO_GPU_BACKEND overrides it.
AUTO_BACKEND_BY_CAPABILITY: dict[int, str] = {}


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_version() -> str | None:
    """Triton's version without importing it (importing picks interpreter or GPU mode for the process)."""
    try:
        if importlib.util.find_spec("triton") is None:
            return None
    except (ImportError, ValueError, AttributeError):  # a broken install, or sys.modules["triton"] = None
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def triton_status() -> tuple[bool, str]:
    """(usable, reason)."""
    version = _triton_version()
    if version is None:
        return False, "Triton not installed (pip install triton; CUDA builds of torch bring it)"
    if triton_interpreting():
        return True, f"Triton {version} interpreter (TRITON_INTERPRET=1): CPU tensors, slow"
    if not torch.cuda.is_available():
        return False, f"Triton {version} installed, but torch sees no CUDA device"
    return True, f"Triton {version} fused kernels (tl.dot on tensor cores, fused top-k)"


def cuda_status(device_count: int, reason: str) -> tuple[bool, str]:
    module = _native._cuda
    if module is None:
        return False, f"CUDA module not built ({_native._CUDA_IMPORT_ERROR or 'not built'})"
    built = f"CUDA module built for sm_{module.ARCHITECTURES.replace(',', ', sm_')}"
    if not hasattr(module, "search"):
        return False, f"{built}, but without the fused kernels (stale build?)"
    if device_count == 0:
        return False, f"{built}; no CUDA device ({reason or 'none found'})"
    return True, f"{built}; {device_count} device(s); mma.sync tensor-core kernels"


def available() -> dict[str, BackendStatus]:
    """Which backends were built and can run here, and why not."""
    report = {"torch": BackendStatus(True, f"plain PyTorch reference (torch {torch.__version__})")}
    if _native._C is None:
        report["cpu"] = BackendStatus(False, _native._CPU_IMPORT_ERROR or "not built")
    else:
        report["cpu"] = BackendStatus(
            True,
            f"native C++/OpenMP kernel, micro-kernel {_native._C.get_isa()}, "
            f"{torch.get_num_threads()} threads (torch.set_num_threads)",
        )
    report["cuda"] = BackendStatus(*cuda_status(*_native.cuda_device_count()))
    report["triton"] = BackendStatus(*triton_status())
    return report


def auto_gpu_backend(device: torch.device) -> str:
    """backend="auto" for tensors on a CUDA device: the measured faster GPU backend, else what is there."""
    choice = os.environ.get("SPAE_FAST_AUTO_GPU_BACKEND")
    if choice is None:
        major = torch.cuda.get_device_capability(device)[0]
        choice = AUTO_BACKEND_BY_CAPABILITY.get(major, "triton")
    order = [choice] + [b for b in GPU_BACKENDS if b != choice]
    for name in order:
        if name == "triton" and triton_status()[0]:
            return "triton"
        if name == "cuda" and cuda_status(*_native.cuda_device_count())[0]:
            return "cuda"
    return "torch"


def check_device(backend: str, device: torch.device) -> None:
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs tensors on a CUDA device, got {device}")
    if backend == "triton" and device.type != "cuda" and not (triton_interpreting() and device.type == "cpu"):
        raise ValueError(
            f"backend 'triton' needs tensors on a CUDA device (or CPU tensors with TRITON_INTERPRET=1), got {device}"
        )


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs an op on tensors of `device`: ``"auto"`` resolved, the others checked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu" and _native._C is not None:
            return "cpu"
        if device.type == "cuda":
            return auto_gpu_backend(device)
        return "torch"
    if backend == "cpu" and _native._C is None:
        raise RuntimeError(f"backend 'cpu' is not available: {_native._CPU_IMPORT_ERROR}")
    if backend in GPU_BACKENDS:
        status = available()[backend]
        if not status.available:
            raise RuntimeError(f"backend {backend!r} is not available: {status.reason}")
        check_device(backend, device)
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs tensors on the CPU, got {device}")
    return backend


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def semantic_triton_usable(device: torch.device) -> tuple[bool, str]:
    """(usable, why not) for the Triton kernel of the semantic loss on tensors of `device` (no Triton import)."""
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed"
    if device.type == "cuda" and not triton_interpreting():
        return True, ""
    if device.type == "cpu" and triton_interpreting():
        return True, ""
    return False, f"it needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"
