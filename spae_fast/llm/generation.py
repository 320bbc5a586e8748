"""Progressive in-context generation: a frozen LLM writes a token pyramid coarse to fine (SPAE-METHOD.md §5).

The pyramid is written in steps (each layer, or chunks of ``chunk_size`` tokens of a layer). At the step
that writes tokens ``[a, b)`` every context example and the query input show their first ``b`` tokens, and
the query's output shows the ``a`` tokens written so far; the LLM continues it with ``b - a`` tokens,
decoded one at a time with the KV cache and constrained to the codebook's words
(`spae_fast.llm.constrained`). The prompt is rebuilt and prefilled once per step, since every example
grows. Tasks: progressive denoising (`denoise`: the context is the target's words corrupted at decreasing
rates) and image-to-image pairs (`image_to_image`; the transforms are in `spae_fast.llm.image_tasks`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch

from .constrained import _Decoder
from .image_tokens import ImageVocabulary

DENOISE_RATES = (0.50, 0.23)  # first and last corruption rate of the default 10 denoising examples


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



def _as_rows(ids: torch.Tensor | Sequence[torch.Tensor], quantizer, name: str) -> torch.Tensor:
    """One image's ids (flat ``[n]`` / ``[1, n]`` or a per-layer list of ``[1, s, s]``) -> flat ``[n]``."""
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"{name} must be one image's ids ([n] or [1, n]), got shape {tuple(ids.shape)}")
    return quantizer.flatten_ids(ids)[0].cpu()


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

