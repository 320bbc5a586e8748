"""`Codebook`: the frozen, pre-packed table gives the same results as a raw tensor and guards its weight."""

from __future__ import annotations

import pytest
import torch
from _spae_checks import DTYPES, METRICS, assert_identical, check_search, gaussian, queries_for

import spae_fast


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_results_as_raw_tensor(impl, metric, dtype):
    weight = gaussian(203, 17, seed=1, dtype=dtype)
    x = queries_for(weight, 45, seed=2, dtype=dtype)
    codebook = spae_fast.Codebook(weight, metric)
    for k in (1, 6):
        via_codebook = spae_fast.topk(x, codebook, k, backend=impl)
        assert_identical(via_codebook, spae_fast.topk(x, weight, k, metric=metric, backend=impl), f"k={k}")
        check_search(x, weight, metric, *via_codebook, k=k)
    assert_identical(
        spae_fast.nearest(x, codebook, backend=impl),
        spae_fast.nearest(x, codebook, metric=metric, backend=impl),
        "metric given explicitly",
    )


def test_properties_and_packing():
    weight = gaussian(35, 9, seed=1, dtype=torch.bfloat16)
    codebook = spae_fast.Codebook(weight, "cosine")
    assert codebook.num_rows == 35 and codebook.dim == 9
    assert codebook.dtype == torch.bfloat16 and codebook.device == torch.device("cpu")
    assert codebook.metric == "cosine"
    assert "rows=35" in repr(codebook) and "cosine" in repr(codebook)
    # 3 panels of 16 rows, fp32: [3, 9, 16] plus a bias per padded row
    assert tuple(codebook.cpu_panels.shape) == (3, 9, 16) and codebook.cpu_panels.dtype == torch.float32
    assert codebook.nbytes_packed() == 3 * 9 * 16 * 4 + 48 * 4
    assert not codebook.weight.requires_grad


def test_strided_weight(impl):
    base = gaussian(60, 30, seed=4)
    weight = base[::2, 1::3]  # [30, 10], non-contiguous
    x = queries_for(weight.contiguous(), 20, seed=5)
    assert_identical(
        spae_fast.topk(x, spae_fast.Codebook(weight), 3, backend=impl),
        spae_fast.topk(x, spae_fast.Codebook(weight.contiguous()), 3, backend=impl),
        "strided weight",
    )


@pytest.mark.parametrize("metric", METRICS)
def test_metric_mismatch_raises(metric):
    weight = gaussian(20, 4, seed=1)
    codebook = spae_fast.Codebook(weight, metric)
    x = gaussian(3, 4, seed=2)
    for other in METRICS:
        if other == metric:
            continue
        with pytest.raises(
            ValueError, match=rf"metric='{other}' differs from the Codebook's metric '{metric}'"
        ):
            spae_fast.nearest(x, codebook, metric=other)
        with pytest.raises(ValueError, match="differs from the Codebook's metric"):
            spae_fast.topk(x, codebook, 2, metric=other, backend="torch")


def _search(op, x, codebook, backend):
    if op == "nearest":
        return spae_fast.nearest(x, codebook, backend=backend)
    return spae_fast.topk(x, codebook, 3, backend=backend)


CALLER_EDITS = {
    "add_": lambda w: w.add_(1.0),
    "row zero_": lambda w: w[3].zero_(),
    "copy_": lambda w: w.copy_(torch.randn_like(w)),
    ".data": lambda w: w.data.__setitem__(7, 100.0),  # bypasses the version counter
    ".numpy()": lambda w: w.numpy().__setitem__(7, 100.0),  # so does this
}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("op", ["nearest", "topk"])
@pytest.mark.parametrize("edit", list(CALLER_EDITS))
def test_codebook_searches_the_table_as_built_after_the_caller_edits_it(backend, op, edit):
    """The Codebook holds its own copy: no edit of the caller's tensor can make its packed forms stale."""
    x = gaussian(6, 5, seed=2)
    weight = gaussian(40, 5, seed=1)
    original = weight.clone()
    codebook = spae_fast.Codebook(weight)
    before = _search(op, x, codebook, backend)
    CALLER_EDITS[edit](weight)
    assert not torch.equal(weight, original)
    after = _search(op, x, codebook, backend)
    assert_identical(
        after if op == "topk" else (after[0][:, None], after[1][:, None]),
        before if op == "topk" else (before[0][:, None], before[1][:, None]),
        edit,
    )
    check_search(x, original, "l2", *spae_fast.topk(x, codebook, 3, backend=backend), k=3)
    # a fresh Codebook of the changed table sees the change
    check_search(x, weight, "l2", *spae_fast.topk(x, spae_fast.Codebook(weight), 3, backend=backend), k=3)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("op", ["nearest", "topk"])
