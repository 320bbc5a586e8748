"""Plain-PyTorch reference of every op: the executable spec that every backend is tested against, and the
kernel of backend "torch". Each function names the op it specifies:

    topk_reference                 op spae_fast::topk           (spae_fast/ops/nearest.py: `topk`)
    nearest_reference              op spae_fast::nearest        (spae_fast/ops/nearest.py: `nearest`)
    saq_reference                  op spae_fast::saq            (spae_fast/ops/saq.py: `saq`)
    semantic_loss_reference        `semantic_loss`, as the method states it (spae_fast/ops/semantic_loss.py)
    semantic_loss_parts_reference  op spae_fast::semantic_loss  (what the op returns: losses and gradients)

The references stay together in this one module, apart from the op modules that register them, so that the
spec reads in one place; `distances_fp64` and `candidates_from_mask` are helpers of the tests.
Written for clarity, chunked over the codebook only so that it runs at test and benchmark sizes.

Nearest / top-k (SPAE-METHOD.md §1, §3; the argmin inside every SAQ layer). With x the query, e_j the
codebook rows, all computed in fp32 after an exact upcast of bf16 / fp16 inputs:

    metric "l2":      score_j = ||e_j||^2 - 2 x.e_j          dist = max(score + ||x||^2, 0) = ||x - e_j||^2
    metric "ip":      score_j = -x.e_j                        dist = score
    metric "cosine":  score_j = -x^.e^_j  (v^ = v / max(||v||, 1e-12))   dist = max(1 + score, 0) = 1 - cos

The result is the k smallest scores in the total order (score, index): ascending, ties to the lowest
index, NaN after every number.
"""

from __future__ import annotations

import torch

COSINE_EPS = 1e-12


