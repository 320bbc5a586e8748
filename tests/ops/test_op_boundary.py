"""Every registered op checks its operands at its boundary: called directly (as `torch.compile` graphs and
users do) with each kind of inconsistent operand, ``torch.ops.spae_fast.*`` raise a clear exception that
names the op and the operand, before any native code reads memory. Each case first runs the consistent
call, so a rejection is caused by the one operand the case changes."""

from __future__ import annotations

import pytest
import torch

import spae_fast
from spae_fast.ops import common

E = torch.empty(0)
V, D = 37, 8


def _packed(weight, metric="l2"):
    return torch.ops.spae_fast.pack_codebook(weight, metric)


def _int8(weight):
    panels, bias, _ = _packed(weight)
    return common._pack_int8(panels, bias, *weight.shape)


def _weight(rows=V, dim=D, seed=1):
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


def _search_operands():
    weight = _weight()
    return {
        "x": torch.randn(5, D),
        "weight": weight,
        **dict(zip(("panels", "bias", "norm_bound"), _packed(weight))),
    }


def _search_args(**between):
    """The operands of ``spae_fast::nearest`` in schema order, pre-filter off; ``between`` (topk's k) goes after
    the pre-filter operands, where the topk schema has it."""
    return {**_search_operands(), "words": E, "columns": E, "offsets": E, "bounds": E, **between, "metric": "l2",
            "backend": "cpu", "check_finite": True, "prefilter": "none", "precision": "default"}  # fmt: skip


def nearest_call(**changes):
    return torch.ops.spae_fast.nearest(*{**_search_args(), **changes}.values())


def topk_call(**changes):
    return torch.ops.spae_fast.topk(*{**_search_args(k=3), **changes}.values())


def saq_call(**changes):
    weight = _weight()
    args = {
        "z": torch.randn(2, D, 4, 4),
        "weight": weight,
        **dict(zip(("panels", "bias", "norm_bound"), _packed(weight))),
        "words": E,
        "columns": E,
        "offsets": E,
        "bounds": E,
        "sides": [1, 2, 4],
        "mode": "saq",
        "backend": "cpu",
        "check_finite": True,
    }
    args.update(changes)
    return torch.ops.spae_fast.saq(*args.values())


def semantic_call(**changes):
    weight = _weight()
    args = {
        "z": torch.randn(5, D),
        "weight": weight,
        **dict(zip(("panels", "bias", "norm_bound"), _packed(weight))),
        "candidate_index": torch.tensor([1, 2, 3]),
        "candidate_offsets": torch.tensor([0, 1, 3]),
        "set_of_position": torch.tensor([0, 1, -1, 0, 1]),
        "tau": 1.0,
        "compute_grad": True,
        "backend": "cpu",
        "check_finite": True,
        "bf16_rows": E,
        "precision": "default",
    }
    args.update(changes)
    return torch.ops.spae_fast.semantic_loss(*args.values())


def pack_call(**changes):
    args = {"weight": _weight(), "metric": "l2"}
    args.update(changes)
    return torch.ops.spae_fast.pack_codebook(*args.values())


def _smaller():
    return dict(zip(("panels", "bias", "norm_bound"), _packed(_weight(rows=5))))


def _int8_of(weight):
    return dict(zip(("words", "columns", "offsets", "bounds"), _int8(weight)))


