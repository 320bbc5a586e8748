"""Image I/O and grids without torchvision: images are float tensors in [-1, 1], ``[3, H, W]`` or ``[B, 3, H, W]``.

- `to_uint8`: ``[B, 3, H, W]`` in [-1, 1] -> ``uint8 [B, H, W, 3]`` numpy.
- `load_image`: file -> ``[3, size, size]`` in [-1, 1] (RGB, bicubic resize of the shorter side, center crop).
- `make_grid`: ``[B, 3, H, W]`` -> one ``[3, H', W']`` image (torchvision's layout).
- `save_image`: one image or a batch (as a grid) -> PNG.
- `save_grid`: rows of images (e.g. originals, then reconstructions with 1, 2, ... pyramid layers) -> one PNG,
  optionally with a text label left of each row.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["load_image", "make_grid", "save_grid", "save_image", "to_uint8"]

_BICUBIC = Image.Resampling.BICUBIC


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` (or ``[3, H, W]``) floats in [-1, 1] -> ``uint8`` numpy ``[B, H, W, 3]`` (``[H, W, 3]``).

    Values are clamped to [-1, 1] and mapped with ``round((x + 1) * 127.5)``.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() not in (3, 4) or images.shape[-3] not in (1, 3):
        raise ValueError(
            f"images must be [B, 3, H, W] or [3, H, W] (1 or 3 channels), got shape {tuple(images.shape)}"
        )
    x = images.detach().to(device="cpu", dtype=torch.float32).clamp(-1.0, 1.0)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8)
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return x.movedim(-3, -1).contiguous().numpy()


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image -> ``[3, H, W]`` float32 in [-1, 1] (converted to RGB)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # [H, W, 3]
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize (bicubic, antialiased) so the shorter side is ``size``, then crop the central ``size x size``."""
    width, height = image.size
    scale = size / min(width, height)
    new_w = max(size, round(width * scale))
    new_h = max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), _BICUBIC)
    left = (new_w - size) // 2
    top = (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """Read an image file -> ``[3, size, size]`` float32 in [-1, 1].

    Converted to RGB (grey, palette and RGBA too), resized with bicubic filtering so the shorter side is
    ``size``, then center-cropped to a square.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {str(path)!r}")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")  # decodes the whole file: truncated data fails here
            return pil_to_tensor(resize_center_crop(image, size))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # PIL's messages may not name the file ("image file is truncated"); SyntaxError: broken PNG chunks
        raise ValueError(f"{str(path)!r} is not a readable image ({' '.join(str(error).split())})") from error


def _as_batch(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"{name} must be [B, 3, H, W] or [3, H, W] (1 or 3 channels), got shape {tuple(images.shape)}"
        )
    images = images.detach().to(device="cpu", dtype=torch.float32)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images


def _check_pad_value(pad_value: float) -> None:
    if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float)) or not math.isfinite(pad_value):
        raise ValueError(f"pad_value must be a finite number (1.0 white, -1.0 black), got {pad_value!r}")


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile ``images [B, 3, H, W]`` into one image ``[3, H', W']`` (same layout as torchvision's ``make_grid``).

    ``min(nrow, B)`` images per row, ``ceil(B / nrow)`` rows, ``padding`` pixels of ``pad_value`` (in the
    images' [-1, 1] scale: 1.0 is white, -1.0 black) around and between them:
    ``H' = rows * (H + padding) + padding``, ``W' = cols * (W + padding) + padding``. A ``[3, H, W]`` input
    is returned as a 1-image grid. Output on the CPU, float32.
    """
    images = _as_batch(images)
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    _check_pad_value(pad_value)
    count, channels, height, width = images.shape
    if count == 0:
        raise ValueError("images is empty (B = 0)")
    cols = min(nrow, count)
    rows = math.ceil(count / cols)
    cell_h, cell_w = height + padding, width + padding
    grid = torch.full((channels, rows * cell_h + padding, cols * cell_w + padding), float(pad_value))
    for index in range(count):
        r, c = divmod(index, cols)
        top, left = r * cell_h + padding, c * cell_w + padding
        grid[:, top : top + height, left : left + width] = images[index]
    return grid


def save_image(path: str | os.PathLike, images: torch.Tensor, nrow: int | None = None, padding: int = 2,
               pad_value: float = 1.0) -> Path:  # fmt: skip
    """Write ``images`` (``[3, H, W]``, or ``[B, 3, H, W]`` tiled by `make_grid`) in [-1, 1] to a PNG.

    ``nrow`` defaults to ``ceil(sqrt(B))`` (a near-square grid). Note the argument order: path first (unlike
    torchvision's ``save_image(tensor, fp)``), as in `save_grid`. Parent folders are created. Returns the path.
    """
    if isinstance(path, torch.Tensor):
        raise TypeError("save_image takes (path, images): the path comes first")
    batch = _as_batch(images)
    if images.dim() == 3:
        grid = batch[0]
    else:
        grid = make_grid(batch, nrow or math.ceil(math.sqrt(batch.shape[0])), padding, pad_value)
    return _write_png(path, Image.fromarray(to_uint8(grid)))


def _write_png(path: str | os.PathLike, image: Image.Image) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def save_grid(
    path: str | os.PathLike,
    rows: Sequence[torch.Tensor],
    row_labels: Sequence[str] | None = None,
    padding: int = 2,
    pad_value: float = 1.0,
) -> Path:
    """Write one PNG with one row per tensor in ``rows`` (each ``[B_r, 3, H, W]`` in [-1, 1]; all H, W equal).

    Typical use: originals, then the reconstructions from 1, 2, ... pyramid layers. Rows with fewer images
    than the longest are padded with ``pad_value``. With ``row_labels`` (one string per row) a white left
    margin holds each label in PIL's default font, vertically centred on its row. Returns the path.
    """
    if isinstance(rows, torch.Tensor) or not isinstance(rows, Sequence) or len(rows) == 0:
        raise ValueError("rows must be a non-empty list of [B, 3, H, W] tensors")
    batches = [_as_batch(row, f"rows[{i}]") for i, row in enumerate(rows)]
    size = batches[0].shape[-2:]
    for i, batch in enumerate(batches):
        if batch.shape[-2:] != size:
            raise ValueError(
                f"rows[{i}] has images of size {tuple(batch.shape[-2:])}, rows[0] has {tuple(size)}"
            )
        if batch.shape[0] == 0:
            raise ValueError(f"rows[{i}] is empty")
    if row_labels is not None and len(row_labels) != len(batches):
        raise ValueError(f"row_labels has {len(row_labels)} entries but there are {len(batches)} rows")
    cols = max(b.shape[0] for b in batches)
    cells = []
    for batch in batches:
        if batch.shape[0] < cols:
            filler = torch.full((cols - batch.shape[0], *batch.shape[1:]), float(pad_value))
            batch = torch.cat([batch, filler])
        cells.append(batch)
    grid = make_grid(torch.cat(cells), nrow=cols, padding=padding, pad_value=pad_value)
    image = Image.fromarray(to_uint8(grid))
    if row_labels is not None:
        font = ImageFont.load_default()
        probe = ImageDraw.Draw(image)
        boxes = [probe.textbbox((0, 0), str(label), font=font) for label in row_labels]
        margin = max(box[2] - box[0] for box in boxes) + 8
        canvas = Image.new("RGB", (image.width + margin, image.height), (255, 255, 255))
        canvas.paste(image, (margin, 0))
        draw = ImageDraw.Draw(canvas)
        cell_h = int(size[0]) + padding
        for r, (label, box) in enumerate(zip(row_labels, boxes)):
            centre = padding + r * cell_h + int(size[0]) // 2
            draw.text((4 - box[0], centre - (box[3] + box[1]) // 2), str(label), fill=(0, 0, 0), font=font)
        image = canvas
    return _write_png(path, image)
