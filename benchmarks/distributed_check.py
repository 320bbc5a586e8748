"""The vocabulary-parallel ops (spae_fast.distributed) over a real backend: NCCL on GPUs (one GPU per rank:
NCCL refuses two ranks on one device), gloo on the CPU. Run by benchmarks/gpu_check.sh.

    python benchmarks/distributed_check.py --backend nccl [--world N]   # N <= visible GPUs (default: all, max 4)
    python benchmarks/distributed_check.py --backend gloo --world 2     # the same checks on the CPU
    python benchmarks/distributed_check.py --backend gloo --world 2 --device cuda   # 2 GPU shards, one GPU

Each rank builds its `ShardedCodebook` shard of a random [V, D] table (V odd, with duplicated rows so that ties
straddle the shards) on its device and runs nearest, topk (k = 16), saq, lookup and semantic_loss (forward and
gradient) with replicated queries; rank 0 compares with the single-process ops on the whole table on its device:
bitwise for everything but the semantic loss (within 1e-5 of the largest value: docs/DECISIONS.md). With one
GPU, NCCL runs at world size 1: every collective still goes through NCCL, but nothing is split; gloo (which
takes CUDA tensors) then splits the table over 2 ranks that share the GPU, so the GPU shard code runs split.
Prints one line per op and exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _problem(device: torch.device):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(4099, 64, generator=g)
    table[2049] = table[2048]  # a tie that straddles the middle (the split of 2 ranks: 2049 | 2050 rows)
    table[17] = table[3000]
    x = torch.cat([torch.randn(509, 64, generator=g), table[[2048, 3000, 0, 4098]]])
    z = torch.randn(2, 64, 16, 16, generator=g)
    index = torch.randint(0, table.shape[0], (48,), generator=g)
    offsets = torch.arange(0, 49, 6)
    sets = torch.randint(-1, 8, (300,), generator=g)
    positions = torch.randn(300, 64, generator=g)
    return [t.to(device) for t in (table, x, z, index, offsets, sets, positions)]


def _run(ops, book, table, x, z, index, offsets, sets, positions):
    results = {}
    results["nearest"] = ops.nearest(x, book)
    results["topk16"] = ops.topk(x, book, 16)
    results["saq"] = (ops.saq(z, book, (1, 2, 4, 8, 16)),)
    results["lookup"] = (ops.lookup(book, index) if ops.__name__.endswith("distributed") else table[index].float(),)
    v = positions.clone().requires_grad_(True)
    loss = ops.semantic_loss(v, book, index, offsets, sets, reduction="none")
    loss.sum().backward()
    results["semantic_loss"] = (loss.detach(), v.grad)
    return results


def worker(rank: int, world: int, backend: str, device_type: str, store: str, failures: str) -> None:
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device(f"cuda:{rank % torch.cuda.device_count()}")
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))  # fmt: skip
    import spae_fast
    from spae_fast import distributed as sd

    table, x, z, index, offsets, sets, positions = _problem(device)
    book = sd.ShardedCodebook.from_full(table)
    got = _run(sd, book, table, x, z, index, offsets, sets, positions)
    lines, bad = [], []
    if rank == 0:
        want = _run(spae_fast, spae_fast.Codebook(table), table, x, z, index, offsets, sets, positions)
        for name, values in want.items():
            if name == "semantic_loss":
                error = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got[name], values))
                ok = error <= 1e-5
                lines.append(f"  {name:14s} {'ok' if ok else 'DIFFERS'} (max relative error {error:.1e}, bound 1e-5)")
            else:
                ok = all(torch.equal(a, b) for a, b in zip(got[name], values))
                lines.append(f"  {name:14s} {'bitwise' if ok else 'DIFFERS'}")
            if not ok:
                bad.append(name)
        print(f"{backend}, world {world}, device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
              f"shards {list(book.boundaries)}:\n" + "\n".join(lines), flush=True)  # fmt: skip
        with open(failures, "w") as file:
            file.write(",".join(bad))
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl" if torch.cuda.is_available() else "gloo")
    parser.add_argument("--world", type=int, default=None, help="ranks (nccl: at most the visible GPUs)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="gloo only (nccl: cuda)")
    args = parser.parse_args(argv)
    device = "cuda" if args.backend == "nccl" else (args.device or "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check on cuda")
        return 1
    if args.backend == "nccl":
        if not torch.cuda.is_available() or not dist.is_nccl_available():
            print("nccl: no CUDA device or no NCCL in this torch; nothing to check")
            return 1
        gpus = torch.cuda.device_count()
        world = args.world or min(gpus, 4)
        if world > gpus:
            print(f"--world {world} needs {world} GPUs for NCCL (one per rank); {gpus} visible")
            return 1
    else:
        world = args.world or 2
    work = tempfile.mkdtemp(prefix="distributed_check_")
    failures = os.path.join(work, "failures")
    mp.spawn(worker, args=(world, args.backend, device, os.path.join(work, "store"), failures), nprocs=world)
    with open(failures) as file:
        bad = file.read()
    print("all ops match the single-process ops" if not bad else f"MISMATCH: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
