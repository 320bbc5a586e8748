"""`ResidualVQ`: vector-quantize-pytorch's residual quantizer (Zeghidour et al. 2021, Algorithm 1) on the fused
native search.

With r_1 = x (after the optional projection) and layer l's `VectorQuantize` Q_l:

    q_l = Q_l(r_l),   r_{l+1} = r_l - sg(q_l),   quantized = sum_l q_l,   loss_l = Q_l's commitment loss

returning ``(quantized, indices [..., L], losses [L])`` as vector-quantize-pytorch does. ``shared_codebook``:
one EMA codebook for every layer whose statistics accumulate over the layers and whose table is updated once at
the end of the step. There the search of all L layers is one fused native call (``spae_fast.saq`` in residual
mode on [B N, D, 1, 1] with L layers of side 1: target r_l = x - sum_{m<l} e(k_m) formed inside the search)
whenever the table cannot change between layers (no dead-code replacement in a training step, no stochastic
sampling, l2 metric, L <= 16); otherwise (separate codebooks, the default) every layer is one
`spae_fast.nearest` call on its own packed table. ``quantize_dropout``: in training the layers after a random
index (drawn exactly as vector-quantize-pytorch draws it) are skipped: index -1, loss 0.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from math import ceil

import torch
import torch.distributed as dist
from torch import nn

from ..ops import saq
from .codebook import is_distributed
from .vq import VectorQuantize, check_unsupported, indices_to_llm_ids, indices_to_words, load_vocab_table

SAQ_MAX_LAYERS = 16


def maybe_sync_seed(device: torch.device, max_size: int = 10_000) -> int:
    """A random int, all-reduced over the group so that every rank drops the same layers (as vqp)."""
    seed = torch.randint(0, max_size, (), device=device)
    if is_distributed():
        dist.all_reduce(seed)
    return int(seed.item())


class ResidualVQ(nn.Module):
    """vector-quantize-pytorch's ``ResidualVQ`` (math: the module docstring).

    Supported arguments (vector-quantize-pytorch 1.32 names and defaults): ``dim``, ``num_quantizers``,
    ``codebook_size`` (an int or one per layer), ``codebook_dim``, ``shared_codebook``, ``quantize_dropout``,
    ``quantize_dropout_cutoff_index``, ``quantize_dropout_multiple_of``, ``accept_image_fmap`` (``[B, D, H, W]``
    in, indices ``[B, H, W, L]``), ``quant_grad_frac``, ``return_zeros_for_masked_padding``, and every
    `VectorQuantize` argument, passed to each layer. ``heads``, ``implicit_neural_codebook``, ``diveq``,
    ``beam_size`` and the forward's ``indices`` / ``beam_size`` raise `NotImplementedError`.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int | None = None,
        codebook_size: int | tuple[int, ...],
        codebook_dim: int | None = None,
        shared_codebook: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        accept_image_fmap: bool = False,
        quant_grad_frac: float = 0.0,
        return_zeros_for_masked_padding: bool = True,
        **vq_kwargs,
    ) -> None:
        super().__init__()
        residual_only = {k: vq_kwargs.pop(k) for k in ("implicit_neural_codebook", "diveq", "beam_size",
                                                       "eval_beam_size", "mlp_kwargs",
                                                       "beam_score_quantizer_weights", "heads") if k in vq_kwargs}  # fmt: skip
        check_unsupported(type(self).__name__, residual_only)
        for name in ("channel_last", "accept_3d_fmap"):
            if name in vq_kwargs:
                raise NotImplementedError(f"{type(self).__name__}: {name} is not supported (inputs are [B, N, D], "
                                          "or [B, D, H, W] with accept_image_fmap)")  # fmt: skip
        sizes = (
            codebook_size if isinstance(codebook_size, tuple) else (codebook_size,) * (num_quantizers or 0)
        )
        num_quantizers = len(sizes) if num_quantizers is None else num_quantizers
        if num_quantizers < 1 or len(sizes) != num_quantizers:
            raise ValueError(f"{type(self).__name__}: num_quantizers must be >= 1 and match codebook_size, got "
                             f"num_quantizers={num_quantizers}, codebook_size={codebook_size!r}")  # fmt: skip
        if quantize_dropout_cutoff_index < 0:
            raise ValueError(
                f"quantize_dropout_cutoff_index must be >= 0, got {quantize_dropout_cutoff_index}"
            )
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.dim, self.codebook_dim = dim, codebook_dim
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.accept_image_fmap = accept_image_fmap
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        vq_kwargs.update(return_zeros_for_masked_padding=return_zeros_for_masked_padding)
        if shared_codebook:
            vq_kwargs.update(manual_ema_update=True)
        self.num_quantizers, self.codebook_sizes = num_quantizers, sizes
        self.uniform_codebook_size = len(set(sizes)) == 1
        self.layers = nn.ModuleList(
            [
                VectorQuantize(dim=codebook_dim, codebook_size=size, codebook_dim=codebook_dim, **vq_kwargs)
                for size in sizes
            ]
        )
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.quant_grad_frac = quant_grad_frac
        self.shared_codebook = shared_codebook
        if shared_codebook:
            if not self.uniform_codebook_size:
                raise ValueError("shared_codebook needs one codebook_size for every layer")
            for layer in self.layers[1:]:
                layer._codebook = self.layers[0]._codebook

    # ---- a frozen LLM vocabulary --------------------------------------------------------------------------

    @classmethod
    def from_pretrained_vocab(
        cls,
        path_or_name: str | os.PathLike = "smollm2",
        token_filter: str | Callable[[str], bool] | Sequence[int] | None = "words",
        *,
        num_quantizers: int,
        dim: int | None = None,
        project: bool = False,
        vocab=None,
        **kwargs,
    ):
        """Every layer quantizes against one frozen LLM vocabulary (shared codebook; the search of all layers
        is then one fused native call). Arguments as `VectorQuantize.from_pretrained_vocab`, plus
        ``num_quantizers`` and the residual options (``quantize_dropout``, ...)."""
        vocab, table, dim = load_vocab_table(path_or_name, token_filter, vocab, dim, project, kwargs)
        module = cls(dim=dim, num_quantizers=num_quantizers, codebook_size=table.shape[0], codebook_dim=table.shape[1],
                     shared_codebook=True, freeze_codebook=True, ema_update=False, _initial_table=table, **kwargs)  # fmt: skip
        module.vocab = vocab
        return module

    def indices_to_llm_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook indices (any shape; -1 = masked / dropped stays -1) -> the LLM's token ids."""
        return indices_to_llm_ids(getattr(self, "vocab", None), indices)

    def indices_to_words(self, indices: torch.Tensor) -> list[str]:
        """Codebook indices (flattened, -1 skipped) -> the tokens' text."""
        return indices_to_words(getattr(self, "vocab", None), indices)

    decodes_prefixes = False  # True where any prefix of layers decodes (StreamingAverageVQ)

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def vq_is_ema_updating(self) -> bool:
        return self.layers[0].ema_update

    @property
    def codebooks(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``[L, V, D]`` (a tuple of ``[V_l, D]`` when the sizes differ)."""
        books = tuple(layer.codebook for layer in self.layers)
        return torch.stack(books) if self.uniform_codebook_size else books

    # ---- indices ------------------------------------------------------------------------------------------

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices [..., L']`` (L' <= L with quantize_dropout; -1 = dropped) -> codes ``[L, ..., D]`` (zeros
        for dropped layers)."""
        if indices.shape[-1] < self.num_quantizers:
            if not (self.quantize_dropout or self.decodes_prefixes):
                raise ValueError(f"indices has {indices.shape[-1]} layers but the quantizer has "
                                 f"{self.num_quantizers}; fewer need quantize_dropout=True")  # fmt: skip
            pad = indices.new_full((*indices.shape[:-1], self.num_quantizers - indices.shape[-1]), -1)
            indices = torch.cat((indices, pad), dim=-1)
        dropped = indices < 0
        safe = indices.masked_fill(dropped, 0)
        codes = torch.stack([layer.codebook[safe[..., i]] for i, layer in enumerate(self.layers)])
        return codes.masked_fill(dropped.movedim(-1, 0)[..., None], 0.0)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices [..., L']`` -> the eval-mode output (sum of the codes, projected out)."""
        out = self.project_out(self.get_codes_from_indices(indices).sum(0))
        return out.movedim(-1, 1) if self.accept_image_fmap else out

    # ---- forward ------------------------------------------------------------------------------------------

    def _dropout_index(self, device: torch.device, seed: int | None) -> int | None:
        if not (self.training and self.quantize_dropout):
            return None
        seed = maybe_sync_seed(device) if seed is None else seed
        index = random.Random(seed).randrange(self.quantize_dropout_cutoff_index, self.num_quantizers)
        if self.quantize_dropout_multiple_of != 1:
            multiple = self.quantize_dropout_multiple_of
            index = ceil((index + 1) / multiple) * multiple - 1
        return index

    def _can_fuse(self, freeze_codebook: bool, num_layers: int) -> bool:
        """One fused multi-layer search is exact when every layer searches the same, unchanging l2 table."""
        layer, book = self.layers[0], self.layers[0]._codebook
        updating = self.training and not freeze_codebook
        return (self.shared_codebook and not layer.use_cosine_sim and bool(book.initted)
                and 1 < num_layers <= SAQ_MAX_LAYERS and not (self.training and layer.stochastic_sample_codes)
                and not (updating and book.has_dead_code_replacement))  # fmt: skip

    def _fused_indices(self, x: torch.Tensor, num_layers: int, mode: str) -> torch.Tensor:
        """ids ``[B, N, num_layers]`` of every layer from one native ``saq`` call (mode "rq" or "saq")."""
        flat = x.detach().reshape(-1, x.shape[-1])
        ids = saq(
            flat[:, :, None, None], self.layers[0]._codebook.search_codebook(), (1,) * num_layers, mode=mode
        )
        return ids.reshape(*x.shape[:-1], num_layers)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool = False,
        beam_size: int | None = None,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ):
        """x ``[B, N, D]`` (``[B, D, H, W]`` with accept_image_fmap) -> ``(quantized, indices [B, N, L],
        losses [L])`` (+ all codes ``[L, B, N, D]`` with ``return_all_codes``)."""
        if indices is not None or beam_size is not None:
            raise NotImplementedError(f"{type(self).__name__}.forward: indices (cross-entropy loss) and "
                                      "beam_size are not supported by spae_fast.nn")  # fmt: skip
        image_shape = None
        if self.accept_image_fmap:
            if x.ndim != 4 or mask is not None:
                raise ValueError(
                    f"accept_image_fmap takes [B, D, H, W] without mask, got shape {tuple(x.shape)}"
                )
            image_shape = x.shape[-2:]
            x = x.flatten(2).transpose(1, 2)
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__}.forward: expected x [B, N, {self.dim}], got {tuple(x.shape)}"
            )
        if mask is not None:
            from .vq import _check_mask

            mask = _check_mask(mask, x.shape[:2])
        x = self.project_in(x)
        quantized_out, all_indices, all_losses = self._layers_forward(
            x, mask, sample_codebook_temp, freeze_codebook, rand_quantize_dropout_fixed_seed
        )
        quantized_out = self.project_out(quantized_out)
        if mask is not None and self.return_zeros_for_masked_padding:
            quantized_out = torch.where(mask[..., None], quantized_out, torch.zeros_like(quantized_out))
        if image_shape is not None:
            quantized_out = quantized_out.transpose(1, 2).reshape(x.shape[0], -1, *image_shape)
            all_indices = all_indices.reshape(x.shape[0], *image_shape, -1)
        out = (quantized_out, all_indices, all_losses)
        if return_all_codes:
            out = (*out, self.get_codes_from_indices(all_indices))
        return out

    def _layers_forward(self, x, mask, sample_codebook_temp, freeze_codebook, dropout_seed):
        # A layer built frozen stays frozen (vector-quantize-pytorch 1.32's ResidualVQ passes its forward's
        # freeze_codebook=False down, overriding the layers' own freeze_codebook=True).
        freeze_codebook = freeze_codebook or self.layers[0].freeze_codebook
        dropout_index = self._dropout_index(x.device, dropout_seed)
        active = self.num_quantizers if dropout_index is None else dropout_index + 1
        fused = self._fused_indices(x, active, "rq") if self._can_fuse(freeze_codebook, active) else None
        quantized_out = torch.zeros_like(x)
        residual = x
        indices, losses, residuals = [], [], []
        for i, layer in enumerate(self.layers):
            if i >= active:
                indices.append(torch.full(x.shape[:-1], -1, dtype=torch.long, device=x.device))
                losses.append(x.new_zeros((), dtype=torch.float32))
                continue
            residuals.append(residual)
            quantized, layer_indices, loss, _ = layer.forward_sequence(
                residual, mask, input_requires_grad=residual.requires_grad, sample_codebook_temp=sample_codebook_temp,
                freeze_codebook=freeze_codebook, indices=None if fused is None else fused[..., i],
            )  # fmt: skip
            frac = self.quant_grad_frac
            residual = residual - (
                quantized.detach() if frac <= 0 else frac * quantized + (1 - frac) * quantized.detach()
            )
            quantized_out = quantized_out + quantized
            indices.append(layer_indices)
            losses.append(loss.float())
        if self.training and self.shared_codebook:
            self._finish_shared_update(torch.stack(residuals, dim=-2), freeze_codebook)
        return quantized_out, torch.stack(indices, dim=-1), torch.stack(losses)

    def _finish_shared_update(self, layer_inputs: torch.Tensor, freeze_codebook: bool) -> None:
        """Shared codebook: the table is updated once per step from the statistics of every layer, then dead
        codes are replaced from every layer's input ``[B, N, L, D]`` (vector-quantize-pytorch's order)."""
        if freeze_codebook:
            return
        layer = self.layers[0]
        book = layer._codebook
        if self.vq_is_ema_updating:
            book.update_ema()
        flat = book.transform_input(layer_inputs.detach()).reshape(-1, layer_inputs.shape[-1])
        book.expire_codes_(flat)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_quantizers={self.num_quantizers}, codebook_size={self.codebook_sizes}, "
                f"shared_codebook={self.shared_codebook}, quantize_dropout={self.quantize_dropout}")  # fmt: skip
