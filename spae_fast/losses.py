"""Training losses for the SPAE autoencoder (SPAE-METHOD.md §4).

    appearance  L_app = w_pix * pixel_loss + commitment (quantizer) + w_perc * PerceptualLoss
                        + w_gan * adaptive_gan_weight(...) * hinge_g_loss(D(x_hat))
    discriminator L_D = hinge_d_loss(D(x), D(x_hat)) + w_lecam * LeCAMRegularizer(D(x), D(x_hat))
    total       L     = L_app + alpha * L_sem,   alpha = dynamic_semantic_weight(L_app, L_sem, alpha0)

Everything here is plain PyTorch; images are ``[B, 3, H, W]`` floats in [-1, 1].

- `pixel_loss`: mean L2 / L1 pixel error.
- `PatchDiscriminator`: a small PatchGAN (pix2pix / VQGAN ``NLayerDiscriminator``) with GroupNorm.
- `hinge_d_loss`, `hinge_g_loss`: the hinge GAN losses.
- `LeCAMRegularizer`: LeCAM regularisation of D (Tseng et al. 2021) with EMA anchors.
- `PerceptualLoss`: LPIPS-like feature distance through a user-supplied frozen network
  (`PerceptualLoss.vgg16(path)` builds VGG16 from a local torchvision-format state dict; nothing is downloaded).
- `dynamic_semantic_weight`: alpha for the semantic loss (dynamic: alpha0 * sg(L_app / L_sem)).
- `adaptive_gan_weight`: VQGAN's ratio of gradient norms at the decoder's last layer.
- `psnr`: per-image PSNR in dB.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VGG16_CONFIG",
    "VGG16_TAPS",
    "LeCAMRegularizer",
    "PatchDiscriminator",
    "PerceptualLoss",
    "adaptive_gan_weight",
    "dynamic_semantic_weight",
    "hinge_d_loss",
    "hinge_g_loss",
    "pixel_loss",
    "psnr",
]

PIXEL_LOSS_KINDS = ("l2", "l1")
SEMANTIC_WEIGHT_MODES = ("dynamic", "constant")

# torchvision's vgg16 ``features`` stack: conv 3x3 (pad 1) + ReLU per number, 2x2 max-pool per "M".
VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
# Indices into that Sequential of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16_TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
# ImageNet statistics for inputs in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _number(name: str, value: object, *, minimum: float | None = None, above: float | None = None) -> float:
    """A finite real number (bools refused: True is not a weight), ``>= minimum`` / ``> above``; as a float."""
    bound = f" >= {minimum:g}" if minimum is not None else f" > {above:g}" if above is not None else ""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or (minimum is not None and value < minimum)
        or (above is not None and value <= above)
    ):
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


# --------------------------------------------------------------------------------------------- pixel / PSNR


def pixel_loss(reconstruction: torch.Tensor, images: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean pixel error: ``mean((x_hat - x)^2)`` (``"l2"``) or ``mean(|x_hat - x|)`` (``"l1"``).

    Args:
        reconstruction: ``[B, C, H, W]`` (any shape) decoder output.
        images: same shape, the targets.
        kind: ``"l2"`` or ``"l1"``.
    Returns: ``[]`` scalar.
    """
    if kind not in PIXEL_LOSS_KINDS:
        raise ValueError(f"kind must be one of {PIXEL_LOSS_KINDS}, got {kind!r}")
    _check_same_shape(reconstruction, images, "reconstruction", "images")
    if kind == "l2":
        return F.mse_loss(reconstruction, images)
    return F.l1_loss(reconstruction, images)


