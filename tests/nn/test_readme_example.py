"""vector-quantize-pytorch's own training example (examples/autoencoder.py of its repository: a small conv
autoencoder with `VectorQuantize(dim=32, accept_image_fmap=True)`, Adam 3e-4, loss = L1 + 10 * commitment), run
unchanged except for where the name VectorQuantize comes from, on sklearn's digits (offline) instead of
FashionMNIST. Same seed: spae_fast.nn's layer must train the same way (same losses while no near-tie intervenes,
and the same final quality)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

vqp = pytest.importorskip("vector_quantize_pytorch")
datasets = pytest.importorskip("sklearn.datasets")


def build_and_train(VectorQuantize, images, train_iterations=150, alpha=10, seed=1234):
    torch.manual_seed(seed)

    class SimpleVQAutoEncoder(nn.Module):
        def __init__(self, **vq_kwargs):
            super().__init__()
            self.layers = nn.ModuleList([
                nn.Conv2d(1, 16, kernel_size=3, stride=1, padding=1),
                nn.MaxPool2d(kernel_size=2, stride=2),
                nn.GELU(),
                nn.Conv2d(16, 32, kernel_size=3, stride=1, padding=1),
                nn.MaxPool2d(kernel_size=2, stride=2),
                VectorQuantize(dim=32, accept_image_fmap=True, **vq_kwargs),
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(32, 16, kernel_size=3, stride=1, padding=1),
                nn.GELU(),
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(16, 1, kernel_size=3, stride=1, padding=1),
            ])  # fmt: skip

        def forward(self, x):
            for layer in self.layers:
                if isinstance(layer, VectorQuantize):
                    x, indices, commit_loss = layer(x)
                else:
                    x = layer(x)
            return x.clamp(-1, 1), indices, commit_loss

    model = SimpleVQAutoEncoder(codebook_size=256)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    generator = torch.Generator().manual_seed(0)
    history = []
    for _ in range(train_iterations):
        opt.zero_grad()
        x = images[torch.randint(0, images.shape[0], (256,), generator=generator)]
        out, indices, cmt_loss = model(x)
        rec_loss = (out - x).abs().mean()
        (rec_loss + alpha * cmt_loss).backward()
        opt.step()
        history.append((rec_loss.item(), cmt_loss.item(), indices.unique().numel()))
    return history


def test_readme_autoencoder_trains_the_same(set_threads):
    from spae_fast.nn import VectorQuantize

    set_threads(1)  # tiny convolutions: threads only add contention on a shared machine
    digits = torch.tensor(datasets.load_digits().images, dtype=torch.float32)  # [1797, 8, 8], 0..16
    images = (digits / 8.0 - 1.0)[:, None]  # [-1, 1], like the example's Normalize((0.5,), (0.5,))
    theirs = build_and_train(vqp.VectorQuantize, images)
    ours = build_and_train(VectorQuantize, images)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-4)  # same init, same first step
    same = 0
    for a, b in zip(ours, theirs):
        if a[2] != b[2] or abs(a[0] - b[0]) > 1e-3 * b[0]:
            break
        same += 1
    print(
        f"readme example: identical for {same} of {len(ours)} steps; final L1 {ours[-1][0]:.4f} vs {theirs[-1][0]:.4f}"
    )
    assert same >= 50, f"the two trainings agree for only {same} steps"
    assert ours[-1][0] < 0.6 * ours[0][0]  # it trains: reconstruction L1 0.78 -> ~0.37 in 150 steps
    assert ours[-1][0] == pytest.approx(theirs[-1][0], rel=0.1)
