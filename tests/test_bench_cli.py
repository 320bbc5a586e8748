"""`spae-fast bench` runs benchmarks/bench_nearest.py of a source checkout: the tiny suite runs in seconds and
writes the long-format CSV and the markdown table with the expected columns and providers; outside a checkout
the command says where to get one; the installed package holds no benchmark harness."""

from __future__ import annotations

import csv
import importlib.util

import pytest
import torch
from _benchmarks import BENCHMARKS, CHECKOUT, load

from spae_fast import available
from spae_fast.cli import main
from spae_fast.cli_bench import SOURCE_ENV, find_script

EXPECTED_PROVIDERS = {"spae_fast", "spae_fast_raw", "spae_fast_fp32", "spae_fast_topk16", "torch_matmul",
                      "torch_cdist", "torch_chunked", "faiss_knn"}  # fmt: skip


@pytest.mark.skipif(not available()["cpu"].available, reason="native CPU backend not built")
def test_bench_quick_suite_writes_csv_and_markdown(tmp_path, capfd, monkeypatch):
    pytest.importorskip("faiss")
    if not (BENCHMARKS / "bench_nearest.py").is_file():
        pytest.skip("no source checkout")
    monkeypatch.setenv(SOURCE_ENV, str(CHECKOUT))
    code = main(
        [
            "bench",
            "--suite",
            "quick",
            "--out",
            str(tmp_path),
            "--rounds",
            "1",
            "--no-peak-memory",
            "--no-plot",
        ]
    )
    assert code == 0, capfd.readouterr().err[-3000:]

    with open(tmp_path / "bench_nearest.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames[:9] == [
        "op",
        "provider",
        "shape",
        "dtype",
        "metric",
        "value",
        "device",
        "versions",
        "git_sha",
    ]
    assert {row["provider"] for row in rows} == EXPECTED_PROVIDERS
    gflops = {row["provider"]: float(row["value"]) for row in rows if row["metric"] == "gflops"}
    assert set(gflops) == EXPECTED_PROVIDERS and all(value > 0 for value in gflops.values())
    exact = {row["provider"]: float(row["value"]) for row in rows if row["metric"] == "exact_match"}
    assert set(exact) == EXPECTED_PROVIDERS - {"torch_matmul"}
    assert exact["spae_fast"] > 0.99  # fp32 search on a random table: near-ties are rare
    sweep = [row for row in rows if row["table"] == "memory-sweep" and row["metric"] == "peak_extra_mib"]
    assert {row["provider"] for row in sweep} == {"spae_fast", "torch_matmul"} and len(sweep) == 4
    assert all(row["dtype"] == "float32" and row["versions"] and row["device"] for row in rows)

    markdown = (tmp_path / "bench_nearest.md").read_text()
    for header in ("provider", "GFLOP/s", "queries/s", "× GEMM", "peak extra MiB", "exact match"):
        assert header in markdown
    for label in (
        "spae_fast.nearest (Codebook)",
        "torch.matmul",
        "torch.cdist",
        "torch chunked",
        "faiss.knn",
    ):
        assert label in markdown
    assert "Extra memory per call vs V" in markdown
    assert "bench_nearest, suite quick" in capfd.readouterr().out


def test_bench_outside_a_checkout_says_where_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(SOURCE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--suite", "quick"]) == 2
    error = capsys.readouterr().err
    assert "source checkout" in error and SOURCE_ENV in error
    monkeypatch.setenv(SOURCE_ENV, str(tmp_path))
    assert main(["bench"]) == 2
    assert f"${SOURCE_ENV}" in capsys.readouterr().err


def test_bench_finds_the_checkout_from_the_working_directory(monkeypatch):
    if not (BENCHMARKS / "bench_nearest.py").is_file():
        pytest.skip("no source checkout")
    monkeypatch.delenv(SOURCE_ENV, raising=False)
    assert find_script(BENCHMARKS / "results") == BENCHMARKS / "bench_nearest.py"
    monkeypatch.setenv(SOURCE_ENV, str(CHECKOUT))
    assert find_script("/") == BENCHMARKS / "bench_nearest.py"


def test_the_package_holds_no_benchmark_harness():
    assert importlib.util.find_spec("spae_fast.bench") is None
    assert importlib.util.find_spec("spae_fast.sysinfo") is not None  # what `spae-fast info` needs of it


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without a GPU")
def test_device_cuda_without_a_gpu_says_so(capsys):
    assert load("bench_nearest").main(["--device", "cuda", "--suite", "quick"]) == 1
    assert load("bench_quantizer").main(["--device", "cuda"]) == 1
    assert load("bench_semantic_loss").main(["--device", "cuda"]) == 1
    assert "no CUDA device" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        load("bench_gpu").main(["--ops", "nearest,unknown"])
