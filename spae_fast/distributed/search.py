"""Vocabulary-parallel `nearest` and `topk` on a `ShardedCodebook`: bitwise the single-process ops' results.

Math. The single-process op ranks rows by the fp32 selection score and breaks ties by index:

    l2:  score_j = ||e_j||^2 - 2 x.e_j        dist_j = fp32(max(score_j + ||x||^2, 0))       (||x||^2 in fp64)
    ip:  score_j = -x.e_j                      dist_j = score_j

and returns the k smallest in the total order (score, index). Every score depends only on its own query
and row (one fixed fp32 chain over d; the packed row's position in the table does not matter), so the k best
of the whole table are the k best of the union of every shard's k best. Each rank runs the native search on
its rows, the lists ``(dist, global index)`` are all-gathered ([P, N, k]: O(k) per query per rank, never
O(V)) and merged:

- dist is a non-decreasing function of score, so a strictly smaller dist means a strictly smaller score. A
  query whose candidates from *different* ranks never share a dist (within its k best) is merged by a stable
  sort on dist that keeps each rank's own order (its list is already in (score, index) order): exact.
- Otherwise (an l2 tie in dist across ranks: duplicate rows in two shards, or two scores that round to the
  same distance because ||x||^2 is large), the owners recompute the exact fp32 scores of their candidates for
  those queries only, and the candidates are merged by (score, global index). The exact score of row j is
  fp32(||e_j||^2 + a_j) with a_j the fp32 chain of x . (-2 e_j): the native "ip" search of x against the rows
  2 e_j (packed as -2 e_j, exactly the l2 panels; its ip bias is 0) returns a_j bit for bit, and ||e_j||^2 is
  the l2 codebook's own packed bias.

So distances, indices, tie-breaking (lowest global index) and the gradient are bitwise the single-process
op's on the whole table, for any sharding. With ``check_finite`` the queries are checked first, on every
rank, against the whole table's max row norm (the single-process overflow rule), then the shards search
without re-checking, so every rank raises the same error.

Layouts (``queries=``): ``"replicated"`` (default): every rank of the codebook's group passes the same
queries and gets the whole result (Megatron-style tensor parallelism; with data parallelism on top, each
data-parallel replica has its own vocabulary group: `spae_fast.distributed.vocab_parallel_groups`).
``"sharded"``: each rank passes its own queries (any count, also 0); they are all-gathered inside the group
(O(N D) bytes), searched as above, and each rank gets its own rows back - data and vocabulary parallel over
the same ranks.
"""

from __future__ import annotations

import torch

from .. import _native, _validate
from ..codebook import Codebook
from ..ops import nearest as _single_nearest
from ..ops import topk as _single_topk
from ..ops.backends import resolve_backend
from . import comm
from .sharded_codebook import ShardedCodebook

QUERY_LAYOUTS = ("replicated", "sharded")
_MAX_NORM_PRODUCT = 1.0e37  # csrc kMaxNormProduct: |x| * max|e| * 2 must stay below it
_RESCORE_BLOCK = 64  # ambiguous queries rescored per block: the block's candidate rows stay few


def check_queries(flat: torch.Tensor, codebook: ShardedCodebook, stage: str = "search") -> None:
    """The single-process kernel's query checks with the whole table's max row norm: NaN / Inf, and
    |x| * max|e| * 2 > 1e37 (same exceptions and first rows as `spae_fast.nearest`)."""
    if not flat.numel():
        return
    non_finite = ~torch.isfinite(flat).all(-1)
    norm = (flat.double() ** 2).sum(-1).sqrt()
    bad = non_finite | (norm * codebook.max_norm * 2.0 > _MAX_NORM_PRODUCT)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        code = _native._NON_FINITE_QUERY if bool(non_finite[row]) else _native._OVERFLOW
        _native.raise_for_status(code, row, stage=stage)


def _local_search(flat, codebook: ShardedCodebook, k: int, backend: str, prefilter: str):
    """This shard's k best (k clipped to its rows, padded with dist +inf / index -1): dist [N, k] fp32, local
    index [N, k] int64."""
    k_local = min(k, codebook.shard_rows)
    if k == 1:
        d, i = _single_nearest(flat, codebook.local, check_finite=False, backend=backend, prefilter=prefilter)
        d, i = d[:, None], i[:, None]
    else:
        d, i = _single_topk(flat, codebook.local, k_local, check_finite=False, backend=backend)
    if k_local < k:
        pad = k - k_local
        d = torch.cat([d, d.new_full((d.shape[0], pad), float("inf"))], 1)
        i = torch.cat([i, i.new_full((i.shape[0], pad), -1)], 1)
    return d, i


