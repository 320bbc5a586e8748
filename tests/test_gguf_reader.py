"""spae_fast._gguf, the one GGUF parser, against gguf's own GGUFReader + dequantize: every table type the
vocabularies use, default and custom alignment, short reads, and files it must refuse."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from spae_fast import _gguf, embedding_tables
from spae_fast._integrity import CorruptFileError

gguf = pytest.importorskip("gguf")
TOKENS = [f"tok{i}" for i in range(40)]


def write_table(path: Path, kind: str, alignment: int | None) -> np.ndarray:
    """A GGUF file with a small tensor before token_embd.weight [40, 64] stored as `kind`; returns the fp32
    table it was made from."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((len(TOKENS), 64)).astype(np.float32)
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_tensor("before", rng.standard_normal((3, 5)).astype(np.float32))  # 60 bytes: shifts the next offset
    if kind == "F32":
        writer.add_tensor("token_embd.weight", weight)
    elif kind == "F16":
        writer.add_tensor("token_embd.weight", weight.astype(np.float16))
    else:
        quant = gguf.GGMLQuantizationType[kind]
        writer.add_tensor("token_embd.weight", gguf.quants.quantize(weight, quant), raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weight


def reference_rows(path: Path) -> np.ndarray:
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(len(TOKENS), -1).astype(np.float32)


@pytest.mark.parametrize("alignment", [None, 64])
@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0", "Q4_1"])
def test_rows_and_tokens_are_ggufreaders(tmp_path, kind, alignment):
    path = tmp_path / "model.gguf"
    weight = write_table(path, kind, alignment)
    rows, tokens = embedding_tables._read_gguf(path)
    assert tokens == TOKENS
    assert rows.dtype == np.float32 and np.array_equal(rows, reference_rows(path))
    if kind == "F32":
        assert np.array_equal(rows, weight)
    header = _gguf.check_file(path)
    assert header.data_start % (alignment or 32) == 0


def test_short_reads_are_completed(tmp_path, monkeypatch):
    """One read() may return less than asked (at most ~2 GiB on Linux): the reader loops until the buffer is full."""
    path = tmp_path / "model.gguf"
    write_table(path, "F32", None)
    expected, _ = embedding_tables._read_gguf(path)

    class Trickle(io.FileIO):
        def readinto(self, buffer):
            return super().readinto(memoryview(buffer)[:7])

    monkeypatch.setattr(_gguf, "open", lambda file, mode="r", buffering=-1: Trickle(file, mode.replace("b", "")),
                        raising=False)  # fmt: skip
    rows, _ = embedding_tables._read_gguf(path)
    assert np.array_equal(rows, expected)


def test_refused_files_name_what_is_wrong(tmp_path):
    path = tmp_path / "model.gguf"
    write_table(path, "F32", None)
    data = bytearray(path.read_bytes())
    big_endian = tmp_path / "big_endian.gguf"
    big_endian.write_bytes(bytes(data[:4]) + (3).to_bytes(4, "big") + bytes(data[8:]))
    with pytest.raises(CorruptFileError, match="big-endian"):
        _gguf.check_file(big_endian)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(bytes(data[: len(data) - 100]))  # the table's last bytes are gone
    with pytest.raises(CorruptFileError, match=r"cut\.gguf"):
        embedding_tables._read_gguf(cut)
