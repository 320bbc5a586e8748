"""Training step of `spae_fast.nn.VectorQuantize` against vector-quantize-pytorch's `VectorQuantize` (CPU).

One step = forward (search, EMA codebook update, rotation trick, commitment loss) + backward of
``(quantized * G).sum() + loss`` on x ``[batch, tokens, D]`` with vector-quantize-pytorch's defaults (EMA codebook,
decay 0.8, rotation trick), both layers built from the same seed (identical codebooks). Codebook sizes V and dims D
form a grid (default 1k / 16k / 65k / 262k x 64 / 256 / 1024; ``--quick``: 1k / 16k / 65k x 64 / 256).

Timing and peak memory as `harness.py` describes: one warm-up step per provider, then ``rounds`` interleaved
rounds, ratios per round then the median; "extra" peak memory = VmHWM - VmRSS of a fresh interpreter around one
step (after one warm-up step there), i.e. what the step needs beyond the layer and its inputs. Also measured for
spae_fast: the codebook-update share -- the EMA update + dead-code check (``EuclideanCodebook.update``) and the
re-packing of the search table (``spae_fast.Codebook``), against the fused search alone.

    .venv/bin/python benchmarks/bench_vq.py --quick          # writes benchmarks/results/bench_vq.{csv,md,png}
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (MIB, RESULTS, fmt, git_sha, interleaved_rounds, machine_info, markdown_table,  # noqa: E402
                     paired_median, proc_status_kib, pyplot, replace_markdown_section, reset_peak, run_child,
                     versions, write_csv)  # fmt: skip

PROVIDERS = ("vector-quantize-pytorch", "spae_fast.nn")
FULL_SIZES = (1024, 16384, 65536, 262144)
FULL_DIMS = (64, 256, 1024)
QUICK_SIZES = (1024, 16384, 65536)
QUICK_DIMS = (64, 256)
SECTION = "## Drop-in VectorQuantize layer (spae_fast.nn) vs vector-quantize-pytorch"


def build(provider: str, dim: int, size: int):
    torch.manual_seed(0)
    if provider == "spae_fast.nn":
        from spae_fast.nn import VectorQuantize
    else:
        from vector_quantize_pytorch import VectorQuantize
    return VectorQuantize(dim=dim, codebook_size=size)


def inputs(dim: int, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, tokens, dim, generator=g), torch.randn(batch, tokens, dim, generator=g)


def training_step(layer, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    quantized, indices, loss = layer(x)
    ((quantized * upstream).sum() + loss).backward()
    return indices


def update_share(dim: int, size: int, batch: int, tokens: int, rounds: int) -> dict:
    """spae_fast.nn only: seconds of the fused search, the EMA update and the re-pack, medians over rounds."""
    import spae_fast
    from spae_fast.nn import VectorQuantize

    torch.manual_seed(0)
    layer = VectorQuantize(dim=dim, codebook_size=size, threshold_ema_dead_code=2)
    book = layer._codebook
    flat = inputs(dim, batch, tokens)[0].reshape(-1, dim)
    packed = spae_fast.Codebook(book.embed[0])  # its own copy: the EMA update below rewrites book.embed
    index = spae_fast.nearest(flat, packed)[1]
    calls = {"search": lambda: spae_fast.nearest(flat, packed),
             "ema_update": lambda: book.update(flat, index),
             "repack": lambda: spae_fast.Codebook(book.embed[0], "l2", copy=False)}  # fmt: skip
    for call in calls.values():
        call()
    times, _ = interleaved_rounds(calls, rounds)
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------------------------------------
# Memory (fresh interpreter per provider and shape)
# ----------------------------------------------------------------------------------------------------------


def memory_child(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    layer = build(job["provider"], job["dim"], job["size"])
    x, upstream = inputs(job["dim"], job["batch"], job["tokens"])
    training_step(layer, x, upstream)  # thread pools, packing, one-time initialisation
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = proc_status_kib("VmRSS")
    method = "VmHWM after clear_refs" if reset_peak() else "unavailable"
    start = time.perf_counter()
    training_step(layer, x, upstream)
    seconds = time.perf_counter() - start
    peak = proc_status_kib("VmHWM")
    extra = (peak - before) * 1024 if method != "unavailable" else float("nan")
    return {"extra_bytes": extra, "seconds": seconds, "method": method}


# ----------------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------------


def run(args) -> list[dict]:
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    dims = QUICK_DIMS if args.quick else FULL_DIMS
    sizes = args.sizes or sizes
    dims = args.dims or dims
    rows = []
    for size in sizes:
        for dim in dims:
            print(f"V={size} D={dim} tokens={args.batch}x{args.tokens}", flush=True)
            x, upstream = inputs(dim, args.batch, args.tokens)
            layers = {p: build(p, dim, size) for p in PROVIDERS}
            calls = {p: (lambda layer=layers[p], x=x, upstream=upstream: training_step(layer, x, upstream))
                     for p in PROVIDERS}  # fmt: skip
            for call in calls.values():
                call()
            times, results = interleaved_rounds(calls, args.rounds, log=print)
            agree = float((results[PROVIDERS[0]] == results[PROVIDERS[1]]).float().mean())
            del layers, calls, results
            gc.collect()
            row = {"size": size, "dim": dim, "agree": agree,
                   **{f"{p}_s": statistics.median(times[p]) for p in PROVIDERS},
                   "speedup": paired_median(times[PROVIDERS[0]], times[PROVIDERS[1]])}  # fmt: skip
            if not args.no_memory:
                for provider in PROVIDERS:
                    job = {"provider": provider, "dim": dim, "size": size, "batch": args.batch, "tokens": args.tokens,
                           "threads": torch.get_num_threads()}  # fmt: skip
                    result = run_child(__file__, ["--child", json.dumps(job)], cwd=tempfile.gettempdir())
                    if "error" in result:
                        raise RuntimeError(f"memory child {provider} V={size} D={dim} failed: {result['error']}")
                    row[f"{provider}_mem"] = result["extra_bytes"]
                row["mem_ratio"] = row[f"{PROVIDERS[0]}_mem"] / max(row[f"{PROVIDERS[1]}_mem"], 1.0)
            share = update_share(dim, size, args.batch, args.tokens, args.rounds)
            row.update({f"{k}_s": v for k, v in share.items()})
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def report(rows: list[dict], args, info: dict) -> str:
    has_mem = not args.no_memory
    header = ["V", "D", "vqp step (s)", "spae_fast.nn step (s)", "speedup (paired median)"]
    header += ["vqp extra peak (MiB)", "spae_fast.nn extra peak (MiB)", "memory ratio"] if has_mem else []
    header += ["search (ms)", "EMA update + dead codes (ms)", "re-pack (ms)", "update share of search", "same indices"]
    table = []
    for r in rows:
        line = [r["size"], r["dim"], fmt(r[f"{PROVIDERS[0]}_s"], 3), fmt(r[f"{PROVIDERS[1]}_s"], 3), f"{r['speedup']:.1f}x"]
        if has_mem:
            line += [fmt(r[f"{PROVIDERS[0]}_mem"] / MIB), fmt(r[f"{PROVIDERS[1]}_mem"] / MIB), f"{r['mem_ratio']:.0f}x"]
        update = r["ema_update_s"] + r["repack_s"]
        line += [fmt(r["search_s"] * 1e3, 1), fmt(r["ema_update_s"] * 1e3, 1), fmt(r["repack_s"] * 1e3, 1),
                 f"{update / r['search_s']:.2f}", f"{100 * r['agree']:.2f}%"]  # fmt: skip
        table.append(line)
    lines = [
        SECTION, "",
        f"`benchmarks/bench_vq.py {' '.join(args.argv)}` (git {info['git']}): one training step (forward + backward, "
        f"EMA codebook, rotation trick: vector-quantize-pytorch's defaults) on x [{args.batch}, {args.tokens}, D], "
        f"{torch.get_num_threads()} thread(s), {args.rounds} interleaved rounds after a warm-up, speedup = median of "
        "per-round ratios; extra peak = VmHWM - VmRSS of a fresh interpreter around one step. The update columns "
        "time spae_fast.nn's codebook update alone (EMA + dead-code check, then re-packing the search table) "
        "against the fused search alone. \"same indices\": share of identical indices in the last timed step "
        "(both layers start from the same seed; EMA trajectories may drift apart after a near-tie).",
        "",
        f"Machine: {info['machine']}. Versions: {info['versions']}.",
        "",
        *markdown_table(header, table, align="rr" + "r" * (len(header) - 2)),
        "",
        "![bench_vq](benchmarks/results/bench_vq.png)",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, has_mem: bool) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 6, 4), squeeze=False)
    dims = sorted({r["dim"] for r in rows})
    for dim in dims:
        sub = [r for r in rows if r["dim"] == dim]
        sizes = [r["size"] for r in sub]
        axes[0][0].plot(sizes, [r["speedup"] for r in sub], marker="o", label=f"D={dim}")
        if has_mem:
            axes[0][1].plot(sizes, [r["mem_ratio"] for r in sub], marker="o", label=f"D={dim}")
    titles = ["training step: vqp time / spae_fast.nn time", "extra peak memory: vqp / spae_fast.nn"]
    for ax, title in zip(axes[0], titles):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("codebook size V")
        ax.set_title(title, fontsize=10)
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="V 1k/16k/65k x D 64/256")
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=None)
    parser.add_argument("--dims", type=lambda s: [int(v) for v in s.split(",")], default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-update-benchmarks-md", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(memory_child(json.loads(args.child))))
        return 0
    args.argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    flat = lambda d: ", ".join(f"{k} {v}" for k, v in d.items()) if isinstance(d, dict) else str(d)  # noqa: E731
    info = {"git": git_sha(), "machine": flat(machine_info()), "versions": flat(versions())}
    try:
        import vector_quantize_pytorch  # noqa: F401
        from importlib.metadata import version

        info["versions"] = f"{info['versions']}, vector-quantize-pytorch {version('vector-quantize-pytorch')}"
    except ImportError:
        parser.error("vector-quantize-pytorch is not installed (pip install vector-quantize-pytorch)")
    print(f"machine: {info['machine']}\nversions: {info['versions']}\ngit: {info['git']}", flush=True)
    rows = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_rows = []
    for r in rows:
        shape = f"V={r['size']},D={r['dim']},N={args.batch}x{args.tokens}"
        for key, value in r.items():
            if key not in ("size", "dim"):
                csv_rows.append({"op": "vq_training_step", "provider": "", "shape": shape, "dtype": "float32",
                                 "metric": key, "value": value, "device": "cpu", "versions": info["versions"],
                                 "git_sha": info["git"]})  # fmt: skip
    write_csv(args.out / "bench_vq.csv", csv_rows)
    section = report(rows, args, info)
    (args.out / "bench_vq.md").write_text(section, encoding="utf-8")
    plot(rows, args.out / "bench_vq.png", not args.no_memory)
    if not args.no_update_benchmarks_md:
        replace_markdown_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", SECTION, section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
