"""`ImageVocabulary`: how SPAE ids become prompt tokens for one (quantizer, LLM) pair.

When the LLM *is* the codebook's vocabulary (same size and the same input-embedding rows at
`VocabCodebook.token_ids`: `vocabulary_matches`), an image is fed as those LLM token ids directly
(``mode="ids"``; the codebook tokens carry their own leading space, ``"Ġcat"``). Otherwise each word's text
(``quantizer.to_text``) is tokenized by the LLM's tokenizer as the piece ``" <word>"`` (``mode="text"``:
works across vocabularies). Forcing ``mode="ids"`` with another LLM raises ``ValueError``.

For decoding constrained to the codebook (`spae_fast.llm.constrained`), text mode keeps the trie of every
word's tokenization.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..vocab import VocabCodebook
from .frozen_lm import FrozenLM

IMAGE_TOKEN_MODES = ("auto", "ids", "text")


def vocabulary_matches(
    vocab: VocabCodebook, model: torch.nn.Module, *, sample: int = 256
) -> tuple[bool, str]:
    """Whether ``model`` reads the codebook's own vocabulary: the same number of token ids and, on an evenly
    spaced sample of codebook rows, the same input-embedding rows at `VocabCodebook.token_ids` (compared in
    the lower precision of the two). Returns ``(matches, reason)``."""
    embedding = model.get_input_embeddings().weight
    if vocab.llm_vocab_size != embedding.shape[0]:
        return (
            False,
            f"the codebook's vocabulary has {vocab.llm_vocab_size} tokens, the LLM's {embedding.shape[0]}",
        )
    if vocab.dim != embedding.shape[1]:
        return False, f"the codebook's rows have dim {vocab.dim}, the LLM's embeddings {embedding.shape[1]}"
    rows = torch.unique(torch.linspace(0, vocab.num_rows - 1, min(sample, vocab.num_rows)).round().long())
    ours = vocab.weight[rows]
    theirs = embedding.detach()[vocab.token_ids[rows].to(embedding.device)].cpu()
    low = ours.dtype if torch.finfo(ours.dtype).bits <= torch.finfo(theirs.dtype).bits else theirs.dtype
    ours, theirs = ours.to(low).float(), theirs.to(low).float()
    scale = float(theirs.abs().max()) or 1.0
    if not torch.allclose(ours, theirs, rtol=1e-2, atol=1e-3 * scale):
        error = float((ours - theirs).abs().max())
        return (
            False,
            f"the LLM's input embeddings differ from the codebook rows (max abs difference {error:.3g})",
        )
    return True, "same token ids and embedding rows"


class _TrieNode:
    __slots__ = ("_allowed", "children", "row")

    def __init__(self) -> None:
        self.children: dict[int, _TrieNode] = {}
        self.row: int | None = None  # codebook row of the word ending here
        self._allowed: torch.Tensor | None = None

    def allowed(self) -> torch.Tensor:
        if self._allowed is None:
            self._allowed = torch.tensor(sorted(self.children), dtype=torch.int64)
        return self._allowed


class ImageVocabulary:
    """SPAE ids -> LLM prompt tokens (and back, for constrained decoding) for one quantizer and one LLM.

    Args:
        quantizer: the SPAE quantizer (its `VocabCodebook` ``quantizer.vocab`` names the words).
        lm: the `FrozenLM` that reads the prompts.
        mode: ``"auto"`` (ids when `vocabulary_matches`, else text), ``"ids"`` (LLM token ids
            `VocabCodebook.token_ids`; ValueError when the LLM's vocabulary is not the codebook's) or
            ``"text"`` (each word's text tokenized by the LLM's tokenizer as the piece ``" <word>"``: works
            with any LLM).
        layer_separator: optional text between the layers of an image (e.g. ``" |"``); none by default
            (SPAE-METHOD.md §5: words joined by spaces, layer after layer).
    """

    def __init__(
        self, quantizer, lm: FrozenLM, mode: str = "auto", layer_separator: str | None = None
    ) -> None:
        vocab = getattr(quantizer, "vocab", None)
        if not isinstance(vocab, VocabCodebook):
            raise TypeError(
                "prompting needs a quantizer built on a VocabCodebook (token strings and LLM ids)"
            )
        if mode not in IMAGE_TOKEN_MODES:
            raise ValueError(f"mode must be one of {IMAGE_TOKEN_MODES}, got {mode!r}")
        self.quantizer = quantizer
        self.vocab = vocab
        self.lm = lm
        self.matches, self.match_reason = vocabulary_matches(vocab, lm.model)
        if mode == "ids" and not self.matches:
            raise ValueError(
                f"image tokens as LLM ids need the LLM whose vocabulary is the SPAE codebook's, but "
                f"{self.match_reason}; use mode='text' (token strings work across vocabularies) or the codebook's LLM"
            )
        self.mode = mode if mode != "auto" else ("ids" if self.matches else "text")
        self.layer_separator = layer_separator
        self.separator_ids = lm.piece(layer_separator) if layer_separator else []
        self._word_ids: list[list[int]] | None = None
        self._trie: _TrieNode | None = None

    @property
    def pyramid(self):
        return self.quantizer.pyramid

    # ---- encoding -----------------------------------------------------------------------------------------

    def word_tokens(self) -> list[list[int]]:
        """Text mode: the LLM tokens of every codebook row's word (the piece ``" <word>"``)."""
        if self._word_ids is None:
            self._word_ids = self.lm.pieces([" " + text.strip() for text in self.vocab.texts])
        return self._word_ids

    def _row_tokens(self, rows: list[int]) -> list[list[int]]:
        if self.mode == "ids":
            return [[t] for t in self.vocab.token_ids[torch.tensor(rows, dtype=torch.int64)].tolist()]
        words = self.word_tokens()
        return [words[r] for r in rows]

    def _layer_ends(self) -> list[int]:
        return [self.pyramid.total(n) for n in range(1, self.pyramid.num_layers + 1)]

    def encode(
        self, rows: torch.Tensor | Sequence[int], count: int | None = None, *, open_layer: bool = False
    ) -> list[int]:
        """LLM tokens of the first ``count`` words (all by default) of one image's flat codebook rows (layer
        after layer, raster order), with the layer separator between complete layers. ``open_layer``: also
        put the separator after the last word when it ends a layer (a prompt that the LLM continues with the
        next layer)."""
        rows = torch.as_tensor(rows).reshape(-1).tolist()
        count = len(rows) if count is None else count
        if count > len(rows):
            raise ValueError(f"asked for {count} words of an image that has {len(rows)}")
        tokens: list[int] = []
        ends = set(self._layer_ends())
        for position, word in enumerate(self._row_tokens(rows[:count]), 1):
            tokens.extend(word)
            if self.separator_ids and position in ends and (position < count or open_layer):
                tokens.extend(self.separator_ids)
        return tokens

    # ---- constrained decoding -----------------------------------------------------------------------------

    def trie(self) -> _TrieNode:
        """Text mode: the trie of every codebook word's tokens (a word shared by several rows keeps the lowest
        row, like `VocabCodebook.encode`)."""
        if self._trie is None:
            root = _TrieNode()
            for row, tokens in enumerate(self.word_tokens()):
                node = root
                for token in tokens:
                    node = node.children.setdefault(token, _TrieNode())
                if node.row is None and node is not root:
                    node.row = row
            self._trie = root
        return self._trie

    def allowed_llm_ids(self) -> torch.Tensor:
        """The LLM token ids generation may emit at the start of a word (ids mode: every codebook token)."""
        return self.vocab.token_ids if self.mode == "ids" else self.trie().allowed()

