"""Fixtures of the `spae_fast.llm` tests: the tiny LMs of `_tiny_lms.py` (made importable here), the codebook
over model A's vocabulary, quantized images, and an `ImageVocabulary` per model."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _tiny_lms import GRID, LAYERS, WORDS, make_model, make_tokenizer

from spae_fast import SPAEQuantizer, VocabCodebook
from spae_fast.llm import FrozenLM, ImageVocabulary


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run single-threaded: their matmuls are microseconds, and on a busy 2-core machine
    OpenMP hand-offs between threads cost milliseconds per op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup():
    tokenizer_a = make_tokenizer(400)
    tokenizer_b = make_tokenizer(300)
    lm_a = FrozenLM(make_model(len(tokenizer_a), 0), tokenizer_a)
    lm_b = FrozenLM(make_model(len(tokenizer_b), 1), tokenizer_b)
    tokens = tokenizer_a.convert_ids_to_tokens(list(range(len(tokenizer_a))))
    wanted = set(WORDS)
    vocab = VocabCodebook(
        lm_a.model.get_input_embeddings().weight,
        tokens,
        token_filter=lambda t: t.startswith(" ") and t[1:] in wanted,
    )
    assert vocab.num_rows == len(WORDS)  # every word is one token of A
    quantizer = SPAEQuantizer(vocab, layers=LAYERS, grid=GRID)
    torch.manual_seed(0)
    latents = torch.randn(40, vocab.dim, GRID, GRID) * 0.02
    ids = quantizer.quantize(latents)  # [40, 21] codebook rows
    # 4 classes x 10 images; mix the quantized ids with random rows so images differ
    ids = torch.where(torch.rand(ids.shape) < 0.7, torch.randint(vocab.num_rows, ids.shape), ids)
    labels = torch.arange(40) % 4
    return {"lm_a": lm_a, "lm_b": lm_b, "vocab": vocab, "quantizer": quantizer, "ids": ids, "labels": labels,
            "names": ["zero", "one", "two", "three"]}  # fmt: skip


@pytest.fixture(scope="module")
def images_a(setup):
    return ImageVocabulary(setup["quantizer"], setup["lm_a"])


@pytest.fixture(scope="module")
def images_b(setup):
    return ImageVocabulary(setup["quantizer"], setup["lm_b"])
