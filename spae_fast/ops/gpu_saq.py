"""The GPU SAQ: device "cuda" kernel of ``spae_fast::saq`` on backend "cuda" or "triton" (spec:
`spae_fast._ref.saq_reference`).

Per layer l with coefficient c_l (l for SAQ, 1 for RQ), the target of a sampled position p is
z_l(p) = c_l z(p) - sum_{m<l} e(k_m(Up_m(p))). The search kernels form it on the fly from z and the ids of
the layers above (never an N x D target in memory), keep 8 candidates in low precision and rescore them in
fp64; the certificate of exact mode (`gpu_search`) accepts a row or sends it through exact mode on its
materialised target. Every id is the exact (fp64-evaluated) l2 argmin of its fp32 target, ties to the
lowest row.
"""

from __future__ import annotations

import torch

from .. import _native
from . import gpu_search
from .common import GPU_STATS, SearchStats
from .gpu_kernels import SaqLayerArgs
from .gpu_kernels import kernels as _kernels


def _saq_positions(batch: int, grid: int, side: int, rows: torch.Tensor):
    """(image, y, x) of raster rows of a layer with side `side` (SPAE-METHOD.md §2 dilated subsampling)."""
    stride = grid // side
    offset = stride - (stride + 1) // 2
    image = rows // (side * side)
    return image, stride * ((rows // side) % side) + offset, stride * (rows % side) + offset


def _saq_covering_tokens(ids, sides, firsts, layer, grid, image, y, x) -> list[torch.Tensor]:
    """Ids of the tokens of layers < layer covering positions (image, y, x), ascending layer."""
    tokens = []
    for m in range(layer):
        stride = grid // sides[m]
        tokens.append(ids[image, firsts[m] + (y // stride) * sides[m] + x // stride])
    return tokens


def _saq_targets(z, weight, ids, sides, firsts, layer, coefficient, rows) -> torch.Tensor:
    """Targets [U, D] fp32 of the given rows of one layer: the same fp64 operations in the same order as the
    kernels (and the CPU kernel / reference), so bitwise equal. Used only for the few uncertain rows."""
    grid = z.shape[-1]
    image, y, x = _saq_positions(z.shape[0], grid, sides[layer], rows)
    z64 = z[image, :, y, x].double()  # [U, D]
    covering = torch.zeros_like(z64)
    for token in _saq_covering_tokens(ids, sides, firsts, layer, grid, image, y, x):
        covering = covering + weight[token].double()
    return (coefficient * z64 - covering).float()


def saq(z, weight, sides, mode, backend, check_finite):
    """z [B, D, g, g], weight [V, D] -> ids [B, sum s_l^2] int64 on backend "cuda" or "triton".

    Per layer: one fused search launch whose programs form their targets once per work item (from z and
    the ids of the layers above, never an N x D target in memory), keeping 8 candidates in low precision
    (the codebook's bf16 with bf16-rounded targets, else TF32); one fp64 rescoring launch of those candidates
    (targets formed again on the fly); the certificate of exact mode; the few uncertain rows go through
    exact mode on their materialised targets. Every id is the exact (fp64-evaluated) l2 argmin of its fp32
    target, ties to the lowest row."""
    kernels = _kernels(backend)
    batch, dim, grid = z.shape[0], z.shape[1], z.shape[-1]
    num_rows = weight.shape[0]
    firsts = [0]
    for side in sides:
        firsts.append(firsts[-1] + side * side)
    total, firsts = firsts[-1], firsts[:-1]
    with gpu_search.device_guard(z.device):
        ids = torch.zeros(batch, total, dtype=torch.int64, device=z.device)
        if batch == 0:
            return ids
        table = gpu_search.operands(weight, "l2", kernels)
        if check_finite:
            bad = ~torch.isfinite(z).all(dim=1)  # [B, g, g]
            if bool(bad.any()):
                _native.raise_for_status(1, int(bad.reshape(-1).nonzero()[0, 0]), stage="saq", grid=grid)
        if weight.dtype == torch.bfloat16:  # bf16 table as it is, targets rounded to bf16 (one-sided)
            dot_dtype, input_precision, unit, label = torch.bfloat16, "tf32", 2.0**-9, "bfloat16"
        else:
            dot_dtype, input_precision, unit, label = torch.float32, "tf32", 2.0**-10, "tf32"
        eq = table.operand(weight, dot_dtype, kernels)
        z_norm = torch.linalg.vector_norm(z, dim=1, dtype=torch.float64)  # [B, g, g]
        e_norm = table.norm_sq64.sqrt()
        sides_device = torch.tensor(sides, dtype=torch.int32, device=z.device)
        firsts_device = torch.tensor(firsts, dtype=torch.int32, device=z.device)
        candidates = min(num_rows, 8)
        rows_total = rescored = full = 0
        for layer, side in enumerate(sides):
            coefficient = float(layer + 1) if mode == "saq" else 1.0
            args = SaqLayerArgs(z, ids, sides_device, firsts_device, layer, coefficient)
            num_queries = batch * side * side
            rows = torch.arange(num_queries, device=z.device)
            image, y, x = _saq_positions(batch, grid, side, rows)
            # |target| <= c |z| + sum |e|: the norm the error bound and the overflow check need
            target_norm = coefficient * z_norm[image, y, x]
            for token in _saq_covering_tokens(ids, sides, firsts, layer, grid, image, y, x):
                target_norm = target_norm + e_norm[token]
            if check_finite:
                overflow = target_norm * (table.max_norm * 2.0) > gpu_search.MAX_NORM_PRODUCT
                if bool(overflow.any()):
                    row = int(overflow.nonzero()[0, 0])
                    position = (int(image[row]) * grid + int(y[row])) * grid + int(x[row])
                    _native.raise_for_status(3, position, stage="saq", grid=grid)
            k_pad = gpu_search.next_pow2(candidates)
            result = kernels.saq_search(
                eq, table.bias, table.col_scale, k_pad, input_precision, args, num_queries
            )
            if k_pad == 1:
                keys = result[0][:, None]
            else:
                keys = gpu_search.pack_keys(*result).sort(dim=1).values[:, :candidates]
            approx, chosen = gpu_search.unpack_keys(keys)
            dot = kernels.saq_pair_dot64(weight, chosen, args)
            exact, chosen = gpu_search.sort_total(table.norm_sq64[chosen] - 2.0 * dot, chosen)
            index = chosen[:, 0].clone()
            if candidates < num_rows:
                delta = gpu_search.error_bound(target_norm * target_norm, table, "l2", dim, unit)
                uncertain = (~(exact[:, 0] < approx[:, candidates - 1].double() - delta)).nonzero()[:, 0]
                if uncertain.numel():
                    targets = _saq_targets(z, weight, ids, sides, firsts, layer, coefficient, uncertain)
                    norm_sq64 = kernels.pair_dot64(
                        targets, targets, torch.arange(len(targets), device=z.device)[:, None]
                    )
                    _, again, _, _, rest = gpu_search.exact_topk(
                        kernels, targets, weight, table, kernels.operand(targets),
                        table.operand(weight, torch.float32, kernels), None, norm_sq64[:, 0], 1, "tf32", 2.0**-10, "l2",
                    )  # fmt: skip
                    index[uncertain] = again[:, 0]
                    rescored += int(uncertain.numel())
                    full += rest
            ids[:, firsts[layer] : firsts[layer] + side * side] = index.view(batch, side * side)
            rows_total += num_queries
        GPU_STATS.value = SearchStats(backend, "exact", label, rows_total, candidates, rescored, full)
        return ids
