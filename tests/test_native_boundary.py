"""The typed boundary of the native CPU module (spae_fast._C): every entry point takes keyword arguments only,
each checked once before any pointer is read (type, count, range, non-null addresses where a buffer is used),
and a bad one raises an exception that names it. The CUDA module's boundary: tests/test_cuda_module.py."""

from __future__ import annotations

import pytest
import torch

import spae_fast
from spae_fast import _native
from spae_fast._native import NO_BUFFER, buffer

C = _native._C
_ALIVE: list[torch.Tensor] = []  # tensors whose addresses a test passes: kept alive for the whole run


def held(tensor: torch.Tensor) -> tuple[int, int]:
    """`buffer` of a tensor made for one call, kept alive (a freed buffer would turn a regression of the
    boundary into a use-after-free instead of a failed assertion)."""
    _ALIVE.append(tensor)
    return buffer(tensor)
pytestmark = pytest.mark.skipif(C is None, reason="native CPU module not built")


def _packed(weight):
    num_rows, dim = weight.shape
    panels = torch.empty(-(-num_rows // 16), dim, 16)
    bias = torch.empty(-(-num_rows // 16) * 16)
    code, _, max_norm = C.pack_codebook(
        weight=buffer(weight), num_rows=num_rows, dim=dim, weight_row_stride=weight.stride(0),
        weight_col_stride=weight.stride(1), weight_dtype=0, metric=0, out_panels=buffer(panels), out_panels_dtype=0,
        out_bias=buffer(bias), num_threads=1,
    )  # fmt: skip
    assert code == 0
    return panels, bias, max_norm


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    weight, x = torch.randn(40, 12), torch.randn(7, 12)
    panels, bias, max_norm = _packed(weight)
    dist, index = torch.empty(7, 1), torch.empty(7, 1, dtype=torch.int64)
    args = {
        "x": buffer(x), "num_queries": 7, "dim": 12, "x_row_stride": 12, "x_col_stride": 1, "x_dtype": 0,
        "panels": buffer(panels), "panels_dtype": 0, "bias": buffer(bias), "codebook_rows": 40, "max_norm": max_norm, "metric": 0, "k": 1,
        "check_finite": True, "num_threads": 1, "out_dist": buffer(dist), "out_index": buffer(index),
        "weight": buffer(weight), "weight_row_stride": 12, "weight_col_stride": 1, "weight_dtype": 0,
        "prefilter_panels": NO_BUFFER, "prefilter_columns": NO_BUFFER, "prefilter_offsets": NO_BUFFER,
        "prefilter_bounds": [],
        "prefilter_adaptive": False,
    }  # fmt: skip
    return {"weight": weight, "x": x, "panels": panels, "bias": bias, "dist": dist, "index": index, "args": args}


def test_keyword_call_matches_the_op(problem):
    code, _, _ = C.search(**problem["args"])
    assert code == 0
    dist, index = spae_fast.nearest(problem["x"], problem["weight"], backend="cpu", prefilter="none")
    assert torch.equal(problem["index"][:, 0], index) and torch.equal(problem["dist"][:, 0], dist)


def test_positional_missing_unknown_and_mistyped_arguments(problem):
    args = problem["args"]
    with pytest.raises(TypeError, match=r"spae_fast\._C\.search\(\) takes keyword arguments only"):
        C.search(*args.values())
    with pytest.raises(TypeError, match="missing keyword argument 'metric'"):
        C.search(**{name: value for name, value in args.items() if name != "metric"})
    with pytest.raises(TypeError, match="unexpected keyword argument 'queries'"):
        C.search(**args, queries=7)
    with pytest.raises(TypeError, match="'check_finite' must be a bool"):
        C.search(**{**args, "check_finite": 1})
    with pytest.raises(TypeError, match="'k' must be an int"):
        C.search(**{**args, "k": 1.0})
    with pytest.raises(TypeError, match="'k' must be an int"):
        C.search(**{**args, "k": True})
    with pytest.raises(TypeError, match="'prefilter_bounds' must be a list or tuple"):
        C.search(**{**args, "prefilter_bounds": 0})


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"num_queries": -1}, "num_queries"),
        ({"dim": -3}, "dim"),
        ({"x_dtype": 3}, "x_dtype"),
        ({"weight_dtype": -1}, "weight_dtype"),
        ({"metric": 3}, "metric"),
        ({"codebook_rows": 0}, "codebook_rows"),
        ({"k": 0}, "k"),
        ({"k": 41}, "k"),  # k > V
        ({"num_threads": 0}, "num_threads"),
        ({"max_norm": float("nan")}, "max_norm"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"x": NO_BUFFER}, "x"),  # null with N x D > 0
        ({"panels": NO_BUFFER}, "panels"),
        ({"out_index": NO_BUFFER}, "out_index"),
        ({"x": (-8, 4096)}, "x"),
        ({"prefilter_columns": (64, 64)}, "prefilter_columns"),  # given while the pre-filter is off
        ({"prefilter_bounds": [1.0, 1.0, 1.0, 1.0]}, "prefilter_bounds"),
    ],
)
def test_out_of_range_arguments_are_named(problem, change, name):
    before = problem["index"].clone()
    with pytest.raises(ValueError, match=f"argument '{name}'"):
        C.search(**{**problem["args"], **change})
    assert torch.equal(problem["index"], before)  # refused before the kernel ran


