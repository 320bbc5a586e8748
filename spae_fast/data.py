"""Small image datasets for training and testing the SPAE autoencoder, and a resumable, DDP-sharded loader.

Every dataset is a torch ``Dataset`` whose items are ``(image [3, S, S] float32 in [-1, 1], label int64 [])``
and which exposes ``.class_names`` (list of str) and ``.labels`` (``[N]`` int64):

- `DigitsDataset`: scikit-learn's 8x8 handwritten digits, upscaled (offline, 1797 images, 10 classes).
- `ImageFolderDataset`: a folder of images, optionally one subfolder per class (loaded lazily).
- `SkimageDataset`: random crops of scikit-image's bundled sample photos (offline).
- `build_dataset(name, image_size, **kw)`: ``"digits"`` | ``"skimage"`` | a folder path.
- `infinite_loader(dataset, batch_size, seed, rank, world_size, start_step)`: endless ``(images [B, 3, S, S],
  labels [B])`` batches with a deterministic per-epoch shuffle, sharded across ranks, resumable at a step.

In-memory datasets (digits, skimage) precompute all tensors at construction and offer ``get_batch(indices)``,
which the loader uses instead of per-item indexing.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .imaging import load_image

__all__ = [
    "DIGIT_NAMES",
    "IMAGE_EXTENSIONS",
    "SKIMAGE_NAMES",
    "DigitsDataset",
    "ImageFolderDataset",
    "SkimageDataset",
    "build_dataset",
    "infinite_loader",
]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# skimage.data images bundled with scikit-image (no pooch download needed); ones that fail to load are skipped.
SKIMAGE_NAMES = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "immunohistochemistry",
    "hubble_deep_field", "retina", "colorwheel", "brick", "grass", "gravel", "clock", "page", "text",
)  # fmt: skip


def _check_int(name: str, value: object, low: int | None) -> None:
    """An int (>= low unless None); bools (an int subclass) and floats (never truncated) are refused."""
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
        raise ValueError(f"{name} must be an int{'' if low is None else f' >= {low}'}, got {value!r}")


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N, C, size, size]``, bicubic with antialiasing, clamped to [-1, 1]."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(-1.0, 1.0)


class _InMemoryDataset(Dataset):
    images: torch.Tensor  # [N, 3, S, S] float32 in [-1, 1]
    labels: torch.Tensor  # [N] int64
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``indices [B]`` int64 -> ``(images [B, 3, S, S], labels [B])``."""
        return self.images[indices], self.labels[indices]


class DigitsDataset(_InMemoryDataset):
    """scikit-learn's ``load_digits`` (1797 grey 8x8 images, values 0..16), as RGB ``[3, S, S]`` in [-1, 1].

    Pixels map to ``v / 8 - 1``, are upscaled to ``image_size`` with antialiased bicubic interpolation (clamped
    to [-1, 1]) and replicated to 3 channels. The train / test split is stratified and deterministic: within
    each digit, a ``torch.Generator`` seeded with ``seed`` permutes the images and the first
    ``round(test_fraction * count)`` go to the test split. ``split="all"`` keeps every image.

    Labels are the digits themselves (0..9), also when ``classes`` selects a subset: a label indexes the full
    ``class_names`` list (``DIGIT_NAMES``), not a remapped 0..len(classes)-1 range. ``.classes`` holds the
    chosen digits.

    Args:
        image_size: output side S (32).
        split: ``"train"``, ``"test"`` or ``"all"``.
        classes: digits to keep (subset of 0..9), None for all.
        seed: split seed.
        test_fraction: share of each digit in the test split, in (0, 1).
    """

    def __init__(
        self,
        image_size: int = 32,
        split: str = "train",
        classes: Sequence[int] | None = None,
        seed: int = 0,
        test_fraction: float = 0.2,
    ) -> None:
        _check_image_size(image_size)
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        if isinstance(test_fraction, bool) or not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        _check_int("seed", seed, None)
        if classes is None:
            classes = tuple(range(10))
        else:
            given = classes.tolist() if hasattr(classes, "tolist") else classes  # numpy / torch
            try:  # operator.index: ints and numpy ints, never 1.5 -> class 1 or True -> class 1
                if isinstance(given, (str, bytes)) or any(isinstance(c, bool) for c in given):
                    raise TypeError
                classes = tuple(sorted({operator.index(c) for c in given}))
            except TypeError:
                raise ValueError(f"classes must be a non-empty subset of 0..9 (ints), got {given!r}") from None
            if not classes or classes[0] < 0 or classes[-1] > 9:
                raise ValueError(f"classes must be a non-empty subset of 0..9, got {given!r}")
        from sklearn.datasets import load_digits

        digits = load_digits()
        all_images = torch.from_numpy(digits.images.astype(np.float32))  # [1797, 8, 8], 0..16
        all_labels = torch.from_numpy(digits.target.astype(np.int64))  # [1797]

        generator = torch.Generator().manual_seed(seed)
        chosen = []
        for digit in range(10):  # every digit draws from the generator, so a subset keeps the same split
            members = torch.nonzero(all_labels == digit).flatten()
            order = members[torch.randperm(members.numel(), generator=generator)]
            num_test = round(test_fraction * members.numel())
            if digit not in classes:
                continue
            part = {"test": order[:num_test], "train": order[num_test:], "all": order}[split]
            chosen.append(part.sort().values)
        index = torch.cat(chosen).sort().values

        images = all_images[index].unsqueeze(1) / 8.0 - 1.0  # [N, 1, 8, 8] in [-1, 1]
        self.images = _resize(images, image_size).expand(-1, 3, -1, -1).contiguous()  # [N, 3, S, S]
        self.labels = all_labels[index].clone()  # [N]
        self.indices = index  # rows of load_digits()
        self.classes = list(classes)
        self.class_names = list(DIGIT_NAMES)
        self.split = split
        self.image_size = image_size


