"""Runs a test's ranks: `world` spawned processes (torch.multiprocessing) that report through files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp


def run_ranks(worker, args: tuple, world: int, timeout_s: float) -> None:
    """Runs ``worker(rank, *args)`` on `world` spawned processes and waits for them; fails the test (and kills
    what still runs) once `timeout_s` has passed, so a hung collective cannot hang the suite."""
    context = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-rank run did not finish within {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def rank_reports(folder, name: str, world: int) -> list[dict]:
    """Each rank's JSON report ``{folder}/{name}{rank}.json``; fails the test with a rank's error when it has one."""
    reports = [json.loads((Path(folder) / f"{name}{rank}.json").read_text()) for rank in range(world)]
    for rank, report in enumerate(reports):
        assert "error" not in report, f"rank {rank}:\n{report['error']}"
    return reports
