"""Streaming average / residual quantization over a token pyramid (SPAE-METHOD.md §2-3): op
``spae_fast::saq`` and its public function `saq`. Spec: `spae_fast._ref.saq_reference`.

For layer l (1-based) with side s_l and a sampled position p of the g x g grid, the target is
z_l(p) = c_l z(p) - sum_{m<l} e(k_m(Up_m(p))) (c_l = l for SAQ, 1 for RQ) and the token is its l2 argmin
over the codebook, ties to the lowest row. One op call runs every layer: the targets are formed while the
search packs its query blocks, so there is no N x D target and no N x V matrix.

Kernels per device: "cpu" runs the native SAQ (backend "cpu", with the certified int8 pre-filter), the
Triton interpreter (backend "triton" under TRITON_INTERPRET=1) or the reference; "cuda" runs `gpu_saq`
(backends "cuda" / "triton") or the reference; any other device runs the reference (backend "torch").
The ids are integers: no autograd rule (`spae_fast.SPAEQuantizer` builds the straight-through latents).
"""

from __future__ import annotations

import torch

from .. import _native, _ref, _validate
from ..codebook import Codebook
from ..pyramid import TokenPyramid
from . import boundary, common, gpu_saq
from .backends import BACKENDS, GPU_BACKENDS, resolve_backend

SAQ_MODES = ("saq", "rq")
SAQ_MAX_LAYERS = boundary.MAX_SAQ_LAYERS  # every backend (the CUDA kernel's limit; the CPU kernel takes 64)


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
    """z [B, D, g, g] -> ids [B, sum_l s_l^2] int64 (layer after layer, raster order). Operands as
    ``spae_fast::nearest``'s."""
    _check_operands(z, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets,
                    prefilter_bounds, sides, mode, backend, check_finite)  # fmt: skip
    return _reference(z, weight, sides, mode, backend, check_finite)


@_saq_op.register_fake
def _(z, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets, prefilter_bounds,
      sides, mode, backend, check_finite):  # fmt: skip
    _check_operands(z, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets,
                    prefilter_bounds, sides, mode, backend, check_finite)  # fmt: skip
    return z.new_empty(z.shape[0], sum(side * side for side in sides), dtype=torch.int64)


def _check_operands(z, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets,
                    prefilter_bounds, sides, mode, backend, check_finite):  # fmt: skip
    """The boundary of ``spae_fast::saq`` (see `boundary`): every kernel runs it first."""
    num_rows, dim = boundary.table("saq", weight)
    z = boundary.tensor("saq", z, "z", ndim=4, dtypes=_validate.SUPPORTED_DTYPES)
    batch, channels, height, width = z.shape
    if channels != dim:
        raise ValueError(f"spae_fast::saq: z has {channels} channels (shape {tuple(z.shape)}), but the table has "
                         f"D = {dim}")  # fmt: skip
    if height != width or height < 1:
        raise ValueError(f"spae_fast::saq: z must be a square grid [B, D, g, g] with g >= 1, got {tuple(z.shape)}")
    if batch * height * width > boundary.MAX_QUERIES:
        raise ValueError(f"spae_fast::saq: z has {batch * height * width} positions; at most {boundary.MAX_QUERIES}")
    boundary.same_device("saq", z, "z", weight.device)
    if len(sides) > SAQ_MAX_LAYERS:
        raise ValueError(f"spae_fast::saq: {len(sides)} layers; every backend supports at most {SAQ_MAX_LAYERS}")
    if isinstance(height, int):  # a symbolic grid (dynamic shapes in a fake pass) is checked when the kernel runs
        try:
            TokenPyramid(tuple(sides), height)
        except ValueError as error:
            fit = f"sides {list(sides)} do not fit the {height} x {height} grid"
            raise ValueError(f"spae_fast::saq: {fit}: {error}") from None
    boundary.choice("saq", mode, "mode", SAQ_MODES)
    boundary.choice("saq", backend, "backend", BACKENDS[1:])
    boundary.flag("saq", check_finite, "check_finite")
    if backend == "cpu":
        boundary.cpu_panels("saq", panels, bias, norm_bound, num_rows, dim, weight.dtype, "l2")
    on = boundary.prefilter("saq", prefilter_panels, prefilter_columns, prefilter_offsets, prefilter_bounds,
                            num_rows, dim)  # fmt: skip
    if on and backend != "cpu":
        raise ValueError("spae_fast::saq: the int8 pre-filter operands serve backend 'cpu' only")


def _first_non_finite_position(z: torch.Tensor) -> int:
    bad = (~torch.isfinite(z)).any(1).reshape(-1)  # [B * g * g]
    return int(bad.nonzero()[0, 0])


