"""spae_fast.llm.fewshot: episode prompts, episode sampling, the Wilson interval and `evaluate_fewshot`."""

from __future__ import annotations

import numpy as np
import pytest
from _tiny_lms import assert_unchanged, episode_text, snapshot

from spae_fast.llm import (
    NONSENSE_LABELS,
    Episode,
    build_episode_prompt,
    evaluate_fewshot,
    sample_episodes,
    wilson_interval,
)
from spae_fast.llm.fewshot import _normal_quantile

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


# ---- prompts ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["a", "b"])
def test_prompt_is_the_tokenization_of_the_prompt_text(setup, images_a, images_b, which):
    images = images_a if which == "a" else images_b
    tokenizer = images.lm.tokenizer
    ids, vocab = setup["ids"], setup["vocab"]
    episode = Episode((2, 0), ((5, 1), (2, 0), (9, 1)), ((6, 0), (1, 1)))
    labels = ["dax", "blicket"]
    prompt = build_episode_prompt(images, ids, episode, labels, num_layers=2, task_induction=True)
    prefix_text, query_texts = episode_text(vocab, ids, episode, labels, 5, "Answer with dax or blicket.\n")
    assert prompt.prefix == tokenizer(prefix_text).input_ids  # starts with the tokenizer's <s>
    assert prompt.prefix[0] == tokenizer.bos_token_id
    for query, text in zip(prompt.queries, query_texts):
        assert query == tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer(prefix_text + text).input_ids == prompt.prefix + query
    assert prompt.candidates == [tokenizer(f" {w}\n", add_special_tokens=False).input_ids for w in labels]
    # repeats repeat the support list; no induction line without task_induction
    twice = build_episode_prompt(images, ids, episode, labels, num_layers=2, repeats=2)
    body = prompt.prefix[len(tokenizer("Answer with dax or blicket.\n").input_ids) :]
    assert twice.prefix == [tokenizer.bos_token_id] + body + body


def test_prompt_errors(setup, images_a):
    episode = Episode((0, 1), ((0, 0), (1, 1)), ((4, 0),))
    with pytest.raises(ValueError, match="distinct"):
        build_episode_prompt(images_a, setup["ids"], episode, ["dax", "dax"], num_layers=2)
    with pytest.raises(ValueError, match="3 layers need 21"):
        build_episode_prompt(images_a, setup["ids"][:, :5], episode, ["dax", "wug"], num_layers=3)


# ---- episodes ---------------------------------------------------------------------------------------------


def test_episodes_reproducible_and_balanced(setup):
    labels = setup["labels"]
    first = sample_episodes(labels, ways=3, shots=2, num_queries=4, num_episodes=6, seed=3)
    assert first == sample_episodes(labels, ways=3, shots=2, num_queries=4, num_episodes=6, seed=3)
    assert first != sample_episodes(labels, ways=3, shots=2, num_queries=4, num_episodes=6, seed=4)
    for episode in first:
        assert len(set(episode.classes)) == 3
        support_ways = [way for _, way in episode.support]
        assert sorted(support_ways) == [0, 0, 1, 1, 2, 2]
        query_ways = [way for _, way in episode.queries]
        assert len(query_ways) == 4 and max(query_ways.count(w) for w in range(3)) == 2
        assert min(query_ways.count(w) for w in range(3)) == 1
        indices = [i for i, _ in episode.support + episode.queries]
        assert len(set(indices)) == len(indices)  # no image twice
        for index, way in episode.support + episode.queries:
            assert int(labels[index]) == episode.classes[way]
    pooled = sample_episodes(
        labels, ways=2, shots=1, num_queries=2, num_episodes=10, seed=0, class_pool=[2, 3]
    )
    assert all(set(e.classes) == {2, 3} for e in pooled)


def test_episode_errors():
    labels = np.array([0] * 5 + [1] * 5 + [2] * 2)
    with pytest.raises(ValueError, match="4-way episodes need 4 classes but only 3"):
        sample_episodes(labels, ways=4, shots=1, num_queries=1, num_episodes=1)
    with pytest.raises(ValueError, match="class 'two' \\(2\\) has 2 images.*need 3 per class"):
        sample_episodes(
            labels, ways=2, shots=2, num_queries=2, num_episodes=1, class_names=["zero", "one", "two"]
        )
    assert sample_episodes(labels, ways=2, shots=2, num_queries=2, num_episodes=1, class_pool=[0, 1])
    with pytest.raises(ValueError, match="shots must be"):
        sample_episodes(labels, ways=2, shots=0, num_queries=1, num_episodes=1)


def test_wilson_interval():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4901624, abs=1e-6) and high == pytest.approx(0.9433178, abs=1e-6)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611252, abs=1e-6)
    assert wilson_interval(50, 100)[0] == pytest.approx(0.4038315, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert _normal_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)


def test_evaluate_fewshot(setup, images_a):
    before = snapshot(images_a.lm.model)
    common = {"ways": 2, "shots": 1, "num_layers": 2, "num_episodes": 4, "num_queries": 2, "seed": 0,
              "class_names": setup["names"]}  # fmt: skip
    cached = evaluate_fewshot(images_a, setup["ids"], setup["labels"], **common)
    naive = evaluate_fewshot(images_a, setup["ids"], setup["labels"], method="naive", **common)
    fanned = evaluate_fewshot(images_a, setup["ids"], setup["labels"], method="kv_cache", **common)
    assert [r.predictions for r in cached.records] == [r.predictions for r in naive.records]
    assert [r.predictions for r in fanned.records] == [r.predictions for r in naive.records]
    with pytest.raises(ValueError, match="method must be"):
        evaluate_fewshot(images_a, setup["ids"], setup["labels"], method="cached", **common)
    assert cached.total == 8 and 0 <= cached.correct <= 8
    assert cached.interval == wilson_interval(cached.correct, 8)
    assert cached.chance == 0.5 and cached.tokens_per_image == 5
    assert all(set(r.labels) <= set(setup["names"]) for r in cached.records)
    nonsense = evaluate_fewshot(images_a, setup["ids"], setup["labels"], label_kind="nonsense",
                                task_induction=True, repeats=2, **common)  # fmt: skip
    assert all(set(r.labels) <= set(NONSENSE_LABELS) for r in nonsense.records)
    generated = evaluate_fewshot(images_a, setup["ids"], setup["labels"], method="generate", **common)
    assert generated.total == 8 and all(len(r.answers) == 2 for r in generated.records)
    assert all(-1 <= p < 2 for r in generated.records for p in r.predictions)
    row = cached.summary()
    assert row["accuracy"] == cached.accuracy and row["queries"] == 8
    assert_unchanged(images_a.lm.model, before)
