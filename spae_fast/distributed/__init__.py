"""Vocabulary-parallel spae_fast over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

An LLM vocabulary of 128k-256k rows x 4096-8192 dims is 2-8 GB in bf16 before the packed copies a `Codebook`
keeps. Here each rank of a process group holds only rows ``[start, stop)`` of the table (`ShardedCodebook`)
and the ops run on the shards, merging small per-rank results (Megatron-LM's vocab-parallel cross-entropy,
PyTorch DTensor's sharded argmin):

    ShardedCodebook     rows [start, stop) per rank; from the whole table, a safetensors file (shard by shard,
                        no rank reads the whole table) or a shard in hand; validates the tiling
    nearest, topk       bitwise `spae_fast.nearest` / `topk` on the whole table (global indices, ties to the
                        lowest global index, the same fp32 distances and gradient)
    saq                 bitwise `spae_fast.saq` (merged after every layer, owners send the chosen embeddings)
    semantic_loss       `spae_fast.semantic_loss` by a max-then-sum logsumexp across ranks, with the gradient;
                        deterministic, within a few fp32 ulps of the single-process op (not bitwise; see
                        semantic_loss.py and docs/DECISIONS.md)
    lookup              table[index] for global indices, each row sent by its owner (exact)
    vocab_parallel_groups   the 2-D (data parallel x vocabulary parallel) groups
    destroy_process_groups  leaves torch.distributed before the interpreter exits (call it last)
    VocabParallelQuantizer  `SPAEQuantizer` on a sharded table, for training (``spae-fast train --vocab-parallel``)
    ShardedVocabCodebook    an LLM vocabulary read shard by shard from its model file (token metadata O(V) on
                        every rank, rows [start, stop) only, the fingerprint streamed): `SPAE` on it trains
                        vocabulary-parallel without any rank holding the whole table

Layouts. Every op is a collective over the codebook's group and takes ``queries=``:

- ``"replicated"`` (default): every rank of the vocabulary group passes the same queries and gets the whole
  result. With data parallelism on top, the world is a ``data x vocab`` grid (`vocab_parallel_groups`): each
  row of the grid is one vocabulary group with its own copy of the sharded table and its own batch; gradients
  of the model are averaged over the data-parallel group (DDP with ``process_group=data_group``).
- ``"sharded"``: each rank passes its own queries (any count, also none); the op all-gathers them inside the
  group (O(N D) bytes), computes as above and returns each rank its own rows - data parallel and vocabulary
  parallel over the same ranks (DDP over the same group).

Both need the table split the same way in every vocabulary group and every rank of a group to call the op
(with the same arguments apart from its own queries in the sharded layout).
"""

from __future__ import annotations

import gc

import torch.distributed as dist

from .quantizer import VocabParallelQuantizer
from .saq import saq
from .search import QUERY_LAYOUTS, lookup, nearest, topk
from .semantic_loss import semantic_loss
from .sharded_codebook import ShardedCodebook, balanced_boundaries
from .vocab_shard import ShardedVocabCodebook

_GROUPS: dict[int, tuple[object, dist.ProcessGroup, dist.ProcessGroup]] = {}  # N -> (world, vocab, data group)


def check_vocab_parallel(vocab_parallel: int, world_size: int) -> None:
    """ValueError unless ``vocab_parallel`` is a positive int that divides ``world_size``."""
    if isinstance(vocab_parallel, bool) or not isinstance(vocab_parallel, int) or vocab_parallel < 1:
        raise ValueError(f"vocab_parallel must be a positive int, got {vocab_parallel!r}")
    if world_size % vocab_parallel:
        raise ValueError(
            f"vocab_parallel = {vocab_parallel} must divide the number of processes ({world_size}); run "
            f"under torchrun --nproc-per-node with a multiple of {vocab_parallel}"
        )


