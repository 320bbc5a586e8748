"""spae_fast.llm.generation: progressive in-context generation (steps, denoising, corruption, context
length)."""

from __future__ import annotations

import itertools

import pytest
import torch
from _tiny_lms import GRID, LAYERS, assert_unchanged, snapshot

from spae_fast.llm import corrupt_ids, denoise, denoising_rates, generation_steps

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def test_generation_steps():
    from spae_fast.pyramid import TokenPyramid

    pyramid = TokenPyramid(LAYERS, GRID)
    assert generation_steps(pyramid, 3) == [(0, 1, 1), (1, 5, 2), (5, 21, 3)]
    assert generation_steps(pyramid, 3, chunk_size=3) == [
        (0, 1, 1), (1, 4, 2), (4, 5, 2), (5, 8, 3), (8, 11, 3), (11, 14, 3), (14, 17, 3), (17, 20, 3), (20, 21, 3)
    ]  # fmt: skip


def brute_force_ids_generation(images, examples, num_layers):
    """Reference for greedy ids-mode generation: a full forward per token, logits restricted to the codebook."""
    lm, vocab, pyramid = images.lm, images.vocab, images.pyramid
    generated = []
    for start, end, _ in generation_steps(pyramid, num_layers):
        for position in range(start, end):
            prompt = list(lm.special_prefix)
            for _, target in examples:
                prompt += lm.piece("Input:") + vocab.token_ids[target[:end]].tolist() + lm.piece("\n")
            prompt += (
                lm.piece("Input:") + vocab.token_ids[torch.tensor(generated, dtype=torch.int64)].tolist()
            )
            with torch.inference_mode():
                logits = lm.model(input_ids=torch.tensor([prompt])).logits[0, -1]
            generated.append(int(logits[vocab.token_ids].argmax()))
    return generated


def test_denoise_ids_mode(setup, images_a):
    before = snapshot(images_a.lm.model)
    target = setup["ids"][3]
    result = denoise(images_a, target, num_layers=3, rates=[0.5, 0.4, 0.3], seed=0)
    assert result.ids.shape == (21,) and result.ids.dtype == torch.int64
    assert [p.shape for p in result.prefixes] == [(1, 1), (1, 5), (1, 21)]
    assert [tuple(layer.shape) for layer in result.layers(setup["quantizer"])] == [
        (1, 1, 1),
        (1, 2, 2),
        (1, 4, 4),
    ]
    assert int(result.ids.min()) >= 0 and int(result.ids.max()) < setup["vocab"].num_rows
    assert [(s.start, s.end, s.layer) for s in result.steps] == [(0, 1, 1), (1, 5, 2), (5, 21, 3)]
    # the context: prefixes of the same corrupted copies at the given rates; the clean target is never shown
    assert len(result.context) == 3 and all(src is None for src, _ in result.context)
    changed = [int((out != target).sum()) for _, out in result.context]
    assert changed[0] <= round(0.5 * 21) and changed[2] <= round(0.3 * 21)
    assert result.ids.tolist() == brute_force_ids_generation(images_a, result.context, 3)
    # the decoder renders every prefix
    for layers, prefix in enumerate(result.prefixes, 1):
        assert setup["quantizer"].decode(prefix, num_layers=layers).shape == (
            1,
            setup["vocab"].dim,
            GRID,
            GRID,
        )
    # seeded sampling is reproducible
    one = denoise(images_a, target, num_layers=2, rates=[0.5, 0.3], temperature=1.0, top_k=5, seed=9)
    two = denoise(images_a, target, num_layers=2, rates=[0.5, 0.3], temperature=1.0, top_k=5, seed=9)
    assert torch.equal(one.ids, two.ids)
    assert_unchanged(images_a.lm.model, before)


def test_corruption_and_rates():
    rows = torch.arange(100)
    generator = torch.Generator().manual_seed(0)
    corrupted = corrupt_ids(rows, 0.3, 1000, generator)
    assert int((corrupted != rows).sum()) <= 30 and int((corrupted >= 100).sum()) > 20
    assert torch.equal(corrupt_ids(rows, 0.0, 1000), rows)
    rates = denoising_rates()
    assert len(rates) == 10 and rates[0] == pytest.approx(0.5) and rates[-1] == pytest.approx(0.23)
    assert all(a > b for a, b in itertools.pairwise(rates))


def test_prompt_longer_than_the_context_is_an_error(setup, images_a):
    lm = images_a.lm
    limit = lm.model.config.max_position_embeddings
    lm.model.config.max_position_embeddings = 40
    try:
        with pytest.raises(ValueError, match="context holds 40"):
            denoise(images_a, setup["ids"][0], num_layers=3, rates=[0.5, 0.4])
    finally:
        lm.model.config.max_position_embeddings = limit
