"""`EuclideanCodebook`: the codebook state of `spae_fast.nn.VectorQuantize` -- the table, its EMA statistics,
dead-code replacement and k-means init -- with the fused native search behind it.

The buffers have vector-quantize-pytorch's names and shapes (``initted`` [], ``cluster_size`` [1, V],
``embed_avg`` [1, V, D], ``embed`` [1, V, D]), so state dicts load both ways. The search runs on a
`spae_fast.Codebook` packed from ``embed`` and rebuilt lazily whenever ``embed`` changed (torch's in-place
version counter, or a new tensor after ``.to()`` / ``load_state_dict``) and sharing its memory (no copy).

EMA update (van den Oord et al. 2017, Appendix A.1; vector-quantize-pytorch's ``Codebook``), per training step
with x_i the (unmasked) inputs and k_i their codes, all-reduced (summed) over the process group when
``sync_codebook``:

    n_k   = #{i : k_i = k}                        s_k = sum_{i : k_i = k} x_i          (one pass, O(N D))
    N_k  <- decay N_k + (1 - decay) n_k            S_k <- decay S_k + (1 - decay) s_k
    e_k   = S_k / Ñ_k,   Ñ_k = (N_k + eps) / (sum_j N_j + V eps) * sum_j N_j        (Laplace smoothing)

(cosine: e_k is then L2-normalised). Dead codes, N_k < threshold_ema_dead_code, are replaced by input vectors
sampled from the batch (every rank's batch under DDP) and get N_k = threshold, S_k = threshold * e_k.

Cost per step, bitwise vqp's arithmetic: no N x V one-hot matrix (``bincount`` / ``index_add_``), sum rows only
for the h <= N codes hit (the all-reduce moves h D values, not V D), and two in-place passes over the V x D
tables (S decays towards zero, then e = S / Ñ is written into ``embed``), with no V x D temporary. The re-pack
of the changed table for the next search (fp32 panels, then the int8 pre-filter copy on the first search) is
the rest of the update; BENCHMARKS.md times each part against the search.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..codebook import Codebook
from ..ops import nearest, topk

# Above this many codes, stochastic sampling draws from the top-k nearest codes instead of all V (see
# `EuclideanCodebook.sample`).
EXACT_SAMPLING_MAX_CODES = 4096
SAMPLING_TOPK = 64
_SAMPLE_CHUNK_ELEMENTS = 1 << 22  # logits per chunk of rows in exact sampling


def l2norm(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / max(||x||, eps) over the last dim (vector-quantize-pytorch's ``l2norm``)."""
    return F.normalize(t, p=2, dim=-1, eps=eps)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def uniform_init(num_codes: int, dim: int) -> torch.Tensor:
    """Kaiming-uniform ``[1, V, D]`` table drawn exactly as vector-quantize-pytorch draws it (same RNG use)."""
    table = torch.empty(1, num_codes, dim)
    nn.init.kaiming_uniform_(table)
    return table


# ----------------------------------------------------------------------------------------------------------
# Sampling rows of the batch, on one process or across the group
# ----------------------------------------------------------------------------------------------------------