def _packed_bias(codebook: ShardedCodebook, backend: str) -> torch.Tensor:
    """||e_j||^2 of the shard's rows as the single-process search adds it: fp32 of the fp64 sum."""
    local = codebook.local
    if backend == "cpu" and local.cpu_bias is not None:
        return local.cpu_bias[: codebook.shard_rows]
    weight = local.weight.double()
    return (weight * weight).sum(-1).float()  # spae_fast._ref._prepare's bias (backends torch / GPU)


def _exact_scores(x, local_index, codebook: ShardedCodebook, backend: str) -> torch.Tensor:
    """Selection scores [A, k] fp32 of this rank's candidates ``local_index`` [A, k] (-1: none -> +inf) for the
    queries x [A, D]: bitwise the single-process search's scores (see the module docstring)."""
    scores = torch.full(local_index.shape, float("inf"), dtype=torch.float32, device=x.device)
    valid = local_index >= 0
    if not bool(valid.any()):
        return scores
    rows, inverse = torch.unique(local_index[valid], return_inverse=True)  # [M], [nnz]
    table = codebook.local.weight[rows].float()
    scale = 2.0 if codebook.metric == "l2" else 1.0  # ip: score = -x.e; l2: panels -2e (exact scaling)
    ip_book = Codebook(table * scale, "ip", copy=False)
    d, i = _single_topk(x, ip_book, rows.numel(), check_finite=False, backend=backend)  # every row, [A, M]
    dots = torch.empty_like(d).scatter_(1, i, d)  # [A, M]: fp32 chain of x . (-scale e)
    if codebook.metric == "l2":
        dots = _packed_bias(codebook, backend)[rows][None, :] + dots  # one fp32 add, as the micro-kernel
    query_of = valid.nonzero()[:, 0]
    scores[valid] = dots[query_of, inverse]
    return scores


def _merge(flat, codebook: ShardedCodebook, dist_local, index_local, k: int, backend: str):
    """All-gathers every rank's k best and merges them into the global k best (module docstring)."""
    group, world = codebook.group, codebook.world_size
    index_global = torch.where(index_local >= 0, index_local + codebook.start, index_local)
    cand_dist = torch.cat(comm.all_gather(dist_local, group), 1)  # [N, P k], rank-major slots
    cand_index = torch.cat(comm.all_gather(index_global, group), 1)
    if world == 1:
        return dist_local, index_global
    order = torch.sort(cand_dist, dim=1, stable=True).indices  # ties keep slot order: each rank's own order
    sorted_dist = cand_dist.gather(1, order)
    rank_of = order // k
    kth = sorted_dist[:, k - 1 : k]
    cross_tie = (
        (sorted_dist[:, 1:] == sorted_dist[:, :-1])
        & (rank_of[:, 1:] != rank_of[:, :-1])
        & (sorted_dist[:, 1:] <= kth)
        & torch.isfinite(sorted_dist[:, 1:])
    )
    ambiguous = cross_tie.any(1).nonzero()[:, 0]  # the same on every rank (computed from gathered data)
    best = order[:, :k]
    if ambiguous.numel():
        for first in range(0, ambiguous.numel(), _RESCORE_BLOCK):
            rows = ambiguous[first : first + _RESCORE_BLOCK]
            if codebook.metric == "ip":  # dist is the score itself
                scores = cand_dist[rows]
            else:
                mine = _exact_scores(flat[rows], index_local[rows], codebook, backend)
                scores = torch.cat(comm.all_gather(mine, group), 1)  # [A, P k], rank-major like the slots
            by_index = torch.sort(cand_index[rows], dim=1, stable=True).indices
            by_score = torch.sort(scores.gather(1, by_index), dim=1, stable=True).indices
            best[rows] = by_index.gather(1, by_score)[:, :k]
    return cand_dist.gather(1, best), cand_index.gather(1, best)