def test_prefilter_operands_are_checked_together(problem):
    room = torch.zeros(4096)  # large enough for every pre-filter operand of the 40 x 12 table
    args = {**problem["args"], "prefilter_panels": buffer(room)}
    with pytest.raises(ValueError, match="'prefilter_columns'"):
        C.search(**args)
    args.update(prefilter_columns=buffer(room), prefilter_offsets=buffer(room))
    with pytest.raises(ValueError, match=r"'prefilter_bounds' must hold 4 values, got 0"):
        C.search(**args)
    with pytest.raises(ValueError, match="'prefilter_bounds' must be finite"):
        C.search(**{**args, "prefilter_bounds": [1.0, float("inf"), 1.0, 1.0]})
    with pytest.raises(ValueError, match="'prefilter_panels' must be 0 for k > 16"):
        wide = {"out_dist": held(torch.empty(7, 17)), "out_index": held(torch.empty(7, 17, dtype=torch.int64))}
        C.search(**{**args, **wide, "prefilter_bounds": [1.0] * 4, "k": 17})


@pytest.fixture
def saq_call(problem):
    """(arguments of a valid spae_fast._C.saq call on the problem's table, z [2, 12, 4, 4], its ids buffer)."""
    weight, panels, bias = problem["weight"], problem["panels"], problem["bias"]
    z = torch.randn(2, 12, 4, 4)
    ids = torch.empty(2, 1 + 4 + 16, dtype=torch.int64)
    saq = {
        "z": buffer(z), "z_dtype": 0, "batch": 2, "dim": 12, "grid": 4, "z_strides": z.stride(), "weight": buffer(weight),
        "num_rows": 40, "weight_row_stride": 12, "weight_col_stride": 1, "weight_dtype": 0, "panels": buffer(panels), "panels_dtype": 0,
        "bias": buffer(bias), "max_norm": problem["args"]["max_norm"], "sides": [1, 2, 4], "residual": False,
        "check_finite": True, "num_threads": 1, "out_ids": buffer(ids), "prefilter_panels": NO_BUFFER,
        "prefilter_columns": NO_BUFFER, "prefilter_offsets": NO_BUFFER, "prefilter_bounds": [],
    }  # fmt: skip
    return saq, z, ids


@pytest.fixture
def semantic_call(problem):
    """(arguments of a valid spae_fast._C.semantic_loss call: 3 positions, one set {1, 2}; its buffers)."""
    weight, panels, bias = problem["weight"], problem["panels"], problem["bias"]
    loss, zl = torch.empty(3), torch.randn(3, 12)
    index, offsets, position = torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([0, -1, 0])
    semantic = {
        "z": buffer(zl), "num_rows": 3, "dim": 12, "z_row_stride": 12, "z_col_stride": 1, "z_dtype": 0,
        "weight": buffer(weight), "vocab": 40, "weight_row_stride": 12, "weight_col_stride": 1, "weight_dtype": 0,
        "panels": buffer(panels), "panels_dtype": 0, "bias": buffer(bias), "max_norm": problem["args"]["max_norm"],
        "candidate_index": buffer(index), "num_candidates": 2, "candidate_offsets": buffer(offsets), "num_sets": 1,
        "set_of_position": buffer(position), "tau": 1.0, "compute_grad": False, "check_finite": True, "num_threads": 1,
        "out_loss": buffer(loss), "out_grad": NO_BUFFER, "bf16_panels": NO_BUFFER, "bf16_rows": NO_BUFFER,
        "bf16_bias": NO_BUFFER,
    }  # fmt: skip
    return semantic, {"loss": loss, "z": zl, "index": index, "offsets": offsets, "position": position}


