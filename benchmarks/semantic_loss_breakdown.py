#!/usr/bin/env python
"""Where the fused semantic loss's fp32 time goes: one thread, thread CPU time (a shared machine's load
disturbs it little), against the rate of a pure FMA loop (24 independent zmm chains, compiled here with g++;
left out without g++ or AVX-512).

    python benchmarks/semantic_loss_breakdown.py [--positions 336] [--repeats 3]

Singleton sets on the SmolLM2 table (bench_semantic_loss's inputs). Per width of the fp32 pieces (AVX2, and
AVX-512 where the CPU has it; SPAE_FAST_SEMANTIC_AVX512=0 selects AVX2, the same bits): the forward without the
gradient (one V x D contraction: scores, softmax, candidate sums), the forward with it (the softmax-weighted row
sum, the second contraction, fused in the same pass) and forward + backward (the backward scales the saved
direction). GFLOP/s count 2 N V D per contraction. For scale, torch's own GEMMs (oneDNN / MKL) of the two
contractions a linear cross-entropy runs: z @ E^T (the logits) and P @ E (P: an [N, V] softmax, the gradient).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import torch
from bench_semantic_loss import make_inputs
from harness import smollm2_table

import spae_fast

FMA_LOOP = r"""
#include <immintrin.h>
#include <cstdint>
extern "C" float fma_loop(int64_t iters) {
  __m512 a[24];
  for (int i = 0; i < 24; ++i) a[i] = _mm512_set1_ps(i * 0.001f);
  const __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(0.0001f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) a[i] = _mm512_fmadd_ps(a[i], x, y);
  }
  __m512 s = a[0];
  for (int i = 1; i < 24; ++i) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s);
}
"""


def fma_loop(workdir: str):
    """The compiled loop (iters -> 24 x 32 flops each), or None."""
    if shutil.which("g++") is None or not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return None
    source, library = os.path.join(workdir, "fma.cpp"), os.path.join(workdir, "fma.so")
    with open(source, "w") as handle:
        handle.write(FMA_LOOP)
    subprocess.run(["g++", "-O3", "-mavx512f", "-shared", "-fPIC", "-o", library, source], check=True)
    function = ctypes.CDLL(library).fma_loop
    function.argtypes = [ctypes.c_int64]
    return function


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=336)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    weight, _ = smollm2_table()
    z, index, offsets, sets = make_inputs(weight, -(-args.positions // 21), singleton=True, positions=args.positions)
    num, dim = z.shape
    contraction = 2 * num * weight.shape[0] * dim
    codebook = spae_fast.Codebook(weight)

    def call(wide: bool, grad: bool, backward: bool):
        os.environ["SPAE_FAST_SEMANTIC_AVX512"] = "1" if wide else "0"
        leaf = z.clone().requires_grad_(grad)
        loss = spae_fast.semantic_loss(leaf, codebook, index, offsets, sets)
        if backward:
            loss.backward()

    with tempfile.TemporaryDirectory() as workdir:
        loop = fma_loop(workdir)
        calls = {}
        if loop is not None:
            iters = 20_000_000
            calls["FMA loop (zmm)"] = (lambda: loop(iters), iters * 24 * 32)
        for wide in (False, True) if loop is not None else (False,):
            tag = "AVX-512" if wide else "AVX2"
            calls[f"{tag} forward, no gradient"] = (lambda w=wide: call(w, False, False), contraction)
            calls[f"{tag} forward with gradient"] = (lambda w=wide: call(w, True, False), 2 * contraction)
            calls[f"{tag} forward + backward"] = (lambda w=wide: call(w, True, True), 2 * contraction)
        logits, softmax = torch.empty(num, weight.shape[0]), torch.rand(num, weight.shape[0])
        calls["torch.mm z @ E^T"] = (lambda: torch.mm(z, weight.T, out=logits), contraction)
        calls["torch.mm P @ E"] = (lambda: torch.mm(softmax, weight), contraction)
        seconds = {name: [] for name in calls}
        for function, _ in calls.values():
            function()  # warm-up
        for _ in range(args.repeats):
            for name, (function, _) in calls.items():
                start = time.thread_time()
                function()
                seconds[name].append(time.thread_time() - start)
    os.environ.pop("SPAE_FAST_SEMANTIC_AVX512", None)
    rates = {name: calls[name][1] / statistics.median(t) / 1e9 for name, t in seconds.items()}
    peak = rates.get("FMA loop (zmm)")
    print(f"N = {num}, V = {weight.shape[0]}, D = {dim}; one thread, thread CPU time, median of {args.repeats}")
    for name, t in seconds.items():
        share = f"  {100 * rates[name] / peak:5.1f}% of the FMA loop" if peak else ""
        print(f"  {name:28s} {statistics.median(t):7.3f} s  {rates[name]:6.1f} GFLOP/s{share}")


if __name__ == "__main__":
    main()