def search(
    flat: torch.Tensor,
    codebook: ShardedCodebook,
    k: int,
    *,
    check_finite: bool = True,
    backend: str = "auto",
    prefilter: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replicated queries ``flat [N, D]`` -> global (dist [N, k] fp32, index [N, k] int64); no autograd."""
    backend = resolve_backend(backend, flat.device)
    if check_finite:
        check_queries(flat, codebook)
    dist_local, index_local = _local_search(flat, codebook, k, backend, prefilter)
    return _merge(flat, codebook, dist_local, index_local, k, backend)


class _DistributedSearch(torch.autograd.Function):
    """dist and index of the search; d dist / dx through the chosen rows (looked up from their owners in the
    forward when x needs a gradient), with the single-process op's formula."""

    @staticmethod
    def forward(ctx, x, codebook, k, check_finite, backend, prefilter, layout):
        flat = x.detach()
        if layout == "sharded":
            flat, sizes = comm.gather_rows(flat, codebook.group)
            mine = slice(sum(sizes[: codebook.rank]), sum(sizes[: codebook.rank + 1]))
        dist_k, index_k = search(flat, codebook, k, check_finite=check_finite, backend=backend, prefilter=prefilter)
        chosen = comm.lookup_rows(codebook, index_k) if comm.any_rank(ctx.needs_input_grad[0], codebook) else None
        if layout == "sharded":
            dist_k, index_k = dist_k[mine], index_k[mine]
            chosen = chosen[mine] if chosen is not None else None
        ctx.mark_non_differentiable(index_k)
        ctx.metric = codebook.metric
        ctx.save_for_backward(x, chosen if chosen is not None else x.new_empty(0))
        return dist_k, index_k

    @staticmethod
    def backward(ctx, grad_dist, grad_index):
        from ..ops.nearest import _distance_grad  # the single-process op's backward formula

        x, chosen = ctx.saved_tensors
        return (_distance_grad(x, chosen, grad_dist, ctx.metric),) + (None,) * 6


def check_collective(codebook, queries, l2_for: str | None = None) -> None:
    """What every collective op checks first: `codebook` a ShardedCodebook (an l2 one when `l2_for`, the op's
    name, is given) and `queries` a known layout."""
    if not isinstance(codebook, ShardedCodebook):
        raise TypeError(f"codebook must be a spae_fast.distributed.ShardedCodebook, got {type(codebook).__name__}")
    if l2_for is not None and codebook.metric != "l2":
        raise ValueError(f"{l2_for} needs an l2 ShardedCodebook, got metric={codebook.metric!r}")
    if queries not in QUERY_LAYOUTS:
        raise ValueError(f"queries must be one of {QUERY_LAYOUTS}, got {queries!r}")


def _prepare(x, codebook, queries, check_finite):
    check_collective(codebook, queries)
    _validate.flag(check_finite, "check_finite")
    return _validate.queries(x, codebook.dim, codebook.device)


def topk(
    x: torch.Tensor,
    codebook: ShardedCodebook,
    k: int,
    *,
    queries: str = "replicated",
    check_finite: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`spae_fast.topk` on a `ShardedCodebook`: ``(dist [..., k] fp32, index [..., k] int64)``, global
    indices sorted by (distance, index), bitwise the single-process op on the whole table. A collective over
    the codebook's group. ``queries``: ``"replicated"`` or ``"sharded"`` (module docstring). Gradients flow
    to ``x`` through the distances."""
    x = _prepare(x, codebook, queries, check_finite)
    k = _validate.k_value(k, codebook.num_rows)
    flat = x.reshape(-1, codebook.dim)
    dist_k, index_k = _DistributedSearch.apply(flat, codebook, k, check_finite, backend, "auto", queries)
    return dist_k.reshape(*x.shape[:-1], k), index_k.reshape(*x.shape[:-1], k)


def nearest(
    x: torch.Tensor,
    codebook: ShardedCodebook,
    *,
    queries: str = "replicated",
    check_finite: bool = True,
    backend: str = "auto",
    prefilter: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`spae_fast.nearest` on a `ShardedCodebook`: ``(dist [...] fp32, index [...] int64)``, the global nearest
    row, ties to the lowest global index, bitwise the single-process op on the whole table (each shard may use
    the certified int8 pre-filter, which is bitwise the fp32 search). A collective over the codebook's group."""
    x = _prepare(x, codebook, queries, check_finite)
    flat = x.reshape(-1, codebook.dim)
    dist_1, index_1 = _DistributedSearch.apply(flat, codebook, 1, check_finite, backend, prefilter, queries)
    return dist_1.reshape(x.shape[:-1]), index_1.reshape(x.shape[:-1])


def lookup(codebook: ShardedCodebook, index: torch.Tensor) -> torch.Tensor:
    """The fp32 rows ``[*index.shape, D]`` of global ``index`` (the same on every rank of the group), each
    sent by its owner: the distributed ``table[index]`` (exact values)."""
    if not isinstance(index, torch.Tensor) or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor, got {getattr(index, 'dtype', type(index).__name__)}")
    return comm.lookup_rows(codebook, index.to(device=codebook.device, dtype=torch.int64))


__all__ = ["QUERY_LAYOUTS", "check_queries", "lookup", "nearest", "search", "topk"]
