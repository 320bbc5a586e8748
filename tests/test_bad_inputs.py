"""Bad inputs: each is rejected with a clear exception that names the argument (every backend), except
non-contiguous inputs, which are handled (see tests/ops/test_nearest.py), and non-finite queries with
check_finite=False, which must not crash and must return in-range indices."""

from __future__ import annotations

import pytest
import torch
from _spae_checks import METRICS, assert_identical, check_search, gaussian, queries_for

import spae_fast

BACKENDS = ["torch", "cpu"]


@pytest.fixture
def weight():
    return gaussian(37, 8, seed=1)


@pytest.fixture
def x(weight):
    return queries_for(weight, 5, seed=2)


def _both(fn, x, codebook, **kwargs):
    """Calls nearest and topk(k=2) with the same arguments (both must reject)."""
    if fn == "nearest":
        return spae_fast.nearest(x, codebook, **kwargs)
    return spae_fast.topk(x, codebook, 2, **kwargs)


OPS = ["nearest", "topk"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_codebook", [False, True], ids=["tensor", "Codebook"])
class TestRejected:
    def codebook(self, weight, as_codebook, metric="l2"):
        return spae_fast.Codebook(weight, metric) if as_codebook else weight

    def test_x_zero_dim(self, op, backend, as_codebook, weight):
        with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., D\]"):
            _both(op, torch.tensor(1.0), self.codebook(weight, as_codebook), backend=backend)

    @pytest.mark.parametrize("dim", [7, 9, 1])
    def test_dimension_mismatch(self, op, backend, as_codebook, weight, dim):
        with pytest.raises(
            ValueError, match=rf"x has last dimension {dim}, but the codebook rows have D = 8"
        ):
            _both(op, torch.randn(4, dim), self.codebook(weight, as_codebook), backend=backend)

    @pytest.mark.parametrize(
        "dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.float64], ids=str
    )
    def test_x_dtype(self, op, backend, as_codebook, weight, x, dtype):
        with pytest.raises(TypeError, match=r"x must be float32, bfloat16 or float16, got torch\."):
            _both(op, x.to(dtype), self.codebook(weight, as_codebook), backend=backend)

    def test_x_not_a_tensor(self, op, backend, as_codebook, weight, x):
        with pytest.raises(TypeError, match="x must be a torch.Tensor, got ndarray"):
            _both(op, x.numpy(), self.codebook(weight, as_codebook), backend=backend)

    def test_mixed_devices(self, op, backend, as_codebook, weight, x):
        # the "meta" device stands in for a second device on this GPU-less machine
        with pytest.raises(ValueError, match="x is on meta but the codebook is on cpu"):
            _both(op, x.to("meta"), self.codebook(weight, as_codebook), backend=backend)
        with pytest.raises(ValueError, match="x is on cpu but the codebook is on meta"):
            _both(op, x, self.codebook(weight.to("meta"), as_codebook), backend=backend)

    @pytest.mark.parametrize("metric", METRICS)
    def test_non_finite_x(self, op, backend, as_codebook, weight, x, metric):
        for value in (float("nan"), float("inf"), float("-inf")):
            bad = x.clone()
            bad[3, 5] = value
            with pytest.raises(
                ValueError, match=r"x contains NaN or Inf \(first bad row 3 .*check_finite=False"
            ):
                _both(op, bad, self.codebook(weight, as_codebook, metric), metric=metric, backend=backend)

    @pytest.mark.parametrize("metric", ["l2", "ip"])
    def test_x_norm_overflow(self, op, backend, as_codebook, weight, x, metric):
        """|x| * max|e| beyond the fp32 accumulation range: ValueError naming x and the row."""
        bad = x.clone()
        bad[2] = 1e36
        with pytest.raises(ValueError, match=r"x row 2 is too large for fp32 accumulation"):
            _both(op, bad, self.codebook(weight, as_codebook, metric), metric=metric, backend=backend)

    def test_metric_name(self, op, backend, as_codebook, weight, x):
        codebook = self.codebook(weight, as_codebook)
        expected = "differs from the Codebook's metric" if as_codebook else "metric must be one of"
        with pytest.raises(ValueError, match=expected):
            _both(op, x, codebook, metric="euclidean", backend=backend)

    def test_backend_name(self, op, backend, as_codebook, weight, x):
        with pytest.raises(ValueError, match=r"backend must be one of .*got 'gpu'"):
            _both(op, x, self.codebook(weight, as_codebook), backend="gpu")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
