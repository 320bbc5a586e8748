"""The op table: every op is one `torch.library` custom op with a fake implementation, an autograd rule
where it has one, and a dispatch to a backend ("torch" reference, "cpu" native; "cuda" / "triton" come with
the GPU kernels). The public functions validate, resolve ``backend="auto"`` and call the ops.

Semantics every backend shares (the reference `spae_fast._ref` is the spec):
  * distances are fp32, indices int64; inputs fp32 / bf16 / fp16 are upcast exactly and accumulated in fp32;
  * top-k is sorted by (distance, index): ties go to the lowest index, bitwise identical for any batch size,
    split of the batch, thread count and call order;
  * non-finite inputs raise ``ValueError`` unless ``check_finite=False`` (then such rows are unspecified,
    but indices stay in range and nothing crashes);
  * gradients flow to ``x`` through the returned distances (the codebook is frozen: no gradient for it).
"""

from __future__ import annotations

import dataclasses
import os
import weakref

import torch

from . import _gpu, _native, _ref, _validate
from .codebook import Codebook

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
_EMPTY = torch.empty(0)


# ----------------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("spae_fast::pack_codebook", mutates_args=())
def _pack_codebook(weight: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [V, D] -> (panels [ceil(V/16), D, 16] fp32, bias [ceil(V/16)*16] fp32, norm bound [] fp64)."""
    native = _native.cpu_module()
    num_rows, dim = weight.shape
    num_panels = -(-num_rows // native.PANEL_WIDTH)
    panels = torch.empty(num_panels, dim, native.PANEL_WIDTH, dtype=torch.float32)
    bias = torch.empty(num_panels * native.PANEL_WIDTH, dtype=torch.float32)
    code, detail, max_norm = native.pack_codebook(
        weight=weight.data_ptr(), num_rows=num_rows, dim=dim,
        weight_row_stride=weight.stride(0), weight_col_stride=weight.stride(1),
        weight_dtype=_native.DTYPE_TAGS[str(weight.dtype).removeprefix("torch.")],
        metric=_native.METRIC_TAGS[metric], out_panels=panels.data_ptr(), out_bias=bias.data_ptr(),
        num_threads=torch.get_num_threads(),
    )  # fmt: skip
    _native.raise_for_status(code, detail, stage="codebook")
    return panels, bias, torch.tensor(max_norm, dtype=torch.float64)


@_pack_codebook.register_fake
def _(weight, metric):
    num_panels = -(-weight.shape[0] // 16)
    return (
        weight.new_empty(num_panels, weight.shape[1], 16, dtype=torch.float32),
        weight.new_empty(num_panels * 16, dtype=torch.float32),
        weight.new_empty((), dtype=torch.float64),
    )


def _check_like_native(x, weight, metric, check_finite):
    """The input checks of the native kernel (csrc/search.cpp) for the torch backend: same exceptions, same rows.

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


def _topk_impl(x, weight, panels, bias, norm_bound, k, metric, backend, check_finite, prefilter_operands=None,
               prefilter="none"):
    """x [N, D], weight [V, D] -> (dist [N, k] fp32, index [N, k] int64). k = 1 on the CPU may take the
    certified int8 pre-filter (`prefilter_operands` from `_prefilter_operands`; empty tensors: off; with
    ``prefilter="auto"`` the kernel drops it after a probe when it rarely certifies)."""
    if backend == "torch":
        _check_like_native(x, weight, metric, check_finite)
        return _ref.topk_reference(x, weight, k, metric)
    if backend == "cpu":
        native = _native.cpu_module()
        num_queries, dim = x.shape
        dist = torch.empty(num_queries, k, dtype=torch.float32)
        index = torch.empty(num_queries, k, dtype=torch.int64)
        words, columns, offsets, bounds = prefilter_operands if prefilter_operands is not None else (_EMPTY,) * 4
        use_prefilter = k == 1 and words.numel() > 0
        full_search_rows = 0
        if num_queries:
            code, detail, full_search_rows = native.search(
                x=x.data_ptr(), num_queries=num_queries, dim=dim,
                x_row_stride=x.stride(0), x_col_stride=x.stride(1),
                x_dtype=_native.DTYPE_TAGS[str(x.dtype).removeprefix("torch.")],
                panels=panels.data_ptr(), bias=bias.data_ptr(), codebook_rows=weight.shape[0],
                max_norm=float(norm_bound), metric=_native.METRIC_TAGS[metric], k=k, check_finite=check_finite,
                num_threads=torch.get_num_threads(), out_dist=dist.data_ptr(), out_index=index.data_ptr(),
                weight=weight.data_ptr(), weight_row_stride=weight.stride(0), weight_col_stride=weight.stride(1),
                weight_dtype=_native.DTYPE_TAGS[str(weight.dtype).removeprefix("torch.")],
                prefilter_panels=words.data_ptr() if use_prefilter else 0,
                prefilter_columns=columns.data_ptr() if use_prefilter else 0,
                prefilter_offsets=offsets.data_ptr() if use_prefilter else 0,
                prefilter_bounds=bounds.tolist() if use_prefilter else [],
                prefilter_adaptive=prefilter == "auto",
            )  # fmt: skip
            _native.raise_for_status(code, detail, stage="search")
        _CPU_SEARCH_STATS.update(
            op="nearest" if prefilter_operands is not None else "topk", queries=num_queries,
            full_search_rows=full_search_rows, prefilter=use_prefilter,
        )
        return dist, index
    if _gpu.is_gpu_backend(backend):  # "cuda" / "triton", optionally ":<precision>"
        return _gpu.topk(x, weight, k, metric, backend, check_finite)
    raise RuntimeError(f"backend {backend!r} has no kernel for this op yet")


@torch.library.custom_op("spae_fast::topk", mutates_args=())
def _topk_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    panels: torch.Tensor,
    bias: torch.Tensor,
    norm_bound: torch.Tensor,
    k: int,
    metric: str,
    backend: str,
    check_finite: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _topk_impl(x, weight, panels, bias, norm_bound, k, metric, backend, check_finite)


@_topk_op.register_fake
def _(x, weight, panels, bias, norm_bound, k, metric, backend, check_finite):
    return x.new_empty(x.shape[0], k, dtype=torch.float32), x.new_empty(x.shape[0], k, dtype=torch.int64)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    operands = (prefilter_panels, prefilter_columns, prefilter_offsets, prefilter_bounds)
    dist, index = _topk_impl(x, weight, panels, bias, norm_bound, 1, metric, backend, check_finite, operands, prefilter)
    return dist[:, 0].contiguous(), index[:, 0].contiguous()


@_nearest_op.register_fake
def _(x, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets, prefilter_bounds,
      metric, backend, check_finite, prefilter):  # fmt: skip
    return x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.int64)


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
    x, weight = inputs[0], inputs[1]
    metric = inputs[6] if len(inputs) == 9 else inputs[9]  # topk: ..., k, metric; nearest: ..., 4 int8 operands, metric
    ctx.metric = metric
    ctx.save_for_backward(x, weight, output[1])


