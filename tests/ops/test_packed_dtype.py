"""bf16 / fp16 tables packed in their own dtype (metric l2 / ip) give bitwise the results of fp32 panels.

The narrow panels hold exactly the fp32 values of today's packing (-2e or -e; fp16 l2 holds -e and the kernel
doubles it), widened in the micro-kernel's load, so every op must agree bit for bit with the same table packed
in fp32 (`pack_codebook(..., narrow=False)`), on every ISA: nearest, topk (with and without the int8
pre-filter, whose copy and rescoring read the narrow panels), saq and semantic_loss's fp32 path. Plus the fp64
check of the answers and the boundary checks of the new panel dtype.
"""

from __future__ import annotations

import pytest
import torch

import spae_fast
from spae_fast import _native
from spae_fast.ops import common

NARROW = (torch.bfloat16, torch.float16)
PREFILTERS = ("none", "auto") + (("int8",) if common.int8_prefilter_available() else ())


def _pair(table: torch.Tensor, metric: str) -> tuple[spae_fast.Codebook, spae_fast.Codebook]:
    """(Codebook packed in the table's dtype, the same Codebook with today's fp32 panels)."""
    narrow = spae_fast.Codebook(table, metric)
    wide = spae_fast.Codebook(table, metric)
    wide.cpu_panels, wide.cpu_bias, wide.cpu_norm_bound = torch.ops.spae_fast.pack_codebook(
        wide.weight, metric, False
    )
    assert wide.cpu_panels.dtype == torch.float32
    assert narrow.cpu_panels.dtype == (table.dtype if metric != "cosine" else torch.float32)
    return narrow, wide


