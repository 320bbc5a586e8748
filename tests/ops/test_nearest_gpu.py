"""nearest / topk on the GPU backends ("cuda", "triton"; fixture `gpu_backend`, tests/_backends.py), against the
reference (`spae_fast._ref.topk_reference`) and fp64. The CPU backends' cases are in tests/ops/test_nearest.py.

Tiny fp32 cases run wherever a backend does (Triton interpreted without a device): every metric, ties,
sizes off every block, split-V, strides, exact mode (with forced rescoring), determinism, bad inputs, the
Codebook's kept operands. On a CUDA device (`needs_device`) also fp32 / bf16 / fp16 at GPU sizes, the fast
precisions within their bound, k > 32, exact mode equal to the fp64 order across backends and launches,
the caller's stream and a non-zero device index.
"""

from __future__ import annotations

import pytest
import torch
from _backends import (
    DEVICE,
    INTERPRETED,
    count_gpu_operands,
    interpreter_only,
    needs_device,
    require_gpu_backend,
)
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
from spae_fast.ops import gpu_search

METRICS = ("l2", "ip", "cosine")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _search(x, weight, k=None, **kwargs):
    if k is None:
        return spae_fast.nearest(x, weight, **kwargs)
    return spae_fast.topk(x, weight, k, **kwargs)


def _on_device(*tensors):
    return tuple(t.to(DEVICE) for t in tensors)


def _data(num_rows, dim, num, *, seed, dtype=torch.float32, duplicate=True):
    """(x, weight) on the device, with an exact tie (rows 3 and V / 2) that a query hits."""
    weight = gaussian(num_rows, dim, seed=seed)
    if duplicate and num_rows > 8:
        weight[num_rows // 2] = weight[3]  # an exact tie: the lowest index must win
    x = queries_for(weight, num, seed=seed + 1)
    if duplicate and num > 2 and num_rows > 8:
        x[1] = weight[3]
    return x.to(dtype).to(DEVICE), weight.to(dtype).to(DEVICE)


def _tolerance(x, weight, metric, unit):
    """[N, V] error bound for approximate operands (tf32 / bf16 rounding of fp32 inputs)."""
    q, e = x.double(), weight.double()
    qn = (q * q).sum(-1).sqrt()[:, None]
    en = (e * e).sum(-1).sqrt()[None, :]
    if metric == "cosine":
        return torch.full((q.shape[0], e.shape[0]), 8 * unit, dtype=torch.float64, device=x.device)
    scale = 2.0 if metric == "l2" else 1.0
    return (4 * unit + 2 * (q.shape[1] + 8) * 2.0**-23) * scale * qn * en + 1e-6


def _always_rescore(monkeypatch):
    """Every row fails the certificate: through the second stage and then the fp64 full scan."""
    monkeypatch.setattr(gpu_search, "error_bound", lambda norm_sq64, *args: torch.full_like(norm_sq64, 1e30))


# ----------------------------------------------------------------------------------------------------------
# Against the reference: tiny fp32 cases
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("num", "num_rows", "dim"), [(1, 1, 1), (5, 37, 19), (17, 300, 7), (33, 21, 40)])
def test_nearest_matches_reference(gpu_backend, metric, num, num_rows, dim):
    weight = gaussian(num_rows, dim, seed=num_rows + dim)
    x, weight = _on_device(queries_for(weight, num, seed=num), weight)
    dist, index = _search(x, weight, metric=metric, backend=gpu_backend)
    check_search(x, weight, metric, dist, index, k=None)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [2, 3, 8])
def test_topk_matches_reference(gpu_backend, metric, k):
    weight = gaussian(45, 13, seed=k)
    x, weight = _on_device(queries_for(weight, 9, seed=k + 1), weight)
    dist, index = _search(x, weight, k, metric=metric, backend=gpu_backend)
    check_search(x, weight, metric, dist, index, k=k)


@pytest.mark.parametrize("k", [1, 4, 7])
def test_topk_k_equals_rows(gpu_backend, k):
    x, weight = _on_device(gaussian(4, 6, seed=4), gaussian(k, 6, seed=3))
    dist, index = _search(x, weight, k, backend=gpu_backend)
    check_search(x, weight, "l2", dist, index, k=k)


