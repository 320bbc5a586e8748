"""`SPAEQuantizer`: the SPAE token pyramid with streaming average quantization as a drop-in ``nn.Module``.

SPAE-METHOD.md §2-3. The encoder's latent ``z [B, D, g, g]`` is described by L layers of words from a frozen
LLM vocabulary; layer l (side s_l, stride t_l = g / s_l) samples z at rows / cols ``t_l i + t_l - ceil(t_l/2)``
(dilated subsampling, paper Eq. 1) and each of its tokens covers a ``t_l x t_l`` block. With Up_m(q) the
layer-m token covering grid cell q and e(k) the (frozen) embedding of token k:

    target of layer l at a sampled p:  z_l(p) = l z(p) - sum_{m<l} e(k_m(Up_m(p)))        (SAQ)
    token of layer l:                 k_l(p) = argmin_k || z_l(p) - e(k) ||^2
    reconstruction after l layers:     z_hat_l(q) = (1/l) sum_{m<=l} e(k_m(Up_m(q)))   (running mean)

so each layer's token moves the running mean of the chosen word embeddings closest to z. RQ mode uses the
residual target z(p) - sum_{m<l} e(k_m) and the sum z_hat_l = sum_{m<=l} e(k_m). The token search is one fused
native op (``spae_fast::saq``); everything after it is plain differentiable PyTorch on the ids:

    quantized  = z + sg(z_hat_L - z)                                   (straight-through estimator)
    loss       = beta * (1/L) sum_l mean || z - sg(z_hat_l) ||^2         (commitment; mean over B, D, g, g)

The codebook is frozen: no gradient ever reaches it. Only the gradient w.r.t. z flows, and
d loss / dz = 2 beta (z - m) / numel(z) with m = (1/L) sum_l z_hat_l, so the loss is built from m alone and
autograd keeps one [B, D, g, g] tensor instead of L of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _validate
from .codebook import Codebook
from .ops import SAQ_MAX_LAYERS, SAQ_MODES, resolve_backend
from .ops.common import codebook_operands
from .ops.common import prefilter_operands as _prefilter_operands
from .pyramid import DEFAULT_GRID, DEFAULT_LAYERS, TokenPyramid
from .vocab import VocabCodebook

QUANTIZER_METRICS = ("l2", "cosine")


class SPAEQuantizerOutput(NamedTuple):
    """What `SPAEQuantizer.forward` returns."""

    quantized: torch.Tensor  # [B, D, g, g] z + sg(z_hat_L - z): the decoder's input, gradient to z
    ids: list[torch.Tensor]  # L tensors [B, s_l, s_l] int64: codebook rows of each layer
    loss: torch.Tensor  # [] commitment loss beta * mean_l mean ||z - sg(z_hat_l)||^2 (differentiable w.r.t. z)
    layer_errors: torch.Tensor  # [L] mean ||z - z_hat_l||^2 after each prefix of layers (detached)


IdsLike = torch.Tensor | Sequence[torch.Tensor]


class SPAEQuantizer(nn.Module):
    """SPAE's pyramid quantizer over a frozen LLM vocabulary (see the module docstring for the math).

    Args:
        codebook: a `VocabCodebook` (words, LLM ids), a `Codebook` or a ``[V, D]`` tensor (ids only), or a
            name / path for `VocabCodebook.from_pretrained` (``"smollm2"``: the embedded default).
        layers: layer sides, non-decreasing, each dividing ``grid`` (default (1, 2, 4, 8, 16, 16): 597 tokens).
        grid: side g of the latent grid ``z [B, D, g, g]``.
        mode: ``"saq"`` (streaming average quantization, the paper's) or ``"rq"`` (residual quantization).
        metric: ``"l2"`` (squared Euclidean on raw embeddings, the paper's) or ``"cosine"`` (LQAE / V2L style:
            z and the codebook rows are L2-normalised over D first, then quantized with l2; ``quantized`` and
            the reconstructions then live on the unit sphere).
        beta: commitment weight.
        backend: ``"auto"``, ``"cpu"`` (native fused kernel) or ``"torch"`` (reference); see
            `spae_fast.available()`.
        check_finite: raise ``ValueError`` on NaN / Inf latents.
        prefilter: the native search's certified int8 pre-filter, ``"auto"`` (on CPUs with AVX512-VNNI),
            ``"int8"`` (required) or ``"none"``; exact either way (see `spae_fast.saq`), packed once here.
    """

    def __init__(
        self,
        codebook: VocabCodebook | Codebook | torch.Tensor | str,
        layers: Sequence[int] = DEFAULT_LAYERS,
        grid: int = DEFAULT_GRID,
        mode: str = "saq",
        metric: str = "l2",
        beta: float = 0.25,
        backend: str = "auto",
        check_finite: bool = True,
        prefilter: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(codebook, str):
            codebook = VocabCodebook.from_pretrained(codebook)
        self.vocab = codebook if isinstance(codebook, VocabCodebook) else None
        if isinstance(codebook, VocabCodebook):
            codebook = codebook.codebook
        if not isinstance(codebook, Codebook):
            codebook = Codebook(_validate.codebook_weight(codebook, "codebook"), "l2")
        if codebook.metric != "l2":
            raise ValueError(
                f"the quantizer's codebook must be built with metric 'l2', got {codebook.metric!r}; for cosine "
                "quantization pass metric='cosine' to SPAEQuantizer instead"
            )
        if mode not in SAQ_MODES:
            raise ValueError(f"mode must be one of {SAQ_MODES}, got {mode!r}")
        if metric not in QUANTIZER_METRICS:
            raise ValueError(f"metric must be one of {QUANTIZER_METRICS}, got {metric!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise TypeError(f"beta must be a finite number >= 0, got {type(beta).__name__} {beta!r}")
        if not (math.isfinite(beta) and beta >= 0):  # inf would make every loss inf, NaN every gradient NaN
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if not isinstance(check_finite, bool):  # None or 0 would silently switch the check off
            raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__} {check_finite!r}")
        resolve_backend(backend, codebook.device)  # reject unknown / unavailable backends now
        self.pyramid = TokenPyramid(layers, grid)  # checks layers: a non-empty sequence of positive ints
        if self.pyramid.num_layers > SAQ_MAX_LAYERS:
            raise ValueError(f"layers has {self.pyramid.num_layers} layers; at most {SAQ_MAX_LAYERS} are supported")
        self.mode = mode
        self.metric = metric
        self.beta = float(beta)
        self.backend = backend
        self.check_finite = check_finite
        if metric == "cosine":
            codebook = Codebook(F.normalize(codebook.weight.float(), dim=1), "l2", copy=False)  # a fresh table
        self.codebook = codebook
        self.prefilter = prefilter
        empty = torch.empty(0)
        self._prefilter_operands = (empty, empty, empty)
        if codebook.device.type == "cpu" and codebook.cpu_panels is not None:
            self._prefilter_operands = _prefilter_operands(
                codebook, codebook.weight, codebook.cpu_panels, codebook.cpu_bias, prefilter, "cpu"
            )
        # The frozen rows (a non-persistent buffer: follows .to(), stays out of state_dict).
        self.register_buffer("weight", codebook.weight, persistent=False)
        self._kept_device_codebook: Codebook | None = None  # see _device_codebook
        # [g * g, L] int64: column (in the [B, total] ids) of layer l's token covering cell (y, x), raster order.
        cells = torch.arange(grid * grid)
        rows, cols = cells // grid, cells % grid
        columns = [
            self.pyramid.first(layer) + (rows // self.pyramid.stride(layer)) * side + cols // self.pyramid.stride(layer)
            for layer, side in enumerate(self.pyramid.sides)
        ]
        self.register_buffer("covering_columns", torch.stack(columns, dim=1), persistent=False)

    # ---- geometry -----------------------------------------------------------------------------------------

    @property
    def layers(self) -> tuple[int, ...]:
        return self.pyramid.sides

    @property
    def grid(self) -> int:
        return self.pyramid.grid

    @property
    def num_layers(self) -> int:
        return self.pyramid.num_layers

    @property
    def num_tokens(self) -> int:
        """Tokens per image over all layers (597 for the default pyramid)."""
        return self.pyramid.total()

    # ---- forward ------------------------------------------------------------------------------------------

    def _search_operands(self, device: torch.device) -> tuple:
        """(backend, weight, panels, bias, norm_bound, bf16 words, bf16 bias, bf16 bounds) for the saq op."""
        backend = resolve_backend(self.backend, device)
        if backend == "cpu":
            if self.codebook.device.type != "cpu":
                raise ValueError(f"backend 'cpu' needs the codebook on the CPU, it is on {self.codebook.device}")
            if not torch.compiler.is_compiling():
                self.codebook.check_unchanged()
            cb = self.codebook
            return (backend, cb.weight, cb.cpu_panels, cb.cpu_bias, cb.cpu_norm_bound, *self._prefilter_operands)
        empty = torch.empty(0)
        weight = self.weight
        if backend in ("cuda", "triton") and not torch.compiler.is_compiling():
            weight = codebook_operands(self._device_codebook(), None, backend)[0]
        return (backend, weight, *(empty,) * 7)

    def _device_codebook(self) -> Codebook:
        """A `Codebook` sharing this module's table buffer where it lives (``.to()`` moves the buffer, not
        ``self.codebook``), so the GPU kernels prepare their operands of the table once and keep them in it
        (`ops.gpu_search.operands`) instead of once per forward. Rebuilt when the buffer moves."""
        kept = self._kept_device_codebook
        if kept is None or kept.device != self.weight.device or kept.weight.data_ptr() != self.weight.data_ptr():
            kept = self._kept_device_codebook = Codebook(self.weight, "l2", copy=False)
        return kept

    def _saq(self, latent: torch.Tensor) -> torch.Tensor:
        backend, *operands = self._search_operands(latent.device)
        return torch.ops.spae_fast.saq(
            latent.detach(), *operands, list(self.layers), self.mode, backend, self.check_finite
        )  # [B, total]

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Token ids only: z ``[B, D, g, g]`` -> ``[B, total]`` int64 (layer after layer, raster order)."""
        z = _validate.latent(z, self.codebook.dim, self.weight.device, self.grid)
        if self.metric == "cosine":
            z = F.normalize(z.float(), dim=1)
        return self._saq(z)

    def forward(self, z: torch.Tensor) -> SPAEQuantizerOutput:
        """z ``[B, D, g, g]`` -> `SPAEQuantizerOutput` (quantized, ids per layer, commitment loss, layer errors).

        Memory: besides the ids, the forward holds at most three ``[B, D, g, g]`` fp32 buffers at a time (one
        prefix's reconstruction, the sum m of all of them, ``quantized``); each prefix's running mean is one
        ``embedding_bag`` over the covering tokens of every cell, with no gathered copies.
        """
        z = _validate.latent(z, self.codebook.dim, self.weight.device, self.grid)
        latent = F.normalize(z.float(), dim=1).to(z.dtype) if self.metric == "cosine" else z
        flat = self._saq(latent)  # [B, total]
        ids = self.split_ids(flat)

        batch, dim, grid = z.shape[0], z.shape[1], self.grid
        target = latent.detach().float().permute(0, 2, 3, 1)  # [B, g, g, D] view: cells x D
        covering = self._covering(flat)  # [B g g, L] rows of the tokens covering each cell
        mean_reconstruction = torch.zeros(batch, grid, grid, dim, dtype=torch.float32, device=z.device)
        errors = []
        difference = None
        for layer in range(1, self.num_layers + 1):
            difference = None  # at most one prefix's reconstruction alive at a time
            difference = self._reconstruct(covering, layer).view(batch, grid, grid, dim)  # z_hat_l
            mean_reconstruction.add_(difference)
            difference.sub_(target)  # z_hat_l - z, in place
            # max(.., 1): an empty batch (B = 0) has zero error, not 0 / 0
            errors.append(torch.dot(difference.view(-1), difference.view(-1)) / max(difference.numel(), 1))
        layer_errors = torch.stack(errors)  # [L] mean ||z - z_hat_l||^2

        step = difference.permute(0, 3, 1, 2)  # z_hat_L - z  [B, D, g, g]
        quantized = latent + step.to(latent.dtype).detach()  # straight-through: z + sg(z_hat_L - z)
        del difference, step
        # Commitment loss beta * mean_l mean||z - sg(z_hat_l)||^2. Its gradient is 2 beta (z - m / L) / numel
        # with m = sum_l z_hat_l, so the linear surrogate beta <z, c>, c = 2 (z - m / L) / numel (built in
        # m's buffer), carries it with one saved buffer; the detached correction makes the value exactly
        # beta * layer_errors.mean().
        coefficient = mean_reconstruction.mul_(-1.0 / self.num_layers).add_(target).mul_(2.0 / max(target.numel(), 1))
        surrogate = (latent * coefficient.permute(0, 3, 1, 2)).sum()
        loss = self.beta * (surrogate + (layer_errors.mean() - surrogate).detach())
        return SPAEQuantizerOutput(quantized, ids, loss, layer_errors.detach())

    def layer_targets(self, z: torch.Tensor, ids: IdsLike, num_layers: int) -> torch.Tensor:
        """The SAQ targets of the first ``num_layers`` layers at their sampled positions, differentiable in z:

            z_l(p) = c_l z(p) - sum_{m<l} e(k_m(Up_m(p)))        c_l = l (SAQ) or 1 (RQ)

        z ``[B, D, g, g]`` (the latent given to `forward`; cosine quantizers normalise it the same way), ids of
        at least ``num_layers`` layers -> ``[B, total(num_layers), D]`` fp32, laid out as the ids (layer after
        layer, raster order). These are the semantic loss's positions (SPAE-METHOD.md §4): its gradient reaches
        z through c_l z(p); the chosen tokens' embeddings are constants (the codebook is frozen).
        """
        num_layers = self.pyramid.check_num_layers(num_layers)
        flat = self.flatten_ids(ids, num_layers).to(self.weight.device)
        latent = F.normalize(z.float(), dim=1) if self.metric == "cosine" else z.float()
        cells = latent.flatten(2)  # [B, D, g * g]
        targets = []
        for layer in range(num_layers):
            rows = torch.tensor(self.pyramid.positions(layer), device=z.device)
            sampled = (rows[:, None] * self.grid + rows[None, :]).reshape(-1)  # [s_l^2] cells, raster order
            coefficient = float(layer + 1) if self.mode == "saq" else 1.0
            target = coefficient * cells[:, :, sampled].transpose(1, 2)  # [B, s_l^2, D]
            if layer:
                covering = flat[:, self.covering_columns[sampled, :layer].to(flat.device)]  # [B, s_l^2, layer]
                previous = F.embedding_bag(covering.reshape(-1, layer), self.weight, mode="sum").float()
                target = target - previous.view(target.shape)
            targets.append(target)
        return torch.cat(targets, dim=1)

    # ---- ids -> latents -----------------------------------------------------------------------------------

    def _covering(self, flat: torch.Tensor) -> torch.Tensor:
        """``[B, n]`` ids -> ``[B * g * g, layers in n]``: the row of each layer's token covering each cell."""
        num_layers = self.pyramid.prefix_layers(flat.shape[1])
        columns = self.covering_columns[:, :num_layers].to(flat.device)  # [g * g, layers]
        return flat[:, columns].reshape(-1, num_layers)

    def _reconstruct(self, covering: torch.Tensor, num_layers: int) -> torch.Tensor:
        """z_hat of the first ``num_layers`` layers at every cell, ``[cells, D]`` fp32: the mean (SAQ) or sum
        (RQ) of the covering tokens' embeddings, as one embedding_bag."""
        bags = covering[:, :num_layers]
        out = F.embedding_bag(bags, self.weight, mode="mean" if self.mode == "saq" else "sum")
        return out.float()

    def split_ids(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``[B, n]`` ids of a prefix of layers (layer after layer, raster order) -> ``[B, s_l, s_l]`` per layer."""
        num_layers = self.pyramid.prefix_layers(flat.shape[-1])
        out, start = [], 0
        for side in self.layers[:num_layers]:
            out.append(flat[:, start : start + side * side].reshape(flat.shape[0], side, side))
            start += side * side
        return out

    def flatten_ids(self, ids: IdsLike, num_layers: int | None = None) -> torch.Tensor:
        """Per-layer ids (or an already flat ``[B, n]`` tensor) -> ``[B, total of the first num_layers]``
        (``num_layers=None``: every layer ``ids`` holds)."""
        if not isinstance(ids, torch.Tensor) and (isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence)):
            raise TypeError(f"ids must be a [B, n] tensor or a list of [B, s_l, s_l] tensors, got {type(ids).__name__}")
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 2:
                raise ValueError(f"ids must be [B, n] or a list of [B, s_l, s_l] tensors, got shape {tuple(ids.shape)}")
            available = self.pyramid.prefix_layers(ids.shape[1])
            layers = [ids[:, self.pyramid.first(l) : self.pyramid.first(l) + self.layers[l] ** 2] for l in range(available)]
        else:
            layers = list(ids)
            available = len(layers)
            if not 1 <= available <= self.num_layers:
                raise ValueError(f"ids must hold 1 .. {self.num_layers} layers, got {available}")
        num_layers = available if num_layers is None else self.pyramid.check_num_layers(num_layers)
        if num_layers > available:
            raise ValueError(f"num_layers={num_layers} but ids hold only {available} layers")
        flat = []
        for layer in range(num_layers):
            side = self.layers[layer]
            layer_ids = layers[layer]
            if not isinstance(layer_ids, torch.Tensor):
                raise TypeError(f"ids of layer {layer + 1} must be a tensor [B, {side}, {side}], got {type(layer_ids).__name__}")
            if layer_ids.dim() < 2 or layer_ids.shape[-1] * (layer_ids.shape[-2] if layer_ids.dim() == 3 else 1) != side * side:
                raise ValueError(f"ids of layer {layer + 1} must be [B, {side}, {side}] (or [B, {side * side}]), got {tuple(layer_ids.shape)}")
            if layer_ids.dtype.is_floating_point or layer_ids.dtype.is_complex or layer_ids.dtype == torch.bool:
                # checked per layer: torch.cat would promote a bool layer next to int ones to 0 / 1 rows
                raise TypeError(f"ids must be integer codebook rows, got {layer_ids.dtype} (layer {layer + 1})")
            if layer_ids.shape[0] != layers[0].shape[0]:
                raise ValueError(f"ids of layer {layer + 1} hold {layer_ids.shape[0]} images, layer 1 holds {layers[0].shape[0]}")
            flat.append(layer_ids.reshape(layer_ids.shape[0], side * side))
        return torch.cat(flat, dim=1).to(torch.int64)

    def _codebook_rows(self, ids: IdsLike, num_layers: int | None = None) -> torch.Tensor:
        """`flatten_ids`, checked to be rows of this codebook, on the codebook's device."""
        flat = self.flatten_ids(ids, num_layers)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.weight.shape[0]):
            raise ValueError(f"ids must be codebook rows in [0, {self.weight.shape[0]}), got {int(flat.min())} .. {int(flat.max())}")
        return flat.to(self.weight.device)

    def decode(self, ids: IdsLike, num_layers: int | None = None) -> torch.Tensor:
        """The reconstruction z_hat_n ``[B, D, g, g]`` of the first ``num_layers`` layers (all of ``ids`` by default):
        the running mean (SAQ) or sum (RQ) of the covering tokens' embeddings at every grid cell."""
        flat = self._codebook_rows(ids, num_layers)
        covering = self._covering(flat)
        cells = self._reconstruct(covering, covering.shape[1])  # [B g g, D]
        return cells.view(flat.shape[0], self.grid, self.grid, self.weight.shape[1]).permute(0, 3, 1, 2)

    def prefix_latents(self, ids: IdsLike, num_layers: torch.Tensor) -> torch.Tensor:
        """z_hat of a different prefix per image: ``num_layers`` ``[B]`` ints in 1 .. L -> ``[B, D, g, g]`` fp32,
        image b decoded from its first ``num_layers[b]`` layers (as `decode` would give it, up to rounding: one
        weighted embedding_bag for the whole batch). Used to train the decoder on shorter descriptions."""
        flat = self._codebook_rows(ids)
        available = self.pyramid.prefix_layers(flat.shape[1])
        if (not isinstance(num_layers, torch.Tensor) or num_layers.dtype.is_floating_point
                or tuple(num_layers.shape) != (flat.shape[0],)):  # fmt: skip
            raise TypeError(f"num_layers must be an integer tensor [B] = [{flat.shape[0]}], got {num_layers!r}")
        if num_layers.numel() and not (1 <= int(num_layers.min()) and int(num_layers.max()) <= available):
            raise ValueError(f"num_layers must be in 1 .. {available} (the layers ids hold), got "
                             f"{int(num_layers.min())} .. {int(num_layers.max())}")  # fmt: skip
        covering = self._covering(flat)  # [B g g, L]
        counts = num_layers.to(covering.device).repeat_interleave(self.grid * self.grid)[:, None]  # [B g g, 1]
        used = (torch.arange(available, device=covering.device)[None, :] < counts).float()
        weights = used / counts if self.mode == "saq" else used  # running mean (SAQ) or sum (RQ) of the prefix
        cells = F.embedding_bag(covering, self.weight, mode="sum", per_sample_weights=weights.to(self.weight.dtype))
        return cells.float().view(flat.shape[0], self.grid, self.grid, self.weight.shape[1]).permute(0, 3, 1, 2)

    # ---- ids <-> words ------------------------------------------------------------------------------------

    def _vocab(self) -> VocabCodebook:
        if self.vocab is None:
            raise ValueError("words need a VocabCodebook (token strings); this quantizer was built from a plain table")
        return self.vocab

    def to_words(self, ids: IdsLike, num_layers: int | None = None) -> list[list[str]]:
        """The pyramid as LLM token strings: per image, layer after layer, raster order inside a layer (raw
        vocabulary entries such as ``"Ġcat"``; `from_words` inverts it)."""
        flat = self.flatten_ids(ids, num_layers)
        vocab = self._vocab()
        return [vocab.decode(row) for row in flat]

    def to_text(self, ids: IdsLike, num_layers: int | None = None, layer_separator: str | None = None) -> list[str]:
        """Per image, the tokens' text as one prompt string: words joined by spaces, layers optionally
        separated by ``layer_separator`` (e.g. ``" | "``). For reading; feed `to_llm_ids` to a model."""
        flat = self.flatten_ids(ids, num_layers)
        vocab = self._vocab()
        out = []
        for row in flat:
            words = [text.strip() for text in vocab.text(row)]
            if layer_separator is None:
                out.append(" ".join(words))
                continue
            parts, start = [], 0
            for side in self.layers[: self.pyramid.prefix_layers(len(words))]:
                parts.append(" ".join(words[start : start + side * side]))
                start += side * side
            out.append(layer_separator.join(parts))
        return out

    def from_words(self, words: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        """Per-image token strings (a whole prefix of layers, as `to_words` writes) -> ids per layer."""
        if isinstance(words, str) or not words or isinstance(words[0], str):
            raise TypeError("words must be a list (one per image) of lists of token strings")
        lengths = {len(w) for w in words}
        if len(lengths) != 1:
            raise ValueError(f"every image needs the same number of tokens, got lengths {sorted(lengths)}")
        self.pyramid.prefix_layers(lengths.pop())
        vocab = self._vocab()
        flat = torch.stack([vocab.encode(list(w)) for w in words]).to(self.weight.device)
        return self.split_ids(flat)

    def to_llm_ids(self, ids: IdsLike, num_layers: int | None = None) -> torch.Tensor:
        """``[B, n]`` LLM token ids of the pyramid (layer after layer, raster order), to feed the LLM directly."""
        return self._vocab().to_llm_ids(self.flatten_ids(ids, num_layers))

    def from_llm_ids(self, llm_ids: torch.Tensor) -> list[torch.Tensor]:
        """``[B, n]`` LLM token ids (a whole prefix of layers) -> ids per layer (codebook rows)."""
        llm_ids = torch.as_tensor(llm_ids)
        if llm_ids.dim() != 2:
            raise ValueError(f"llm_ids must be [B, n], got shape {tuple(llm_ids.shape)}")
        self.pyramid.prefix_layers(llm_ids.shape[1])
        return self.split_ids(self._vocab().from_llm_ids(llm_ids).to(self.weight.device))

    def extra_repr(self) -> str:
        return (
            f"layers={self.layers}, grid={self.grid}, mode={self.mode!r}, metric={self.metric!r}, beta={self.beta}, "
            f"backend={self.backend!r}, codebook={self.vocab if self.vocab is not None else self.codebook}"
        )
