"""The GPU search: device "cuda" kernels of ``spae_fast::topk`` / ``spae_fast::nearest`` on backend "cuda"
or "triton" (the kernels behind `gpu_kernels.kernels`), plus exact mode. Both backends share everything
but the kernels: what they read of the table (`GpuOperands`), argument checks, the merge of partial results,
distance finishing.

Precision (``precision=`` of `spae_fast.nearest` / `spae_fast.topk`, an argument of the op):

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
import math
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import _native
from ..codebook import Codebook
from .common import GPU_STATS, SearchStats
from .gpu_kernels import kernels as _kernels

COSINE_EPS = 1e-12
MAX_NORM_PRODUCT = 1.0e37  # as the CPU kernel: |x| * max|e| * 2 must stay below this
_FLT_MAX = float(torch.finfo(torch.float32).max)
_SECOND_STAGE_CANDIDATES = 32
_SCAN_CHUNK_ROWS = 8192


# ----------------------------------------------------------------------------------------------------------
# What the kernels read of a table (kept by a Codebook, built per call for a plain tensor)
# ----------------------------------------------------------------------------------------------------------


class GpuOperands:
    """What the GPU kernels read of one table ``[V, D]`` for one metric: per-row constants (fp64 norms, the
    score's bias and column scale) and operand copies of the table per (kernel backend, dtype), each up to
    V x D. Built from the table per call, or once per `spae_fast.Codebook` (see `operands`)."""

    def __init__(self, weight: torch.Tensor, metric: str, kernels) -> None:
        num_rows = weight.shape[0]
        index = torch.arange(num_rows, device=weight.device)[:, None]
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
        self.copies: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def operand(self, weight: torch.Tensor, dtype: torch.dtype, kernels) -> torch.Tensor:
        """The table as `kernels` read it in `dtype` (built on first use)."""
        key = (kernels.name, dtype)
        if key not in self.copies:
            self.copies[key] = kernels.operand(weight.detach().to(dtype))
        return self.copies[key]


# A Codebook's own weight tensor -> that Codebook (weakly both ways: neither keeps the other alive).
_LENDERS = WeakIdKeyDictionary()


def lend(codebook: Codebook) -> None:
    """Let the GPU kernels keep their `GpuOperands` of `codebook` in it (`Codebook.derived`). The op layer
    calls this before passing ``codebook.weight`` to an op on a GPU backend: the op sees only the tensor."""
    _LENDERS[codebook.weight] = weakref.ref(codebook)


def operands(weight: torch.Tensor, metric: str, kernels) -> GpuOperands:
    """The `GpuOperands` of `weight` for `metric`. When `weight` is a `Codebook`'s own table (`lend`), the
    Codebook builds them once and keeps them, as it keeps its CPU packings (it refuses to search a table
    changed in place, so they cannot go stale); any other tensor is prepared on every call. Nothing is ever
    stored on the caller's tensor."""
    lender = _LENDERS.get(weight)
    codebook = None if lender is None else lender()
    if codebook is None or codebook.weight is not weight:
        return GpuOperands(weight, metric, kernels)
    return codebook.derived(f"gpu_operands:{metric}", lambda: GpuOperands(weight, metric, kernels))


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


def _check_queries(x: torch.Tensor, norm_sq64: torch.Tensor, table: GpuOperands, metric: str) -> None:
    non_finite = ~torch.isfinite(x).all(dim=1)
    code = non_finite.to(torch.int8)
    if metric != "cosine":
        overflow = norm_sq64.sqrt() * (table.max_norm * 2.0) > MAX_NORM_PRODUCT
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


def next_pow2(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


# ----------------------------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------------------------


def _search_sorted(kernels, xq, eq, table, row_scale, k, input_precision):
    """Approximate top-k: (score [N, k] fp32, index [N, k] int64) sorted by (score, index)."""
    k_pad = next_pow2(k)
    if kernels.name == "cuda" and k_pad > _native._cuda.MAX_TOPK:
        return _chunked_search_sorted(xq, eq, table, row_scale, k, input_precision)
    result = kernels.search(xq, eq, table.bias, table.col_scale, row_scale, k_pad, input_precision)
    if k_pad == 1:
        keys = result[0][:, None]
    else:
        keys = pack_keys(*result).sort(dim=1).values[:, :k]
    return unpack_keys(keys)


def _chunked_search_sorted(xq, eq, table, row_scale, k, input_precision, chunk_rows=_SCAN_CHUNK_ROWS):
    """The CUDA backend's path for k > 32: torch matmul over table chunks (O(N x chunk) memory), same
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
            scores = table.bias[start:stop] + acc * table.col_scale[start:stop]
            scores = torch.where(torch.isnan(scores), float("inf"), scores)
            index = torch.arange(start, stop, device=xq.device).expand_as(scores)
            best = torch.cat([best, pack_keys(scores, index)], dim=1).sort(dim=1).values[:, :k]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return unpack_keys(best)


def _exact_scores(kernels, x, weight, candidates, table, inv_norm_x64, metric):
    """fp64 scores (the op's score, without ||x||^2) of candidates [M, C] (rows of the table)."""
    dot = kernels.pair_dot64(x, weight, candidates)
    if metric == "l2":
        return table.norm_sq64[candidates] - 2.0 * dot
    if metric == "ip":
        return -dot
    return -dot * inv_norm_x64[:, None] * table.inv_norm64[candidates]


def sort_total(scores: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorts each row by (score, index), NaN last."""
    by_index = torch.argsort(index, dim=1, stable=True)
    scores, index = scores.gather(1, by_index), index.gather(1, by_index)
    by_score = torch.sort(scores, dim=1, stable=True).indices
    return scores.gather(1, by_score), index.gather(1, by_score)


def error_bound(norm_sq64: torch.Tensor, table: GpuOperands, metric: str, dim: int, unit: float):
    """Worst-case |approximate score - exact score| per row for the low-precision pass.

    Operand rounding: 2u + u^2 relative to sum_d |x_d e_d| <= |x| |e| (Cauchy-Schwarz). Tensor-core fp32
    accumulation: every MMA sums its products (exact for 16-bit operands) with at most 2^-18 relative
    error, and each of the <= D/8 + 2 accumulator additions (round or truncate) adds 2^-23. Epilogue: the
    fp32 scale / bias roundings (8 units of 2^-24 of |x||e|, 2^-21 of the largest bias)."""
    relative = 2.0 * unit + unit * unit + 2.0**-18 + (math.ceil(dim / 8) + 2) * 2.0**-23 + 8 * 2.0**-24
    if metric == "cosine":
        magnitude = torch.ones_like(norm_sq64)
    else:
        magnitude = norm_sq64.sqrt() * (table.max_norm * (2.0 if metric == "l2" else 1.0))
    return relative * magnitude + 2.0**-21 * table.max_bias + 1e-30 * dim


def _full_scan(kernels, x, weight, table, inv_norm_x64, k, metric):
    """Exact fp64 top-k of every row of x against the whole table (chunked: O(rows x chunk) memory)."""
    num_queries, num_rows = x.shape[0], weight.shape[0]
    best_scores = torch.empty(num_queries, 0, dtype=torch.float64, device=x.device)
    best_index = torch.empty(num_queries, 0, dtype=torch.int64, device=x.device)
    for start in range(0, num_rows, _SCAN_CHUNK_ROWS):
        stop = min(start + _SCAN_CHUNK_ROWS, num_rows)
        index = torch.arange(start, stop, device=x.device).expand(num_queries, -1)
        scores = _exact_scores(kernels, x, weight, index, table, inv_norm_x64, metric)
        # Earlier chunks hold lower indices: a stable sort of [best so far, chunk] is the total order.
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_index = torch.cat([best_index, index], dim=1)
        order = torch.sort(merged_scores, dim=1, stable=True).indices[:, :k]
        best_scores, best_index = merged_scores.gather(1, order), merged_index.gather(1, order)
    return best_scores, best_index


def _rows(tensor: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    return tensor if tensor is None or rows is None else tensor[rows]


def exact_topk(kernels, x, weight, table, xq, eq, row_scale, norm_sq64, k, input_precision, unit, metric):
    """Exact mode (see the module docstring). Returns (fp64 scores [N, k], index [N, k], stats fields)."""
    num_queries, dim = x.shape
    num_rows = weight.shape[0]
    inv_norm_x64 = 1.0 / norm_sq64.sqrt().clamp_min(COSINE_EPS)
    delta = error_bound(norm_sq64, table, metric, dim, unit)
    scores = torch.empty(num_queries, k, dtype=torch.float64, device=x.device)
    index = torch.empty(num_queries, k, dtype=torch.int64, device=x.device)
    first = min(num_rows, max(next_pow2(k + 1), 2 if unit == 0.0 else 8))
    pending = None  # None: every row
    counts = []
    for candidates in (first, max(first, min(num_rows, _SECOND_STAGE_CANDIDATES))):
        approx, chosen = _search_sorted(
            kernels, _rows(xq, pending), eq, table, _rows(row_scale, pending), candidates, input_precision
        )
        exact, chosen = sort_total(
            _exact_scores(
                kernels, _rows(x, pending), weight, chosen, table, _rows(inv_norm_x64, pending), metric
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
            kernels, x[pending], weight, table, inv_norm_x64[pending], k, metric
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


def device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def topk(x, weight, k, metric, backend, precision, check_finite):
    """x [N, D], weight [V, D] -> (dist [N, k] fp32, index [N, k] int64) on backend "cuda" or "triton" at
    `precision` (see the module docstring)."""
    kernels = _kernels(backend)
    num_queries = x.shape[0]
    with device_guard(x.device):
        if num_queries == 0:
            empty = torch.empty(0, k, device=x.device)
            GPU_STATS.value = SearchStats(backend, precision, "", 0)
            return empty.float(), empty.long()
        table = operands(weight, metric, kernels)
        norm_sq64 = kernels.pair_dot64(x, x, torch.arange(num_queries, device=x.device)[:, None])[:, 0]
        if check_finite:
            _check_queries(x, norm_sq64, table, metric)
        dot_dtype, input_precision, unit, label = _dot_plan(x.dtype, weight.dtype, precision)
        xq = kernels.operand(x.to(dot_dtype))
        eq = table.operand(weight, dot_dtype, kernels)
        row_scale = None
        if metric == "cosine":
            row_scale = (1.0 / norm_sq64.sqrt().clamp_min(COSINE_EPS)).float()
        if precision == "exact":
            scores, index, candidates, rescored, full = exact_topk(
                kernels, x, weight, table, xq, eq, row_scale, norm_sq64, k, input_precision, unit, metric
            )
            stats = SearchStats(backend, precision, label, num_queries, candidates, rescored, full)
        else:
            scores, index = _search_sorted(kernels, xq, eq, table, row_scale, k, input_precision)
            stats = SearchStats(backend, precision, label, num_queries)
        GPU_STATS.value = stats
        return _finish(scores, norm_sq64, metric), index
