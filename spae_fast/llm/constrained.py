"""Decoding constrained to the codebook: the LLM writes whole codebook words, one LLM token at a time
through the KV cache.

In ids mode the logits are restricted to `VocabCodebook.token_ids` (row r <-> LLM token ``token_ids[r]``).
In text mode decoding walks the trie of the words' tokenizations (`ImageVocabulary.trie`), so the output
is always a sequence of whole codebook words. Greedy by default; ``temperature`` / ``top_k`` sampling with
a seeded generator otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .image_tokens import ImageVocabulary


def _pick(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> int:
    """Index into ``logits`` (already restricted to the allowed tokens): arg-max, or a sample."""
    if temperature <= 0:
        return int(logits.argmax())
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.numel():
        threshold = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probabilities = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probabilities.cpu(), 1, generator=generator))


class _Decoder:
    """Constrained decoding of codebook words, one LLM token at a time through the KV cache."""

    def __init__(self, image_vocab: ImageVocabulary, temperature: float, top_k: int | None, seed: int | None):
        self.image_vocab = image_vocab
        self.lm = image_vocab.lm
        self.temperature = temperature
        self.top_k = top_k
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(int(seed))

    def _choose(self, logits: torch.Tensor, allowed: torch.Tensor) -> int:
        """Index into ``allowed`` (LLM token ids) of the chosen token."""
        return _pick(logits[allowed.to(logits.device)], self.temperature, self.top_k, self.generator)

    @torch.inference_mode()
    def words(self, prompt: list[int], count: int, end_tokens: Sequence[int]) -> list[int]:
        """``count`` codebook rows continuing ``prompt``, every one a whole codebook word."""
        lm = self.lm
        cache, logits = lm.prefill(prompt)
        if logits is None:
            raise ValueError("generation needs a non-empty prompt")
        length = len(prompt)

        def feed(token: int) -> torch.Tensor:
            nonlocal cache, length
            lm._check_length(length + 1, "the generation prompt")
            out, cache = lm._forward(torch.tensor([[token]]), cache)
            length += 1
            return out[0, -1]

        rows: list[int] = []
        if self.image_vocab.mode == "ids":
            allowed = self.image_vocab.vocab.token_ids  # row r <-> LLM token token_ids[r]
            while True:
                row = self._choose(logits, allowed)
                rows.append(row)
                if len(rows) == count:
                    return rows
                logits = feed(int(allowed[row]))
        # Text mode: walk the trie of the words' tokenizations. Where a word may end but also continue (" cat"
        # and " cats"), the next token decides: a continuation token extends it, a word-start token (or, for
        # the last word, the line end) closes it.
        root = self.image_vocab.trie()
        ends = torch.tensor(sorted(set(end_tokens)), dtype=torch.int64)
        node = root
        while True:
            can_end = node is not root and node.row is not None
            allowed = node.allowed()
            if can_end:
                boundary = root.allowed() if len(rows) < count - 1 else torch.cat([root.allowed(), ends])
                allowed = torch.cat([allowed, boundary]).unique()
            token = int(allowed[self._choose(logits, allowed)])
            if can_end and token not in node.children:
                rows.append(node.row)
                if len(rows) == count:
                    return rows
                node = root
            node = node.children[token]
            if node.row is not None and not node.children and len(rows) == count - 1:
                rows.append(node.row)  # the last word is complete: nothing left to predict
                return rows
            logits = feed(token)
            if node.row is not None and not node.children:
                rows.append(node.row)  # a word no other word continues: complete
                node = root
