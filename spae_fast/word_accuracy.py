"""Word -> class accuracy: do an image's words name what is in it? The judge of semantic guidance.

SPAE's words are for a frozen LLM to read, so the question is whether they identify the image, not whether
they are "relevant" on average (any number word scores high against any digit's name). A zero-shot classifier
reads the words of an image's first n pyramid layers and picks the class whose name is most similar to them on
average, under the relevance provider's own text embedder:

    sim[c, k]      = g(class_name_c) . g(w_k)                          ([C, V], `class_word_similarity`)
    predict_n(I)   = argmax_c  mean_{k in words_n(I)} sim[c, k]        (ties: the lowest class index)
    accuracy_n     = mean_I [predict_n(I) == label(I)]

reported with its chance level (the frequency of the commonest class among the images: the best a constant
guess scores) and ``contains_n``: the share of images whose words include their own class name (token text
without the leading-space marker, case-insensitive). Shuffled words score about chance; words that copy the
class name score 1 (tests/test_word_accuracy.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class WordAccuracy:
    """Word -> class accuracy of the words of layers 1..``layers`` over ``images`` images."""

    layers: int
    words: int  # words per image in layers 1..layers
    accuracy: float
    contains_class_name: float
    chance: float
    images: int

    def as_dict(self) -> dict[str, float | int]:
        return {key: round(value, 4) if isinstance(value, float) else value
                for key, value in dataclasses.asdict(self).items()}  # fmt: skip


def class_word_similarity(provider, class_names: Sequence[str]) -> torch.Tensor:
    """``[C, V]`` fp32: the similarity of every class name to every codebook token under ``provider``'s own text
    embedder (`spae_fast.relevance.LabelTextRelevance` or `CLIPRelevance`: their ``class_word_similarity``)."""
    method = getattr(provider, "class_word_similarity", None)
    if method is None:
        raise TypeError(
            f"the relevance provider {type(provider).__name__} has no class_word_similarity(class_names) method"
        )
    similarity = method(class_names)
    if similarity.dim() != 2 or similarity.shape[0] != len(class_names):
        raise ValueError(f"class_word_similarity returned shape {tuple(similarity.shape)}, expected [C, V]")
    return similarity.float()


def normalized_word(text: str) -> str:
    """A token's text as a word: without the leading-space markers (``Ġ`` / ``▁`` / space), lower case."""
    return text.strip().lstrip("Ġ▁").strip().lower()


def word_class_accuracy(
    words: torch.Tensor,
    labels: torch.Tensor,
    similarity: torch.Tensor,
    word_counts: Sequence[int],
    *,
    texts: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> list[WordAccuracy]:
    """Word -> class accuracy of the first ``n`` words of every image, for each ``n`` in ``word_counts``.

    Args:
        words: ``[B, W]`` codebook rows of each image's words, layer after layer (``SPAE.encode``'s layout).
        labels: ``[B]`` class indices.
        similarity: ``[C, V]`` class-name to token similarity (`class_word_similarity`).
        word_counts: prefixes to score, e.g. the running totals of the pyramid (1, 5, 21).
        texts, class_names: the token texts (``vocab.texts``) and class names, for ``contains_class_name``
            (0 when not given).

    Returns one `WordAccuracy` per entry of ``word_counts`` (``layers`` = its position, 1-based).
    """
    if words.dim() != 2 or labels.dim() != 1 or words.shape[0] != labels.shape[0]:
        raise ValueError(
            f"words must be [B, W] and labels [B], got {tuple(words.shape)} and {tuple(labels.shape)}"
        )
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be [C, V], got {tuple(similarity.shape)}")
    num_classes, num_rows = similarity.shape
    words, labels = words.long().cpu(), labels.long().cpu()
    if words.numel() and (int(words.min()) < 0 or int(words.max()) >= num_rows):
        raise ValueError(f"words must be codebook rows in [0, {num_rows})")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be class indices in [0, {num_classes})")
    count = max(1, labels.numel())
    chance = float(torch.bincount(labels, minlength=num_classes).max()) / count if labels.numel() else 0.0
    names = [normalized_word(name) for name in class_names] if class_names is not None else None
    results = []
    for layer, n in enumerate(word_counts, 1):
        if not 1 <= n <= words.shape[1]:
            raise ValueError(f"word_counts must lie in [1, {words.shape[1]}], got {n}")
        prefix = words[:, :n]
        scores = similarity.cpu()[:, prefix].mean(-1).T  # [B, C]
        accuracy = float((scores.argmax(1) == labels).float().sum()) / count
        contains = 0.0
        if texts is not None and names is not None:
            hits = sum(names[label] in {normalized_word(texts[k]) for k in row}
                       for label, row in zip(labels.tolist(), prefix.tolist()))  # fmt: skip
            contains = hits / count
        results.append(WordAccuracy(layer, int(n), accuracy, contains, chance, int(labels.numel())))
    return results


@torch.no_grad()
def evaluate_words(
    model,
    dataset,
    similarity: torch.Tensor,
    layers: int,
    class_names: Sequence[str] | None = None,
    *,
    limit: int | None = None,
    batch: int = 128,
) -> list[WordAccuracy]:
    """Word -> class accuracy of an `SPAE`'s words on a labelled dataset (items ``(image, label)``): the words of
    layers 1..n for n = 1..``layers``, over the first ``limit`` images (all by default), encoded in batches."""
    count = len(dataset) if limit is None else min(int(limit), len(dataset))
    if count < 1:
        raise ValueError("evaluate_words needs at least one image")
    layers = model.quantizer.pyramid.check_num_layers(layers)
    was_training = model.training
    model.eval()
    words, labels = [], []
    device = next(model.parameters()).device
    for start in range(0, count, batch):
        items = [dataset[i] for i in range(start, min(start + batch, count))]
        words.append(model.encode(torch.stack([image for image, _ in items]).to(device), layers).cpu())
        labels += [int(label) for _, label in items]
    model.train(was_training)
    pyramid = model.quantizer.pyramid
    return word_class_accuracy(
        torch.cat(words), torch.tensor(labels), similarity, [pyramid.total(n) for n in range(1, layers + 1)],
        texts=model.vocab.texts, class_names=class_names,
    )  # fmt: skip


__all__ = ["WordAccuracy", "class_word_similarity", "evaluate_words", "normalized_word", "word_class_accuracy"]
