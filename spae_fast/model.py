"""`SPAE`: the Semantic Pyramid AutoEncoder (SPAE-METHOD.md §1-3) as one ``nn.Module``.

    image [B, 3, H, W] --Encoder--> z [B, D, g, g] --SPAEQuantizer--> words (ids per pyramid layer)
    image' [B, 3, H, W] <--Decoder-- z_hat [B, D, g, g] <-- running mean of the chosen word embeddings

- Encoder / decoder: VQGAN-style CNNs (ResBlocks with GroupNorm and SiLU). The encoder downsamples by
  ``2 ** (len(channel_multipliers) - 1)`` (8x by default: 128 x 128 -> 16 x 16) and ends in a 1x1 conv to D, the
  codebook's embedding dimension, so z lives in the frozen LLM's embedding space (no projection after it). The
  decoder mirrors it.
- The quantizer's codebook is the frozen LLM vocabulary (`VocabCodebook`); it is not a parameter and is not
  saved with the weights. The config names where it comes from (``codebook``, ``token_filter``) and records a
  fingerprint of its rows, so `from_pretrained` refuses a checkpoint whose vocabulary is not the one it was
  trained with.
- Images are fp32 in [-1, 1] (``imaging.load_image`` and the datasets produce that range).

Checkpoints (`save_pretrained` / `from_pretrained`): a folder with ``config.json`` (the `SPAEConfig`, the
codebook fingerprint, and the sha256 of the weights file) and ``model.safetensors``. Loading runs no pickle,
checks the weights file against its recorded hash (a tampered or truncated file is refused) and every tensor
name and shape against the config (a mismatched checkpoint is refused with the names that differ).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .pyramid import DEFAULT_LAYERS
from .quantizer import IdsLike, SPAEQuantizer, SPAEQuantizerOutput
from .vocab import VocabCodebook

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


@dataclasses.dataclass
class SPAEConfig:
    """Everything that defines an SPAE model except its weights (saved as JSON next to them).

    image_size: side of the square input images; must be divisible by the encoder's downsampling factor, and
        ``image_size / factor`` is the latent grid g the pyramid lives on.
    base_channels, channel_multipliers, num_res_blocks: CNN width and depth; level i has
        ``base_channels * channel_multipliers[i]`` channels and the encoder halves the resolution between
        levels (``len(channel_multipliers) - 1`` times).
    layers, mode, metric, beta: the `SPAEQuantizer` (pyramid sides on the grid, "saq" | "rq", "l2" | "cosine",
        commitment weight).
    codebook, token_filter: `VocabCodebook.from_pretrained(codebook, token_filter)`; ``"smollm2"`` is the
        embedded default.
    codebook_rows, codebook_dim, codebook_fingerprint: filled in from the codebook the model was built with.
    """

    image_size: int = 128
    in_channels: int = 3
    base_channels: int = 64
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2)
    num_res_blocks: int = 2
    layers: tuple[int, ...] = DEFAULT_LAYERS
    mode: str = "saq"
    metric: str = "l2"
    beta: float = 0.25
    codebook: str = "smollm2"
    token_filter: str | None = "words"
    codebook_rows: int | None = None
    codebook_dim: int | None = None
    codebook_fingerprint: str | None = None

    def __post_init__(self) -> None:
        self.channel_multipliers = tuple(int(m) for m in self.channel_multipliers)
        self.layers = tuple(int(s) for s in self.layers)
        for name in ("image_size", "in_channels", "base_channels", "num_res_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "num_res_blocks" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.channel_multipliers or min(self.channel_multipliers) < 1:
            raise ValueError(f"channel_multipliers must be positive ints, got {self.channel_multipliers}")
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by the encoder's downsampling factor "
                f"{self.downsample_factor} (2 ** (len(channel_multipliers) - 1))"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample_factor

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> SPAEConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SPAEConfig fields {unknown}; this spae_fast knows {sorted(known)}")
        return cls(**values)


def codebook_fingerprint(vocab: VocabCodebook) -> str:
    """sha256 over the codebook's shape, LLM token ids and fp32 rows: identifies the frozen vocabulary."""
    digest = hashlib.sha256()
    digest.update(f"{vocab.num_rows}x{vocab.dim}".encode())
    digest.update(vocab.token_ids.numpy().tobytes())
    digest.update(vocab.weight.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---- building blocks ---------------------------------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups where the width allows (VQGAN), fewer for narrow test models."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class Encoder(nn.Module):
    """images ``[B, C, H, W]`` -> z ``[B, D, H / f, W / f]`` (f = 2 ** (levels - 1))."""

    def __init__(self, config: SPAEConfig, latent_dim: int) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_multipliers]
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        channels = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(channels, width))
                channels = width
            if level < len(widths) - 1:
                blocks.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))  # downsample 2x
        blocks += [ResBlock(channels, channels), ResBlock(channels, channels)]  # middle
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, latent_dim, 1)  # into the LLM embedding space; no projection after

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(images)))))


