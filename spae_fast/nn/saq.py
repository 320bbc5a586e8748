"""`StreamingAverageVQ`: SPAE's streaming average quantization (SAQ) on sequences ``[B, N, D]`` -- the
multi-layer quantizer of `spae_fast.SPAEQuantizer` without the 2-D token pyramid (every layer quantizes every
position), with `ResidualVQ`'s contract.

With e(k) the codebook rows (one codebook shared by every layer) and x a vector (after the optional projection):

    target of layer l:      t_l = l x - sum_{m<l} e(k_m)            (residual VQ: c_l = 1, here c_l = l)
    token of layer l:       k_l = argmin_k ||t_l - e(k)||^2
    running mean:           z_hat_l = (1/l) sum_{m<=l} e(k_m)

so each layer moves the running mean of the chosen embeddings closest to x, and any prefix of layers decodes
to a usable approximation (coarse to fine). Outputs:

    quantized = x + sg(z_hat_L - x)   (rotation_trick=False)   or   the rotation trick from x to z_hat_L
    losses_l  = commitment_weight * mean ||x - sg(z_hat_l)||^2     (one per layer, [L]; zeros in eval)

The L searches are one fused native call (``spae_fast.saq`` in "saq" mode on [B N, D, 1, 1], layers of side 1;
each target formed inside the search) whenever the table cannot change between layers, as in `ResidualVQ`.
EMA (optional; off for a frozen LLM vocabulary, SAQ's use) accumulates the statistics of (t_l, k_l) over the
layers and updates the table once per step. ``quantize_dropout`` keeps a random prefix of layers in training
and outputs its running mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .residual import ResidualVQ
from .vq import rotate_to, straight_through


class StreamingAverageVQ(ResidualVQ):
    """SAQ on ``[B, N, D]`` (math: the module docstring). Arguments as `ResidualVQ` (the codebook is always
    shared; ``use_cosine_sim`` is not supported: the running mean of unit vectors leaves the sphere).
    Typical use: ``StreamingAverageVQ.from_pretrained_vocab("smollm2", num_quantizers=4)``.
    Returns ``(quantized, indices [B, N, L], losses [L])``."""

    def __init__(self, *, dim: int, num_quantizers: int, codebook_size: int, **kwargs) -> None:
        if kwargs.get("use_cosine_sim"):
            raise NotImplementedError("StreamingAverageVQ: use_cosine_sim is not supported (running means of unit "
                                      "vectors are not unit vectors); normalise the input yourself")  # fmt: skip
        if "shared_codebook" in kwargs and not kwargs.pop("shared_codebook"):
            raise ValueError(
                "StreamingAverageVQ always shares one codebook across layers (shared_codebook=True)"
            )
        if kwargs.get("stochastic_sample_codes"):
            raise NotImplementedError("StreamingAverageVQ: stochastic_sample_codes is not supported")
        if kwargs.get("quant_grad_frac"):
            raise NotImplementedError(
                "StreamingAverageVQ: quant_grad_frac is not supported (targets are detached)"
            )
        super().__init__(dim=dim, num_quantizers=num_quantizers, codebook_size=codebook_size, shared_codebook=True,
                         **kwargs)  # fmt: skip

    decodes_prefixes = True

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices [..., L']`` (any prefix L' <= L of the layers; -1 = dropped) -> the running mean of the kept layers' codes, projected out."""
        codes = self.get_codes_from_indices(indices)  # [L, ..., D], zeros where dropped
        kept = (indices >= 0).sum(-1, keepdim=True)
        out = self.project_out(codes.sum(0) / kept.clamp_min(1).to(codes.dtype))
        return out.movedim(-1, 1) if self.accept_image_fmap else out

    def _layers_forward(self, x, mask, sample_codebook_temp, freeze_codebook, dropout_seed):
        freeze_codebook = freeze_codebook or self.layers[0].freeze_codebook
        dropout_index = self._dropout_index(x.device, dropout_seed)
        active = self.num_quantizers if dropout_index is None else dropout_index + 1
        fused = self._fused_indices(x, active, "saq") if self._can_fuse(freeze_codebook, active) else None
        layer = self.layers[0]
        target_base = x.detach().float()
        code_sum = torch.zeros_like(target_base)
        indices, losses, targets = [], [], []
        for i in range(self.num_quantizers):
            if i >= active:
                indices.append(torch.full(x.shape[:-1], -1, dtype=torch.long, device=x.device))
                losses.append(x.new_zeros((), dtype=torch.float32))
                continue
            target = (i + 1) * target_base - code_sum  # t_l = l x - sum_{m<l} e(k_m)
            targets.append(target)
            codes, layer_indices, _ = layer.quantize_rows(
                target, mask, input_requires_grad=False, sample_codebook_temp=sample_codebook_temp,
                freeze_codebook=freeze_codebook, indices=None if fused is None else fused[..., i],
            )  # fmt: skip
            code_sum = code_sum + codes.float()
            running_mean = code_sum / (i + 1)
            if self.training and layer.has_commitment_loss:
                error = F.mse_loss(running_mean.to(x.dtype), x, reduction="none")
                loss = (error.mean() if mask is None else error[mask].mean()) * layer.commitment_weight
            else:
                loss = x.new_zeros((), dtype=torch.float32)
            indices.append(layer_indices if mask is None else torch.where(mask, layer_indices, -1))
            losses.append(loss.float())
        mean = (code_sum / active).to(x.dtype)
        if self.training and x.requires_grad and layer.route_gradients_to_input:
            quantized = rotate_to(x, mean) if layer.rotation_trick else straight_through(x, mean)
        else:
            quantized = mean
        if self.training:
            self._finish_shared_update(torch.stack(targets, dim=-2), freeze_codebook)
        return quantized, torch.stack(indices, dim=-1), torch.stack(losses)