@pytest.mark.parametrize("metric", ("l2", "ip"))
@pytest.mark.parametrize("k", [None, 3])
def test_integer_data_is_bitwise_exact(gpu_backend, metric, k):
    """Every fp32 operation is exact on small integers: identical to the reference, ties included."""
    weight = integers(70, 9, seed=5)
    weight[40:50] = weight[:10]  # duplicate rows: exact ties, lowest index wins
    x, weight = _on_device(integers(19, 9, seed=6), weight)
    dist, index = _search(x, weight, k, metric=metric, backend=gpu_backend)
    check_search(x, weight, metric, dist, index, k=k, exact=True)


@pytest.mark.parametrize("metric", METRICS)
def test_duplicate_rows_lowest_index(gpu_backend, metric):
    weight = gaussian(50, 8, seed=7)
    weight[33] = weight[5]
    weight[49] = weight[5]
    x, weight = _on_device(weight[[5, 33, 49]] + 0.0, weight)
    _, index = _search(x, weight, metric=metric, backend=gpu_backend)
    assert index.tolist() == [5, 5, 5]
    _, index = _search(x, weight, 3, metric=metric, backend=gpu_backend)
    assert index[:, :3].tolist() == [[5, 33, 49]] * 3


@interpreter_only
def test_split_v_chunks_and_partial_sets():
    """Many codebook chunks (split-V): k = 1 merges by int64 atomic min, k > 1 by sorting partial sets."""
    require_gpu_backend("triton")
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
            dist, index = _search(x, weight, k, backend="triton")
            check_search(x, weight, "l2", dist, index, k=k)


def test_non_contiguous_inputs(gpu_backend):
    weight = gaussian(6, 40, seed=9).to(DEVICE).T  # [40, 6], column-major
    x = gaussian(6, 11, seed=10).to(DEVICE).T[::2]  # [6, 6] strided rows
    assert not weight.is_contiguous() and not x.is_contiguous()
    dist, index = _search(x, weight, backend=gpu_backend)
    check_search(x, weight, "l2", dist, index, k=None)


def test_batched_shape_and_empty(gpu_backend):
    x, weight = _on_device(gaussian(2, 3, 4, seed=12), gaussian(20, 4, seed=11))
    dist, index = _search(x, weight, 2, backend=gpu_backend)
    assert dist.shape == (2, 3, 2) and index.shape == (2, 3, 2)
    dist, index = _search(torch.empty(0, 4, device=DEVICE), weight, backend=gpu_backend)
    assert dist.shape == (0,) and index.shape == (0,)


def test_mixed_dtypes_run_in_fp32(gpu_backend):
    """bf16 queries against an fp32 codebook: upcast exactly, exact fp32 search (no 16-bit dot)."""
    weight = gaussian(30, 12, seed=13)
    x, weight = _on_device(queries_for(weight, 8, seed=14).to(torch.bfloat16), weight)
    dist, index = _search(x, weight, backend=gpu_backend)
    check_search(x, weight, "l2", dist, index, k=None)
    assert spae_fast.last_search_stats().operands == "float32"


# ----------------------------------------------------------------------------------------------------------
# Against the reference on a device: every dtype, GPU sizes
# ----------------------------------------------------------------------------------------------------------


@needs_device
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [None, 5])
@pytest.mark.parametrize(
    ("num", "num_rows", "dim"), [(1, 1, 1), (37, 301, 7), (300, 5000, 64), (129, 1000, 576)]
)
def test_default_precision_matches_reference(gpu_backend, dtype, metric, k, num, num_rows, dim):
    x, weight = _data(num_rows, dim, num, seed=num_rows + dim, dtype=dtype)
    k = None if k is None else min(k, num_rows)
    dist, index = _search(x, weight, k, metric=metric, backend=gpu_backend)
    check_search(x, weight, metric, dist, index, k=k)
    stats = spae_fast.last_search_stats()
    assert stats.backend == gpu_backend and stats.rows == num


