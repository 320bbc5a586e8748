"""Vocabulary-parallel semantic-guidance loss on a `ShardedCodebook` (SPAE-METHOD.md §4), forward and
gradient, as Megatron-LM's vocab-parallel cross-entropy combines its shards: max, then sum.

Per position p with candidate set C(p) and logits s_k(p) = (2 z_p . e_k - ||e_k||^2) / tau over the whole
table (the single-process op's, `spae_fast.semantic_loss`):

    loss(p) = lse(p) - (2 z_p . mean_{c in C(p)} e_c - mean_{c in C(p)} ||e_c||^2) / tau
    grad(p) = d loss(p) / d z_p = (2 / tau) (sum_k softmax_k(s(p)) e_k - mean_{c in C(p)} e_c)

Rank r streams its rows in tiles (no positions x vocabulary logits): an online logsumexp gives its max m_r(p)
and sum l_r(p) = sum_{k in r} exp(s_k - m_r) (fp64), and with the gradient its weighted row sum
a_r(p) = sum_{k in r} exp(s_k - m_r) e_k (fp64). Then

    M(p) = max_r m_r(p)                                                (all-reduce MAX, [N] fp32)
    L(p) = sum_r l_r(p) exp(m_r - M),   A(p) = sum_r a_r(p) exp(m_r - M) (all-reduce SUM, [N] and [N, D] fp64)
    lse(p) = M + log L,                 sum_k softmax_k e_k = A / L

and the candidate sums sum_{c in C} e_c, sum_{c in C} ||e_c||^2 are the all-reduced sums of each rank's own
candidates ([S, D + 1] fp64). Communication per position: O(1) for the loss, D fp64 for its gradient (the
gradient needs the softmax-weighted embedding sum of every shard; Megatron-LM's input gradient is an
all-reduce of the same size); never O(V).

Guarantee (docs/DECISIONS.md, "Vocabulary-parallel semantic loss"): the result is deterministic for a given
input, sharding and thread count, and within a few fp32 ulps of the single-process op; it is not bitwise
equal to it. The single-process kernel's fp32 softmax weights and accumulator are rescaled by a running max
that is carried from one 64-row vocabulary group to the next, so each of its values depends on every
earlier group of the table; a shard cannot reproduce that chain without the groups before it (nor through
the native entry point, which exposes no running state). Here logits come from fp32 GEMM tiles and every
sum across tiles and ranks is fp64.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _native, _validate
from ..ops.backends import resolve_backend
from ..ops.common import raise_semantic_status
from ..ops.semantic_loss import _check_options, _reduce, _semantic_candidates
from . import comm
from .search import _MAX_NORM_PRODUCT, _packed_bias, check_collective
from .sharded_codebook import ShardedCodebook

_TILE_ELEMENTS = 1 << 21  # logits per tile: [positions, tile rows] fp32 (8 MiB)


def _shard_rows(codebook: ShardedCodebook, precision: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [V_r, D] fp32, ||e||^2 [V_r] fp32) of this rank, as the single-process op uses them."""
    if precision == "bf16":  # the loss of bf16(z) against bf16(E)
        rows = codebook.local.weight.bfloat16().float()
        return rows, (rows.double() ** 2).sum(-1).float()
    return codebook.local.weight.float(), _packed_bias(codebook, backend)


def _check_rows(q: torch.Tensor, active: torch.Tensor, codebook: ShardedCodebook, tau: float) -> None:
    """The native kernel's checks of the positions that take part, with the whole table's max row norm."""
    if not q.numel():
        return
    non_finite = ~torch.isfinite(q).all(-1)
    norm = (q.double() ** 2).sum(-1).sqrt()
    big = codebook.max_norm
    overflow = (norm * big * 2.0 > _MAX_NORM_PRODUCT) | ((big * big + 2.0 * norm * big) / tau > _MAX_NORM_PRODUCT)
    bad = non_finite | overflow
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        code = _native._NON_FINITE_QUERY if bool(non_finite[first]) else _native._OVERFLOW
        raise_semantic_status(code, int(active[first]))


