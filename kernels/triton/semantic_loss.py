"""Fused semantic loss in Triton: the vocabulary softmax statistics without the N x V logits.

Math (the reference `spae_fast._ref.semantic_loss_parts_reference` is the spec). For queries z [N, D], the
codebook e [V, D] and a temperature tau:

    s_k(p)  = (2 z_p . e_k - ||e_k||^2) / tau           (= -||z_p - e_k||^2 / tau + ||z_p||^2 / tau)
    lse(p)  = logsumexp_k s_k(p)
    mu(p)   = sum_k softmax_k(s(p)) e_k

`softmax_stats` returns lse [N] and (with ``compute_grad``) mu [N, D]; `set_means` returns, per candidate
set, mean_C(e) and mean_C(||e||^2) in fp64. The op (spae_fast/ops/gpu_semantic_loss.py) combines them:
loss(p) = lse(p) - (2 z_p . mean_C(e) - mean_C(||e||^2)) / tau and d loss(p) / d z_p = (2 / tau)
(mu(p) - mean_C(e)).

Kernel structure (`_softmax_stats_kernel`): one program per block of BLOCK_M rows walks the vocabulary in
tiles of BLOCK_N rows in ascending order. Per tile: ``acc = sum tl.dot(z_tile, e_tile^T)`` over D in
BLOCK_K steps (fp32 accumulation; 16-bit operands of the same dtype go to the tensor cores as they are, fp32
ones run as exact "ieee" fp32), ||e||^2 of the tile from the same loads, the logits, an online logsumexp
(running max m, running sum l rescaled by exp(m_old - m_new)); with compute_grad, the softmax-weighted rows
``mu = mu * exp(m_old - m_new) + tl.dot(exp(s - m_new), e_tile[:, d-chunk])`` for every chunk of BLOCK_D
columns. mu is too wide for registers at LLM sizes (D = 576 .. 4096), so it lives in the fp32 output
buffer, read and written only by the program that owns those rows (a barrier orders each tile's stores before
the next tile's loads): no atomics, so the result is bitwise reproducible for any grid. At the end mu is
divided by l. Extra memory: O(N D) (mu) - nothing of size N x V.

`_set_mean_kernel`: one program per set sums its candidate rows in list order in fp64.
"""

from __future__ import annotations

import os

