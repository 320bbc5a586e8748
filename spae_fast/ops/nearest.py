"""The nearest-row search: ops ``spae_fast::topk`` and ``spae_fast::nearest`` (top-1), both with the certified
int8 pre-filter on the CPU (topk for k <= 16), and their public functions `topk` and `nearest`. Spec:
`spae_fast._ref.topk_reference` and `nearest_reference`.

With x a query and e_j the codebook rows (bf16 / fp16 upcast exactly, accumulation in fp32):

    l2:      dist_j = ||x - e_j||^2        ip:  dist_j = -x.e_j        cosine:  dist_j = 1 - cos(x, e_j)

and the result is the k smallest in the total order (dist, index), NaN last: ties go to the lowest index,
bitwise identical for any batch size, split of the batch, thread count and call order. Non-finite inputs
raise ``ValueError`` unless ``check_finite=False`` (then such rows are unspecified, but indices stay in
range). Gradients flow to ``x`` through the distances; the codebook is frozen.

Kernels per device: "cpu" runs the native search (backend "cpu"), the Triton interpreter (backend "triton"
under TRITON_INTERPRET=1) or the reference; "cuda" runs `gpu_search` (backends "cuda" / "triton") or the
reference; any other device runs the reference (backend "torch").
"""

from __future__ import annotations

import torch

from .. import _native, _ref, _validate
from ..codebook import Codebook
from . import boundary, common, gpu_search
from .backends import BACKENDS, GPU_BACKENDS, PRECISIONS, check_precision, resolve_backend
from .common import EMPTY, PREFILTERS

# ----------------------------------------------------------------------------------------------------------
# Schemas; the default kernel (devices without their own) is the reference
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("spae_fast::topk", mutates_args=())
def _topk_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    panels: torch.Tensor,
    bias: torch.Tensor,
    norm_bound: torch.Tensor,
    prefilter_panels: torch.Tensor,
    prefilter_columns: torch.Tensor,
    prefilter_offsets: torch.Tensor,
    prefilter_bounds: torch.Tensor,
    k: int,
    metric: str,
    backend: str,
    check_finite: bool,
    prefilter: str,
    precision: str = "default",
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D], weight [V, D] -> (dist [N, k] fp32, index [N, k] int64). panels, bias, norm_bound: the
    table packed by ``spae_fast::pack_codebook`` (backend "cpu"; empty otherwise); the four prefilter operands
    as ``spae_fast::nearest``'s (used for k <= PREFILTER_MAX_K)."""
    _check_topk(x, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets,
                prefilter_bounds, k, metric, backend, check_finite, prefilter, precision)  # fmt: skip
    return _reference(x, weight, k, metric, backend, check_finite)


