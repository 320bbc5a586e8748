"""The boundary of every registered op: the limits all backends share, and the operand checks each op's
kernels run first, whatever called them (the public functions, `torch.compile` graphs or a direct
``torch.ops.spae_fast.*`` call).

A registered op is public: its operands may come from anywhere, so no kernel trusts them. Before any
native or GPU code runs, each op module calls these checks on its operands: tensor kinds, dtypes, ranks,
devices, the shapes that tie the packed forms (panels, bias, the int8 pre-filter copy, the bf16 packing) to
the table, index arrays against the sizes they index, and the limits below. A failure raises ``ValueError``
or ``TypeError`` naming the op, the operand and what was expected. The checks read shapes and metadata
only (O(1) per call); data-dependent checks (non-finite values, candidate indices in range) stay in the
kernels, which report them through status codes. The native entry points check again, as a second line
(csrc/common/keyword_args.h: sizes, addresses, D and V bounds).

Limits, the same for every backend (README, "Limits"):

    D (dims per row)     <= MAX_DIM = 65536     the int8 pre-filter sums D products of |255 * 127| in int32
                                                 (exact up to D = 66311), and its row offsets 128 * sum q
    V (codebook rows)    <= MAX_ROWS = 2^31 - 2^16   GPU kernels index rows in int32 and pad V to tiles
    N (queries), positions <= MAX_QUERIES = 2^31 - 2^16   the same int32 row indices on the GPU
    SAQ layers           <= MAX_SAQ_LAYERS = 16  the CUDA kernel keeps one token per layer per row on chip
"""

from __future__ import annotations

import torch

from .._validate import MAX_DIM, MAX_QUERIES, MAX_ROWS, SUPPORTED_DTYPES

MAX_SAQ_LAYERS = 16
PANEL_WIDTH = 16  # rows per fp32 / int8 panel (csrc/common/spae_native.h: kPanelWidth, kInt8PanelWidth)
BF16_GROUP_ROWS = 64  # rows per group of the semantic loss's bf16 packing (kSemanticGroupCols)


def _fail(op: str, message: str, kind: type[Exception] = ValueError) -> None:
    raise kind(f"spae_fast::{op}: {message}")


def flag(op: str, value: object, name: str) -> bool:
    if not isinstance(value, bool):
        _fail(op, f"{name} must be a bool, got {type(value).__name__} {value!r}", TypeError)
    return value


def choice(op: str, value: object, name: str, options: tuple[str, ...]) -> str:
    if value not in options:
        _fail(op, f"{name} must be one of {options}, got {value!r}")
    return value  # type: ignore[return-value]