def split_vocabulary(model, vocab_parallel: int) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """(vocabulary group, data group) of this rank for training ``model`` (an `SPAE`) with ``vocab_parallel``,
    its quantizer split over the vocabulary group: a single-process quantizer is replaced by a
    `VocabParallelQuantizer` (from its whole table), one built on a `ShardedVocabCodebook` is checked to be split
    over this group. (None, None) for ``vocab_parallel = 1`` (refused for an already split quantizer)."""
    if vocab_parallel == 1:
        if getattr(model.quantizer, "sharded", None) is not None:
            raise ValueError("the model's codebook is split over ranks (a ShardedVocabCodebook): pass vocab_parallel=N")
        return None, None
    vocab_group, data_group = vocab_parallel_groups(vocab_parallel)
    if not isinstance(model.quantizer, VocabParallelQuantizer):
        model.quantizer = VocabParallelQuantizer.from_quantizer(model.quantizer, group=vocab_group)
    elif model.quantizer.sharded.group is not vocab_group:
        raise ValueError(
            "the model's vocabulary-parallel codebook must be split over this rank's vocabulary group: build it "
            f"with group=spae_fast.distributed.vocab_parallel_groups({vocab_parallel})[0]"
        )
    return vocab_group, data_group


def vocab_parallel_groups(vocab_parallel: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(vocabulary group, data group) of this rank in a ``data x vocab`` grid of the world: world rank
    ``d * vocab_parallel + v`` is shard ``v`` of data replica ``d``. The vocabulary group holds the ranks of
    one replica (consecutive ranks: on one node they share fast links), the data group the ranks that hold
    the same shard. Every rank must call it (``new_group`` is collective); the groups are made once per world
    and ``vocab_parallel`` (later calls return the same groups, so a codebook built on them fits the trainer's)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_groups needs an initialised torch.distributed process group")
    world, rank = dist.get_world_size(), dist.get_rank()
    check_vocab_parallel(vocab_parallel, world)
    cached = _GROUPS.get(vocab_parallel)
    if cached is not None and cached[0] is dist.group.WORLD:  # not a process group of an earlier world
        return cached[1], cached[2]
    vocab_group = data_group = None
    for replica in range(world // vocab_parallel):
        group = dist.new_group(list(range(replica * vocab_parallel, (replica + 1) * vocab_parallel)))
        if rank // vocab_parallel == replica:
            vocab_group = group
    for shard in range(vocab_parallel):
        group = dist.new_group(list(range(shard, world, vocab_parallel)))
        if rank % vocab_parallel == shard:
            data_group = group
    _GROUPS[vocab_parallel] = (dist.group.WORLD, vocab_group, data_group)
    return vocab_group, data_group


def destroy_process_groups() -> None:
    """Destroys every process group of this process while the interpreter is whole: call it once the work with
    them is over (``spae-fast train`` does), after dropping the objects that hold groups (a `Trainer`, a model on
    a `ShardedVocabCodebook`, DDP wrappers).

    Why: a gloo worker thread releases its last collective's tensors after the caller has its result. If the
    process is already finalizing by then, the release needs the GIL, the thread is torn down inside a
    noexcept destructor and the process aborts ("terminate called without an active exception"; pytorch
    issue 190489). `torch.distributed.destroy_process_group` alone does not prevent it while anything still
    references a group: gloo's threads are joined only when the group object is freed. So the groups cached by
    `vocab_parallel_groups` are dropped, cycles collected, then every group destroyed. (torch 2.13's DDP keeps
    its group alive after the DDP object is freed; those threads stay, idle since the last backward.)"""
    _GROUPS.clear()
    gc.collect()  # reference cycles that hold groups (modules, DDP's reducer hooks)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


__all__ = [
    "QUERY_LAYOUTS",
    "ShardedCodebook",
    "ShardedVocabCodebook",
    "VocabParallelQuantizer",
    "balanced_boundaries",
    "check_vocab_parallel",
    "destroy_process_groups",
    "lookup",
    "nearest",
    "saq",
    "semantic_loss",
    "split_vocabulary",
    "topk",
    "vocab_parallel_groups",
]
