"""GPU dispatch of the op table: backends "cuda" (spae_fast._cuda, torch-free CUDA C++) and "triton"
(spae_fast.triton_kernels), plus exact mode. `spae_fast.ops` calls `topk` from its `_topk_impl`.

Both backends share everything but the kernels: the codebook preparation (cached on the weight tensor),
the argument checks, the merge of partial results, distance finishing and exact mode live here.

Precision (``precision=`` of `spae_fast.nearest` / `spae_fast.topk`; the op carries it as the backend
suffix ``"triton:exact"``):

  * ``"default"``: fp32 accumulation of the exactly upcast inputs, as the reference. Same-dtype bf16 / fp16
    inputs go to the tensor cores unchanged (their products are exact in fp32); anything involving fp32 runs
    exact fp32 (no TF32): "ieee" ``tl.dot`` (Triton) or an FMA kernel (CUDA).
  * ``"tf32"``: fp32 operands on TF32 tensor cores (about 3 decimal digits per operand).
  * ``"bf16"``: fp32 operands rounded to bf16 for the tensor cores (fastest, least accurate).
  * ``"exact"``: search at low precision (16-bit inputs as they are, fp32 inputs in TF32) keeping the best
    ``c`` candidates per row, rescore those in fp64, and accept a row only when a certified error bound
    proves that no other row of the codebook can rank before its k-th answer:
    ``S64[k-th] < approx[c-th] - delta`` with ``delta`` a worst-case bound of the approximate scores'
    error (operand rounding, tensor-core accumulation, epilogue). Rows that fail are searched again with
    32 candidates, and any still uncertain get an fp64 scan of the whole codebook. The result is the
    top-k of the exact (fp64-evaluated) scores of the inputs, ties to the lowest index - the fp32 argmin
    wherever fp32 can tell candidates apart - and is bitwise identical across batch sizes, launches and
    the two GPU backends. `last_search_stats()` reports how many rows had to be rescored.

The cpu and torch backends compute in fp32 and ignore ``precision``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import math
import os
import threading
import typing

import torch

from . import _native

PRECISIONS = ("default", "exact", "tf32", "bf16")
GPU_BACKENDS = ("cuda", "triton")
COSINE_EPS = 1e-12
_MAX_NORM_PRODUCT = 1.0e37  # as the CPU kernel: |x| * max|e| * 2 must stay below this
_FLT_MAX = float(torch.finfo(torch.float32).max)
_SECOND_STAGE_CANDIDATES = 32
_SCAN_CHUNK_ROWS = 8192

# Measured default for backend="auto" on CUDA devices: compute capability major -> backend. Filled from
# benchmarks/gpu_check.sh runs (it prints which backend was faster); empty until a GPU run is recorded,
# then "triton" when it is importable, else "cuda". SPAE_FAST_AUTO_GPU_BACKEND overrides it.
AUTO_BACKEND_BY_CAPABILITY: dict[int, str] = {}


# ----------------------------------------------------------------------------------------------------------
# Stats
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchStats:
    """What the last `nearest` / `topk` call on a GPU backend did (per thread).

    rows: queries searched. candidates: candidates per row kept by the first, low-precision pass and
    rescored in fp64 (0 outside exact mode). rows_rescored: rows whose first pass could not be certified
    and were searched again with more candidates. rows_full_scan: rows that still could not be certified
    and were rescored in fp64 against the whole codebook.
    """

    backend: str
    precision: str
    operands: str  # what the tensor cores / FMA units saw: "bfloat16", "float16", "tf32", "float32"
    rows: int
    candidates: int = 0
    rows_rescored: int = 0
    rows_full_scan: int = 0


_STATS = threading.local()


def last_search_stats() -> SearchStats | None:
    """Stats of this thread's last GPU `nearest` / `topk` call (None before the first one)."""
    return getattr(_STATS, "value", None)


# ----------------------------------------------------------------------------------------------------------
# Availability and backend choice
# ----------------------------------------------------------------------------------------------------------


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


def auto_backend(device: torch.device) -> str:
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