@needs_device
@pytest.mark.parametrize("metric", ("l2", "ip"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_integer_data_bitwise(gpu_backend, metric, dtype):
    weight = integers(700, 40, seed=1, dtype=dtype)
    weight[400:450] = weight[:50]
    x, weight = _on_device(integers(333, 40, seed=2, dtype=dtype), weight)
    for k in (None, 4):
        dist, index = _search(x, weight, k, metric=metric, backend=gpu_backend)
        check_search(x, weight, metric, dist, index, k=k, exact=True)


@needs_device
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("metric", METRICS)
def test_fast_precisions_within_their_bound(gpu_backend, precision, metric):
    x, weight = _data(3000, 256, 200, seed=3)
    dist, index = _search(x, weight, 3, metric=metric, backend=gpu_backend, precision=precision)
    unit = 2.0**-10 if precision == "tf32" else 2.0**-8
    check_against_fp64(x, weight, metric, dist, index, tol=_tolerance(x, weight, metric, unit))
    assert spae_fast.last_search_stats().operands == ("tf32" if precision == "tf32" else "bfloat16")


@needs_device
@pytest.mark.parametrize("k", [33, 100])
def test_large_k(gpu_backend, k):
    x, weight = _data(2000, 48, 50, seed=4)
    dist, index = _search(x, weight, k, backend=gpu_backend)
    check_search(x, weight, "l2", dist, index, k=k)


@needs_device
def test_split_v_small_batch_large_codebook(gpu_backend):
    x, weight = _data(128_256, 64, 3, seed=5, dtype=torch.bfloat16)
    for k in (None, 8):
        dist, index = _search(x, weight, k, backend=gpu_backend)
        check_search(x, weight, "l2", dist, index, k=k)


@needs_device
def test_large_batch_sampled(gpu_backend):
    x, weight = _data(32_000, 128, 65_536, seed=6, dtype=torch.bfloat16)
    dist, index = _search(x, weight, backend=gpu_backend)
    rows = torch.arange(0, 65_536, 257, device=DEVICE)
    check_search(x[rows], weight, "l2", dist[rows], index[rows], k=None)


@needs_device
def test_non_contiguous_and_batched(gpu_backend):
    x, weight = _data(500, 96, 64, seed=7)
    x_strided = x.T.contiguous().T[::2]  # column-major, every other row
    w_strided = weight.T.contiguous().T
    dist, index = _search(x_strided, w_strided, 3, backend=gpu_backend)
    check_search(x_strided, w_strided, "l2", dist, index, k=3)
    dist, index = _search(x.reshape(4, 16, 96), weight, backend=gpu_backend)
    assert dist.shape == (4, 16)


# ----------------------------------------------------------------------------------------------------------
# Exact mode, precisions, determinism
# ----------------------------------------------------------------------------------------------------------


def _check_exact_order(x, weight, metric, k, dist, index):
    """The fp64 order (ties to the lowest row), distances close to fp64, and the exact-mode stats."""
    num = x.shape[0]
    d64 = fp64_distances(x, weight, metric)
    expected = torch.sort(d64, dim=1, stable=True).indices[:, : (k or 1)]
    assert torch.equal(index.reshape(num, -1), expected)
    torch.testing.assert_close(dist.reshape(num, -1).double(), d64.gather(1, expected), rtol=1e-6, atol=1e-6)
    stats = spae_fast.last_search_stats()
    assert stats.precision == "exact" and stats.rows == num and stats.candidates >= (k or 1) + 1
    assert 0 <= stats.rows_full_scan <= stats.rows_rescored <= num


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [None, 3])
def test_exact_mode_matches_fp64(gpu_backend, metric, k):
    weight = gaussian(60, 16, seed=15)
    weight[50] = weight[2]  # a tie
    x = queries_for(weight, 12, seed=16)
    x[0] = weight[2]
    x, weight = _on_device(x, weight)
    dist, index = _search(x, weight, k, metric=metric, backend=gpu_backend, precision="exact")
    check_search(x, weight, metric, dist, index, k=k)
    _check_exact_order(x, weight, metric, k, dist, index)


@needs_device
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [None, 4])
def test_exact_mode_equals_fp64_order(gpu_backend, dtype, metric, k):
    x, weight = _data(4000, 200, 300, seed=8, dtype=dtype)
    dist, index = _search(x, weight, k, metric=metric, backend=gpu_backend, precision="exact")
    _check_exact_order(x, weight, metric, k, dist, index)


