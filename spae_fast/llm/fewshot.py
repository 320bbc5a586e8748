"""Few-shot classification by a frozen LLM reading SPAE words: the open-ended mini-ImageNet protocol of
Frozen / LQAE / SPAE (SPAE-METHOD.md §5).

An N-way K-shot episode (``T`` = optional task-induction line, ``R`` = repeats of the support set)::

    [BOS if the tokenizer adds one] [T: "Answer with dax or blicket.\\n"]
    ("Input:" <image words> "\\nOutput:" " <label>\\n") x (ways * shots), the whole list R times
    "Input:" <query image words> "\\nOutput:"                          <- the candidates continue here

Each candidate label is scored by the summed log-likelihood of its continuation ``" <label>\\n"``: the
newline is part of the answer because every support answer ends with it, so a label is scored as a complete
answer (a label that is only the start of a likelier, longer answer is not favoured) and all candidates end
on the same token. The closed-set prediction is the arg-max; the open-ended mode (``method="generate"``)
decodes greedily up to the newline instead and counts exact matches of the stripped text. The prefix (task
induction + support) is encoded once per episode (`FrozenLM.score_continuations`). Accuracy comes with its
Wilson score interval (`wilson_interval`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .image_tokens import ImageVocabulary

# Nonsense labels of Frozen (Tsimpoukelli et al. 2021, "fast binding" tasks) first, then more of the kind.
NONSENSE_LABELS = ("dax", "blicket", "slation", "perpo", "shously", "wug", "toma", "zorb", "fepple", "gazzer")
LABEL_KINDS = ("names", "nonsense")
FEWSHOT_METHODS = ("shared", "tree", "kv_cache", "naive", "generate")


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