SEARCH_CASES = {
    "x wider than the table": ({"x": torch.randn(5, D + 1)}, ValueError, r"x has D = 9.*table has D = 8"),
    "x 1-D": ({"x": torch.randn(D)}, ValueError, r"x must be 2-D"),
    "x 3-D": ({"x": torch.randn(2, 5, D)}, ValueError, r"x must be 2-D"),
    "x int": ({"x": torch.ones(5, D, dtype=torch.int32)}, TypeError, r"x must be float32, bfloat16, float16"),
    "x float64": ({"x": torch.randn(5, D, dtype=torch.float64)}, TypeError, r"x must be float32"),
    "x on another device": (
        {"x": torch.randn(5, D, device="meta")},
        ValueError,
        r"x is on meta but the table \(weight\) is on cpu",
    ),
    "weight 1-D": ({"weight": torch.randn(D)}, ValueError, r"weight must be 2-D"),
    "weight empty": ({"weight": torch.randn(0, D)}, ValueError, r"weight must have 1\.\.\d+ rows"),
    "weight of D 0": (
        {"weight": torch.randn(V, 0), "x": torch.randn(5, 0)},
        ValueError,
        r"weight rows must have D in",
    ),
    "weight int": ({"weight": torch.ones(V, D, dtype=torch.int64)}, TypeError, r"weight must be float32"),
    "empty panels": (
        {"panels": E, "bias": E},
        ValueError,
        r"panels must be float32 of shape \(3, 8, 16\).*got float32 of shape \(0,\)",
    ),
    "panels of a smaller table": (
        _smaller(),
        ValueError,
        r"panels must be float32 of shape \(3, 8, 16\).*\(1, 8, 16\)",
    ),
    "panels of another D": (
        {"panels": _packed(_weight(dim=4))[0]},
        ValueError,
        r"panels must be float32 of shape \(3, 8, 16\)",
    ),
    "panels float64": (
        {"panels": _packed(_weight())[0].double()},
        TypeError,
        r"panels must be float32.*got float64",
    ),
    "panels not contiguous": (
        {"panels": _packed(_weight())[0].transpose(0, 1).contiguous().transpose(0, 1)},
        ValueError,
        r"panels must be contiguous",
    ),
    "bias too short": ({"bias": torch.zeros(16)}, ValueError, r"bias must be float32 of shape \(48,\)"),
    "norm bound of two values": (
        {"norm_bound": torch.zeros(2)},
        ValueError,
        r"norm_bound must be a one-element",
    ),
    "unknown metric": (
        {"metric": "l1"},
        ValueError,
        r"metric must be one of \('l2', 'ip', 'cosine'\), got 'l1'",
    ),
    "unknown backend": ({"backend": "gpu"}, ValueError, r"backend must be one of .*got 'gpu'"),
    "unresolved backend auto": ({"backend": "auto"}, ValueError, r"backend must be one of .*got 'auto'"),
    "unknown precision": ({"precision": "fp8"}, ValueError, r"precision must be one of .*got 'fp8'"),
}

NEAREST_CASES = {
    **SEARCH_CASES,
    "pre-filter of a smaller table": (
        _int8_of(_weight(rows=5)),
        ValueError,
        r"prefilter_panels must be int32 of shape \(3, 2, 16\)",
    ),
    "pre-filter of another D": (
        _int8_of(_weight(dim=12)),
        ValueError,
        r"prefilter_panels must be int32 of shape \(3, 2, 16\)",
    ),
    "pre-filter half given": (
        {"words": _int8(_weight())[0]},
        ValueError,
        r"prefilter_columns must be float32 of shape",
    ),
    "pre-filter bounds short": (
        {**_int8_of(_weight()), "bounds": torch.zeros(3, dtype=torch.float64)},
        ValueError,
        r"prefilter_bounds must be float64 of shape \(4,\)",
    ),
    "pre-filter on backend torch": (
        {**_int8_of(_weight()), "backend": "torch"},
        ValueError,
        r"the int8 pre-filter operands serve backend 'cpu' only",
    ),
    "unknown prefilter": ({"prefilter": "fp8"}, ValueError, r"prefilter must be one of .*got 'fp8'"),
}

PREFILTER_KINDS = ("pre-filter of a smaller table", "pre-filter of another D", "pre-filter half given",
                   "pre-filter bounds short", "pre-filter on backend torch", "unknown prefilter")  # fmt: skip
TOPK_CASES = {
    **SEARCH_CASES,
    **{kind: NEAREST_CASES[kind] for kind in PREFILTER_KINDS},
    "k 0": ({"k": 0}, ValueError, r"k must be an int in \[1, V\] = \[1, 37\], got 0"),
    "k above V": ({"k": V + 1}, ValueError, r"k must be an int in \[1, V\] = \[1, 37\], got 38"),
}

