"""Evaluation of a trained SPAE on held-out images: reconstruction PSNR per layer prefix and the relevance of its
words (`evaluate_model`). Whether the words name the image's class: `spae_fast.word_accuracy`."""

from __future__ import annotations

import torch

from .losses import psnr
from .model import SPAE
from .semantic import RelevanceProvider, normalize_relevance


@torch.no_grad()
def evaluate_model(
    model: SPAE,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    relevance: RelevanceProvider | None = None,
    semantic_layers: int = 2,
) -> dict[str, object]:
    """PSNR (dB, mean over images) of the reconstruction from every prefix of layers, and with a relevance
    provider the mean min-max-normalised relevance (in [0, 1]; the provider's plain ``similarity`` where it has
    one, i.e. without contrast) of the words chosen in each of the top ``semantic_layers`` layers and of all of
    them together. ``"reconstructions"``: one ``[B, C, H, W]`` per prefix. Whether the words name the image's
    class: `spae_fast.word_accuracy.evaluate_words`."""
    was_training = model.training
    model.eval()
    ids = model.encode(images)
    reconstructions = [model.decode(ids, num_layers=n).clamp(-1, 1) for n in range(1, model.num_layers + 1)]
    result: dict[str, object] = {
        "psnr": [round(float(psnr(r, images).mean()), 4) for r in reconstructions],
        "reconstructions": reconstructions,
    }
    if relevance is not None:
        scores = normalize_relevance(getattr(relevance, "similarity", relevance)(images, labels))  # [B, V] in [0, 1]
        pyramid = model.quantizer.pyramid
        per_layer = []
        for layer in range(min(semantic_layers, model.num_layers)):
            rows = ids[:, pyramid.first(layer) : pyramid.first(layer) + pyramid.counts()[layer]]
            per_layer.append(scores.gather(1, rows))
        result["relevance"] = [round(float(r.mean()), 4) for r in per_layer]
        result["relevance_mean"] = round(float(torch.cat(per_layer, 1).mean()), 4)
    model.train(was_training)
    return result
