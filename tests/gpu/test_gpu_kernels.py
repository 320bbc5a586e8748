"""GPU kernels (backends "cuda" and "triton") on a CUDA device: marked `gpu`, skipped without one
(tests/gpu/conftest.py). Run by benchmarks/gpu_check.sh.

Both backends against the reference and fp64 on fp32 / bf16 / fp16 inputs and every metric; exact mode equal
to the fp64 order (and bitwise equal across backends, batch sizes and launches); the caller's stream; a
non-zero device index when there are two GPUs; bad inputs; the k > 32 path; SAQ when its GPU kernel exists.
"""

from __future__ import annotations

import pytest
import torch
from _spae_checks import (
    assert_identical,
    check_against_fp64,
    check_search,
    fp64_distances,
    gaussian,
    integers,
    queries_for,
)

import spae_fast
from spae_fast import _ref
from spae_fast.ops import gpu_saq, gpu_search

METRICS = ("l2", "ip", "cosine")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = [name for name in ("cuda", "triton") if spae_fast.available()[name].available]
DEVICE = torch.device("cuda")


@pytest.fixture(params=BACKENDS or ["none"])
def backend(request):
    if request.param == "none":
        pytest.skip(f"no GPU backend available: {spae_fast.available()}")
    return request.param


def _data(num_rows, dim, num, *, seed, dtype=torch.float32, duplicate=True):
    weight = gaussian(num_rows, dim, seed=seed)
    if duplicate and num_rows > 8:
        weight[num_rows // 2] = weight[3]  # an exact tie: the lowest index must win
    x = queries_for(weight, num, seed=seed + 1)
    if duplicate and num > 2 and num_rows > 8:
        x[1] = weight[3]
    return x.to(dtype).to(DEVICE), weight.to(dtype).to(DEVICE)


def _search(x, weight, k=None, **kwargs):
    if k is None:
        return spae_fast.nearest(x, weight, **kwargs)
    return spae_fast.topk(x, weight, k, **kwargs)


def _tolerance(x, weight, metric, unit):
    """[N, V] error bound for approximate operands (tf32 / bf16 rounding of fp32 inputs)."""
    q, e = x.double(), weight.double()
    qn = (q * q).sum(-1).sqrt()[:, None]
    en = (e * e).sum(-1).sqrt()[None, :]
    if metric == "cosine":
        return torch.full((q.shape[0], e.shape[0]), 8 * unit, dtype=torch.float64, device=x.device)
    scale = 2.0 if metric == "l2" else 1.0
    return (4 * unit + 2 * (q.shape[1] + 8) * 2.0**-23) * scale * qn * en + 1e-6


# ----------------------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [None, 5])
@pytest.mark.parametrize(
    ("num", "num_rows", "dim"), [(1, 1, 1), (37, 301, 7), (300, 5000, 64), (129, 1000, 576)]
)
def test_default_precision_matches_reference(backend, dtype, metric, k, num, num_rows, dim):
    x, weight = _data(num_rows, dim, num, seed=num_rows + dim, dtype=dtype)
    k = None if k is None else min(k, num_rows)
    dist, index = _search(x, weight, k, metric=metric, backend=backend)
    check_search(x, weight, metric, dist, index, k=k)
    stats = spae_fast.last_search_stats()
    assert stats.backend == backend and stats.rows == num


@pytest.mark.parametrize("metric", ("l2", "ip"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_integer_data_bitwise(backend, metric, dtype):
    weight = integers(700, 40, seed=1, dtype=dtype)
    weight[400:450] = weight[:50]
    x = integers(333, 40, seed=2, dtype=dtype)
    for k in (None, 4):
        dist, index = _search(x.to(DEVICE), weight.to(DEVICE), k, metric=metric, backend=backend)
        check_search(x.to(DEVICE), weight.to(DEVICE), metric, dist, index, k=k, exact=True)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("metric", METRICS)
def test_fast_precisions_within_their_bound(backend, precision, metric):
    x, weight = _data(3000, 256, 200, seed=3)
    dist, index = _search(x, weight, 3, metric=metric, backend=backend, precision=precision)
    unit = 2.0**-10 if precision == "tf32" else 2.0**-8
    check_against_fp64(x, weight, metric, dist, index, tol=_tolerance(x, weight, metric, unit))
    assert spae_fast.last_search_stats().operands == ("tf32" if precision == "tf32" else "bfloat16")


@pytest.mark.parametrize("k", [33, 100])
def test_large_k(backend, k):
    x, weight = _data(2000, 48, 50, seed=4)
    dist, index = _search(x, weight, k, backend=backend)
    check_search(x, weight, "l2", dist, index, k=k)


def test_split_v_small_batch_large_codebook(backend):
    x, weight = _data(128_256, 64, 3, seed=5, dtype=torch.bfloat16)
    for k in (None, 8):
        dist, index = _search(x, weight, k, backend=backend)
        check_search(x, weight, "l2", dist, index, k=k)


def test_large_batch_sampled(backend):
    x, weight = _data(32_000, 128, 65_536, seed=6, dtype=torch.bfloat16)
    dist, index = _search(x, weight, backend=backend)
    rows = torch.arange(0, 65_536, 257, device=DEVICE)
    check_search(x[rows], weight, "l2", dist[rows], index[rows], k=None)


def test_non_contiguous_and_batched(backend):
    x, weight = _data(500, 96, 64, seed=7)
    x_strided = x.T.contiguous().T[::2]  # column-major, every other row
    w_strided = weight.T.contiguous().T
    dist, index = _search(x_strided, w_strided, 3, backend=backend)
    check_search(x_strided, w_strided, "l2", dist, index, k=3)
    dist, index = _search(x.reshape(4, 16, 96), weight, backend=backend)
    assert dist.shape == (4, 16)


# ----------------------------------------------------------------------------------------------------------
# Exact mode
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [None, 4])
def test_exact_mode_equals_fp64_order(backend, dtype, metric, k):
    x, weight = _data(4000, 200, 300, seed=8, dtype=dtype)
    dist, index = _search(x, weight, k, metric=metric, backend=backend, precision="exact")
    d64 = fp64_distances(x, weight, metric)
    expected = torch.sort(d64, dim=1, stable=True).indices[:, : (k or 1)]
    assert torch.equal(index.reshape(300, -1), expected)
    torch.testing.assert_close(dist.reshape(300, -1).double(), d64.gather(1, expected), rtol=1e-6, atol=1e-6)
    stats = spae_fast.last_search_stats()
    assert stats.precision == "exact" and stats.rows == 300 and stats.candidates >= (k or 1) + 1
    assert 0 <= stats.rows_full_scan <= stats.rows_rescored <= 300


def test_exact_mode_forced_rescoring_is_identical(backend, monkeypatch):
    x, weight = _data(3000, 64, 100, seed=9, dtype=torch.bfloat16)
    fast = _search(x, weight, 2, backend=backend, precision="exact")
    monkeypatch.setattr(gpu_search, "error_bound", lambda norm_sq64, *args: torch.full_like(norm_sq64, 1e30))
    slow = _search(x, weight, 2, backend=backend, precision="exact")
    assert spae_fast.last_search_stats().rows_full_scan == 100
    assert_identical(fast, slow, "certified vs full fp64 scan")


@pytest.mark.parametrize("precision", ["default", "exact"])
def test_bitwise_across_batch_sizes_and_launches(backend, precision):
    x, weight = _data(20_000, 256, 1000, seed=10, dtype=torch.bfloat16)
    for k in (None, 6):
        full = _search(x, weight, k, backend=backend, precision=precision)
        assert_identical(full, _search(x, weight, k, backend=backend, precision=precision), "second launch")
        parts = [
            _search(x[a:b], weight, k, backend=backend, precision=precision)
            for a, b in ((0, 1), (1, 300), (300, 1000))
        ]
        assert_identical(
            full, (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])), "batch split"
        )


