"""The Triton semantic loss: device "cuda" kernel of ``spae_fast::semantic_loss`` on backend "triton" (and
CPU tensors under TRITON_INTERPRET=1). Spec: `spae_fast._ref.semantic_loss_parts_reference`.

The kernels (spae_fast.triton_kernels.semantic_loss) stream the vocabulary once per position block for
the logsumexp lse(p) of s_k(p) = -||z_p - e_k||^2 / tau and, for the gradient, the softmax-weighted
embedding mu(p) = sum_k softmax_k e_k; a second kernel forms each set's mean embedding. The loss is then
lse(p) - (2 z_p . mean_C - mean_C ||e||^2) / tau (the ||z_p||^2 / tau terms cancel) and its gradient
(2 / tau) (mu(p) - mean_C), both formed here in fp64.
"""

from __future__ import annotations

import importlib

import torch

from .backends import triton_interpreting
from .common import semantic_check_finite


def _semantic_triton_module():
    module = importlib.import_module("spae_fast.triton_kernels.semantic_loss")
    if module.INTERPRET != triton_interpreting():  # TRITON_INTERPRET changed: re-decorate the kernels
        module = importlib.reload(module)
    return module


def _semantic_combine(z, lse, mu, set_mean, set_norm, sizes, set_of_position, tau, compute_grad):
    """loss / grad of every position from the softmax statistics and the set means (GPU backends)."""
    num, dim = z.shape
    if sizes.numel() == 0:
        return lse.new_zeros(num), lse.new_zeros(num if compute_grad else 0, dim)
    sets = set_of_position.clamp_min(0)
    active = (set_of_position >= 0) & (sizes[sets] > 0)
    mean = set_mean[sets]  # [N, D] fp64
    target = (2.0 * (z.double() * mean).sum(1) - set_norm[sets]) / tau
    loss = torch.where(active, lse.double() - target, 0.0).float()
    if not compute_grad:
        return loss, lse.new_zeros(0, dim)
    grad = torch.where(active[:, None], (2.0 / tau) * (mu.double() - mean), 0.0).float()
    return loss, grad


def semantic_loss(z, weight, candidate_index, candidate_offsets, set_of_position, tau, compute_grad,
                  check_finite, precision):  # fmt: skip
    """z [N, D] -> (loss [N] fp32, grad [N, D] fp32 or [0, D]); see `spae_fast.semantic_loss`."""
    if precision == "bf16":  # 16-bit operands of one dtype go to the tensor cores; the interpreter: fp32
        z, weight = z.bfloat16(), weight.bfloat16()
        if triton_interpreting():
            z, weight = z.float(), weight.float()
    semantic_check_finite(z, weight, check_finite)
    module = _semantic_triton_module()
    lse, mu = module.softmax_stats(z, weight, tau, compute_grad)
    set_mean, set_norm = module.set_means(weight, candidate_index, candidate_offsets)
    sizes = candidate_offsets[1:] - candidate_offsets[:-1]
    return _semantic_combine(z, lse, mu, set_mean, set_norm, sizes, set_of_position, tau, compute_grad)
