"""Rank body of tests/distributed/test_vocab_parallel_cli.py's teardown test (spawned processes import it)."""

from __future__ import annotations

import datetime
import json
import os

import torch
import torch.distributed as dist

from spae_fast import distributed as sd


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def teardown_worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    """Joins a gloo group, makes the vocabulary-parallel groups and ends on a broadcast of a Python tensor over
    the vocabulary group (as `Trainer.fit` does), then leaves with `destroy_process_groups`; reports the
    process's thread counts before joining, with the groups and after leaving."""
    torch.set_num_threads(1)
    report = {"before": thread_count()}
    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))  # fmt: skip
        vocab_group, data_group = sd.vocab_parallel_groups(world)
        flag = torch.tensor([rank])
        dist.broadcast(flag, src=0, group=vocab_group)
        report["with_groups"] = thread_count()
        del vocab_group, data_group  # only the cache of vocab_parallel_groups holds the groups now
        sd.destroy_process_groups()
        report.update(after=thread_count(), initialized=dist.is_initialized(), flag=int(flag))
    except Exception as error:  # noqa: BLE001 - reported to the test
        report["error"] = repr(error)
    with open(os.path.join(out_dir, f"teardown{rank}.json"), "w") as file:
        json.dump(report, file)