def sample_vectors(samples: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` rows of ``samples [n, D]``: without replacement when n >= num, else with (as vqp)."""
    if samples.shape[0] >= num:
        index = torch.randperm(samples.shape[0], device=samples.device)[:num]
    else:
        index = torch.randint(0, samples.shape[0], (num,), device=samples.device)
    return samples[index]


def _quotas(num: int, counts: list[int]) -> list[int]:
    """Split ``num`` draws over ranks in proportion to their sample counts (largest remainder; identical on
    every rank, so no broadcast is needed). A rank never gets more than it holds unless sum(counts) < num."""
    total = sum(counts)
    exact = [num * c / total for c in counts]
    quota = [int(q) for q in exact]
    order = sorted(range(len(counts)), key=lambda r: (quota[r] - exact[r], r))
    for r in order[: num - sum(quota)]:
        quota[r] += 1
    return quota


def sample_vectors_group(samples: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` rows drawn from the union of every rank's ``samples [n_r, D]``; the same tensor on every rank.

    Each rank draws its proportional quota locally (`_quotas`), the draws are all-gathered (padded to the
    largest quota) and concatenated in rank order. Without a process group: `sample_vectors`.
    """
    if not is_distributed():
        return sample_vectors(samples, num)
    world = dist.get_world_size()
    count = torch.tensor([samples.shape[0]], device=samples.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    if sum(counts) == 0:
        raise RuntimeError("sampling codebook vectors: every rank's batch is empty (all positions masked)")
    quota = _quotas(num, counts)
    local = sample_vectors(samples, quota[dist.get_rank()]) if quota[dist.get_rank()] else samples[:0]
    width = max(quota)
    padded = samples.new_zeros(width, samples.shape[1])
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:q] for g, q in zip(gathered, quota)])


# ----------------------------------------------------------------------------------------------------------
# The codebook module
# ----------------------------------------------------------------------------------------------------------


class EuclideanCodebook(nn.Module):
    """One ``[V, D]`` codebook with EMA statistics (see the module docstring for the math).

    Args:
        dim, codebook_size: D and V.
        kmeans_init, kmeans_iters: initialise from k-means on the first batch (assignment by the fused
            `spae_fast.nearest`, O(N V D) per iteration without an N x V matrix).
        decay, eps, threshold_ema_dead_code: the EMA update and dead-code replacement.
        use_cosine_sim: inputs and codes are L2-normalised and the search maximises x.e.
        sync_codebook: all-reduce the EMA statistics and k-means sums over the default process group, and
            draw replacement / init vectors from every rank's batch (the codebook stays identical on every
            rank).
        ema_update: update the table by EMA in training (False: only dead-code replacement, if enabled).
        manual_ema_update: accumulate the statistics but leave ``update_ema()`` to the caller (ResidualVQ's
            shared codebook).
        sample_codebook_temp: temperature of stochastic code sampling (`sample`).
        stochastic_sample_topk: ``"auto"`` (exact for V <= 4096, else the 64 nearest codes), ``None`` (always
            exact) or an int k.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        decay: float = 0.8,
        eps: float = 1e-5,
        threshold_ema_dead_code: float = 0,
        use_cosine_sim: bool = False,
        sync_codebook: bool = False,
        ema_update: bool = True,
        manual_ema_update: bool = False,
        sample_codebook_temp: float = 1.0,
        stochastic_sample_topk: int | str | None = "auto",
        initial_table: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if initial_table is not None:
            embed = (
                initial_table.detach().float().reshape(1, codebook_size, dim)
            )  # shared, not copied: frozen
        elif kmeans_init:
            embed = torch.zeros(1, codebook_size, dim)
        else:
            embed = uniform_init(codebook_size, dim)
            if use_cosine_sim:
                embed = l2norm(embed)
        self.dim, self.codebook_size = dim, codebook_size
        self.kmeans_iters, self.decay, self.eps = kmeans_iters, decay, eps
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.use_cosine_sim, self.sync_codebook = use_cosine_sim, sync_codebook
        self.ema_update, self.manual_ema_update = ema_update, manual_ema_update
        self.sample_codebook_temp = sample_codebook_temp
        self.stochastic_sample_topk = stochastic_sample_topk
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(1, codebook_size))
        # A frozen table (from_pretrained_vocab) keeps no EMA sum: it would be a second V x D copy.
        tracks = initial_table is None or ema_update or threshold_ema_dead_code > 0
        self.register_buffer("embed_avg", embed.clone() if tracks else torch.empty(1, 0, dim))
        self.register_buffer("embed", embed)
        self._search: Codebook | None = None
        self._search_key: tuple | None = None

    # ---- search -------------------------------------------------------------------------------------------

    @property
    def metric(self) -> str:
        return "ip" if self.use_cosine_sim else "l2"

    @property
    def has_dead_code_replacement(self) -> bool:
        return self.threshold_ema_dead_code > 0

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return l2norm(x) if self.use_cosine_sim else x

    def search_codebook(self) -> Codebook:
        """The packed `spae_fast.Codebook` of ``embed``, brought up to date when ``embed`` changed since the
        last call.

        The Codebook shares ``embed`` (``copy=False``). After an update in place (the EMA step, dead-code
        replacement: same storage, new version) it is re-packed into its own buffers (`Codebook.repack_`:
        no new ``V x D`` allocation to fault in, bitwise a new Codebook's results); a table in new storage
        (``load_state_dict``, the ``codebook`` setter, ``.to()``) gets a new Codebook, the stale one
        released first so the peak holds one pack, not two."""
        table = self.embed[0]
        storage = (table.data_ptr(), table.device, table.shape, table.stride(), table.dtype)
        version = None if table.is_inference() else table._version
        if self._search is not None and self._search_key == (storage, version):
            return self._search
        if self._search is not None and self._search_key[0] == storage and version is not None:
            self._search.repack_(table.detach())
        else:
            self._search = self._search_key = None
            self._search = Codebook(table.detach(), self.metric, copy=False)
        self._search_key = (storage, version)
        return self._search

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Code of every row of ``flat [N, D]``: argmin ||x - e||^2 (l2) or argmax x.e (cosine), ties to the
        lowest index."""
        return nearest(flat.detach(), self.search_codebook())[1]

    def logits(self, flat: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """vector-quantize-pytorch's similarity: -sqrt(max(||x - e||^2, 1e-8)) (l2) or x.e (cosine), for all
        codes ([N, V]) or the ``index [N, k]`` ones."""
        table = self.embed[0].float()
        if index is not None:
            chosen = table[index]  # [N, k, D]
            if self.use_cosine_sim:
                return (flat[:, None, :] * chosen).sum(-1)
            return -((flat[:, None, :] - chosen) ** 2).sum(-1).clamp_min(1e-8).sqrt()
        if self.use_cosine_sim:
            return flat @ table.t()
        d2 = (flat**2).sum(-1, keepdim=True) + (table**2).sum(-1) - 2.0 * flat @ table.t()
        return -d2.clamp_min(1e-8).sqrt()

    def sample(self, flat: torch.Tensor, temperature: float) -> torch.Tensor:
        """Stochastic codes: k_i ~ softmax_k(logit_ik / T), drawn by Gumbel-max (as vector-quantize-pytorch).

        Exact (all V codes; logits in chunks of rows, never N x V at once) when V <= 4096 or
        ``stochastic_sample_topk=None``; otherwise restricted to the k nearest codes (``spae_fast.topk``,
        k = 64 by default) and renormalised over them. The restriction drops at most the mass
        (V - k) exp((l_k - l_1) / T) / sum_{j<=k} exp((l_j - l_1) / T) per row (l_j the sorted logits), which
        is negligible whenever the k-th nearest code is a few temperatures worse than the best.
        """
        flat = flat.detach().float()
        k = self.stochastic_sample_topk
        if k == "auto":
            k = None if self.codebook_size <= EXACT_SAMPLING_MAX_CODES else SAMPLING_TOPK
        if k is None or k >= self.codebook_size:
            rows = max(1, _SAMPLE_CHUNK_ELEMENTS // self.codebook_size)
            out = []
            for chunk in flat.split(rows):
                logits = self.logits(chunk) / temperature
                out.append((logits + _gumbel_like(logits)).argmax(-1))
            return torch.cat(out) if out else flat.new_zeros(0, dtype=torch.int64)
        index = topk(flat, self.search_codebook(), k)[1]  # [N, k]
        logits = self.logits(flat, index) / temperature
        choice = (logits + _gumbel_like(logits)).argmax(-1, keepdim=True)
        return index.gather(-1, choice)[:, 0]

    # ---- EMA ----------------------------------------------------------------------------------------------

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.sync_codebook and is_distributed():
            dist.all_reduce(tensor)
        return tensor

    def batch_statistics(
        self, flat: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n [V], hit [h], s [h, D]) of the rows ``flat [N, D]`` with codes ``index [N]``, summed over the group:
        the counts of every code, the codes hit on any rank (ascending) and their sums; h <= N * world.

        Only hit codes get a sum row (vqp forms a dense [V, D] one), so the all-reduce moves h D values instead
        of V D. The sums are bitwise those of a dense ``index_add_`` (same rows added in the same order)."""
        flat, index = flat.detach().float(), index.contiguous()
        counts = self._all_reduce(torch.bincount(index, minlength=self.codebook_size).to(torch.float32))
        hit = counts.nonzero().flatten()
        sums = torch.zeros(hit.numel(), self.dim, dtype=torch.float32, device=flat.device)
        sums.index_add_(0, torch.searchsorted(hit, index), flat)
        return counts, hit, self._all_reduce(sums)

    @torch.no_grad()
    def track(self, flat: torch.Tensor, index: torch.Tensor) -> None:
        """N <- lerp(N, n, 1 - decay), S <- lerp(S, s, 1 - decay) (``lerp_``, bitwise vqp's).

        Codes nobody hit have s_k = 0: the whole table decays in place towards a broadcast zero (one pass, no
        [V, D] temporary), then the hit rows are redone from their saved values with their sums."""
        counts, hit, sums = self.batch_statistics(flat, index)
        weight = 1.0 - self.decay
        self.cluster_size[0].lerp_(counts.to(self.cluster_size), weight)
        table = self.embed_avg[0]
        hit_rows = table.index_select(0, hit)
        table.lerp_(table.new_zeros(()).expand_as(table), weight)
        table.index_copy_(0, hit, hit_rows.lerp_(sums.to(table), weight))

    @torch.no_grad()
    def update_ema(self) -> None:
        """e_k = S_k / Ñ_k (Laplace-smoothed counts), normalised for cosine: one pass written straight into
        ``embed`` (no [V, D] temporary)."""
        cluster_size = self.cluster_size
        total = cluster_size.sum(-1, keepdim=True)
        smoothed = (cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        torch.div(self.embed_avg, smoothed[..., None], out=self.embed)
        if self.use_cosine_sim:  # F.normalize's arithmetic (x / max(||x||, eps)), in place
            self.embed.div_(self.embed.norm(dim=-1, keepdim=True).clamp_min(1e-6))

    @torch.no_grad()
    def expire_codes_(self, flat: torch.Tensor) -> None:
        """Replace codes with N_k < threshold by rows of ``flat [n, D]`` (every rank's rows under DDP).

        With fewer rows than dead codes, a random subset of the dead codes is replaced now (chosen on rank 0
        and broadcast), the rest on later steps, so no two codes get the same row.
        """
        if not self.has_dead_code_replacement or not self.training:
            return
        dead = self.cluster_size[0] < self.threshold_ema_dead_code  # [V]
        if not bool(dead.any()):
            return
        flat = self.transform_input(flat.detach().float())
        grouped = self.sync_codebook and is_distributed()
        available = flat.shape[0]
        if grouped:
            total = torch.tensor([available], device=flat.device)
            dist.all_reduce(total)
            available = int(total)
        if available == 0:
            return
        dead_index = dead.nonzero()[:, 0]
        if dead_index.numel() > available:
            keep = torch.randperm(dead_index.numel(), device=flat.device)[:available]
            if grouped:
                dist.broadcast(keep, src=0)
            dead_index = dead_index[keep].sort().values  # rows fill the dead codes in index order, as vqp
        sampled = (sample_vectors_group if grouped else sample_vectors)(flat, dead_index.numel())
        sampled = sampled.to(self.embed)
        self.embed[0, dead_index] = sampled
        self.cluster_size[0, dead_index] = self.threshold_ema_dead_code
        if self.embed_avg.shape[1]:
            self.embed_avg[0, dead_index] = sampled * self.threshold_ema_dead_code

    @torch.no_grad()
    def update(self, flat: torch.Tensor, index: torch.Tensor, ema_update: bool | None = None) -> None:
        """One training step's codebook update from the rows ``flat [N, D]`` (already masked) and their codes;
        ``ema_update`` overrides the module's setting for this step."""
        ema_update = self.ema_update if ema_update is None else ema_update
        if not ema_update and not self.has_dead_code_replacement:
            return
        self.track(flat, index)
        if ema_update and not self.manual_ema_update:
            self.update_ema()
        self.expire_codes_(flat)

    # ---- k-means init -------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_embed_(self, flat: torch.Tensor) -> None:
        """k-means on the first batch (every rank's under DDP): means sampled from the rows, then
        ``kmeans_iters`` Lloyd iterations whose assignment is the fused search; empty clusters keep their mean."""
        if bool(self.initted):
            return
        flat = flat.detach().float()
        grouped = self.sync_codebook and is_distributed()
        means = (sample_vectors_group if grouped else sample_vectors)(flat, self.codebook_size)
        bins = torch.zeros(self.codebook_size, device=flat.device)
        for _ in range(self.kmeans_iters):
            index = nearest(flat, Codebook(means, "ip" if self.use_cosine_sim else "l2"))[1]
            bins, sums = _statistics(flat, index, self.codebook_size)
            if grouped:
                bins, sums = self._all_reduce(bins), self._all_reduce(sums)
            new_means = sums / bins.clamp_min(1)[:, None]
            if self.use_cosine_sim:
                new_means = l2norm(new_means)
            means = torch.where((bins == 0)[:, None], means, new_means)
        self.embed_avg.copy_((means * bins[:, None])[None])
        self.cluster_size.copy_(bins[None])
        self.update_ema()
        self.initted.copy_(torch.tensor(True))


def _statistics(flat: torch.Tensor, index: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(index, minlength=num_codes).to(torch.float32)
    sums = torch.zeros(num_codes, flat.shape[1], dtype=torch.float32, device=flat.device).index_add_(
        0, index, flat
    )
    return counts, sums


def _gumbel_like(t: torch.Tensor) -> torch.Tensor:
    """-log(-log u), u ~ U(0, 1), logs clamped at 1e-20 (vector-quantize-pytorch's ``gumbel_noise``)."""
    noise = torch.zeros_like(t).uniform_(0, 1)
    return -torch.log((-torch.log(noise.clamp_min(1e-20))).clamp_min(1e-20))