def _topk_backward(ctx, grad_dist, grad_index):
    x, weight, index = ctx.saved_tensors
    index = index if index.dim() == 2 else index[:, None]  # [N, k] (nearest: k = 1); N may be 0
    chosen = weight.float()[index]  # [N, k, D]
    grad_x = _distance_grad(x, chosen, grad_dist.reshape(index.shape), ctx.metric)
    return grad_x, None, None, None, None, None, None, None, None


def _nearest_backward(ctx, grad_dist, grad_index):
    return _topk_backward(ctx, grad_dist, grad_index)[:1] + (None,) * 12


_topk_op.register_autograd(_topk_backward, setup_context=_setup_topk_context)
_nearest_op.register_autograd(_nearest_backward, setup_context=_setup_topk_context)


# ----------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str


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
    report["cuda"] = BackendStatus(*_gpu.cuda_status(*_native.cuda_device_count()))
    report["triton"] = BackendStatus(*_gpu.triton_status())
    return report


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu" and _native._C is not None:
            return "cpu"
        if device.type == "cuda":
            return _gpu.auto_backend(device)
        return "torch"
    if backend == "cpu" and _native._C is None:
        raise RuntimeError(f"backend 'cpu' is not available: {_native._CPU_IMPORT_ERROR}")
    if backend in ("cuda", "triton"):
        status = available()[backend]
        if not status.available:
            raise RuntimeError(f"backend {backend!r} is not available: {status.reason}")
        _gpu.check_device(backend, device)
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs tensors on the CPU, got {device}")
    return backend


def _codebook_operands(codebook, metric: str | None, backend: str):
    """(weight, panels, bias, norm_bound, metric) for the op, packing a plain tensor when the backend needs it."""
    if isinstance(codebook, Codebook):
        if metric is not None and metric != codebook.metric:
            raise ValueError(
                f"metric={metric!r} differs from the Codebook's metric {codebook.metric!r}; "
                "build the Codebook with the metric you search with"
            )
        if not torch.compiler.is_compiling():
            codebook.check_unchanged()
        if backend == "cpu":
            return codebook.weight, codebook.cpu_panels, codebook.cpu_bias, codebook.cpu_norm_bound, codebook.metric
        return codebook.weight, _EMPTY, _EMPTY, _EMPTY, codebook.metric
    weight = _validate.codebook_weight(codebook, "codebook")
    metric = _validate.metric("l2" if metric is None else metric)
    if backend == "cpu":
        panels, bias, norm_bound = torch.ops.spae_fast.pack_codebook(weight.detach(), metric)
        return weight.detach(), panels, bias, norm_bound, metric
    return weight.detach(), _EMPTY, _EMPTY, _EMPTY, metric


def _prepare(x, codebook, metric, backend):
    if isinstance(codebook, Codebook):
        dim, device = codebook.dim, codebook.device
    else:
        weight = _validate.codebook_weight(codebook, "codebook")
        dim, device = weight.shape[1], weight.device
    x = _validate.queries(x, dim, device)
    backend = resolve_backend(backend, x.device)
    weight, panels, bias, norm_bound, metric = _codebook_operands(codebook, metric, backend)
    return x, x.reshape(-1, dim), weight, panels, bias, norm_bound, metric, backend


