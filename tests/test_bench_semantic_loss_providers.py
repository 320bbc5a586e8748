"""The baselines of benchmarks/bench_semantic_loss.py compute the same loss and gradient as the fused op:
torch's F.linear_cross_entropy (reference and chunked paths) and Cut Cross-Entropy's torch_compile path, on
the relevance proxy's candidate sets and on singleton sets (integer targets)."""

from __future__ import annotations

import pytest
import torch
from _benchmarks import BENCHMARKS, load

pytestmark = pytest.mark.skipif(not (BENCHMARKS / "bench_semantic_loss.py").is_file(), reason="no source checkout")

BASELINES = ["torch_gather", "torch_soft_ce", "torch_linear_ce", "torch_linear_ce_chunked", "cce_torch_compile"]


@pytest.fixture(scope="module")
def bench():
    return load("bench_semantic_loss")


@pytest.mark.parametrize("singleton", [False, True], ids=["relevance sets", "singleton sets"])
@pytest.mark.parametrize("name", BASELINES)
def test_baseline_matches_the_fused_op(bench, name, singleton):
    if name == "cce_torch_compile" and not bench.cce_available():
        pytest.skip("cut_cross_entropy not installed")
    weight = 0.3 * torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    z, index, offsets, sets = bench.make_inputs(weight, 2, singleton=singleton)
    sizes = offsets[1:] - offsets[:-1]
    assert bool((sizes == 1).all()) is singleton and bool((sizes > 0).any())
    expected_loss, expected_grad = bench.Provider("spae_fast", weight, index, offsets, sets)(z)
    loss, grad = bench.Provider(name, weight, index, offsets, sets)(z)
    torch.testing.assert_close(loss.float(), expected_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-5)
