"""The Triton kernels under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) against the reference.

Runs on machines without a GPU. Shapes stay tiny (the interpreter executes every program in numpy) and fp32
only: the interpreter's bf16 ``tl.dot`` is wrong, so 16-bit operands are tested in tests/gpu. Covered: every
metric, nearest and top-k, ties (duplicate rows, integer data), sizes that are not multiples of any block,
the split-V path (several codebook chunks merged by the int64 atomic min / partial sets), non-contiguous
inputs, exact mode (including forced second-stage and full-scan rescoring), bitwise determinism across
batch sizes, the checks on bad inputs, and that the kernels import from the *installed* package.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

# The interpreter must be chosen before Triton is first imported in this process. On a GPU machine the
# Triton kernels run for real in tests/gpu instead.
if torch.cuda.is_available():
    pytest.skip(
        "a CUDA device is present: the Triton kernels are tested on it (tests/gpu)", allow_module_level=True
    )
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run this file on its own "
                "or with TRITON_INTERPRET=1", allow_module_level=True)  # fmt: skip
os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from _spae_checks import assert_identical, check_search, gaussian, integers, queries_for

import spae_fast
from spae_fast import _ref
from spae_fast.ops import gpu_saq, gpu_search

METRICS = ("l2", "ip", "cosine")


def _search(x, weight, k=None, **kwargs):
    kwargs.setdefault("backend", "triton")
    if k is None:
        return spae_fast.nearest(x, weight, **kwargs)
    return spae_fast.topk(x, weight, k, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Packaging and availability
# ----------------------------------------------------------------------------------------------------------


def test_kernels_import_from_installed_package():
    import spae_fast.triton_kernels
    from spae_fast.triton_kernels import nearest, saq

    package_dir = os.path.dirname(spae_fast.__file__)
    for module in (nearest, saq):  # kernels/triton/<name>.py is spae_fast.triton_kernels.<name>
        assert os.path.dirname(module.__file__) == os.path.join(package_dir, "triton_kernels")
        assert "site-packages" in module.__file__ or "dist-packages" in module.__file__, module.__file__
    assert callable(nearest.search) and callable(nearest.pair_dot64)
    assert callable(saq.saq_pair_dot64) and saq.SaqLayer is not None


def test_available_reports_interpreter():
    status = spae_fast.available()["triton"]
    assert status.available and "interpreter" in status.reason


def test_auto_stays_on_cpu_backends():
    weight = gaussian(9, 5, seed=1)
    x = gaussian(3, 5, seed=2)
    assert spae_fast.ops.resolve_backend("auto", x.device) == "cpu"
    assert_identical(spae_fast.nearest(x, weight), spae_fast.nearest(x, weight, backend="cpu"), "auto")


# ----------------------------------------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("num", "num_rows", "dim"), [(1, 1, 1), (5, 37, 19), (17, 300, 7), (33, 21, 40)])
def test_nearest_matches_reference(metric, num, num_rows, dim):
    weight = gaussian(num_rows, dim, seed=num_rows + dim)
    x = queries_for(weight, num, seed=num)
    dist, index = _search(x, weight, metric=metric)
    check_search(x, weight, metric, dist, index, k=None)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [2, 3, 8])
def test_topk_matches_reference(metric, k):
    weight = gaussian(45, 13, seed=k)
    x = queries_for(weight, 9, seed=k + 1)
    dist, index = _search(x, weight, k, metric=metric)
    check_search(x, weight, metric, dist, index, k=k)


@pytest.mark.parametrize("k", [1, 4, 7])
def test_topk_k_equals_rows(k):
    weight = gaussian(k, 6, seed=3)
    x = gaussian(4, 6, seed=4)
    dist, index = _search(x, weight, k)
    check_search(x, weight, "l2", dist, index, k=k)


@pytest.mark.parametrize("metric", ("l2", "ip"))
@pytest.mark.parametrize("k", [None, 3])
def test_integer_data_is_bitwise_exact(metric, k):
    """Every fp32 operation is exact on small integers: identical to the reference, ties included."""
    weight = integers(70, 9, seed=5)
    weight[40:50] = weight[:10]  # duplicate rows: exact ties, lowest index wins
    x = integers(19, 9, seed=6)
    dist, index = _search(x, weight, k, metric=metric)
    check_search(x, weight, metric, dist, index, k=k, exact=True)


@pytest.mark.parametrize("metric", METRICS)
def test_duplicate_rows_lowest_index(metric):
    weight = gaussian(50, 8, seed=7)
    weight[33] = weight[5]
    weight[49] = weight[5]
    x = weight[[5, 33, 49]] + 0.0
    _, index = _search(x, weight, metric=metric)
    assert index.tolist() == [5, 5, 5]
    _, index = _search(x, weight, 3, metric=metric)
    assert index[:, :3].tolist() == [[5, 33, 49]] * 3


def test_split_v_chunks_and_partial_sets():
    """Many codebook chunks (split-V): k = 1 merges by int64 atomic min, k > 1 by sorting partial sets."""
    nearest = pytest.importorskip("spae_fast.triton_kernels.nearest")
    config = nearest.default_config(torch.float32, "ieee", torch.device("cpu"))
    chunks, tiles_per_chunk = nearest.plan_chunks(3, 300, 1, config, 4)
    assert chunks > 1 and tiles_per_chunk >= 1
    chunks, tiles_per_chunk = nearest.plan_chunks(40, 300, 1, config, 4)
    assert chunks > 1 and tiles_per_chunk > 1
    weight = gaussian(300, 5, seed=8)
    for num, ks in ((3, (None, 2)), (40, (None, 5))):
        x = queries_for(weight, num, seed=num)
        for k in ks:
            dist, index = _search(x, weight, k)
            check_search(x, weight, "l2", dist, index, k=k)


def test_non_contiguous_inputs():
    weight = gaussian(6, 40, seed=9).T  # [40, 6], column-major
    x = gaussian(6, 11, seed=10).T[::2]  # [6, 6] strided rows
    assert not weight.is_contiguous() and not x.is_contiguous()
    dist, index = _search(x, weight)
    check_search(x, weight, "l2", dist, index, k=None)


def test_batched_shape_and_empty():
    weight = gaussian(20, 4, seed=11)
    x = gaussian(2, 3, 4, seed=12)
    dist, index = _search(x, weight, 2)
    assert dist.shape == (2, 3, 2) and index.shape == (2, 3, 2)
    dist, index = _search(torch.empty(0, 4), weight)
    assert dist.shape == (0,) and index.shape == (0,)


def test_mixed_dtypes_run_in_fp32():
    """bf16 queries against an fp32 codebook: upcast exactly, exact fp32 search (no 16-bit dot)."""
    weight = gaussian(30, 12, seed=13)
    x = queries_for(weight, 8, seed=14).to(torch.bfloat16)
    dist, index = _search(x, weight)
    check_search(x, weight, "l2", dist, index, k=None)
    assert spae_fast.last_search_stats().operands == "float32"


# ----------------------------------------------------------------------------------------------------------
# Exact mode
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [None, 3])
def test_exact_mode_matches_fp64(metric, k):
    weight = gaussian(60, 16, seed=15)
    weight[50] = weight[2]  # a tie
    x = queries_for(weight, 12, seed=16)
    x[0] = weight[2]
    dist, index = _search(x, weight, k, metric=metric, precision="exact")
    check_search(x, weight, metric, dist, index, k=k)
    d64 = _ref.distances_fp64(x, weight, metric)
    expected = torch.sort(d64, dim=1, stable=True).indices[:, : (k or 1)]
    assert torch.equal(index.reshape(12, -1), expected)
    stats = spae_fast.last_search_stats()
    assert stats.precision == "exact" and stats.rows == 12 and stats.candidates >= (k or 1) + 1


@pytest.mark.parametrize("metric", METRICS)
def test_exact_mode_rescoring_paths_agree(metric, monkeypatch):
    """Force every row through the second stage and then the fp64 full scan: same bits as the fast path."""
    weight = gaussian(80, 10, seed=17)
    weight[70] = weight[3]
    x = queries_for(weight, 7, seed=18)
    fast = _search(x, weight, 2, metric=metric, precision="exact")
    assert spae_fast.last_search_stats().rows_rescored == 0
    monkeypatch.setattr(gpu_search, "error_bound", lambda norm_sq64, *args: torch.full_like(norm_sq64, 1e30))
    slow = _search(x, weight, 2, metric=metric, precision="exact")
    stats = spae_fast.last_search_stats()
    assert stats.rows_rescored == 7 and stats.rows_full_scan == 7
    assert_identical(fast, slow, "exact mode, certified vs full scan")


def test_exact_mode_bitwise_across_batch_sizes():
    weight = gaussian(90, 12, seed=19)
    x = queries_for(weight, 20, seed=20)
    full = _search(x, weight, 3, precision="exact")
    parts = [_search(x[i : i + 7], weight, 3, precision="exact") for i in range(0, 20, 7)]
    assert_identical(
        full, (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])), "batch split"
    )


def test_default_mode_bitwise_across_batch_sizes():
    weight = gaussian(40, 12, seed=21)
    x = queries_for(weight, 9, seed=22)
    for k in (None, 3):
        full = _search(x, weight, k)
        parts = [_search(x[a:b], weight, k) for a, b in ((0, 1), (1, 5), (5, 9))]
        assert_identical(full, (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])), f"k={k}")
        again = _search(x, weight, k)
        assert_identical(full, again, "second launch")


@pytest.mark.parametrize("precision", ["tf32", "default"])
def test_precision_names(precision):
    weight = gaussian(30, 8, seed=23)
    x = queries_for(weight, 5, seed=24)
    dist, index = _search(x, weight, precision=precision)
    check_search(x, weight, "l2", dist, index, k=None)
    assert spae_fast.last_search_stats().precision == precision
    with pytest.raises(ValueError, match="precision"):
        _search(x, weight, precision="fp8")


# ----------------------------------------------------------------------------------------------------------
# Bad inputs, caching, autograd
# ----------------------------------------------------------------------------------------------------------


def test_non_finite_and_overflow_rejected():
    weight = gaussian(20, 6, seed=25)
    x = gaussian(5, 6, seed=26)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="row 3"):
        _search(x, weight)
    x[3, 2] = 0.0
    x[1] = 1e36
    with pytest.raises(ValueError, match="row 1"):
        _search(x, weight)
    bad = weight.clone()
    bad[7, 0] = float("inf")
    with pytest.raises(ValueError, match="codebook"):
        _search(gaussian(2, 6, seed=27), bad)
    x[1] = 1e36  # unchecked: indices still in range
    _, index = _search(x, weight, check_finite=False)
    assert bool(((index >= 0) & (index < 20)).all())


def _count_gpu_operands(monkeypatch) -> list:
    """Counts the `gpu_search.GpuOperands` built from now on."""
    built = []
    original = gpu_search.GpuOperands.__init__

    def counting(self, *args):
        built.append(args[1])  # the metric
        original(self, *args)

    monkeypatch.setattr(gpu_search.GpuOperands, "__init__", counting)
    return built


def test_codebook_keeps_its_gpu_operands(monkeypatch):
    weight = gaussian(25, 6, seed=28)
    x = queries_for(weight, 4, seed=29)
    z = gaussian(2, 6, 4, 4, seed=30)
    expected = (
        _search(x, weight),
        _search(x, weight, 3),
        spae_fast.saq(z, weight, (1, 2, 4), backend="triton"),
    )
    built = _count_gpu_operands(monkeypatch)
    codebook = spae_fast.Codebook(weight)
    first = _search(x, codebook)
    kept = codebook.derived(
        "gpu_operands:l2", lambda: pytest.fail("the Codebook did not keep its GPU operands")
    )
    assert isinstance(kept, gpu_search.GpuOperands)
    results = (
        _search(x, codebook),
        _search(x, codebook, 3),
        spae_fast.saq(z, codebook, (1, 2, 4), backend="triton"),
    )
    assert built == ["l2"]  # nearest, topk and saq share the one build
    assert codebook.derived("gpu_operands:l2", lambda: None) is kept
    assert_identical(first, expected[0], "Codebook vs tensor")
    for result, want, what in zip(results, expected, ("nearest", "topk", "saq"), strict=True):
        assert_identical(result, want, what)


def test_plain_tensor_is_prepared_per_call_and_left_untouched(monkeypatch):
    weight = gaussian(25, 6, seed=31)
    x = queries_for(weight, 4, seed=32)
    z = gaussian(2, 6, 4, 4, seed=33)
    built = _count_gpu_operands(monkeypatch)
    _search(x, weight)
    _search(x, weight, 3)
    spae_fast.saq(z, weight, (1, 2, 4), backend="triton")
    empty = torch.empty(0)
    torch.ops.spae_fast.nearest(x, weight, empty, empty, empty, *(empty,) * 4, "l2", "triton", True, "none")
    _search(x, spae_fast.Codebook(weight, copy=False))  # a Codebook sharing the tensor keeps them itself
    assert built == ["l2"] * 5
    assert vars(weight) == {}  # nothing stored on the caller's tensor
    assert not gpu_search._LENDERS.get(weight)


def test_gradient_matches_reference():
    weight = gaussian(30, 7, seed=30)
    x = queries_for(weight, 6, seed=31).requires_grad_()
    dist, _ = _search(x, weight, 2)
    (grad,) = torch.autograd.grad(dist.sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    ref, _ = spae_fast.topk(x_ref, weight, 2, backend="torch")
    (grad_ref,) = torch.autograd.grad(ref.sum(), x_ref)
    torch.testing.assert_close(grad, grad_ref)


def test_pair_dot64_canonical_order():
    nearest = pytest.importorskip("spae_fast.triton_kernels.nearest")
    a = gaussian(3, 70, seed=32)
    b = gaussian(9, 70, seed=33)
    index = torch.tensor([[0, 8, -1], [4, 4, 2], [1, 0, 7]])
    out = nearest.pair_dot64(a, b, index)
    expected = (a.double()[:, None, :] * b.double()[index.clamp_min(0)]).sum(-1)
    expected[0, 2] = 0.0
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
    # the documented order: 32 lanes over d mod 32, fma in ascending d, then pairwise lane sums
    lanes = torch.zeros(3, 3, 32, dtype=torch.float64)
    padded_a = torch.nn.functional.pad(a.double(), (0, 26))
    padded_b = torch.nn.functional.pad(b.double()[index.clamp_min(0)], (0, 26))
    for d0 in range(0, 96, 32):
        lanes = lanes + padded_a[:, None, d0 : d0 + 32] * padded_b[:, :, d0 : d0 + 32]
    while lanes.shape[-1] > 1:
        lanes = lanes.view(3, 3, -1, 2).sum(-1)
    lanes[0, 2] = 0.0
    # the interpreter's fma is a multiply and an add in numpy, exactly what the loop above does
    assert torch.equal(out, lanes[..., 0])


# ----------------------------------------------------------------------------------------------------------
# SAQ / RQ (targets formed inside the kernels)
# ----------------------------------------------------------------------------------------------------------


def check_saq_exact(z, weight, sides, mode, ids):
    """Every layer's id is the exact (fp64) l2 argmin of its fp32 target formed from the ids above, ties
    to the lowest row."""
    firsts = [0]
    for side in sides:
        firsts.append(firsts[-1] + side * side)
    for layer, side in enumerate(sides):
        coefficient = float(layer + 1) if mode == "saq" else 1.0
        rows = torch.arange(z.shape[0] * side * side, device=z.device)
        targets = gpu_saq._saq_targets(z, weight, ids, list(sides), firsts, layer, coefficient, rows)
        d64 = _ref.distances_fp64(targets, weight, "l2")
        expected = torch.sort(d64, dim=1, stable=True).indices[:, 0].view(z.shape[0], side * side)
        assert torch.equal(ids[:, firsts[layer] : firsts[layer + 1]], expected), f"layer {layer}"


@pytest.mark.parametrize("mode", ["saq", "rq"])
def test_saq_integer_data_matches_reference_and_cpu(mode):
    z = integers(2, 6, 4, 4, seed=40)
    weight = integers(37, 6, seed=41)
    weight[30] = weight[2]
    ids = spae_fast.saq(z, weight, (1, 2, 4), mode=mode, backend="triton")
    assert torch.equal(ids, _ref.saq_reference(z, weight, [1, 2, 4], mode))
    assert torch.equal(ids, spae_fast.saq(z, weight, (1, 2, 4), mode=mode, backend="cpu"))
    stats = spae_fast.last_search_stats()
    assert stats is not None


@pytest.mark.parametrize("mode", ["saq", "rq"])
def test_saq_gaussian_is_exact_argmin(mode):
    z = gaussian(3, 5, 4, 4, seed=42).permute(0, 1, 3, 2)  # non-contiguous latents
    weight = gaussian(29, 5, seed=43)
    sides = (1, 2, 2, 4)
    ids = spae_fast.saq(z, weight, sides, mode=mode, backend="triton")
    assert ids.shape == (3, 1 + 4 + 4 + 16)
    check_saq_exact(z, weight, sides, mode, ids)
    stats = spae_fast.last_search_stats()
    assert stats.rows == 3 * 25 and stats.precision == "exact"


def test_saq_uncertain_rows_take_the_materialised_path(monkeypatch):
    z = gaussian(2, 4, 4, 4, seed=44)
    weight = gaussian(20, 4, seed=45)
    fast = spae_fast.saq(z, weight, (1, 2, 4), backend="triton")
    monkeypatch.setattr(gpu_search, "error_bound", lambda norm_sq64, *args: torch.full_like(norm_sq64, 1e30))
    slow = spae_fast.saq(z, weight, (1, 2, 4), backend="triton")
    assert spae_fast.last_search_stats().rows_rescored == 2 * 21
    assert torch.equal(fast, slow)


def test_saq_non_finite_latent_named():
    z = gaussian(2, 4, 4, 4, seed=46)
    z[1, 2, 3, 1] = float("inf")
    with pytest.raises(ValueError):
        spae_fast.saq(z, gaussian(20, 4, seed=47), (1, 2, 4), backend="triton")


def test_quantizer_prepares_its_gpu_operands_once(monkeypatch):
    weight = gaussian(40, 6, seed=34)
    quantizer = spae_fast.SPAEQuantizer(weight, layers=(1, 2, 4), grid=4, backend="triton")
    z = gaussian(2, 6, 4, 4, seed=35)
    built = _count_gpu_operands(monkeypatch)
    first = quantizer.quantize(z)
    second = quantizer.quantize(z)
    assert built == ["l2"]  # kept across forwards by the quantizer's device Codebook, not rebuilt per forward
    assert torch.equal(first, second)
    expected = spae_fast.SPAEQuantizer(weight, layers=(1, 2, 4), grid=4, backend="cpu").quantize(z)
    assert torch.equal(first, expected)
    assert vars(quantizer.weight) == {}
