"""What every op shares: the codebook operands the kernels take, and the stats of the last call.

Codebook operands. The native CPU kernels read the table as packed panels of 16 rows
(``spae_fast::pack_codebook``: panel p, dim d, column c holds s * e[16 p + c][d], s = -2 for l2, -1 for ip,
-1 / max(|e|, 1e-12) for cosine; per-row bias ||e||^2 for l2, 0 otherwise, +inf on pad rows). The panels
are fp32, except for bf16 / fp16 tables with metric l2 / ip, which keep their own dtype (half the bytes; the
kernels widen them exactly, so every result is bitwise that of fp32 panels; `panel_dtype`). The
certified pre-filter of `nearest` / `saq` reads an int8 copy of those panels (`prefilter_operands`) and
`semantic_loss(precision="bf16")` reads a bf16 packing (`pack_semantic_bf16`). A `Codebook` builds each
once and keeps it; a plain tensor is packed per call. Other backends take the table as it is; the GPU ones
prepare their own operands the same way (`gpu_search.operands`: kept by a Codebook, per call otherwise).

Argument checks live in `spae_fast._validate` and status codes become exceptions in
`spae_fast._native.raise_for_status`, both shared with the rest of the package.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import torch

from .. import _native, _validate
from ..codebook import Codebook
from . import boundary

EMPTY = torch.empty(0)
PREFILTERS = ("auto", "int8", "none")  # the certified int8 pre-filter of `nearest`, `topk` and `saq`
PREFILTER_MAX_K = 16  # the largest k the pre-filter serves (csrc/nearest/nearest.h: kMaxPrefilterK)
PREFILTER_ENV = "SPAE_FAST_PREFILTER"  # "0": never use the int8 pre-filter (auto and int8 fall back to fp32)


# ----------------------------------------------------------------------------------------------------------
# Stats of the last call
# ----------------------------------------------------------------------------------------------------------

SAQ_STATS = {"queries": 0, "full_search_rows": 0, "prefilter": False}
CPU_SEARCH_STATS = {"op": None, "queries": 0, "full_search_rows": 0, "prefilter": False}


def last_saq_stats() -> dict:
    """Of the last native `saq` call: ``queries`` (positions searched, all layers), ``prefilter`` (whether the
    certified int8 pre-filter ran) and ``full_search_rows`` (queries its certificate could not settle, which
    took the full fp32 search; all of them without the pre-filter)."""
    return dict(SAQ_STATS)


def last_cpu_search_stats() -> dict:
    """Of the last native CPU search (``op``: ``"nearest"``, ``"topk"`` or ``"saq"``): ``queries`` (rows
    searched; all layers for saq), ``prefilter`` (whether the certified int8 pre-filter ran) and
    ``full_search_rows`` (queries its certificate could not settle, which took the full fp32 search; all of
    them without the pre-filter)."""
    return dict(CPU_SEARCH_STATS)


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


GPU_STATS = threading.local()


def last_search_stats() -> SearchStats | None:
    """Stats of this thread's last GPU `nearest` / `topk` call (None before the first one)."""
    return getattr(GPU_STATS, "value", None)


# ----------------------------------------------------------------------------------------------------------
# fp32 panels of the native kernels
# ----------------------------------------------------------------------------------------------------------


NARROW_PANEL_METRICS = ("l2", "ip")  # cosine's -e/|e| is not exact in bf16 / fp16: fp32 panels


def panel_dtype(table_dtype: torch.dtype, metric: str, narrow: bool = True) -> torch.dtype:
    """The dtype `pack_codebook` packs a table of `table_dtype` in: the table's own bf16 / fp16 for metric l2 /
    ip (the metric's scaling by -2 or -1 is exact there; fp16 l2 panels hold -e and the kernels double it, since
    -2e can overflow fp16), fp32 otherwise or when `narrow` is False. Either way the kernels multiply with the
    same fp32 values, so results do not depend on it (csrc/common/spae_native.h, PanelFormat)."""
    if narrow and table_dtype in (torch.bfloat16, torch.float16) and metric in NARROW_PANEL_METRICS:
        return table_dtype
    return torch.float32


