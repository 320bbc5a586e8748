"""The ``spae-fast fewshot`` and ``spae-fast generate`` commands, on a tiny random SPAE whose codebook is the
vocabulary of a tiny saved Llama."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from spae_fast import VocabCodebook

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny random SPAE whose codebook is a tiny saved Llama's vocabulary, and that Llama."""
    pytest.importorskip("spae_fast.model")
    pytest.importorskip("sklearn")
    from _tiny_llm import byte_level_tokenizer, save_tiny_model

    from spae_fast.model import SPAE, SPAEConfig

    root = tmp_path_factory.mktemp("cli")
    llm = root / "llm"
    save_tiny_model(llm, "llama", byte_level_tokenizer(300))
    vocab = VocabCodebook.from_pretrained(llm, use_cache=False)
    config = SPAEConfig(image_size=16, base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
                        layers=(1, 2, 4, 8), codebook=str(llm))  # fmt: skip
    torch.manual_seed(0)
    SPAE(config, vocab).save_pretrained(root / "spae")
    return root


def test_cli_fewshot(saved_models, tmp_path, capsys, monkeypatch):
    from spae_fast import cli

    monkeypatch.setenv("SPAE_FAST_CACHE", str(tmp_path / "cache"))
    table = tmp_path / "table.csv"
    argv = ["fewshot", "--model", str(saved_models / "spae"), "--llm", str(saved_models / "llm"), "--data", "digits",
            "--ways", "2", "3", "--shots", "1", "--layers", "2", "--episodes", "2", "--labels", "names", "nonsense",
            "--threads", "1", "--classes", "5-9", "--out", str(table), "--episodes-out", str(tmp_path / "queries.csv")]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "image words as ids" in out
    assert "| ways | shots | layers (words) |" in out and "| 3 | 1 | 2 (5) |" in out
    with open(table, encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert [(r["ways"], r["labels"]) for r in rows] == [("2", "names"), ("2", "nonsense"), ("3", "names"),
                                                        ("3", "nonsense")]  # fmt: skip
    assert all(
        r["queries"] == str(2 * int(r["ways"])) and float(r["chance"]) == 1 / int(r["ways"]) for r in rows
    )
    with open(tmp_path / "queries.csv", encoding="utf-8") as file:
        assert {int(r["class"]) for r in csv.DictReader(file)} <= {5, 6, 7, 8, 9}
    # bad inputs: a clear error, exit status 2
    assert cli.main(argv[:-4] + ["--ways", "6"]) == 2
    assert "6-way episodes need 6 classes but only 5" in capsys.readouterr().err


def test_cli_generate(saved_models, tmp_path, capsys, monkeypatch):
    from spae_fast import cli

    monkeypatch.setenv("SPAE_FAST_CACHE", str(tmp_path / "cache"))
    common = ["--model", str(saved_models / "spae"), "--llm", str(saved_models / "llm"), "--count", "2",
              "--layers", "2"]  # fmt: skip
    assert (
        cli.main(["generate", *common, "--task", "denoise", "--examples", "3", "--out", str(tmp_path)]) == 0
    )
    assert cli.main(["generate", *common, "--task", "flip", "--examples", "2", "--out", str(tmp_path)]) == 0
    for task in ("denoise", "flip"):
        for name in (f"{task}.png", f"{task}_layer1.png", f"{task}_layer2.png", f"{task}.json"):
            assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "denoise.json").read_text())
    assert len(report["images"]) == 2 and len(report["images"][0]["psnr_per_layer"]) == 2
    assert "psnr_least_corrupted" in report["mean"]
    assert "mean PSNR" in capsys.readouterr().out