@pytest.mark.parametrize("metric", METRICS)
def test_exact_mode_rescoring_paths_agree(gpu_backend, metric, monkeypatch):
    """Force every row through the second stage and then the fp64 full scan: same bits as the fast path."""
    weight = gaussian(80, 10, seed=17)
    weight[70] = weight[3]
    x, weight = _on_device(queries_for(weight, 7, seed=18), weight)
    fast = _search(x, weight, 2, metric=metric, backend=gpu_backend, precision="exact")
    assert spae_fast.last_search_stats().rows_rescored == 0
    _always_rescore(monkeypatch)
    slow = _search(x, weight, 2, metric=metric, backend=gpu_backend, precision="exact")
    stats = spae_fast.last_search_stats()
    assert stats.rows_rescored == 7 and stats.rows_full_scan == 7
    assert_identical(fast, slow, "exact mode, certified vs full scan")


@needs_device
def test_exact_mode_forced_rescoring_is_identical(gpu_backend, monkeypatch):
    x, weight = _data(3000, 64, 100, seed=9, dtype=torch.bfloat16)
    fast = _search(x, weight, 2, backend=gpu_backend, precision="exact")
    _always_rescore(monkeypatch)
    slow = _search(x, weight, 2, backend=gpu_backend, precision="exact")
    assert spae_fast.last_search_stats().rows_full_scan == 100
    assert_identical(fast, slow, "certified vs full fp64 scan")


def _check_batch_splits(x, weight, k, splits, **kwargs):
    """The whole batch, the same again (second launch) and its pieces give the same bits."""
    full = _search(x, weight, k, **kwargs)
    assert_identical(full, _search(x, weight, k, **kwargs), "second launch")
    parts = [_search(x[a:b], weight, k, **kwargs) for a, b in splits]
    assert_identical(
        full, (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])), f"split, k={k}"
    )


def test_exact_mode_bitwise_across_batch_sizes(gpu_backend):
    weight = gaussian(90, 12, seed=19)
    x, weight = _on_device(queries_for(weight, 20, seed=20), weight)
    _check_batch_splits(x, weight, 3, ((0, 7), (7, 14), (14, 20)), backend=gpu_backend, precision="exact")


def test_default_mode_bitwise_across_batch_sizes(gpu_backend):
    weight = gaussian(40, 12, seed=21)
    x, weight = _on_device(queries_for(weight, 9, seed=22), weight)
    for k in (None, 3):
        _check_batch_splits(x, weight, k, ((0, 1), (1, 5), (5, 9)), backend=gpu_backend)


@needs_device
@pytest.mark.parametrize("precision", ["default", "exact"])
def test_bitwise_across_batch_sizes_and_launches(gpu_backend, precision):
    x, weight = _data(20_000, 256, 1000, seed=10, dtype=torch.bfloat16)
    for k in (None, 6):
        _check_batch_splits(
            x, weight, k, ((0, 1), (1, 300), (300, 1000)), backend=gpu_backend, precision=precision
        )


@needs_device
def test_exact_mode_identical_across_backends():
    backends = [name for name in ("cuda", "triton") if spae_fast.available()[name].available]
    if len(backends) < 2:
        pytest.skip(f"needs both GPU backends: {spae_fast.available()}")
    for dtype in DTYPES:
        x, weight = _data(5000, 320, 500, seed=11, dtype=dtype)
        for metric in METRICS:
            results = [_search(x, weight, 3, metric=metric, backend=b, precision="exact") for b in backends]
            assert_identical(results[0], results[1], f"cuda vs triton, {dtype}, {metric}")


@needs_device
def test_exact_mode_agrees_with_cpu_fp32_where_unambiguous(gpu_backend):
    x, weight = _data(3000, 128, 200, seed=12)
    _, index = _search(x, weight, backend=gpu_backend, precision="exact")
    _, cpu_index = spae_fast.nearest(x.cpu(), weight.cpu(), backend="cpu")
    d64 = fp64_distances(x, weight, "l2")
    differ = index.cpu() != cpu_index
    gap = (d64.gather(1, index[:, None]) - d64.gather(1, cpu_index.to(DEVICE)[:, None]))[:, 0].abs().cpu()
    assert bool((gap[differ] <= 1e-3 * d64.min(1).values.cpu()[differ]).all())