class TestRejectedCodebookTensor:
    @pytest.mark.parametrize("shape", [(8,), (1, 37, 8), ()])
    def test_codebook_ndim(self, op, backend, x, shape):
        with pytest.raises(ValueError, match=r"codebook must be 2-D \[V, D\], got shape"):
            _both(op, x, torch.randn(shape), backend=backend)

    def test_empty_codebook(self, op, backend, x):
        with pytest.raises(
            ValueError, match=r"codebook is empty: it needs at least one row, got shape \(0, 8\)"
        ):
            _both(op, x, torch.empty(0, 8), backend=backend)
        with pytest.raises(ValueError, match=r"codebook rows must have at least one dimension"):
            _both(op, x[:, :0], torch.empty(4, 0), backend=backend)

    @pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.complex64, torch.float64], ids=str)
    def test_codebook_dtype(self, op, backend, weight, x, dtype):
        with pytest.raises(TypeError, match=r"codebook must be float32, bfloat16 or float16"):
            _both(op, x, weight.to(dtype), backend=backend)

    def test_codebook_not_a_tensor(self, op, backend, weight, x):
        with pytest.raises(TypeError, match="codebook must be a torch.Tensor, got list"):
            _both(op, x, weight.tolist(), backend=backend)

    @pytest.mark.parametrize("metric", METRICS)
    def test_non_finite_codebook(self, op, backend, weight, x, metric):
        """Always an error (check_finite only concerns x)."""
        for check_finite in (True, False):
            bad = weight.clone()
            bad[11, 0] = float("nan")
            bad[20, 3] = float("inf")
            with pytest.raises(ValueError, match=r"codebook contains NaN or Inf \(first bad row 11\)"):
                _both(op, x, bad, metric=metric, backend=backend, check_finite=check_finite)

    def test_codebook_norm_overflow(self, op, backend, weight, x):
        bad = weight.clone()
        bad[6] = 1e20  # ||e||^2 = 8e40 > fp32 max
        with pytest.raises(ValueError, match=r"codebook row 6 is too large: \|\|e\|\|\^2 overflows fp32"):
            _both(op, x, bad, backend=backend)


class TestRejectedTopkK:
    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("as_codebook", [False, True], ids=["tensor", "Codebook"])
    @pytest.mark.parametrize("k", [0, -1, 38, 1000])
    def test_k_out_of_range(self, backend, as_codebook, weight, x, k):
        codebook = spae_fast.Codebook(weight) if as_codebook else weight
        with pytest.raises(ValueError, match=rf"k must be in \[1, V\] = \[1, 37\], got {k}"):
            spae_fast.topk(x, codebook, k, backend=backend)

    @pytest.mark.parametrize("k", [2.0, True, "3", None])
    def test_k_type(self, weight, x, k):
        with pytest.raises(TypeError, match="k must be an int"):
            spae_fast.topk(x, weight, k)


class TestRejectedCodebookObject:
    def test_weight_checks_name_weight(self, weight):
        with pytest.raises(TypeError, match="weight must be float32, bfloat16 or float16"):
            spae_fast.Codebook(weight.int())
        with pytest.raises(ValueError, match=r"weight must be 2-D"):
            spae_fast.Codebook(weight[0])
        with pytest.raises(ValueError, match=r"weight is empty"):
            spae_fast.Codebook(weight[:0])
        with pytest.raises(ValueError, match="metric must be one of"):
            spae_fast.Codebook(weight, metric="dot")

    def test_non_finite_or_overflowing_weight(self, weight):
        bad = weight.clone()
        bad[4, 1] = float("-inf")
        with pytest.raises(ValueError, match=r"codebook contains NaN or Inf \(first bad row 4\)"):
            spae_fast.Codebook(bad)
        bad = weight.clone()
        bad[9] = 1e20
        with pytest.raises(ValueError, match=r"codebook row 9 is too large"):
            spae_fast.Codebook(bad)


def test_unavailable_backend(weight, x):
    if spae_fast.available()["cuda"].available:
        pytest.skip("the cuda backend is available here")
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            spae_fast.nearest(x, weight, backend="cuda")


def test_first_bad_row_is_reported_for_any_thread_timing(set_threads):
    """Several bad rows of different kinds in different query blocks: the message names the lowest bad row
    with its own kind (an overflow in row 230 must not be reported as NaN), whatever the threads' timing."""
    weight = gaussian(64, 8, seed=1)
    x = queries_for(weight, 2400, seed=2)
    x[230] = 1e37  # overflow, late in query block 0
    x[240] = float("nan")  # first row of query block 1
    x[2000] = float("nan")
    for threads in (1, 2, 4):
        set_threads(threads)
        for backend in BACKENDS:
            for _ in range(40 if backend == "cpu" else 1):
                with pytest.raises(ValueError, match=r"^x row 230 is too large"):
                    spae_fast.nearest(x, weight, backend=backend)


# ----------------------------------------------------------------------------------------------------------
# check_finite=False: no crash, indices in range, finite rows unaffected
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_check_finite_false_opt_out(impl, metric):
    weight = gaussian(300, 16, seed=3)
    x = queries_for(weight, 40, seed=4)
    bad = x.clone()
    bad[1, 0] = float("nan")
    bad[5] = float("inf")
    bad[6, 3] = float("-inf")
    bad[7] = float("nan")
    bad[8, :8] = float("inf")
    bad[8, 8:] = float("-inf")
    bad[9] = 1e36  # overflow-size row: allowed without the check
    bad[10] = 3e38
    bad_rows = [1, 5, 6, 7, 8, 9, 10]
    good_rows = [r for r in range(40) if r not in bad_rows]
    with pytest.raises(ValueError):
        spae_fast.topk(bad, weight, 5, metric=metric, backend=impl)
    for k in (1, 5, 300):
        dist, index = spae_fast.topk(bad, weight, k, metric=metric, backend=impl, check_finite=False)
        assert dist.shape == (40, k) and index.shape == (40, k)
        assert bool(((index >= 0) & (index < 300)).all()), "index out of range"
        clean = spae_fast.topk(x[good_rows], weight, k, metric=metric, backend=impl)
        assert_identical((dist[good_rows], index[good_rows]), clean, "finite rows next to non-finite ones")
    check_search(x[good_rows], weight, metric, dist[good_rows], index[good_rows], k=300)
    _, i1 = spae_fast.nearest(bad, weight, metric=metric, backend=impl, check_finite=False)
    assert bool(((i1 >= 0) & (i1 < 300)).all())
