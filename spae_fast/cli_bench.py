"""``spae-fast bench``: runs the nearest / top-k benchmark, ``benchmarks/bench_nearest.py``, of a source checkout.

The measuring harness is not installed with the package: it lives under ``benchmarks/`` of the source tree
(one benchmark per op, one shared harness module) and uses spae_fast as any user does, so the wheel carries no
benchmark code and the package imports nothing from it. This command finds the checkout at
``$SPAE_FAST_SOURCE`` (its root), else in the working directory or one of its parents, and runs the script
with this interpreter; every argument goes to the script (``spae-fast bench --help`` prints its options).
Without a checkout it fails and says where to get one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

SOURCE_ENV = "SPAE_FAST_SOURCE"
SCRIPT = Path("benchmarks") / "bench_nearest.py"


def find_script(start: str | os.PathLike | None = None) -> Path:
    """``benchmarks/bench_nearest.py`` of ``$SPAE_FAST_SOURCE``, else of ``start`` (default: the working
    directory) or its nearest parent that has one; FileNotFoundError with the way out otherwise."""
    root = os.environ.get(SOURCE_ENV)
    if root:
        script = Path(root).expanduser() / SCRIPT
        if script.is_file():
            return script.resolve()
        raise FileNotFoundError(f"${SOURCE_ENV}={root} has no {SCRIPT}: point it at the root of a source "
                                "checkout of spae_fast")  # fmt: skip
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / SCRIPT).is_file():
            return folder / SCRIPT
    raise FileNotFoundError(
        f"spae-fast bench runs {SCRIPT} from a source checkout of spae_fast (the benchmarks are not installed "
        f"with the package), and none was found in {here} or its parents. Run it inside a checkout (the "
        f"repository this package was built from, or its unpacked sdist), or set {SOURCE_ENV}=/path/to/checkout."
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("arguments", nargs=argparse.REMAINDER,
                        help=f"arguments of {SCRIPT} (--device cpu|cuda, --suite quick|default|full, --out DIR, "
                        "...; see spae-fast bench --help in a checkout)")  # fmt: skip


def run(argv: Sequence[str]) -> int:
    """Runs the benchmark script with ``argv``; its exit code (FileNotFoundError, which `spae_fast.cli` reports
    as one line with exit status 2, when there is no checkout)."""
    script = find_script()
    return subprocess.run([sys.executable, str(script), *argv], check=False).returncode
