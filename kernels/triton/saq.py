"""Streaming average / residual quantization (SAQ / RQ) in Triton: one launch of the fused search
(`nearest.search` with ``saq=SaqLayer(...)``) per layer, the layer's targets formed in its prologue.

Math (the reference `spae_fast._ref.saq_reference` is the spec). Layer l (0-based here) of side s_l on a g x g
grid samples rows / cols t i + t - ceil(t / 2) with t = g / s_l; at such a position p of image b

    target(p) = float(c_l * z[b, :, p] - sum_{m < l} e[k_m(Up_m(p))])      c_l = l + 1 (SAQ) or 1 (RQ)

with the sum over the covering tokens of the layers above in fp64, ascending m, rounded once: bitwise the
targets of the CPU kernel and the reference. The search never stores an N x D target: each program forms the
BLOCK_M rows of its work item in a scratch of O(programs x BLOCK_M x D). `saq_pair_dot64` gives the fp64
(target, candidate) dot products exact mode certifies the winner with.
"""

from __future__ import annotations

import dataclasses
import os

import torch

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _saq_target_tile(
    Z, E, IDS, LAYER_SIDES, LAYER_FIRSTS, rows, row_ok, ks, k_ok,
    stride_zb, stride_zd, stride_zy, stride_zx, stride_ib, stride_ev, stride_ed,
    grid, layer, coefficient,
):  # fmt: skip
    """SAQ / RQ targets [rows, ks] in fp32: float(c_l * z(p) - sum_{m<l} e(k_m(Up_m(p)))), the sum in fp64 in
    ascending m, c_l * z exact, one rounding at the end - bitwise what the CPU kernel and the reference form.
    rows are the positions of layer `layer` (0-based) in raster order: (image, i, j)."""
    side = tl.load(LAYER_SIDES + layer)
    per_image = side * side
    image = (rows // per_image).to(tl.int64)
    stride = grid // side
    offset = stride - (stride + 1) // 2
    y = stride * ((rows // side) % side) + offset
    x = stride * (rows % side) + offset
    mask = row_ok[:, None] & k_ok[None, :]
    z_rows = Z + image * stride_zb + y.to(tl.int64) * stride_zy + x.to(tl.int64) * stride_zx
    z = tl.load(z_rows[:, None] + ks[None, :] * stride_zd, mask=mask, other=0.0).to(tl.float64)
    covering = z * 0.0
    for m in range(layer):
        side_m = tl.load(LAYER_SIDES + m)
        stride_m = grid // side_m
        column = tl.load(LAYER_FIRSTS + m) + (y // stride_m) * side_m + x // stride_m
        token = tl.load(IDS + image * stride_ib + column, mask=row_ok, other=0)
        e = tl.load(E + token[:, None] * stride_ev + ks[None, :] * stride_ed, mask=mask, other=0.0)
        covering = covering + e.to(tl.float64)
    return (coefficient * z - covering).to(tl.float32)


@triton.jit
def _saq_pair_dot64_kernel(
    E, INDEX, OUT, C, D, stride_ev, stride_ed, stride_im, stride_ic,
    Z, IDS, LAYER_SIDES, LAYER_FIRSTS, stride_zb, stride_zd, stride_zy, stride_zx, stride_ib,
    grid, layer, coefficient,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """`nearest._pair_dot64_kernel` with A = the fp32 SAQ targets of layer `layer` (formed as in the search)."""
    LANES: tl.constexpr = 32
    m = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    index = tl.load(INDEX + m.to(tl.int64) * stride_im + cs * stride_ic, mask=c_ok, other=-1)
    use = c_ok & (index >= 0)
    lanes = tl.arange(0, LANES)
    rows = m + tl.zeros([1], tl.int32)
    b_rows = E + tl.maximum(index, 0)[:, None] * stride_ev
    acc = tl.zeros([BLOCK_C, LANES], tl.float64)
    for d0 in range(0, D, LANES):
        d = d0 + lanes
        d_ok = d < D
        a = _saq_target_tile(
            Z, E, IDS, LAYER_SIDES, LAYER_FIRSTS, rows, rows >= 0, d, d_ok,
            stride_zb, stride_zd, stride_zy, stride_zx, stride_ib, stride_ev, stride_ed,
            grid, layer, coefficient,
        )  # fmt: skip
        b = tl.load(b_rows + d[None, :] * stride_ed, mask=use[:, None] & d_ok[None, :], other=0.0).to(
            tl.float64
        )
        acc = tl.fma(a.to(tl.float64), b, acc)
    total = _combine_lanes(acc, BLOCK_C)
    tl.store(OUT + m.to(tl.int64) * C + cs, total, mask=c_ok)


@triton.jit
def _combine_lanes(acc, BLOCK_C: tl.constexpr):
    """[BLOCK_C, 32] fp64 lane partials -> [BLOCK_C] sums in the canonical order of the fp64 rescoring: lanes
    combine pairwise (l, l^1), (l, l^2), ... (l, l^16), as the CUDA module does."""
    acc = tl.sum(tl.reshape(acc, [BLOCK_C, 16, 2]), axis=2)
    acc = tl.sum(tl.reshape(acc, [BLOCK_C, 8, 2]), axis=2)
    acc = tl.sum(tl.reshape(acc, [BLOCK_C, 4, 2]), axis=2)
    acc = tl.sum(tl.reshape(acc, [BLOCK_C, 2, 2]), axis=2)
    return tl.sum(acc, axis=1)


@dataclasses.dataclass(frozen=True)
class SaqLayer:
    """One SAQ / RQ layer as the kernels read it: latents z [B, D, g, g], the id matrix [B, total] int64
    (layers above `layer` filled in), layer sides / first columns as int32 device tensors."""

    z: torch.Tensor
    ids: torch.Tensor
    sides: torch.Tensor
    firsts: torch.Tensor
    layer: int
    coefficient: float

    def args(self) -> tuple:
        z = self.z
        return (
            z, self.ids, self.sides, self.firsts,
            z.stride(0), z.stride(1), z.stride(2), z.stride(3), self.ids.stride(0),
            z.shape[-1], self.layer, self.coefficient,
        )  # fmt: skip


def saq_pair_dot64(e: torch.Tensor, index: torch.Tensor, saq: SaqLayer) -> torch.Tensor:
    """out[m, c] = target_m . e[index[m, c]] in fp64 (the canonical order), target_m = SAQ target of row m."""
    num_pairs, num_candidates = index.shape
    out = torch.empty(num_pairs, num_candidates, dtype=torch.float64, device=e.device)
    if num_pairs == 0 or num_candidates == 0:
        return out
    block_c = min(16, triton.next_power_of_2(num_candidates))
    grid = (num_pairs, triton.cdiv(num_candidates, block_c))
    _saq_pair_dot64_kernel[grid](
        e, index, out, num_candidates, e.shape[1], e.stride(0), e.stride(1), index.stride(0), index.stride(1),
        *saq.args(), BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return out
