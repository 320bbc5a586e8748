"""Codebook(keep_weight=False): only the packed panels are held; row lookups and every op read them exactly."""

from __future__ import annotations

import pytest
import torch

import spae_fast

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _table(dtype, rows=45, dim=11, seed=0):
    table = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    table[2, 0], table[2, 1] = 0.0, -0.0
    table[3, 4] = torch.finfo(dtype).tiny / 8  # subnormal
    if dtype == torch.float16:
        table[4, 5] = 65504.0  # -2e overflows fp16, -e does not
    return table


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_rows_and_weight_unpack_the_table_bitwise(dtype, metric):
    table = _table(dtype)
    codebook = spae_fast.Codebook(table, metric, keep_weight=False)
    assert not codebook.keeps_weight and codebook._weight is None
    assert codebook.dtype == dtype and codebook.num_rows == 45 and codebook.dim == 11
    assert torch.equal(_bits(codebook.weight), _bits(table))
    ids = torch.tensor([[3, 0], [44, 2], [4, 4]])
    assert torch.equal(_bits(codebook.rows(ids)), _bits(table[ids]))
    kept = spae_fast.Codebook(table, metric)
    assert torch.equal(_bits(kept.rows(ids)), _bits(table[ids]))
    # it holds the panels and bias only: the table's bytes in the panel dtype, no copy of the table
    assert codebook.nbytes_packed() == codebook.cpu_panels.nbytes + codebook.cpu_bias.nbytes
    assert codebook.cpu_panels.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_ops_on_a_packed_only_codebook_are_those_of_the_full_one(isa, dtype, metric):
    table = _table(dtype, rows=61, dim=13, seed=1)
    packed_only = spae_fast.Codebook(table, metric, keep_weight=False)
    full = spae_fast.Codebook(table, metric)
    x = torch.randn(23, 13, generator=torch.Generator().manual_seed(2))
    for prefilter in ("none", "auto"):
        for a, b in zip(
            spae_fast.nearest(x, packed_only, prefilter=prefilter),
            spae_fast.nearest(x, full, prefilter=prefilter),
        ):
            assert torch.equal(a, b)
        for a, b in zip(
            spae_fast.topk(x, packed_only, 7, prefilter=prefilter),
            spae_fast.topk(x, full, 7, prefilter=prefilter),
        ):
            assert torch.equal(a, b)
    if metric == "l2":
        z = torch.randn(2, 13, 4, 4, generator=torch.Generator().manual_seed(3))
        assert torch.equal(spae_fast.saq(z, packed_only, (1, 2, 4)), spae_fast.saq(z, full, (1, 2, 4)))
        index, offsets = torch.tensor([1, 5, 60, 7]), torch.tensor([0, 2, 4])
        sets = torch.tensor([0, 1] * 11 + [0])
        a = spae_fast.semantic_loss(x, packed_only, index, offsets, sets, reduction="none")
        b = spae_fast.semantic_loss(x, full, index, offsets, sets, reduction="none")
        assert torch.equal(a, b)


def test_packed_only_is_refused_where_it_cannot_unpack_exactly():
    table = _table(torch.float32)
    with pytest.raises(ValueError, match="keep_weight=False needs a CPU table and metric 'l2' or 'ip'"):
        spae_fast.Codebook(table, "cosine", keep_weight=False)
    with pytest.raises(TypeError, match="keep_weight must be a bool"):
        spae_fast.Codebook(table, "l2", keep_weight=0)
    codebook = spae_fast.Codebook(table, "l2", keep_weight=False)
    with pytest.raises(IndexError, match=r"ids must be in \[0, 45\)"):
        codebook.rows(torch.tensor([45]))
    with pytest.raises(TypeError, match="ids must be an int64 tensor"):
        codebook.rows(torch.tensor([1], dtype=torch.int32))
    assert "keep_weight=False" in repr(codebook)


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_search_of_a_packed_only_codebook_unpacks_nothing(dtype, monkeypatch):
    table = _table(dtype, rows=70, dim=9, seed=4)
    packed_only = spae_fast.Codebook(table, "l2", keep_weight=False)
    full = spae_fast.Codebook(table, "l2")
    x = torch.randn(31, 9, generator=torch.Generator().manual_seed(5))
    expected = [spae_fast.nearest(x, full), spae_fast.topk(x, full, 5)]
    monkeypatch.setattr(packed_only, "rows", lambda ids: pytest.fail("the search unpacked the table"))
    for prefilter in ("none", "auto"):
        got = [
            spae_fast.nearest(x, packed_only, prefilter=prefilter),
            spae_fast.topk(x, packed_only, 5, prefilter=prefilter),
        ]
        for a, b in zip(got, expected):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    monkeypatch.undo()
    # with autograd the backward reads the chosen rows: the exact unpack, the same gradient
    grads = []
    for codebook in (packed_only, full):
        leaf = x.clone().requires_grad_(True)
        dist, _ = spae_fast.topk(leaf, codebook, 3)
        grads.append(torch.autograd.grad(dist.sum(), leaf)[0])
    assert torch.equal(grads[0], grads[1])