SAQ_CASES = {
    "z 3-D": ({"z": torch.randn(2, D, 4)}, ValueError, r"z must be 4-D"),
    "z wider than the table": (
        {"z": torch.randn(2, D + 3, 4, 4)},
        ValueError,
        r"z has 11 channels.*table has D = 8",
    ),
    "z not square": ({"z": torch.randn(2, D, 4, 2)}, ValueError, r"z must be a square grid"),
    "z int": ({"z": torch.ones(2, D, 4, 4, dtype=torch.int64)}, TypeError, r"z must be float32"),
    "z on another device": (
        {"z": torch.randn(2, D, 4, 4, device="meta")},
        ValueError,
        r"z is on meta but the table \(weight\)",
    ),
    "empty panels": ({"panels": E, "bias": E}, ValueError, r"panels must be float32 of shape \(3, 8, 16\)"),
    "panels of a smaller table": (_smaller(), ValueError, r"panels must be float32 of shape \(3, 8, 16\)"),
    "pre-filter of a smaller table": (
        _int8_of(_weight(rows=5)),
        ValueError,
        r"prefilter_panels must be int32",
    ),
    "sides not dividing the grid": (
        {"sides": [1, 3]},
        ValueError,
        r"sides \[1, 3\] do not fit the 4 x 4 grid",
    ),
    "sides decreasing": ({"sides": [2, 1]}, ValueError, r"sides \[2, 1\] do not fit.*non-decreasing"),
    "sides wider than the grid": ({"sides": [8]}, ValueError, r"sides \[8\] do not fit"),
    "no sides": ({"sides": []}, ValueError, r"sides \[\] do not fit"),
    "17 layers": ({"sides": [1] * 17}, ValueError, r"17 layers; every backend supports at most 16"),
    "unknown mode": ({"mode": "vq"}, ValueError, r"mode must be one of \('saq', 'rq'\), got 'vq'"),
    "unknown backend": ({"backend": "gpu"}, ValueError, r"backend must be one of"),
}

SEMANTIC_CASES = {
    "z wider than the table": ({"z": torch.randn(5, D + 1)}, ValueError, r"z has D = 9.*table has D = 8"),
    "z 3-D": ({"z": torch.randn(1, 5, D)}, ValueError, r"z must be 2-D"),
    "set_of_position shorter than N": (
        {"set_of_position": torch.tensor([0, 1])},
        ValueError,
        r"set_of_position must have 5 entries \(one set per row of z\), got 2",
    ),
    "set_of_position float": (
        {"set_of_position": torch.zeros(5)},
        TypeError,
        r"set_of_position must be int64",
    ),
    "set_of_position strided": (
        {"set_of_position": torch.zeros(10, dtype=torch.int64)[::2]},
        ValueError,
        r"set_of_position must be contiguous",
    ),
    "candidate_index 2-D": (
        {"candidate_index": torch.tensor([[1, 2, 3]])},
        ValueError,
        r"candidate_index must be 1-D",
    ),
    "candidate_index int32": (
        {"candidate_index": torch.tensor([1, 2, 3], dtype=torch.int32)},
        TypeError,
        r"candidate_index must be int64",
    ),
    "candidate_offsets empty": (
        {"candidate_offsets": torch.zeros(0, dtype=torch.int64)},
        ValueError,
        r"candidate_offsets must hold S \+ 1 >= 1 entries",
    ),
    "tau 0": ({"tau": 0.0}, ValueError, r"tau must be a finite float > 0, got 0.0"),
    "tau inf": ({"tau": float("inf")}, ValueError, r"tau must be a finite float > 0, got inf"),
    "tau NaN": ({"tau": float("nan")}, ValueError, r"tau must be a finite float > 0, got nan"),
    "empty panels": ({"panels": E, "bias": E}, ValueError, r"panels must be float32 of shape \(3, 8, 16\)"),
    "panels of a smaller table": (_smaller(), ValueError, r"panels must be float32 of shape \(3, 8, 16\)"),
    "bf16 rows at precision default": (
        {"bf16_rows": torch.zeros(1, 32, 64, dtype=torch.int32)},
        ValueError,
        r"bf16_rows must be empty unless precision is 'bf16'",
    ),
    "bf16 rows of a smaller table": (
        {
            "precision": "bf16",
            **dict(zip(("weight", "panels", "bias", "norm_bound"), common.pack_semantic_bf16(_weight())[:4])),
            "bf16_rows": common.pack_semantic_bf16(_weight(dim=70))[4],
        },
        ValueError,
        r"bf16_rows must be int32 of shape",
    ),
    "unknown precision": ({"precision": "fp8"}, ValueError, r"precision must be one of"),
    "unknown backend": ({"backend": "gpu"}, ValueError, r"backend must be one of"),
}