import torch

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _softmax_stats_kernel(
    Z, E, LSE, MU,  # [N, D], [V, D], [N] fp32, [N, D] fp32 (zero-filled; only with COMPUTE_GRAD)
    N, V, D,
    stride_zn, stride_zd, stride_ev, stride_ed, stride_mn,
    tau,
    COMPUTE_GRAD: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    z_rows = Z + rows.to(tl.int64)[:, None] * stride_zn  # [BLOCK_M, 1]
    mu_rows = MU + rows.to(tl.int64)[:, None] * stride_mn

    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, V, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < V
        e_cols = E + cols.to(tl.int64)[None, :] * stride_ev  # [1, BLOCK_N]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        norm = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < D
            a = tl.load(z_rows + ks[None, :] * stride_zd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(e_cols + ks[:, None] * stride_ed, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            b32 = b.to(tl.float32)
            norm += tl.sum(b32 * b32, axis=0)
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), b32, acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        logits = (2.0 * acc - norm[None, :]) / tau
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        rescale = tl.exp(run_max - new_max)  # 0 on the first tile (run_max = -inf)
        weights = tl.exp(logits - new_max[:, None])
        run_sum = run_sum * rescale + tl.sum(weights, axis=1)
        run_max = new_max
        if COMPUTE_GRAD:
            e_rows = E + cols.to(tl.int64)[:, None] * stride_ev  # [BLOCK_N, 1]
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + offs_d
                d_ok = ds < D
                mu_mask = row_ok[:, None] & d_ok[None, :]
                mu = tl.load(mu_rows + ds[None, :], mask=mu_mask, other=0.0)
                e = tl.load(e_rows + ds[None, :] * stride_ed, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                mu = mu * rescale[:, None] + tl.dot(weights, e.to(tl.float32), input_precision="ieee")
                tl.store(mu_rows + ds[None, :], mu, mask=mu_mask)
            tl.debug_barrier()  # this tile's stores of mu before the next tile's loads

    tl.store(LSE + rows, run_max + tl.log(run_sum), mask=row_ok)
    if COMPUTE_GRAD:
        inverse = 1.0 / run_sum
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + offs_d
            mu_mask = row_ok[:, None] & (ds < D)[None, :]
            mu = tl.load(mu_rows + ds[None, :], mask=mu_mask, other=0.0)
            tl.store(mu_rows + ds[None, :], mu * inverse[:, None], mask=mu_mask)


@triton.jit
def _set_mean_kernel(
    E, INDEX, OFFSETS, MEAN, NORM,  # [V, D], [M] int64, [S + 1] int64, [S, D] fp64, [S] fp64
    D, stride_ev, stride_ed,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0)
    begin = tl.load(OFFSETS + s)
    end = tl.load(OFFSETS + s + 1)
    count = tl.maximum(end - begin, 1).to(tl.float64)
    offs_d = tl.arange(0, BLOCK_D)
    norm = tl.zeros([BLOCK_D], tl.float64)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + offs_d
        d_ok = ds < D
        total = tl.zeros([BLOCK_D], tl.float64)
        for i in range(begin, end):
            row = tl.load(INDEX + i)
            e = tl.load(E + row * stride_ev + ds * stride_ed, mask=d_ok, other=0.0).to(tl.float64)
            total += e
            norm += e * e
        tl.store(MEAN + s.to(tl.int64) * D + ds, total / count, mask=d_ok)
    tl.store(NORM + s, tl.sum(norm, axis=0) / count)


def _config(device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D, num_warps); tiny blocks under the interpreter."""
    if INTERPRET or device.type != "cuda":
        return 16, 16, 16, 16, 1
    return 64, 64, 64, 64, 4


def softmax_stats(
    z: torch.Tensor, weight: torch.Tensor, tau: float, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """z [N, D], weight [V, D] -> (lse [N] fp32, mu [N, D] fp32 = sum_k softmax_k e_k, or [0, D])."""
    num, dim = z.shape
    lse = torch.empty(num, dtype=torch.float32, device=z.device)
    mu = torch.zeros(num if compute_grad else 0, dim, dtype=torch.float32, device=z.device)
    if num == 0:
        return lse, mu
    block_m, block_n, block_k, block_d, num_warps = _config(z.device)
    upcast = z.dtype != weight.dtype or z.dtype == torch.float32
    mu_arg = mu if compute_grad else lse  # unused pointer when not computing the gradient
    grid = (triton.cdiv(num, block_m),)
    _softmax_stats_kernel[grid](
        z, weight, lse, mu_arg, num, weight.shape[0], dim,
        z.stride(0), z.stride(1), weight.stride(0), weight.stride(1), mu.stride(0) if compute_grad else 0,
        float(tau),
        COMPUTE_GRAD=compute_grad, UPCAST=upcast, INPUT_PRECISION="ieee",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return lse, mu


def set_means(
    weight: torch.Tensor, candidate_index: torch.Tensor, candidate_offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (mean_C(e) [S, D] fp64, mean_C(||e||^2) [S] fp64); 0 for empty sets. Sums in list order."""
    num_sets, dim = candidate_offsets.numel() - 1, weight.shape[1]
    mean = torch.zeros(num_sets, dim, dtype=torch.float64, device=weight.device)
    norm = torch.zeros(num_sets, dtype=torch.float64, device=weight.device)
    if num_sets == 0:
        return mean, norm
    block_d = 16 if INTERPRET or weight.device.type != "cuda" else 128
    _set_mean_kernel[(num_sets,)](
        weight, candidate_index, candidate_offsets, mean, norm, dim, weight.stride(0), weight.stride(1),
        BLOCK_D=block_d,
    )  # fmt: skip
    return mean, norm