def test_in_place_change_of_the_codebooks_own_table_raises(backend, op):
    x = gaussian(6, 5, seed=2)
    for copy, mutate in (
        (True, lambda w, cb: cb.weight.mul_(2.0)),
        (True, lambda w, cb: cb.weight[3].zero_()),
        (False, lambda w, cb: w.add_(1.0)),  # copy=False shares the caller's tensor
        (False, lambda w, cb: w[3].zero_()),
    ):
        weight = gaussian(40, 5, seed=1)
        codebook = spae_fast.Codebook(weight, copy=copy)
        assert (codebook.weight.data_ptr() == weight.data_ptr()) is not copy
        _search(op, x, codebook, backend)  # fine before the change
        mutate(weight, codebook)
        with pytest.raises(RuntimeError, match="modified in place after the Codebook was built"):
            _search(op, x, codebook, backend)


def test_copy_must_be_a_bool():
    with pytest.raises(TypeError, match="copy must be a bool, got NoneType"):
        spae_fast.Codebook(gaussian(4, 3, seed=1), copy=None)


def test_codebook_works_under_inference_mode():
    """Built inside or outside torch.inference_mode(), used inside or outside: every op runs and agrees."""
    weight, x = gaussian(40, 8, seed=1), gaussian(6, 8, seed=2)
    z = gaussian(2 * 8 * 4 * 4, 1, seed=3).reshape(2, 8, 4, 4)
    outside = spae_fast.Codebook(weight)
    expected = (spae_fast.topk(x, outside, 3), spae_fast.saq(z, outside, [1, 2, 4]))
    with torch.inference_mode():
        inside = spae_fast.Codebook(weight)
        for codebook in (inside, outside):
            assert_identical(spae_fast.topk(x, codebook, 3), expected[0], "topk")
            assert torch.equal(spae_fast.saq(z, codebook, [1, 2, 4]), expected[1])
            loss = spae_fast.semantic_loss(x, codebook, torch.tensor([1, 2]), torch.tensor([0, 2]),
                                           torch.zeros(6, dtype=torch.int64))  # fmt: skip
            assert torch.isfinite(loss)
    assert_identical(spae_fast.topk(x, inside, 3), expected[0], "topk after inference_mode")


def test_out_of_place_use_of_weight_is_fine():
    weight = gaussian(40, 5, seed=1)
    codebook = spae_fast.Codebook(weight)
    _ = weight * 2 + 1  # reading the weight does not count as a change
    _ = weight.clone().add_(1)
    x = gaussian(6, 5, seed=2)
    spae_fast.nearest(x, codebook)


def test_requires_grad_weight_is_detached_and_gets_no_gradient():
    weight = gaussian(30, 6, seed=1).requires_grad_()
    codebook = spae_fast.Codebook(weight)
    assert not codebook.weight.requires_grad
    x = gaussian(4, 6, seed=2).requires_grad_()
    for cb in (codebook, weight):
        dist, _ = spae_fast.nearest(x, cb)
        dist.sum().backward()
    assert weight.grad is None, "the codebook is frozen: no gradient flows to it"
    assert x.grad is not None


def test_large_codebook_many_panels():
    """V far above the split threshold, D not a multiple of anything."""
    weight = gaussian(5000 + 3, 37, seed=7)
    x = queries_for(weight, 11, seed=8)
    codebook = spae_fast.Codebook(weight, "l2")
    result = spae_fast.topk(x, codebook, 10)
    check_search(x, weight, "l2", *result, k=10)
    assert_identical(result, spae_fast.topk(x, weight, 10), "Codebook vs raw")