def _table(dtype, rows, dim, seed=0, ties=False):
    generator = torch.Generator().manual_seed(seed)
    if ties:  # small integers: many exactly equal distances, duplicate rows
        table = torch.randint(-3, 4, (rows, dim), generator=generator).to(dtype)
        table[rows // 2] = table[1]
        table[rows - 1] = table[1]
        return table
    return torch.randn(rows, dim, generator=generator).to(dtype)


def _queries(table, count, seed=1, ties=False):
    generator = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(-3, 4, (count, table.shape[1]), generator=generator).float()
    near = table[torch.randint(0, table.shape[0], (count // 2,), generator=generator)].float()
    near = near + 0.05 * torch.randn(near.shape, generator=generator)
    far = torch.randn(count - count // 2, table.shape[1], generator=generator)
    return torch.cat([near, far])


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(
        a.view(torch.int32) if a.dtype == torch.float32 else a,
        b.view(torch.int32) if b.dtype == torch.float32 else b,
    )


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_narrow_panels_hold_the_fp32_panels_exactly(dtype, metric):
    table = _table(dtype, 37, 19)
    table[5, 3] = 0.0
    table[6, 4] = -0.0
    table[7, 0] = torch.finfo(dtype).tiny / 4  # a subnormal
    narrow, wide = _pair(table, metric)
    widened = narrow.cpu_panels.float()
    if dtype == torch.float16 and metric == "l2":
        widened = widened * 2  # fp16 l2 panels hold -e (the kernels double it)
    _same(widened, wide.cpu_panels)
    _same(narrow.cpu_bias, wide.cpu_bias)
    assert torch.equal(narrow.cpu_norm_bound, wide.cpu_norm_bound)
    if metric != "cosine":
        assert narrow.nbytes_packed() < wide.nbytes_packed()


def test_fp16_l2_panels_keep_values_whose_double_overflows_fp16():
    table = _table(torch.float16, 21, 9) * 1000
    table[3, 2] = 65504.0  # -2e = -131008 is past fp16's range; -e is not
    table[4, 1] = -40000.0
    narrow, wide = _pair(table, "l2")
    _same(narrow.cpu_panels.float() * 2, wide.cpu_panels)
    x = _queries(table, 13) * 1000
    for a, b in zip(
        spae_fast.nearest(x, narrow, prefilter="none"), spae_fast.nearest(x, wide, prefilter="none")
    ):
        _same(a, b)


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", [(37, 19), (203, 33), (16, 8)])
def test_nearest_and_topk_are_bitwise_those_of_fp32_panels(isa, dtype, metric, ties, shape):
    rows, dim = shape
    table = _table(dtype, rows, dim, ties=ties)
    narrow, wide = _pair(table, metric)
    x = _queries(table, 29, ties=ties)
    for prefilter in PREFILTERS:
        a = spae_fast.nearest(x, narrow, prefilter=prefilter)
        b = spae_fast.nearest(x, wide, prefilter=prefilter)
        _same(a[0], b[0])
        _same(a[1], b[1])
        for k in (1, 5, min(16, rows), min(20, rows)):
            if k > common.PREFILTER_MAX_K and prefilter == "int8":
                continue
            a = spae_fast.topk(x, narrow, k, prefilter=prefilter)
            b = spae_fast.topk(x, wide, k, prefilter=prefilter)
            _same(a[0], b[0])
            _same(a[1], b[1])


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_narrow_packed_answers_match_fp64(isa, dtype, metric):
    table = _table(dtype, 203, 33, seed=3)
    narrow, _ = _pair(table, metric)
    x = _queries(table, 41, seed=4)
    e64, x64 = table.double(), x.double()
    d64 = torch.cdist(x64, e64) ** 2 if metric == "l2" else -(x64 @ e64.T)
    for prefilter in PREFILTERS:
        _, index = spae_fast.nearest(x, narrow, prefilter=prefilter)
        chosen = d64.gather(1, index[:, None]).squeeze(1)
        best = d64.min(1).values
        scale = (x64.norm(dim=1) * e64.norm(dim=1).max()).clamp_min(1.0)
        assert bool(((chosen - best) <= 1e-5 * scale).all())
    # ties: small integers are exact in fp32 too, so the answer is fp64's argmin, lowest index first
    table = _table(dtype, 37, 19, ties=True)
    narrow, _ = _pair(table, metric)
    x = _queries(table, 29, ties=True)
    e64, x64 = table.double(), x.double()
    d64 = ((x64[:, None, :] - e64[None]) ** 2).sum(-1) if metric == "l2" else -(x64 @ e64.T)
    for prefilter in PREFILTERS:
        _, index = spae_fast.nearest(x, narrow, prefilter=prefilter)
        assert torch.equal(index, d64.argmin(1))  # argmin returns the first minimum


@pytest.mark.skipif(not common.int8_prefilter_available(), reason="no AVX512-VNNI int8 pre-filter here")
@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_int8_copy_of_narrow_panels_is_that_of_fp32_panels(dtype, metric):
    table = _table(dtype, 53, 23)
    narrow, wide = _pair(table, metric)
    a = common._pack_int8(narrow.cpu_panels, narrow.cpu_bias, 53, 23, metric)
    b = common._pack_int8(wide.cpu_panels, wide.cpu_bias, 53, 23, metric)
    for left, right in zip(a, b):
        assert torch.equal(left, right)


@pytest.mark.parametrize("dtype", NARROW)
def test_saq_is_bitwise_that_of_fp32_panels(isa, dtype):
    table = _table(dtype, 77, 13, seed=5)
    narrow, wide = _pair(table, "l2")
    z = torch.randn(3, 13, 8, 8, generator=torch.Generator().manual_seed(6))
    for prefilter in PREFILTERS:
        for mode in ("saq", "rq"):
            a = spae_fast.saq(z, narrow, (1, 2, 4, 8), mode=mode, prefilter=prefilter)
            b = spae_fast.saq(z, wide, (1, 2, 4, 8), mode=mode, prefilter=prefilter)
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", NARROW)
def test_semantic_loss_fp32_path_is_bitwise_that_of_fp32_panels(isa, dtype):
    table = _table(dtype, 83, 21, seed=7)
    narrow, wide = _pair(table, "l2")
    generator = torch.Generator().manual_seed(8)
    z = torch.randn(17, 21, generator=generator)
    index = torch.randint(0, 83, (30,), generator=generator)
    offsets = torch.tensor([0, 3, 10, 10, 30])
    sets = torch.randint(-1, 4, (17,), generator=generator)
    results = []
    for codebook in (narrow, wide):
        leaf = z.clone().requires_grad_(True)
        loss = spae_fast.semantic_loss(leaf, codebook, index, offsets, sets, tau=0.7, reduction="none")
        loss.sum().backward()
        results.append((loss.detach(), leaf.grad))
    _same(results[0][0], results[1][0])
    _same(results[0][1], results[1][1])


def test_panel_dtype_is_checked_at_both_boundaries():
    table = _table(torch.bfloat16, 40, 12)
    panels, bias, bound = torch.ops.spae_fast.pack_codebook(table, "l2")
    x = torch.randn(5, 12)
    empty = (common.EMPTY,) * 4
    # op boundary: bf16 panels with an fp16 table, narrow panels for cosine
    with pytest.raises(TypeError, match=r"panels must be float32 of shape \(3, 12, 16\).*or its own float16"):
        torch.ops.spae_fast.nearest(
            x, table.half(), panels, bias, bound, *empty, "l2", "cpu", True, "none", "default"
        )
    with pytest.raises(TypeError, match=r"panels must be float32 of shape \(3, 12, 16\)"):
        torch.ops.spae_fast.nearest(
            x, table, panels, bias, bound, *empty, "cosine", "cpu", True, "none", "default"
        )
    # native boundary: bf16 panels declared fp32 are half the bytes the call would read
    C = _native.cpu_module()
    dist, index = torch.empty(5, 1), torch.empty(5, 1, dtype=torch.int64)
    call = {
        "x": _native.buffer(x), "num_queries": 5, "dim": 12, "x_row_stride": 12, "x_col_stride": 1, "x_dtype": 0,
        "panels": _native.buffer(panels), "panels_dtype": 0, "bias": _native.buffer(bias), "codebook_rows": 40,
        "max_norm": float(bound), "metric": 0, "k": 1, "check_finite": True, "num_threads": 1, "out_dist": _native.buffer(dist),
        "out_index": _native.buffer(index), "weight": _native.NO_BUFFER, "weight_row_stride": 0, "weight_col_stride": 0,
        "weight_dtype": 0, "prefilter_panels": _native.NO_BUFFER, "prefilter_columns": _native.NO_BUFFER,
        "prefilter_offsets": _native.NO_BUFFER, "prefilter_bounds": [], "prefilter_adaptive": False,
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"'panels' holds 1152 bytes, but the call reads or writes 2304"):
        C.search(**call)
    code, _, _ = C.search(**{**call, "panels_dtype": 1})
    assert code == 0
    with pytest.raises(ValueError, match="'panels_dtype' must be in"):
        C.search(**{**call, "panels_dtype": 3})
    # native packing: narrow panels only in the table's own dtype, never for cosine
    out = torch.empty(3, 12, 16, dtype=torch.float16)
    pack = {
        "weight": _native.buffer(table), "num_rows": 40, "dim": 12, "weight_row_stride": 12, "weight_col_stride": 1,
        "weight_dtype": 1, "metric": 0, "out_panels": _native.buffer(out), "out_panels_dtype": 2,
        "out_bias": _native.buffer(torch.empty(48)), "num_threads": 1,
    }  # fmt: skip
    with pytest.raises(ValueError, match="'out_panels_dtype' must be float32, or the table's own"):
        C.pack_codebook(**pack)
    with pytest.raises(ValueError, match="'out_panels_dtype' must be float32, or the table's own"):
        C.pack_codebook(**{**pack, "out_panels_dtype": 1, "metric": 2})
