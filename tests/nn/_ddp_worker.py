"""The worker of tests/nn/test_ddp.py, in its own module so that spawned processes can import it by name."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

WORLD = 2
STEPS = 3


def _batches(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(WORLD * 2, 40, 16, generator=g)  # rank r takes rows [2r, 2r + 2)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from spae_fast.nn import ResidualVQ, VectorQuantize

        results = {}
        torch.manual_seed(0)  # same init on every rank (as DDP's broadcast of buffers would give)
        ema = VectorQuantize(dim=16, codebook_size=64, decay=0.8)
        torch.manual_seed(0)
        dead = VectorQuantize(
            dim=16, codebook_size=64, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2
        )
        torch.manual_seed(0)
        rvq = ResidualVQ(dim=16, num_quantizers=6, codebook_size=32, quantize_dropout=True)
        assert ema._codebook.sync_codebook  # default: on when a process group of > 1 rank exists
        torch.manual_seed(100 + rank)  # different RNG streams per rank, as in real training
        dropped = []
        for step in range(STEPS):
            x = _batches(step)[2 * rank : 2 * rank + 2]
            ema(x)
            dead(x * (1 + rank))
            dropped.append((rvq(x)[1] == -1).any(0).any(0))
        results = {"ema": ema.codebook.detach().clone(), "cluster": ema._codebook.cluster_size.clone(),
                       "dead": dead.codebook.detach().clone(), "dropped": torch.stack(dropped)}  # fmt: skip
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # every rank reaches the end before any tears gloo down: a rank destroying its group while the other
        # still talks to it can abort that one ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()