def _reference(z, weight, sides, mode, backend, check_finite):
    """Backend "torch" (any device): the reference, behind the native kernel's finiteness check."""
    if backend != "torch":
        raise RuntimeError(f"backend {backend!r} has no saq kernel for tensors on {z.device}")
    if check_finite and z.numel() and not bool(torch.isfinite(z).all()):
        _native.raise_for_status(1, _first_non_finite_position(z), stage="saq", grid=z.shape[-1])
    return _ref.saq_reference(z, weight, list(sides), mode)


@_saq_op.register_kernel("cpu")
def _saq_cpu(z, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets,
             prefilter_bounds, sides, mode, backend, check_finite):  # fmt: skip
    _check_operands(z, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets,
                    prefilter_bounds, sides, mode, backend, check_finite)  # fmt: skip
    if backend == "cpu":
        operands = (prefilter_panels, prefilter_columns, prefilter_offsets, prefilter_bounds)
        return _native_saq(z, weight, panels, bias, norm_bound, operands, sides, mode, check_finite)
    if backend == "triton":  # CPU tensors under TRITON_INTERPRET=1
        return gpu_saq.saq(z, weight, list(sides), mode, backend, check_finite)
    return _reference(z, weight, sides, mode, backend, check_finite)


@_saq_op.register_kernel("cuda")
def _saq_cuda(z, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets,
              prefilter_bounds, sides, mode, backend, check_finite):  # fmt: skip
    _check_operands(z, weight, panels, bias, norm_bound, prefilter_panels, prefilter_columns, prefilter_offsets,
                    prefilter_bounds, sides, mode, backend, check_finite)  # fmt: skip
    if backend in GPU_BACKENDS:  # exact-mode search, targets fused into the kernels
        return gpu_saq.saq(z, weight, list(sides), mode, backend, check_finite)
    return _reference(z, weight, sides, mode, backend, check_finite)


def _native_saq(z, weight, panels, bias, norm_bound, prefilter_operands, sides, mode, check_finite):
    """The native CPU SAQ (``_C.saq``); `prefilter_operands` empty: no pre-filter."""
    prefilter_panels, prefilter_columns, prefilter_offsets, prefilter_bounds = prefilter_operands
    grid = z.shape[-1]
    native = _native.cpu_module()
    ids = torch.empty(z.shape[0], sum(side * side for side in sides), dtype=torch.int64)
    use_prefilter = prefilter_panels.numel() > 0
    code, detail, full_search_rows = native.saq(
        z=_native.buffer(z), z_dtype=_native.DTYPE_TAGS[str(z.dtype).removeprefix("torch.")], batch=z.shape[0],
        dim=z.shape[1], grid=grid, z_strides=z.stride(),
        weight=_native.buffer(weight), num_rows=weight.shape[0], weight_row_stride=weight.stride(0),
        weight_col_stride=weight.stride(1), weight_dtype=_native.DTYPE_TAGS[str(weight.dtype).removeprefix("torch.")],
        panels=_native.buffer(panels), panels_dtype=_native.DTYPE_TAGS[str(panels.dtype).removeprefix("torch.")],
        bias=_native.buffer(bias), max_norm=float(norm_bound), sides=list(sides),
        residual=mode == "rq", check_finite=check_finite, num_threads=torch.get_num_threads(),
        out_ids=_native.buffer(ids),
        prefilter_panels=_native.buffer(prefilter_panels) if use_prefilter else _native.NO_BUFFER,
        prefilter_columns=_native.buffer(prefilter_columns) if use_prefilter else _native.NO_BUFFER,
        prefilter_offsets=_native.buffer(prefilter_offsets) if use_prefilter else _native.NO_BUFFER,
        prefilter_bounds=prefilter_bounds.tolist() if use_prefilter else [],
    )  # fmt: skip
    _native.raise_for_status(code, detail, stage="saq", grid=grid)
    common.SAQ_STATS.update(queries=ids.numel(), full_search_rows=full_search_rows, prefilter=use_prefilter)
    common.CPU_SEARCH_STATS.update(op="saq", **common.SAQ_STATS)
    return ids


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
    _validate.flag(check_finite, "check_finite")
    dim, device, _ = common.codebook_shape(codebook)
    z = _validate.latent(z, dim, device)
    pyramid = TokenPyramid(layers, z.shape[-1])
    if pyramid.num_layers > SAQ_MAX_LAYERS:
        raise ValueError(f"layers has {pyramid.num_layers} layers; every backend supports at most {SAQ_MAX_LAYERS}")
    if mode not in SAQ_MODES:
        raise ValueError(f"mode must be one of {SAQ_MODES}, got {mode!r}")
    backend = resolve_backend(backend, z.device)
    weight, panels, bias, norm_bound, _ = common.codebook_operands(codebook, "l2", backend)
    prefilter_operands = common.prefilter_operands(codebook, weight, panels, bias, prefilter, backend)
    return torch.ops.spae_fast.saq(
        z, weight, panels, bias, norm_bound, *prefilter_operands, list(pyramid.sides), mode, backend, check_finite
    )