def tensor(op: str, value: object, name: str, *, ndim: int, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """A tensor of rank `ndim` and one of `dtypes`."""
    if not isinstance(value, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(value).__name__}", TypeError)
    if value.dim() != ndim:
        _fail(op, f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        _fail(op, f"{name} must be {names}, got {value.dtype}", TypeError)
    return value


def table(op: str, weight: object, name: str = "weight") -> tuple[int, int]:
    """The codebook table [V, D] within the limits: returns (V, D)."""
    weight = tensor(op, weight, name, ndim=2, dtypes=SUPPORTED_DTYPES)
    num_rows, dim = weight.shape
    if not 1 <= num_rows <= MAX_ROWS:
        _fail(op, f"{name} must have 1..{MAX_ROWS} rows, got shape {tuple(weight.shape)}")
    if not 1 <= dim <= MAX_DIM:
        _fail(op, f"{name} rows must have D in 1..{MAX_DIM}, got shape {tuple(weight.shape)}")
    return num_rows, dim


def rows_like(op: str, x: object, name: str, dim: int, device: torch.device) -> int:
    """Query rows [N, D] matching the table's D and device: returns N."""
    x = tensor(op, x, name, ndim=2, dtypes=SUPPORTED_DTYPES)
    if x.shape[1] != dim:
        _fail(op, f"{name} has D = {x.shape[1]} (shape {tuple(x.shape)}), but the table has D = {dim}")
    if x.shape[0] > MAX_QUERIES:
        _fail(op, f"{name} has {x.shape[0]} rows; at most {MAX_QUERIES} per call")
    same_device(op, x, name, device)
    return x.shape[0]


def same_device(op: str, value: torch.Tensor, name: str, device: torch.device) -> None:
    if value.device != device:
        _fail(op, f"{name} is on {value.device} but the table (weight) is on {device}")


def shaped(op: str, value: object, name: str, shape: tuple[int, ...], dtype: torch.dtype, why: str) -> None:
    """A contiguous CPU tensor of exactly `shape` and `dtype` (a packed form read through raw pointers)."""
    if not isinstance(value, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(value).__name__}", TypeError)
    if tuple(value.shape) != shape or value.dtype != dtype:
        _fail(
            op,
            f"{name} must be {str(dtype).removeprefix('torch.')} of shape {shape} ({why}), got "
            f"{str(value.dtype).removeprefix('torch.')} of shape {tuple(value.shape)}; it does not belong to "
            "this table (build the packed forms with the same table, or pass a spae_fast.Codebook)",
            TypeError if value.dtype != dtype else ValueError,
        )
    if value.device.type != "cpu":
        _fail(op, f"{name} must be on the CPU (the native kernel reads it), got {value.device}")
    if not value.is_contiguous():
        _fail(op, f"{name} must be contiguous (the native kernel reads it densely)")


def cpu_panels(op: str, panels, bias, norm_bound, num_rows: int, dim: int, table_dtype: torch.dtype,
               metric: str) -> None:  # fmt: skip
    """The packing of ``spae_fast::pack_codebook`` for a [V, D] table of `table_dtype`: fp32 panels, or panels
    in the table's own bf16 / fp16 for metric l2 / ip (`common.panel_dtype`)."""
    num_panels = -(-num_rows // PANEL_WIDTH)
    why = f"pack_codebook of a [{num_rows}, {dim}] table"
    narrow = table_dtype in (torch.bfloat16, torch.float16) and metric in ("l2", "ip")
    if narrow and isinstance(panels, torch.Tensor) and panels.dtype == table_dtype:
        why += f" in its own {str(table_dtype).removeprefix('torch.')}"
        shaped(op, panels, "panels", (num_panels, dim, PANEL_WIDTH), table_dtype, why)
    else:
        if narrow:
            why += f" (float32, or its own {str(table_dtype).removeprefix('torch.')})"
        shaped(op, panels, "panels", (num_panels, dim, PANEL_WIDTH), torch.float32, why)
    shaped(op, bias, "bias", (num_panels * PANEL_WIDTH,), torch.float32, why)
    if not isinstance(norm_bound, torch.Tensor):
        _fail(op, f"norm_bound must be a torch.Tensor ({why}), got {type(norm_bound).__name__}", TypeError)
    if norm_bound.numel() != 1:
        _fail(op, f"norm_bound must be a one-element tensor ({why}), got shape {tuple(norm_bound.shape)}")


def prefilter(op: str, words, columns, offsets, bounds, num_rows: int, dim: int) -> bool:
    """The int8 pre-filter operands: all four empty (off) or the int8 copy of a [V, D] table. Returns on/off."""
    operands = {"prefilter_panels": words, "prefilter_columns": columns, "prefilter_offsets": offsets,
                "prefilter_bounds": bounds}  # fmt: skip
    for name, value in operands.items():
        if not isinstance(value, torch.Tensor):
            _fail(op, f"{name} must be a torch.Tensor, got {type(value).__name__}", TypeError)
    if all(value.numel() == 0 for value in operands.values()):
        return False
    if dim > MAX_DIM:
        _fail(op, f"the int8 pre-filter supports D <= {MAX_DIM}, got D = {dim}")
    num_panels = -(-num_rows // PANEL_WIDTH)
    why = f"the int8 copy of a [{num_rows}, {dim}] table, or all four empty"
    shaped(op, words, "prefilter_panels", (num_panels, (dim + 3) // 4, PANEL_WIDTH), torch.int32, why)
    shaped(op, columns, "prefilter_columns", (num_panels, 4, PANEL_WIDTH), torch.float32, why)
    shaped(op, offsets, "prefilter_offsets", (num_panels * PANEL_WIDTH,), torch.int32, why)
    shaped(op, bounds, "prefilter_bounds", (4,), torch.float64, why)
    return True


def index_array(
    op: str, value: object, name: str, length: int | None, device: torch.device, why: str
) -> None:
    """A contiguous 1-D int64 tensor (of `length` entries when given) on the table's device."""
    tensor(op, value, name, ndim=1, dtypes=(torch.int64,))
    if length is not None and value.shape[0] != length:
        _fail(op, f"{name} must have {length} entries ({why}), got {value.shape[0]}")
    same_device(op, value, name, device)
    if not value.is_contiguous():
        _fail(op, f"{name} must be contiguous (the kernels read it densely)")
