"""Training step of `spae_fast.nn.VectorQuantize` against vector-quantize-pytorch's `VectorQuantize` (CPU, or
``--device cuda``).

One step = forward (search, EMA codebook update, rotation trick, commitment loss) + backward of
``(quantized * G).sum() + loss`` on x ``[batch, tokens, D]`` with vector-quantize-pytorch's defaults (EMA codebook,
decay 0.8, rotation trick), both layers built from the same seed (identical codebooks). Codebook sizes V and dims D
form a grid (default 1k / 16k / 65k / 262k x 64 / 256 / 1024; ``--quick``: 1k / 16k / 65k x 64 / 256).

Timing and peak memory as `harness.py` describes: one warm-up step per provider, then ``rounds`` interleaved
rounds, ratios per round then the median; "extra" peak memory = VmHWM - VmRSS of a fresh interpreter around one
step (after one warm-up step there), i.e. what the step needs beyond the layer and its inputs (CUDA: the peak of
``torch.cuda.max_memory_allocated`` above the allocated bytes before the step). Also measured for spae_fast: the
codebook update against the fused search alone (`update_share`), in the order a training step runs them -- the EMA
update + dead-code check (``EuclideanCodebook.update``), re-packing the changed table into the search Codebook's
existing fp32 panels and its int8 pre-filter copy (``Codebook.repack_``, as ``search_codebook`` runs it).

    .venv/bin/python benchmarks/bench_vq.py --quick          # writes benchmarks/results/bench_vq.{csv,md,png}
    .venv/bin/python benchmarks/bench_vq.py --sizes 262144 --dims 1024 --rounds 1 --merge   # add / redo rows
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    MIB,
    RESULTS,
    cpu_peak_extra,
    cuda_peak_extra,
    fmt,
    git_sha,
    interleaved_rounds,
    machine_info,
    markdown_table,
    paired_median,
    pyplot,
    replace_markdown_section,
    run_child,
    versions,
    write_csv,
)

PROVIDERS = ("vector-quantize-pytorch", "spae_fast.nn")
FULL_SIZES = (1024, 16384, 65536, 262144)
FULL_DIMS = (64, 256, 1024)
QUICK_SIZES = (1024, 16384, 65536)
QUICK_DIMS = (64, 256)
SECTION = "## Drop-in VectorQuantize layer (spae_fast.nn) vs vector-quantize-pytorch"


def build(provider: str, dim: int, size: int, device: str = "cpu"):
    torch.manual_seed(0)
    if provider == "spae_fast.nn":
        from spae_fast.nn import VectorQuantize
    else:
        from vector_quantize_pytorch import VectorQuantize
    return VectorQuantize(dim=dim, codebook_size=size).to(device)


def inputs(dim: int, batch: int, tokens: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, upstream = torch.randn(batch, tokens, dim, generator=g), torch.randn(batch, tokens, dim, generator=g)
    return x.to(device), upstream.to(device)


def training_step(layer, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    quantized, indices, loss = layer(x)
    ((quantized * upstream).sum() + loss).backward()
    return indices


def synchronizer(device: str):
    return torch.cuda.synchronize if device == "cuda" else None


def update_share(dim: int, size: int, batch: int, tokens: int, rounds: int, device: str = "cpu") -> dict:
    """spae_fast.nn only: seconds of the fused search and of each part of the codebook update, in the order of a
    training step, medians over rounds: the EMA update (+ dead-code check), re-packing the changed table into
    the search Codebook's existing fp32 panels and re-deriving its int8 pre-filter copy into its existing
    storage: the two halves of ``Codebook.repack_``, which ``EuclideanCodebook.search_codebook`` calls after
    each update (nothing to pack on CUDA)."""
    import spae_fast
    from spae_fast.nn import VectorQuantize
    from spae_fast.ops import common

    torch.manual_seed(0)
    layer = VectorQuantize(dim=dim, codebook_size=size, threshold_ema_dead_code=2).to(device)
    book = layer._codebook
    flat = inputs(dim, batch, tokens, device)[0].reshape(-1, dim)
    used = spae_fast.Codebook(book.embed[0], book.metric)  # its own copy: the EMA update rewrites book.embed
    index = spae_fast.nearest(flat, used)[1]
    live = book.search_codebook()  # shares book.embed, as in training
    spae_fast.nearest(flat, live)  # builds its int8 copy (CPUs with the pre-filter)

    def repack():
        if live.cpu_panels is not None:
            common.pack_codebook_into(book.embed[0], book.metric, live.cpu_panels, live.cpu_bias)

    def int8_pack():
        old = live._derived.get("int8_prefilter")
        if old is not None:
            live._derived["int8_prefilter"] = common._refresh_int8(live, old)

    calls = {
        "search": lambda: spae_fast.nearest(flat, used),
        "ema_update": lambda: book.update(flat, index),
        "repack": repack,
        "int8_pack": int8_pack,
    }
    for call in calls.values():
        call()
    times, _ = interleaved_rounds(calls, rounds, rotate=False, sync=synchronizer(device))
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------------------------------------
# Memory (fresh interpreter per provider and shape)
# ----------------------------------------------------------------------------------------------------------


def memory_cuda(provider: str, dim: int, size: int, batch: int, tokens: int) -> float:
    """Peak CUDA bytes of one training step beyond those allocated before it (after a warm-up step)."""
    layer = build(provider, dim, size, "cuda")
    x, upstream = inputs(dim, batch, tokens, "cuda")
    training_step(layer, x, upstream)
    gc.collect()
    torch.cuda.empty_cache()
    return float(cuda_peak_extra(lambda: training_step(layer, x, upstream), 0))


def memory_child(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    layer = build(job["provider"], job["dim"], job["size"])
    x, upstream = inputs(job["dim"], job["batch"], job["tokens"])
    training_step(layer, x, upstream)  # thread pools, packing, one-time initialisation
    return cpu_peak_extra(lambda: training_step(layer, x, upstream))


# ----------------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------------


def run(args, on_row=None) -> list[dict]:
    """Measure every (V, D) of the grid; ``on_row(rows)`` after each (the results so far are saved, so a run
    stopped by a timeout keeps its finished rows)."""
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    dims = QUICK_DIMS if args.quick else FULL_DIMS
    sizes = args.sizes or sizes
    dims = args.dims or dims
    sync = synchronizer(args.device)
    rows = []
    for size in sizes:
        for dim in dims:
            print(f"V={size} D={dim} tokens={args.batch}x{args.tokens} device={args.device}", flush=True)
            x, upstream = inputs(dim, args.batch, args.tokens, args.device)
            layers = {p: build(p, dim, size, args.device) for p in PROVIDERS}
            calls = {p: (lambda layer=layers[p], x=x, upstream=upstream: training_step(layer, x, upstream))
                     for p in PROVIDERS}  # fmt: skip
            for call in calls.values():
                call()
            times, results = interleaved_rounds(calls, args.rounds, log=print, sync=sync)
            agree = float((results[PROVIDERS[0]] == results[PROVIDERS[1]]).float().mean())
            del layers, calls, results
            gc.collect()
            row = {"size": size, "dim": dim, "agree": agree, "rounds": args.rounds,
                   **{f"{p}_s": statistics.median(times[p]) for p in PROVIDERS},
                   "speedup": paired_median(times[PROVIDERS[0]], times[PROVIDERS[1]])}  # fmt: skip
            if not args.no_memory:
                for provider in PROVIDERS:
                    row[f"{provider}_mem"] = memory(provider, dim, size, args)
                row["mem_ratio"] = row[f"{PROVIDERS[0]}_mem"] / max(row[f"{PROVIDERS[1]}_mem"], 1.0)
            share = update_share(dim, size, args.batch, args.tokens, args.rounds, args.device)
            row.update({f"{k}_s": v for k, v in share.items()})
            print(json.dumps(row), flush=True)
            rows.append(row)
            if on_row is not None:
                on_row(rows)
    return rows


def memory(provider: str, dim: int, size: int, args) -> float:
    """Extra peak bytes of one training step: in a fresh interpreter on the CPU, in-process on CUDA."""
    if args.device == "cuda":
        return memory_cuda(provider, dim, size, args.batch, args.tokens)
    job = {"provider": provider, "dim": dim, "size": size, "batch": args.batch, "tokens": args.tokens,
           "threads": torch.get_num_threads()}  # fmt: skip
    result = run_child(__file__, ["--child", json.dumps(job)], cwd=tempfile.gettempdir())
    if "error" in result:
        raise RuntimeError(f"memory child {provider} V={size} D={dim} failed: {result['error']}")
    return result["extra_bytes"]


def shape_key(size: int, dim: int, args) -> str:
    return f"V={size},D={dim},N={args.batch}x{args.tokens}"


def earlier_rows(path: Path, args) -> list[dict]:
    """The rows of an earlier run in ``path`` (its long CSV) of the same device and token count (for --merge)."""
    kept: dict[str, dict] = {}
    if path.is_file():
        with open(path, newline="") as handle:
            for line in csv.DictReader(handle):
                if line["op"] != "vq_training_step" or line["device"] != args.device:
                    continue
                row = kept.setdefault(line["shape"], {"_git": line["git_sha"], "_command": line["note"]})
                row[line["metric"]] = float(line["value"])
    rows = []
    for shape, row in kept.items():
        parts = dict(item.split("=") for item in shape.split(","))
        if parts["N"] == f"{args.batch}x{args.tokens}":
            row.update(size=int(parts["V"]), dim=int(parts["D"]))
            row.setdefault("rounds", float("nan"))
            rows.append(row)
    return rows


def update_cost(row: dict) -> float:
    """Seconds of the codebook update of one step: EMA + dead codes, fp32 re-pack, int8 pre-filter copy."""
    return row["ema_update_s"] + row["repack_s"] + row["int8_pack_s"]


def report(rows: list[dict], args, info: dict) -> str:
    has_mem = all(f"{PROVIDERS[1]}_mem" in r for r in rows)
    header = ["V", "D", "rounds", "vqp step (s)", "spae_fast.nn step (s)", "speedup (paired median)"]
    header += ["vqp extra peak (MiB)", "spae_fast.nn extra peak (MiB)", "memory ratio"] if has_mem else []
    header += ["search (ms)", "EMA update + dead codes (ms)", "fp32 re-pack (ms)", "int8 re-pack (ms)",
               "update / search", "same indices"]  # fmt: skip
    table = []
    for r in rows:
        rounds = "?" if r["rounds"] != r["rounds"] else int(r["rounds"])
        line = [int(r["size"]), int(r["dim"]), rounds, fmt(r[f"{PROVIDERS[0]}_s"], 3), fmt(r[f"{PROVIDERS[1]}_s"], 3),
                f"{r['speedup']:.1f}x"]  # fmt: skip
        if has_mem:
            line += [
                fmt(r[f"{PROVIDERS[0]}_mem"] / MIB),
                fmt(r[f"{PROVIDERS[1]}_mem"] / MIB),
                f"{r['mem_ratio']:.0f}x",
            ]
        line += [fmt(r["search_s"] * 1e3, 1), fmt(r["ema_update_s"] * 1e3, 1), fmt(r["repack_s"] * 1e3, 1),
                 fmt(r["int8_pack_s"] * 1e3, 1), f"{update_cost(r) / r['search_s']:.2f}",
                 f"{100 * r['agree']:.2f}%"]  # fmt: skip
        table.append(line)
    runs = {}  # command -> git of the run that measured the rows, in row order
    for r in rows:
        runs.setdefault(
            r.get("_command", f"benchmarks/bench_vq.py {' '.join(args.argv)}"), r.get("_git", info["git"])
        )
    lines = [
        SECTION, "",
        ("; ".join(f"`{command}` (git {git})" for command, git in runs.items()) + f", device {args.device}: one training step "
        f"(forward + backward, EMA codebook, rotation trick: vector-quantize-pytorch's defaults) on x [{args.batch}, "
        f"{args.tokens}, D], {torch.get_num_threads()} thread(s), \"rounds\" interleaved rounds after a warm-up, "
        "speedup = median of per-round ratios; extra peak = VmHWM - VmRSS of a fresh interpreter around one step "
        "(CUDA: max_memory_allocated above the bytes allocated before it). Targets: at V >= 16k, >= 5x faster and "
        ">= 20x less extra peak memory; at V = 1k, no slower. The update columns time spae_fast.nn's codebook update "
        f"alone, as a step runs it on N = {args.batch * args.tokens} rows: the EMA update + dead-code check "
        "(threshold 2), re-packing the changed table into the search Codebook's existing fp32 panels and its int8 "
        "pre-filter copy (Codebook.repack_, in place), against the search alone; "
        "\"update / search\" = their sum over the search. \"same indices\": share of "
        "identical indices in the last timed step (both layers start from the same seed; EMA trajectories may "
        "drift apart after a near-tie)."),
        "",
        (f"Machine (shared with other jobs: see its load average; hence interleaved rounds and paired ratios): "
        f"{info['machine']}. Versions: {info['versions']}."),
        "",
        *markdown_table(header, table, align="r" * len(header)),
        "",
        "![bench_vq](benchmarks/results/bench_vq.png)",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, has_mem: bool) -> None:
    plt = pyplot()
    panels = 3 if has_mem else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    titles = ["training step: vqp time / spae_fast.nn time"]
    titles += ["extra peak memory: vqp / spae_fast.nn"] if has_mem else []
    titles += ["spae_fast.nn codebook update / search"]
    for dim in sorted({r["dim"] for r in rows}):
        sub = [r for r in rows if r["dim"] == dim]
        sizes = [r["size"] for r in sub]
        series = [[r["speedup"] for r in sub]]
        series += [[r["mem_ratio"] for r in sub]] if has_mem else []
        series += [[update_cost(r) / r["search_s"] for r in sub]]
        for ax, values in zip(axes[0], series):
            ax.plot(sizes, values, marker="o", label=f"D={int(dim)}")
    targets = [5.0] + ([20.0] if has_mem else []) + [0.25]
    for ax, title, target in zip(axes[0], titles, targets):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(target, color="gray", lw=0.8, ls="--", label=f"target {target:g} (V >= 16k)")
        ax.set_xlabel("codebook size V")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(v) for v in text.split(",")]
    parser.add_argument("--quick", action="store_true", help="V 1k/16k/65k x D 64/256")
    parser.add_argument("--sizes", type=ints, default=None, help="codebook sizes V, comma-separated")
    parser.add_argument("--dims", type=ints, default=None, help="dims D, comma-separated")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: GPU rows (results bench_vq_cuda.*, their own BENCHMARKS.md section)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true",
                        help="keep the other (V, D) rows of the previous run's CSV in --out (same device, tokens)")  # fmt: skip
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-update-benchmarks-md", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("rounds", "batch", "tokens", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(v < 1 for v in (args.sizes or []) + (args.dims or [])):
        parser.error("--sizes and --dims must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return parser, args


def output_names(device: str) -> tuple[str, str]:
    """(file stem under --out, BENCHMARKS.md heading) of a device's results."""
    if device == "cuda":
        return "bench_vq_cuda", SECTION + " on CUDA"
    return "bench_vq", SECTION


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.child:
        print(json.dumps(memory_child(json.loads(args.child))))
        return 0
    torch.set_num_threads(args.threads)
    flat = lambda d: ", ".join(f"{k} {v}" for k, v in d.items()) if isinstance(d, dict) else str(d)
    info = {"git": git_sha(), "machine": flat(machine_info()), "versions": flat(versions())}
    if args.device == "cuda":
        info["machine"] += f", GPU {torch.cuda.get_device_name()}"
    try:
        from importlib.metadata import version

        import vector_quantize_pytorch  # noqa: F401

        info["versions"] = f"{info['versions']}, vector-quantize-pytorch {version('vector-quantize-pytorch')}"
    except ImportError:
        parser.error("vector-quantize-pytorch is not installed (pip install vector-quantize-pytorch)")
    print(f"machine: {info['machine']}\nversions: {info['versions']}\ngit: {info['git']}", flush=True)
    stem, heading = output_names(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    earlier = earlier_rows(args.out / f"{stem}.csv", args) if args.merge else []
    command = f"benchmarks/bench_vq.py {' '.join(args.argv)}"
    sections = []

    def save(rows: list[dict]) -> None:
        for row in rows:
            row.setdefault("_git", info["git"])
            row.setdefault("_command", command)
        new = {(r["size"], r["dim"]) for r in rows}
        rows = sorted(
            [r for r in earlier if (r["size"], r["dim"]) not in new] + rows,
            key=lambda r: (r["size"], r["dim"]),
        )
        csv_rows = []
        for r in rows:
            for key, value in r.items():
                if key not in ("size", "dim") and not key.startswith("_"):
                    csv_rows.append({"op": "vq_training_step", "provider": "", "shape": shape_key(r["size"], r["dim"], args),
                                     "dtype": "float32", "metric": key, "value": value, "device": args.device,
                                     "versions": info["versions"], "git_sha": r["_git"], "note": r["_command"]})  # fmt: skip
        write_csv(args.out / f"{stem}.csv", csv_rows)
        section = report(rows, args, info).replace(SECTION, heading, 1).replace("bench_vq.png", f"{stem}.png")
        (args.out / f"{stem}.md").write_text(section, encoding="utf-8")
        plot(rows, args.out / f"{stem}.png", all(f"{PROVIDERS[1]}_mem" in r for r in rows))
        if not args.no_update_benchmarks_md:
            replace_markdown_section(
                Path(__file__).resolve().parent.parent / "BENCHMARKS.md", heading, section
            )
        sections[:] = [section]

    run(args, on_row=save)
    print(sections[0] if sections else "no rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
