"""Measurements of the nearest / top-k benchmark: interleaved throughput rounds over a table's providers,
and the peak extra memory of one call, each in a fresh interpreter (this file is the child's script; method:
`bench_nearest.py`)."""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import resource
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from harness import GIB, MIB, interleaved_rounds, meminfo_bytes, proc_status_kib, reset_peak, run_child
from nearest_cases import TOPK_K, Provider, TableSpec, capped_queries, matrix_bytes, provider_available

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
    times, indices = interleaved_rounds(
        {name: (lambda name=name: providers[name](queries[name])) for name in names}, rounds, log
    )
    for name in names:
        results[name]["times"] = times[name]
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
    reset = reset_peak() and proc_status_kib("VmHWM") is not None
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


def measure_memory(jobs: list[dict], workers: int, workdir: str, log) -> list[dict]:
    """Runs each job in a fresh interpreter and returns the parsed results in job order. Up to ``workers``
    run at once while their estimated footprints fit half of the available memory (memory is per process,
    so concurrent children do not disturb each other's numbers, only each other's speed)."""
    budget = max(2 * GIB, (meminfo_bytes("MemAvailable") or 8 * GIB) // 2)
    condition = threading.Condition()
    in_use = [0]

    def run_one(job: dict) -> dict:
        need = min(job["footprint"], budget)
        with condition:
            condition.wait_for(lambda: in_use[0] == 0 or in_use[0] + need <= budget)
            in_use[0] += need
        try:
            result = run_child(__file__, [json.dumps(job)], cwd=workdir, timeout=1800, retries=1)
        finally:
            with condition:
                in_use[0] -= need
                condition.notify_all()
        if "error" in result:
            return result
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


def save_inputs(workdir: str, tag: str, x: torch.Tensor, weight: torch.Tensor) -> tuple[str, str]:
    x_path, weight_path = os.path.join(workdir, f"{tag}-x.npy"), os.path.join(workdir, f"{tag}-weight.npy")
    np.save(x_path, x.numpy())
    np.save(weight_path, weight.numpy())
    return x_path, weight_path


def memory_job(provider: str, n: int, rows: int, dim: int, chunk, paths, threads: int) -> dict:
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


def scratch_dir() -> str:
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return tempfile.mkdtemp(prefix="spae_fast_bench_", dir=shm)
    return tempfile.mkdtemp(prefix="spae_fast_bench_")


if __name__ == "__main__":
    sys.exit(memory_child_main(sys.argv[1:]))
