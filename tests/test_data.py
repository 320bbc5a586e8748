"""spae_fast.data and spae_fast.imaging: datasets, the resumable sharded loader, grids and PNG I/O."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from spae_fast.data import (
    DIGIT_NAMES,
    DigitsDataset,
    ImageFolderDataset,
    SkimageDataset,
    build_dataset,
    infinite_loader,
)
from spae_fast.imaging import load_image, make_grid, save_grid, save_image, to_uint8


def _write_png(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _random_rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ digits


def test_digits_shapes_range_labels():
    train = DigitsDataset(image_size=16)
    image, label = train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and label.shape == ()
    assert train.images.min() >= -1 and train.images.max() <= 1
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grey replicated
    assert train.class_names == list(DIGIT_NAMES) and set(train.labels.tolist()) == set(range(10))
    full = DigitsDataset(image_size=8, split="all")
    assert len(full) == 1797
    assert full.images.min() == -1 and full.images.max() == 1  # 0 -> -1, 16 -> 1 at native size


def test_digits_split_disjoint_stratified_deterministic():
    train = DigitsDataset(image_size=8, split="train", seed=3)
    test = DigitsDataset(image_size=8, split="test", seed=3)
    assert set(train.indices.tolist()).isdisjoint(test.indices.tolist())
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.2 * 1797) <= 10
    counts = torch.bincount(test.labels, minlength=10).float() / torch.bincount(
        torch.cat([train.labels, test.labels]), minlength=10
    )
    assert torch.all((counts - 0.2).abs() < 0.02)  # stratified
    again = DigitsDataset(image_size=8, split="test", seed=3)
    assert torch.equal(again.indices, test.indices) and torch.equal(again.images, test.images)
    other = DigitsDataset(image_size=8, split="test", seed=4)
    assert not torch.equal(other.indices, test.indices)


def test_digits_class_subset_keeps_original_labels():
    subset = DigitsDataset(image_size=8, split="test", classes=[7, 3], seed=0)
    assert set(subset.labels.tolist()) == {3, 7} and subset.classes == [3, 7]
    assert subset.class_names[int(subset.labels[0])] in ("three", "seven")
    full = DigitsDataset(image_size=8, split="test", seed=0)
    keep = (full.labels == 3) | (full.labels == 7)
    assert torch.equal(subset.indices, full.indices[keep])  # same split as without the subset


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        DigitsDataset(split="val")
    with pytest.raises(ValueError, match="classes"):
        DigitsDataset(classes=[10])
    with pytest.raises(ValueError, match="image_size"):
        DigitsDataset(image_size=0)
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsDataset(test_fraction=1.0)


# ------------------------------------------------------------------------------------------------ folders


def test_image_folder_flat(tmp_path):
    root = tmp_path / "flowers"
    for i in range(3):
        _write_png(root / f"img{i}.png", _random_rgb(20, 30, i))
    (root / "notes.txt").write_text("not an image")
    dataset = ImageFolderDataset(root, image_size=16)
    assert len(dataset) == 3 and dataset.class_names == ["flowers"]
    image, label = dataset[1]
    assert image.shape == (3, 16, 16) and int(label) == 0
    assert image.min() >= -1 and image.max() <= 1


def test_image_folder_with_classes(tmp_path):
    root = tmp_path / "data"
    _write_png(root / "dog" / "a.png", _random_rgb(12, 12, 0))
    _write_png(root / "cat" / "b.png", _random_rgb(12, 12, 1))
    _write_png(root / "cat" / "nested" / "c.jpg", _random_rgb(12, 12, 2))
    (root / "empty").mkdir()
    _write_png(root / "loose.png", _random_rgb(12, 12, 3))  # ignored: class mode
    dataset = build_dataset(str(root), 8)
    assert isinstance(dataset, ImageFolderDataset)
    assert dataset.class_names == ["cat", "dog"]
    assert dataset.labels.tolist() == [0, 0, 1]
    images, labels = next(infinite_loader(dataset, batch_size=3, seed=0))
    assert images.shape == (3, 3, 8, 8) and sorted(labels.tolist()) == [0, 0, 1]


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="not an existing folder"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="dataset name"):
        build_dataset("imagenet-that-is-not-here", 32)


# ------------------------------------------------------------------------------------------------ skimage


def test_skimage_dataset():
    dataset = SkimageDataset(image_size=16, crops_per_image=2, names=("astronaut", "camera", "no_such_image"))
    assert dataset.class_names == ["astronaut", "camera"] and dataset.skipped == ["no_such_image"]
    assert len(dataset) == 4 and dataset.labels.tolist() == [0, 0, 1, 1]
    image, label = dataset[3]
    assert image.shape == (3, 16, 16) and int(label) == 1
    assert torch.equal(image[0], image[1])  # camera is grey
    assert dataset.images.min() >= -1 and dataset.images.max() <= 1
    again = SkimageDataset(image_size=16, crops_per_image=2, names=("astronaut", "camera"))
    assert torch.equal(again.images, dataset.images)


def test_skimage_dataset_default_names_non_empty():
    dataset = build_dataset("skimage", 8, crops_per_image=1)
    assert len(dataset) >= 5 and len(dataset.class_names) == len(dataset)


# ------------------------------------------------------------------------------------------------ loader


def _take(iterator, count):
    return list(itertools.islice(iterator, count))


def test_loader_deterministic_and_epoch_shuffle():
    dataset = DigitsDataset(image_size=8, split="test")
    first = _take(infinite_loader(dataset, 16, seed=5), 6)
    second = _take(infinite_loader(dataset, 16, seed=5), 6)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    other = _take(infinite_loader(dataset, 16, seed=6), 1)
    assert not torch.equal(other[0][0], first[0][0])
    assert first[0][0].shape == (16, 3, 8, 8) and first[0][1].shape == (16,)


class _IndexDataset(torch.utils.data.Dataset):
    """Item i is (a tensor holding i, label i); counts loads."""

    def __init__(self, size):
        self.size, self.loads = size, 0

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        self.loads += 1
        return torch.full((3, 1, 1), float(index)), torch.tensor(index)


def test_loader_epochs_cover_dataset():
    dataset = _IndexDataset(10)
    labels = torch.cat([b[1] for b in _take(infinite_loader(dataset, 5, seed=0), 4)])  # 2 epochs
    assert sorted(labels[:10].tolist()) == list(range(10)) and sorted(labels[10:].tolist()) == list(range(10))
    assert not torch.equal(labels[:10], labels[10:])  # reshuffled per epoch


def test_loader_sharding_disjoint():
    dataset = _IndexDataset(11)
    per_rank = [torch.cat([b[1] for b in _take(infinite_loader(dataset, 5, seed=1, rank=r, world_size=2), 1)])
                for r in range(2)]  # fmt: skip
    assert set(per_rank[0].tolist()).isdisjoint(per_rank[1].tolist())
    assert len(per_rank[0]) == len(per_rank[1]) == 5  # 11 // 2 = 5 per rank, tail dropped
    with pytest.raises(ValueError, match="rank"):
        infinite_loader(dataset, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        infinite_loader(dataset, 0)


@pytest.mark.parametrize("batch_size", [3, 7, 25])  # batches spanning epochs, and larger than an epoch
def test_loader_resume_equals_continuing(batch_size):
    dataset = _IndexDataset(10)
    continued = _take(infinite_loader(dataset, batch_size, seed=2, rank=1, world_size=2), 9)
    dataset.loads = 0
    resumed = _take(infinite_loader(dataset, batch_size, seed=2, rank=1, world_size=2, start_step=4), 5)
    assert dataset.loads == 5 * batch_size  # the skipped steps loaded nothing
    for a, b in zip(continued[4:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------------------------ imaging


def test_to_uint8_and_make_grid():
    images = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(2, 3, 1, 4)
    out = to_uint8(images)
    assert out.shape == (2, 1, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255]
    batch = torch.rand(5, 3, 4, 6) * 2 - 1
    grid = make_grid(batch, nrow=3, padding=2, pad_value=1.0)
    assert grid.shape == (3, 2 * 6 + 2, 3 * 8 + 2)
    assert torch.equal(grid[:, 2:6, 2:8], batch[0])
    assert torch.equal(grid[:, 8:12, 10:16], batch[4])  # row 1, column 1
    assert torch.all(grid[:, 8:12, 18:24] == 1.0)  # empty slot
    with pytest.raises(ValueError, match="images"):
        make_grid(torch.zeros(2, 4, 3, 3))


def test_save_image_png_round_trip(tmp_path):
    image = torch.rand(3, 10, 12) * 2 - 1
    path = save_image(tmp_path / "sub" / "one.png", image)
    loaded = np.asarray(Image.open(path))
    assert loaded.shape == (10, 12, 3) and np.array_equal(loaded, to_uint8(image))
    back = load_image(path, 10)  # same size: shorter side already 10, center crop 10x10 of width 12
    assert torch.allclose(
        back, torch.from_numpy(to_uint8(image)[:, 1:11]).permute(2, 0, 1) / 127.5 - 1, atol=1e-6
    )
    batch = torch.rand(4, 3, 5, 5) * 2 - 1
    grid_path = save_image(tmp_path / "grid.png", batch)
    assert np.asarray(Image.open(grid_path)).shape == (2 * 7 + 2, 2 * 7 + 2, 3)


def test_save_grid_rows_and_labels(tmp_path):
    originals = torch.rand(3, 3, 8, 8) * 2 - 1
    recon = torch.rand(2, 3, 8, 8) * 2 - 1
    path = save_grid(tmp_path / "g.png", [originals, recon])
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3)
    assert np.array_equal(grid[12:20, 2:10], to_uint8(recon[0]))
    labelled = np.asarray(Image.open(save_grid(tmp_path / "l.png", [originals, recon], ["input", "1 layer"])))
    assert labelled.shape[0] == grid.shape[0] and labelled.shape[1] > grid.shape[1]
    margin = labelled.shape[1] - grid.shape[1]
    assert np.array_equal(labelled[:, margin:], grid)
    assert (labelled[:, :margin] < 128).any()  # some text was drawn
    with pytest.raises(ValueError, match="row_labels"):
        save_grid(tmp_path / "x.png", [originals], ["a", "b"])
    with pytest.raises(ValueError, match="size"):
        save_grid(tmp_path / "x.png", [originals, torch.zeros(1, 3, 4, 4)])


def test_load_image_center_crop(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, 10:30] = 255  # the central 20 columns are white, the sides black
    _write_png(tmp_path / "wide.png", array)
    image = load_image(tmp_path / "wide.png", 10)  # 20x40 -> 10x20 -> central 10x10: all white
    assert image.shape == (3, 10, 10)
    assert torch.all(image[:, :, 1:-1] > 0.9)
    grey = np.full((8, 8), 0, dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    assert torch.all(load_image(tmp_path / "grey.png", 4) == -1.0)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png", 4)
    with pytest.raises(ValueError, match="size"):
        load_image(tmp_path / "grey.png", 0)
