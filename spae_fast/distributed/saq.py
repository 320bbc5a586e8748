"""Vocabulary-parallel SAQ / RQ over a token pyramid on a `ShardedCodebook`: bitwise `spae_fast.saq`'s ids.

For layer l (1-based) with side s_l on the g x g grid, at a sampled position p (rows / cols
``t*i + t - ceil(t/2)``, t = g / s_l):

    z_l(p) = c_l z(p) - sum_{m<l} e(k_m(Up_m(p))),     k_l(p) = argmin_k ||z_l(p) - e_k||^2

(c_l = l for "saq", 1 for "rq"; ties to the lowest global row). Layers are sequential, so the shards merge
after every layer: the layer's targets are searched on every shard and merged exactly
(`spae_fast.distributed.search`), then the chosen words' embeddings are fetched from the ranks that own them
(`lookup`: one all-reduce of [N_l, D] fp32 bit patterns) for the next layers' targets. The target arithmetic
is the native kernel's (csrc/saq/saq.cpp): the covering embeddings summed in fp64 in ascending m starting
from 0.0, combined with c_l z(p) in fp64 and rounded once to fp32 - so every target, hence every id, is
bitwise the single-process op's. Communication per layer: the search's O(N_l) plus N_l D fp32 for the
embeddings (a single-process run needs neither).
"""

from __future__ import annotations

import torch

from .. import _native, _validate
from ..ops.backends import resolve_backend
from ..pyramid import TokenPyramid
from . import comm
from .search import _MAX_NORM_PRODUCT, _local_search, _merge, check_collective
from .sharded_codebook import ShardedCodebook

SAQ_MODES = ("saq", "rq")
MAX_LAYERS = 16  # every backend's limit (spae_fast.ops.boundary.MAX_SAQ_LAYERS)


def _first_bad_position(bad: torch.Tensor) -> int:
    return int(bad.reshape(-1).nonzero()[0, 0])


def saq(
    z: torch.Tensor,
    codebook: ShardedCodebook,
    layers: tuple[int, ...] | list[int] = (1, 2, 4, 8, 16, 16),
    *,
    mode: str = "saq",
    queries: str = "replicated",
    check_finite: bool = True,
    backend: str = "auto",
    prefilter: str = "auto",
) -> torch.Tensor:
    """`spae_fast.saq` on a `ShardedCodebook`: ids ``[B, sum_l s_l^2]`` int64 (global rows, layer after layer,
    raster order), bitwise the single-process op on the whole table. A collective over the codebook's group.

    Args:
        z: ``[B, D, g, g]`` latents (fp32 / bf16 / fp16). ``queries="replicated"``: the same on every rank;
            ``"sharded"``: each rank's own images (B may differ, also 0), all-gathered inside the group; each
            rank gets the ids of its own images.
        codebook: an l2 `ShardedCodebook`.
        layers, mode, check_finite, prefilter: as `spae_fast.saq` (the pre-filter runs per shard; the ids are
            bitwise the same either way).
    """
    check_collective(codebook, queries, "saq")
    if mode not in SAQ_MODES:
        raise ValueError(f"mode must be one of {SAQ_MODES}, got {mode!r}")
    _validate.flag(check_finite, "check_finite")
    z = _validate.latent(z, codebook.dim, codebook.device)
    pyramid = TokenPyramid(layers, z.shape[-1])
    if pyramid.num_layers > MAX_LAYERS:
        raise ValueError(f"layers has {pyramid.num_layers} layers; every backend supports at most {MAX_LAYERS}")
    backend = resolve_backend(backend, z.device)
    mine = None
    if queries == "sharded":
        z, sizes = comm.gather_rows(z.detach(), codebook.group)
        mine = slice(sum(sizes[: codebook.rank]), sum(sizes[: codebook.rank + 1]))
    ids = _saq_replicated(z.detach(), codebook, pyramid, mode, check_finite, backend, prefilter)
    return ids[mine] if mine is not None else ids


def _saq_replicated(z, codebook, pyramid: TokenPyramid, mode, check_finite, backend, prefilter) -> torch.Tensor:
    batch, dim, grid = z.shape[0], z.shape[1], z.shape[-1]
    total = sum(side * side for side in pyramid.sides)
    if batch == 0:
        return torch.empty(0, total, dtype=torch.int64, device=z.device)
    if check_finite:
        bad = ~torch.isfinite(z).all(1)  # [B, g, g]
        if bool(bad.any()):
            _native.raise_for_status(_native._NON_FINITE_QUERY, _first_bad_position(bad), stage="saq", grid=grid)
    z64 = z.double().permute(0, 2, 3, 1)  # [B, g, g, D]
    chosen: list[tuple[int, torch.Tensor]] = []  # (stride t_m, e(k_m) [B, s_m, s_m, D] fp64) per layer so far
    ids = []
    for layer, side in enumerate(pyramid.sides, 1):
        stride = grid // side
        pos = torch.arange(side, device=z.device) * stride + (stride - (stride + 1) // 2)
        covering = torch.zeros(batch, side, side, dim, dtype=torch.float64, device=z.device)
        for up_stride, embeddings in chosen:  # ascending m, from 0.0: the kernel's fp64 chain
            cell = pos // up_stride
            covering = covering + embeddings[:, cell][:, :, cell]
        coefficient = float(layer) if mode == "saq" else 1.0
        target = (coefficient * z64[:, pos][:, :, pos] - covering).float().reshape(-1, dim)  # one rounding
        if check_finite:
            norm = (target.double() ** 2).sum(-1).sqrt()
            bad = (norm * codebook.max_norm * 2.0 > _MAX_NORM_PRODUCT) | ~torch.isfinite(target).all(-1)
            if bool(bad.any()):
                row = _first_bad_position(bad)
                b, r = row // (side * side), row % (side * side)
                position = (b * grid + int(pos[r // side])) * grid + int(pos[r % side])
                _native.raise_for_status(_native._OVERFLOW, position, stage="saq", grid=grid)
        dist_local, index_local = _local_search(target, codebook, 1, backend, prefilter)
        _, index = _merge(target, codebook, dist_local, index_local, 1, backend)
        index = index[:, 0]
        ids.append(index.reshape(batch, side * side))
        if layer < pyramid.num_layers:
            rows = comm.lookup_rows(codebook, index).double().reshape(batch, side, side, dim)
            chosen.append((stride, rows))
    return torch.cat(ids, dim=1)
