"""Caches that check themselves (vocabulary tables, text features, GGUF conversions) and model files that are
truncated or corrupted: clear errors naming the file, and corrupt caches rebuilt from the source with a warning."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from _tiny_llm import byte_level_tokenizer, save_tiny_model, write_gguf

from spae_fast import embedding_tables
from spae_fast._integrity import (
    CorruptFileError,
    read_safetensors_header,
    read_tensor_cache,
    write_tensor_cache,
)
from spae_fast.llm import loading
from spae_fast.text_features import cached_features
from spae_fast.vocab import VocabCodebook, cache_dir


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPAE_FAST_CACHE", str(tmp_path / "cache"))


def flip_last_data_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # the last tensor byte: header and sizes stay valid, only the values change
    path.write_bytes(bytes(data))


def only_cache_file():
    files = sorted(cache_dir().glob("*.safetensors"))
    assert len(files) == 1, files
    return files[0]


def test_tampered_table_cache_is_rebuilt_from_the_model(tmp_path, monkeypatch):
    folder = tmp_path / "gpt2"
    embedding, _ = save_tiny_model(folder, "gpt2", byte_level_tokenizer())
    first = VocabCodebook.from_pretrained(folder, token_filter=None)
    cache = only_cache_file()
    flip_last_data_byte(cache)
    with pytest.warns(RuntimeWarning, match="cached tensors do not match their recorded sha256"):
        second = VocabCodebook.from_pretrained(folder, token_filter=None)
    assert torch.equal(second.weight, embedding) and torch.equal(second.weight, first.weight)
    # The rebuilt entry is valid again: the next load reads it without the model file.
    monkeypatch.setattr(embedding_tables, "_read_embedding_tensor", lambda *a: pytest.fail("cache miss"))
    assert torch.equal(VocabCodebook.from_pretrained(folder, token_filter=None).weight, embedding)
    cache.write_bytes(cache.read_bytes()[:50])  # truncated: also rebuilt (from the model: undo the patch)
    monkeypatch.undo()
    monkeypatch.setenv("SPAE_FAST_CACHE", str(cache.parent))
    with pytest.warns(RuntimeWarning, match="header claims"):
        assert torch.equal(VocabCodebook.from_pretrained(folder, token_filter=None).weight, embedding)


TOKENS = ["<|endoftext|>", "\u0120cat", "\u0120dog", "a", "\u012012", "house", "\u010a\u010a"]


def test_truncated_or_corrupted_gguf_names_the_file(tmp_path):
    weight = np.random.default_rng(0).standard_normal((len(TOKENS), 8)).astype(np.float32)
    good = tmp_path / "tiny.gguf"
    write_gguf(good, TOKENS, weight)
    data = good.read_bytes()
    book = VocabCodebook.from_pretrained(good, token_filter=None)
    assert torch.equal(book.weight, torch.from_numpy(weight))
    flip_last_data_byte(only_cache_file())
    with pytest.warns(RuntimeWarning, match="rebuilding it from the source"):
        assert torch.equal(
            VocabCodebook.from_pretrained(good, token_filter=None).weight, torch.from_numpy(weight)
        )
    for cut in (4, 30, 100, 200, len(data) - 100, len(data) - 10):  # cut in the header, metadata, tensor data
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CorruptFileError, match="is not a readable GGUF file|has no token_embd") as error:
            VocabCodebook.from_pretrained(bad, use_cache=False)
        assert str(bad) in str(error.value)
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(CorruptFileError, match=r"text.gguf is not a GGUF file: it starts with b'hell'"):
        VocabCodebook.from_pretrained(tmp_path / "text.gguf", use_cache=False)


def test_broken_hf_files_name_the_file(tmp_path):
    folder = tmp_path / "gpt2"
    save_tiny_model(folder, "gpt2", byte_level_tokenizer())
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="model.safetensors: tensor .* does not fit") as error:
        VocabCodebook.from_pretrained(folder, use_cache=False)
    assert str(weights) in str(error.value)
    weights.write_bytes(data)
    (folder / "config.json").write_bytes(b'{"hidden_size": \xff}')
    with pytest.raises(
        CorruptFileError, match=r"config.json: the model's config must be UTF-8 JSON, but byte 16"
    ):
        VocabCodebook.from_pretrained(folder, use_cache=False)
    sharded = tmp_path / "sharded"
    save_tiny_model(sharded, "gpt2", byte_level_tokenizer(), max_shard_size="20KB")
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(
        CorruptFileError, match=r"model.safetensors.index.json: a safetensors index is not valid JSON"
    ):
        VocabCodebook.from_pretrained(sharded, use_cache=False)


def test_safetensors_header_checks():
    from safetensors.torch import save

    data = save({"a": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(4, dtype=torch.int64)})
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    assert header["a"]["data_offsets"] == [32, 56]  # int64 first: the file's layout this test edits

    def with_header(edit) -> bytes:
        changed = dict(header)
        edit(changed)
        raw = json.dumps(changed).encode()
        return struct.pack("<Q", len(raw)) + raw + data[8 + length :]

    cases = [
        (lambda h: h.__setitem__("a", {**h["a"], "dtype": "F99"}), "malformed header entry"),
        (lambda h: h.__setitem__("a", {**h["a"], "shape": [2, 4]}), "does not fit"),
        (lambda h: h.__setitem__("a", {**h["a"], "data_offsets": [24, 48]}), "overlapping or missing"),
        (lambda h: h.__setitem__("__metadata__", {"x": 1}), "must map strings to strings"),
    ]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.safetensors"
        path.write_bytes(data)
        assert read_safetensors_header(path).total_elements() == 10
        for edit, message in cases:
            path.write_bytes(with_header(edit))
            with pytest.raises(CorruptFileError, match=message):
                read_safetensors_header(path)


def test_tensor_cache_round_trip_and_tampering(tmp_path):
    path = tmp_path / "c.safetensors"
    write_tensor_cache(path, {"x": torch.arange(5.0)}, {"kind": "k"})
    tensors, metadata = read_tensor_cache(path, {"kind": "k"})
    assert torch.equal(tensors["x"], torch.arange(5.0)) and metadata["kind"] == "k"
    assert not list(tmp_path.glob("*.partial"))  # written through a temporary file, renamed into place
    with pytest.warns(RuntimeWarning, match="'kind' is 'k', expected 'other'"):
        assert read_tensor_cache(path, {"kind": "other"}) is None
    from safetensors.torch import save_file

    save_file(
        {"x": torch.arange(5.0) + 1},
        str(path),
        metadata={"kind": "k", "spae_fast_sha256": metadata["spae_fast_sha256"]},
    )
    with pytest.warns(RuntimeWarning, match="do not match their recorded sha256"):
        assert read_tensor_cache(path) is None


def test_text_feature_cache_is_verified(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(3, 4, generator=torch.Generator().manual_seed(0))

    texts, identity, templates = ["a", "b", "c"], {"model": "m"}, ("{}",)
    first, path = cached_features("text", texts, identity, templates, compute, use_cache=True)
    again, _ = cached_features("text", texts, identity, templates, compute, use_cache=True)
    assert len(calls) == 1 and torch.equal(again, first)
    flip_last_data_byte(path)
    with pytest.warns(RuntimeWarning, match="do not match their recorded sha256"):
        repaired, _ = cached_features("text", texts, identity, templates, compute, use_cache=True)
    assert len(calls) == 2 and torch.equal(repaired, first)


def test_gguf_conversion_cache_is_verified(tmp_path, monkeypatch):
    weight = np.random.default_rng(0).standard_normal((len(TOKENS), 8)).astype(np.float32)
    gguf = tmp_path / "tiny.gguf"
    write_gguf(gguf, TOKENS, weight)
    conversions = []

    def fake_convert(source, folder):  # transformers' conversion is not what this test is about
        conversions.append(source)
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(b"weights" * 100)

    monkeypatch.setattr(loading, "_convert_into", fake_convert)
    folder = loading.convert_gguf(gguf)
    assert loading.convert_gguf(gguf) == folder and len(conversions) == 1
    manifest = json.loads((folder / loading.MANIFEST).read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    (folder / "model.safetensors").write_bytes(b"weightz" * 100)
    with pytest.warns(RuntimeWarning, match=r"model.safetensors does not match its recorded size / sha256"):
        assert loading.convert_gguf(gguf) == folder
    assert len(conversions) == 2 and (folder / "model.safetensors").read_bytes() == b"weights" * 100
    assert sorted(p.name for p in folder.parent.iterdir()) == [
        folder.name
    ]  # no temporary or damaged leftovers
    (folder / loading.MANIFEST).unlink()  # an interrupted conversion
    with pytest.warns(RuntimeWarning, match="no spae_fast_cache.json"):
        loading.convert_gguf(gguf)
    assert len(conversions) == 3
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(gguf.read_bytes()[:200])
    with pytest.raises(CorruptFileError, match="cut.gguf is not a readable GGUF file"):
        loading.convert_gguf(truncated)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="holds files but no converted model"):
        loading.convert_gguf(gguf, mine)
    assert (mine / "notes.txt").read_text() == "keep" and len(conversions) == 3


def test_one_key_scheme_for_every_entry(tmp_path, monkeypatch):
    from spae_fast import cache

    source = cache.file_identity(tmp_path)
    base = cache.entry_path(cache.TEXT_FEATURES, source, {"texts": ["a"]}, label="clip text/x")
    assert base.parent == cache_dir() and base.name.startswith("text-features-clip_text_x-")
    assert base.suffix == ".safetensors"
    relabelled = cache.entry_path(cache.TEXT_FEATURES, source, {"texts": ["a"]}, label="another")
    assert relabelled.name == base.name.replace("clip_text_x", "another")  # the label is a hint, not the key
    others = {
        cache.entry_path(cache.TEXT_FEATURES, source, {"texts": ["b"]}).name.rsplit("-", 1)[1],
        cache.entry_path(cache.TEXT_FEATURES, ["elsewhere"], {"texts": ["a"]}).name.rsplit("-", 1)[1],
        cache.entry_path(cache.EMBEDDING_TABLE, source, {"texts": ["a"]}).name.rsplit("-", 1)[1],
        cache.entry_path(cache.Kind("text-features", 99), source, {"texts": ["a"]}).name.rsplit("-", 1)[1],
        base.name.rsplit("-", 1)[1].removesuffix(".safetensors"),
    }
    assert len(others) == 5  # kind, source, parameters and format all change the key
    folder = cache.entry_path(cache.GGUF_CONVERSION, source, label="m")
    assert folder.suffix == "" and folder.name.startswith("gguf-conversion-m-")
    monkeypatch.setenv("SPAE_FAST_CACHE", str(tmp_path / "elsewhere"))
    assert cache.entry_path(cache.TEXT_FEATURES, source, {"texts": ["a"]}).parent == tmp_path / "elsewhere"


def test_an_entry_of_another_kind_or_key_is_rebuilt(tmp_path):
    from spae_fast import cache

    path = cache.entry_path(cache.TEXT_FEATURES, ["s"], {"texts": ["a"]})
    cache.write_tensors(path, cache.TEXT_FEATURES, {"features": torch.ones(1, 2)})
    tensors, _ = cache.read_tensors(path, cache.TEXT_FEATURES)
    assert torch.equal(tensors["features"], torch.ones(1, 2))
    with pytest.warns(
        RuntimeWarning, match="'spae_fast_cache' is 'text-features', expected 'embedding-table'"
    ):
        assert cache.read_tensors(path, cache.EMBEDDING_TABLE) is None
    moved = path.with_name(path.name.replace(path.stem.rsplit("-", 1)[1], "0" * cache.KEY_LENGTH))
    path.rename(moved)  # a file under another entry's name
    with pytest.warns(RuntimeWarning, match="'spae_fast_cache_key'"):
        assert cache.read_tensors(moved, cache.TEXT_FEATURES) is None


def test_every_cache_user_writes_through_the_cache_module(tmp_path, monkeypatch):
    folder = tmp_path / "gpt2"
    save_tiny_model(folder, "gpt2", byte_level_tokenizer())
    VocabCodebook.from_pretrained(folder, token_filter=None)
    cached_features("clip-text", ["a"], {"model": "m"}, ("{}",), lambda: torch.ones(1, 3), use_cache=True)
    gguf = tmp_path / "tiny.gguf"
    write_gguf(gguf, TOKENS, np.zeros((len(TOKENS), 8), dtype=np.float32))
    monkeypatch.setattr(
        loading, "_convert_into", lambda source, out: (out.mkdir(), (out / "config.json").write_text("{}"))
    )
    loading.convert_gguf(gguf)
    names = sorted(p.name.rsplit("-", 1)[0] for p in cache_dir().iterdir())
    assert names == ["embedding-table-model", "gguf-conversion-tiny", "text-features-clip-text"], names
