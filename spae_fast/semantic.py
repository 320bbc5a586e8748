"""Candidate sets of the semantic loss (SPAE-METHOD.md §4): from a relevance provider to the CSR form that
`spae_fast.semantic_loss` takes.

A relevance provider is anything that scores every codebook token for every image, e.g. CLIP: ``relevance =
provider(images)`` ``[B, V]`` with ``relevance[b, k] = f_I(image_b) . f_T(token_k)``. Per image the scores
are min-max normalised over the vocabulary, and layer l (of the top ``L_sem`` pyramid layers) gets the set

    C_l(I) = { k : s(I, k) >= rho_l },   rho non-increasing in l (default (0.98, 0.95, 0.90))

Sets are numbered image-major: set ``b * L_sem + l`` is C_l(image b). Every position sampled in layer l of
image b uses that set (`pyramid_set_of_position`), so a batch needs B * L_sem sets, not one per position.

Example (the SAQ targets of the top 3 layers, 1 + 4 + 16 = 21 positions per image)::

    index, offsets = spae_fast.semantic.candidates_from_relevance(clip_scores, (0.98, 0.95, 0.90))
    sets = spae_fast.semantic.pyramid_set_of_position(batch, (1, 2, 4))          # [B, 21]
    loss = spae_fast.semantic_loss(targets, codebook, index, offsets, sets)       # targets [B, 21, D]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Protocol

import torch

from .pyramid import check_sides

DEFAULT_THRESHOLDS = (0.98, 0.95, 0.90)


class RelevanceProvider(Protocol):
    """Scores every codebook token for every image (higher = more relevant); see `spae_fast.relevance`.

    ``provider(images, labels=None) -> relevance [B, V]`` float32 on ``images.device``, with ``images``
    ``[B, 3, H, W]`` float in [-1, 1] and ``labels`` ``[B]`` int64 class indices (``None`` when the data set
    has none; label-driven providers such as `spae_fast.relevance.LabelTextRelevance` require them, CLIP's
    ignores them). ``provider.num_rows`` is V, which must equal the codebook's rows.
    """

    @property
    def num_rows(self) -> int: ...

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor: ...


def pack_candidate_sets(candidate_sets: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of S integer tensors (the codebook rows of each set) -> ``(candidate_index [M] int64,
    candidate_offsets [S + 1] int64)``. Sets may be empty; order and duplicates are kept."""
    if isinstance(candidate_sets, torch.Tensor) or not isinstance(candidate_sets, Sequence):
        raise TypeError(
            f"candidate_sets must be a list of 1-D integer tensors, got {type(candidate_sets).__name__}"
        )
    device = torch.device("cpu")
    for s, rows in enumerate(candidate_sets):
        if not isinstance(rows, torch.Tensor):
            raise TypeError(f"candidate_sets[{s}] must be a torch.Tensor, got {type(rows).__name__}")
        if (
            rows.dtype.is_floating_point
            or rows.dtype.is_complex
            or rows.dtype == torch.bool
            or rows.dim() != 1
        ):
            raise ValueError(
                f"candidate_sets[{s}] must be a 1-D integer tensor of codebook rows, got {rows.dtype} of shape "
                f"{tuple(rows.shape)}"
            )
        device = rows.device
    sizes = torch.tensor([int(rows.numel()) for rows in candidate_sets], dtype=torch.int64)
    offsets = torch.zeros(len(candidate_sets) + 1, dtype=torch.int64)
    offsets[1:] = sizes.cumsum(0)
    if not candidate_sets:
        return torch.zeros(0, dtype=torch.int64, device=device), offsets.to(device)
    index = torch.cat([rows.to(device=device, dtype=torch.int64) for rows in candidate_sets])
    return index, offsets.to(device)


def normalize_relevance(relevance: torch.Tensor) -> torch.Tensor:
    """s(I, k): each image's ``[B, V]`` scores min-max normalised over the vocabulary to [0, 1], fp32; an image
    whose scores are all equal gets s = 1 everywhere."""
    score = relevance.float()
    low = score.min(dim=1, keepdim=True).values
    span = score.max(dim=1, keepdim=True).values - low
    return torch.where(span > 0, (score - low) / span.clamp_min(torch.finfo(torch.float32).tiny), 1.0)


def candidates_from_relevance(
    relevance: torch.Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, *, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate sets C_l(I) = {k : s(I, k) >= rho_l} of every image and semantic layer, in CSR form.

    Args:
        relevance: ``[B, V]`` scores from a relevance provider (e.g. CLIP image-text similarity).
        thresholds: rho_1 .. rho_L (one per semantic layer, top layer first), each in [0, 1] when
            ``normalize``.
        normalize: min-max normalise each image's scores over the vocabulary first (the method); an image
            whose scores are all equal gets s = 1 everywhere.

    Returns:
        ``(candidate_index [M] int64, candidate_offsets [B * L + 1] int64)``; set ``b * L + l`` holds the rows of
        C_l(image b) in ascending order.
    """
    if (
        not isinstance(relevance, torch.Tensor)
        or relevance.dim() != 2
        or not relevance.dtype.is_floating_point
    ):
        shown = tuple(relevance.shape) if isinstance(relevance, torch.Tensor) else type(relevance).__name__
        raise ValueError(f"relevance must be a floating [B, V] tensor, got {shown}")
    if not isinstance(normalize, bool):  # None would silently mean "do not normalise"
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__} {normalize!r}")
    if hasattr(thresholds, "tolist") and not isinstance(thresholds, Sequence):  # a numpy array or tensor
        thresholds = thresholds.tolist()
    if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence):
        raise TypeError(f"thresholds must be a sequence of numbers (one rho per semantic layer), got {thresholds!r}")
    if not thresholds:
        raise ValueError("thresholds must hold at least one rho (one per semantic layer)")
    for layer, rho in enumerate(thresholds):
        # NaN would make every candidate set empty; normalised scores live in [0, 1]
        if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not math.isfinite(rho) or (
            normalize and not 0.0 <= rho <= 1.0
        ):
            expected = "a number in [0, 1] (normalised scores)" if normalize else "a finite number"
            raise ValueError(f"thresholds[{layer}] must be {expected}, got {rho!r}")
    thresholds = [float(rho) for rho in thresholds]
    score = normalize_relevance(relevance) if normalize else relevance.float()
    mask = torch.stack([score >= rho for rho in thresholds], dim=1).reshape(-1, score.shape[1])  # [B * L, V]
    index = mask.nonzero()[:, 1].contiguous()
    offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=relevance.device)
    offsets[1:] = mask.sum(1).cumsum(0)
    return index, offsets


def pyramid_set_of_position(
    batch: int, sides: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[B, sum_l s_l^2]`` int64: the set (``b * L + l``) of every position of the top L = len(sides) pyramid
    layers, laid out as the SAQ ids (layer after layer, raster order within a layer)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be an int >= 0, got {batch!r}")
    sides = list(check_sides(sides, "sides"))  # positive ints; never truncates 2.5 to 2
    layer = torch.cat([torch.full((side * side,), i, dtype=torch.int64) for i, side in enumerate(sides)])
    sets = torch.arange(batch, dtype=torch.int64)[:, None] * len(sides) + layer[None, :]
    return sets.to(device)
