"""The native codebook packs (`pack_codebook`, the int8 pre-filter copy) against a straightforward reference.

The packs process 16 rows at a time in vectors of 2, 4 or 8 fp64 lanes (`set_packing_lanes`); each must give
bitwise what the row-by-row algorithm gives: per row the fp64 sum of squares in d order, p = (float)(s * e),
the int8 scale (float)(max|p| / 127), q = clamp(round-half-even(p / scale), -127, 127) in fp64 and the
rounding sums. The reference below is that algorithm in numpy (cumsum: a sequential sum), on odd V and D,
zero, tiny and large rows, strided and transposed tables, every dtype and metric and every lane width. Then
`Codebook.repack_`: after a re-pack in place every result is bitwise a new Codebook's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spae_fast
from spae_fast import _native
from spae_fast.ops import common

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
METRICS = ("l2", "ip", "cosine")
LANES = tuple(lanes for lanes in (2, 4, 8) if _native.cpu_module().set_packing_lanes(lanes))
_native.cpu_module().set_packing_lanes(0)


@pytest.fixture(params=LANES, ids=lambda lanes: f"lanes{lanes}")
def lanes(request):
    native = _native.cpu_module()
    assert native.set_packing_lanes(request.param)
    assert native.get_packing_lanes() == request.param
    yield request.param
    assert native.set_packing_lanes(0)


def _sequential_sum(values: np.ndarray) -> np.ndarray:
    """Row sums of a [V, D] fp64 array added in d order (as the scalar loop)."""
    return np.cumsum(values, axis=1)[:, -1] if values.shape[1] else np.zeros(values.shape[0])


def _round_up(values: np.ndarray) -> np.ndarray:
    rounded = values.astype(np.float32)
    low = rounded.astype(np.float64) < values
    rounded[low] = np.nextafter(rounded[low], np.float32(np.inf))
    return rounded


def reference_pack(table: torch.Tensor, metric: str, panel_dtype: torch.dtype):
    """(panels [P, D, 16], bias [P * 16], norm bound) of the row-by-row algorithm."""
    rows, dim = table.shape
    e = table.float().double().numpy()
    sums = _sequential_sum(e * e)  # float * float is exact in fp64
    norms = np.sqrt(sums)
    scale = {"l2": np.full(rows, -2.0), "ip": np.full(rows, -1.0)}.get(metric)
    if scale is None:
        scale = -1.0 / np.maximum(norms, 1e-12)
    p = torch.from_numpy(scale[:, None] * e).float()  # fp64 product rounded once to fp32
    padded = -(-rows // 16) * 16
    values = torch.zeros(padded, dim)
    values[:rows] = p
    if panel_dtype == torch.float16 and metric == "l2":
        stored = (0.5 * values).half()  # fp16 l2 panels hold -e (the kernels double it)
    else:
        stored = values.to(panel_dtype)
    panels = stored.reshape(-1, 16, dim).transpose(1, 2).contiguous()
    bias = torch.full((padded,), float("inf"))
    bias[:rows] = torch.from_numpy(sums).float() if metric == "l2" else 0.0
    used = norms / np.maximum(norms, 1e-12) if metric == "cosine" else norms
    return panels, bias, float(used.max(initial=0.0))


def reference_int8(values: torch.Tensor, bias: torch.Tensor):
    """(words, column data, offsets, bounds) of the int8 copy, from the fp32 panel values p [V, D]."""
    rows, dim = values.shape
    p = values.double().numpy()
    largest = np.abs(p).max(axis=1, initial=0.0)
    scale = (largest / 127.0).astype(np.float32)
    scale[~(scale > 0)] = 1.0
    scale64 = scale.astype(np.float64)[:, None]
    q = np.clip(np.rint(p / scale64), -127, 127)  # rint: round half to even
    back = scale64 * q
    norm = _sequential_sum(p * p)
    rounding = _sequential_sum((p - back) * (p - back))
    rounded = _sequential_sum(back * back)
    num_panels, quads = -(-rows // 16), (dim + 3) // 4
    padded_q = np.zeros((num_panels * 16, quads * 4), dtype=np.int64)
    padded_q[:rows, :dim] = q
    bytes_ = (padded_q & 0xFF).reshape(num_panels * 16, quads, 4)
    words = bytes_[..., 0] | bytes_[..., 1] << 8 | bytes_[..., 2] << 16 | bytes_[..., 3] << 24
    words = torch.from_numpy(words.astype(np.uint32).view(np.int32)).reshape(num_panels, 16, quads)
    columns = np.zeros((num_panels * 16, 4), dtype=np.float32)
    columns[:, 3] = np.inf
    columns[:rows, 0] = scale
    columns[:rows, 1] = _round_up(np.sqrt(norm))
    columns[:rows, 2] = _round_up(np.sqrt(rounding))
    columns[:rows, 3] = bias[:rows].numpy()
    offsets = np.zeros(num_panels * 16, dtype=np.int32)
    offsets[:rows] = 128 * q.sum(axis=1).astype(np.int64)
    largest_bias = np.abs(bias[:rows].double().numpy()).max()
    bounds = [np.sqrt(norm).max(), np.sqrt(rounding).max(), np.sqrt(rounded).max(), largest_bias]
    return (
        words.transpose(1, 2).contiguous(),
        torch.from_numpy(columns).reshape(num_panels, 16, 4).transpose(1, 2).contiguous(),
        torch.from_numpy(offsets),
        torch.tensor(bounds, dtype=torch.float64),
    )


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def _tables(dtype: torch.dtype):
    """Odd shapes, ties, zero / tiny / large rows, strided and transposed layouts."""
    generator = torch.Generator().manual_seed(7)
    for rows, dim in ((1, 1), (17, 3), (33, 257), (70, 64), (131, 19)):
        table = torch.randn(rows, dim, generator=generator) * torch.rand(rows, 1, generator=generator) * 4
        table[0] = 0.0  # zero row: cosine's eps, the int8 scale's fallback
        if rows > 5:
            table[1] = 1e-30  # underflows bf16 / fp16 to 0 or stays tiny in fp32
            table[2] = torch.randint(-3, 4, (dim,), generator=generator).float()  # exact halves: q ties
            table[3] = table[2]
            table[4, 0] = 6e4 if dtype == torch.float16 else 3e18  # large (l2 sum below the fp32 maximum)
        yield f"{rows}x{dim}", table.to(dtype)
    wide = torch.randn(45, 2 * 37, generator=generator).to(dtype)
    yield "strided", wide[:, ::2]
    yield "transposed", torch.randn(29, 45, generator=generator).to(dtype).t()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("narrow", (True, False), ids=("own_dtype", "fp32_panels"))
def test_pack_matches_reference(lanes, dtype, metric, narrow):
    for name, table in _tables(dtype):
        panels, bias, bound = torch.ops.spae_fast.pack_codebook(table, metric, narrow)
        expected = reference_pack(table, metric, panels.dtype)
        assert panels.dtype == common.panel_dtype(dtype, metric, narrow)
        assert torch.equal(_bits(panels), _bits(expected[0])), name
        assert torch.equal(_bits(bias), _bits(expected[1])), name
        assert float(bound) == expected[2], name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_int8_copy_matches_reference(lanes, dtype, metric):
    for name, table in _tables(dtype):
        panels, bias, _ = torch.ops.spae_fast.pack_codebook(table, metric)
        rows, dim = table.shape
        fp32_values = panels.float().transpose(1, 2).reshape(-1, dim)[:rows]  # p as the kernels read it
        if panels.dtype == torch.float16 and metric == "l2":
            fp32_values = 2.0 * fp32_values
        got = common._pack_int8(panels, bias, rows, dim, metric)
        expected = reference_int8(fp32_values, bias)
        for part, (a, b) in enumerate(zip(got, expected)):
            assert torch.equal(_bits(a), _bits(b)), (name, part)


@pytest.mark.parametrize("bad", (float("nan"), float("inf"), 1e30), ids=("nan", "inf", "overflow"))
def test_pack_reports_lowest_bad_row(lanes, bad):
    table = torch.randn(100, 33)
    table[70, 5] = bad
    table[40, 32] = bad
    for metric in METRICS:
        if bad == 1e30 and metric != "l2":
            torch.ops.spae_fast.pack_codebook(table, metric)  # only l2 forms ||e||^2 in fp32
            continue
        with pytest.raises(ValueError, match="row 40"):
            torch.ops.spae_fast.pack_codebook(table, metric)


# ---- Codebook.repack_ ----------------------------------------------------------------------------------------


def _results(codebook: spae_fast.Codebook, queries: torch.Tensor):
    return (
        spae_fast.nearest(queries, codebook),
        spae_fast.nearest(queries, codebook, prefilter="none"),
        spae_fast.topk(queries, codebook, 4),
    )


def _assert_same(a, b):
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert torch.equal(_bits(u), _bits(v))


def _derived_int8(codebook):
    return codebook._derived.get("int8_prefilter")


@pytest.mark.parametrize("copy", (True, False), ids=("copy", "shared"))
@pytest.mark.parametrize("metric", METRICS)
def test_repack_in_place_equals_new_codebook(copy, metric):
    generator = torch.Generator().manual_seed(3)
    table = torch.randn(300, 40, generator=generator)
    noise = 0.01 * torch.randn(64, 40, generator=generator)
    queries = table[torch.randint(0, 300, (64,), generator=generator)] + noise
    codebook = spae_fast.Codebook(table, metric, copy=copy)
    before = _results(codebook, queries)
    panels, bias, int8 = codebook.cpu_panels, codebook.cpu_bias, _derived_int8(codebook)
    owned = codebook.weight
    with torch.no_grad():
        owned.mul_(-1.5).add_(0.25)  # the owner's in-place update (the shared table when copy=False)
    with pytest.raises(RuntimeError, match="repack_"):
        spae_fast.nearest(queries, codebook)  # stale: refused until re-packed
    assert codebook.repack_() is codebook
    assert codebook.cpu_panels.data_ptr() == panels.data_ptr()  # the same storage, re-packed
    assert codebook.cpu_bias.data_ptr() == bias.data_ptr()
    if int8 is not None:
        assert _derived_int8(codebook)[0].data_ptr() == int8[0].data_ptr()  # refreshed in its storage
    after = _results(codebook, queries)
    _assert_same(after, _results(spae_fast.Codebook(owned.clone(), metric), queries))
    assert not torch.equal(before[0][1], after[0][1])  # the search sees the new table (no stale panels)
    if int8 is not None:
        fresh = spae_fast.Codebook(owned.clone(), metric)
        spae_fast.nearest(queries, fresh)
        for a, b in zip(_derived_int8(codebook), _derived_int8(fresh)):
            assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repack_with_new_table(dtype):
    generator = torch.Generator().manual_seed(5)
    first, second = (torch.randn(77, 21, generator=generator).to(dtype) for _ in range(2))
    queries = torch.randn(16, 21, generator=generator).to(dtype)
    for kwargs in ({}, {"copy": False}, {"keep_weight": False}):
        codebook = spae_fast.Codebook(first, "l2", **kwargs)
        spae_fast.nearest(queries, codebook)  # builds the int8 copy where available
        codebook.repack_(second)
        _assert_same(_results(codebook, queries), _results(spae_fast.Codebook(second, "l2"), queries))
        assert torch.equal(codebook.weight, second)
        if kwargs.get("copy", True) and kwargs.get("keep_weight", True):
            assert codebook.weight.data_ptr() != second.data_ptr()  # still its own copy


def test_repack_rejects_bad_tables():
    codebook = spae_fast.Codebook(torch.randn(40, 8), "l2")
    with pytest.raises(ValueError, match="shape"):
        codebook.repack_(torch.randn(41, 8))
    with pytest.raises(ValueError, match="dtype"):
        codebook.repack_(torch.randn(40, 8, dtype=torch.float64).to(torch.bfloat16))
    with pytest.raises(ValueError, match="keep_weight=False"):
        spae_fast.Codebook(torch.randn(40, 8), keep_weight=False).repack_()
    bad = torch.randn(40, 8)
    bad[9, 3] = float("nan")
    with pytest.raises(ValueError, match="row 9"):
        codebook.repack_(bad)
    with pytest.raises(RuntimeError, match="repack_ failed"):  # refuses to search a half-packed table
        spae_fast.nearest(torch.randn(2, 8), codebook)
    good = torch.randn(40, 8)
    codebook.repack_(good)
    _assert_same(_results(codebook, good[:5]), _results(spae_fast.Codebook(good), good[:5]))
