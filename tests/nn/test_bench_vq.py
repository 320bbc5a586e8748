"""benchmarks/bench_vq.py: its arguments (including --device, which gpu_check.sh passes on a GPU machine) and a
tiny end-to-end CPU run with --merge."""

from __future__ import annotations

import csv

import pytest
import torch
from _benchmarks import load  # tests/_benchmarks.py (tests/conftest.py puts tests/ on sys.path)

pytest.importorskip("vector_quantize_pytorch")


def test_arguments():
    bench = load("bench_vq")
    _, args = bench.parse_args(["--sizes", "1024,16384", "--dims", "64", "--rounds", "2"])
    assert (args.sizes, args.dims, args.rounds, args.device) == ([1024, 16384], [64], 2, "cpu")
    for bad in (["--rounds", "0"], ["--sizes", "0"], ["--device", "tpu"], ["--sizes", "1k"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cuda"])
    assert bench.output_names("cpu") == ("bench_vq", bench.SECTION)
    assert bench.output_names("cuda")[0] == "bench_vq_cuda"


def test_tiny_run_writes_the_update_breakdown_and_merges(tmp_path, capsys):
    bench = load("bench_vq")
    common = ["--dims", "8", "--rounds", "1", "--batch", "1", "--tokens", "32", "--out", str(tmp_path)]
    common += ["--no-memory", "--no-update-benchmarks-md"]
    assert bench.main(["--sizes", "64", *common]) == 0
    assert bench.main(["--sizes", "128", "--merge", *common]) == 0
    with open(tmp_path / "bench_vq.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    shapes = {row["shape"] for row in rows}
    assert shapes == {"V=64,D=8,N=1x32", "V=128,D=8,N=1x32"}  # the first run's row was kept
    metrics = {row["metric"] for row in rows}
    assert {"search_s", "ema_update_s", "repack_s", "int8_pack_s", "speedup", "rounds"} <= metrics
    assert all(float(row["value"]) >= 0 for row in rows if row["metric"].endswith("_s"))
    table = (tmp_path / "bench_vq.md").read_text()
    assert "int8 re-pack (ms)" in table and "| 64 | 8 | 1 |" in table and "| 128 | 8 | 1 |" in table
    assert (tmp_path / "bench_vq.png").stat().st_size > 0
