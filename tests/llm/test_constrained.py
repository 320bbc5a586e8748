"""spae_fast.llm.constrained: decoding writes only whole codebook words, in ids mode and through the trie of
text mode."""

from __future__ import annotations

import pytest
import torch
from _tiny_lms import assert_unchanged, snapshot

from spae_fast.llm import denoise, image_to_image
from spae_fast.llm.constrained import _Decoder

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


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
            result = image_to_image(images, torch.stack([e[0] for e in examples]),
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
    result = denoise(images_b, setup["ids"][7], num_layers=3, rates=[0.5, 0.4, 0.3], seed=1)
    assert result.ids.shape == (21,)
    assert int(result.ids.min()) >= 0 and int(result.ids.max()) < images_b.vocab.num_rows
    sampled = denoise(images_b, setup["ids"][7], num_layers=2, rates=[0.5, 0.3], temperature=2.0, seed=4)
    again = denoise(images_b, setup["ids"][7], num_layers=2, rates=[0.5, 0.3], temperature=2.0, seed=4)
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
        rows = _Decoder(images_b, 0.0, None, None).words([1, 2, 3], 1, [0])
        expected = node.row if choice == "end" else child.row
    finally:
        lm.prefill, lm._forward = lm_prefill, lm_forward
        node.row = saved
    assert calls == path  # the word's tokens were fed; the deciding token was not
    assert rows == [expected]
