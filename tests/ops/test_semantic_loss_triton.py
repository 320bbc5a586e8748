"""The semantic loss's GPU backend, Triton (fixture `gpu_backend`, narrowed to "triton": there is no CUDA kernel
for this op; tests/_backends.py). The CPU backends' cases are in tests/ops/test_semantic_loss*.py.

Tiny fp32 cases run wherever Triton does (interpreted without a device: its bf16 tl.dot is wrong): values and
gradients against the reference, precision bf16, shared sets, strides, batch splits. On a CUDA device
(`needs_device`) also fp32 / bf16 / fp16 at an LLM-sized vocabulary tile count against the CPU reference,
bitwise reproducible across launches and batch splits (one program owns its rows, no atomics), and backend
"auto" picking Triton on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch
from _backends import DEVICE, needs_device
from _semantic_checks import (
    assert_identical,
    check_against_reference,
    loss_and_grad,
    make_problem,
    round_bf16,
)

import spae_fast
from spae_fast import _ref
from spae_fast.semantic import candidates_from_relevance, pack_candidate_sets, pyramid_set_of_position

pytestmark = pytest.mark.parametrize("gpu_backend", ["triton"], indirect=True)


def _device_loss_and_grad(z, weight, index, offsets, sets=None, **kwargs):
    """`loss_and_grad` with every tensor on the device, the results back on the CPU."""
    on_device = [None if t is None else t.to(DEVICE) for t in (z, weight, index, offsets, sets)]
    return tuple(t.cpu() for t in loss_and_grad(*on_device, **kwargs))


# ----------------------------------------------------------------------------------------------------------
# Tiny fp32 cases (interpreted without a device)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num", "num_rows", "dim"), [(1, 1, 1), (21, 45, 19), (17, 40, 33)])
def test_triton_matches_reference(gpu_backend, num, num_rows, dim):
    z, weight, mask = make_problem(num, num_rows, dim, seed=num + dim, empty_rows=(0,) if num > 1 else ())
    index, offsets = _ref.candidates_from_mask(mask)
    loss, grad = _device_loss_and_grad(z, weight, index, offsets, tau=0.8, backend=gpu_backend)
    check_against_reference(loss, grad, z, weight, index, offsets, tau=0.8)


def test_triton_precision_bf16_is_the_loss_of_the_rounded_operands(gpu_backend):
    z, weight, mask = make_problem(13, 70, 21, seed=97)
    index, offsets = _ref.candidates_from_mask(mask)
    loss, grad = _device_loss_and_grad(
        z, weight, index, offsets, tau=0.8, backend=gpu_backend, precision="bf16"
    )
    check_against_reference(loss, grad, round_bf16(z), round_bf16(weight), index, offsets, tau=0.8)


def test_triton_shared_sets_no_grad_and_strides(gpu_backend):
    z, weight, _ = make_problem(18, 35, 20, seed=71)
    index, offsets = pack_candidate_sets([torch.tensor([3, 3, 30]), torch.tensor([], dtype=torch.long),
                                          torch.tensor([0, 34])])  # fmt: skip
    sets = torch.tensor([0, 1, 2, -1, 2, 0] * 3)
    weight_strided = torch.zeros(70, 20, device=DEVICE)[::2]
    weight_strided.copy_(weight)
    loss, grad = _device_loss_and_grad(z, weight_strided, index, offsets, sets, backend=gpu_backend)
    check_against_reference(loss, grad, z, weight, index, offsets, sets, tau=1.0)
    args = [t.to(DEVICE) for t in (z, weight, index, offsets, sets)]
    with torch.no_grad():
        no_grad = spae_fast.semantic_loss(*args, reduction="none", backend=gpu_backend)
    assert_identical(no_grad.cpu(), loss, "triton no_grad vs grad")
    # per-position values do not depend on the batch (one program owns its rows; no atomics)
    head = spae_fast.semantic_loss(
        args[0][:5], args[1], args[2], args[3], args[4][:5], reduction="none", backend=gpu_backend
    )
    assert_identical(head.cpu(), loss[:5], "triton batch split")


# ----------------------------------------------------------------------------------------------------------
# On a CUDA device: 16-bit inputs, LLM-sized vocabularies
# ----------------------------------------------------------------------------------------------------------


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


@needs_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("batch", "num_rows", "dim"), [(2, 1000, 64), (3, 4099, 576), (1, 77, 19)])
def test_triton_matches_cpu_reference(gpu_backend, dtype, batch, num_rows, dim):
    z, weight, index, offsets, sets = _problem(batch, num_rows, dim, seed=num_rows, dtype=dtype)
    loss, grad = _device_loss_and_grad(z, weight, index, offsets, sets, backend=gpu_backend, tau=0.5)
    assert grad.dtype == dtype
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
    torch.testing.assert_close(loss, expected.detach(), rtol=0, atol=atol)
    grad_tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.float(), expected_grad, rtol=grad_tol, atol=grad_tol * 0.1)


@needs_device
def test_triton_bitwise_reproducible_and_batch_split(gpu_backend):
    z, weight, index, offsets, sets = _problem(4, 3000, 128, seed=5)
    args = [t.to(DEVICE) for t in (z, weight, index, offsets, sets)]
    first = loss_and_grad(*args, backend=gpu_backend)
    again = loss_and_grad(*args, backend=gpu_backend)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    head = loss_and_grad(args[0][:17], args[1], args[2], args[3], args[4][:17], backend=gpu_backend)
    assert torch.equal(head[0], first[0][:17]) and torch.equal(head[1], first[1][:17])


@needs_device
def test_auto_uses_triton_on_cuda_and_mean_matches(gpu_backend):
    z, weight, index, offsets, sets = _problem(2, 500, 32, seed=9)
    args = [t.to(DEVICE) for t in (z, weight, index, offsets, sets)]
    auto = spae_fast.semantic_loss(*args)
    explicit = spae_fast.semantic_loss(*args, backend=gpu_backend)
    assert torch.equal(auto, explicit)
    cpu = spae_fast.semantic_loss(z, weight, index, offsets, sets, backend="cpu")
    torch.testing.assert_close(auto.cpu(), cpu, rtol=1e-5, atol=1e-5)


@needs_device
@pytest.mark.parametrize(("batch", "num_rows", "dim"), [(2, 1000, 64), (3, 4099, 576)])
def test_triton_precision_bf16_matches_the_cpu_bf16_loss(gpu_backend, batch, num_rows, dim):
    """precision="bf16" is the loss of bf16(z) against bf16(E): the Triton kernel (tensor cores) and the CPU
    kernel agree up to fp32 accumulation order and the CPU's bf16 rounding of the gradient's softmax weights."""
    z, weight, index, offsets, sets = _problem(batch, num_rows, dim, seed=num_rows + 1)
    loss, grad = _device_loss_and_grad(
        z, weight, index, offsets, sets, backend=gpu_backend, tau=0.5, precision="bf16"
    )
    cpu_loss, cpu_grad = loss_and_grad(
        z, weight, index, offsets, sets, backend="cpu", tau=0.5, precision="bf16"
    )
    exact = _ref.semantic_loss_reference(
        z.bfloat16().double(), weight.bfloat16().double(), index, offsets, sets, tau=0.5, reduction="none"
    )
    scale = weight.norm(dim=1).max() ** 2 + 2 * z.norm(dim=1).max() * weight.norm(dim=1).max()
    atol = float(1e-5 * scale / 0.5) + 1e-5
    torch.testing.assert_close(loss.double(), exact, rtol=0, atol=atol)
    torch.testing.assert_close(loss, cpu_loss, rtol=0, atol=atol)
    assert float((grad - cpu_grad).abs().max()) <= 2**-7 * float(cpu_grad.abs().max()) + atol