@torch.library.custom_op("spae_fast::pack_codebook", mutates_args=())
def _pack_codebook(
    weight: torch.Tensor, metric: str, narrow: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [V, D] -> (panels [ceil(V/16), D, 16] of `panel_dtype(weight.dtype, metric, narrow)`, bias
    [ceil(V/16)*16] fp32, norm bound [] fp64). narrow=False: fp32 panels for any table."""
    _check_pack(weight, metric, narrow)
    num_panels = -(-weight.shape[0] // _native.cpu_module().PANEL_WIDTH)
    panels = torch.empty(num_panels, weight.shape[1], 16, dtype=panel_dtype(weight.dtype, metric, narrow))
    bias = torch.empty(num_panels * 16, dtype=torch.float32)
    return panels, bias, _pack_into(weight, metric, panels, bias)


def pack_codebook_into(
    weight: torch.Tensor, metric: str, panels: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """`pack_codebook` into existing panels / bias (their dtype chooses the panel format; `Codebook.repack_`:
    no fresh pages to fault in). Returns the norm bound []. Raises as `pack_codebook` for a non-finite or
    overflowing row, leaving the buffers' contents unspecified."""
    _check_pack(weight, metric, panels.dtype != torch.float32)
    num_panels = -(-weight.shape[0] // 16)
    expected_dtype = panel_dtype(weight.dtype, metric, panels.dtype != torch.float32)
    if panels.shape != (num_panels, weight.shape[1], 16) or panels.dtype != expected_dtype:
        raise ValueError(f"panels must be [{num_panels}, {weight.shape[1]}, 16] {expected_dtype} for this table, "
                         f"got {list(panels.shape)} {panels.dtype}")  # fmt: skip
    if bias.shape != (num_panels * 16,) or bias.dtype != torch.float32:
        raise ValueError(f"bias must be [{num_panels * 16}] float32, got {list(bias.shape)} {bias.dtype}")
    if not (panels.is_contiguous() and bias.is_contiguous()):
        raise ValueError("panels and bias must be contiguous")
    return _pack_into(weight, metric, panels, bias)


def _pack_into(weight, metric, panels, bias) -> torch.Tensor:
    native = _native.cpu_module()
    num_rows, dim = weight.shape
    code, detail, max_norm = native.pack_codebook(
        weight=_native.buffer(weight), num_rows=num_rows, dim=dim,
        weight_row_stride=weight.stride(0), weight_col_stride=weight.stride(1),
        weight_dtype=_native.DTYPE_TAGS[str(weight.dtype).removeprefix("torch.")],
        metric=_native.METRIC_TAGS[metric], out_panels=_native.buffer(panels),
        out_panels_dtype=_native.DTYPE_TAGS[str(panels.dtype).removeprefix("torch.")], out_bias=_native.buffer(bias),
        num_threads=torch.get_num_threads(),
    )  # fmt: skip
    _native.raise_for_status(code, detail, stage="codebook")
    return torch.tensor(max_norm, dtype=torch.float64)


def _check_pack(weight, metric, narrow):
    boundary.table("pack_codebook", weight)
    boundary.choice("pack_codebook", metric, "metric", _validate.METRICS)
    boundary.flag("pack_codebook", narrow, "narrow")
    if weight.device.type != "cpu":
        raise ValueError(f"spae_fast::pack_codebook: weight must be on the CPU (it packs for the native kernel), "
                         f"got {weight.device}")  # fmt: skip


@_pack_codebook.register_fake
def _(weight, metric, narrow=True):
    _check_pack(weight, metric, narrow)
    num_panels = -(-weight.shape[0] // 16)
    return (
        weight.new_empty(num_panels, weight.shape[1], 16, dtype=panel_dtype(weight.dtype, metric, narrow)),
        weight.new_empty(num_panels * 16, dtype=torch.float32),
        weight.new_empty((), dtype=torch.float64),
    )


def codebook_operands(codebook, metric: str | None, backend: str, *, rows_needed: bool = True):
    """(weight, panels, bias, norm_bound, metric) for the op, packing a plain tensor when the backend needs it.

    A `Codebook` built with ``keep_weight=False`` gives an exact unpack of its table as ``weight``, or, when
    the native search is all that reads it (backend "cpu" and ``rows_needed`` False: no autograd), a
    stand-in of the table's shape and dtype with zero strides (one element): the native search then reads
    the rows it rescores from the panels (`native_table`)."""
    if isinstance(codebook, Codebook):
        if metric is not None and metric != codebook.metric:
            raise ValueError(
                f"metric={metric!r} differs from the Codebook's metric {codebook.metric!r}; "
                "build the Codebook with the metric you search with"
            )
        if not torch.compiler.is_compiling():
            codebook.check_unchanged()
        if backend == "cpu":
            weight = codebook.weight if codebook.keeps_weight or rows_needed else _stand_in(codebook)
            return weight, codebook.cpu_panels, codebook.cpu_bias, codebook.cpu_norm_bound, codebook.metric
        # a packed-only Codebook (CPU only: the torch / triton backends) unpacks its table for this call
        if codebook.keeps_weight and not torch.compiler.is_compiling():  # dynamo cannot trace the weak map
            from . import gpu_search  # imports this module

            gpu_search.lend(codebook)  # the GPU kernels keep what they prepare of the table in the Codebook
        return codebook.weight, EMPTY, EMPTY, EMPTY, codebook.metric
    weight = _validate.codebook_weight(codebook, "codebook")
    metric = _validate.metric("l2" if metric is None else metric)
    if backend == "cpu":
        panels, bias, norm_bound = torch.ops.spae_fast.pack_codebook(weight.detach(), metric)
        return weight.detach(), panels, bias, norm_bound, metric
    return weight.detach(), EMPTY, EMPTY, EMPTY, metric


def _stand_in(codebook: Codebook) -> torch.Tensor:
    return torch.zeros((), dtype=codebook.dtype).expand(codebook.num_rows, codebook.dim)


def native_table(weight: torch.Tensor) -> tuple[int, int]:
    """The table operand of the native search: the rescoring of its candidates reads l2 rows from the table
    when given (one contiguous row each) and from the packed panels otherwise, the same values either way. A
    table with all-zero strides (`codebook_operands`' stand-in, or one row broadcast) is not given: its rows
    are read from the panels."""
    return _native.NO_BUFFER if weight.stride() == (0, 0) else _native.buffer(weight)


def codebook_shape(codebook) -> tuple[int, torch.device, int]:
    """(D, device, V) of a `Codebook` or a validated plain [V, D] tensor."""
    if isinstance(codebook, Codebook):
        return codebook.dim, codebook.device, codebook.num_rows
    weight = _validate.codebook_weight(codebook, "codebook")
    return weight.shape[1], weight.device, weight.shape[0]


# ----------------------------------------------------------------------------------------------------------
# int8 copy for the certified pre-filter (nearest, saq)
# ----------------------------------------------------------------------------------------------------------


def int8_prefilter_available() -> bool:
    """Whether this CPU and build run the certified AVX512-VNNI pre-filter (nearest and SAQ searches)."""
    native = _native._C
    return (
        native is not None
        and hasattr(native, "cpu_supports_avx512_vnni")
        and native.cpu_supports_avx512_vnni()
    )


def _pack_int8(
    panels: torch.Tensor, bias: torch.Tensor, num_rows: int, dim: int, metric: str = "l2", out=None
):
    """int8 copy of the packed panels (any panel dtype: it quantises their fp32 values): (words
    [ceil(V/16), ceil(D/4), 16] int32, column data [ceil(V/16), 4, 16] fp32, offsets [ceil(V/16) * 16] int32,
    bounds [4] fp64); see csrc/nearest/nearest.h. out: an earlier copy of the same shapes to write into."""
    native = _native.cpu_module()
    width = native.INT8_PANEL_WIDTH
    num_panels = -(-num_rows // width)
    if out is None:
        words = torch.empty(num_panels, (dim + 3) // 4, width, dtype=torch.int32)
        columns = torch.empty(num_panels, 4, width, dtype=torch.float32)
        offsets = torch.empty(num_panels * width, dtype=torch.int32)
    else:
        words, columns, offsets = out[:3]
    bounds = native.pack_codebook_int8(
        panels=_native.buffer(panels),
        panels_dtype=_native.DTYPE_TAGS[str(panels.dtype).removeprefix("torch.")],
        metric=_native.METRIC_TAGS[metric],
        bias=_native.buffer(bias),
        num_rows=num_rows,
        dim=dim,
        out_panels=_native.buffer(words),
        out_columns=_native.buffer(columns),
        out_offsets=_native.buffer(offsets),
        num_threads=torch.get_num_threads(),
    )
    return words, columns, offsets, torch.tensor(bounds, dtype=torch.float64)


def _refresh_int8(codebook: Codebook, old):
    """The int8 copy of a re-packed `Codebook` (`Codebook.repack_`), written into the old copy's storage."""
    return _pack_int8(
        codebook.cpu_panels, codebook.cpu_bias, codebook.num_rows, codebook.dim, codebook.metric, old
    )


def check_prefilter(prefilter: object) -> str:
    if prefilter not in PREFILTERS:
        raise ValueError(f"prefilter must be one of {PREFILTERS}, got {prefilter!r}")
    return prefilter  # type: ignore[return-value]


def prefilter_operands(codebook, weight, panels, bias, prefilter: str, backend: str, metric: str = "l2"):
    """(int8 words, column data, offsets, bounds) for the certified pre-filter of `nearest` / `topk` / `saq`, or
    four empty tensors (off). A `Codebook` builds them once and keeps them (it refuses to search a table changed
    in place). metric: the one `panels` were packed for (a `Codebook`'s own is used for a `Codebook`)."""
    check_prefilter(prefilter)
    off = (EMPTY, EMPTY, EMPTY, EMPTY)
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
    if isinstance(codebook, Codebook):  # built once (`codebook_operands` has checked the table is unchanged)
        return codebook.derived(
            "int8_prefilter",
            lambda: _pack_int8(panels, bias, *weight.shape, codebook.metric),
            refresh=_refresh_int8,
        )
    return _pack_int8(panels, bias, weight.shape[0], weight.shape[1], metric)


# ----------------------------------------------------------------------------------------------------------
# bf16 packing of the semantic loss (precision "bf16" on the CPU)
# ----------------------------------------------------------------------------------------------------------


def cpu_has_bf16_semantic_kernel() -> bool:
    """Whether this CPU runs `semantic_loss(precision="bf16")` on its AVX512-BF16 kernel (elsewhere the same
    rounded operands go through the fp32 kernel: the same loss, no speed-up)."""
    return bool(_native.cpu_module().cpu_supports_avx512_bf16())


def pack_semantic_bf16(
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The table prepared for the CPU semantic loss at precision "bf16": ``(weight, panels, bias, norm_bound,
    rows)``, the operands of the ``spae_fast::semantic_loss`` op.

    With the AVX512-BF16 kernel (csrc/semantic_loss/semantic_loss_avx512bf16.cpp), G = ceil(V / 64) groups of 64 rows:
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
        return rounded, panels, bias, norm_bound, EMPTY
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


def semantic_bf16_operands(codebook):
    """`pack_semantic_bf16` of the table; a `Codebook` packs it once and keeps it."""
    if not isinstance(codebook, Codebook):
        return pack_semantic_bf16(_validate.codebook_weight(codebook, "codebook"))
    if not torch.compiler.is_compiling():
        codebook.check_unchanged()
    return codebook.derived("semantic_bf16", lambda: pack_semantic_bf16(codebook.weight))


# ----------------------------------------------------------------------------------------------------------
# Status codes of the semantic loss (its own messages: the rows are positions, the arguments CSR sets)
# ----------------------------------------------------------------------------------------------------------

_SEMANTIC_BAD_ARGUMENT = {
    1: "sizes or tau",
    2: "a candidate_index entry is out of range [0, V)",
    3: "candidate_offsets is not a valid CSR (offsets[0] = 0, non-decreasing, offsets[-1] = M)",
    4: "a set_of_position entry is out of range [-1, S)",
    5: "precision 'bf16' operands are missing or this CPU has no AVX512-BF16 kernel",
}


def raise_semantic_status(code: int, detail: int) -> None:
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


def semantic_check_finite(z: torch.Tensor, weight: torch.Tensor, check_finite: bool) -> None:
    """The native kernel's input checks, for the torch / triton backends (same exceptions, same rows)."""
    bad = ~torch.isfinite(weight).all(-1)
    if bool(bad.any()):
        _native.raise_for_status(_native._NON_FINITE_CODEBOOK, int(bad.nonzero()[0, 0]), stage="codebook")
    if check_finite and z.numel():
        bad = ~torch.isfinite(z).all(-1)
        if bool(bad.any()):
            raise_semantic_status(_native._NON_FINITE_QUERY, int(bad.nonzero()[0, 0]))
