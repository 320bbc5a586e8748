#!/usr/bin/env python
"""Benchmark of fused nearest-word search: spae_fast vs torch (cdist, chunked matmul + argmin, the GEMM
alone) and FAISS, on LLM-shaped tables. Same as ``spae-fast bench``; the implementation (and its method,
in the docstring) is `spae_fast/bench.py`, inside the package so the console script works from a wheel.

    python benchmarks/bench_nearest.py [--suite quick|default|full] [--out DIR] [--parts throughput,memory]

Writes bench_nearest.csv (long format), bench_nearest.md and bench_nearest.png under --out
(default benchmarks/results). Run it from an environment where spae_fast is installed (scripts/setup.sh).
"""

import sys

from spae_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