def semantic_parts(z, codebook, index, offsets, sets, tau, compute_grad, precision="default", backend="auto",
                   check_finite=True):  # fmt: skip
    """Replicated positions z [N, D] -> (loss [N] fp32, grad [N, D] fp32 or [0, D]); both 0 at positions
    without a non-empty set. A collective over the codebook's group (module docstring)."""
    backend = resolve_backend(backend, z.device)
    num, dim = z.shape
    sizes = offsets[1:] - offsets[:-1]  # [S]
    if sizes.numel():
        active = ((sets >= 0) & (sizes[sets.clamp_min(0)] > 0)).nonzero()[:, 0]
    else:
        active = sets.new_zeros(0)
    q = z[active].float()
    if check_finite:
        _check_rows(q, active, codebook, tau)
    if precision == "bf16":
        q = q.bfloat16().float()
    rows, bias = _shard_rows(codebook, precision, backend)

    # This shard's online logsumexp and softmax-weighted row sum, tile by tile.
    count = q.shape[0]
    run_max = torch.full((count,), float("-inf"), dtype=torch.float32, device=z.device)
    run_sum = torch.zeros(count, dtype=torch.float64, device=z.device)
    run_acc = torch.zeros(count if compute_grad else 0, dim, dtype=torch.float64, device=z.device)
    tile = max(64, _TILE_ELEMENTS // max(count, 1))
    for first in range(0, rows.shape[0] if count else 0, tile):
        e = rows[first : first + tile]  # [T, D]
        logits = torch.addmm(bias[first : first + tile], q, e.T, beta=-1.0, alpha=2.0) / tau  # [A, T]
        new_max = torch.maximum(run_max, logits.max(1).values)
        scale = torch.exp((run_max - new_max).double())  # 0 on the first tile (exp(-inf))
        weights = torch.exp(logits - new_max[:, None])  # fp32
        run_sum = run_sum * scale + weights.double().sum(1)
        if compute_grad:
            run_acc = run_acc * scale[:, None] + (weights @ e).double()
        run_max = new_max

    # Combine the shards: max, then the rescaled sums.
    group = codebook.group
    global_max = run_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    factor = torch.exp((run_max - global_max).double())
    run_sum = run_sum * factor
    dist.all_reduce(run_sum, op=dist.ReduceOp.SUM, group=group)
    lse = global_max.double() + torch.log(run_sum)
    if compute_grad:
        run_acc = run_acc * factor[:, None]
        dist.all_reduce(run_acc, op=dist.ReduceOp.SUM, group=group)

    # Candidate sums of the sets in use: each rank adds its own rows.
    num_sets = sizes.numel()
    set_sum = torch.zeros(num_sets, dim + 1, dtype=torch.float64, device=z.device)  # [sum e, sum ||e||^2]
    set_of_entry = torch.repeat_interleave(torch.arange(num_sets, device=z.device), sizes)  # [M]
    own = (index >= codebook.start) & (index < codebook.stop)
    local = index[own] - codebook.start
    entries = torch.cat([rows[local].double(), bias[local].double()[:, None]], 1)
    set_sum.index_add_(0, set_of_entry[own], entries)
    if num_sets:
        dist.all_reduce(set_sum, op=dist.ReduceOp.SUM, group=group)
    set_mean = set_sum / sizes.clamp_min(1).double()[:, None]

    loss = torch.zeros(num, dtype=torch.float32, device=z.device)
    grad = torch.zeros(num if compute_grad else 0, dim, dtype=torch.float32, device=z.device)
    if count:
        mean = set_mean[sets[active]]  # [A, D + 1]
        target = (2.0 * (q.double() * mean[:, :dim]).sum(1) - mean[:, dim]) / tau
        loss[active] = (lse - target).float()
        if compute_grad:
            grad[active] = ((2.0 / tau) * (run_acc / run_sum[:, None] - mean[:, :dim])).float()
    return loss, grad


class _SemanticLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, codebook, index, offsets, sets, tau, precision, backend, check_finite, layout):
        compute_grad = comm.any_rank(ctx.needs_input_grad[0], codebook)
        flat = z.detach()
        mine = None
        if layout == "sharded":
            flat, index, offsets, sets, mine = _gather_problem(flat, index, offsets, sets, codebook.group)
        loss, grad = semantic_parts(flat, codebook, index, offsets, sets, tau, compute_grad, precision, backend,
                                    check_finite)  # fmt: skip
        if mine is not None:
            loss, grad = loss[mine], (grad[mine] if compute_grad else grad)
        ctx.z_dtype = z.dtype
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (direction,) = ctx.saved_tensors  # [N, D] fp32: d loss(p) / d z_p
        return ((grad_loss[:, None] * direction).to(ctx.z_dtype),) + (None,) * 9


