"""The few collectives the vocabulary-parallel ops use, all plain ``torch.distributed`` calls (gloo on CPU,
NCCL on GPU): no transport of our own.

- `gather_rows`: concatenates every rank's ``[n_r, ...]`` tensor along dim 0 (n_r may differ; padded to the
  largest for the all-gather and trimmed again).
- `lookup_rows`: the fp32 rows of given global indices, each supplied by the rank that owns it. The owner
  writes the row's fp32 bits, every other rank zeros, and an integer all-reduce SUM of the int32 views adds
  ``bits + 0 + ... + 0``: the row arrives bit for bit (signed zeros and all), whatever the reduction order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on all ranks), in group-rank order."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return parts


def gather_sizes(count: int, group, device: torch.device) -> list[int]:
    """Every rank's ``count`` (an int), in group-rank order."""
    return [int(v) for v in all_gather(torch.tensor([count], dtype=torch.int64, device=device), group)]


def gather_rows(tensor: torch.Tensor, group, sizes: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """(every rank's ``[n_r, ...]`` rows concatenated in group-rank order, [n_0, n_1, ...])."""
    if sizes is None:
        sizes = gather_sizes(tensor.shape[0], group, tensor.device)
    largest = max(sizes)
    padded = tensor.new_zeros(largest, *tensor.shape[1:])
    padded[: tensor.shape[0]] = tensor
    parts = all_gather(padded, group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), sizes


def any_rank(flag: bool, codebook) -> bool:
    """Whether ``flag`` holds on any rank of the codebook's group (so that every rank takes the same branch
    before a collective, e.g. when only some ranks' queries require grad)."""
    value = torch.tensor([int(bool(flag))], dtype=torch.int32, device=codebook.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=codebook.group)
    return bool(value.item())


def lookup_rows(codebook, index: torch.Tensor) -> torch.Tensor:
    """fp32 rows ``[*index.shape, D]`` of the global table for int64 global ``index`` (the same on every rank
    of the codebook's group), bit-exact copies of the table's values (16-bit tables upcast exactly).
    Communication: ``index.numel() * D * 4`` bytes per rank (one all-reduce)."""
    flat = index.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= codebook.num_rows):
        raise ValueError(
            f"index holds rows out of range [0, V) = [0, {codebook.num_rows}): min {int(flat.min())}, max {int(flat.max())}"
        )
    rows = torch.zeros(flat.numel(), codebook.dim, dtype=torch.float32, device=codebook.device)
    own = (flat >= codebook.start) & (flat < codebook.stop)
    rows[own] = codebook.local.weight[flat[own] - codebook.start].float()
    bits = rows.view(torch.int32)
    dist.all_reduce(bits, op=dist.ReduceOp.SUM, group=codebook.group)
    return rows.reshape(*index.shape, codebook.dim)