@torch.library.custom_op("spae_fast::nearest", mutates_args=())
def _nearest_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    panels: torch.Tensor,
    bias: torch.Tensor,
    norm_bound: torch.Tensor,
    prefilter_panels: torch.Tensor,
    prefilter_columns: torch.Tensor,
    prefilter_offsets: torch.Tensor,
    prefilter_bounds: torch.Tensor,
    metric: str,
    backend: str,
    check_finite: bool,
    prefilter: str,
    precision: str = "default",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk` with k = 1 -> (dist [N] fp32, index [N] int64). The four prefilter operands come from
    `common.prefilter_operands` (empty tensors: no pre-filter); with ``prefilter="auto"`` the native
    kernel drops it after a probe when it rarely certifies."""
    _check_nearest(x, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets,
                   prefilter_bounds, metric, backend, check_finite, prefilter, precision)  # fmt: skip
    return _first(*_reference(x, weight, 1, metric, backend, check_finite))


@_topk_op.register_fake
def _(x, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets, prefilter_bounds,
      k, metric, backend, check_finite, prefilter, precision="default"):  # fmt: skip
    _check_topk(x, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets,
                prefilter_bounds, k, metric, backend, check_finite, prefilter, precision)  # fmt: skip
    return x.new_empty(x.shape[0], k, dtype=torch.float32), x.new_empty(x.shape[0], k, dtype=torch.int64)


@_nearest_op.register_fake
def _(x, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets, prefilter_bounds,
      metric, backend, check_finite, prefilter, precision="default"):  # fmt: skip
    _check_nearest(x, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets,
                   prefilter_bounds, metric, backend, check_finite, prefilter, precision)  # fmt: skip
    return x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.int64)


def _first(dist: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return dist[:, 0].contiguous(), index[:, 0].contiguous()


def _reference(x, weight, k, metric, backend, check_finite):
    """Backend "torch" (any device): the reference, behind the native kernel's input checks."""
    if backend != "torch":
        raise RuntimeError(f"backend {backend!r} has no nearest / topk kernel for tensors on {x.device}")
    _check_like_native(x, weight, metric, check_finite)
    return _ref.topk_reference(x, weight, k, metric)


def _check_like_native(x, weight, metric, check_finite):
    """The input checks of the native kernel (csrc/nearest/search.cpp) for the torch backend: same exceptions, same rows.

    Codebook: NaN / Inf, or ||e||^2 above the fp32 range for l2, always raise. Queries (only with
    check_finite): the first row that holds NaN / Inf, or whose |x| * max|e| * 2 exceeds 1e37 (not cosine).
    """
    norm_sq = (weight.double() ** 2).sum(-1)  # [V]
    bad = ~torch.isfinite(weight).all(-1)
    if metric == "l2":
        bad |= norm_sq > torch.finfo(torch.float32).max
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        code = _native._OVERFLOW if bool(torch.isfinite(weight[row]).all()) else _native._NON_FINITE_CODEBOOK
        _native.raise_for_status(code, row, stage="codebook")
    if not check_finite or not x.numel():
        return
    non_finite = ~torch.isfinite(x).all(-1)  # [N]
    bad = non_finite.clone()
    if metric != "cosine":
        bad |= (x.double() ** 2).sum(-1).sqrt() * norm_sq.max().sqrt() * 2.0 > 1.0e37  # kMaxNormProduct
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        code = _native._NON_FINITE_QUERY if bool(non_finite[row]) else _native._OVERFLOW
        _native.raise_for_status(code, row, stage="search")



# ----------------------------------------------------------------------------------------------------------
# The boundary: every kernel below checks its operands first (`boundary`)
# ----------------------------------------------------------------------------------------------------------


def _check_search(op, x, weight, panels, bias, norm_bound, metric, backend, check_finite, precision):
    num_rows, dim = boundary.table(op, weight)
    boundary.rows_like(op, x, "x", dim, weight.device)
    boundary.choice(op, metric, "metric", _validate.METRICS)
    boundary.choice(op, backend, "backend", BACKENDS[1:])  # "auto" is resolved before the op
    boundary.flag(op, check_finite, "check_finite")
    boundary.choice(op, precision, "precision", PRECISIONS)
    if backend == "cpu":
        boundary.cpu_panels(op, panels, bias, norm_bound, num_rows, dim, weight.dtype, metric)


def _check_prefilter(op, weight, words, columns, offsets, bounds, backend, prefilter):
    boundary.choice(op, prefilter, "prefilter", PREFILTERS)
    if boundary.prefilter(op, words, columns, offsets, bounds, *weight.shape) and backend != "cpu":
        raise ValueError(f"spae_fast::{op}: the int8 pre-filter operands serve backend 'cpu' only")


def _check_topk(x, weight, panels, bias, norm_bound, words, columns, offsets, bounds, k, metric, backend,
                check_finite, prefilter, precision):  # fmt: skip
    _check_search("topk", x, weight, panels, bias, norm_bound, metric, backend, check_finite, precision)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= weight.shape[0]:
        raise ValueError(f"spae_fast::topk: k must be an int in [1, V] = [1, {weight.shape[0]}], got {k!r}")
    _check_prefilter("topk", weight, words, columns, offsets, bounds, backend, prefilter)


def _check_nearest(x, weight, panels, bias, norm_bound, words, columns, offsets, bounds, metric, backend,
                   check_finite, prefilter, precision):  # fmt: skip
    _check_search("nearest", x, weight, panels, bias, norm_bound, metric, backend, check_finite, precision)
    _check_prefilter("nearest", weight, words, columns, offsets, bounds, backend, prefilter)


# ----------------------------------------------------------------------------------------------------------
# Device kernels
# ----------------------------------------------------------------------------------------------------------


@_topk_op.register_kernel("cpu")
def _topk_cpu(x, weight, panels, bias, norm_bound, words, columns, offsets, bounds, k, metric, backend,
              check_finite, prefilter, precision="default"):  # fmt: skip
    _check_topk(x, weight, panels, bias, norm_bound, words, columns, offsets, bounds, k, metric, backend,
                check_finite, prefilter, precision)  # fmt: skip
    if backend == "cpu":
        operands = (words, columns, offsets, bounds)
        return _native_search(x, weight, panels, bias, norm_bound, k, metric, check_finite, "topk", operands,
                              prefilter)  # fmt: skip
    if backend == "triton":  # CPU tensors under TRITON_INTERPRET=1
        return gpu_search.topk(x, weight, k, metric, backend, precision, check_finite)
    return _reference(x, weight, k, metric, backend, check_finite)


@_topk_op.register_kernel("cuda")
def _topk_cuda(x, weight, panels, bias, norm_bound, words, columns, offsets, bounds, k, metric, backend,
               check_finite, prefilter, precision="default"):  # fmt: skip
    _check_topk(x, weight, panels, bias, norm_bound, words, columns, offsets, bounds, k, metric, backend,
                check_finite, prefilter, precision)  # fmt: skip
    if backend in GPU_BACKENDS:
        return gpu_search.topk(x, weight, k, metric, backend, precision, check_finite)
    return _reference(x, weight, k, metric, backend, check_finite)


@_nearest_op.register_kernel("cpu")
def _nearest_cpu(x, weight, panels, bias, norm_bound, words, columns, offsets, bounds, metric, backend,
                 check_finite, prefilter, precision="default"):  # fmt: skip
    _check_nearest(x, weight, panels, bias, norm_bound, words, columns, offsets, bounds, metric, backend,
                   check_finite, prefilter, precision)  # fmt: skip
    if backend == "cpu":
        operands = (words, columns, offsets, bounds)
        dist, index = _native_search(
            x, weight, panels, bias, norm_bound, 1, metric, check_finite, "nearest", operands, prefilter
        )
        return _first(dist, index)
    if backend == "triton":  # CPU tensors under TRITON_INTERPRET=1
        return _first(*gpu_search.topk(x, weight, 1, metric, backend, precision, check_finite))
    return _first(*_reference(x, weight, 1, metric, backend, check_finite))


@_nearest_op.register_kernel("cuda")
def _nearest_cuda(x, weight, panels, bias, norm_bound, words, columns, offsets, bounds, metric, backend,
                  check_finite, prefilter, precision="default"):  # fmt: skip
    _check_nearest(x, weight, panels, bias, norm_bound, words, columns, offsets, bounds, metric, backend,
                   check_finite, prefilter, precision)  # fmt: skip
    if backend in GPU_BACKENDS:
        return _first(*gpu_search.topk(x, weight, 1, metric, backend, precision, check_finite))
    return _first(*_reference(x, weight, 1, metric, backend, check_finite))


def _native_search(x, weight, panels, bias, norm_bound, k, metric, check_finite, op, prefilter_operands=None,
                   prefilter="none"):  # fmt: skip
    """The native CPU search (``_C.search``): x [N, D] -> (dist [N, k] fp32, index [N, k] int64). k <=
    PREFILTER_MAX_K may take the certified int8 pre-filter (`prefilter_operands`; empty tensors: off)."""
    native = _native.cpu_module()
    num_queries, dim = x.shape
    dist = torch.empty(num_queries, k, dtype=torch.float32)
    index = torch.empty(num_queries, k, dtype=torch.int64)
    words, columns, offsets, bounds = prefilter_operands if prefilter_operands is not None else (EMPTY,) * 4
    use_prefilter = k <= common.PREFILTER_MAX_K and words.numel() > 0
    full_search_rows = 0
    if num_queries:
        code, detail, full_search_rows = native.search(
            x=_native.buffer(x), num_queries=num_queries, dim=dim,
            x_row_stride=x.stride(0), x_col_stride=x.stride(1),
            x_dtype=_native.DTYPE_TAGS[str(x.dtype).removeprefix("torch.")],
            panels=_native.buffer(panels), panels_dtype=_native.DTYPE_TAGS[str(panels.dtype).removeprefix("torch.")],
            bias=_native.buffer(bias), codebook_rows=weight.shape[0],
            max_norm=float(norm_bound), metric=_native.METRIC_TAGS[metric], k=k, check_finite=check_finite,
            num_threads=torch.get_num_threads(), out_dist=_native.buffer(dist), out_index=_native.buffer(index),
            weight=common.native_table(weight), weight_row_stride=weight.stride(0), weight_col_stride=weight.stride(1),
            weight_dtype=_native.DTYPE_TAGS[str(weight.dtype).removeprefix("torch.")],
            prefilter_panels=_native.buffer(words) if use_prefilter else _native.NO_BUFFER,
            prefilter_columns=_native.buffer(columns) if use_prefilter else _native.NO_BUFFER,
            prefilter_offsets=_native.buffer(offsets) if use_prefilter else _native.NO_BUFFER,
            prefilter_bounds=bounds.tolist() if use_prefilter else [],
            prefilter_adaptive=prefilter == "auto",
        )  # fmt: skip
        _native.raise_for_status(code, detail, stage="search")
    common.CPU_SEARCH_STATS.update(
        op=op, queries=num_queries, full_search_rows=full_search_rows, prefilter=use_prefilter
    )
    return dist, index


# ----------------------------------------------------------------------------------------------------------
# Autograd: d dist / dx through the chosen rows (the codebook is frozen)
# ----------------------------------------------------------------------------------------------------------


def _distance_grad(x: torch.Tensor, chosen: torch.Tensor, grad_dist: torch.Tensor, metric: str) -> torch.Tensor:
    """d(sum_k g_k dist_k)/dx for x [N, D], chosen rows [N, k, D], g [N, k]."""
    q = x.float()[:, None, :]
    g = grad_dist[..., None]
    if metric == "l2":  # d||x - e||^2/dx = 2 (x - e)
        grad = (2.0 * g * (q - chosen)).sum(1)
    elif metric == "ip":  # d(-x.e)/dx = -e
        grad = -(g * chosen).sum(1)
    else:  # d(1 - x^.e^)/dx = -(e^ - (x^.e^) x^) / |x|
        norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(_ref.COSINE_EPS)
        q_hat = q / norm
        e_hat = chosen / torch.linalg.vector_norm(chosen, dim=-1, keepdim=True).clamp_min(_ref.COSINE_EPS)
        cos = (q_hat * e_hat).sum(-1, keepdim=True)
        grad = (-g * (e_hat - cos * q_hat) / norm).sum(1)
    return grad.to(x.dtype)


def _setup_topk_context(ctx, inputs, output):
    ctx.metric = inputs[10]  # x, weight, panels, bias, norm_bound, 4 prefilter operands, k, metric, ...
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _setup_nearest_context(ctx, inputs, output):
    ctx.metric = inputs[9]  # x, weight, panels, bias, norm_bound, 4 prefilter operands, metric, ...
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _grad_x(ctx, grad_dist):
    x, weight, index = ctx.saved_tensors
    index = index if index.dim() == 2 else index[:, None]  # [N, k] (nearest: k = 1); N may be 0
    chosen = weight.float()[index]  # [N, k, D]
    return _distance_grad(x, chosen, grad_dist.reshape(index.shape), ctx.metric)


def _topk_backward(ctx, grad_dist, grad_index):
    return (_grad_x(ctx, grad_dist),) + (None,) * 14


def _nearest_backward(ctx, grad_dist, grad_index):
    return (_grad_x(ctx, grad_dist),) + (None,) * 13


_topk_op.register_autograd(_topk_backward, setup_context=_setup_topk_context)
_nearest_op.register_autograd(_nearest_backward, setup_context=_setup_nearest_context)


# ----------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------


def _prepare(x, codebook, metric, backend, check_finite):
    _validate.flag(check_finite, "check_finite")
    dim, device, _ = common.codebook_shape(codebook)
    x = _validate.queries(x, dim, device)
    backend = resolve_backend(backend, x.device)
    rows_needed = x.requires_grad and torch.is_grad_enabled()  # the backward reads the chosen rows
    weight, panels, bias, norm_bound, metric = common.codebook_operands(
        codebook, metric, backend, rows_needed=rows_needed
    )
    return x, x.reshape(-1, dim), weight, panels, bias, norm_bound, metric, backend


def nearest(
    x: torch.Tensor,
    codebook: torch.Tensor | Codebook,
    *,
    metric: str | None = None,
    backend: str = "auto",
    check_finite: bool = True,
    precision: str = "default",
    prefilter: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook row of every vector, fused: no N x V matrix is ever formed.

    Args:
        x: ``[..., D]`` queries, fp32 / bf16 / fp16, any strides.
        codebook: ``[V, D]`` tensor, or a `Codebook` (prepared once: use it for repeated calls).
        metric: ``"l2"`` (default; squared Euclidean), ``"ip"`` (largest inner product, dist = -x.e) or
            ``"cosine"`` (dist = 1 - cos). With a `Codebook`, defaults to (and must equal) its metric.
        backend: ``"auto"``, ``"cpu"`` (native), ``"torch"`` (reference), ``"cuda"`` / ``"triton"`` (GPU
            kernels); see `available()`. On CUDA tensors ``"auto"`` picks the measured faster GPU backend.
        check_finite: raise ``ValueError`` on NaN / Inf in ``x`` (one cheap pass fused into the kernel).
        precision: GPU backends only (cpu / torch always compute in fp32): ``"default"`` (fp32 accumulation
            of the exact inputs; 16-bit inputs on tensor cores), ``"exact"`` (low-precision search, fp64
            rescoring of certified candidates: the exact argmin, bitwise reproducible; see
            `spae_fast.last_search_stats`), ``"tf32"`` or ``"bf16"`` (fp32 inputs on tensor cores, approximate).
        prefilter: CPU backend only: ``"auto"`` (default: on CPUs with AVX512-VNNI), ``"int8"`` (required) or
            ``"none"``. The certified int8 pre-filter (as `saq`'s) ranks the vocabulary with int8 dot products,
            proves that the exact fp32 winner is among the 64 best (512 in a second pass where needed) and
            rescores the few that can still win with the fp32 kernel;
            rows it cannot certify take the full fp32 search. dist and index are bitwise the same either way
            (`spae_fast.ops.last_cpu_search_stats` counts the full-search rows). ``SPAE_FAST_PREFILTER=0``
            turns it off. With a raw tensor the int8 copy is built per call; a `Codebook` caches it.
            ``"auto"`` also probes the first 1/32 of the queries (at least 16) and drops the pre-filter for the rest when
            more than a quarter of them needed the full search (e.g. random queries in high D). Under
            ``torch.compile`` ``"auto"`` runs the plain fp32 search (same results).

    Returns:
        ``(dist [...] fp32, index [...] int64)``; ties resolve to the lowest index.
    """
    x, flat, weight, panels, bias, norm_bound, metric, backend = _prepare(x, codebook, metric, backend, check_finite)
    prefilter_operands = common.prefilter_operands(codebook, weight, panels, bias, prefilter, backend, metric)
    precision = check_precision(precision)
    dist, index = torch.ops.spae_fast.nearest(
        flat, weight, panels, bias, norm_bound, *prefilter_operands, metric, backend, check_finite, prefilter,
        precision,
    )  # fmt: skip
    return dist.reshape(x.shape[:-1]), index.reshape(x.shape[:-1])


def topk(
    x: torch.Tensor,
    codebook: torch.Tensor | Codebook,
    k: int,
    *,
    metric: str | None = None,
    backend: str = "auto",
    check_finite: bool = True,
    precision: str = "default",
    prefilter: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest codebook rows of every vector, sorted by (distance, index), fused (no N x V).

    Same arguments as `nearest`, plus ``1 <= k <= V``. The certified int8 pre-filter (``prefilter``, as
    `nearest`'s, its certificate proving the k best instead of the winner) serves k <= 16 (`PREFILTER_MAX_K`);
    larger k take the fp32 search (``prefilter="int8"`` then raises). Returns ``(dist [..., k] fp32,
    index [..., k] int64)``, bitwise the same with or without the pre-filter.
    """
    k = _validate.k_value(k, common.codebook_shape(codebook)[2])
    x, flat, weight, panels, bias, norm_bound, metric, backend = _prepare(x, codebook, metric, backend, check_finite)
    common.check_prefilter(prefilter)  # also when k > 16 turns it off
    if k > common.PREFILTER_MAX_K and prefilter == "int8":
        raise ValueError(f"prefilter='int8' serves k <= {common.PREFILTER_MAX_K}, got k = {k}; use 'auto' or 'none'")
    mode = prefilter if k <= common.PREFILTER_MAX_K else "none"
    prefilter_operands = common.prefilter_operands(codebook, weight, panels, bias, mode, backend, metric)
    precision = check_precision(precision)
    dist, index = torch.ops.spae_fast.topk(
        flat, weight, panels, bias, norm_bound, *prefilter_operands, k, metric, backend, check_finite, mode,
        precision,
    )  # fmt: skip
    return dist.reshape(*x.shape[:-1], k), index.reshape(*x.shape[:-1], k)