@pytest.mark.parametrize("precision", ["tf32", "default"])
def test_precision_names(gpu_backend, precision):
    weight = gaussian(30, 8, seed=23)
    x, weight = _on_device(queries_for(weight, 5, seed=24), weight)
    dist, index = _search(x, weight, backend=gpu_backend, precision=precision)
    if precision == "default" or INTERPRETED:  # the interpreter computes tf32 in fp32; a device rounds
        check_search(x, weight, "l2", dist, index, k=None)
    assert spae_fast.last_search_stats().precision == precision
    with pytest.raises(ValueError, match="precision"):
        _search(x, weight, backend=gpu_backend, precision="fp8")


# ----------------------------------------------------------------------------------------------------------
# Streams, devices, bad inputs, autograd
# ----------------------------------------------------------------------------------------------------------


@needs_device
def test_runs_on_the_callers_stream(gpu_backend):
    x_true, weight = _data(4000, 128, 512, seed=13, dtype=torch.bfloat16)
    for k in (None, 3):
        expected = _search(x_true, weight, k, backend=gpu_backend)
        x = torch.zeros_like(x_true)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            torch.cuda._sleep(20_000_000)  # if the kernel ran on another stream it would read zeros
            x.copy_(x_true)
            result = _search(x, weight, k, backend=gpu_backend, check_finite=False)
        stream.synchronize()
        assert_identical(result, expected, "side stream")


@needs_device
def test_non_zero_device_index(gpu_backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    device = torch.device("cuda", 1)
    x, weight = _data(1000, 64, 100, seed=14)
    expected = _search(x, weight, 3, backend=gpu_backend, precision="exact")
    with torch.cuda.device(0):
        result = _search(x.to(device), weight.to(device), 3, backend=gpu_backend, precision="exact")
    assert result[0].device == device and result[1].device == device
    assert_identical((result[0].cpu(), result[1].cpu()), (expected[0].cpu(), expected[1].cpu()), "cuda:1")


def test_non_finite_and_overflow_rejected(gpu_backend):
    weight = gaussian(20, 6, seed=25).to(DEVICE)
    x = gaussian(5, 6, seed=26).to(DEVICE)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="row 3"):
        _search(x, weight, backend=gpu_backend)
    x[3, 2] = 0.0
    x[1] = 1e36
    with pytest.raises(ValueError, match="row 1"):
        _search(x, weight, backend=gpu_backend)
    bad = weight.clone()
    bad[7, 0] = float("inf")
    with pytest.raises(ValueError, match="codebook"):
        _search(gaussian(2, 6, seed=27).to(DEVICE), bad, backend=gpu_backend)
    x[1] = 1e36  # unchecked: indices still in range
    _, index = _search(x, weight, backend=gpu_backend, check_finite=False)
    assert bool(((index >= 0) & (index < 20)).all())


@needs_device
def test_bad_inputs(gpu_backend):
    x, weight = _data(100, 16, 10, seed=15)
    bad = x.clone()
    bad[4, 3] = float("nan")
    with pytest.raises(ValueError, match="row 4"):
        _search(bad, weight, backend=gpu_backend)
    bad_weight = weight.clone()
    bad_weight[9, 0] = float("inf")
    with pytest.raises(ValueError, match="codebook"):
        _search(x, bad_weight, backend=gpu_backend)
    with pytest.raises(ValueError):
        _search(x.cpu(), weight.cpu(), backend=gpu_backend)
    _, index = _search(bad, weight, backend=gpu_backend, check_finite=False)
    assert bool(((index >= 0) & (index < 100)).all())


