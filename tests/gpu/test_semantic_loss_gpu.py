"""The fused semantic loss on a CUDA device (Triton backend): marked `gpu`, skipped without one.

Against the CPU reference (values and gradients) for fp32 / bf16 / fp16 inputs, an LLM-sized vocabulary tile
count, shared sets and excluded positions; bitwise reproducible across launches and batch splits (one program
owns its rows, no atomics); backend "auto" picks Triton on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch

import spae_fast
from spae_fast import _ref
from spae_fast.semantic import candidates_from_relevance, pyramid_set_of_position

DEVICE = torch.device("cuda")


@pytest.fixture(autouse=True)
def triton_available():
    status = spae_fast.available()["triton"]
    if not status.available:
        pytest.skip(f"triton backend not available: {status.reason}")


def _problem(batch, num_rows, dim, *, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_rows, dim, generator=g) * 0.1
    relevance = torch.randn(batch, num_rows, generator=g)
    index, offsets = candidates_from_relevance(relevance, (0.9, 0.8, 0.7))
    sets = pyramid_set_of_position(batch, (1, 2, 4)).reshape(-1)
    sets[::7] = -1  # some positions without a set
    z = weight[torch.randint(0, num_rows, (sets.numel(),), generator=g)] + 0.1 * torch.randn(sets.numel(), dim,
                                                                                           generator=g)  # fmt: skip
    return z.to(dtype), weight.to(dtype), index, offsets, sets


def _loss_and_grad(z, weight, index, offsets, sets, **kwargs):
    leaf = z.detach().clone().requires_grad_(True)
    loss = spae_fast.semantic_loss(leaf, weight, index, offsets, sets, reduction="none", **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("batch", "num_rows", "dim"), [(2, 1000, 64), (3, 4099, 576), (1, 77, 19)])
def test_triton_matches_cpu_reference(dtype, batch, num_rows, dim):
    z, weight, index, offsets, sets = _problem(batch, num_rows, dim, seed=num_rows, dtype=dtype)
    loss, grad = _loss_and_grad(z.to(DEVICE), weight.to(DEVICE), index.to(DEVICE), offsets.to(DEVICE),
                                sets.to(DEVICE), backend="triton", tau=0.5)  # fmt: skip
    assert loss.device.type == "cuda" and grad.dtype == dtype
    leaf = z.float().requires_grad_(True)
    expected = _ref.semantic_loss_reference(
        leaf, weight.float(), index, offsets, sets, tau=0.5, reduction="none"
    )
    (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
    scale = (
        weight.float().norm(dim=1).max() ** 2
        + 2 * z.float().norm(dim=1).max() * weight.float().norm(dim=1).max()
    )
    atol = float(1e-5 * scale / 0.5) + 1e-5
    torch.testing.assert_close(loss.cpu(), expected.detach(), rtol=0, atol=atol)
    grad_tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.float().cpu(), expected_grad, rtol=grad_tol, atol=grad_tol * 0.1)


def test_triton_bitwise_reproducible_and_batch_split():
    z, weight, index, offsets, sets = _problem(4, 3000, 128, seed=5)
    args = [t.to(DEVICE) for t in (z, weight, index, offsets, sets)]
    first = _loss_and_grad(*args, backend="triton")
    again = _loss_and_grad(*args, backend="triton")
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    head = _loss_and_grad(args[0][:17], args[1], args[2], args[3], args[4][:17], backend="triton")
    assert torch.equal(head[0], first[0][:17]) and torch.equal(head[1], first[1][:17])


def test_auto_uses_triton_on_cuda_and_mean_matches():
    z, weight, index, offsets, sets = _problem(2, 500, 32, seed=9)
    args = [t.to(DEVICE) for t in (z, weight, index, offsets, sets)]
    auto = spae_fast.semantic_loss(*args)
    explicit = spae_fast.semantic_loss(*args, backend="triton")
    assert torch.equal(auto, explicit)
    cpu = spae_fast.semantic_loss(z, weight, index, offsets, sets, backend="cpu")
    torch.testing.assert_close(auto.cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("batch", "num_rows", "dim"), [(2, 1000, 64), (3, 4099, 576)])
def test_triton_precision_bf16_matches_the_cpu_bf16_loss(batch, num_rows, dim):
    """precision="bf16" is the loss of bf16(z) against bf16(E): the Triton kernel (tensor cores) and the CPU
    kernel agree up to fp32 accumulation order and the CPU's bf16 rounding of the gradient's softmax weights."""
    z, weight, index, offsets, sets = _problem(batch, num_rows, dim, seed=num_rows + 1)
    loss, grad = _loss_and_grad(z.to(DEVICE), weight.to(DEVICE), index.to(DEVICE), offsets.to(DEVICE),
                                sets.to(DEVICE), backend="triton", tau=0.5, precision="bf16")  # fmt: skip
    cpu_loss, cpu_grad = _loss_and_grad(z, weight, index, offsets, sets, backend="cpu", tau=0.5, precision="bf16")
    exact = _ref.semantic_loss_reference(
        z.bfloat16().double(), weight.bfloat16().double(), index, offsets, sets, tau=0.5, reduction="none"
    )
    scale = weight.norm(dim=1).max() ** 2 + 2 * z.norm(dim=1).max() * weight.norm(dim=1).max()
    atol = float(1e-5 * scale / 0.5) + 1e-5
    torch.testing.assert_close(loss.cpu().double(), exact, rtol=0, atol=atol)
    torch.testing.assert_close(loss.cpu(), cpu_loss, rtol=0, atol=atol)
    assert float((grad.cpu() - cpu_grad).abs().max()) <= 2**-7 * float(cpu_grad.abs().max()) + atol
