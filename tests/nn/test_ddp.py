"""spae_fast.nn under DDP: 2 gloo processes on CPU (torch.multiprocessing spawn). The EMA statistics are
all-reduced (vector-quantize-pytorch's sync_codebook), so every rank holds the same codebook, equal to one process
training on the concatenated batch; dead-code replacement and k-means init draw from every rank's batch and keep
the ranks identical; ResidualVQ drops the same layers on every rank."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _ddp_worker import STEPS, WORLD, _batches, _worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)
def test_two_gloo_processes(tmp_path, monkeypatch):
    here = os.path.dirname(os.path.abspath(__file__))  # the spawned processes import _ddp_worker from here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for key in ("ema", "cluster", "dead", "dropped"):
        assert torch.equal(r0[key], r1[key]), f"ranks disagree on {key}"
    # one process on the concatenated batch gives the same EMA codebook (up to the all-reduce's summation order)
    from spae_fast.nn import VectorQuantize

    torch.manual_seed(0)
    single = VectorQuantize(dim=16, codebook_size=64, decay=0.8)
    for step in range(STEPS):
        single(_batches(step))
    torch.testing.assert_close(r0["ema"], single.codebook, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r0["cluster"], single._codebook.cluster_size, rtol=1e-5, atol=1e-6)
    # a rank that trained alone on its half would not
    torch.manual_seed(0)
    alone = VectorQuantize(dim=16, codebook_size=64, decay=0.8, sync_codebook=False)
    for step in range(STEPS):
        alone(_batches(step)[:2])
    assert not torch.allclose(r0["ema"], alone.codebook, atol=1e-4)
    assert bool(r0["dropped"].any())  # quantize dropout did drop layers, the same on both ranks