PACK_CASES = {
    "weight 1-D": ({"weight": torch.randn(D)}, ValueError, r"weight must be 2-D"),
    "weight empty": ({"weight": torch.randn(0, D)}, ValueError, r"weight must have 1\.\."),
    "weight int": ({"weight": torch.ones(V, D, dtype=torch.int32)}, TypeError, r"weight must be float32"),
    "weight on another device": (
        {"weight": torch.randn(V, D, device="meta")},
        ValueError,
        r"weight must be on the CPU",
    ),
    "unknown metric": ({"metric": "l1"}, ValueError, r"metric must be one of"),
}

OPS = {
    "nearest": (nearest_call, NEAREST_CASES),
    "topk": (topk_call, TOPK_CASES),
    "saq": (saq_call, SAQ_CASES),
    "semantic_loss": (semantic_call, SEMANTIC_CASES),
    "pack_codebook": (pack_call, PACK_CASES),
}
CASES = [(op, kind) for op, (_, cases) in OPS.items() for kind in cases]


@pytest.mark.parametrize(("op", "kind"), CASES, ids=[f"{op}: {kind}" for op, kind in CASES])
def test_registered_op_rejects_inconsistent_operand(op, kind):
    call, cases = OPS[op]
    changes, error, message = cases[kind]
    call()  # the consistent call runs
    with pytest.raises(
        error, match=rf"spae_fast::{op}: {message}" if "spae_fast::" not in message else message
    ):
        call(**changes)


@pytest.mark.parametrize("op", ["nearest", "topk", "saq", "semantic_loss"])
def test_check_finite_must_be_a_bool(op):
    """The public functions refuse a non-bool flag (None used to turn the NaN check off silently)."""
    weight = _weight()
    calls = {
        "nearest": lambda: spae_fast.nearest(torch.randn(5, D), weight, check_finite=None),
        "topk": lambda: spae_fast.topk(torch.randn(5, D), weight, 2, check_finite=0),
        "saq": lambda: spae_fast.saq(torch.randn(1, D, 4, 4), weight, [1, 2], check_finite="yes"),
        "semantic_loss": lambda: spae_fast.semantic_loss(
            torch.randn(2, D),
            weight,
            torch.tensor([1]),
            torch.tensor([0, 1]),
            torch.tensor([0, 0]),
            check_finite=None,
        ),
    }
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        calls[op]()


def test_limits_are_refused_before_any_allocation():
    """D and V past the limits every backend shares (spae_fast.ops.boundary) are refused on meta tensors."""
    from spae_fast.ops import boundary

    with pytest.raises(ValueError, match=rf"D <= {boundary.MAX_DIM}"):
        spae_fast.Codebook(torch.empty(2, boundary.MAX_DIM + 1, device="meta"))
    with pytest.raises(ValueError, match=rf"at most {boundary.MAX_ROWS}"):
        spae_fast.nearest(
            torch.empty(1, 2, device="meta"), torch.empty(boundary.MAX_ROWS + 1, 2, device="meta")
        )
    with pytest.raises(ValueError, match=r"weight rows must have D in 1\.\.65536"):
        topk_call(weight=torch.empty(V, boundary.MAX_DIM + 1, device="meta"))