def test_exact_mode_identical_across_backends():
    if len(BACKENDS) < 2:
        pytest.skip("needs both GPU backends")
    for dtype in DTYPES:
        x, weight = _data(5000, 320, 500, seed=11, dtype=dtype)
        for metric in METRICS:
            results = [_search(x, weight, 3, metric=metric, backend=b, precision="exact") for b in BACKENDS]
            assert_identical(results[0], results[1], f"cuda vs triton, {dtype}, {metric}")


def test_exact_mode_agrees_with_cpu_fp32_where_unambiguous(backend):
    x, weight = _data(3000, 128, 200, seed=12)
    _, index = _search(x, weight, backend=backend, precision="exact")
    _, cpu_index = spae_fast.nearest(x.cpu(), weight.cpu(), backend="cpu")
    d64 = fp64_distances(x, weight, "l2")
    differ = index.cpu() != cpu_index
    gap = (d64.gather(1, index[:, None]) - d64.gather(1, cpu_index.to(DEVICE)[:, None]))[:, 0].abs().cpu()
    assert bool((gap[differ] <= 1e-3 * d64.min(1).values.cpu()[differ]).all())


# ----------------------------------------------------------------------------------------------------------
# Streams, devices, errors, autograd
# ----------------------------------------------------------------------------------------------------------


