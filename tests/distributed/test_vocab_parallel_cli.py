"""``torchrun --nproc-per-node 2 -m spae_fast.cli train --vocab-parallel 2`` end to end: each rank reads its rows
of the vocabulary from the model folder (`ShardedVocabCodebook`), and the run equals ``spae-fast train`` on one
process bit for bit (no semantic loss: the vocabulary-parallel step is bitwise the 1-process one). And the
teardown it ends with: `destroy_process_groups` joins gloo's threads before the interpreter exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/_tiny_llm

import _grid_cases
import _teardown_case
from _spawn import rank_reports, run_ranks

FLAGS = ["--data", "digits", "--relevance", "none", "--steps", "2", "--batch-size", "2", "--eval-images", "2",
         "--eval-every", "2", "--save-every", "2", "--no-progress", "--image-size", "16", "--base-channels", "8",
         "--channel-multipliers", "1,2", "--num-res-blocks", "1", "--layers", "1,2,4,8"]  # fmt: skip


def test_cli_vocab_parallel_two_ranks_equals_one_process(tmp_path):
    pytest.importorskip("tokenizers")
    folder = _grid_cases.tiny_folder(str(tmp_path / "llm"))
    common = FLAGS + ["--codebook", folder]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPAE_FAST_CACHE": str(tmp_path / "cache")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "spae_fast.cli", "train", "--vocab-parallel", "2"]  # fmt: skip
    # From tmp_path: the source tree would shadow the installed package.
    vp = subprocess.run(launcher + common + ["--out", str(tmp_path / "vp")], env=env, cwd=tmp_path, check=False,
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert vp.returncode == 0, vp.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "spae_fast.cli", "train"] + common + ["--out", str(tmp_path / "one")],
                            env=env, cwd=tmp_path, check=False, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    config = json.loads((tmp_path / "vp" / "train_config.json").read_text())
    assert (config["world_size"], config["vocab_parallel"]) == (2, 2)
    assert config["model"] == json.loads((tmp_path / "one" / "train_config.json").read_text())["model"]
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "vp" / "model" / "model.safetensors"))
    want = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[name], want[name]) for name in want)
    losses = [[json.loads(line).get("pixel") for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("vp", "one")]  # fmt: skip
    assert losses[0] == losses[1]


def test_destroy_process_groups_joins_gloo_threads_before_exit(tmp_path):
    """A gloo worker thread releases a collective's tensors after the caller has its result; at interpreter exit
    that release aborted one rank in ~1 of 20 loaded runs of the CLI test above (SIGABRT, "terminate called
    without an active exception", in ~AsyncBroadcastWork). `destroy_process_groups` must free every group,
    including the ones `vocab_parallel_groups` caches, so that their threads are joined while Python is whole."""
    world = 2
    run_ranks(_teardown_case.teardown_worker, (world, str(tmp_path / "store"), str(tmp_path)), world, 120)
    for rank, report in enumerate(rank_reports(tmp_path, "teardown", world)):
        assert report["with_groups"] > report["before"], report  # gloo's threads exist while groups do
        assert report["after"] == report["before"], (rank, report)
        assert not report["initialized"] and report["flag"] == 0, report
