"""GPU benchmark of spae_fast's fused kernels (backends "cuda" and "triton") against torch / FAISS baselines.

Run by benchmarks/gpu_check.sh after the GPU tests; every number of one table comes from one process on one
GPU, so the ratios (not the absolute times) are what the issue's targets are about:

    target                                                          ratio checked
    bf16  N=65536 V=128256 D=4096                                   best spae / torch.matmul GEMM alone >= 0.90 (throughput)
    bf16  D <= 1024 (V=32000 D=1024, V=49152 D=576)                 best spae vs torch chunked bf16 matmul+argmin >= 2
    exact mode (bf16)                                               exact time / plain bf16 time <= 1.10
    fp32 exact                                                      vs torch fp32 chunked matmul+argmin >= 5
    SAQ 6 layers fused                                              vs 6 separate nearest calls >= 1.5
    peak extra memory                                               O(N): reported in bytes per query

Providers: ``torch_matmul`` (x @ E^T into a preallocated N x V buffer: the cuBLAS GEMM roofline),
``torch_chunked`` ((||e||^2 - 2 x_c E^T).argmin per query chunk, best of a few chunk sizes, bf16 or fp32 with
TF32 off), ``torch_cdist`` (cdist + argmin, only where N x V fits), ``faiss_knn`` (faiss.knn_gpu k=1, when a
FAISS GPU build is importable), ``spae_<backend>`` (nearest, default precision), ``spae_<backend>_exact``.
Timing: CUDA events, warm-up then the median of ``--repeats`` runs. Output: a markdown table on stdout and
in ``--out``/gpu_<gpu>_<time>.md, and long-format CSV rows (op, provider, shape, dtype, metric, value, device,
versions, git sha) in the .csv next to it. ``--ops nearest,saq`` picks the cases (``bench_nearest.py`` and
``bench_quantizer.py`` run theirs with ``--device cuda``); ``--tune`` sweeps Triton tile configurations on one
shape.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
from harness import cuda_median_ms as timed
from harness import cuda_peak_extra as peak_extra
from harness import git_sha, replace_markdown_section, write_csv

import spae_fast
from spae_fast.ops import gpu_saq

DEVICE = torch.device("cuda")


def table(num_rows: int, dim: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(num_rows, dim, generator=g, device=DEVICE) * 0.02).to(dtype)


def queries(weight: torch.Tensor, num: int, seed: int = 1) -> torch.Tensor:
    """Half: table rows plus noise (an encoder output near a word); half: between two words."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    e = weight.float()
    first = torch.randint(0, e.shape[0], (num,), generator=g, device=DEVICE)
    second = torch.randint(0, e.shape[0], (num,), generator=g, device=DEVICE)
    t = torch.rand(num, 1, generator=g, device=DEVICE) * 0.4 + 0.3
    near = e[first] + 0.3 * 0.02 * torch.randn(num, e.shape[1], generator=g, device=DEVICE)
    between = e[first] + t * (e[second] - e[first])
    return torch.where((torch.arange(num, device=DEVICE) % 2 == 0)[:, None], near, between).to(weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------------------


def torch_chunked(x, weight, chunk, buffer):
    """(||e||^2 - 2 x_c E^T).argmin(1) per chunk, one addmm in the input dtype (TF32 off for fp32)."""
    norm = (weight.float() ** 2).sum(-1).to(x.dtype)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=DEVICE)

    def run():
        for start in range(0, x.shape[0], chunk):
            stop = min(start + chunk, x.shape[0])
            scores = torch.addmm(norm, x[start:stop], weight.T, alpha=-2.0, out=buffer[: stop - start])
            out[start:stop] = scores.argmin(1)
        return out

    return run


def best_chunked(x, weight, repeats):
    best = None
    for chunk in (2048, 8192):
        chunk = min(chunk, x.shape[0])
        buffer = torch.empty(chunk, weight.shape[0], dtype=x.dtype, device=DEVICE)
        ms = timed(torch_chunked(x, weight, chunk, buffer), repeats)
        if best is None or ms < best[0]:
            best = (ms, chunk)
        del buffer
    return best


def faiss_gpu_knn():
    try:
        import faiss
        import faiss.contrib.torch_utils

        if not hasattr(faiss, "StandardGpuResources"):
            return None, "faiss has no GPU support (faiss-cpu)"
        resources = faiss.StandardGpuResources()
        return (lambda x, e: faiss.knn_gpu(resources, x, e, 1)), ""
    except ImportError as error:
        return None, f"faiss not importable ({error})"


# ----------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------


