"""`FrozenLM`: a Hugging Face causal LM and its tokenizer, frozen, with the primitives of in-context
prompting.

Prompt pieces. Prompt text is tokenized piece by piece (``"Input:"``, ``"\\nOutput:"``, ``" dax\\n"``, each
word of an image in text mode), every piece after an anchor (``"\\n"`` before a piece that starts with a
visible character, ``":"`` before one that starts with white space) whose tokens are then dropped, so that
SentencePiece tokenizers add no spurious prefix space. For byte-level BPE tokenizers (GPT-2, Llama 3,
SmolLM2, Qwen) the concatenation equals the tokenization of the whole prompt string (tested).

Shared prefix. `FrozenLM.score_continuations` scores every (query, candidate) continuation of one prompt
prefix with the prefix encoded once, by one of two strategies with equal scores:

- ``"tree"``: one forward over the packed sequence [prefix, every query, every (query, candidate)'s
  candidate tokens but the last] with a tree-shaped 4-D attention mask (a query sees the prefix and
  itself, a candidate the prefix, its query and itself) and each token at the position it has in its own
  prompt;
- ``"kv_cache"``: the prefix runs once into the KV cache, which is repeated along the batch for the queries
  (one batched forward) and again for every (query, candidate) pair (one more), right-padded with a 2-D
  attention mask and explicit position ids.

``"auto"`` takes the tree where the attention implementation accepts a custom mask (sdpa, eager) and the
packed sequence is at most `TREE_MAX_TOKENS` long: on a CPU a small model's forward has a large fixed cost
(every weight is streamed once), and the tree needs one forward where the KV-cache fan-out needs three
(``benchmarks/bench_fewshot.py``). Both equal the plain forward over each full prompt (`FrozenLM.score_naive`,
one forward per (query, candidate), kept as the reference and the benchmark baseline).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence

import torch

from .loading import _freeze, load_causal_lm

SHARING_STRATEGIES = ("auto", "tree", "kv_cache")
TREE_MAX_TOKENS = 4096  # longest packed sequence "auto" scores in one forward (its mask is T x T)


def _repeat_cache(cache, repeats: int):
    """The KV cache repeated ``repeats`` times along the batch (each row r becomes rows r*repeats ..).

    transformers >= 4.56 `Cache` objects are changed in place (`batch_repeat_interleave`); legacy tuples of
    (key, value) per layer are rebuilt. Callers never reuse the cache they pass in.
    """
    if repeats == 1 or cache is None:
        return cache
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(repeats)
        return cache
    return tuple(tuple(t.repeat_interleave(repeats, dim=0) for t in layer) for layer in cache)


def _pad_rows(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, T]`` ids, ``[B, T]`` bool mask of real tokens, ``[B]`` lengths."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.int64)
        mask[i, : len(row)] = True
    return ids, mask, torch.tensor([len(r) for r in rows], dtype=torch.int64)


class FrozenLM:
    """A frozen causal LM and its tokenizer, with the primitives of in-context prompting.

    The model is put in ``eval()`` mode with ``requires_grad_(False)`` and every method runs under
    ``torch.inference_mode()``: nothing here can change its weights.
    """

    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        self.model = _freeze(model)
        self.tokenizer = tokenizer
        parameters = inspect.signature(model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache` (the old name is deprecated until 5.40).
        self._cache_keyword = "cache" if "cache" in parameters else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in parameters
        self._pieces: dict[str, list[int]] = {}
        self.special_prefix = self._find_special_prefix()
        self.pad_id = self._find_pad_id()

    @classmethod
    def from_pretrained(
        cls, path_or_name: str | os.PathLike = "smollm2", *, dtype: torch.dtype = torch.float32, device="cpu"
    ) -> FrozenLM:
        """`load_causal_lm` wrapped in a `FrozenLM`."""
        return cls(*load_causal_lm(path_or_name, dtype=dtype, device=device))

    # ---- sizes --------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def vocab_size(self) -> int:
        """Rows of the input-embedding table (= LLM token ids)."""
        return self.model.get_input_embeddings().num_embeddings

    @property
    def max_length(self) -> int | None:
        """The longest prompt the model's positions allow (``max_position_embeddings``), None when unknown."""
        value = getattr(self.model.config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None

    # ---- tokens -------------------------------------------------------------------------------------------

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _find_special_prefix(self) -> list[int]:
        """The tokens the tokenizer puts before a text by default (usually [BOS] or nothing)."""
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if list(full[start : start + len(plain)]) == list(plain):
                return list(full[:start])
        return []

    def _find_pad_id(self) -> int:
        for attribute in ("pad_token_id", "eos_token_id", "unk_token_id"):
            value = getattr(self.tokenizer, attribute, None)
            if isinstance(value, int) and 0 <= value < self.vocab_size:
                return value
        return 0

    @staticmethod
    def _anchor(piece: str) -> str:
        return "\n" if piece[:1] and not piece[:1].isspace() else ":"

    def pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of prompt pieces, each tokenized after an anchor that is then dropped (module docstring);
        falls back to the plain tokenization when the anchor's tokens merge with the piece. Cached."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._pieces]
        if missing:
            anchors = sorted({self._anchor(t) for t in missing})
            anchor_ids = dict(zip(anchors, self._encode(anchors)))
            anchored = self._encode([self._anchor(t) + t for t in missing])
            plain = None
            for index, (text, ids) in enumerate(zip(missing, anchored)):
                head = anchor_ids[self._anchor(text)]
                if ids[: len(head)] == head and len(ids) > len(head):
                    self._pieces[text] = ids[len(head) :]
                else:
                    plain = plain if plain is not None else self._encode(missing)
                    self._pieces[text] = plain[index]
        return [self._pieces[t] for t in texts]

    def piece(self, text: str) -> list[int]:
        """Token ids of one prompt piece (see `pieces`)."""
        return self.pieces([text])[0] if text else []

    def newline_tokens(self) -> set[int]:
        """Token ids whose text contains a newline (the end of an answer line)."""
        if not hasattr(self, "_newlines"):
            ids = list(range(min(len(self.tokenizer), self.vocab_size)))
            texts = self.tokenizer.convert_ids_to_tokens(ids)
            self._newlines = {
                i
                for i, t in zip(ids, texts)
                if t is not None and "\n" in self.tokenizer.convert_tokens_to_string([t])
            }
        return self._newlines

    # ---- forward with a KV cache --------------------------------------------------------------------------

    def _forward(
        self,
        input_ids,
        cache=None,
        attention_mask=None,
        position_ids=None,
        keep: int | torch.Tensor | None = None,
        use_cache: bool = True,
    ):
        """Logits ``[B, T or kept, V]`` (fp32) and the grown cache. ``keep``: the last ``keep`` positions, or
        a 1-D tensor of positions (transformers' ``logits_to_keep``, emulated where the model lacks it)."""
        kwargs = {self._cache_keyword: cache, "use_cache": use_cache}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(self.device)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids.to(self.device)
        if keep is not None and self._logits_to_keep:
            kwargs["logits_to_keep"] = keep.to(self.device) if isinstance(keep, torch.Tensor) else keep
        out = self.model(input_ids=input_ids.to(self.device), **kwargs)
        logits = out.logits
        if keep is not None and not self._logits_to_keep:
            logits = (
                logits[:, keep.to(logits.device)] if isinstance(keep, torch.Tensor) else logits[:, -keep:]
            )
        if not use_cache:
            return logits.float(), None
        new_cache = getattr(out, "cache", None)
        if new_cache is None:  # transformers 4 (in 5, reading `past_key_values` warns of its deprecation)
            new_cache = getattr(out, "past_key_values", None)
        return logits.float(), new_cache

    def _check_length(self, length: int, what: str) -> None:
        limit = self.max_length
        if limit is not None and length > limit:
            raise ValueError(
                f"{what} needs {length} tokens but the LLM's context holds {limit} (max_position_embeddings); "
                "use fewer layers, shots, repeats or examples"
            )

    @torch.inference_mode()
    def prefill(self, prefix: Sequence[int]):
        """Runs ``prefix`` once: ``(cache, logits of its last position [V])`` (``(None, None)`` if empty)."""
        if not prefix:
            return None, None
        self._check_length(len(prefix), "the prompt")
        logits, cache = self._forward(torch.tensor([list(prefix)]), keep=1)
        return cache, logits[0, -1]

    def _tree_mask(self, allowed: torch.Tensor) -> torch.Tensor | None:
        """``[T, T]`` bool "may attend" -> the 4-D mask the model's attention implementation takes as given
        (sdpa: bool; eager: additive float), or None where a custom mask is not supported (flash, flex, ...)."""
        implementation = getattr(self.model.config, "_attn_implementation", None)
        if implementation == "sdpa":
            return allowed[None, None]
        if implementation == "eager":
            dtype = self.model.get_input_embeddings().weight.dtype
            zero = torch.zeros((), dtype=dtype)
            return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]
        return None

    def sharing_strategy(self, prefix_length: int, queries, candidates) -> str:
        """The `score_continuations` strategy ``"auto"`` picks: ``"tree"`` when the attention implementation
        takes a custom mask and the packed sequence is at most `TREE_MAX_TOKENS` long, else ``"kv_cache"``."""
        if self._tree_mask(torch.ones(1, 1, dtype=torch.bool)) is None:
            return "kv_cache"
        packed = (
            prefix_length + sum(len(q) for q in queries) + len(queries) * sum(len(c) - 1 for c in candidates)
        )
        return "tree" if packed <= TREE_MAX_TOKENS else "kv_cache"

    @torch.inference_mode()
    def score_continuations(
        self,
        prefix: Sequence[int],
        queries: Sequence[Sequence[int]],
        candidates: Sequence[Sequence[int]],
        strategy: str = "auto",
    ) -> torch.Tensor:
        """``[Q, C]`` summed log-likelihoods of ``candidates[c]`` after ``prefix + queries[q]``, with the shared
        prefix encoded once (every query and candidate non-empty). Strategies (equal scores, up to rounding):

        - ``"tree"``: ONE forward over the packed sequence prefix, every query, every (query, candidate)
          pair's candidate tokens but the last, with a tree-shaped attention mask (a query sees the prefix
          and itself, a candidate the prefix, its query and itself) and each token at the position it has in
          its own prompt. Fewest forwards, no padding, no copies of the prefix's keys / values.
        - ``"kv_cache"``: the prefix runs once into the KV cache, which is repeated along the batch for the
          queries (one forward) and again for every (query, candidate) pair (one more forward), right-padded
          with a 2-D mask and explicit positions. Works with any attention implementation.
        - ``"auto"`` (default): `sharing_strategy`.

        On a CPU a small model's forward has a large fixed cost (every weight is streamed once per forward),
        so ``"tree"`` (1 forward) beats ``"kv_cache"`` (3 forwards) for the short prompts of few-shot episodes.
        """
        if strategy not in SHARING_STRATEGIES:
            raise ValueError(f"strategy must be one of {SHARING_STRATEGIES}, got {strategy!r}")
        if not queries or not candidates or any(not q for q in queries) or any(not c for c in candidates):
            raise ValueError("score_continuations needs at least one non-empty query and candidate")
        longest = len(prefix) + max(len(q) for q in queries) + max(len(c) for c in candidates)
        self._check_length(longest, "the few-shot prompt")
        if strategy == "auto":
            strategy = self.sharing_strategy(len(prefix), queries, candidates)
        if strategy == "tree":
            return self._score_tree(list(prefix), queries, candidates)
        return self._score_kv_cache(list(prefix), queries, candidates)

    def _score_tree(self, prefix: list[int], queries, candidates) -> torch.Tensor:
        num_queries, num_candidates, past = len(queries), len(candidates), len(prefix)
        tokens, positions = list(prefix), list(range(past))
        query_spans = []
        for query in queries:
            query_spans.append((len(tokens), len(query)))
            tokens += query
            positions += range(past, past + len(query))
        label_spans = []  # (start, length, query) per (query, candidate), row-major
        for q, query in enumerate(queries):
            for candidate in candidates:
                rest = list(candidate[:-1])  # fed to predict tokens 1..m-1
                label_spans.append((len(tokens), len(rest), q))
                tokens += rest
                positions += range(past + len(query), past + len(query) + len(rest))
        total = len(tokens)
        allowed = torch.zeros(total, total, dtype=torch.bool)
        causal = torch.ones(total, total, dtype=torch.bool).tril()
        allowed[:past, :past] = causal[:past, :past]
        for start, length in query_spans:
            allowed[start : start + length, :past] = True
            allowed[start : start + length, start : start + length] = causal[:length, :length]
        for start, length, q in label_spans:
            query_start, query_length = query_spans[q]
            allowed[start : start + length, :past] = True
            allowed[start : start + length, query_start : query_start + query_length] = True
            allowed[start : start + length, start : start + length] = causal[:length, :length]
        # logits at each query's last token (-> every candidate's first token), then at every candidate token
        keep = [start + length - 1 for start, length in query_spans]
        keep += [start + i for start, length, _ in label_spans for i in range(length)]
        logits, _ = self._forward(
            torch.tensor([tokens]), attention_mask=self._tree_mask(allowed), position_ids=torch.tensor([positions]),
            keep=torch.tensor(keep), use_cache=False,
        )  # fmt: skip
        log_probs = torch.log_softmax(logits[0], dim=-1)  # [kept, V]
        first_tokens = torch.tensor([c[0] for c in candidates], device=log_probs.device)
        scores = log_probs[:num_queries][:, first_tokens].clone()  # [Q, C]
        row = num_queries
        for pair, (_, length, q) in enumerate(label_spans):
            candidate = candidates[pair % num_candidates]
            if length:
                targets = torch.tensor(candidate[1:], device=log_probs.device)
                scores[q, pair % num_candidates] += log_probs[row + torch.arange(length), targets].sum()
            row += length
        return scores.cpu()

    def _queries_after_prefix(self, prefix: Sequence[int], queries: Sequence[Sequence[int]]):
        """Encodes ``prefix`` once, then all queries right-padded in one batch on copies of its cache.

        Returns ``(cache, mask [Q, past + T] bool, lengths [Q], next_logits [Q, V])``: the cache after each
        query, the attention mask so far, the queries' lengths, and the logits after each query's last token.
        """
        num_queries, past = len(queries), len(prefix)
        cache, _ = self.prefill(prefix)
        cache = _repeat_cache(cache, num_queries)
        query_ids, query_mask, lengths = _pad_rows(queries, self.pad_id)
        keep = int(lengths.max() - lengths.min()) + 1
        mask = torch.cat([torch.ones(num_queries, past, dtype=torch.bool), query_mask], dim=1)
        logits, cache = self._forward(query_ids, cache, attention_mask=mask, keep=keep)
        last = lengths - 1 - (query_ids.shape[1] - keep)  # each query's last real token among the kept
        return cache, mask, lengths, logits[torch.arange(num_queries), last]

    def _score_kv_cache(self, prefix: list[int], queries, candidates) -> torch.Tensor:
        num_queries, num_candidates, past = len(queries), len(candidates), len(prefix)
        # Stage 1: all queries, right-padded, in one batch after the prefix.
        cache, mask, query_lengths, first_logits = self._queries_after_prefix(prefix, queries)
        # first_logits [Q, V] predict every candidate's first token
        first_tokens = torch.tensor([c[0] for c in candidates], device=first_logits.device)
        scores = torch.log_softmax(first_logits, dim=-1)[:, first_tokens]  # [Q, C]
        rest = [list(c[:-1]) for c in candidates]  # fed to predict tokens 1..m-1
        if max(len(r) for r in rest) == 0:
            return scores.cpu()
        # Stage 2: every (query, candidate) pair, the candidate's tokens but its last, in one batch.
        cache = _repeat_cache(cache, num_candidates)
        label_ids, label_mask, _ = _pad_rows(rest, self.pad_id)
        label_ids = label_ids.repeat(num_queries, 1)  # row q * C + c
        label_mask = label_mask.repeat(num_queries, 1)
        prior = mask.repeat_interleave(num_candidates, dim=0)
        start = (past + query_lengths).repeat_interleave(num_candidates)[:, None]
        positions = start + torch.arange(label_ids.shape[1])
        logits, _ = self._forward(
            label_ids, cache, attention_mask=torch.cat([prior, label_mask], dim=1), position_ids=positions
        )
        log_probs = torch.log_softmax(logits, dim=-1)  # [Q C, T, V]
        for c, candidate in enumerate(candidates):
            if len(candidate) < 2:
                continue
            targets = torch.tensor(candidate[1:], device=log_probs.device)
            rows = torch.arange(num_queries, device=log_probs.device) * num_candidates + c
            picked = log_probs[rows][:, torch.arange(len(targets)), targets]  # [Q, m - 1]
            scores[:, c] += picked.sum(dim=1)
        return scores.cpu()

    @torch.inference_mode()
    def score_naive(
        self, prefix: Sequence[int], queries: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """The same ``[Q, C]`` scores as `score_continuations`, by one full forward per (query, candidate)."""
        scores = torch.empty(len(queries), len(candidates))
        for q, query in enumerate(queries):
            for c, candidate in enumerate(candidates):
                tokens = list(prefix) + list(query) + list(candidate)
                self._check_length(len(tokens), "the few-shot prompt")
                logits, _ = self._forward(torch.tensor([tokens]), keep=len(candidate) + 1)
                log_probs = torch.log_softmax(logits[0, :-1], dim=-1)  # [m, V] predicting the candidate
                scores[q, c] = log_probs[torch.arange(len(candidate)), torch.tensor(candidate)].sum().cpu()
        return scores

    @torch.inference_mode()
    def generate_lines(
        self, prefix: Sequence[int], queries: Sequence[Sequence[int]], max_new_tokens: int = 16
    ) -> list[str]:
        """Greedy, unconstrained continuation of ``prefix + queries[q]`` up to the first newline (or
        ``max_new_tokens``), all queries in one batch through the shared-prefix cache; the text before the
        newline, per query."""
        num_queries = len(queries)
        past = len(prefix)
        self._check_length(past + max(len(q) for q in queries) + max_new_tokens, "the few-shot prompt")
        newlines = self.newline_tokens()
        cache, mask, lengths, step_logits = self._queries_after_prefix(prefix, queries)
        generated: list[list[int]] = [[] for _ in range(num_queries)]
        done = [False] * num_queries
        for step in range(max_new_tokens):
            tokens = step_logits.argmax(dim=-1).cpu()
            for q in range(num_queries):
                if not done[q]:
                    generated[q].append(int(tokens[q]))
                    done[q] = int(tokens[q]) in newlines
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(num_queries, 1, dtype=torch.bool)], dim=1)
            positions = (past + lengths + step)[:, None]
            logits, cache = self._forward(tokens[:, None], cache, attention_mask=mask, position_ids=positions)
            step_logits = logits[:, -1]
        texts = self.tokenizer.batch_decode(
            generated, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return [text.split("\n", 1)[0] for text in texts]
