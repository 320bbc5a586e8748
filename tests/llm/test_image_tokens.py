"""spae_fast.llm.image_tokens: SPAE ids as LLM prompt tokens (ids mode, text mode, layer separators)."""

from __future__ import annotations

import pytest
from _tiny_lms import GRID, LAYERS, make_model

from spae_fast import SPAEQuantizer
from spae_fast.llm import FrozenLM, ImageVocabulary

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


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
