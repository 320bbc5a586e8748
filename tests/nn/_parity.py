"""Helpers for comparing spae_fast.nn layers with vector-quantize-pytorch: twin construction (same seed, same RNG
use) and near-tie accounting for index mismatches."""

from __future__ import annotations

import torch

NEAR_TIE_RTOL = 1e-5  # |d(x, e_a) - d(x, e_b)| <= rtol * (|x|^2 + max|e|^2): rounding can pick either


def twins(ref_cls, fast_cls, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    ref = ref_cls(**kwargs)
    torch.manual_seed(seed)
    fast = fast_cls(**kwargs)
    return ref, fast


def near_tie_mismatches(
    queries: torch.Tensor, table: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor, metric: str = "l2"
) -> tuple[int, int]:
    """(mismatched positions, of which near-ties) for codes chosen from ``table [V, D]`` for ``queries [.., D]``.

    A mismatch is a near-tie when both codes are equally good up to fp32 rounding of the distance."""
    q = queries.detach().double().reshape(-1, queries.shape[-1])
    a, b = ours.reshape(-1), theirs.reshape(-1)
    differ = (a != b).nonzero()[:, 0]
    if differ.numel() == 0:
        return 0, 0
    t = table.detach().double()
    qa, ea, eb = q[differ], t[a[differ]], t[b[differ]]
    if metric == "l2":
        da, db = ((qa - ea) ** 2).sum(-1), ((qa - eb) ** 2).sum(-1)
    else:
        da, db = -(qa * ea).sum(-1), -(qa * eb).sum(-1)
    scale = (qa**2).sum(-1) + (t**2).sum(-1).max()
    ties = ((da - db).abs() <= NEAR_TIE_RTOL * scale).sum().item()
    return differ.numel(), int(ties)
