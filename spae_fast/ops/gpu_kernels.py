"""The GPU kernels behind one interface: `kernels("cuda" | "triton")` returns an object with the same five
entry points (``search``, ``pair_dot64``, ``saq_search``, ``saq_pair_dot64`` and ``operand``, the copy of
a matrix the kernels read), so `gpu_search` and `gpu_saq` run either backend with one code path.

"cuda" wraps spae_fast._cuda (torch-free CUDA C++): raw pointers, strides, dtype tags and the caller's
stream; its status codes become exceptions in `raise_cuda`. "triton" wraps spae_fast.triton_kernels.nearest
and spae_fast.triton_kernels.saq (on CPU tensors under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import typing

import torch

from .. import _native
from .backends import triton_interpreting


@dataclasses.dataclass(frozen=True)
class SaqLayerArgs:
    """One layer for the kernels: z [B, D, g, g], ids [B, total] int64 (layers above filled), layer sides and
    first columns as int32 tensors on the device, 0-based layer, coefficient c_l (l for SAQ, 1 for RQ)."""

    z: torch.Tensor
    ids: torch.Tensor
    sides: torch.Tensor
    firsts: torch.Tensor
    layer: int
    coefficient: float


class _TritonKernels:
    name = "triton"

    def __init__(self) -> None:
        module = importlib.import_module("spae_fast.triton_kernels.nearest")
        saq_module = importlib.import_module("spae_fast.triton_kernels.saq")
        if module.INTERPRET != triton_interpreting():  # TRITON_INTERPRET changed: re-decorate the kernels
            saq_module = importlib.reload(saq_module)  # first: nearest imports its target prologue
            module = importlib.reload(module)
        self.module = module
        self.saq_module = saq_module

    def operand(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.contiguous()

    def search(self, x, e, bias, col_scale, row_scale, k_pad, input_precision):
        return self.module.search(x, e, bias, col_scale, row_scale, k_pad, input_precision)

    def pair_dot64(self, a, b, index):
        return self.module.pair_dot64(a, b, index)

    def saq_search(self, e, bias, col_scale, k_pad, input_precision, args, num_queries):
        return self.module.search(
            None, e, bias, col_scale, None, k_pad, input_precision, saq=args, num_queries=num_queries
        )

    def saq_pair_dot64(self, e, index, args):
        return self.module.pair_dot64(None, e, index, saq=args)


class _CudaKernels:
    """Wraps spae_fast._cuda: raw pointers, strides, dtype tags and the caller's stream."""

    name = "cuda"
    ALIGN_ELEMENTS: typing.ClassVar = {
        torch.float32: 4,
        torch.bfloat16: 8,
        torch.float16: 8,
    }  # 16-byte rows for cp.async

    def __init__(self) -> None:
        self.module = _native._cuda

    def operand(self, tensor: torch.Tensor) -> torch.Tensor:
        """Contiguous, 16-byte aligned rows (D padded with zeros to a multiple of 16 bytes)."""
        align = self.ALIGN_ELEMENTS[tensor.dtype]
        rows, dim = tensor.shape
        padded = -(-dim // align) * align
        if tensor.is_contiguous() and padded == dim and tensor.data_ptr() % 16 == 0:
            return tensor
        out = torch.zeros(rows, padded, dtype=tensor.dtype, device=tensor.device)
        out[:, :dim] = tensor
        return out

    def _stream(self, device: torch.device) -> int:
        return torch.cuda.current_stream(device).cuda_stream

    def search_plan(self, num_queries: int, num_rows: int, k_pad: int, device: int) -> tuple[int, int, int]:
        """(chunks of the codebook, tiles per chunk, the most CTAs resident at once) for one search launch."""
        code, detail, num_chunks, tiles_per_chunk, max_ctas = self.module.search_plan(
            n=num_queries, v=num_rows, k_pad=k_pad, device=device
        )
        raise_cuda(code, detail)
        return num_chunks, tiles_per_chunk, max_ctas

    def search(self, x, e, bias, col_scale, row_scale, k_pad, input_precision):
        num_queries, dim = x.shape
        num_rows = e.shape[0]
        device = x.device.index
        num_chunks, tiles_per_chunk, _ = self.search_plan(num_queries, num_rows, k_pad, device)
        keys = out_score = out_index = None
        if k_pad == 1:
            keys = torch.full((num_queries,), (1 << 63) - 1, dtype=torch.int64, device=x.device)
        else:
            out_score = torch.empty(num_queries, num_chunks * k_pad, dtype=torch.float32, device=x.device)
            out_index = torch.empty(num_queries, num_chunks * k_pad, dtype=torch.int32, device=x.device)
        code, detail = self.module.search(
            x=x.data_ptr(), e=e.data_ptr(), n=num_queries, v=num_rows, d=dim, dtype=_DTYPE_TAGS[x.dtype],
            tf32=input_precision == "tf32", bias=bias.data_ptr(), col_scale=col_scale.data_ptr(),
            row_scale=0 if row_scale is None else row_scale.data_ptr(), k_pad=k_pad, num_chunks=num_chunks,
            tiles_per_chunk=tiles_per_chunk, keys=0 if keys is None else keys.data_ptr(),
            out_score=0 if out_score is None else out_score.data_ptr(),
            out_index=0 if out_index is None else out_index.data_ptr(), device=device, stream=self._stream(x.device),
        )  # fmt: skip
        raise_cuda(code, detail)
        return (keys,) if k_pad == 1 else (out_score, out_index)

    def _saq(self, args: SaqLayerArgs) -> dict:
        z = args.z
        return {
            "z": z.data_ptr(), "z_dtype": _DTYPE_TAGS[z.dtype], "z_strides": tuple(z.stride()), "ids": args.ids.data_ptr(),
            "ids_stride": args.ids.stride(0), "sides": args.sides.data_ptr(), "firsts": args.firsts.data_ptr(),
            "grid": z.shape[-1], "layer": args.layer, "coefficient": args.coefficient,
        }  # fmt: skip

    def saq_search(self, e, bias, col_scale, k_pad, input_precision, args, num_queries):
        num_rows, dim = e.shape
        device = e.device.index
        num_chunks, tiles_per_chunk, max_ctas = self.search_plan(num_queries, num_rows, k_pad, device)
        scratch = torch.empty(
            max_ctas * 128, dim, dtype=e.dtype, device=e.device
        )  # O(CTAs x D), not O(N x D)
        out_score = torch.empty(num_queries, num_chunks * k_pad, dtype=torch.float32, device=e.device)
        out_index = torch.empty(num_queries, num_chunks * k_pad, dtype=torch.int32, device=e.device)
        code, detail = self.module.saq_search(
            e=e.data_ptr(), n=num_queries, v=num_rows, d=dim, dtype=_DTYPE_TAGS[e.dtype],
            tf32=input_precision == "tf32", bias=bias.data_ptr(), col_scale=col_scale.data_ptr(), k_pad=k_pad,
            num_chunks=num_chunks, tiles_per_chunk=tiles_per_chunk, out_score=out_score.data_ptr(),
            out_index=out_index.data_ptr(), **self._saq(args), dim=args.z.shape[1], scratch=scratch.data_ptr(),
            scratch_ctas=max_ctas, device=device, stream=self._stream(e.device),
        )  # fmt: skip
        raise_cuda(code, detail)
        return out_score, out_index

    def _pair_dot64(self, entry, index, rows, **operands):
        """fp64 dots of the pairs (i, index[i, j]) through `entry` (``pair_dot64`` / ``saq_pair_dot64``), which
        takes the row operands in `operands`; `rows` [*, D] gives the device and D."""
        out = torch.empty(index.shape, dtype=torch.float64, device=rows.device)
        if index.numel() == 0:
            return out
        code, detail = entry(
            **operands, index=index.data_ptr(), index_stride0=index.stride(0), index_stride1=index.stride(1),
            m=index.shape[0], c=index.shape[1], d=rows.shape[1], out=out.data_ptr(), device=rows.device.index,
            stream=self._stream(rows.device),
        )  # fmt: skip
        raise_cuda(code, detail)
        return out

    def saq_pair_dot64(self, b, index, args):
        return self._pair_dot64(self.module.saq_pair_dot64, index, b, **self._matrix("b", b), **self._saq(args))

    def pair_dot64(self, a, b, index):
        return self._pair_dot64(self.module.pair_dot64, index, a, **self._matrix("a", a), **self._matrix("b", b))

    @staticmethod
    def _matrix(name: str, tensor: torch.Tensor) -> dict:
        """The keyword arguments of one [rows, D] operand: pointer, dtype tag and the two strides."""
        return {
            name: tensor.data_ptr(), f"{name}_dtype": _DTYPE_TAGS[tensor.dtype],
            f"{name}_stride0": tensor.stride(0), f"{name}_stride1": tensor.stride(1),
        }  # fmt: skip


_DTYPE_TAGS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def raise_cuda(code: int, detail: str) -> None:
    """The one place where the CUDA module's status codes become exceptions."""
    if code == -1:
        raise ValueError(detail)
    if code == 2:  # cudaErrorMemoryAllocation
        raise MemoryError(detail)
    if code != 0:
        raise RuntimeError(f"{detail} (cudaError {code})")


def kernels(name: str):
    return _kernel_backend(name, triton_interpreting())


@functools.cache
def _kernel_backend(name: str, interpreting: bool):
    return _TritonKernels() if name == "triton" else _CudaKernels()