def _gather_problem(z, index, offsets, sets, group):
    """Every rank's positions and candidate sets as one problem (set ids and offsets shifted), and the slice of
    this rank's positions."""
    rank = dist.get_rank(group)
    z_all, sizes = comm.gather_rows(z, group)
    sets_all, _ = comm.gather_rows(sets, group, sizes)
    set_counts = comm.gather_sizes(offsets.numel() - 1, group, z.device)
    index_all, entry_counts = comm.gather_rows(index, group)
    ends, _ = comm.gather_rows(offsets[1:], group, set_counts)
    set_base = torch.repeat_interleave(
        torch.tensor([sum(set_counts[:r]) for r in range(len(sizes))], device=z.device), torch.tensor(sizes, device=z.device)
    )
    sets_all = torch.where(sets_all >= 0, sets_all + set_base, sets_all)
    entry_base = torch.repeat_interleave(
        torch.tensor([sum(entry_counts[:r]) for r in range(len(sizes))], device=z.device),
        torch.tensor(set_counts, device=z.device),
    )
    offsets_all = torch.cat([offsets.new_zeros(1), ends + entry_base])
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    return z_all, index_all, offsets_all, sets_all, mine


def semantic_loss(
    z: torch.Tensor,
    codebook: ShardedCodebook,
    candidate_index: torch.Tensor,
    candidate_offsets: torch.Tensor,
    set_of_position: torch.Tensor | None = None,
    *,
    tau: float = 1.0,
    reduction: str = "mean",
    queries: str = "replicated",
    backend: str = "auto",
    check_finite: bool = True,
    precision: str = "default",
) -> torch.Tensor:
    """`spae_fast.semantic_loss` on a `ShardedCodebook` (same arguments; candidate rows are global indices).
    A collective over the codebook's group; gradients flow to ``z``.

    ``queries="replicated"``: every rank passes the same positions and sets and gets the same loss.
    ``"sharded"``: each rank passes its own positions with its own candidate sets (CSR, ``set_of_position``
    into its own sets); they are gathered inside the group, and each rank gets the loss of its own positions
    (``reduction`` over its own positions, as the single-process op on its inputs). ``precision="bf16"``: the
    loss of bf16(z) against bf16(E) in fp32 arithmetic, the gradient straight-through (as the single-process
    option; no speed-up here). Values: module docstring (deterministic; a few fp32 ulps from the
    single-process op, not bitwise).
    """
    check_collective(codebook, queries, "semantic_loss")
    z = _validate.queries(z, codebook.dim, codebook.device, "z")
    _validate.flag(check_finite, "check_finite")
    _check_options(tau, reduction, precision)
    positions_shape = tuple(z.shape[:-1])
    index, offsets, sets = _semantic_candidates(
        candidate_index, candidate_offsets, set_of_position, positions_shape, codebook.num_rows, z.device
    )
    flat = z.reshape(-1, codebook.dim)
    loss = _SemanticLoss.apply(flat, codebook, index, offsets, sets, float(tau), precision, backend, check_finite,
                               queries)  # fmt: skip
    return _reduce(loss, positions_shape, reduction, offsets, sets)
