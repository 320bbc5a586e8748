"""The typed boundary of the native CPU module (spae_fast._C): every entry point takes keyword arguments only,
each checked once before any pointer is read (type, count, range, non-null addresses where a buffer is used),
and a bad one raises an exception that names it. The CUDA module's boundary: tests/test_cuda_module.py."""

from __future__ import annotations

import pytest
import torch

import spae_fast
from spae_fast import _native

C = _native._C
pytestmark = pytest.mark.skipif(C is None, reason="native CPU module not built")


def _packed(weight):
    num_rows, dim = weight.shape
    panels = torch.empty(-(-num_rows // 16), dim, 16)
    bias = torch.empty(-(-num_rows // 16) * 16)
    code, _, max_norm = C.pack_codebook(
        weight=weight.data_ptr(), num_rows=num_rows, dim=dim, weight_row_stride=weight.stride(0),
        weight_col_stride=weight.stride(1), weight_dtype=0, metric=0, out_panels=panels.data_ptr(),
        out_bias=bias.data_ptr(), num_threads=1,
    )  # fmt: skip
    assert code == 0
    return panels, bias, max_norm


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    weight, x = torch.randn(40, 12), torch.randn(7, 12)
    panels, bias, max_norm = _packed(weight)
    dist, index = torch.empty(7, 1), torch.empty(7, 1, dtype=torch.int64)
    args = dict(
        x=x.data_ptr(), num_queries=7, dim=12, x_row_stride=12, x_col_stride=1, x_dtype=0,
        panels=panels.data_ptr(), bias=bias.data_ptr(), codebook_rows=40, max_norm=max_norm, metric=0, k=1,
        check_finite=True, num_threads=1, out_dist=dist.data_ptr(), out_index=index.data_ptr(),
        weight=weight.data_ptr(), weight_row_stride=12, weight_col_stride=1, weight_dtype=0,
        prefilter_panels=0, prefilter_columns=0, prefilter_offsets=0, prefilter_bounds=[],
        prefilter_adaptive=False,
    )  # fmt: skip
    return dict(weight=weight, x=x, panels=panels, bias=bias, dist=dist, index=index, args=args)


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
        ({"x": 0}, "x"),  # null with N x D > 0
        ({"panels": 0}, "panels"),
        ({"out_index": 0}, "out_index"),
        ({"x": -8}, "x"),
        ({"prefilter_columns": 64}, "prefilter_columns"),  # given while the pre-filter is off
        ({"prefilter_bounds": [1.0, 1.0, 1.0, 1.0]}, "prefilter_bounds"),
    ],
)
def test_out_of_range_arguments_are_named(problem, change, name):
    before = problem["index"].clone()
    with pytest.raises(ValueError, match=f"argument '{name}'"):
        C.search(**{**problem["args"], **change})
    assert torch.equal(problem["index"], before)  # refused before the kernel ran


def test_prefilter_operands_are_checked_together(problem):
    args = {**problem["args"], "prefilter_panels": problem["x"].data_ptr()}
    with pytest.raises(ValueError, match="'prefilter_columns'"):
        C.search(**args)
    ptr = problem["x"].data_ptr()
    args.update(prefilter_columns=ptr, prefilter_offsets=ptr)
    with pytest.raises(ValueError, match=r"'prefilter_bounds' must hold 4 values, got 0"):
        C.search(**args)
    with pytest.raises(ValueError, match="'prefilter_bounds' must be finite"):
        C.search(**{**args, "prefilter_bounds": [1.0, float("inf"), 1.0, 1.0]})
    with pytest.raises(ValueError, match="'prefilter_panels' must be 0 for k > 1"):
        C.search(**{**args, "prefilter_bounds": [1.0] * 4, "k": 2})


def test_saq_and_semantic_loss_boundaries(problem):
    weight, panels, bias = problem["weight"], problem["panels"], problem["bias"]
    z = torch.randn(2, 12, 4, 4)
    ids = torch.empty(2, 1 + 4 + 16, dtype=torch.int64)
    saq = dict(
        z=z.data_ptr(), z_dtype=0, batch=2, dim=12, grid=4, z_strides=z.stride(), weight=weight.data_ptr(),
        num_rows=40, weight_row_stride=12, weight_col_stride=1, weight_dtype=0, panels=panels.data_ptr(),
        bias=bias.data_ptr(), max_norm=problem["args"]["max_norm"], sides=[1, 2, 4], residual=False,
        check_finite=True, num_threads=1, out_ids=ids.data_ptr(), prefilter_panels=0, prefilter_columns=0,
        prefilter_offsets=0, prefilter_bounds=[],
    )  # fmt: skip
    assert C.saq(**saq)[0] == 0
    assert torch.equal(ids, spae_fast.saq(z, weight, (1, 2, 4), backend="cpu", prefilter="none"))
    with pytest.raises(ValueError, match=r"'z_strides' must hold 4 values, got 3"):
        C.saq(**{**saq, "z_strides": (1, 2, 3)})
    with pytest.raises(ValueError, match=r"'sides\[1\]' must be in \[1, 4\], got 8"):
        C.saq(**{**saq, "sides": [1, 8]})
    with pytest.raises(ValueError, match="'sides' must hold 1..64 values, got 0"):
        C.saq(**{**saq, "sides": []})

    loss = torch.empty(3)
    index, offsets, position = torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([0, -1, 0])
    zl = torch.randn(3, 12)
    semantic = dict(
        z=zl.data_ptr(), num_rows=3, dim=12, z_row_stride=12, z_col_stride=1, z_dtype=0,
        weight=weight.data_ptr(), vocab=40, weight_row_stride=12, weight_col_stride=1, weight_dtype=0,
        panels=panels.data_ptr(), bias=bias.data_ptr(), max_norm=problem["args"]["max_norm"],
        candidate_index=index.data_ptr(), num_candidates=2, candidate_offsets=offsets.data_ptr(), num_sets=1,
        set_of_position=position.data_ptr(), tau=1.0, compute_grad=False, check_finite=True, num_threads=1,
        out_loss=loss.data_ptr(), out_grad=0, bf16_panels=0, bf16_rows=0, bf16_bias=0,
    )  # fmt: skip
    assert C.semantic_loss(**semantic)[0] == 0
    with pytest.raises(ValueError, match="'tau' must be a finite float > 0"):
        C.semantic_loss(**{**semantic, "tau": 0.0})
    with pytest.raises(ValueError, match="'out_grad' must be 0 without compute_grad"):
        C.semantic_loss(**{**semantic, "out_grad": loss.data_ptr()})
    with pytest.raises(ValueError, match="'panels' must be 0 with bf16_panels"):
        C.semantic_loss(**{**semantic, "bf16_panels": panels.data_ptr(), "bf16_bias": bias.data_ptr()})
    with pytest.raises(ValueError, match="'bf16_bias' must be 0 without bf16_panels"):
        C.semantic_loss(**{**semantic, "bf16_bias": bias.data_ptr()})