class ImageFolderDataset(Dataset):
    """Images in a folder, loaded lazily with `load_image` (RGB, shorter side resized, center-cropped).

    If ``root`` has subfolders holding images, each such subfolder is a class (searched recursively):
    label = index of the subfolder in sorted order, ``class_names`` = the subfolder names; files directly in
    ``root`` are then ignored. Otherwise every image directly in ``root`` has label 0 and ``class_names`` is
    ``[root's name]``. Hidden files and folders (starting with ".") are skipped; files are sorted by path.

    Args:
        root: the folder.
        image_size: output side S (128).
        extensions: accepted file suffixes (case-insensitive).
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 128,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:  # fmt: skip
        _check_image_size(image_size)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root {str(self.root)!r} is not an existing folder")
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not self.extensions:
            raise ValueError("extensions must name at least one file suffix")
        self.image_size = image_size

        class_dirs = []
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if self._images_in(sub, recursive=True):
                class_dirs.append(sub)
        samples: list[tuple[Path, int]] = []
        if class_dirs:
            self.class_names = [d.name for d in class_dirs]
            for label, sub in enumerate(class_dirs):
                samples += [(path, label) for path in self._images_in(sub, recursive=True)]
        else:
            self.class_names = [self.root.resolve().name]
            samples = [(path, 0) for path in self._images_in(self.root, recursive=False)]
        if not samples:
            raise ValueError(
                f"root {str(self.root)!r} holds no images with extensions {self.extensions} "
                f"(directly or in class subfolders)"
            )
        self.samples = samples
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.int64)  # [N]

    def _images_in(self, folder: Path, recursive: bool) -> list[Path]:
        paths = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(
            p for p in paths
            if p.is_file() and p.suffix.lower() in self.extensions
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, _ = self.samples[index]
        return load_image(path, self.image_size), self.labels[index]


class SkimageDataset(_InMemoryDataset):
    """Random square crops of scikit-image's bundled sample images, resized to ``image_size``.

    Each image named in ``names`` (default `SKIMAGE_NAMES`) is loaded with ``skimage.data.<name>()``; any that
    raises (e.g. one that would need a download) is skipped and recorded in ``.skipped``. Grey images are
    replicated to 3 channels, RGBA drops alpha. From each image, ``crops_per_image`` square crops are drawn
    (side uniform in ``[min_crop_fraction, 1]`` of the shorter side, uniform position; ``torch.Generator``
    seeded with ``seed``) and resized with antialiased bicubic interpolation. Label = index of the source image
    in ``class_names`` (the names that loaded). All crops are precomputed.

    Args:
        image_size: output side S (128).
        crops_per_image: crops per source image (16).
        seed: crop seed.
        names: skimage.data function names to try.
        min_crop_fraction: smallest crop side as a fraction of the image's shorter side, in (0, 1].
    """

    def __init__(
        self,
        image_size: int = 128,
        crops_per_image: int = 16,
        seed: int = 0,
        names: Sequence[str] = SKIMAGE_NAMES,
        min_crop_fraction: float = 0.5,
    ) -> None:
        _check_image_size(image_size)
        if isinstance(crops_per_image, bool) or not isinstance(crops_per_image, int) or crops_per_image < 1:
            raise ValueError(f"crops_per_image must be a positive int, got {crops_per_image!r}")
        _check_int("seed", seed, None)
        if isinstance(min_crop_fraction, bool) or not 0.0 < min_crop_fraction <= 1.0:
            raise ValueError(f"min_crop_fraction must be in (0, 1], got {min_crop_fraction!r}")
        import warnings

        import skimage.data

        generator = torch.Generator().manual_seed(seed)
        crops, labels, self.class_names, self.skipped = [], [], [], []
        for name in names:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    array = np.asarray(getattr(skimage.data, name)())
            except Exception:  # noqa: BLE001 - missing function, needs a download, unreadable: skip it
                self.skipped.append(name)
                continue
            image = self._to_tensor(array)  # [3, H, W] in [-1, 1]
            label = len(self.class_names)
            self.class_names.append(name)
            height, width = image.shape[-2:]
            short = min(height, width)
            for _ in range(crops_per_image):
                u = torch.rand(3, generator=generator).tolist()
                side = max(1, round(short * (min_crop_fraction + (1.0 - min_crop_fraction) * u[0])))
                top = int(u[1] * (height - side + 1))
                left = int(u[2] * (width - side + 1))
                crop = image[:, top : top + side, left : left + side].unsqueeze(0)
                crops.append(_resize(crop, image_size)[0])
                labels.append(label)
        if not crops:
            raise ValueError(f"none of the skimage.data images {tuple(names)} could be loaded")
        self.images = torch.stack(crops)  # [N, 3, S, S]
        self.labels = torch.tensor(labels, dtype=torch.int64)  # [N]
        self.image_size = image_size

    @staticmethod
    def _to_tensor(array: np.ndarray) -> torch.Tensor:
        if array.dtype == bool:
            array = array.astype(np.float32)
        elif np.issubdtype(array.dtype, np.integer):
            array = array.astype(np.float32) / float(np.iinfo(array.dtype).max)
        else:
            array = array.astype(np.float32)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        array = array[..., :3]
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=2)
        return torch.from_numpy(np.ascontiguousarray(array * 2.0 - 1.0)).permute(2, 0, 1).clamp(-1.0, 1.0)


def build_dataset(name: str | os.PathLike, image_size: int, **kwargs) -> Dataset:
    """``"digits"`` -> `DigitsDataset`, ``"skimage"`` -> `SkimageDataset`, an existing folder ->
    `ImageFolderDataset`; ``kwargs`` go to the constructor."""
    key = os.fspath(name)
    if key == "digits":
        return DigitsDataset(image_size=image_size, **kwargs)
    if key == "skimage":
        return SkimageDataset(image_size=image_size, **kwargs)
    if os.path.isdir(key):
        return ImageFolderDataset(key, image_size=image_size, **kwargs)
    raise ValueError(f"dataset name must be 'digits', 'skimage' or an existing image folder, got {key!r}")


def infinite_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(images [B, 3, S, S], labels [B] int64)`` batches, deterministic, sharded, resumable.

    Epoch e permutes ``range(N)`` with a ``torch.Generator`` seeded ``seed + e``; the permutation is cut to
    ``per_rank = N // world_size`` indices per rank (the tail ``N % world_size`` is dropped, so every rank sees
    the same count) and rank r takes ``perm[r : per_rank * world_size : world_size]``. Each rank's epochs are
    concatenated into one stream and cut into consecutive batches of ``batch_size``, so no batch is short and
    a batch may span an epoch boundary (also when ``batch_size > per_rank``). The batch yielded first is batch
    number ``start_step``: resuming at step k yields exactly what continuing from step k would, without
    loading the skipped images. Datasets with ``get_batch(indices)`` are indexed in one call; others item by
    item and ``torch.stack``-ed.
    """
    for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                             ("rank", rank, 0), ("start_step", start_step, 0), ("seed", seed, None)):  # fmt: skip
        _check_int(name, value, low)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size = {world_size}, got {rank}")
    size = len(dataset)
    per_rank = size // world_size
    if per_rank == 0:
        raise ValueError(f"dataset has {size} items, fewer than world_size = {world_size}")
    return _loader(dataset, batch_size, seed, rank, world_size, start_step, size, per_rank)


def _loader(dataset, batch_size, seed, rank, world_size, start_step, size, per_rank):
    position = start_step * batch_size  # index into this rank's endless stream
    epoch, offset = divmod(position, per_rank)
    shard = _shard(size, seed + epoch, rank, world_size, per_rank)
    get_batch = getattr(dataset, "get_batch", None)
    while True:
        parts, needed = [], batch_size
        while needed > 0:
            if offset == per_rank:
                epoch, offset = epoch + 1, 0
                shard = _shard(size, seed + epoch, rank, world_size, per_rank)
            take = min(needed, per_rank - offset)
            parts.append(shard[offset : offset + take])
            offset += take
            needed -= take
        indices = torch.cat(parts) if len(parts) > 1 else parts[0]
        if callable(get_batch):
            images, labels = get_batch(indices)
        else:
            items = [dataset[int(i)] for i in indices]
            images = torch.stack([item[0] for item in items])
            labels = torch.as_tensor([int(item[1]) for item in items], dtype=torch.int64)
        yield images, labels


def _shard(size: int, seed: int, rank: int, world_size: int, per_rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(size, generator=generator)
    return perm[rank : per_rank * world_size : world_size]
