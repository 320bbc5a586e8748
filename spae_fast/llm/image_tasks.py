"""Image transforms that make the pairs of image-to-image tasks (images ``[B, C, H, W]`` in [-1, 1]):
mirror, shift and inpaint (`task_pairs`)."""

from __future__ import annotations

import torch

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