class Decoder(nn.Module):
    """z_hat ``[B, D, g, g]`` -> images ``[B, C, g f, g f]``: the encoder mirrored (nearest upsampling + conv)."""

    def __init__(self, config: SPAEConfig, latent_dim: int) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_multipliers][::-1]
        channels = widths[0]
        self.conv_in = nn.Conv2d(latent_dim, channels, 3, padding=1)
        blocks: list[nn.Module] = [ResBlock(channels, channels), ResBlock(channels, channels)]  # middle
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(channels, width))
                channels = width
            if level < len(widths) - 1:
                blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1)]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, config.in_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the VQGAN adaptive GAN weight measures gradients at."""
        return self.conv_out.weight

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(latent)))))


# ---- the model ---------------------------------------------------------------------------------------------


class SPAEOutput(NamedTuple):
    """What `SPAE.forward` returns."""

    reconstruction: torch.Tensor  # [B, C, H, W] decoder(z + sg(z_hat_L - z))
    latent: torch.Tensor  # [B, D, g, g] the encoder output z
    quantizer: SPAEQuantizerOutput  # ids per layer, commitment loss, per-prefix latent errors
    # [B, C, H, W] decoder(sg(z_hat_{l_b})) of each image's own prefix l_b, when `forward` got prefix_layers
    prefix_reconstruction: torch.Tensor | None = None


class SPAE(nn.Module):
    """The Semantic Pyramid AutoEncoder: CNN encoder, SPAE pyramid quantizer over a frozen LLM vocabulary,
    mirrored CNN decoder.

    Args:
        config: an `SPAEConfig` (or keyword arguments for one).
        codebook: the frozen vocabulary; loaded from ``config.codebook`` / ``config.token_filter`` when None.
            Its rows and dim are recorded in the config; a codebook that differs from a recorded fingerprint
            is refused.
        backend: the quantizer's search backend (``"auto"``, ``"cpu"``, ``"torch"``, ...).

    ``encode(images) -> [B, n]`` ids, ``decode(ids, num_layers) -> images``, ``to_words`` / ``from_words``.
    """

    def __init__(
        self,
        config: SPAEConfig | None = None,
        codebook: VocabCodebook | None = None,
        *,
        backend: str = "auto",
        **config_overrides,
    ) -> None:
        super().__init__()
        if config is None:
            config = SPAEConfig(**config_overrides)
        elif config_overrides:
            config = dataclasses.replace(config, **config_overrides)
        if codebook is None:
            codebook = VocabCodebook.from_pretrained(config.codebook, token_filter=config.token_filter)
        if not isinstance(codebook, VocabCodebook):
            raise TypeError(f"codebook must be a VocabCodebook, got {type(codebook).__name__}")
        fingerprint = codebook_fingerprint(codebook)
        if config.codebook_fingerprint is not None and config.codebook_fingerprint != fingerprint:
            raise ValueError(
                f"the codebook ({codebook.source or 'given'}, {codebook.num_rows} x {codebook.dim}) is not the "
                f"vocabulary this model was built with (config: {config.codebook!r}, token_filter="
                f"{config.token_filter!r}, {config.codebook_rows} x {config.codebook_dim}); its fingerprint differs"
            )
        config = dataclasses.replace(
            config, codebook_rows=codebook.num_rows, codebook_dim=codebook.dim, codebook_fingerprint=fingerprint
        )
        self.config = config
        self.encoder = Encoder(config, codebook.dim)
        self.quantizer = SPAEQuantizer(
            codebook, layers=config.layers, grid=config.grid, mode=config.mode, metric=config.metric,
            beta=config.beta, backend=backend,
        )  # fmt: skip
        self.decoder = Decoder(config, codebook.dim)

    @property
    def vocab(self) -> VocabCodebook:
        return self.quantizer.vocab

    @property
    def num_layers(self) -> int:
        return self.quantizer.num_layers

    def _check_images(self, images: torch.Tensor, name: str = "images") -> torch.Tensor:
        size, channels = self.config.image_size, self.config.in_channels
        if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor [B, {channels}, {size}, {size}] in [-1, 1]")
        if images.dim() != 4 or tuple(images.shape[1:]) != (channels, size, size):
            raise ValueError(f"{name} must have shape [B, {channels}, {size}, {size}], got {tuple(images.shape)}")
        return images.to(self.decoder.conv_out.weight.dtype)

    def forward(self, images: torch.Tensor, prefix_layers: torch.Tensor | None = None) -> SPAEOutput:
        """images ``[B, C, H, W]`` -> reconstruction through all layers (straight-through), z, quantizer output.

        ``prefix_layers`` ``[B]`` (ints in 1 .. L): also decode image b from the running mean of its first
        ``prefix_layers[b]`` layers (detached: words are discrete, so only the decoder learns from it), in the
        same decoder call as the full reconstruction; returned as ``prefix_reconstruction``."""
        latent = self.encoder(self._check_images(images))
        quantized = self.quantizer(latent)
        if prefix_layers is None:
            return SPAEOutput(self.decoder(quantized.quantized), latent, quantized)
        with torch.no_grad():
            prefix = self.quantizer.prefix_latents(quantized.ids, prefix_layers).to(quantized.quantized.dtype)
        full, shorter = self.decoder(torch.cat([quantized.quantized, prefix])).chunk(2)
        return SPAEOutput(full, latent, quantized, shorter)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """images -> ``[B, n]`` int64 codebook rows of the first ``num_layers`` layers (all by default), layer
        after layer, raster order within a layer (`SPAEQuantizer.split_ids` gives them per layer)."""
        num_layers = self.quantizer.pyramid.check_num_layers(num_layers)
        flat = self.quantizer.quantize(self.encoder(self._check_images(images)))
        return flat[:, : self.quantizer.pyramid.total(num_layers)]

    @torch.no_grad()
    def decode(self, ids: IdsLike, num_layers: int | None = None) -> torch.Tensor:
        """ids of a prefix of layers (``[B, n]`` or per layer) -> images ``[B, C, H, W]`` decoded from the
        running-mean latent of the first ``num_layers`` layers (all that ``ids`` hold by default)."""
        return self.decoder(self.quantizer.decode(ids, num_layers).to(self.decoder.conv_out.weight.dtype))

    def to_words(self, images: torch.Tensor, num_layers: int | None = None) -> list[list[str]]:
        """images -> per image, the LLM token strings of the first ``num_layers`` layers."""
        return self.quantizer.to_words(self.encode(images, num_layers))

    def to_text(self, images: torch.Tensor, num_layers: int | None = None, layer_separator: str | None = None) -> list[str]:
        """images -> per image, the words as one readable string (see `SPAEQuantizer.to_text`)."""
        return self.quantizer.to_text(self.encode(images, num_layers), layer_separator=layer_separator)

    def from_words(self, words: Sequence[Sequence[str]]) -> torch.Tensor:
        """Per image, token strings of a whole prefix of layers (as `to_words` writes) -> decoded images."""
        return self.decode(self.quantizer.from_words(words))

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Writes ``config.json`` + ``model.safetensors`` into ``directory`` (created if needed)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        weights = directory / WEIGHTS_NAME
        temporary = weights.with_suffix(".tmp")
        save_file(state, str(temporary), metadata={"format": "pt", "spae_fast_format": str(FORMAT_VERSION)})
        os.replace(temporary, weights)
        record = {
            "spae_fast_format": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "weights_sha256": _sha256(weights),
            "tensors": {name: list(tensor.shape) for name, tensor in state.items()},
        }
        (directory / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        codebook: VocabCodebook | None = None,
        backend: str = "auto",
        map_location: str | torch.device = "cpu",
    ) -> SPAE:
        """Loads a `save_pretrained` folder: no pickle; the weights file must match its recorded sha256 and the
        tensors the config's architecture, and the codebook (loaded from the config when None) its fingerprint."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_file, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for file in (config_file, weights):
            if not file.is_file():
                raise FileNotFoundError(f"{directory} is not an SPAE checkpoint: {file.name} is missing")
        try:
            record = json.loads(config_file.read_text())
            config = SPAEConfig.from_dict(record["config"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{config_file} is not a valid SPAE config: {error}") from error
        if record.get("spae_fast_format") != FORMAT_VERSION:
            raise ValueError(f"{config_file}: unsupported checkpoint format {record.get('spae_fast_format')!r}")
        digest = _sha256(weights)
        if digest != record.get("weights_sha256"):
            raise ValueError(
                f"{weights} does not match the sha256 recorded in {config_file.name} (tampered with, truncated or "
                f"from another checkpoint): {digest} != {record.get('weights_sha256')}"
            )
        model = cls(config, codebook, backend=backend)
        state = load_file(str(weights), device=str(map_location))
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = sorted(
            f"{name}: {tuple(state[name].shape)} != {tuple(expected[name].shape)}"
            for name in set(state) & set(expected)
            if state[name].shape != expected[name].shape
        )
        if missing or unexpected or wrong:
            raise ValueError(
                f"{weights} does not fit the architecture in {config_file.name}: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, wrong shapes {wrong[:5]}"
            )
        model.load_state_dict(state)
        return model.to(map_location)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
