"""spae_fast.llm.frozen_lm: shared-prefix scoring (tree, KV cache) equals one forward per continuation; greedy
answer lines; the model is never changed."""

from __future__ import annotations

import pytest
import torch
from _tiny_lms import assert_unchanged, snapshot

from spae_fast.llm import build_episode_prompt, sample_episodes

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.mark.parametrize("strategy", ["tree", "kv_cache"])
@pytest.mark.parametrize("which", ["a", "b"])
def test_shared_prefix_scores_equal_naive_scores(setup, images_a, images_b, which, strategy):
    images = images_a if which == "a" else images_b
    lm = images.lm
    before = snapshot(lm.model)
    episode = sample_episodes(setup["labels"], ways=3, shots=2, num_queries=5, num_episodes=1, seed=1)[0]
    prompt = build_episode_prompt(images, setup["ids"], episode, ["dax", "blicket", "slation"], num_layers=3,
                                  task_induction=True)  # fmt: skip
    if which == "b":  # text mode: queries and candidates of different lengths exercise the padding
        assert len({len(q) for q in prompt.queries}) > 1
        assert len({len(c) for c in prompt.candidates}) > 1
    shared = lm.score_continuations(prompt.prefix, prompt.queries, prompt.candidates, strategy)
    naive = lm.score_naive(prompt.prefix, prompt.queries, prompt.candidates)
    assert shared.shape == (5, 3)
    torch.testing.assert_close(shared, naive, rtol=1e-4, atol=1e-4)
    assert_unchanged(lm.model, before)


def test_tree_strategy_with_the_eager_attention_and_auto_choice(setup, images_a):
    lm = images_a.lm
    episode = sample_episodes(setup["labels"], ways=2, shots=1, num_queries=3, num_episodes=1, seed=3)[0]
    prompt = build_episode_prompt(images_a, setup["ids"], episode, ["dax", "blicket"], num_layers=3)
    assert lm.sharing_strategy(len(prompt.prefix), prompt.queries, prompt.candidates) == "tree"
    naive = lm.score_naive(prompt.prefix, prompt.queries, prompt.candidates)
    implementation = lm.model.config._attn_implementation
    try:
        lm.model.config._attn_implementation = "eager"
        eager = lm.score_continuations(prompt.prefix, prompt.queries, prompt.candidates, "tree")
        lm.model.config._attn_implementation = "flash_attention_2"  # no custom masks: auto falls back
        assert lm.sharing_strategy(len(prompt.prefix), prompt.queries, prompt.candidates) == "kv_cache"
    finally:
        lm.model.config._attn_implementation = implementation
    torch.testing.assert_close(eager, naive, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="strategy must be"):
        lm.score_continuations(prompt.prefix, prompt.queries, prompt.candidates, "batch")


@pytest.mark.parametrize("strategy", ["tree", "kv_cache"])
def test_shared_prefix_scores_with_one_token_candidates(setup, images_a, strategy):
    lm = images_a.lm
    episode = sample_episodes(setup["labels"], ways=2, shots=1, num_queries=2, num_episodes=1, seed=2)[0]
    prompt = build_episode_prompt(images_a, setup["ids"], episode, ["dax", "blicket"], num_layers=2)
    candidates = [c[:1] for c in prompt.candidates]
    torch.testing.assert_close(
        lm.score_continuations(prompt.prefix, prompt.queries, candidates, strategy),
        lm.score_naive(prompt.prefix, prompt.queries, candidates), rtol=1e-4, atol=1e-4,
    )  # fmt: skip


@pytest.mark.parametrize("which", ["a", "b"])
def test_open_ended_generation_matches_plain_greedy(setup, images_a, images_b, which):
    images = images_a if which == "a" else images_b
    lm = images.lm
    episode = sample_episodes(setup["labels"], ways=2, shots=2, num_queries=3, num_episodes=1, seed=5)[0]
    prompt = build_episode_prompt(images, setup["ids"], episode, ["dax", "blicket"], num_layers=2)
    lines = lm.generate_lines(prompt.prefix, prompt.queries, max_new_tokens=6)
    for query, line in zip(prompt.queries, lines):
        tokens = prompt.prefix + query
        generated = []
        with torch.inference_mode():
            for _ in range(6):
                logits = lm.model(input_ids=torch.tensor([tokens])).logits[0, -1]
                token = int(logits.argmax())
                tokens.append(token)
                generated.append(token)
                if token in lm.newline_tokens():
                    break
        assert line == lm.tokenizer.decode(generated, skip_special_tokens=True).split("\n")[0]