def op_backend(backend: str, precision: str) -> str:
    """The backend string the op carries: the GPU backends get the precision as a suffix ("cuda:exact")."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend in GPU_BACKENDS and precision != "default":
        return f"{backend}:{precision}"
    return backend


def is_gpu_backend(backend: str) -> bool:
    return backend.partition(":")[0] in GPU_BACKENDS


# ----------------------------------------------------------------------------------------------------------
# Kernel backends: the same three entry points on each
# ----------------------------------------------------------------------------------------------------------


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

    def _saq_layer(self, args):
        return self.saq_module.SaqLayer(args.z, args.ids, args.sides, args.firsts, args.layer, args.coefficient)

    def saq_search(self, e, bias, col_scale, k_pad, input_precision, args, num_queries):
        layer = self._saq_layer(args)
        return self.module.search(
            None, e, bias, col_scale, None, k_pad, input_precision, saq=layer, num_queries=num_queries
        )

    def saq_pair_dot64(self, e, index, args):
        return self.saq_module.saq_pair_dot64(e, index, self._saq_layer(args))


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

    def search(self, x, e, bias, col_scale, row_scale, k_pad, input_precision):
        num_queries, dim = x.shape
        num_rows = e.shape[0]
        device = x.device.index
        code, detail, num_chunks, tiles_per_chunk, _ = self.module.search_plan(
            n=num_queries, v=num_rows, k_pad=k_pad, device=device
        )
        _raise_cuda(code, detail)
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
        _raise_cuda(code, detail)
        return (keys,) if k_pad == 1 else (out_score, out_index)

    def _saq(self, args: SaqLayerArgs) -> dict:
        z = args.z
        return dict(
            z=z.data_ptr(), z_dtype=_DTYPE_TAGS[z.dtype], z_strides=tuple(z.stride()), ids=args.ids.data_ptr(),
            ids_stride=args.ids.stride(0), sides=args.sides.data_ptr(), firsts=args.firsts.data_ptr(),
            grid=z.shape[-1], layer=args.layer, coefficient=args.coefficient,
        )  # fmt: skip

    def saq_search(self, e, bias, col_scale, k_pad, input_precision, args, num_queries):
        num_rows, dim = e.shape
        device = e.device.index
        code, detail, num_chunks, tiles_per_chunk, max_ctas = self.module.search_plan(
            n=num_queries, v=num_rows, k_pad=k_pad, device=device
        )
        _raise_cuda(code, detail)
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
        _raise_cuda(code, detail)
        return out_score, out_index

    def saq_pair_dot64(self, b, index, args):
        out = torch.empty(index.shape, dtype=torch.float64, device=b.device)
        if index.numel() == 0:
            return out
        code, detail = self.module.saq_pair_dot64(
            b=b.data_ptr(), b_dtype=_DTYPE_TAGS[b.dtype], b_stride0=b.stride(0), b_stride1=b.stride(1),
            index=index.data_ptr(), index_stride0=index.stride(0), index_stride1=index.stride(1),
            m=index.shape[0], c=index.shape[1], d=b.shape[1], out=out.data_ptr(), **self._saq(args),
            device=b.device.index, stream=self._stream(b.device),
        )  # fmt: skip
        _raise_cuda(code, detail)
        return out

    def pair_dot64(self, a, b, index):
        out = torch.empty(index.shape, dtype=torch.float64, device=a.device)
        if index.numel() == 0:
            return out
        code, detail = self.module.pair_dot64(
            a=a.data_ptr(), a_dtype=_DTYPE_TAGS[a.dtype], a_stride0=a.stride(0), a_stride1=a.stride(1),
            b=b.data_ptr(), b_dtype=_DTYPE_TAGS[b.dtype], b_stride0=b.stride(0), b_stride1=b.stride(1),
            index=index.data_ptr(), index_stride0=index.stride(0), index_stride1=index.stride(1),
            m=index.shape[0], c=index.shape[1], d=a.shape[1], out=out.data_ptr(), device=a.device.index,
            stream=self._stream(a.device),
        )  # fmt: skip
        _raise_cuda(code, detail)
        return out


_DTYPE_TAGS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _raise_cuda(code: int, detail: str) -> None:
    """The one place where the CUDA module's status codes become exceptions."""
    if code == -1:
        raise ValueError(detail)
    if code == 2:  # cudaErrorMemoryAllocation
        raise MemoryError(detail)
    if code != 0:
        raise RuntimeError(f"{detail} (cudaError {code})")


def _kernels(name: str):
    return _kernel_backend(name, triton_interpreting())


