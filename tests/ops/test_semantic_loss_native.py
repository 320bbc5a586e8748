"""The native CPU semantic loss's two ways of summing a candidate set and its 16-lane fp32 pieces.

Sets of at most 64 candidates are summed when their rows of z are finished, larger ones inside the streaming
pass (csrc/semantic_loss/semantic_loss.cpp); both sum a set's rows in ascending row order, so the list order
of a set never changes a bit. The AVX-512 scores and accumulate pieces compute the AVX2 pieces' FMA chains,
so switching them off (SPAE_FAST_SEMANTIC_AVX512=0, read per call) never changes a bit either.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _semantic_checks import assert_identical, generator, loss_and_grad, reference_loss_and_grad, tolerance

import spae_fast

# Set sizes on both sides of the 64-candidate threshold, with duplicates (drawn with replacement).
SET_SIZES = (1, 2, 63, 64, 65, 200)


def _problem(num_rows: int, dim: int, seed: int, sizes=SET_SIZES, positions_per_set: int = 2):
    g = generator(seed)
    weight = torch.randn(num_rows, dim, generator=g)
    sizes_t = torch.tensor(sizes)
    index = torch.randint(0, num_rows, (int(sizes_t.sum()),), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes_t.cumsum(0)])
    sets = torch.arange(len(sizes)).repeat_interleave(positions_per_set)
    z = weight[index[offsets[sets]]] + 0.5 * torch.randn(sets.numel(), dim, generator=g)
    return z, weight, index, offsets, sets


def _permuted(index: torch.Tensor, offsets: torch.Tensor, seed: int) -> torch.Tensor:
    """Each set's candidates in another order (the same multiset)."""
    g = generator(seed)
    out = index.clone()
    for s in range(offsets.numel() - 1):
        begin, end = int(offsets[s]), int(offsets[s + 1])
        out[begin:end] = index[begin:end][torch.randperm(end - begin, generator=g)]
    return out


@pytest.mark.parametrize("precision", ["default", "bf16"])
@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_set_order_never_changes_a_bit(use_isa, isa, precision):
    use_isa(isa)
    z, weight, index, offsets, sets = _problem(700, 37, seed=3)
    shuffled = _permuted(index, offsets, seed=4)
    assert not torch.equal(shuffled, index)
    codebook = spae_fast.Codebook(weight)
    loss, grad = loss_and_grad(z, codebook, index, offsets, sets, precision=precision, tau=0.7)
    loss2, grad2 = loss_and_grad(z, codebook, shuffled, offsets, sets, precision=precision, tau=0.7)
    assert_identical(loss, loss2, "loss")
    assert_identical(grad, grad2, "grad")
    no_grad = spae_fast.semantic_loss(z, codebook, shuffled, offsets, sets, reduction="none", precision=precision,
                                      tau=0.7)  # fmt: skip
    assert_identical(no_grad, loss, "loss without the gradient")


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_sets_around_the_threshold_match_the_reference(use_isa, isa):
    use_isa(isa)
    z, weight, index, offsets, sets = _problem(300, 19, seed=5)
    loss, grad = loss_and_grad(z, weight, index, offsets, sets, tau=0.5)
    ref_loss, ref_grad = reference_loss_and_grad(z, weight, index, offsets, sets, tau=0.5, dtype=torch.float64)
    atol = tolerance(z, weight, 0.5)
    torch.testing.assert_close(loss, ref_loss.float(), rtol=0, atol=atol)
    torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-4, atol=atol / 10)


def _has_avx512f() -> bool:
    try:
        return any(" avx512f " in f" {line.split(':', 1)[-1].strip()} " for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))  # fmt: skip
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512f(), reason="no avx512f on this CPU: the 16-lane pieces never run")
@pytest.mark.parametrize(("num_rows", "dim"), [(64, 1), (130, 15), (257, 16), (300, 17), (200, 64), (129, 65),
                                               (1000, 130), (777, 576)])  # fmt: skip
def test_avx512_pieces_are_bitwise_the_avx2_ones(use_isa, monkeypatch, num_rows, dim):
    use_isa("avx2")
    g = generator(num_rows + dim)
    weight = torch.randn(num_rows, dim, generator=g)
    strided = torch.randn(dim, num_rows, generator=g).T  # a table read through a converted copy of its rows
    z = weight[torch.randint(0, num_rows, (23,), generator=g)] + 0.3 * torch.randn(23, dim, generator=g)
    index = torch.randint(0, num_rows, (23 * 3,), generator=g)
    offsets = torch.arange(0, 23 * 3 + 1, 3)
    for table in (weight, strided, weight.to(torch.bfloat16)):
        results = []
        for setting in ("0", "1"):
            monkeypatch.setenv("SPAE_FAST_SEMANTIC_AVX512", setting)
            results.append(loss_and_grad(z, spae_fast.Codebook(table), index, offsets, tau=0.9))
        assert_identical(results[0][0], results[1][0], "loss")
        assert_identical(results[0][1], results[1][1], "grad")
