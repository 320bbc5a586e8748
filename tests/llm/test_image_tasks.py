"""spae_fast.llm.image_tasks: the image transforms of image-to-image tasks."""

from __future__ import annotations

import pytest
import torch

from spae_fast.llm import flip_images, mask_images, shift_images, task_pairs


def test_image_transforms():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert torch.equal(flip_images(images), images.flip(-1))
    assert torch.equal(flip_images(images, horizontal=False), images.flip(-2))
    shifted = shift_images(images, dy=1, dx=-2, fill=-1.0)
    assert torch.equal(shifted[..., 1:, :2], images[..., :3, 2:])
    assert (shifted[..., 0, :] == -1).all() and (shifted[..., :, 2:] == -1).all()
    assert torch.equal(shift_images(images, dy=5), torch.full_like(images, -1.0))
    masked = mask_images(images)
    assert (masked[..., 1:3, 1:3] == 0).all() and masked[..., 0, 0].eq(images[..., 0, 0]).all()
    inputs, outputs = task_pairs("inpaint", images)
    assert torch.equal(outputs, images) and torch.equal(inputs, masked)
    inputs, outputs = task_pairs("shift", images)
    assert torch.equal(outputs, shift_images(images, dx=1))
    with pytest.raises(ValueError, match="task must be"):
        task_pairs("rotate", images)
    with pytest.raises(ValueError, match="box"):
        mask_images(images, box=(0, 0, 5, 2))