def test_runs_on_the_callers_stream(backend):
    x_true, weight = _data(4000, 128, 512, seed=13, dtype=torch.bfloat16)
    for k in (None, 3):
        expected = _search(x_true, weight, k, backend=backend)
        x = torch.zeros_like(x_true)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            torch.cuda._sleep(20_000_000)  # if the kernel ran on another stream it would read zeros
            x.copy_(x_true)
            result = _search(x, weight, k, backend=backend, check_finite=False)
        stream.synchronize()
        assert_identical(result, expected, "side stream")


def test_non_zero_device_index(backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    device = torch.device("cuda", 1)
    x, weight = _data(1000, 64, 100, seed=14)
    expected = _search(x, weight, 3, backend=backend, precision="exact")
    with torch.cuda.device(0):
        result = _search(x.to(device), weight.to(device), 3, backend=backend, precision="exact")
    assert result[0].device == device and result[1].device == device
    assert_identical((result[0].cpu(), result[1].cpu()), (expected[0].cpu(), expected[1].cpu()), "cuda:1")


def test_bad_inputs(backend):
    x, weight = _data(100, 16, 10, seed=15)
    bad = x.clone()
    bad[4, 3] = float("nan")
    with pytest.raises(ValueError, match="row 4"):
        _search(bad, weight, backend=backend)
    bad_weight = weight.clone()
    bad_weight[9, 0] = float("inf")
    with pytest.raises(ValueError, match="codebook"):
        _search(x, bad_weight, backend=backend)
    with pytest.raises(ValueError):
        _search(x.cpu(), weight.cpu(), backend=backend)
    _, index = _search(bad, weight, backend=backend, check_finite=False)
    assert bool(((index >= 0) & (index < 100)).all())


def test_gradient_matches_reference(backend):
    x, weight = _data(300, 32, 40, seed=16)
    x = x.requires_grad_()
    dist, _ = _search(x, weight, 2, backend=backend)
    (grad,) = torch.autograd.grad(dist.sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    ref, _ = spae_fast.topk(x_ref, weight, 2, backend="torch")
    (grad_ref,) = torch.autograd.grad(ref.sum(), x_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-4)


def test_auto_picks_a_gpu_backend():
    if not BACKENDS:
        pytest.skip("no GPU backend")
    assert spae_fast.ops.resolve_backend("auto", DEVICE) in BACKENDS


def test_codebook_keeps_gpu_operands_and_a_tensor_is_untouched(backend, monkeypatch):
    x, weight = _data(2000, 64, 50, seed=17, dtype=torch.bfloat16)
    built = []
    original = gpu_search.GpuOperands.__init__

    def counting(self, *args):
        built.append(args[1])
        original(self, *args)

    monkeypatch.setattr(gpu_search.GpuOperands, "__init__", counting)
    plain = _search(x, weight, backend=backend)
    _search(x, weight, 3, backend=backend)
    assert built == ["l2", "l2"]  # a plain tensor: prepared per call
    assert vars(weight) == {}  # nothing stored on the caller's tensor
    codebook = spae_fast.Codebook(weight)
    first = _search(x, codebook, backend=backend)
    kept = codebook.derived(
        "gpu_operands:l2", lambda: pytest.fail("the Codebook did not keep its GPU operands")
    )
    assert_identical(first, _search(x, codebook, backend=backend), "kept")
    assert_identical(first, plain, "Codebook vs tensor")
    assert codebook.derived("gpu_operands:l2", lambda: None) is kept
    assert built == ["l2"] * 3


# ----------------------------------------------------------------------------------------------------------
# SAQ / RQ
# ----------------------------------------------------------------------------------------------------------


def _check_saq_exact(z, weight, sides, mode, ids):
    """Each layer's ids are the exact (fp64) argmins of the fp32 targets formed from the ids above."""
    firsts = [0]
    for side in sides:
        firsts.append(firsts[-1] + side * side)
    for layer, side in enumerate(sides):
        coefficient = float(layer + 1) if mode == "saq" else 1.0
        rows = torch.arange(z.shape[0] * side * side, device=z.device)
        targets = gpu_saq._saq_targets(z, weight, ids, list(sides), firsts, layer, coefficient, rows)
        d64 = fp64_distances(targets, weight, "l2")
        expected = torch.sort(d64, dim=1, stable=True).indices[:, 0].view(z.shape[0], side * side)
        assert torch.equal(ids[:, firsts[layer] : firsts[layer + 1]], expected), f"layer {layer}"


@pytest.mark.parametrize("mode", ["saq", "rq"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_saq_integer_data_bitwise(backend, mode, dtype):
    z = integers(4, 32, 16, 16, seed=20).to(DEVICE)
    weight = integers(3000, 32, seed=21, dtype=dtype).to(DEVICE)
    weight[2000] = weight[7]
    ids = spae_fast.saq(z, weight, mode=mode, backend=backend)
    assert torch.equal(ids, _ref.saq_reference(z, weight, [1, 2, 4, 8, 16, 16], mode))


@pytest.mark.parametrize("mode", ["saq", "rq"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_saq_is_exact_argmin(backend, mode, dtype):
    weight = gaussian(5000, 64, seed=22, dtype=dtype).to(DEVICE)
    z = gaussian(8, 64, 16, 16, seed=23).to(DEVICE)
    sides = (1, 2, 4, 8, 16, 16)
    ids = spae_fast.saq(z, weight, sides, mode=mode, backend=backend)
    _check_saq_exact(z, weight, sides, mode, ids)
    stats = spae_fast.last_search_stats()
    assert stats.rows == 8 * 597 and stats.precision == "exact"


def test_saq_bitwise_across_batch_and_backends(backend):
    weight = gaussian(8000, 128, seed=24, dtype=torch.bfloat16).to(DEVICE)
    z = gaussian(6, 128, 16, 16, seed=25).to(DEVICE)
    full = spae_fast.saq(z, weight, backend=backend)
    assert torch.equal(full, spae_fast.saq(z, weight, backend=backend))
    parts = torch.cat([spae_fast.saq(z[a:b], weight, backend=backend) for a, b in ((0, 1), (1, 6))])
    assert torch.equal(full, parts)
    if len(BACKENDS) == 2:
        other = next(b for b in BACKENDS if b != backend)
        assert torch.equal(full, spae_fast.saq(z, weight, backend=other))


def test_saq_forced_rescoring_identical(backend, monkeypatch):
    weight = gaussian(3000, 64, seed=26).to(DEVICE)
    z = gaussian(2, 64, 8, 8, seed=27).to(DEVICE)
    fast = spae_fast.saq(z, weight, (1, 2, 4, 8), backend=backend)
    monkeypatch.setattr(gpu_search, "error_bound", lambda norm_sq64, *args: torch.full_like(norm_sq64, 1e30))
    slow = spae_fast.saq(z, weight, (1, 2, 4, 8), backend=backend)
    assert torch.equal(fast, slow)