@pytest.mark.parametrize("size", ["tiny", pytest.param("device", marks=needs_device)])
def test_gradient_matches_reference(gpu_backend, size):
    x, weight = _data(30, 7, 6, seed=30) if size == "tiny" else _data(300, 32, 40, seed=16)
    x = x.requires_grad_()
    dist, _ = _search(x, weight, 2, backend=gpu_backend)
    (grad,) = torch.autograd.grad(dist.sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    ref, _ = spae_fast.topk(x_ref, weight, 2, backend="torch")
    (grad_ref,) = torch.autograd.grad(ref.sum(), x_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-4)


@needs_device
def test_auto_picks_a_gpu_backend():
    backends = [name for name in ("cuda", "triton") if spae_fast.available()[name].available]
    if not backends:
        pytest.skip(f"no GPU backend: {spae_fast.available()}")
    assert spae_fast.ops.resolve_backend("auto", DEVICE) in backends


@interpreter_only
def test_pair_dot64_canonical_order():
    require_gpu_backend("triton")
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
# The GPU operands: kept by a Codebook, built per call for a plain tensor (never stored on it)
# ----------------------------------------------------------------------------------------------------------


def test_codebook_keeps_its_gpu_operands(gpu_backend, monkeypatch):
    weight = gaussian(25, 6, seed=28)
    x, weight, z = _on_device(queries_for(weight, 4, seed=29), weight, gaussian(2, 6, 4, 4, seed=30))
    expected = (
        _search(x, weight, backend=gpu_backend),
        _search(x, weight, 3, backend=gpu_backend),
        spae_fast.saq(z, weight, (1, 2, 4), backend=gpu_backend),
    )
    built = count_gpu_operands(monkeypatch)
    codebook = spae_fast.Codebook(weight)
    first = _search(x, codebook, backend=gpu_backend)
    kept = codebook.derived(
        "gpu_operands:l2", lambda: pytest.fail("the Codebook did not keep its GPU operands")
    )
    assert isinstance(kept, gpu_search.GpuOperands)
    results = (
        _search(x, codebook, backend=gpu_backend),
        _search(x, codebook, 3, backend=gpu_backend),
        spae_fast.saq(z, codebook, (1, 2, 4), backend=gpu_backend),
    )
    assert built == ["l2"]  # nearest, topk and saq share the one build
    assert codebook.derived("gpu_operands:l2", lambda: None) is kept
    assert_identical(first, expected[0], "Codebook vs tensor")
    for result, want, what in zip(results, expected, ("nearest", "topk", "saq"), strict=True):
        assert_identical(result, want, what)


def test_plain_tensor_is_prepared_per_call_and_left_untouched(gpu_backend, monkeypatch):
    weight = gaussian(25, 6, seed=31)
    x, weight, z = _on_device(queries_for(weight, 4, seed=32), weight, gaussian(2, 6, 4, 4, seed=33))
    built = count_gpu_operands(monkeypatch)
    _search(x, weight, backend=gpu_backend)
    _search(x, weight, 3, backend=gpu_backend)
    spae_fast.saq(z, weight, (1, 2, 4), backend=gpu_backend)
    empty = torch.empty(0, device=DEVICE)
    torch.ops.spae_fast.nearest(
        x, weight, empty, empty, empty, *(empty,) * 4, "l2", gpu_backend, True, "none"
    )
    _search(x, spae_fast.Codebook(weight, copy=False), backend=gpu_backend)  # it keeps them itself
    assert built == ["l2"] * 5
    assert vars(weight) == {}  # nothing stored on the caller's tensor
    assert not gpu_search._LENDERS.get(weight)


@needs_device
def test_codebook_keeps_gpu_operands_and_a_tensor_is_untouched(gpu_backend, monkeypatch):
    x, weight = _data(2000, 64, 50, seed=17, dtype=torch.bfloat16)
    built = count_gpu_operands(monkeypatch)
    plain = _search(x, weight, backend=gpu_backend)
    _search(x, weight, 3, backend=gpu_backend)
    assert built == ["l2", "l2"]  # a plain tensor: prepared per call
    assert vars(weight) == {}  # nothing stored on the caller's tensor
    codebook = spae_fast.Codebook(weight)
    first = _search(x, codebook, backend=gpu_backend)
    kept = codebook.derived(
        "gpu_operands:l2", lambda: pytest.fail("the Codebook did not keep its GPU operands")
    )
    assert_identical(first, _search(x, codebook, backend=gpu_backend), "kept")
    assert_identical(first, plain, "Codebook vs tensor")
    assert codebook.derived("gpu_operands:l2", lambda: None) is kept
    assert built == ["l2"] * 3
