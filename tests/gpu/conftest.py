"""GPU tests: everything under tests/gpu is marked `gpu` and skipped when torch sees no usable CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

GPU_TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    # A conftest hook sees every collected item, so select this folder's tests by path.
    ready = torch.cuda.is_available()
    for item in items:
        if GPU_TESTS not in Path(item.path).resolve().parents:
            continue
        item.add_marker(pytest.mark.gpu)
        if not ready:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)"))