def psnr(reconstruction: torch.Tensor, images: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB: ``10 log10(data_range^2 / mean((clamp(x_hat) - x)^2))``.

    The reconstruction is first clamped to ``[-data_range/2, data_range/2]`` (``[-1, 1]`` by default), the range
    of the images. Identical images give ``inf``. Computed without gradient, in float64, returned as float32.

    Args:
        reconstruction: ``[B, C, H, W]``.
        images: ``[B, C, H, W]`` in ``[-data_range/2, data_range/2]``.
        data_range: max - min of the pixel range (2.0 for [-1, 1]).
    Returns: ``[B]`` float32.
    """
    _check_same_shape(reconstruction, images, "reconstruction", "images")
    if reconstruction.dim() < 2:
        raise ValueError(f"reconstruction must be batched [B, ...], got shape {tuple(reconstruction.shape)}")
    data_range = _number("data_range", data_range, above=0)
    with torch.no_grad():
        half = data_range / 2.0
        recon = reconstruction.detach().double().clamp(-half, half)
        mse = (recon - images.detach().double()).pow(2).flatten(1).mean(dim=1)  # [B]
        return (10.0 * torch.log10(data_range**2 / mse)).float()


# --------------------------------------------------------------------------------------------- GAN


def _groups_for(channels: int, num_groups: int) -> int:
    return math.gcd(channels, num_groups)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / VQGAN ``NLayerDiscriminator``) with GroupNorm; outputs patch logits.

    Layout (``C = base_channels``, ``n = num_layers``)::

        conv 4x4 s2 p1 (in -> C) + LeakyReLU(0.2)
        n - 1 times: conv 4x4 s2 p1 (C*m_prev -> C*m, m = min(2^i, 8)) + GroupNorm + LeakyReLU(0.2)
        conv 4x4 s1 p1 (-> C*min(2^n, 8)) + GroupNorm + LeakyReLU(0.2)
        conv 4x4 s1 p1 (-> 1)                                 # patch logits

    An input of side H gives logits of side ``floor(H / 2^n) - 2`` (30x30 at 256, 14x14 at 128, 2x2 at 32 with
    n = 3). Small images: when ``image_size`` is given, ``num_layers`` (the number of stride-2 convs) is
    clamped to the largest n >= 1 with ``floor(image_size / 2^n) >= 3``, so the output is at least 1x1 (e.g.
    16 -> n = 2, 8 -> n = 1); the value used is ``self.num_layers``. ``forward`` rejects inputs smaller than
    ``self.min_input_size`` with a clear error. GroupNorm (not BatchNorm) so it behaves the same for batch 1
    and under DDP without SyncBatchNorm. Weights init: convs N(0, 0.02), norm scales N(1, 0.02), biases 0.

    Args:
        in_channels: image channels (3).
        base_channels: width of the first conv (64).
        num_layers: number of stride-2 convs (3).
        image_size: if given, clamp ``num_layers`` so this input size gives at least 1x1 logits.
        num_groups: GroupNorm groups (gcd with each width is used, so any width works).
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        num_layers: int = 3,
        image_size: int | None = None,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels),
                            ("num_layers", num_layers), ("num_groups", num_groups)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if image_size is not None:
            if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 6:
                raise ValueError(
                    f"image_size must be an int >= 6 (the smallest a PatchGAN can see), got {image_size!r}"
                )
            while num_layers > 1 and image_size // 2**num_layers < 3:
                num_layers -= 1
        self.num_layers = num_layers
        self.min_input_size = 3 * 2**num_layers

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for i in range(1, num_layers):
            prev, mult = mult, min(2**i, 8)
            layers += [
                nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride=2, padding=1, bias=False),
                nn.GroupNorm(_groups_for(base_channels * mult, num_groups), base_channels * mult),
                nn.LeakyReLU(0.2),
            ]
        prev, mult = mult, min(2**num_layers, 8)
        layers += [
            nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride=1, padding=1, bias=False),
            nn.GroupNorm(_groups_for(base_channels * mult, num_groups), base_channels * mult),
            nn.LeakyReLU(0.2),
            nn.Conv2d(base_channels * mult, 1, 4, stride=1, padding=1),
        ]
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Convs N(0, 0.02); GroupNorm weight N(1, 0.02); all biases 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, C_in, H, W]`` -> patch logits ``[B, 1, floor(H/2^n) - 2, floor(W/2^n) - 2]``."""
        if images.dim() != 4:
            raise ValueError(f"images must be 4-D [B, C, H, W], got shape {tuple(images.shape)}")
        if min(images.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"images of size {tuple(images.shape[-2:])} are too small for a PatchDiscriminator with "
                f"num_layers={self.num_layers} (needs >= {self.min_input_size}); pass image_size= to clamp num_layers"
            )
        return self.main(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))`` (VQGAN's scaling).

    Args: patch logits of any shape (``[B, 1, h, w]``). Returns ``[]``.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss ``-mean(D(x_hat))``. Returns ``[]``."""
    return -logits_fake.mean()


class LeCAMRegularizer(nn.Module):
    """LeCAM regularisation for the discriminator (Tseng et al., CVPR 2021, "Regularizing Generative
    Adversarial Networks under Limited Data"):

        reg = mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(x_hat))^2)

    where ``ema_real`` / ``ema_fake`` are exponential moving averages (``decay``) of the batch-mean D outputs on
    real and fake images. Add ``lambda * reg`` to the discriminator loss (the paper uses lambda ~ 1e-3..0.3).

    The EMAs are registered buffers (``ema_real``, ``ema_fake``, ``num_updates``), so they move with
    ``.to()`` and are saved / restored with the ``state_dict``. They are updated, without gradient and before
    the regulariser is computed, only in training mode (``module.train()``); in eval mode ``forward`` just reads
    them. The first update copies the batch means (no bias towards the zero init). Under DDP each rank updates
    its EMAs from its own batches, so the ranks' EMAs differ slightly (rank 0's are the ones saved from rank 0);
    this module is not wrapped by DDP, so nothing broadcasts them.
    """

    ema_real: torch.Tensor
    ema_fake: torch.Tensor
    num_updates: torch.Tensor

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        if not _number("decay", decay, minimum=0.0) < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        """One EMA step with the batch means of ``logits_real`` / ``logits_fake`` (called by ``forward`` in
        training mode)."""
        real = logits_real.detach().float().mean().to(self.ema_real)
        fake = logits_fake.detach().float().mean().to(self.ema_fake)
        decay = self.decay if int(self.num_updates) > 0 else 0.0
        self.ema_real.mul_(decay).add_((1.0 - decay) * real)
        self.ema_fake.mul_(decay).add_((1.0 - decay) * fake)
        self.num_updates += 1

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """Patch logits ``[B, 1, h, w]`` on real and fake images -> ``[]`` regulariser (gradient to both)."""
        if self.training:
            self.update(logits_real, logits_fake)
        ema_real = self.ema_real.to(logits_fake.dtype)
        ema_fake = self.ema_fake.to(logits_real.dtype)
        return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


# --------------------------------------------------------------------------------------------- perceptual


def _vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` layer for layer (same indices, so its state dict keys match), cut
    after relu5_3 (index 29; the last max-pool is not needed)."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = int(item)
    return nn.Sequential(*layers[: VGG16_TAPS[-1] + 1])


def _load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"VGG16 weights file not found: {path!r} (give a local torchvision-format vgg16 state dict, "
            f".safetensors or .pth; nothing is downloaded)"
        )
    try:
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError as error:  # pragma: no cover - depends on the environment
                raise ImportError(
                    f"reading {path!r} needs the safetensors package (pip install safetensors)"
                ) from error
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as error:
        raise ValueError(f"could not read VGG16 weights from {path!r}: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path!r} does not hold a state dict (a mapping of names to tensors)")
    return state


class PerceptualLoss(nn.Module):
    """LPIPS-like perceptual distance through a frozen feature network supplied by the user.

    For each tapped feature map ``f_l [B, C_l, h_l, w_l]`` of both images, normalise each position's channel
    vector to unit length (``f / (||f||_2 over C + eps)``), square the difference, average over channels and
    space, and sum over layers with ``weights`` (1 each by default)::

        d(x, y) = sum_l w_l mean_{c,h,w} (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2

    (LPIPS without its learned per-channel weights). No weights ship offline; build one with
    ``PerceptualLoss.vgg16(path)`` from a local torchvision-format VGG16 state dict, or pass any network.

    Args:
        features: the feature network, frozen here (``requires_grad_(False)``, kept in eval mode). Either any
            module whose output is a list / tuple of feature maps (``layers=None``), or an ``nn.Sequential``
            run layer by layer with the outputs of the modules at indices ``layers`` tapped. ``None`` gives a
            disabled loss (``self.enabled`` False) whose ``forward`` returns zeros, so a trainer can build it
            unconditionally.
        layers: indices into ``features`` (a ``nn.Sequential``) whose outputs are compared; layers after the
            last tap are not run.
        weights: one weight per feature map (default 1.0 each).
        input_mean, input_std: optional per-channel affine applied to the inputs first,
            ``(x - mean) / std`` (e.g. ImageNet normalisation expressed for [-1, 1] inputs).
        eps: added to the channel norms.
    """

    def __init__(
        self,
        features: nn.Module | None = None,
        layers: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        eps: float = 1e-10,
    ) -> None:
        super().__init__()
        self.enabled = features is not None
        self.eps = _number("eps", eps, above=0)
        self.layers: tuple[int, ...] | None = None
        if layers is not None:
            if not isinstance(features, nn.Sequential):
                raise ValueError(
                    "layers= needs features to be an nn.Sequential (indices of the modules to tap)"
                )
            if isinstance(layers, (str, bytes)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers
            ):  # never truncate 2.5 to 2
                raise ValueError(f"layers must be int indices into features, got {layers!r}")
            layers = tuple(layers)
            if (
                not layers
                or sorted(set(layers)) != list(layers)
                or layers[0] < 0
                or layers[-1] >= len(features)
            ):
                raise ValueError(
                    f"layers must be distinct increasing indices into features (0..{len(features) - 1}), got {layers}"
                )
            self.layers = layers
        if weights is not None:
            weights = tuple(_number(f"weights[{i}]", w, minimum=0.0) for i, w in enumerate(weights))
            if self.layers is not None and len(weights) != len(self.layers):
                raise ValueError(
                    f"weights has {len(weights)} entries but layers taps {len(self.layers)} maps"
                )
        self.weights: tuple[float, ...] | None = weights
        if (input_mean is None) != (input_std is None):
            raise ValueError("input_mean and input_std must be given together")
        if input_mean is not None:
            mean = torch.tensor(input_mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(input_std, dtype=torch.float32).view(1, -1, 1, 1)
            if mean.numel() != std.numel() or bool((std <= 0).any()):
                raise ValueError(
                    "input_mean and input_std must have the same length and input_std must be > 0"
                )
            self.register_buffer("input_mean", mean, persistent=False)
            self.register_buffer("input_std", std, persistent=False)
        else:
            self.input_mean = None
            self.input_std = None
        self.features = features
        if features is not None:
            features.requires_grad_(False)
            features.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Keeps the frozen feature network in eval mode whatever ``mode`` is."""
        super().train(mode)
        if self.features is not None:
            self.features.eval()
        return self

    @classmethod
    def vgg16(cls, weights_path: str | os.PathLike, weights: Sequence[float] | None = None) -> PerceptualLoss:
        """VGG16 perceptual loss from a local torchvision-format state dict (``.safetensors`` or ``.pth``).

        The ``features`` stack is rebuilt in plain torch (config ``VGG16_CONFIG``); keys may be torchvision's
        full-model names (``features.0.weight`` ...; ``classifier.*`` is ignored) or the features stack's own
        (``0.weight`` ...). Taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3. Inputs in [-1, 1] are mapped to
        ImageNet normalisation. Raises FileNotFoundError for a missing file and ValueError for an unreadable
        file or keys / shapes that do not match VGG16.
        """
        state = _load_state_dict_file(weights_path)
        if any(key.startswith("features.") for key in state):
            state = {
                key[len("features.") :]: value for key, value in state.items() if key.startswith("features.")
            }
        features = _vgg16_features()
        expected = set(features.state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{os.fspath(weights_path)!r} is not a torchvision vgg16 state dict: missing keys {missing[:6]}"
                f"{' ...' if len(missing) > 6 else ''}, unexpected keys {unexpected[:6]}"
                f"{' ...' if len(unexpected) > 6 else ''} (expected features.N.weight / features.N.bias)"
            )
        own = features.state_dict()
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"{os.fspath(weights_path)!r}: {key} has shape {tuple(value.shape)}, VGG16 expects "
                    f"{tuple(own[key].shape)}"
                )
        features.load_state_dict({key: value.float() for key, value in state.items()})
        return cls(
            features,
            layers=VGG16_TAPS,
            weights=weights,
            input_mean=[2.0 * m - 1.0 for m in IMAGENET_MEAN],  # ((x+1)/2 - m)/s == (x - (2m-1)) / (2s)
            input_std=[2.0 * s for s in IMAGENET_STD],
        )

    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images [B, C, H, W]`` -> the tapped feature maps, each ``[B, C_l, h_l, w_l]``."""
        if self.features is None:
            raise RuntimeError("this PerceptualLoss has no feature network (features=None)")
        x = images
        if self.input_mean is not None:
            x = (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
        if self.layers is None:
            out = self.features(x)
            return [out] if isinstance(out, torch.Tensor) else list(out)
        taps = []
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self.layers:
                taps.append(x)
                if index == self.layers[-1]:
                    break
        return taps

    def _normalize(self, f: torch.Tensor) -> torch.Tensor:
        return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps)

    def forward(
        self, reconstruction: torch.Tensor, images: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """Perceptual distance of ``reconstruction`` and ``images`` (``[B, 3, H, W]`` in [-1, 1]).

        Returns ``[]`` (``reduction="mean"``, over the batch) or ``[B]`` (``"none"``). The gradient flows to
        both inputs, never to the frozen network.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        _check_same_shape(reconstruction, images, "reconstruction", "images")
        if reconstruction.dim() != 4:
            raise ValueError(
                f"reconstruction must be 4-D [B, C, H, W], got shape {tuple(reconstruction.shape)}"
            )
        if not self.enabled:
            per_image = reconstruction.new_zeros(reconstruction.shape[0])
        else:
            feats_x = self.extract(reconstruction)
            feats_y = self.extract(images)
            if self.weights is not None and len(self.weights) != len(feats_x):
                raise ValueError(
                    f"weights has {len(self.weights)} entries but features gave {len(feats_x)} maps"
                )
            per_image = reconstruction.new_zeros(reconstruction.shape[0])
            for index, (fx, fy) in enumerate(zip(feats_x, feats_y)):
                weight = 1.0 if self.weights is None else self.weights[index]
                diff = (self._normalize(fx) - self._normalize(fy)).pow(2).flatten(1).mean(dim=1)  # [B]
                per_image = per_image + weight * diff
        return per_image.mean() if reduction == "mean" else per_image