@functools.cache
def _kernel_backend(name: str, interpreting: bool):
    return _TritonKernels() if name == "triton" else _CudaKernels()


# ----------------------------------------------------------------------------------------------------------
# Codebook preparation (once per codebook tensor, cached on it) and query preparation
# ----------------------------------------------------------------------------------------------------------


class _PreparedCodebook:
    """Per-row constants of a frozen codebook for one metric, plus operand copies per (backend, dtype)."""

    def __init__(self, weight: torch.Tensor, metric: str, kernels) -> None:
        num_rows = weight.shape[0]
        index = torch.arange(num_rows, device=weight.device)[:, None]
        self.version = weight._version
        self.norm_sq64 = kernels.pair_dot64(weight, weight, index)[:, 0]  # [V] fp64, canonical order
        finite = torch.isfinite(self.norm_sq64)
        overflow = self.norm_sq64 > _FLT_MAX if metric == "l2" else torch.zeros_like(finite)
        bad = ~finite | overflow
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            _native.raise_for_status(2 if not bool(finite[row]) else 3, row, stage="codebook")
        norm64 = self.norm_sq64.sqrt()
        self.inv_norm64 = 1.0 / norm64.clamp_min(COSINE_EPS)
        if metric == "l2":
            self.bias = self.norm_sq64.float()
            self.col_scale = torch.full((num_rows,), -2.0, dtype=torch.float32, device=weight.device)
            self.max_norm = float(norm64.max())
            self.max_bias = float(self.norm_sq64.max())
        elif metric == "ip":
            self.bias = torch.zeros(num_rows, dtype=torch.float32, device=weight.device)
            self.col_scale = torch.full((num_rows,), -1.0, dtype=torch.float32, device=weight.device)
            self.max_norm = float(norm64.max())
            self.max_bias = 0.0
        else:
            self.bias = torch.zeros(num_rows, dtype=torch.float32, device=weight.device)
            self.col_scale = (-self.inv_norm64).float()
            self.max_norm = 1.0
            self.max_bias = 0.0
        self.operands: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def operand(self, weight: torch.Tensor, dtype: torch.dtype, kernels) -> torch.Tensor:
        key = (kernels.name, dtype)
        if key not in self.operands:
            self.operands[key] = kernels.operand(weight.detach().to(dtype))
        return self.operands[key]


def _prepared(weight: torch.Tensor, metric: str, kernels) -> _PreparedCodebook:
    """Cached on the tensor object (a `Codebook` keeps one, so repeated calls pay nothing); rebuilt when the
    tensor was modified in place."""
    cache = getattr(weight, "_spae_fast_gpu_cache", None)
    if cache is None:
        cache = {}
        try:
            weight._spae_fast_gpu_cache = cache
        except (AttributeError, RuntimeError):  # e.g. a tensor subclass refusing attributes: no caching
            pass
    entry = cache.get(metric)
    if entry is None or entry.version != weight._version:
        entry = cache[metric] = _PreparedCodebook(weight, metric, kernels)
    return entry


def _dot_plan(
    x_dtype: torch.dtype, w_dtype: torch.dtype, precision: str
) -> tuple[torch.dtype, str, float, str]:
    """(operand dtype, tl.dot input_precision, unit roundoff of the operand conversion, label)."""
    if x_dtype == w_dtype and x_dtype in (torch.bfloat16, torch.float16):
        return x_dtype, "tf32", 0.0, str(x_dtype).removeprefix("torch.")  # exact operands
    if precision in ("tf32", "exact"):
        return torch.float32, "tf32", 2.0**-10, "tf32"  # 2^-10 also covers truncating conversions
    if precision == "bf16":
        return torch.bfloat16, "tf32", 2.0**-8, "bfloat16"
    return torch.float32, "ieee", 0.0, "float32"


def _check_queries(
    x: torch.Tensor, norm_sq64: torch.Tensor, codebook: _PreparedCodebook, metric: str
) -> None:
    non_finite = ~torch.isfinite(x).all(dim=1)
    code = non_finite.to(torch.int8)
    if metric != "cosine":
        overflow = norm_sq64.sqrt() * (codebook.max_norm * 2.0) > _MAX_NORM_PRODUCT
        code = torch.where(non_finite, 1, torch.where(overflow, 3, 0)).to(torch.int8)
    bad = code != 0
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        _native.raise_for_status(int(code[row]), row, stage="search")


