"""Results are bitwise identical for every batch size, split of the batch, thread count, call order, and on
the split-codebook path (few rows, many threads: partial top-k lists of codebook ranges merged)."""

from __future__ import annotations

import pytest
import torch
from _spae_checks import METRICS, assert_identical, check_search, gaussian, integers, queries_for

import spae_fast
from spae_fast import _native


def _in_pieces(x, weight, k, metric, backend, sizes):
    dists, indices, start = [], [], 0
    for size in sizes:
        d, i = spae_fast.topk(x[start : start + size], weight, k, metric=metric, backend=backend)
        dists.append(d)
        indices.append(i)
        start += size
    assert start == x.shape[0]
    return torch.cat(dists), torch.cat(indices)


def _random_sizes(total: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    sizes = []
    while total:
        size = min(total, int(torch.randint(1, 60, (1,), generator=g)))
        sizes.append(size)
        total -= size
    return sizes


@pytest.mark.parametrize("metric", METRICS)
def test_batch_splits(impl, metric):
    """Whole batch vs one row at a time vs random splits: bitwise the same (the torch reference too: its
    scores do not depend on the batch)."""
    weight = gaussian(1300, 20, seed=1)  # > 1024 rows: small pieces take the split-codebook path
    x = queries_for(weight, 260, seed=2)  # > 240 rows: several query blocks
    k = 7
    whole = spae_fast.topk(x, weight, k, metric=metric, backend=impl)
    check_search(x, weight, metric, *whole, k=k)
    every_fourth = x[::4]  # one row at a time (a quarter of the rows keeps this quick)
    one_by_one = _in_pieces(every_fourth, weight, k, metric, impl, [1] * every_fourth.shape[0])
    assert_identical(one_by_one, (whole[0][::4], whole[1][::4]), "one row at a time")
    for seed in range(2):
        sizes = _random_sizes(260, seed)
        assert_identical(_in_pieces(x, weight, k, metric, impl, sizes), whole, f"pieces {sizes}")


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 64])
@pytest.mark.parametrize("num_queries", [1, 5, 300, 777])
def test_thread_counts(isa, set_threads, metric, k, num_queries):
    """1, 2, 3 and 4 threads: bitwise the same. Few queries with several threads split the codebook."""
    weight = gaussian(4096 + 7, 16, seed=k)  # 256 panels: up to 16 codebook splits
    x = queries_for(weight, num_queries, seed=num_queries)
    results = {}
    for threads in (1, 2, 3, 4):
        set_threads(threads)
        results[threads] = spae_fast.topk(x, weight, k, metric=metric, backend="cpu")
    for threads in (2, 3, 4):
        assert_identical(results[threads], results[1], f"{threads} threads vs 1")
    check_search(x, weight, metric, *results[1], k=k)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("num_rows", [1024, 1024 + 15, 2049, 16 * 16 * 16 + 1])
def test_split_codebook_ties(isa, set_threads, metric, num_rows):
    """Exact ties across codebook splits: the merge must keep the lowest indices, for any thread count."""
    weight = integers(num_rows, 4, seed=num_rows, low=-1, high=1)  # 81 distinct rows: many exact duplicates
    x = integers(3, 4, seed=1, low=-1, high=1)
    results = []
    for threads in (1, 2, 4):
        set_threads(threads)
        results.append(spae_fast.topk(x, weight, 64, metric=metric, backend="cpu"))
        check_search(x, weight, metric, *results[-1], k=64, exact=True)
    for result in results[1:]:
        assert_identical(result, results[0], "thread counts")


def test_isas_each_deterministic_and_correct(use_isa, set_threads):
    """Switching micro-kernels back and forth gives each one's own result again (no state leaks)."""
    weight = gaussian(1500, 33, seed=3)
    x = queries_for(weight, 50, seed=4)
    runs = {}
    for name in ("portable", "avx2", "portable", "avx2"):
        use_isa(name)
        result = spae_fast.topk(x, weight, 9, backend="cpu")
        check_search(x, weight, "l2", *result, k=9)
        if name in runs:
            assert_identical(result, runs[name], f"{name} again")
        runs[name] = result


def test_set_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="isa"):
        _native.cpu_module().set_isa("sse9")


def test_call_order_and_codebook_reuse():
    """Interleaved calls on two codebooks and the same inputs give the same answers every time."""
    first, second = gaussian(300, 12, seed=1), gaussian(500, 12, seed=2)
    cb_first, cb_second = spae_fast.Codebook(first), spae_fast.Codebook(second, metric="cosine")
    x = queries_for(first, 40, seed=3)
    a1, b1 = spae_fast.topk(x, cb_first, 4), spae_fast.topk(x, cb_second, 4)
    b2, a2 = spae_fast.topk(x, cb_second, 4), spae_fast.topk(x, cb_first, 4)
    assert_identical(a1, a2, "first codebook")
    assert_identical(b1, b2, "second codebook")