def test_saq_and_semantic_loss_boundaries(problem, saq_call, semantic_call):
    weight, panels, bias = problem["weight"], problem["panels"], problem["bias"]
    saq, z, ids = saq_call
    assert C.saq(**saq)[0] == 0
    assert torch.equal(ids, spae_fast.saq(z, weight, (1, 2, 4), backend="cpu", prefilter="none"))
    with pytest.raises(ValueError, match=r"'z_strides' must hold 4 values, got 3"):
        C.saq(**{**saq, "z_strides": (1, 2, 3)})
    with pytest.raises(ValueError, match=r"'sides\[1\]' must be in \[1, 4\], got 8"):
        C.saq(**{**saq, "sides": [1, 8]})
    with pytest.raises(ValueError, match="'sides' must hold 1..64 values, got 0"):
        C.saq(**{**saq, "sides": []})

    semantic, buffers = semantic_call
    loss = buffers["loss"]
    assert C.semantic_loss(**semantic)[0] == 0
    with pytest.raises(ValueError, match="'tau' must be a finite float > 0"):
        C.semantic_loss(**{**semantic, "tau": 0.0})
    with pytest.raises(ValueError, match="'out_grad' must have address 0 without compute_grad"):
        C.semantic_loss(**{**semantic, "out_grad": buffer(loss)})
    with pytest.raises(ValueError, match="'panels' must have address 0 with bf16_panels"):
        C.semantic_loss(**{**semantic, "bf16_panels": buffer(panels), "bf16_bias": buffer(bias)})
    with pytest.raises(ValueError, match="'bf16_bias' must have address 0 without bf16_panels"):
        C.semantic_loss(**{**semantic, "bf16_bias": buffer(bias)})


def test_buffers_shorter_than_the_call_reads_are_refused(problem):
    """The second line behind the ops' own checks: every buffer carries its size, and a buffer shorter than
    what the entry point would read or write is refused before the kernel runs (no out-of-bounds access)."""
    args, x = problem["args"], problem["x"]
    small_panels, small_bias, _ = _packed(torch.randn(5, 12))  # a 5-row table: one panel instead of three
    cases = [
        ({"panels": buffer(small_panels)}, "panels", 3 * 12 * 16 * 4),
        ({"bias": buffer(small_bias)}, "bias", 48 * 4),
        ({"out_index": held(torch.empty(6, 1, dtype=torch.int64))}, "out_index", 7 * 8),
        ({"out_dist": held(torch.empty(3))}, "out_dist", 7 * 4),
        ({"x": buffer(x[1:])}, "x", 7 * 12 * 4),  # a view that starts one row in: 6 rows from there
        ({"x": buffer(x[:, :6])}, "x", 7 * 12 * 4),  # 6 of the 12 columns: ends 6 elements early
        ({"x_row_stride": 13}, "x", (6 * 13 + 11 + 1) * 4),  # strides that reach past the tensor
        ({"weight": held(torch.randn(39, 12))}, "weight", 40 * 12 * 4),
    ]
    for change, name, needed in cases:
        with pytest.raises(ValueError, match=rf"'{name}' holds \d+ bytes, but the call reads or writes {needed}"):
            C.search(**{**args, **change})
    with pytest.raises(ValueError, match="'x' has a negative stride"):
        C.search(**{**args, "x_col_stride": -1})
    with pytest.raises(TypeError, match=r"'panels' must be an \(address, nbytes\) tuple"):
        C.search(**{**args, "panels": problem["panels"].data_ptr()})


def test_saq_and_semantic_loss_buffers_are_sized(saq_call, semantic_call):
    saq, z, ids = saq_call
    assert C.saq(**saq)[0] == 0
    with pytest.raises(ValueError, match=r"'z' holds 768 bytes, but the call reads or writes 1536"):
        C.saq(**{**saq, "z": buffer(z[1])})  # one image's latents for a batch of 2
    with pytest.raises(ValueError, match=r"'out_ids' holds 320 bytes, but the call reads or writes 336"):
        C.saq(**{**saq, "out_ids": buffer(ids.view(-1)[:40])})
    with pytest.raises(ValueError, match="'z_strides' has a negative stride"):
        C.saq(**{**saq, "z_strides": (192, -16, 4, 1)})

    semantic, buffers = semantic_call
    loss, index, offsets, position = (buffers[name] for name in ("loss", "index", "offsets", "position"))
    assert C.semantic_loss(**semantic)[0] == 0
    for change, name, needed in [
        ({"set_of_position": buffer(position[:2])}, "set_of_position", 24),
        ({"candidate_index": buffer(index[:1])}, "candidate_index", 16),
        ({"candidate_offsets": buffer(offsets[:1])}, "candidate_offsets", 16),
        ({"num_sets": 2}, "candidate_offsets", 24),
        ({"out_loss": buffer(loss[:2])}, "out_loss", 12),
        ({"compute_grad": True, "out_grad": held(torch.empty(3, 11))}, "out_grad", 144),
    ]:
        with pytest.raises(ValueError, match=rf"'{name}' holds \d+ bytes, but the call reads or writes {needed}"):
            C.semantic_loss(**{**semantic, **change})
