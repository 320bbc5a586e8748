"""Gradients: the returned distances are differentiable w.r.t. x (the codebook is frozen). Each backward is
compared with autograd through the fp64 distance formula evaluated at the selected rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _spae_checks import METRICS, gaussian, queries_for

import spae_fast


def _fp64_distance_of_selected(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, metric: str):
    """x [..., D] (fp64, requires grad), index [..., k] -> distances [..., k] through plain autograd."""
    e = weight.double()[index]  # [..., k, D]
    q = x[..., None, :]
    if metric == "l2":
        return ((q - e) ** 2).sum(-1)
    if metric == "ip":
        return -(q * e).sum(-1)
    return 1.0 - (F.normalize(q, dim=-1, eps=1e-12) * F.normalize(e, dim=-1, eps=1e-12)).sum(-1)


def _check_gradient(x, weight, codebook, metric, backend, k):
    x = x.detach().requires_grad_()
    if k is None:
        dist, index = spae_fast.nearest(x, codebook, metric=metric, backend=backend)
        index_k = index[..., None]
    else:
        dist, index = spae_fast.topk(x, codebook, k, metric=metric, backend=backend)
        index_k = index
    assert dist.requires_grad and not index.requires_grad
    grad_out = torch.randn(dist.shape, generator=torch.Generator().manual_seed(0))
    (dist * grad_out).sum().backward()

    x64 = x.detach().double().requires_grad_()
    dist64 = _fp64_distance_of_selected(x64, weight, index_k, metric)
    (dist64 * grad_out.double().reshape(dist64.shape)).sum().backward()

    assert x.grad is not None and x.grad.dtype == x.dtype and x.grad.shape == x.shape
    scale = float(x64.grad.abs().max()) + 1e-30
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[x.dtype]
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol * scale)
    return x.grad


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [None, 1, 4, 64], ids=lambda k: "nearest" if k is None else f"topk{k}")
def test_gradient_matches_fp64_autograd(impl, metric, k):
    weight = gaussian(150, 12, seed=1)
    x = queries_for(weight, 33, seed=2)
    _check_gradient(x, weight, weight, metric, impl, k)


@pytest.mark.parametrize("metric", METRICS)
def test_gradient_through_codebook_leading_dims_and_strides(impl, metric):
    weight = gaussian(90, 10, seed=3)
    codebook = spae_fast.Codebook(weight, metric)
    x = queries_for(weight, 24, seed=4).reshape(2, 3, 4, 10)
    _check_gradient(x, weight, codebook, metric, impl, None)
    _check_gradient(x, weight, codebook, metric, impl, 3)
    strided = x.transpose(0, 2).contiguous().transpose(0, 2)
    assert not strided.is_contiguous()
    _check_gradient(strided, weight, codebook, metric, impl, 2)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gradient_low_precision(impl, metric, dtype):
    weight = gaussian(80, 16, seed=5, dtype=dtype)
    x = queries_for(weight, 20, seed=6, dtype=dtype)
    _check_gradient(x, weight, weight, metric, impl, 3)


def test_l2_gradient_is_twice_the_difference(impl):
    """Spelled out for l2: d||x - e_idx||^2 / dx = 2 (x - e_idx)."""
    weight = gaussian(64, 7, seed=7)
    x = queries_for(weight, 15, seed=8).requires_grad_()
    dist, index = spae_fast.nearest(x, weight, backend=impl)
    dist.sum().backward()
    torch.testing.assert_close(x.grad, 2 * (x.detach() - weight[index]), rtol=1e-6, atol=1e-6)


def test_no_gradient_without_requires_grad_and_empty_batch(impl):
    weight = gaussian(20, 4, seed=1)
    dist, _ = spae_fast.nearest(gaussian(3, 4, seed=2), weight, backend=impl)
    assert not dist.requires_grad
    x = torch.empty(0, 4, requires_grad=True)
    dist, _ = spae_fast.topk(x, weight, 2, backend=impl)
    dist.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 4)