# --------------------------------------------------------------------------------------------- weights


def dynamic_semantic_weight(
    app_loss: torch.Tensor,
    sem_loss: torch.Tensor,
    alpha0: float,
    mode: str = "dynamic",
    eps: float = 1e-8,
) -> torch.Tensor:
    """The weight alpha of the semantic loss in ``L = L_app + alpha * L_sem`` (SPAE-METHOD.md §4).

    - ``"dynamic"``: ``alpha = alpha0 * sg(L_app / max(L_sem, eps))``, so ``alpha * L_sem`` always equals
      ``alpha0 * L_app`` in value (the semantic term keeps a fixed share) while its gradient is that of
      ``L_sem`` scaled by alpha.
    - ``"constant"``: ``alpha = alpha0``.

    Args: ``app_loss``, ``sem_loss``: ``[]`` tensors; ``alpha0`` >= 0. Returns a detached ``[]`` tensor on
    ``app_loss``'s device and dtype.
    """
    if mode not in SEMANTIC_WEIGHT_MODES:
        raise ValueError(f"mode must be one of {SEMANTIC_WEIGHT_MODES}, got {mode!r}")
    alpha0 = _number("alpha0", alpha0, minimum=0.0)
    eps = _number("eps", eps, above=0)
    app = torch.as_tensor(app_loss).detach()
    if mode == "constant":
        return torch.tensor(
            float(alpha0), device=app.device, dtype=app.dtype if app.is_floating_point() else None
        )
    sem = torch.as_tensor(sem_loss).detach().to(app.dtype)
    return (alpha0 * app / sem.clamp_min(eps)).detach()


def adaptive_gan_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VQGAN's adaptive GAN weight (Esser et al. 2021, Eq. 7):

        lambda = clamp(||grad_{W_last} L_rec|| / (||grad_{W_last} L_G|| + eps), 0, max_weight)   (detached)

    where ``W_last`` is the decoder's last layer weight (e.g. its final conv's ``.weight``). It balances the
    GAN gradient against the reconstruction gradient where both enter the decoder; multiply it by the user's
    GAN weight. Both losses must depend on ``last_layer_weight`` through a live graph; their graphs are kept
    (``retain_graph=True``) for the following ``backward``. The gradients are taken with ``torch.autograd.grad``,
    which does not trigger DDP's gradient all-reduce, so under DDP each rank computes its own lambda.

    Returns: ``[]`` detached tensor.
    """
    if not last_layer_weight.requires_grad:
        raise ValueError("last_layer_weight must require grad (the decoder's last layer weight)")
    max_weight = _number("max_weight", max_weight, above=0)
    eps = _number("eps", eps, above=0)
    nll_grad = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