# ----------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------


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
    x, flat, weight, panels, bias, norm_bound, metric, backend = _prepare(x, codebook, metric, backend)
    prefilter_operands = _prefilter_operands(codebook, weight, panels, bias, prefilter, backend)
    backend = _gpu.op_backend(backend, precision)
    dist, index = torch.ops.spae_fast.nearest(
        flat, weight, panels, bias, norm_bound, *prefilter_operands, metric, backend, check_finite, prefilter
    )
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest codebook rows of every vector, sorted by (distance, index), fused (no N x V).

    Same arguments as `nearest`, plus ``1 <= k <= V``. Returns ``(dist [..., k] fp32, index [..., k] int64)``.
    """
    num_rows = codebook.num_rows if isinstance(codebook, Codebook) else _validate.codebook_weight(codebook).shape[0]
    k = _validate.k_value(k, num_rows)
    x, flat, weight, panels, bias, norm_bound, metric, backend = _prepare(x, codebook, metric, backend)
    backend = _gpu.op_backend(backend, precision)
    dist, index = torch.ops.spae_fast.topk(flat, weight, panels, bias, norm_bound, k, metric, backend, check_finite)
    return dist.reshape(*x.shape[:-1], k), index.reshape(*x.shape[:-1], k)


# ----------------------------------------------------------------------------------------------------------
# SAQ: streaming average / residual quantization over a token pyramid (SPAE-METHOD.md §2-3)
# ----------------------------------------------------------------------------------------------------------

SAQ_MODES = ("saq", "rq")
PREFILTERS = ("auto", "int8", "none")  # the certified int8 pre-filter of `nearest` and `saq`
SAQ_PREFILTERS = PREFILTERS
PREFILTER_ENV = "SPAE_FAST_PREFILTER"  # "0": never use the int8 pre-filter (auto and int8 fall back to fp32)
SAQ_MAX_LAYERS = 64  # csrc/saq.cpp: SaqLayerSource::kMaxLayers
_SAQ_STATS = {"queries": 0, "full_search_rows": 0, "prefilter": False}
_CPU_SEARCH_STATS = {"op": None, "queries": 0, "full_search_rows": 0, "prefilter": False}
_INT8_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Codebook -> (version, *operands)


def last_saq_stats() -> dict:
    """Of the last native `saq` call: ``queries`` (positions searched, all layers), ``prefilter`` (whether the
    certified int8 pre-filter ran) and ``full_search_rows`` (queries its certificate could not settle, which
    took the full fp32 search; all of them without the pre-filter)."""
    return dict(_SAQ_STATS)


def last_cpu_search_stats() -> dict:
    """Of the last native CPU search (``op``: ``"nearest"``, ``"topk"`` or ``"saq"``): ``queries`` (rows
    searched; all layers for saq), ``prefilter`` (whether the certified int8 pre-filter ran) and
    ``full_search_rows`` (queries its certificate could not settle, which took the full fp32 search; all of
    them without the pre-filter)."""
    return dict(_CPU_SEARCH_STATS)


def int8_prefilter_available() -> bool:
    """Whether this CPU and build run the certified AVX512-VNNI pre-filter (nearest and SAQ searches)."""
    native = _native._C
    return native is not None and hasattr(native, "cpu_supports_avx512_vnni") and native.cpu_supports_avx512_vnni()


def _pack_int8(panels: torch.Tensor, bias: torch.Tensor, num_rows: int, dim: int):
    """int8 copy of packed fp32 panels: (words [ceil(V/16), ceil(D/4), 16] int32, column data
    [ceil(V/16), 4, 16] fp32, offsets [ceil(V/16) * 16] int32, bounds [4] fp64); see csrc/spae_native.h."""
    native = _native.cpu_module()
    width = native.INT8_PANEL_WIDTH
    num_panels = -(-num_rows // width)
    words = torch.empty(num_panels, (dim + 3) // 4, width, dtype=torch.int32)
    columns = torch.empty(num_panels, 4, width, dtype=torch.float32)
    offsets = torch.empty(num_panels * width, dtype=torch.int32)
    bounds = native.pack_codebook_int8(
        panels=panels.data_ptr(), bias=bias.data_ptr(), num_rows=num_rows, dim=dim, out_panels=words.data_ptr(),
        out_columns=columns.data_ptr(), out_offsets=offsets.data_ptr(), num_threads=torch.get_num_threads(),
    )
    return words, columns, offsets, torch.tensor(bounds, dtype=torch.float64)


def _prefilter_operands(codebook, weight, panels, bias, prefilter: str, backend: str):
    """(int8 words, column data, offsets, bounds) for the certified pre-filter of `nearest` / `saq`, or four
    empty tensors (off). Cached on a `Codebook` (rebuilt when its weight changes)."""
    if prefilter not in PREFILTERS:
        raise ValueError(f"prefilter must be one of {PREFILTERS}, got {prefilter!r}")
    off = (_EMPTY, _EMPTY, _EMPTY, _EMPTY)
    if prefilter == "none" or backend != "cpu":
        return off
    if torch.compiler.is_compiling():  # the int8 pack is built outside torch's op table: eager only
        if prefilter == "int8":
            raise RuntimeError("prefilter='int8' is not supported under torch.compile; use 'auto' or 'none'")
        return off
    if os.environ.get(PREFILTER_ENV, "1") == "0":
        return off
    if not int8_prefilter_available():
        if prefilter == "int8":
            raise RuntimeError("prefilter='int8' needs a CPU with AVX512-VNNI and a build with its kernel")
        return off
    if isinstance(codebook, Codebook):
        cached = _INT8_PACKS.get(codebook)
        if cached is None or cached[0] != codebook.weight._version:
            cached = (codebook.weight._version, *_pack_int8(panels, bias, weight.shape[0], weight.shape[1]))
            _INT8_PACKS[codebook] = cached
        return cached[1:]
    return _pack_int8(panels, bias, weight.shape[0], weight.shape[1])


def _first_non_finite_position(z: torch.Tensor) -> int:
    bad = (~torch.isfinite(z)).any(1).reshape(-1)  # [B * g * g]
    return int(bad.nonzero()[0, 0])


def _saq_impl(z, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets,
              prefilter_bounds, sides, mode, backend, check_finite):
    """z [B, D, g, g] -> ids [B, sum_l s_l^2] int64 (layer after layer, raster order)."""
    grid = z.shape[-1]
    if backend == "torch":
        if check_finite and z.numel() and not bool(torch.isfinite(z).all()):
            _native.raise_for_status(1, _first_non_finite_position(z), stage="saq", grid=grid)
        return _ref.saq_reference(z, weight, list(sides), mode)
    if backend == "cpu":
        native = _native.cpu_module()
        ids = torch.empty(z.shape[0], sum(side * side for side in sides), dtype=torch.int64)
        use_prefilter = prefilter_panels.numel() > 0
        code, detail, full_search_rows = native.saq(
            z=z.data_ptr(), z_dtype=_native.DTYPE_TAGS[str(z.dtype).removeprefix("torch.")], batch=z.shape[0],
            dim=z.shape[1], grid=grid, z_strides=z.stride(),
            weight=weight.data_ptr(), num_rows=weight.shape[0], weight_row_stride=weight.stride(0),
            weight_col_stride=weight.stride(1), weight_dtype=_native.DTYPE_TAGS[str(weight.dtype).removeprefix("torch.")],
            panels=panels.data_ptr(), bias=bias.data_ptr(), max_norm=float(norm_bound), sides=list(sides),
            residual=mode == "rq", check_finite=check_finite, num_threads=torch.get_num_threads(),
            out_ids=ids.data_ptr(),
            prefilter_panels=prefilter_panels.data_ptr() if use_prefilter else 0,
            prefilter_columns=prefilter_columns.data_ptr() if use_prefilter else 0,
            prefilter_offsets=prefilter_offsets.data_ptr() if use_prefilter else 0,
            prefilter_bounds=prefilter_bounds.tolist() if use_prefilter else [],
        )  # fmt: skip
        _native.raise_for_status(code, detail, stage="saq", grid=grid)
        _SAQ_STATS.update(queries=ids.numel(), full_search_rows=full_search_rows, prefilter=use_prefilter)
        _CPU_SEARCH_STATS.update(op="saq", **_SAQ_STATS)
        return ids
    if _gpu.is_gpu_backend(backend):  # "cuda" / "triton": exact-mode search, targets fused into the kernels
        return _gpu.saq(z, weight, list(sides), mode, backend, check_finite)
    raise RuntimeError(f"backend {backend!r} has no kernel for this op yet")


@torch.library.custom_op("spae_fast::saq", mutates_args=())
def _saq_op(
    z: torch.Tensor,
    weight: torch.Tensor,
    panels: torch.Tensor,
    bias: torch.Tensor,
    norm_bound: torch.Tensor,
    prefilter_panels: torch.Tensor,
    prefilter_columns: torch.Tensor,
    prefilter_offsets: torch.Tensor,
    prefilter_bounds: torch.Tensor,
    sides: list[int],
    mode: str,
    backend: str,
    check_finite: bool,
) -> torch.Tensor:
    return _saq_impl(
        z, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets, prefilter_bounds,
        sides, mode, backend, check_finite,
    )


@_saq_op.register_fake
def _(z, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets, prefilter_bounds,
      sides, mode, backend, check_finite):  # fmt: skip
    return z.new_empty(z.shape[0], sum(side * side for side in sides), dtype=torch.int64)


def saq(
    z: torch.Tensor,
    codebook: torch.Tensor | Codebook,
    layers: tuple[int, ...] | list[int] = (1, 2, 4, 8, 16, 16),
    *,
    mode: str = "saq",
    backend: str = "auto",
    check_finite: bool = True,
    prefilter: str = "auto",
) -> torch.Tensor:
    """Token ids of every pyramid layer by streaming average quantization, fused (no N x D target, no N x V).

    For layer l (1-based) with side s_l on the g x g grid of ``z`` and a sampled position p
    (rows / cols ``t*i + t - ceil(t/2)``, t = g / s_l):

        z_l(p) = c_l * z(p) - sum_{m<l} e(k_m(Up_m(p))),   k_l(p) = argmin_k ||z_l(p) - e(k)||^2

    with c_l = l for ``mode="saq"`` (the running mean of the chosen embeddings approaches z) or 1 for
    ``mode="rq"`` (residual quantization). Ties go to the lowest row; results are bitwise identical for any
    batch split and thread count. ``spae_fast.SPAEQuantizer`` builds the straight-through latents and the
    commitment loss from these ids.

    Args:
        z: ``[B, D, g, g]`` latents (fp32 / bf16 / fp16, any strides), D = the codebook's dim.
        codebook: ``[V, D]`` tensor or an l2 `Codebook` (packed once: use it for repeated calls).
        layers: layer sides, non-decreasing, each dividing g.
        mode: ``"saq"`` or ``"rq"``.
        backend: ``"auto"``, ``"cpu"`` (native) or ``"torch"`` (reference).
        check_finite: raise ``ValueError`` on NaN / Inf in ``z``.
        prefilter: ``"auto"`` (default: on CPUs with AVX512-VNNI), ``"int8"`` (required) or ``"none"``. The
            certified pre-filter searches with int8 dot products (exact int32 sums), keeps the 64 best rows by
            a rigorous lower bound of their exact score (512 in a second pass where needed), proves that the
            exact winner is among them and rescores the few that can still win with the fp32 kernel; rows it
            cannot certify (more than 512 near-ties) take the full fp32 search.
            The ids are bitwise the same either way; only the speed changes (`last_saq_stats` counts the rows
            that needed the full search). ``SPAE_FAST_PREFILTER=0`` turns it off.

    Returns:
        ids ``[B, sum_l s_l^2]`` int64: layer after layer, raster order inside a layer.
    """
    from .pyramid import TokenPyramid

    if isinstance(codebook, Codebook):
        dim, device = codebook.dim, codebook.device
    else:
        weight = _validate.codebook_weight(codebook, "codebook")
        dim, device = weight.shape[1], weight.device
    z = _validate.latent(z, dim, device)
    pyramid = TokenPyramid(tuple(layers), z.shape[-1])
    if pyramid.num_layers > SAQ_MAX_LAYERS:
        raise ValueError(f"layers has {pyramid.num_layers} layers; the native kernel supports at most {SAQ_MAX_LAYERS}")
    if mode not in SAQ_MODES:
        raise ValueError(f"mode must be one of {SAQ_MODES}, got {mode!r}")
    backend = resolve_backend(backend, z.device)
    weight, panels, bias, norm_bound, metric = _codebook_operands(codebook, "l2", backend)
    prefilter_operands = _prefilter_operands(codebook, weight, panels, bias, prefilter, backend)
    return torch.ops.spae_fast.saq(
        z, weight, panels, bias, norm_bound, *prefilter_operands, list(pyramid.sides), mode, backend, check_finite
    )


# ----------------------------------------------------------------------------------------------------------
# Semantic loss: cross-entropy of the logits -||z - e||^2 / tau over the whole vocabulary with soft targets
# uniform on a candidate set (SPAE-METHOD.md §4), fused: no positions x vocabulary logits
# ----------------------------------------------------------------------------------------------------------

SEMANTIC_REDUCTIONS = ("mean", "sum", "none")
# "default": fp32 operands and accumulation (exact fp32 products); "bf16": the loss of bf16(z) against bf16(E)
# (rounded to nearest even), products exact, fp32 accumulation - twice the multiply-adds per instruction on
# CPUs with AVX512-BF16 (VDPBF16PS), tensor cores in the Triton kernel. See `semantic_loss`.
SEMANTIC_PRECISIONS = ("default", "bf16")


def cpu_has_bf16_semantic_kernel() -> bool:
    """Whether this CPU runs `semantic_loss(precision="bf16")` on its AVX512-BF16 kernel (elsewhere the same
    rounded operands go through the fp32 kernel: the same loss, no speed-up)."""
    return bool(_native.cpu_module().cpu_supports_avx512_bf16())


def pack_semantic_bf16(
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The table prepared for the CPU semantic loss at precision "bf16": ``(weight, panels, bias, norm_bound,
    rows)``, the operands of the ``spae_fast::semantic_loss`` op.

    With the AVX512-BF16 kernel (csrc/semantic_loss_avx512bf16.cpp), G = ceil(V / 64) groups of 64 rows:
    ``panels`` int32 [G, ceil(D / 2), 64], each word the bf16 pair (-2 e_c[2j], -2 e_c[2j + 1]) (-2e is exact
    in bf16); ``rows`` int32 [G, 32, round_up(D, 64)], each word the pair (e_2i[d], e_2i+1[d]); ``bias`` fp32
    [G * 64] = ||bf16(e)||^2, +inf on pad rows; ``weight`` is the table itself (the kernel rounds the rows of
    the candidate sets). Without it: ``weight, panels, bias`` are bf16(E) in fp32 and its fp32 packing, and
    ``rows`` is empty. About ``V * D * 4`` bytes either way."""
    rounded16 = weight.detach().to(torch.bfloat16)
    bad = ~torch.isfinite(rounded16).all(1)  # NaN / Inf, or an fp32 value past bf16's range
    if bool(bad.any()):
        _native.raise_for_status(_native._NON_FINITE_CODEBOOK, int(bad.nonzero()[0, 0]), stage="codebook")
    norms = (rounded16.double() ** 2).sum(1)
    too_large = norms > float(torch.finfo(torch.float32).max)
    if bool(too_large.any()):
        _native.raise_for_status(_native._OVERFLOW, int(too_large.nonzero()[0, 0]), stage="codebook")
    if not cpu_has_bf16_semantic_kernel():
        rounded = rounded16.float()
        panels, bias, norm_bound = torch.ops.spae_fast.pack_codebook(rounded, "l2")
        return rounded, panels, bias, norm_bound, _EMPTY
    num_rows, dim = rounded16.shape
    groups, pairs, dim_pad = -(-num_rows // 64), -(-dim // 2), -(-dim // 64) * 64
    scaled = torch.zeros(groups * 64, 2 * pairs, dtype=torch.bfloat16)
    scaled[:num_rows, :dim] = rounded16 * -2.0  # exact: a power-of-two scaling
    panels = scaled.view(groups, 64, pairs, 2).permute(0, 2, 1, 3).contiguous().view(torch.int32).squeeze(-1)
    padded = torch.zeros(groups * 64, dim_pad, dtype=torch.bfloat16)
    padded[:num_rows, :dim] = rounded16
    rows = padded.view(groups, 32, 2, dim_pad).permute(0, 1, 3, 2).contiguous().view(torch.int32).squeeze(-1)
    bias = torch.full((groups * 64,), float("inf"), dtype=torch.float32)
    bias[:num_rows] = norms.float()
    norm_bound = norms.max().sqrt() * (1.0 + 1e-12)  # the kernel's overflow check, as pack_codebook's bound
    return weight.detach(), panels.contiguous(), bias, norm_bound, rows.contiguous()


_SEMANTIC_BAD_ARGUMENT = {
    1: "sizes or tau",
    2: "a candidate_index entry is out of range [0, V)",
    3: "candidate_offsets is not a valid CSR (offsets[0] = 0, non-decreasing, offsets[-1] = M)",
    4: "a set_of_position entry is out of range [-1, S)",
    5: "precision 'bf16' operands are missing or this CPU has no AVX512-BF16 kernel",
}


def _triton_interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _semantic_triton_usable(device: torch.device) -> tuple[bool, str]:
    """(usable, why not) for the Triton kernel of the semantic loss on tensors of `device` (no Triton import)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed"
    if device.type == "cuda" and not _triton_interpreting():
        return True, ""
    if device.type == "cpu" and _triton_interpreting():
        return True, ""
    return False, f"it needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"


def _semantic_triton_module():
    import importlib

    module = importlib.import_module("spae_fast.triton_kernels.semantic_loss")
    if module.INTERPRET != _triton_interpreting():  # TRITON_INTERPRET changed: re-decorate the kernels
        module = importlib.reload(module)
    return module


def _raise_semantic_status(code: int, detail: int) -> None:
    if code == _native._OK:
        return
    if code == _native._NON_FINITE_QUERY:
        raise ValueError(
            f"z contains NaN or Inf (first bad row {detail} of the flattened [N, D] input); pass "
            "check_finite=False to skip this check (the losses of such rows are then unspecified)"
        )
    if code == _native._OVERFLOW:
        raise ValueError(
            f"z row {detail} is too large for fp32 logits against this codebook at this tau: "
            "(max|e|^2 + 2 |z| max|e|) / tau must stay below 1e37. Rescale z or raise tau."
        )
    if code == _native._BAD_ARGUMENT:
        raise ValueError(f"semantic_loss: {_SEMANTIC_BAD_ARGUMENT.get(detail, 'invalid arguments')}")
    _native.raise_for_status(code, detail, stage="search")


def _semantic_check_finite(z: torch.Tensor, weight: torch.Tensor, check_finite: bool) -> None:
    """The native kernel's input checks, for the torch / triton backends (same exceptions, same rows)."""
    bad = ~torch.isfinite(weight).all(-1)
    if bool(bad.any()):
        _native.raise_for_status(_native._NON_FINITE_CODEBOOK, int(bad.nonzero()[0, 0]), stage="codebook")
    if check_finite and z.numel():
        bad = ~torch.isfinite(z).all(-1)
        if bool(bad.any()):
            _raise_semantic_status(_native._NON_FINITE_QUERY, int(bad.nonzero()[0, 0]))


def _semantic_combine(z, lse, mu, set_mean, set_norm, sizes, set_of_position, tau, compute_grad):
    """loss / grad of every position from the softmax statistics and the set means (GPU backends)."""
    num, dim = z.shape
    if sizes.numel() == 0:
        return lse.new_zeros(num), lse.new_zeros(num if compute_grad else 0, dim)
    sets = set_of_position.clamp_min(0)
    active = (set_of_position >= 0) & (sizes[sets] > 0)
    mean = set_mean[sets]  # [N, D] fp64
    target = (2.0 * (z.double() * mean).sum(1) - set_norm[sets]) / tau
    loss = torch.where(active, lse.double() - target, 0.0).float()
    if not compute_grad:
        return loss, lse.new_zeros(0, dim)
    grad = torch.where(active[:, None], (2.0 / tau) * (mu.double() - mean), 0.0).float()
    return loss, grad


def _semantic_loss_impl(
    z, weight, panels, bias, norm_bound, candidate_index, candidate_offsets, set_of_position, tau, compute_grad,
    backend, check_finite, bf16_rows,
):  # fmt: skip
    """z [N, D] -> (loss [N] fp32, grad [N, D] fp32 or [0, D]); see `semantic_loss`. A ":bf16" suffix on the
    backend selects precision "bf16" (operands from `pack_semantic_bf16` on the CPU)."""
    num, dim = z.shape
    backend, _, precision = backend.partition(":")
    bf16 = precision == "bf16"
    if backend == "torch":
        if bf16:  # the definition: the same loss of the rounded operands
            z, weight = z.bfloat16().float(), weight.bfloat16().float()
        _semantic_check_finite(z, weight, check_finite)
        return _ref.semantic_loss_parts_reference(
            z, weight, candidate_index, candidate_offsets, set_of_position, tau, compute_grad
        )
    if backend == "cpu":
        native = _native.cpu_module()
        bf16_kernel = bf16 and bf16_rows.numel() > 0
        if bf16 and not bf16_kernel:  # no AVX512-BF16: the rounded operands through the fp32 kernel
            z = z.bfloat16().float()
        loss = torch.empty(num, dtype=torch.float32)
        grad = torch.empty(num if compute_grad else 0, dim, dtype=torch.float32)
        code, detail = native.semantic_loss(
            z=z.data_ptr(), num_rows=num, dim=dim, z_row_stride=z.stride(0), z_col_stride=z.stride(1),
            z_dtype=_native.DTYPE_TAGS[str(z.dtype).removeprefix("torch.")],
            weight=weight.data_ptr(), vocab=weight.shape[0], weight_row_stride=weight.stride(0),
            weight_col_stride=weight.stride(1), weight_dtype=_native.DTYPE_TAGS[str(weight.dtype).removeprefix("torch.")],
            panels=0 if bf16_kernel else panels.data_ptr(), bias=0 if bf16_kernel else bias.data_ptr(),
            max_norm=float(norm_bound), candidate_index=candidate_index.data_ptr(),
            num_candidates=candidate_index.numel(), candidate_offsets=candidate_offsets.data_ptr(),
            num_sets=candidate_offsets.numel() - 1, set_of_position=set_of_position.data_ptr(), tau=float(tau),
            compute_grad=compute_grad, check_finite=check_finite, num_threads=torch.get_num_threads(),
            out_loss=loss.data_ptr(), out_grad=grad.data_ptr() if compute_grad else 0,
            bf16_panels=panels.data_ptr() if bf16_kernel else 0, bf16_rows=bf16_rows.data_ptr() if bf16_kernel else 0,
            bf16_bias=bias.data_ptr() if bf16_kernel else 0,
        )  # fmt: skip
        _raise_semantic_status(code, detail)
        return loss, grad
    if backend == "triton":
        if bf16:  # 16-bit operands of one dtype go to the tensor cores; the interpreter gets them as fp32
            z, weight = z.bfloat16(), weight.bfloat16()
            if _triton_interpreting():
                z, weight = z.float(), weight.float()
        _semantic_check_finite(z, weight, check_finite)
        module = _semantic_triton_module()
        lse, mu = module.softmax_stats(z, weight, tau, compute_grad)
        set_mean, set_norm = module.set_means(weight, candidate_index, candidate_offsets)
        sizes = candidate_offsets[1:] - candidate_offsets[:-1]
        return _semantic_combine(z, lse, mu, set_mean, set_norm, sizes, set_of_position, tau, compute_grad)
    raise RuntimeError(f"backend {backend!r} has no semantic_loss kernel; use 'cpu', 'triton' or 'torch'")


@torch.library.custom_op("spae_fast::semantic_loss", mutates_args=())
def _semantic_loss_op(
    z: torch.Tensor,
    weight: torch.Tensor,
    panels: torch.Tensor,
    bias: torch.Tensor,
    norm_bound: torch.Tensor,
    candidate_index: torch.Tensor,
    candidate_offsets: torch.Tensor,
    set_of_position: torch.Tensor,
    tau: float,
    compute_grad: bool,
    backend: str,
    check_finite: bool,
    bf16_rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _semantic_loss_impl(
        z, weight, panels, bias, norm_bound, candidate_index, candidate_offsets, set_of_position, tau,
        compute_grad, backend, check_finite, bf16_rows,
    )  # fmt: skip


@_semantic_loss_op.register_fake
def _(z, weight, panels, bias, norm_bound, candidate_index, candidate_offsets, set_of_position, tau, compute_grad,
      backend, check_finite, bf16_rows):  # fmt: skip
    num, dim = z.shape
    return z.new_empty(num, dtype=torch.float32), z.new_empty(num if compute_grad else 0, dim, dtype=torch.float32)


def _setup_semantic_context(ctx, inputs, output):
    ctx.z_dtype = inputs[0].dtype
    ctx.compute_grad = inputs[9]
    ctx.mark_non_differentiable(output[1])  # the gradient direction: an auxiliary output
    ctx.save_for_backward(output[1])


def _semantic_backward(ctx, grad_loss, grad_direction):
    (direction,) = ctx.saved_tensors  # [N, D] fp32: d loss(p) / d z_p
    if not ctx.compute_grad:
        raise RuntimeError(
            "spae_fast::semantic_loss ran with compute_grad=False, so it has no gradient; call it with "
            "compute_grad=True (spae_fast.semantic_loss does so whenever z requires grad)"
        )
    grad_z = (grad_loss[:, None] * direction).to(ctx.z_dtype)
    return (grad_z,) + (None,) * 12


_semantic_loss_op.register_autograd(_semantic_backward, setup_context=_setup_semantic_context)


def _integer_tensor(value: object, name: str, device: torch.device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64), got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but z and the codebook are on {device}")
    return value.to(torch.int64).contiguous()


def _semantic_candidates(candidate_index, candidate_offsets, set_of_position, positions_shape, num_rows, device):
    """Validated (candidate_index [M], candidate_offsets [S + 1], set_of_position [N]) int64 contiguous."""
    index = _integer_tensor(candidate_index, "candidate_index", device)
    offsets = _integer_tensor(candidate_offsets, "candidate_offsets", device)
    if index.dim() != 1:
        raise ValueError(f"candidate_index must be 1-D [M] (all sets concatenated), got shape {tuple(index.shape)}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"candidate_offsets must be 1-D [S + 1] with S >= 0, got shape {tuple(offsets.shape)}")
    num_sets, num = offsets.numel() - 1, 1
    for size in positions_shape:
        num *= size
    if set_of_position is None:
        if num_sets != num:
            raise ValueError(
                f"without set_of_position every position has its own set, so candidate_offsets needs N + 1 = "
                f"{num + 1} entries; got {num_sets + 1}. Pass set_of_position to share sets between positions"
            )
        sets = torch.arange(num, device=device)
    else:
        sets = _integer_tensor(set_of_position, "set_of_position", device)
        if tuple(sets.shape) not in (tuple(positions_shape), (num,)):
            raise ValueError(
                f"set_of_position must have shape {tuple(positions_shape)} (z without its last dimension) or "
                f"[{num}], got {tuple(sets.shape)}"
            )
        sets = sets.reshape(num)
    if not torch.compiler.is_compiling():  # value checks (the native kernel checks them again)
        if int(offsets[0]) != 0 or int(offsets[-1]) != index.numel():
            raise ValueError(
                f"candidate_offsets must start at 0 and end at M = len(candidate_index) = {index.numel()}, got "
                f"{int(offsets[0])} .. {int(offsets[-1])}"
            )
        if num_sets and bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("candidate_offsets must be non-decreasing")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_rows):
            raise ValueError(
                f"candidate_index holds codebook rows out of range [0, V) = [0, {num_rows}): "
                f"min {int(index.min())}, max {int(index.max())}"
            )
        if num and (int(sets.min()) < -1 or int(sets.max()) >= num_sets):
            raise ValueError(
                f"set_of_position values must be in [-1, S) = [-1, {num_sets}) (-1: no set), got "
                f"{int(sets.min())} .. {int(sets.max())}"
            )
    return index, offsets, sets


def _semantic_backend(backend: str, device: torch.device) -> str:
    """The backend of the semantic loss: "auto" is "cpu" (native) on the CPU and "triton" on CUDA tensors."""
    if backend == "cuda":
        raise RuntimeError("backend 'cuda' has no semantic_loss kernel; use backend='triton' (or 'auto') on CUDA tensors")
    if backend == "auto" and device.type == "cuda":
        return "triton" if _semantic_triton_usable(device)[0] else "torch"
    if backend == "triton":
        usable, why = _semantic_triton_usable(device)
        if not usable:
            raise RuntimeError(f"backend 'triton' cannot run semantic_loss here: {why}")
        return backend
    return resolve_backend(backend, device)


def _semantic_bf16_operands(codebook):
    """`pack_semantic_bf16` of the table; a `Codebook` packs it once and keeps it."""
    if not isinstance(codebook, Codebook):
        return pack_semantic_bf16(_validate.codebook_weight(codebook, "codebook"))
    if not torch.compiler.is_compiling():
        codebook.check_unchanged()
    return codebook.derived("semantic_bf16", lambda: pack_semantic_bf16(codebook.weight))


def _fixed_order_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of a 1-D tensor in fp64 in an order that does not depend on the thread count."""
    width = 1024
    padded = torch.nn.functional.pad(values.double(), (0, (-values.numel()) % width))
    return padded.reshape(-1, width).sum(1).sum()


def semantic_loss(
    z: torch.Tensor,
    codebook: torch.Tensor | Codebook,
    candidate_index: torch.Tensor,
    candidate_offsets: torch.Tensor,
    set_of_position: torch.Tensor | None = None,
    *,
    tau: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    check_finite: bool = True,
    precision: str = "default",
) -> torch.Tensor:
    """SPAE's semantic-guidance loss, fused: no (positions x vocabulary) logits, forward or backward.

    With the logits s_k(p) = -||z_p - e_k||^2 / tau over the whole codebook and the candidate set C(p) of
    position p, the loss of p is

        mean_{c in C(p)} -log softmax_k(s(p))[c]  =  logsumexp_k s_k(p) - mean_{c in C(p)} s_c(p)

    i.e. the cross-entropy with soft targets uniform on C(p). ||z_p||^2 / tau cancels, so it is a linear
    cross-entropy (weight 2E / tau, bias -||e||^2 / tau), and mean_c s_c needs only the set's mean embedding.
    One streaming pass over the vocabulary computes the logsumexp online and, when ``z`` requires grad, the
    softmax-weighted embedding sum, so the backward is d loss(p) / d z_p = (2 / tau) (sum_k softmax_k e_k
    - mean_{c in C(p)} e_c), a scaling of a saved [N, D] tensor (no second pass over the vocabulary). The
    codebook is frozen: no gradient flows to it; first derivatives only (no double backward). The per-position
    values of the native ("cpu", for a given micro-kernel) and Triton kernels are bitwise identical for any
    thread count, grid and batch split; the reductions sum in a fixed order. Extra memory of the native
    kernel: O(N D + S D + V + M) plus ~1.5 MiB per thread and the fp32 partial sums of the sets that one
    64-row vocabulary group touches; nothing of size N x V.

    Args:
        z: ``[..., D]`` positions (for SPAE the layer targets z_l(p) of the sampled positions), fp32 / bf16 /
            fp16, any strides; accumulation is fp32.
        codebook: ``[V, D]`` tensor or an l2 `Codebook` (packed once: use it for repeated calls; a plain
            tensor is packed on every call on the CPU).
        candidate_index: ``[M]`` integer codebook rows of all candidate sets, concatenated.
        candidate_offsets: ``[S + 1]`` integer: set s is ``candidate_index[offsets[s] : offsets[s + 1]]``
            (CSR). Duplicates count as often as they appear; a set may be empty.
        set_of_position: ``[...]`` (z's leading shape) or ``[N]`` integer set of each position, -1 for none.
            Default: position p uses set p (then S must equal N). Positions share sets per image and layer in
            SPAE: see `spae_fast.semantic.candidates_from_relevance` and `pyramid_set_of_position`, or
            `semantic_loss_from_sets` for a list of sets.
        tau: temperature, finite and > 0.
        reduction: ``"mean"`` over the positions that have a non-empty set (positions without one are
            excluded; 0 when none has), ``"sum"``, or ``"none"``: the loss of every position, shape
            ``z.shape[:-1]``, 0 at excluded positions.
        backend: ``"auto"``, ``"cpu"`` (native), ``"torch"`` (reference), ``"triton"`` (CUDA tensors, or CPU
            tensors with TRITON_INTERPRET=1).
        check_finite: raise ``ValueError`` on NaN / Inf in ``z``.
        precision: ``"default"``: fp32 products and accumulation (16-bit inputs are exact in fp32).
            ``"bf16"``: the loss of bf16(z) against bf16(E), both rounded to nearest even: every product is
            exact, accumulation stays fp32, and the softmax weights that form the gradient's weighted embedding
            sum are rounded to bf16 too; the gradient is applied to ``z`` as if the rounding were the identity
            (straight-through). On CPUs with AVX512-BF16 (``cpu_has_bf16_semantic_kernel()``) this runs at
            twice the multiply-adds per instruction of fp32 (about 2x faster; a `Codebook` caches the bf16
            packing, V * D * 4 bytes, on first use); elsewhere the rounded operands go through the fp32
            kernel (same loss, no speed-up). On CUDA the Triton kernel feeds bf16 operands to the tensor
            cores. The error against the fp32 loss is that of rounding z and E to 8 significant bits: about
            2^-9 |z| |e| / tau per logit (see docs/DECISIONS.md for measured values). Training code that can
            afford it (the semantic term is a guidance loss) should use it; the trainer does by default.

    Returns:
        fp32 loss: a scalar (``"mean"`` / ``"sum"``) or per position (``"none"``).
    """
    if isinstance(codebook, Codebook):
        if codebook.metric != "l2":
            raise ValueError(
                f"semantic_loss needs an l2 Codebook (its logits are squared L2 distances), got metric="
                f"{codebook.metric!r}"
            )
        dim, device, num_rows = codebook.dim, codebook.device, codebook.num_rows
    else:
        weight = _validate.codebook_weight(codebook, "codebook")
        dim, device, num_rows = weight.shape[1], weight.device, weight.shape[0]
    z = _validate.queries(z, dim, device, "z")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a number, got {type(tau).__name__}")
    if not 0.0 < float(tau) < float("inf"):  # also rejects NaN
        raise ValueError(f"tau must be finite and > 0, got {tau}")
    if reduction not in SEMANTIC_REDUCTIONS:
        raise ValueError(f"reduction must be one of {SEMANTIC_REDUCTIONS}, got {reduction!r}")
    if precision not in SEMANTIC_PRECISIONS:
        raise ValueError(f"precision must be one of {SEMANTIC_PRECISIONS}, got {precision!r}")
    positions_shape = tuple(z.shape[:-1])
    index, offsets, sets = _semantic_candidates(
        candidate_index, candidate_offsets, set_of_position, positions_shape, num_rows, device
    )
    backend = _semantic_backend(backend, z.device)
    if precision == "bf16" and backend == "cpu":
        weight, panels, bias, norm_bound, bf16_rows = _semantic_bf16_operands(codebook)
    else:
        weight, panels, bias, norm_bound, _ = _codebook_operands(codebook, "l2", backend)
        bf16_rows = _EMPTY
    if precision == "bf16":
        backend = f"{backend}:bf16"
    flat = z.reshape(-1, dim)
    compute_grad = torch.is_grad_enabled() and z.requires_grad
    loss, _ = torch.ops.spae_fast.semantic_loss(
        flat, weight, panels, bias, norm_bound, index, offsets, sets, float(tau), compute_grad, backend, check_finite,
        bf16_rows,
    )  # fmt: skip
    if reduction == "none":
        return loss.reshape(positions_shape)
    total = _fixed_order_sum(loss)
    if reduction == "sum":
        return total.float()
    sizes = offsets[1:] - offsets[:-1]
    if sizes.numel() == 0:
        return total.float()  # no sets: every position is excluded, the loss is 0
    count = ((sets >= 0) & (sizes[sets.clamp_min(0)] > 0)).sum()
    return (total / count.clamp_min(1)).float()


def semantic_loss_from_sets(
    z: torch.Tensor,
    codebook: torch.Tensor | Codebook,
    candidate_sets: list[torch.Tensor],
    set_of_position: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """`semantic_loss` with the candidate sets as a list of S integer tensors (codebook rows) and the set of
    every position (``[...]`` or ``[N]``, values in [-1, S)); keyword arguments as `semantic_loss`."""
    from .semantic import pack_candidate_sets

    index, offsets = pack_candidate_sets(candidate_sets)
    device = z.device if isinstance(z, torch.Tensor) else index.device
    return semantic_loss(z, codebook, index.to(device), offsets.to(device), set_of_position, **kwargs)
