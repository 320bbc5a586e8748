"""The CUDA module's fused kernels as built facts, on any machine: compiled (CI builds with SPAE_CUDA=ON),
importable without a GPU, torch-free, and every entry point answering a clean status instead of crashing
when there is no device. The kernels themselves run in the per-op tests' "cuda" cases (tests/ops, `-m gpu`).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess

import pytest
import torch

import spae_fast
from spae_fast.ops import gpu_kernels


@pytest.fixture(scope="module")
def cuda():
    try:
        return importlib.import_module("spae_fast._cuda")
    except ImportError as error:
        if shutil.which("nvcc") is None and not os.environ.get("CUDACXX"):
            pytest.skip(f"no CUDA compiler here and spae_fast._cuda not built ({error})")
        pytest.fail(f"a CUDA compiler is present but spae_fast._cuda is not importable: {error}")


def _no_device(cuda) -> bool:
    return cuda.device_count()[0] == 0


def test_kernels_are_built_for_sm80_and_sm90(cuda):
    for name in ("search", "search_plan", "pair_dot64"):
        assert callable(getattr(cuda, name)), name
    assert cuda.MAX_TOPK == 32
    if "CMAKE_CUDA_ARCHITECTURES" not in os.environ:
        assert set(cuda.ARCHITECTURES.split(",")) >= {"80", "90"}, cuda.ARCHITECTURES


def test_module_links_no_torch_and_no_shared_cudart(cuda):
    if shutil.which("ldd") is None:
        pytest.skip("no ldd")
    linked = subprocess.run(["ldd", cuda.__file__], capture_output=True, text=True, check=False).stdout
    for library in ("libtorch", "libc10", "libcudart.so"):
        assert library not in linked, f"{cuda.__file__} links {library}:\n{linked}"


def test_no_device_reported_cleanly(cuda):
    if not _no_device(cuda):
        pytest.skip("a CUDA device is present")
    status = spae_fast.available()["cuda"]
    assert not status.available
    assert "no CUDA device" in status.reason and "sm_80" in status.reason


def _search_args(x, **change):
    """Valid-looking keyword arguments of _cuda.search (aligned, k = 1), with `change` applied."""
    ptr = x.data_ptr()
    args = {
        "x": ptr, "e": ptr, "n": 4, "v": 4, "d": 8, "dtype": 0, "tf32": False, "bias": ptr, "col_scale": ptr, "row_scale": 0, "k_pad": 1,
        "num_chunks": 1, "tiles_per_chunk": 1, "keys": ptr, "out_score": 0, "out_index": 0, "device": 0, "stream": 0,
    }  # fmt: skip
    args.update(change)
    return args


def test_entry_points_return_status_without_device(cuda):
    if not _no_device(cuda):
        pytest.skip("a CUDA device is present")
    code, message, *_ = cuda.search_plan(n=10, v=100, k_pad=1, device=0)
    assert code != 0 and message
    x = torch.zeros(4, 8)
    # aligned, valid-looking arguments: the kernel cannot launch, the status says why
    code, message = cuda.search(**_search_args(x))
    assert code != 0 and message
    with pytest.raises(RuntimeError, match="cudaError"):
        gpu_kernels.raise_cuda(code, message)
    ptr = x.data_ptr()
    code, message = cuda.pair_dot64(
        a=ptr, a_dtype=0, a_stride0=8, a_stride1=1, b=ptr, b_dtype=0, b_stride0=8, b_stride1=1, index=ptr,
        index_stride0=1, index_stride1=1, m=1, c=1, d=8, out=ptr, device=0, stream=0,
    )  # fmt: skip
    assert code != 0 and message


def test_bad_arguments_are_rejected_before_any_launch(cuda):
    """Argument checks at the binding raise, naming the argument; the kernels' own checks return -1."""
    x = torch.zeros(4, 8)
    for change, name in (({"k_pad": 3}, "k_pad"), ({"k_pad": 64}, "k_pad"), ({"dtype": 3}, "dtype"),
                         ({"n": -1}, "n"), ({"e": 0}, "e"), ({"keys": 0}, "keys")):  # fmt: skip
        with pytest.raises(ValueError, match=f"'{name}'"):
            cuda.search(**_search_args(x, **change))
    code, message = cuda.search(**_search_args(x, d=7))  # rows of 28 bytes: not 16-byte aligned
    assert code == -1 and "aligned" in message, (code, message)
    with pytest.raises(ValueError):
        gpu_kernels.raise_cuda(code, message)