class Report:
    def __init__(self, device_name: str, versions: str, sha: str):
        self.rows: list[dict] = []
        self.csv: list[dict] = []
        self.device, self.versions, self.sha = device_name, versions, sha
        self.targets: list[tuple[str, float | None, str, bool | None]] = []

    def add(self, case, provider, ms, flops, shape, dtype, note="", extra_bytes=None, rows=None):
        tflops = flops / ms / 1e9 if ms else float("nan")
        per_row = None if extra_bytes is None or not rows else extra_bytes / rows
        row = {"case": case, "provider": provider, "ms": ms, "tflops": tflops, "shape": shape, "dtype": dtype,
               "note": note, "extra": extra_bytes, "per_row": per_row}  # fmt: skip
        self.rows.append(row)
        for metric, value in (("ms", ms), ("tflops", tflops), ("extra_bytes", extra_bytes)):
            if value is not None:
                self.csv.append({"op": case, "provider": provider, "shape": shape, "dtype": dtype, "metric": metric,
                                 "value": value, "device": self.device, "versions": self.versions,
                                 "git_sha": self.sha})  # fmt: skip
        print(f"  {case:28s} {provider:22s} {ms:10.3f} ms {tflops:8.1f} TFLOP/s {note}", flush=True)
        return ms

    def target(self, name, ratio, goal, higher_is_better=True):
        ok = None if ratio is None else (ratio >= goal if higher_is_better else ratio <= goal)
        self.targets.append((name, ratio, f"{'>=' if higher_is_better else '<='} {goal}", ok))

    def markdown(self) -> str:
        lines = [f"GPU: **{self.device}**; {self.versions}; git {self.sha}", "",
                 "| case | provider | shape | dtype | ms | TFLOP/s | extra MiB | extra B/query | note |",
                 "|---|---|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
        for r in self.rows:
            extra = "" if r["extra"] is None else f"{r['extra'] / 2**20:.1f}"
            per_row = "" if r["per_row"] is None else f"{r['per_row']:.0f}"
            lines.append(f"| {r['case']} | {r['provider']} | {r['shape']} | {r['dtype']} | {r['ms']:.3f} | "
                         f"{r['tflops']:.1f} | {extra} | {per_row} | {r['note']} |")  # fmt: skip
        lines += ["", "| target | measured | goal | met |", "|---|---:|---|---|"]
        for name, ratio, goal, ok in self.targets:
            shown = "n/a" if ratio is None else f"{ratio:.2f}"
            lines.append(
                f"| {name} | {shown} | {goal} | {'n/a' if ok is None else ('yes' if ok else 'NO')} |"
            )
        return "\n".join(lines)


def spae_providers(backends):
    return [(b, f"spae_{b}") for b in backends]


def case_nearest(
    report, backends, num, num_rows, dim, dtype, repeats, *, gemm=True, exact=True, cdist=False, faiss=None
):
    name = f"nearest V={num_rows} D={dim}"
    shape = f"N={num} V={num_rows} D={dim}"
    dt = str(dtype).removeprefix("torch.")
    flops = 2.0 * num * num_rows * dim
    weight = table(num_rows, dim, dtype)
    x = queries(weight, num)
    codebook = spae_fast.Codebook(weight)
    results = {}
    if gemm:
        buffer = torch.empty(num, num_rows, dtype=dtype, device=DEVICE)
        previous = torch.backends.cuda.matmul.allow_tf32
        results["gemm"] = report.add(name, "torch_matmul", timed(lambda: torch.mm(x, weight.T, out=buffer), repeats),
                                     flops, shape, dt, "GEMM alone (roofline)")  # fmt: skip
        torch.backends.cuda.matmul.allow_tf32 = previous
        del buffer
    torch.cuda.empty_cache()
    ms, chunk = best_chunked(x, weight, repeats)
    results["chunked"] = report.add(name, "torch_chunked", ms, flops, shape, dt, f"chunk {chunk}")
    if cdist and num * num_rows * 4 < 8 * 2**30:
        results["cdist"] = report.add(name, "torch_cdist", timed(lambda: torch.cdist(x.float(), weight.float()).argmin(1), repeats),
                                      flops, shape, dt)  # fmt: skip
    if faiss is not None:
        run, _ = faiss
        if run is not None and dtype == torch.float32:
            results["faiss"] = report.add(
                name, "faiss_knn_gpu", timed(lambda: run(x, weight), repeats), flops, shape, dt
            )
    for backend, provider in spae_providers(backends):
        call = lambda b=backend: spae_fast.nearest(x, codebook, backend=b, check_finite=False)
        ms = timed(call, repeats)
        extra = peak_extra(call, num * 12)
        results[provider] = report.add(name, provider, ms, flops, shape, dt, "", extra, num)
        if exact:
            call = lambda b=backend: spae_fast.nearest(
                x, codebook, backend=b, check_finite=False, precision="exact"
            )
            ms = timed(call, repeats)
            stats = spae_fast.last_search_stats()
            note = f"rescored {stats.rows_rescored}/{stats.rows} rows, full scan {stats.rows_full_scan}"
            results[provider + "_exact"] = report.add(name, provider + "_exact", ms, flops, shape, dt, note,
                                                      peak_extra(call, num * 12), num)  # fmt: skip
    return results


def best_of(results, backends, suffix=""):
    times = {b: results[f"spae_{b}{suffix}"] for b in backends if f"spae_{b}{suffix}" in results}
    if not times:
        return None, None
    backend = min(times, key=times.get)
    return backend, times[backend]


def case_saq(report, backends, batch, num_rows, dim, repeats):
    name = f"saq 6 layers V={num_rows} D={dim}"
    shape = f"B={batch} g=16 V={num_rows} D={dim}"
    weight = table(num_rows, dim, torch.bfloat16)
    codebook = spae_fast.Codebook(weight)
    z = torch.randn(batch, dim, 16, 16, device=DEVICE) * 0.02
    sides = [1, 2, 4, 8, 16, 16]
    tokens = sum(s * s for s in sides)
    flops = 2.0 * batch * tokens * num_rows * dim
    out = {}
    for backend, provider in spae_providers(backends):
        fused = lambda b=backend: spae_fast.saq(z, codebook, backend=b)
        out[f"fused_{backend}"] = report.add(name, provider + "_fused", timed(fused, repeats), flops, shape, "bf16",
                                             "one search + one rescoring launch per layer",
                                             peak_extra(fused, batch * tokens * 8), batch * tokens)  # fmt: skip

        def separate(b=backend):
            """6 separate nearest calls; targets formed by torch between them (as the reference does)."""
            firsts = [0]
            for side in sides:
                firsts.append(firsts[-1] + side * side)
            ids = torch.zeros(batch, tokens, dtype=torch.int64, device=DEVICE)
            for layer, side in enumerate(sides):
                rows = torch.arange(batch * side * side, device=DEVICE)
                targets = gpu_saq._saq_targets(z, weight, ids, sides, firsts, layer, float(layer + 1), rows)
                _, index = spae_fast.nearest(
                    targets, codebook, backend=b, check_finite=False, precision="exact"
                )
                ids[:, firsts[layer] : firsts[layer + 1]] = index.view(batch, side * side)
            return ids

        out[f"separate_{backend}"] = report.add(name, provider + "_6_nearest", timed(separate, repeats), flops, shape,
                                                "bf16", "6 nearest(precision='exact') calls")  # fmt: skip
    return out


def tune(args):
    """Sweep Triton tile configurations on one shape (SPAE_FAST_TRITON_CONFIG)."""
    weight = table(args.tune_rows, args.tune_dim, torch.bfloat16)
    x = queries(weight, args.tune_n)
    codebook = spae_fast.Codebook(weight)
    configs = ["128,128,64,8,3", "128,128,64,8,4", "128,256,64,8,3", "256,128,64,8,3", "128,128,32,4,4",
               "64,128,64,4,4", "128,64,64,4,4"]  # fmt: skip
    for config in configs:
        os.environ["SPAE_FAST_TRITON_CONFIG"] = config
        try:
            ms = timed(
                lambda: spae_fast.nearest(x, codebook, backend="triton", check_finite=False), args.repeats
            )
            print(
                f"  triton config {config:18s} {ms:9.3f} ms  {2.0 * x.shape[0] * weight.shape[0] * weight.shape[1] / ms / 1e9:8.1f} TFLOP/s"
            )
        except Exception as error:  # noqa: BLE001  (a config that does not fit this GPU)
            print(f"  triton config {config:18s} failed: {type(error).__name__}: {error}")
    os.environ.pop("SPAE_FAST_TRITON_CONFIG", None)


SECTION = "## GPU kernels"


def update_benchmarks_md(markdown: str) -> str:
    """Replaces the "## GPU kernels" section of BENCHMARKS.md (creating the file or section if needed)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")
    section = (
        f"{SECTION}\n\nbenchmarks/gpu_check.sh (benchmarks/bench_gpu.py); one process, one GPU; ratios within the "
        f"run are what the targets check.\n\n{markdown}\n"
    )
    replace_markdown_section(path, SECTION, section)
    return path


def nearest_cases(report: Report, backends: list[str], scale: int, repeats: int) -> None:
    """The nearest / top-k cases and their targets (also `bench_nearest.py --device cuda`)."""
    big = case_nearest(report, backends, 65536 // scale, 128256, 4096, torch.bfloat16, repeats)
    _, ms = best_of(big, backends)
    report.target(
        "bf16 65536x128256x4096: spae / cuBLAS GEMM throughput", big["gemm"] / ms if ms else None, 0.90
    )
    _, exact_ms = best_of(big, backends, "_exact")
    report.target("bf16 exact / plain time (D=4096)", exact_ms / ms if ms and exact_ms else None, 1.10, False)

    for num_rows, dim in ((32000, 1024), (49152, 576)):
        res = case_nearest(report, backends, 65536 // scale, num_rows, dim, torch.bfloat16, repeats, cdist=False)
        _, ms = best_of(res, backends)
        report.target(
            f"bf16 V={num_rows} D={dim}: vs torch chunked bf16", res["chunked"] / ms if ms else None, 2.0
        )
        _, exact_ms = best_of(res, backends, "_exact")
        report.target(f"bf16 exact / plain time (V={num_rows} D={dim})", exact_ms / ms if ms and exact_ms else None,
                      1.10, False)  # fmt: skip

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 baselines in true fp32
    fp32 = case_nearest(report, backends, 65536 // scale, 32000, 1024, torch.float32, repeats, cdist=False,
                        faiss=faiss_gpu_knn())  # fmt: skip
    _, exact_ms = best_of(fp32, backends, "_exact")
    report.target("fp32 exact vs torch fp32 chunked", fp32["chunked"] / exact_ms if exact_ms else None, 5.0)
    case_nearest(report, backends, 8192 // scale, 32000, 1024, torch.float32, repeats, gemm=False, exact=False,
                 cdist=True)  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = previous

    for label, results in (("bf16 D=4096", big), ("fp32 D=1024 exact", fp32)):
        times = {b: results.get(f"spae_{b}") for b in backends}
        if len(backends) == 2 and all(times.values()):
            faster = min(times, key=times.get)
            print(f"faster backend ({label}): {faster}  ({times})")
    major = torch.cuda.get_device_capability(DEVICE)[0]
    if backends:
        chosen, _ = best_of(big, backends)
        print(f"measured auto table entry: AUTO_BACKEND_BY_CAPABILITY[{major}] = {chosen!r}")


def saq_cases(report: Report, backends: list[str], scale: int, repeats: int) -> None:
    """The fused SAQ case and its target (also `bench_quantizer.py --device cuda`)."""
    saq = case_saq(report, backends, 256 // scale, 32000, 1024, max(1, repeats - 1))
    ratios = [saq[f"separate_{b}"] / saq[f"fused_{b}"] for b in backends]
    report.target("SAQ 6 layers fused vs 6 separate nearest", max(ratios) if ratios else None, 1.5)


OPS = {"nearest": nearest_cases, "saq": saq_cases}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated ops to run (default: {','.join(OPS)})")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    parser.add_argument("--tune", action="store_true", help="sweep Triton configurations and exit")
    parser.add_argument(
        "--update-benchmarks-md", action="store_true", help='replace the "GPU kernels" section'
    )
    parser.add_argument("--tune-n", type=int, default=16384)
    parser.add_argument("--tune-rows", type=int, default=128256)
    parser.add_argument("--tune-dim", type=int, default=4096)
    args = parser.parse_args(argv)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    if set(ops) - set(OPS):
        parser.error(f"--ops: unknown {sorted(set(ops) - set(OPS))}; choose from {', '.join(OPS)}")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 1
    if args.tune:
        tune(args)
        return 0
    device_name = torch.cuda.get_device_name(DEVICE)
    import importlib.metadata as md

    try:
        triton_version = md.version("triton")
    except md.PackageNotFoundError:
        triton_version = "none"
    versions = f"torch {torch.__version__}, triton {triton_version}, CUDA {torch.version.cuda}, spae_fast {spae_fast.__version__}"
    report = Report(device_name, versions, git_sha())
    backends = [b for b in ("cuda", "triton") if spae_fast.available()[b].available]
    print(f"GPU {device_name}; {versions}; backends {backends}; ops {ops}", flush=True)
    scale = 8 if args.quick else 1
    for op in ops:
        OPS[op](report, backends, scale, args.repeats)

    markdown = report.markdown()
    print("\n" + markdown)
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(args.out, f"gpu_{device_name.replace(' ', '_')}_{stamp}")
    with open(base + ".md", "w") as f:
        f.write(markdown + "\n")
    write_csv(base + ".csv", report.csv, list(report.csv[0]))
    print(f"\nwrote {base}.md and {base}.csv")
    if args.update_benchmarks_md:
        print(f"updated {update_benchmarks_md(markdown)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
