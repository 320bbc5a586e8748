"""Smoke test of the benchmark through the `spae-fast` entry point: the tiny suite runs in seconds and writes
the long-format CSV and the markdown table with the expected columns and providers."""

from __future__ import annotations

import csv

import pytest

from spae_fast import available
from spae_fast.cli import main

pytest.importorskip("faiss")

EXPECTED_PROVIDERS = {
    "spae_fast",
    "spae_fast_raw",
    "spae_fast_fp32",
    "spae_fast_topk16",
    "torch_matmul",
    "torch_cdist",
    "torch_chunked",
    "faiss_knn",
}


@pytest.mark.skipif(not available()["cpu"].available, reason="native CPU backend not built")
def test_bench_quick_suite_writes_csv_and_markdown(tmp_path, capsys):
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
    assert code == 0

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
    assert "spae-fast bench" in capsys.readouterr().out
