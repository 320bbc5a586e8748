"""spae_fast.losses: pixel / hinge / LeCAM / perceptual / weighting losses and PSNR against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from spae_fast.losses import (
    VGG16_TAPS,
    LeCAMRegularizer,
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_gan_weight,
    dynamic_semantic_weight,
    hinge_d_loss,
    hinge_g_loss,
    pixel_loss,
    psnr,
)


def _images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


# ------------------------------------------------------------------------------------------------ pixel / psnr


def test_pixel_loss_values():
    a = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert pixel_loss(a, b).item() == pytest.approx((1 + 0 + 4 + 1) / 4)
    assert pixel_loss(a, b, kind="l1").item() == pytest.approx((1 + 0 + 2 + 1) / 4)
    assert pixel_loss(a, b).shape == ()


def test_pixel_loss_bad_inputs():
    with pytest.raises(ValueError, match="kind"):
        pixel_loss(torch.zeros(2), torch.zeros(2), kind="l3")
    with pytest.raises(ValueError, match="same shape"):
        pixel_loss(torch.zeros(2), torch.zeros(3))


def test_psnr_against_numpy():
    x = _images(3)
    y = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    recon = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))  # leaves [-1, 1]
    got = psnr(recon, y)
    r = np.clip(recon.numpy().astype(np.float64), -1, 1)
    mse = ((r - y.numpy().astype(np.float64)) ** 2).reshape(3, -1).mean(axis=1)
    expected = 10 * np.log10(4.0 / mse)
    assert got.shape == (3,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    assert torch.isinf(psnr(y, y)).all()
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0)


# ------------------------------------------------------------------------------------------------ discriminator


@pytest.mark.parametrize("size,expected", [(32, 2), (128, 14)])
def test_discriminator_output_shape(size, expected):
    disc = PatchDiscriminator(base_channels=16)
    out = disc(_images(2, size))
    assert out.shape == (2, 1, expected, expected)


def test_discriminator_clamps_layers_for_small_images():
    assert PatchDiscriminator(base_channels=8, image_size=16).num_layers == 2
    assert PatchDiscriminator(base_channels=8, image_size=8).num_layers == 1
    assert PatchDiscriminator(base_channels=8, image_size=32).num_layers == 3
    for size in (8, 16, 24):
        disc = PatchDiscriminator(base_channels=8, image_size=size)
        out = disc(_images(1, size))  # batch 1 works with GroupNorm
        assert out.shape[-1] >= 1
    with pytest.raises(ValueError, match="too small"):
        PatchDiscriminator(base_channels=8)(_images(1, 16))
    with pytest.raises(ValueError, match="image_size"):
        PatchDiscriminator(image_size=4)
    with pytest.raises(ValueError, match="num_layers"):
        PatchDiscriminator(num_layers=0)


def test_discriminator_init_and_gradients():
    torch.manual_seed(0)
    disc = PatchDiscriminator(base_channels=32)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.002
    assert any(isinstance(m, nn.GroupNorm) for m in disc.modules())
    images = _images(2, 32).requires_grad_(True)
    hinge_g_loss(disc(images)).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is not None for p in disc.parameters())


# ------------------------------------------------------------------------------------------------ hinge / LeCAM


def test_hinge_losses():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    expected_d = 0.5 * ((0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 2.5) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(expected_d)
    assert hinge_g_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)


def test_lecam_formula_and_ema():
    reg = LeCAMRegularizer(decay=0.9)
    real1, fake1 = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -3.0])
    value = reg(real1, fake1)  # first update copies the batch means: ema_real 2, ema_fake -2
    assert reg.ema_real.item() == pytest.approx(2.0) and reg.ema_fake.item() == pytest.approx(-2.0)
    expected = ((1 + 2) ** 2 + (3 + 2) ** 2) / 2 + ((2 + 1) ** 2 + (2 + 3) ** 2) / 2
    assert value.item() == pytest.approx(expected)
    real2, fake2 = torch.tensor([0.0]), torch.tensor([0.0])
    value = reg(real2, fake2)  # ema_real 0.9*2 = 1.8, ema_fake -1.8
    assert reg.ema_real.item() == pytest.approx(1.8) and reg.ema_fake.item() == pytest.approx(-1.8)
    assert value.item() == pytest.approx(1.8**2 + 1.8**2)
    assert int(reg.num_updates) == 2
    # eval: no update
    reg.eval()
    reg(torch.tensor([100.0]), torch.tensor([-100.0]))
    assert reg.ema_real.item() == pytest.approx(1.8) and int(reg.num_updates) == 2
    # the relu: real below ema_fake and fake above ema_real contribute nothing
    assert reg(torch.tensor([-5.0]), torch.tensor([5.0])).item() == 0.0


def test_lecam_state_dict_and_gradients():
    reg = LeCAMRegularizer()
    real = torch.randn(2, 1, 2, 2, requires_grad=True)
    fake = torch.randn(2, 1, 2, 2, requires_grad=True)
    reg(real, fake).backward()
    assert real.grad is not None and fake.grad is not None
    assert not reg.ema_real.requires_grad
    state = reg.state_dict()
    assert set(state) == {"ema_real", "ema_fake", "num_updates"}
    other = LeCAMRegularizer()
    other.load_state_dict(state)
    assert other.ema_real.item() == reg.ema_real.item() and int(other.num_updates) == 1
    with pytest.raises(ValueError, match="decay"):
        LeCAMRegularizer(decay=1.0)


# ------------------------------------------------------------------------------------------------ perceptual


def _small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
    )


def test_perceptual_loss_sequential_taps():
    net = _small_net()
    loss = PerceptualLoss(net, layers=(1, 3))
    x, y = _images(2, 16, 0), _images(2, 16, 1)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-12)
    value = loss(x, y)
    assert value.item() > 0 and value.shape == ()
    assert loss(x, y, reduction="none").shape == (2,)
    # hand computation
    fx1, fy1 = net[1](net[0](x)), net[1](net[0](y))
    fx3, fy3 = net[3](net[2](fx1)), net[3](net[2](fy1))

    def term(a, b):
        na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        return (na - nb).pow(2).mean()

    assert value.item() == pytest.approx((term(fx1, fy1) + term(fx3, fy3)).item(), rel=1e-5)
    weighted = PerceptualLoss(net, layers=(1, 3), weights=(2.0, 0.0))(x, y)
    assert weighted.item() == pytest.approx(2 * term(fx1, fy1).item(), rel=1e-5)


def test_perceptual_loss_gradient_to_input_not_network():
    net = _small_net()
    loss = PerceptualLoss(net, layers=(3,))
    loss.train()
    assert not net.training and all(not p.requires_grad for p in net.parameters())
    x = _images(2, 16, 0).requires_grad_(True)
    loss(x, _images(2, 16, 1)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_perceptual_loss_list_features_and_disabled():
    class Multi(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            h = self.a(x)
            return [h, self.b(h)]

    loss = PerceptualLoss(Multi())
    x, y = _images(1, 8, 0), _images(1, 8, 1)
    assert loss(x, y).item() > 0 and loss(y, y).item() == pytest.approx(0.0, abs=1e-12)
    disabled = PerceptualLoss()
    assert not disabled.enabled and disabled(x, y).item() == 0.0
    with pytest.raises(ValueError, match="layers"):
        PerceptualLoss(Multi(), layers=(0,))
    with pytest.raises(ValueError, match="layers"):
        PerceptualLoss(_small_net(), layers=(3, 1))


def _random_vgg16_state(prefix: str = "features.") -> dict[str, torch.Tensor]:
    config = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    state, index, channels = {}, 0, 3
    generator = torch.Generator().manual_seed(0)
    for item in config:
        if item == "M":
            index += 1
            continue
        state[f"{prefix}{index}.weight"] = torch.randn(item, channels, 3, 3, generator=generator) * 0.05
        state[f"{prefix}{index}.bias"] = torch.randn(item, generator=generator) * 0.01
        index += 2
        channels = item
    state["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision's head: ignored
    return state


def test_vgg16_loader_round_trip(tmp_path):
    state = _random_vgg16_state()
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    loss = PerceptualLoss.vgg16(path)
    assert loss.layers == VGG16_TAPS == (3, 8, 15, 22, 29)
    assert torch.equal(loss.features[28].weight, state["features.28.weight"])
    assert isinstance(loss.features[29], nn.ReLU) and len(loss.features) == 30
    x, y = _images(1, 32, 0), _images(1, 32, 1)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(x, y).item() > 0
    # ImageNet normalisation for [-1, 1] inputs: mid-grey 0.0 maps to (0.5 - m) / s
    feats = loss.extract(torch.zeros(1, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512, 512]
    safetensors = pytest.importorskip("safetensors.torch")
    st_path = tmp_path / "vgg16.safetensors"
    safetensors.save_file({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")},
                          str(st_path))  # fmt: skip
    loss2 = PerceptualLoss.vgg16(st_path)
    assert loss2(x, y).item() == pytest.approx(loss(x, y).item(), rel=1e-6)


def test_vgg16_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        PerceptualLoss.vgg16(tmp_path / "missing.pth")
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        PerceptualLoss.vgg16(bad)
    state = _random_vgg16_state()
    del state["features.28.weight"]
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    with pytest.raises(ValueError, match=r"missing keys \['28.weight'\]"):
        PerceptualLoss.vgg16(partial)
    state = _random_vgg16_state()
    state["features.0.weight"] = torch.zeros(64, 1, 3, 3)
    torch.save(state, partial)
    with pytest.raises(ValueError, match="shape"):
        PerceptualLoss.vgg16(partial)


# ------------------------------------------------------------------------------------------------ weights


def test_dynamic_semantic_weight():
    app = torch.tensor(2.0, requires_grad=True) * 1.0
    sem = torch.tensor(8.0, requires_grad=True) * 1.0
    alpha = dynamic_semantic_weight(app, sem, 0.1)
    assert alpha.item() == pytest.approx(0.025) and not alpha.requires_grad
    assert (alpha * sem).item() == pytest.approx(0.1 * app.item())  # fixed share alpha0 of L_app
    constant = dynamic_semantic_weight(app, sem, 0.1, mode="constant")
    assert constant.item() == pytest.approx(0.1) and not constant.requires_grad
    assert math.isfinite(dynamic_semantic_weight(app, torch.tensor(0.0), 0.1).item())
    with pytest.raises(ValueError, match="mode"):
        dynamic_semantic_weight(app, sem, 0.1, mode="auto")
    with pytest.raises(ValueError, match="alpha0"):
        dynamic_semantic_weight(app, sem, -1.0)


def test_adaptive_gan_weight():
    torch.manual_seed(0)
    last = nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(2, 4, 8, 8)
    out = last(h)
    target = torch.randn_like(out)
    nll = (out - target).pow(2).mean()
    g = -(3.0 * out).mean()
    weight = adaptive_gan_weight(nll, g, last.weight)
    gn = torch.autograd.grad(nll, last.weight, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last.weight, retain_graph=True)[0].norm()
    assert weight.item() == pytest.approx((gn / (gg + 1e-4)).item(), rel=1e-6)
    assert not weight.requires_grad
    (nll + weight * g).backward()  # graphs were retained
    out = last(h)
    clamped = adaptive_gan_weight(
        (out - target).pow(2).mean() * 1e6, -(out * 1e-6).mean(), last.weight, max_weight=5.0
    )
    assert clamped.item() == pytest.approx(5.0)
