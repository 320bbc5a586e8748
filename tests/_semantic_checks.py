"""Data, ground truth and comparisons shared by the semantic-loss tests (tests/ops/test_semantic_loss*.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import spae_fast
from spae_fast import _ref


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_problem(num: int, num_rows: int, dim: int, *, seed: int, density: float = 0.1, empty_rows=()):
    """(z [N, D], weight [V, D], mask [N, V]): z near codebook rows (a softmax that is neither flat nor
    one-hot), candidate sets drawn at random, every row non-empty except ``empty_rows``."""
    g = generator(seed)
    weight = torch.randn(num_rows, dim, generator=g)
    z = weight[torch.randint(0, num_rows, (num,), generator=g)] + 0.5 * torch.randn(num, dim, generator=g)
    mask = torch.rand(num, num_rows, generator=g) < density
    mask[torch.arange(num), torch.randint(0, num_rows, (num,), generator=g)] = True
    for row in empty_rows:
        mask[row] = False
    return z, weight, mask


def tolerance(z: torch.Tensor, weight: torch.Tensor, tau: float, rel: float = 2e-6) -> float:
    """Absolute tolerance of a loss: rel x the logit scale (each fp32 logit is exact to a few ulp of it)."""
    z_max = float(z.double().norm(dim=-1).max()) if z.numel() else 0.0
    e_max = float(weight.double().norm(dim=-1).max())
    return rel * (e_max * e_max + 2.0 * z_max * e_max + 1.0) / tau * max(1.0, z.shape[-1] ** 0.5 / 4)


def materialised_cross_entropy(z, weight, mask, tau, reduction="mean"):
    """F.cross_entropy over the literal logits -||z - e||^2 / tau with soft targets uniform on the set,
    in fp64 (rows with an empty set are left out)."""
    logits = -torch.cdist(z.double(), weight.double()).square() / tau
    counts = mask.double().sum(1, keepdim=True)
    keep = counts[:, 0] > 0
    targets = mask.double() / counts.clamp_min(1)
    losses = torch.zeros(z.shape[0], dtype=torch.float64)
    if bool(keep.any()):
        losses = losses.index_put((keep.nonzero()[:, 0],),
                                  F.cross_entropy(logits[keep], targets[keep], reduction="none"))  # fmt: skip
    if reduction == "none":
        return losses
    return losses.sum() / keep.sum().clamp_min(1)


def loss_and_grad(z, weight, index, offsets, sets=None, **kwargs):
    """(per-position losses, d sum(loss) / dz) through the public function."""
    leaf = z.detach().clone().requires_grad_(True)
    loss = spae_fast.semantic_loss(leaf, weight, index, offsets, sets, reduction="none", **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


def reference_loss_and_grad(z, weight, index, offsets, sets=None, *, tau=1.0, dtype=torch.float32):
    leaf = z.detach().to(dtype).requires_grad_(True)
    w = weight if dtype == torch.float32 else weight.to(dtype)
    loss = _ref.semantic_loss_reference(leaf, w, index, offsets, sets, tau=tau, reduction="none")
    if not loss.requires_grad:  # no position has a set: the loss does not depend on z
        return loss, torch.zeros_like(leaf)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


def check_against_reference(loss, grad, z, weight, index, offsets, sets=None, *, tau=1.0) -> None:
    """(loss, grad) of a backend equal the fp32 reference's up to `tolerance` (the gradient to 1e-4 relative)."""
    ref_loss, ref_grad = reference_loss_and_grad(z, weight, index, offsets, sets, tau=tau)
    atol = tolerance(z, weight, tau)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=atol)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=atol / 10)


def assert_identical(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert torch.equal(a.view(torch.int32) if a.dtype == torch.float32 else a,
                       b.view(torch.int32) if b.dtype == torch.float32 else b), what  # fmt: skip


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()