# ----------------------------------------------------------------------------------------------------------
# Packed (score, index) keys: signed int64 order == total order (score, index), NaN last
# ----------------------------------------------------------------------------------------------------------


def pack_keys(score: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    bits = score.contiguous().view(torch.int32)
    key32 = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key32 = torch.where(score == 0, 0, key32)
    key32 = torch.where(torch.isnan(score), 0x7FFFFFFF, key32)
    return (key32.to(torch.int64) << 32) | index.to(torch.int64)


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    key32 = (keys >> 32).to(torch.int32)
    bits = torch.where(key32 < 0, key32 ^ 0x7FFFFFFF, key32)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def _next_pow2(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


# ----------------------------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------------------------


def _search_sorted(kernels, xq, eq, codebook, row_scale, k, input_precision):
    """Approximate top-k: (score [N, k] fp32, index [N, k] int64) sorted by (score, index)."""
    k_pad = _next_pow2(k)
    if kernels.name == "cuda" and k_pad > _native._cuda.MAX_TOPK:
        return _chunked_search_sorted(xq, eq, codebook, row_scale, k, input_precision)
    result = kernels.search(xq, eq, codebook.bias, codebook.col_scale, row_scale, k_pad, input_precision)
    if k_pad == 1:
        keys = result[0][:, None]
    else:
        keys = pack_keys(*result).sort(dim=1).values[:, :k]
    return unpack_keys(keys)


def _chunked_search_sorted(xq, eq, codebook, row_scale, k, input_precision, chunk_rows=_SCAN_CHUNK_ROWS):
    """The CUDA backend's path for k > 32: torch matmul over codebook chunks (O(N x chunk) memory), same
    score formula and merge as the fused kernels."""
    dim = xq.shape[1]
    eq = eq[:, :dim] if eq.shape[1] != dim else eq
    best = torch.empty(xq.shape[0], 0, dtype=torch.int64, device=xq.device)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = input_precision == "tf32"
    try:
        for start in range(0, eq.shape[0], chunk_rows):
            stop = min(start + chunk_rows, eq.shape[0])
            acc = (xq @ eq[start:stop].T).float()
            if row_scale is not None:
                acc = acc * row_scale[:, None]
            scores = codebook.bias[start:stop] + acc * codebook.col_scale[start:stop]
            scores = torch.where(torch.isnan(scores), float("inf"), scores)
            index = torch.arange(start, stop, device=xq.device).expand_as(scores)
            best = torch.cat([best, pack_keys(scores, index)], dim=1).sort(dim=1).values[:, :k]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return unpack_keys(best)


def _exact_scores(kernels, x, weight, candidates, codebook, inv_norm_x64, metric):
    """fp64 scores (the op's score, without ||x||^2) of candidates [M, C] (rows of the codebook)."""
    dot = kernels.pair_dot64(x, weight, candidates)
    if metric == "l2":
        return codebook.norm_sq64[candidates] - 2.0 * dot
    if metric == "ip":
        return -dot
    return -dot * inv_norm_x64[:, None] * codebook.inv_norm64[candidates]


def _sort_total(scores: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorts each row by (score, index), NaN last."""
    by_index = torch.argsort(index, dim=1, stable=True)
    scores, index = scores.gather(1, by_index), index.gather(1, by_index)
    by_score = torch.sort(scores, dim=1, stable=True).indices
    return scores.gather(1, by_score), index.gather(1, by_score)


def _error_bound(norm_sq64: torch.Tensor, codebook: _PreparedCodebook, metric: str, dim: int, unit: float):
    """Worst-case |approximate score - exact score| per row for the low-precision pass.

    Operand rounding: 2u + u^2 relative to sum_d |x_d e_d| <= |x| |e| (Cauchy-Schwarz). Tensor-core fp32
    accumulation: every MMA sums its products (exact for 16-bit operands) with at most 2^-18 relative
    error, and each of the <= D/8 + 2 accumulator additions (round or truncate) adds 2^-23. Epilogue: the
    fp32 scale / bias roundings (8 units of 2^-24 of |x||e|, 2^-21 of the largest bias)."""
    relative = 2.0 * unit + unit * unit + 2.0**-18 + (math.ceil(dim / 8) + 2) * 2.0**-23 + 8 * 2.0**-24
    if metric == "cosine":
        magnitude = torch.ones_like(norm_sq64)
    else:
        magnitude = norm_sq64.sqrt() * (codebook.max_norm * (2.0 if metric == "l2" else 1.0))
    return relative * magnitude + 2.0**-21 * codebook.max_bias + 1e-30 * dim


def _full_scan(kernels, x, weight, codebook, inv_norm_x64, k, metric):
    """Exact fp64 top-k of every row of x against the whole codebook (chunked: O(rows x chunk) memory)."""
    num_queries, num_rows = x.shape[0], weight.shape[0]
    best_scores = torch.empty(num_queries, 0, dtype=torch.float64, device=x.device)
    best_index = torch.empty(num_queries, 0, dtype=torch.int64, device=x.device)
    for start in range(0, num_rows, _SCAN_CHUNK_ROWS):
        stop = min(start + _SCAN_CHUNK_ROWS, num_rows)
        index = torch.arange(start, stop, device=x.device).expand(num_queries, -1)
        scores = _exact_scores(kernels, x, weight, index, codebook, inv_norm_x64, metric)
        # Earlier chunks hold lower indices: a stable sort of [best so far, chunk] is the total order.
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_index = torch.cat([best_index, index], dim=1)
        order = torch.sort(merged_scores, dim=1, stable=True).indices[:, :k]
        best_scores, best_index = merged_scores.gather(1, order), merged_index.gather(1, order)
    return best_scores, best_index


def _rows(tensor: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    return tensor if tensor is None or rows is None else tensor[rows]


def _exact_topk(kernels, x, weight, codebook, xq, eq, row_scale, norm_sq64, k, input_precision, unit, metric):
    """Exact mode (see the module docstring). Returns (fp64 scores [N, k], index [N, k], stats fields)."""
    num_queries, dim = x.shape
    num_rows = weight.shape[0]
    inv_norm_x64 = 1.0 / norm_sq64.sqrt().clamp_min(COSINE_EPS)
    delta = _error_bound(norm_sq64, codebook, metric, dim, unit)
    scores = torch.empty(num_queries, k, dtype=torch.float64, device=x.device)
    index = torch.empty(num_queries, k, dtype=torch.int64, device=x.device)
    first = min(num_rows, max(_next_pow2(k + 1), 2 if unit == 0.0 else 8))
    pending = None  # None: every row
    counts = []
    for candidates in (first, max(first, min(num_rows, _SECOND_STAGE_CANDIDATES))):
        approx, chosen = _search_sorted(
            kernels, _rows(xq, pending), eq, codebook, _rows(row_scale, pending), candidates, input_precision
        )
        exact, chosen = _sort_total(
            _exact_scores(
                kernels, _rows(x, pending), weight, chosen, codebook, _rows(inv_norm_x64, pending), metric
            ),
            chosen,
        )
        if candidates >= num_rows:
            certified = torch.ones(chosen.shape[0], dtype=torch.bool, device=x.device)
        else:
            threshold = approx[:, candidates - 1].double() - _rows(delta, pending)
            certified = exact[:, k - 1] < threshold  # NaN: not certified
        target = torch.arange(num_queries, device=x.device) if pending is None else pending
        scores[target[certified]] = exact[certified, :k]
        index[target[certified]] = chosen[certified, :k]
        pending = target[~certified]
        counts.append(int(pending.numel()))
        if counts[-1] == 0:
            break
    counts += [0] * (2 - len(counts))
    if counts[-1]:
        rest_scores, rest_index = _full_scan(
            kernels, x[pending], weight, codebook, inv_norm_x64[pending], k, metric
        )
        scores[pending], index[pending] = rest_scores, rest_index
    return scores, index, first, counts[0], counts[1]


def _finish(scores: torch.Tensor, norm_sq64: torch.Tensor, metric: str) -> torch.Tensor:
    """Selection scores [N, k] (fp32 or fp64) -> reported fp32 distances."""
    if metric == "l2":
        return (scores.double() + norm_sq64[:, None]).clamp_min(0.0).float()
    if metric == "cosine":
        return (1.0 + scores).clamp_min(0.0).float()
    return scores.float()


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def topk(x, weight, k, metric, backend, check_finite):
    """x [N, D], weight [V, D] -> (dist [N, k] fp32, index [N, k] int64) on backend "cuda[:precision]" or
    "triton[:precision]"."""
    name, _, precision = backend.partition(":")
    precision = precision or "default"
    kernels = _kernels(name)
    num_queries = x.shape[0]
    with _device_guard(x.device):
        if num_queries == 0:
            empty = torch.empty(0, k, device=x.device)
            _STATS.value = SearchStats(name, precision, "", 0)
            return empty.float(), empty.long()
        codebook = _prepared(weight, metric, kernels)
        norm_sq64 = kernels.pair_dot64(x, x, torch.arange(num_queries, device=x.device)[:, None])[:, 0]
        if check_finite:
            _check_queries(x, norm_sq64, codebook, metric)
        dot_dtype, input_precision, unit, label = _dot_plan(x.dtype, weight.dtype, precision)
        xq = kernels.operand(x.to(dot_dtype))
        eq = codebook.operand(weight, dot_dtype, kernels)
        row_scale = None
        if metric == "cosine":
            row_scale = (1.0 / norm_sq64.sqrt().clamp_min(COSINE_EPS)).float()
        if precision == "exact":
            scores, index, candidates, rescored, full = _exact_topk(
                kernels, x, weight, codebook, xq, eq, row_scale, norm_sq64, k, input_precision, unit, metric
            )
            stats = SearchStats(name, precision, label, num_queries, candidates, rescored, full)
        else:
            scores, index = _search_sorted(kernels, xq, eq, codebook, row_scale, k, input_precision)
            stats = SearchStats(name, precision, label, num_queries)
        _STATS.value = stats
        return _finish(scores, norm_sq64, metric), index


# ----------------------------------------------------------------------------------------------------------
# SAQ / RQ over a token pyramid (the op `spae_fast::saq`; spec: `_ref.saq_reference`)
# ----------------------------------------------------------------------------------------------------------


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


def _saq_positions(batch: int, grid: int, side: int, rows: torch.Tensor):
    """(image, y, x) of raster rows of a layer with side `side` (SPAE-METHOD.md §2 dilated subsampling)."""
    stride = grid // side
    offset = stride - (stride + 1) // 2
    image = rows // (side * side)
    return image, stride * ((rows // side) % side) + offset, stride * (rows % side) + offset


def _saq_covering_tokens(ids, sides, firsts, layer, grid, image, y, x) -> list[torch.Tensor]:
    """Ids of the tokens of layers < layer covering positions (image, y, x), ascending layer."""
    tokens = []
    for m in range(layer):
        stride = grid // sides[m]
        tokens.append(ids[image, firsts[m] + (y // stride) * sides[m] + x // stride])
    return tokens


def _saq_targets(z, weight, ids, sides, firsts, layer, coefficient, rows) -> torch.Tensor:
    """Targets [U, D] fp32 of the given rows of one layer: the same fp64 operations in the same order as the
    kernels (and the CPU kernel / reference), so bitwise equal. Used only for the few uncertain rows."""
    grid = z.shape[-1]
    image, y, x = _saq_positions(z.shape[0], grid, sides[layer], rows)
    z64 = z[image, :, y, x].double()  # [U, D]
    covering = torch.zeros_like(z64)
    for token in _saq_covering_tokens(ids, sides, firsts, layer, grid, image, y, x):
        covering = covering + weight[token].double()
    return (coefficient * z64 - covering).float()


def saq(z, weight, sides, mode, backend, check_finite):
    """z [B, D, g, g], weight [V, D] -> ids [B, sum s_l^2] int64 on backend "cuda" or "triton".

    Per layer: one fused search launch whose programs form their targets once per work item (from z and
    the ids of the layers above, never an N x D target in memory), keeping 8 candidates in low precision
    (the codebook's bf16 with bf16-rounded targets, else TF32); one fp64 rescoring launch of those candidates
    (targets formed again on the fly); the certificate of exact mode; the few uncertain rows go through
    exact mode on their materialised targets. Every id is the exact (fp64-evaluated) l2 argmin of its fp32
    target, ties to the lowest row."""
    name = backend.partition(":")[0]
    kernels = _kernels(name)
    batch, dim, grid = z.shape[0], z.shape[1], z.shape[-1]
    num_rows = weight.shape[0]
    firsts = [0]
    for side in sides:
        firsts.append(firsts[-1] + side * side)
    total, firsts = firsts[-1], firsts[:-1]
    with _device_guard(z.device):
        ids = torch.zeros(batch, total, dtype=torch.int64, device=z.device)
        if batch == 0:
            return ids
        codebook = _prepared(weight, "l2", kernels)
        if check_finite:
            bad = ~torch.isfinite(z).all(dim=1)  # [B, g, g]
            if bool(bad.any()):
                _native.raise_for_status(1, int(bad.reshape(-1).nonzero()[0, 0]), stage="saq", grid=grid)
        if weight.dtype == torch.bfloat16:  # bf16 codebook as it is, targets rounded to bf16 (one-sided)
            dot_dtype, input_precision, unit, label = torch.bfloat16, "tf32", 2.0**-9, "bfloat16"
        else:
            dot_dtype, input_precision, unit, label = torch.float32, "tf32", 2.0**-10, "tf32"
        eq = codebook.operand(weight, dot_dtype, kernels)
        z_norm = torch.linalg.vector_norm(z, dim=1, dtype=torch.float64)  # [B, g, g]
        e_norm = codebook.norm_sq64.sqrt()
        sides_device = torch.tensor(sides, dtype=torch.int32, device=z.device)
        firsts_device = torch.tensor(firsts, dtype=torch.int32, device=z.device)
        candidates = min(num_rows, 8)
        rows_total = rescored = full = 0
        for layer, side in enumerate(sides):
            coefficient = float(layer + 1) if mode == "saq" else 1.0
            args = SaqLayerArgs(z, ids, sides_device, firsts_device, layer, coefficient)
            num_queries = batch * side * side
            rows = torch.arange(num_queries, device=z.device)
            image, y, x = _saq_positions(batch, grid, side, rows)
            # |target| <= c |z| + sum |e|: the norm the error bound and the overflow check need
            target_norm = coefficient * z_norm[image, y, x]
            for token in _saq_covering_tokens(ids, sides, firsts, layer, grid, image, y, x):
                target_norm = target_norm + e_norm[token]
            if check_finite:
                overflow = target_norm * (codebook.max_norm * 2.0) > _MAX_NORM_PRODUCT
                if bool(overflow.any()):
                    row = int(overflow.nonzero()[0, 0])
                    position = (int(image[row]) * grid + int(y[row])) * grid + int(x[row])
                    _native.raise_for_status(3, position, stage="saq", grid=grid)
            k_pad = _next_pow2(candidates)
            result = kernels.saq_search(
                eq, codebook.bias, codebook.col_scale, k_pad, input_precision, args, num_queries
            )
            keys = result[0][:, None] if k_pad == 1 else pack_keys(*result).sort(dim=1).values[:, :candidates]
            approx, chosen = unpack_keys(keys)
            dot = kernels.saq_pair_dot64(weight, chosen, args)
            exact, chosen = _sort_total(codebook.norm_sq64[chosen] - 2.0 * dot, chosen)
            index = chosen[:, 0].clone()
            if candidates < num_rows:
                delta = _error_bound(target_norm * target_norm, codebook, "l2", dim, unit)
                uncertain = (~(exact[:, 0] < approx[:, candidates - 1].double() - delta)).nonzero()[:, 0]
                if uncertain.numel():
                    targets = _saq_targets(z, weight, ids, sides, firsts, layer, coefficient, uncertain)
                    norm_sq64 = kernels.pair_dot64(
                        targets, targets, torch.arange(len(targets), device=z.device)[:, None]
                    )
                    _, again, _, _, rest = _exact_topk(
                        kernels, targets, weight, codebook, kernels.operand(targets),
                        codebook.operand(weight, torch.float32, kernels), None, norm_sq64[:, 0], 1, "tf32", 2.0**-10, "l2",
                    )  # fmt: skip
                    index[uncertain] = again[:, 0]
                    rescored += int(uncertain.numel())
                    full += rest
            ids[:, firsts[layer] : firsts[layer] + side * side] = index.view(batch, side * side)
            rows_total += num_queries
        _STATS.value = SearchStats(name, "exact", label, rows_total, candidates, rescored, full)
        return ids
