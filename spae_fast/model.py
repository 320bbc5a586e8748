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

Checkpoints (`save_pretrained` / `from_pretrained`, format in `spae_fast.checkpoint`): a folder with
``model.safetensors``, whose metadata carries the `SPAEConfig` and one sha256 over config and weights, and
``config.json``, a readable copy. Loading runs no pickle and verifies before it builds: config fields within
bounds, the parameter count the config implies equal to what the file holds, the digest, then every tensor name
and shape. Saving replaces the weights file atomically, so a killed save leaves the old or the new checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME  # noqa: F401  (re-exported)
from .ops import SAQ_MODES
from .pyramid import DEFAULT_LAYERS
from .quantizer import QUANTIZER_METRICS, IdsLike, SPAEQuantizer, SPAEQuantizerOutput
from .vocab import VocabCodebook

# Upper bounds of the architecture fields: far above any useful SPAE, low enough that a corrupted or hostile
# config cannot make construction loop for hours or ask the allocator for terabytes.
CONFIG_BOUNDS = {
    "image_size": (1, 8192),
    "in_channels": (1, 64),
    "base_channels": (1, 4096),
    "num_res_blocks": (0, 64),
    "channel_multiplier": (1, 64),
    "levels": (1, 8),  # len(channel_multipliers)
    "width": (1, 16384),  # base_channels * multiplier
    "grid": (1, 1024),  # image_size / downsampling factor
    "num_layers": (1, 64),  # len(layers)
    "codebook_rows": (1, 2**31 - 1),
    "codebook_dim": (1, 65536),
}


def _bounded_int(field: str, value: object, bound: str | None = None) -> int:
    low, high = CONFIG_BOUNDS[bound or field]
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"SPAEConfig.{field} must be an int in [{low}, {high}], got {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"SPAEConfig.{field} must be an int in [{low}, {high}], got {number}")
    return number


def _int_tuple(field: str, values: object, bound: str, count_bound: str) -> tuple[int, ...]:
    low, high = CONFIG_BOUNDS[count_bound]
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, torch.Tensor)) or not low <= len(values) <= high:
        raise ValueError(f"SPAEConfig.{field} must be a sequence of {low} to {high} ints, got {values!r}"[:300])
    return tuple(_bounded_int(f"{field}[{i}]", v, bound) for i, v in enumerate(values))


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
        for name in ("image_size", "in_channels", "base_channels", "num_res_blocks"):
            setattr(self, name, _bounded_int(name, getattr(self, name)))
        self.channel_multipliers = _int_tuple("channel_multipliers", self.channel_multipliers, "channel_multiplier", "levels")
        for multiplier in self.channel_multipliers:
            _bounded_int("base_channels * channel_multipliers[i]", self.base_channels * multiplier, "width")
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by the encoder's downsampling factor "
                f"{self.downsample_factor} (2 ** (len(channel_multipliers) - 1))"
            )
        _bounded_int("image_size / downsampling factor (the latent grid)", self.grid, "grid")
        self.layers = _int_tuple("layers", self.layers, "grid", "num_layers")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 <= self.beta < math.inf:
            raise ValueError(f"SPAEConfig.beta must be a finite number >= 0, got {self.beta!r}")
        for name in ("mode", "metric", "codebook"):
            value = getattr(self, name)
            if not isinstance(value, str) or not 0 < len(value) <= 4096:
                raise ValueError(f"SPAEConfig.{name} must be a non-empty str, got {value!r}"[:300])
        for name, allowed in (("mode", SAQ_MODES), ("metric", QUANTIZER_METRICS)):  # before any slow loading
            if getattr(self, name) not in allowed:
                raise ValueError(f"SPAEConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"[:300])
        if self.token_filter is not None and not isinstance(self.token_filter, str):
            raise ValueError(f"SPAEConfig.token_filter must be a str or None, got {self.token_filter!r}"[:300])
        for name in ("codebook_rows", "codebook_dim"):
            if getattr(self, name) is not None:
                setattr(self, name, _bounded_int(name, getattr(self, name)))
        fingerprint = self.codebook_fingerprint
        if fingerprint is not None and (
            not isinstance(fingerprint, str) or len(fingerprint) != 64 or set(fingerprint) - set("0123456789abcdef")
        ):
            raise ValueError(f"SPAEConfig.codebook_fingerprint must be 64 lowercase hex digits, got {fingerprint!r}"[:300])

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
    """sha256 over the codebook's shape, LLM token ids and fp32 rows: identifies the frozen vocabulary
    (`VocabCodebook.fingerprint`; a vocabulary-parallel codebook computes it without holding the whole table)."""
    return vocab.fingerprint()


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
            is refused. A `spae_fast.distributed.ShardedVocabCodebook` (this rank's rows only) gets a
            `VocabParallelQuantizer` (a collective over its group).
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
        quantizer_class = SPAEQuantizer
        if getattr(codebook, "sharded", None) is not None:  # vocabulary parallel: this rank holds a row shard
            from .distributed import VocabParallelQuantizer as quantizer_class
        self.quantizer = quantizer_class(
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
        """Writes ``model.safetensors`` (config and weights, one digest) and its readable copy ``config.json``
        into ``directory`` (created if needed), each atomically; format: `spae_fast.checkpoint`."""
        from .checkpoint import save_model

        return save_model(self, directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        codebook: VocabCodebook | None = None,
        backend: str = "auto",
        map_location: str | torch.device = "cpu",
    ) -> SPAE:
        """Loads a `save_pretrained` folder: no pickle; config and weights are verified (bounds, implied size,
        digest; `spae_fast.checkpoint`) before the codebook (loaded from the config when None, and checked
        against its fingerprint) or the model is built. Works inside ``torch.inference_mode()`` (the model is
        built outside it, so it can still be trained). Format-1 folders still load."""
        from .checkpoint import load_model

        return load_model(cls, directory, codebook, backend, map_location)
