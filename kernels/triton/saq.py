"""Streaming average / residual quantization (SAQ / RQ) in Triton: one launch of the fused search
(`nearest.search` with ``saq=`` the layer) per layer, the layer's targets formed in its prologue.

Math (the reference `spae_fast._ref.saq_reference` is the spec). Layer l (0-based here) of side s_l on a g x g
grid samples rows / cols t i + t - ceil(t / 2) with t = g / s_l; at such a position p of image b

    target(p) = float(c_l * z[b, :, p] - sum_{m < l} e[k_m(Up_m(p))])      c_l = l + 1 (SAQ) or 1 (RQ)

with the sum over the covering tokens of the layers above in fp64, ascending m, rounded once: bitwise the
targets of the CPU kernel and the reference. The search never stores an N x D target: each program forms the
BLOCK_M rows of its work item in a scratch of O(programs x BLOCK_M x D). `nearest.pair_dot64` with ``saq=``
gives the fp64 (target, candidate) dot products exact mode certifies the winner with.
"""

from __future__ import annotations

import os

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
def _combine_lanes(acc, BLOCK_C: tl.constexpr):
    """[BLOCK_C, 32] fp64 lane partials -> [BLOCK_C] sums in the canonical order of the fp64 rescoring: lanes
    combine pairwise (l, l^1), (l, l^2), ... (l, l^16), as the CUDA module does."""
    acc = tl.sum(tl.reshape(acc, [BLOCK_C, 16, 2]), axis=2)
    acc = tl.sum(tl.reshape(acc, [BLOCK_C, 8, 2]), axis=2)
    acc = tl.sum(tl.reshape(acc, [BLOCK_C, 4, 2]), axis=2)
    acc = tl.sum(tl.reshape(acc, [BLOCK_C, 2, 2]), axis=2)
    return tl.sum(acc, axis=1)


def layer_args(saq) -> tuple:
    """The kernels' arguments for one SAQ / RQ layer. `saq` (`spae_fast.ops.gpu_kernels.SaqLayerArgs`) holds
    the latents z [B, D, g, g], the id matrix ids [B, total] int64 (layers above `layer` filled in), the layer
    sides / first columns as int32 device tensors, the 0-based layer and its coefficient c_l."""
    z = saq.z
    return (
        z, saq.ids, saq.sides, saq.firsts,
        z.stride(0), z.stride(1), z.stride(2), z.stride(3), saq.ids.stride(0),
        z.shape[-1], saq.layer, saq.coefficient,
    )  # fmt: skip