def _prepare(x: torch.Tensor, weight: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (queries [N, D] fp32, rows [V, D] fp32 scaled so score = bias + q . rows^T, bias [V] fp32)."""
    q = x.float()
    e = weight.to(device=x.device, dtype=torch.float32)
    if metric == "l2":
        bias = (e.double() * e.double()).sum(-1).float()
        return q, -2.0 * e, bias
    bias = torch.zeros(e.shape[0], device=e.device, dtype=torch.float32)
    if metric == "ip":
        return q, -e, bias
    if metric == "cosine":
        q_norm = torch.linalg.vector_norm(q.double(), dim=-1, keepdim=True).clamp_min(COSINE_EPS)
        e_norm = torch.linalg.vector_norm(e.double(), dim=-1, keepdim=True).clamp_min(COSINE_EPS)
        return q * (1.0 / q_norm).float(), -(e.double() / e_norm).float(), bias
    raise ValueError(f"metric must be 'l2', 'ip' or 'cosine', got {metric!r}")


def finish_distance(score: torch.Tensor, x: torch.Tensor, metric: str) -> torch.Tensor:
    """Turns selection scores [N, k] into the reported fp32 distances."""
    if metric == "l2":
        norm_sq = (x.double() * x.double()).sum(-1, keepdim=True)
        return (score.double() + norm_sq).clamp_min(0.0).float()
    if metric == "cosine":
        return (1.0 + score).clamp_min(0.0)
    return score


def _dot_products(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """q [N, D] . rows [V, D]^T in fp32, each summed over d in ascending order with one rounding per multiply
    and per add. Unlike a GEMM (whose blocking depends on N, V and a column's position), every value depends
    only on its own query and row: equal rows give bitwise equal scores (ties go to the lowest index), for any
    batch size or chunk. This is the portable native micro-kernel's arithmetic."""
    out = torch.empty(q.shape[0], rows.shape[0], device=q.device, dtype=torch.float32)
    block = max(16, (1 << 19) // max(q.shape[0], 1))  # keep the [N, block] accumulator cache-resident
    for start in range(0, rows.shape[0], block):
        rows_t = rows[start : start + block].T.contiguous()  # [D, block]
        acc = torch.zeros(q.shape[0], rows_t.shape[1], device=q.device, dtype=torch.float32)
        for d in range(q.shape[1]):
            acc += q[:, d : d + 1] * rows_t[d]  # two kernels: never contracted into an FMA
        out[:, start : start + block] = acc
    return out


def topk_reference(
    x: torch.Tensor, weight: torch.Tensor, k: int, metric: str = "l2", chunk_rows: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Specifies ``spae_fast::topk``: the k nearest codebook rows of every query. x [N, D], weight [V, D] ->
    (dist [N, k] fp32, index [N, k] int64)."""
    q, rows, bias = _prepare(x, weight, metric)
    num_queries, num_rows = q.shape[0], rows.shape[0]
    best_scores = torch.empty(num_queries, 0, device=q.device, dtype=torch.float32)
    best_index = torch.empty(num_queries, 0, device=q.device, dtype=torch.int64)
    for start in range(0, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        scores = bias[start:stop] + _dot_products(q, rows[start:stop])  # [N, chunk]
        index = torch.arange(start, stop, device=q.device).expand(num_queries, -1)
        # Earlier chunks hold lower indices, so a stable sort of [best so far, chunk] realises the total order.
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_index = torch.cat([best_index, index], dim=1)
        order = torch.sort(merged_scores, dim=1, stable=True).indices[:, :k]
        best_scores = merged_scores.gather(1, order)
        best_index = merged_index.gather(1, order)
    return finish_distance(best_scores, x, metric), best_index


def nearest_reference(
    x: torch.Tensor, weight: torch.Tensor, metric: str = "l2", chunk_rows: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Specifies ``spae_fast::nearest``: the nearest codebook row of every query. x [N, D], weight [V, D] ->
    (dist [N] fp32, index [N] int64)."""
    dist, index = topk_reference(x, weight, 1, metric, chunk_rows)
    return dist[:, 0], index[:, 0]


def distances_fp64(x: torch.Tensor, weight: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """All N x V distances in fp64 from the rounded inputs: the ground truth for tests (small sizes only)."""
    q, e = x.double(), weight.to(x.device).double()
    if metric == "l2":
        return ((q[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    if metric == "ip":
        return -(q @ e.T)
    q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    e = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    return 1.0 - q @ e.T


def saq_reference(z: torch.Tensor, weight: torch.Tensor, sides: list[int], mode: str = "saq") -> torch.Tensor:
    """Specifies ``spae_fast::saq``: streaming average (or residual) quantization over a token pyramid
    (SPAE-METHOD.md §2-3), layer by layer.

    z ``[B, D, g, g]``, weight ``[V, D]``, sides ``[s_1 .. s_L]`` (each divides g) -> ids ``[B, sum_l s_l^2]``
    int64, layer after layer, raster order within a layer. Layer l (1-based) samples rows / cols
    ``t * i + t - ceil(t / 2)`` (t = g / s_l); at a sampled position p

        target  z_l(p) = c_l * z(p) - sum_{m<l} e(k_m(Up_m(p)))     c_l = l ("saq") or 1 ("rq")
        token   k_l(p) = argmin_k || z_l(p) - e(k) ||^2                (exact l2 nearest, ties to the lowest row)

    where Up_m(p) is the layer-m token covering p (nearest upsampling of layer m's ids). The sum is accumulated
    in fp64 in ascending m, combined with c_l * z(p) in fp64 and rounded once to fp32: the native kernel forms
    bitwise the same targets.
    """
    if mode not in ("saq", "rq"):
        raise ValueError(f"mode must be 'saq' or 'rq', got {mode!r}")
    batch, dim, grid = z.shape[0], z.shape[1], z.shape[-1]
    z64 = z.double()
    e64 = weight.to(z.device).double()
    covering_sum = torch.zeros(batch, dim, grid, grid, dtype=torch.float64, device=z.device)  # sum_m e(k_m(Up_m))
    ids = []
    for layer, side in enumerate(sides, 1):
        stride = grid // side
        pos = torch.arange(side, device=z.device) * stride + (stride - (stride + 1) // 2)
        z_sampled = z64[:, :, pos][:, :, :, pos]  # [B, D, s, s]
        sum_sampled = covering_sum[:, :, pos][:, :, :, pos]
        coefficient = float(layer) if mode == "saq" else 1.0
        target = (coefficient * z_sampled - sum_sampled).float()  # one rounding, as the kernel
        queries = target.permute(0, 2, 3, 1).reshape(-1, dim)  # [B * s * s, D] raster order
        _, index = nearest_reference(queries, weight, "l2")
        index = index.reshape(batch, side, side)
        chosen = e64[index].permute(0, 3, 1, 2)  # [B, D, s, s]
        covering_sum = covering_sum + chosen.repeat_interleave(stride, 2).repeat_interleave(stride, 3)
        ids.append(index.reshape(batch, side * side))
    return torch.cat(ids, dim=1)


# ----------------------------------------------------------------------------------------------------------
# Semantic loss (SPAE-METHOD.md §4, semantic guidance)
# ----------------------------------------------------------------------------------------------------------


def candidates_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense bool mask ``[N, V]`` (row p marks the candidate set of position p) -> the CSR form of the op:
    ``(candidate_index [M] int64, candidate_offsets [N + 1] int64)``, rows ascending within a set."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a 2-D bool tensor [N, V], got {mask.dtype} of shape {tuple(mask.shape)}")
    index = mask.nonzero()[:, 1].contiguous()  # row-major: position by position, columns ascending
    offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
    offsets[1:] = mask.sum(1).cumsum(0)
    return index, offsets


def _semantic_sets(candidate_offsets: torch.Tensor, set_of_position: torch.Tensor | None, num: int):
    """(set of every position [N] int64 with -1 for none, active [N] bool: the position has a non-empty set)."""
    sizes = candidate_offsets[1:] - candidate_offsets[:-1]  # [S]
    if set_of_position is None:
        set_of_position = torch.arange(num, device=candidate_offsets.device)
    set_of_position = set_of_position.reshape(-1).long()
    if sizes.numel() == 0:
        return set_of_position, torch.zeros(num, dtype=torch.bool, device=candidate_offsets.device)
    active = (set_of_position >= 0) & (sizes[set_of_position.clamp_min(0)] > 0)
    return set_of_position, active


def semantic_loss_reference(
    z: torch.Tensor,
    weight: torch.Tensor,
    candidate_index: torch.Tensor | None = None,
    candidate_offsets: torch.Tensor | None = None,
    set_of_position: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    tau: float = 1.0,
    reduction: str = "mean",
    chunk_rows: int = 8192,
) -> torch.Tensor:
    """Specifies `spae_fast.semantic_loss`: the semantic loss, written as the method states it (differentiable
    in ``z`` by autograd).

    For position p (a row of z ``[N, D]``) with candidate set C(p) (codebook rows; a list, so duplicates count
    as often as they appear) and the logits

        s_k(p) = -||z_p - e_k||^2 / tau  (+ ||z_p||^2 / tau, which cancels in the softmax and in the loss)
               = (2 z_p . e_k - ||e_k||^2) / tau

    the loss of p is  mean_{c in C(p)} -log softmax_k(s(p))[c] = logsumexp_k s_k(p) - mean_{c in C(p)} s_c(p).
    Positions without a set (``set_of_position`` -1) or with an empty set are excluded: loss 0, and not
    counted by the mean. ``reduction``: "mean" (over the included positions; 0 when there are none), "sum"
    or "none" (``[N]``).

    Candidates: CSR ``candidate_index [M]`` / ``candidate_offsets [S + 1]`` (set s = index[offsets[s] :
    offsets[s+1]]) with ``set_of_position [N]`` (default: position p uses set p), or a dense bool ``mask``
    ``[N, V]`` instead. Computed in fp32 (fp64 when z is fp64); the logits are materialised chunk by chunk
    over the vocabulary: clear, not fast.
    """
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    q = z.to(dtype)
    e = weight.to(device=z.device, dtype=dtype)
    num, num_rows = q.shape[0], e.shape[0]
    if mask is not None:
        candidate_index, candidate_offsets = candidates_from_mask(mask)
        set_of_position = None
    set_of_position, active = _semantic_sets(candidate_offsets, set_of_position, num)
    e_norm = (e * e).sum(-1)  # [V]

    lse_chunks = []
    for start in range(0, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        logits = (2.0 * q @ e[start:stop].T - e_norm[start:stop]) / tau  # [N, chunk]
        lse_chunks.append(torch.logsumexp(logits, dim=1))
    lse = torch.logsumexp(torch.stack(lse_chunks, dim=1), dim=1)  # [N]

    loss = torch.zeros(num, dtype=dtype, device=z.device)
    for s in torch.unique(set_of_position[active]).tolist():
        rows = (set_of_position == s).nonzero()[:, 0]
        columns = candidate_index[candidate_offsets[s] : candidate_offsets[s + 1]].to(z.device)
        candidate_logits = (2.0 * q[rows] @ e[columns].T - e_norm[columns]) / tau  # [n_s, |C_s|]
        loss = loss.index_put((rows,), lse[rows] - candidate_logits.mean(dim=1))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / active.sum().clamp_min(1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def semantic_loss_parts_reference(
    z: torch.Tensor,
    weight: torch.Tensor,
    candidate_index: torch.Tensor,
    candidate_offsets: torch.Tensor,
    set_of_position: torch.Tensor | None,
    tau: float,
    compute_grad: bool,
    chunk_rows: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Specifies the op ``spae_fast::semantic_loss``: what it returns, with the formulas every kernel uses:
    ``(loss [N] fp32, grad [N, D] fp32)`` where ``grad[p] = d loss(p) / d z_p`` (``[0, D]`` without
    compute_grad); both 0 at excluded positions.

        lse(p)   = logsumexp_k s_k(p)                     s_k(p) = (2 z_p . e_k - ||e_k||^2) / tau
        loss(p)  = lse(p) - (2 z_p . mean_C(e) - mean_C(||e||^2)) / tau
        grad(p)  = (2 / tau) (sum_k softmax_k(s(p)) e_k - mean_C(e))

    In fp32 over vocabulary chunks (pass 1: logsumexp; pass 2: softmax-weighted rows), set means in fp64.
    """
    q = z.float()
    e = weight.to(device=z.device, dtype=torch.float32)
    num, dim = q.shape
    num_rows = e.shape[0]
    set_of_position, active = _semantic_sets(candidate_offsets, set_of_position, num)
    e_norm = (e.double() * e.double()).sum(-1).float()  # [V] ||e||^2, rounded once (the packed bias)

    lse = torch.full((num,), float("-inf"), dtype=torch.float32, device=z.device)
    for start in range(0, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        logits = (2.0 * q @ e[start:stop].T - e_norm[start:stop]) / tau
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
    softmax_mean = torch.zeros(num, dim, dtype=torch.float32, device=z.device)  # sum_k softmax_k e_k
    if compute_grad:
        for start in range(0, num_rows, chunk_rows):
            stop = min(start + chunk_rows, num_rows)
            logits = (2.0 * q @ e[start:stop].T - e_norm[start:stop]) / tau
            softmax_mean += torch.exp(logits - lse[:, None]) @ e[start:stop]

    num_sets = candidate_offsets.numel() - 1
    set_mean = torch.zeros(max(num_sets, 1), dim, dtype=torch.float64, device=z.device)  # mean_C(e)
    set_norm = torch.zeros(max(num_sets, 1), dtype=torch.float64, device=z.device)  # mean_C(||e||^2)
    for s in range(num_sets):
        columns = candidate_index[candidate_offsets[s] : candidate_offsets[s + 1]].to(z.device)
        if columns.numel():
            set_mean[s] = e[columns].double().mean(0)
            set_norm[s] = e_norm[columns].double().mean()
    sets = set_of_position.clamp_min(0)
    mean = set_mean[sets] if num_sets else set_mean[:1].expand(num, dim)
    norm = set_norm[sets] if num_sets else set_norm[:1].expand(num)
    target = (2.0 * (q.double() * mean).sum(1) - norm) / tau
    loss = torch.where(active, lse.double() - target, 0.0).float()
    if not compute_grad:
        return loss, q.new_zeros(0, dim)
    grad = torch.where(active[:, None], (2.0 / tau) * (softmax_mean.double() - mean), 0.0).float()
    return loss, grad