def test_entry_points_take_checked_keyword_arguments_only(cuda):
    """No positional integer lists: a positional call, a missing, unknown or mistyped argument is refused
    before any pointer is read, and the message names the argument."""
    x = torch.zeros(4, 8)
    args = _search_args(x)
    with pytest.raises(TypeError, match="keyword arguments only"):
        cuda.search(*args.values())
    with pytest.raises(TypeError, match="missing keyword argument 'keys'"):
        cuda.search(**{name: value for name, value in args.items() if name != "keys"})
    with pytest.raises(TypeError, match="unexpected keyword argument 'queries'"):
        cuda.search(**args, queries=4)
    with pytest.raises(TypeError, match="'tf32' must be a bool"):
        cuda.search(**_search_args(x, tf32=1))
    with pytest.raises(TypeError, match="'v' must be an int"):
        cuda.search(**_search_args(x, v=4.0))
    with pytest.raises(ValueError, match="'out_score' must be 0 for k_pad = 1"):
        cuda.search(**_search_args(x, out_score=x.data_ptr()))
    with pytest.raises(ValueError, match="'layer'"):
        cuda.saq_pair_dot64(
            b=x.data_ptr(), b_dtype=0, b_stride0=8, b_stride1=1, index=x.data_ptr(), index_stride0=1,
            index_stride1=1, m=1, c=1, d=8, out=x.data_ptr(), z=x.data_ptr(), z_dtype=0, z_strides=(8, 1, 1, 1),
            ids=x.data_ptr(), ids_stride=1, sides=x.data_ptr(), firsts=x.data_ptr(), grid=1, layer=99,
            coefficient=1.0, device=0, stream=0,
        )  # fmt: skip


def test_cuda_backend_on_cpu_tensors_is_refused(cuda):
    x, weight = torch.randn(3, 8), torch.randn(10, 8)
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        spae_fast.nearest(x, weight, backend="cuda")


def test_operand_layout_for_cp_async():
    """The CUDA wrapper pads rows to 16 bytes and keeps aligned contiguous tensors as they are."""
    kernels = gpu_kernels._CudaKernels()
    aligned = torch.randn(5, 8)
    assert kernels.operand(aligned) is aligned
    odd = torch.randn(5, 7, dtype=torch.bfloat16)
    padded = kernels.operand(odd)
    assert padded.shape == (5, 8) and torch.equal(padded[:, :7], odd) and bool((padded[:, 7] == 0).all())
    strided = torch.randn(8, 5).T
    assert kernels.operand(strided).is_contiguous() and torch.equal(kernels.operand(strided), strided)


def test_precision_is_validated_for_every_backend():
    x, weight = torch.randn(3, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="precision"):
        spae_fast.nearest(x, weight, precision="fp64")
    # cpu / torch compute in fp32 whatever the precision
    torch.testing.assert_close(
        spae_fast.nearest(x, weight, backend="cpu", precision="exact"),
        spae_fast.nearest(x, weight, backend="cpu"),
    )


def test_import_without_cuda_module_or_triton_keeps_working():
    """`import spae_fast` needs neither a GPU, nor the CUDA module, nor triton (imported lazily)."""
    code = (
        "import sys; sys.modules['spae_fast._cuda'] = None; sys.modules['triton'] = None\n"
        "import spae_fast, torch\n"
        "report = spae_fast.available()\n"
        "assert not report['cuda'].available and 'not built' in report['cuda'].reason, report['cuda']\n"
        "print(spae_fast.nearest(torch.randn(2, 4), torch.randn(5, 4))[1].tolist())\n"
    )
    result = subprocess.run(
        [os.environ.get("PYTHON", _python()), "-c", code],
        capture_output=True,
        text=True,
        cwd="/",
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _python() -> str:
    import sys

    return sys.executable
