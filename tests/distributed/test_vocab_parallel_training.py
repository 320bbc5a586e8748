"""Training with a vocabulary-parallel codebook (`Trainer(vocab_parallel=2)`, `VocabParallelQuantizer`) on 2 gloo
processes against one process on the whole table: the quantizer bitwise (every method, gradient included), two
`fit` steps of a tiny SPAE (loader, evaluation on the vocabulary group, checkpoint, final model) bitwise without
semantic guidance and within the semantic loss's documented tolerance with it, and the 2-rank checkpoint loading
on 1 process with the same ids."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # children import _train_cases from here too

import _train_cases
from _spawn import rank_reports, run_ranks

WORLD = 2
TIMEOUT_S = 180
# The distributed semantic loss is within a few fp32 ulps of the single-process op (docs/DECISIONS.md), and so are
# the step's losses and gradients (measured: see test_training_with_semantic_loss_matches_within_tolerance).
SEMANTIC_RTOL = 2e-5
GRADIENT_RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab_parallel_training")
    run_ranks(_train_cases.run_worker, (WORLD, str(folder / "store"), str(folder)), WORLD, TIMEOUT_S)
    reports = rank_reports(folder, "rank", WORLD)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the children: conv kernels are bitwise only at the same thread count
    try:
        single = {name: _train_cases.train(str(folder / f"single_{name}"), name == "semantic")
                  for name in ("plain", "semantic")}  # fmt: skip
        single_ids = {name: trainer.model.encode(_train_cases.probe_images()) for name, trainer in single.items()}
        gradients = _train_cases.step_gradients(str(folder / "single_step"))
        from safetensors.torch import save_file

        save_file(gradients, str(folder / "single_step_gradients.safetensors"))
    finally:
        torch.set_num_threads(threads)
    return folder, reports, single_ids


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model" / "model.safetensors"))


def _losses(path) -> list[dict]:
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "step_seconds")} for r in records if "eval" not in r]


def test_quantizer_is_bitwise_the_single_process_one(runs):
    _, reports, _ = runs
    for rank, report in enumerate(reports):
        checks = report["quantizer"]
        failed = [name for name, ok in checks.items() if name != "shard_rows" and ok is not True]
        assert not failed, f"rank {rank}: {failed} differ from SPAEQuantizer on the whole table"
    assert [r["quantizer"]["shard_rows"] for r in reports] == [1, 28]


def test_each_rank_holds_its_shard(runs):
    _, reports, _ = runs
    rows = _train_cases.NUM_ROWS
    assert [r["plain"]["shard_rows"] for r in reports] == [rows // 2, rows - rows // 2]
    assert reports[0]["plain"]["boundaries"] == [[0, rows // 2], [rows // 2, rows]]


def test_training_without_semantic_loss_is_bitwise_one_process(runs):
    folder, reports, single_ids = runs
    vp, one = _weights(folder / "vp_plain"), _weights(folder / "single_plain")
    assert sorted(vp) == sorted(one)
    differing = [name for name in one if not torch.equal(vp[name], one[name])]
    assert not differing, f"parameters differ after 2 steps: {differing[:5]}"
    assert _losses(folder / "vp_plain") == _losses(folder / "single_plain")
    for report in reports:
        assert report["plain"]["ids"] == single_ids["plain"].tolist()


def test_training_with_semantic_loss_matches_within_tolerance(runs):
    folder, reports, _ = runs
    vp_losses, one_losses = _losses(folder / "vp_semantic"), _losses(folder / "single_semantic")
    assert len(vp_losses) == len(one_losses) == 2
    for got, want in zip(vp_losses, one_losses):
        assert sorted(got) == sorted(want)
        assert "semantic" in want
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=SEMANTIC_RTOL, abs=1e-9), key
    # Gradients of one guided step, as one vector (a bias in front of a GroupNorm has an exact gradient of 0, so
    # its computed ~1e-9 is noise that no per-tensor relative bound fits). Measured: 4.2e-7 relative in norm,
    # 5.7e-7 of the largest entry.
    from safetensors.torch import load_file

    vp = load_file(str(folder / "vp_step_gradients.safetensors"))
    one = load_file(str(folder / "single_step_gradients.safetensors"))
    assert sorted(vp) == sorted(one) and len(one) > 10
    got, want = torch.cat([vp[n].flatten() for n in one]), torch.cat([one[n].flatten() for n in one])
    assert float(want.norm()) > 0
    in_norm = float((got - want).norm() / want.norm())
    in_max = float((got - want).abs().max() / want.abs().max())
    assert in_norm <= GRADIENT_RTOL and in_max <= GRADIENT_RTOL, f"gradients differ: {in_norm:.3g} in norm, {in_max:.3g} of the max"
    # Parameters after 2 Adam steps: Adam's first update is ~lr * sign(grad), so a gradient entry within an ulp
    # of 0 may flip an update by up to 2 lr; nearly every weight must still agree.
    vp_w, one_w = _weights(folder / "vp_semantic"), _weights(folder / "single_semantic")
    differing = sum(int(((vp_w[n] - one_w[n]).abs() > 1e-6).sum()) for n in one_w)
    total = sum(t.numel() for t in one_w.values())
    assert differing / total < 0.01, f"{differing} of {total} weights differ"
    for report in reports:  # ids of the probe images
        assert report["semantic"]["ids"] == reports[0]["semantic"]["ids"]


@pytest.mark.parametrize("name", ["plain", "semantic"])
def test_two_rank_checkpoint_loads_on_one_process_with_the_same_ids(runs, name):
    from spae_fast.model import SPAE
    from spae_fast.quantizer import SPAEQuantizer

    folder, reports, _ = runs
    vocab = _train_cases.make_vocab()
    for sub in ("model", "checkpoint"):
        model = SPAE.from_pretrained(folder / f"vp_{name}" / sub, codebook=vocab)
        assert type(model.quantizer) is SPAEQuantizer
        assert model.encode(_train_cases.probe_images()).tolist() == reports[0][name]["ids"], sub
    config = json.loads((folder / f"vp_{name}" / "train_config.json").read_text())
    assert (config["world_size"], config["vocab_parallel"]) == (2, 2)


def test_vocab_parallel_must_divide_the_world(tmp_path):
    from spae_fast.trainer import Trainer

    vocab = _train_cases.make_vocab()
    with pytest.raises(ValueError, match="vocab_parallel = 2 must divide the number of processes"):
        Trainer(_train_cases.make_model(vocab), _train_cases.train_config(), tmp_path,
                _train_cases.make_dataset(), vocab_parallel=2)  # fmt: skip
    with pytest.raises(ValueError, match="vocab_parallel must be a positive int"):
        Trainer(_train_cases.make_model(vocab), _train_cases.train_config(), tmp_path,
                _train_cases.make_dataset(), vocab_parallel=0)  # fmt: skip
