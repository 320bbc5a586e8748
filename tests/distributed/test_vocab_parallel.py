"""spae_fast.distributed on 2 and 3 gloo processes (CPU): every op bitwise equal to the single-process op on the
whole table (nearest, topk with ties straddling shards, a shard of one row, uneven and out-of-order shards,
far queries whose distances tie while their scores do not, gradients, saq / rq), the semantic loss and its
gradient against the single-process op and fp64, both query layouts, reading shards from a safetensors file,
and clear errors on every rank when shards do not tile the table or disagree on D or dtype.

One process group per world size runs every case of `_dist_cases` (spawned once: starting processes is the
expensive part); each case reports per rank, and each test below asserts one (world size, case).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # children import _dist_cases from here too

import _dist_cases
from _spawn import run_ranks

WORLD_SIZES = (2, 3)
TIMEOUT_S = 240


def _write_inputs(folder: str) -> dict:
    from safetensors.torch import save_file

    table = torch.randn(23, 5, generator=torch.Generator().manual_seed(40)).bfloat16()
    torch.save(table, os.path.join(folder, "table.pt"))
    path = os.path.join(folder, "model.safetensors")
    other = torch.randn(8, 4, generator=torch.Generator().manual_seed(41))
    save_file({"model.embed_tokens.weight": table, "other.weight": other}, path)
    return {"table_path": os.path.join(folder, "table.pt"), "safetensors_path": path, "out_dir": folder}


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"{w}ranks")
def outcomes(request, tmp_path_factory):
    """{case name: {rank: "ok" | traceback}} of one run of every case on ``world`` gloo processes."""
    world = request.param
    folder = str(tmp_path_factory.mktemp(f"vocab_parallel_{world}"))
    data = _write_inputs(folder)
    run_ranks(_dist_cases.run_worker, (world, os.path.join(folder, "store"), folder, data), world, TIMEOUT_S)
    results: dict[str, dict[int, str]] = {}
    for rank in range(world):
        with open(os.path.join(folder, f"rank{rank}.json")) as file:
            for name, outcome in json.load(file).items():
                results.setdefault(name, {})[rank] = outcome
    return world, results


@pytest.mark.parametrize("name", list(_dist_cases.CASES))
def test_case(outcomes, name):
    world, results = outcomes
    assert name in results, f"case {name} did not run on {world} ranks"
    assert sorted(results[name]) == list(range(world)), f"case {name} ran on ranks {sorted(results[name])}"
    failed = {rank: text for rank, text in results[name].items() if text != "ok"}
    assert not failed, "\n".join(f"rank {rank}:\n{text}" for rank, text in failed.items())


def test_balanced_boundaries():
    from spae_fast.distributed import balanced_boundaries

    assert balanced_boundaries(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert balanced_boundaries(3, 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="every rank needs at least one row"):
        balanced_boundaries(2, 3)


def test_ops_need_a_process_group():
    import spae_fast.distributed as sd

    if torch.distributed.is_initialized():
        pytest.skip("a process group is active in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        sd.ShardedCodebook(torch.randn(4, 2), 0)
