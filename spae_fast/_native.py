"""Loading of the native modules and the one place where their status codes become Python exceptions."""

from __future__ import annotations

import importlib

_CPU_IMPORT_ERROR: str | None = None
_CUDA_IMPORT_ERROR: str | None = None

try:
    _C = importlib.import_module("spae_fast._C")
except ImportError as error:  # a source checkout without a build, or a broken install
    _C = None
    _CPU_IMPORT_ERROR = f"native CPU module not importable ({error}); install with `pip install .`"

try:
    _cuda = importlib.import_module("spae_fast._cuda")
except ImportError as error:
    _cuda = None
    _CUDA_IMPORT_ERROR = f"CUDA module not built ({error}); build with nvcc present or SPAE_CUDA=ON"

DTYPE_TAGS = {"float32": 0, "bfloat16": 1, "float16": 2}
METRIC_TAGS = {"l2": 0, "ip": 1, "cosine": 2}

_OK, _NON_FINITE_QUERY, _NON_FINITE_CODEBOOK, _OVERFLOW, _BAD_ARGUMENT, _OUT_OF_MEMORY = range(6)


def buffer(tensor) -> tuple[int, int]:
    """A tensor's data as the native CPU entry points take it: (address of its first element, bytes from there
    to the end of its last element). The entry points refuse a buffer shorter than what they read or write,
    so a call never reaches past the tensor it was given."""
    if tensor.numel() == 0:
        return tensor.data_ptr(), 0
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr(), (last + 1) * tensor.element_size()


NO_BUFFER = (0, 0)  # an operand the call does not use


def cpu_module():
    if _C is None:
        raise RuntimeError(f"spae_fast backend 'cpu' is unavailable: {_CPU_IMPORT_ERROR}")
    return _C


def raise_for_status(code: int, detail: int, *, stage: str, grid: int = 0) -> None:
    """Turns a native status code into the exception the user sees. stage: "codebook", "search" or "saq"
    (then ``detail`` is the flat latent position ``b * grid^2 + y * grid + x``)."""
    if code == _OK:
        return
    if stage == "saq" and code in (_NON_FINITE_QUERY, _OVERFLOW) and grid > 0:
        image, row, column = detail // (grid * grid), detail // grid % grid, detail % grid
        if code == _NON_FINITE_QUERY:
            raise ValueError(
                f"z contains NaN or Inf (first at image {image}, row {row}, column {column} of the latent grid); "
                "pass check_finite=False to skip this check (the ids of such positions are then unspecified)"
            )
        raise ValueError(
            f"z at image {image}, row {row}, column {column}: the quantization target is too large for fp32 "
            "accumulation against this codebook (|target| * max|e| must stay below 5e36); rescale the latents"
        )
    if code == _NON_FINITE_QUERY:
        raise ValueError(
            f"x contains NaN or Inf (first bad row {detail} of the flattened [N, D] input); pass "
            "check_finite=False to skip this check (results for such rows are then unspecified)"
        )
    if code == _NON_FINITE_CODEBOOK:
        raise ValueError(f"codebook contains NaN or Inf (first bad row {detail})")
    if code == _OVERFLOW:
        if stage == "codebook":
            raise ValueError(f"codebook row {detail} is too large: ||e||^2 overflows fp32. Rescale the table.")
        raise ValueError(
            f"x row {detail} is too large for fp32 accumulation against this codebook: |x| * max|e| must "
            "stay below 5e36. Rescale the inputs, or pass check_finite=False to skip this check."
        )
    if code == _OUT_OF_MEMORY:
        raise MemoryError("spae_fast native kernel could not allocate its scratch buffers")
    raise RuntimeError(f"spae_fast native kernel rejected its arguments (status {code}, detail {detail})")


def cuda_device_count() -> tuple[int, str]:
    """(usable CUDA devices seen by the spae_fast CUDA module, reason when zero)."""
    if _cuda is None:
        return 0, _CUDA_IMPORT_ERROR or "CUDA module not built"
    return _cuda.device_count()
