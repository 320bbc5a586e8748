"""The machine and the versions this process runs on, as short strings: what ``spae-fast info`` prints and
what every benchmark report records next to its numbers (the machines are shared, so a number means little
without them)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch

GIB = 1 << 30


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


def meminfo_bytes(field: str) -> int | None:
    """A field of /proc/meminfo ("MemTotal", "MemAvailable", ...) in bytes; None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> dict[str, str]:
    """CPU model, cores, threads, memory, OS, Python and the load average (the machine is shared)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    total = meminfo_bytes("MemTotal")
    return {
        "cpu": _cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable} usable",
        "threads": str(torch.get_num_threads()),
        "memory": f"{(total if total is not None else float('nan')) / GIB:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average": load,
    }


def versions() -> dict[str, str]:
    """torch, numpy, spae_fast, the native micro-kernel's ISA and FAISS (the benchmarks' baseline)."""
    from . import __version__, _native

    found = {"torch": torch.__version__, "numpy": np.__version__, "spae_fast": __version__}
    found["isa"] = _native._C.get_isa() if _native._C is not None else "native module missing"
    try:
        import faiss

        found["faiss"] = faiss.__version__
    except ImportError:
        found["faiss"] = "not installed"
    return found
