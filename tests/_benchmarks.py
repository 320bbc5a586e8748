"""Imports the benchmark modules of this source checkout (benchmarks/, which is not installed with the package)
by their own names, as the scripts import each other; tests that need one skip where the folder is missing."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
BENCHMARKS = CHECKOUT / "benchmarks"


def load(name: str):
    """The module benchmarks/<name>.py."""
    if not (BENCHMARKS / f"{name}.py").is_file():
        pytest.skip(f"no {BENCHMARKS / name}.py (the tests run outside a source checkout)")
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)
