"""`VectorQuantize`: a drop-in, fused replacement for vector-quantize-pytorch's ``VectorQuantize`` layer.

    quantized, indices, loss = vq(x)        # x [B, N, D] (or [B, D, N], [B, D, H, W], [B, D])

For each input vector x (after the optional projection ``codebook_dim`` and, with ``use_cosine_sim``, L2
normalisation x <- x / max(||x||, 1e-6)):

    k(x)      = argmin_k ||x - e_k||^2   (l2)      or   argmax_k x.e_k   (cosine; the codes are unit vectors)
    quantized = x + sg(e_k - x)                                              (straight_through / no rotation)
              = R x  with R the rotation taking x/|x| to e_k/|e_k|, scaled by sg(|e_k| / |x|)   (rotation_trick,
                Fifty et al. 2024, the default as in vector-quantize-pytorch; gradients flow to x through R x)
    loss      = commitment_weight * mean ||sg(e_k) - x||^2                   (training; 0 in eval, as vqp)

The argmin is the fused native search (`spae_fast.nearest`, no N x V matrix; ties to the lowest index), the
EMA codebook update is O(N D + V D) without a one-hot matrix (`spae_fast.nn.codebook`). Shared options behave
as vector-quantize-pytorch 1.32's; options it has and this layer does not raise `NotImplementedError` naming
them (see `UNSUPPORTED`). Differences, all documented in the README's migration section: ties go to the lowest
index (vqp: whatever its cdist rounding gives), stochastic sampling over more than 4096 codes samples among the
64 nearest codes, and with a ``mask`` the commitment loss compares against the quantizer's input (vqp: the raw
layer input, which only differs with projections or cosine similarity).
"""

from __future__ import annotations

import os
from collections import namedtuple
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .codebook import EuclideanCodebook, is_distributed, l2norm

LossBreakdown = namedtuple(
    "LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"]
)

# vector-quantize-pytorch options this layer does not implement: name -> the value that means "off".
UNSUPPORTED = {
    "heads": 1,
    "separate_codebook_per_head": False,
    "accept_3d_fmap": False,
    "commitment_use_cross_entropy_loss": False,
    "orthogonal_reg_weight": 0.0,
    "orthogonal_reg_active_codes_only": False,
    "orthogonal_reg_max_codes": None,
    "codebook_diversity_loss_weight": 0.0,
    "directional_reparam": False,
    "sync_affine_param": False,
    "vq_bridge": None,
    "learnable_codebook": None,
    "in_place_codebook_optimizer": None,
    "manual_in_place_optimizer_update": False,
    "affine_param": False,
    "sync_update_v": 0.0,
    "implicit_neural_codebook": False,
    "diveq": False,
    "beam_size": None,
    "eval_beam_size": None,
}
# Accepted because they only tune an unsupported option (their value is ignored only when that option is off).
INERT = ("codebook_diversity_temperature", "directional_reparam_variance", "affine_param_batch_decay",
         "affine_param_codebook_decay", "mlp_kwargs", "beam_score_quantizer_weights")  # fmt: skip


def check_unsupported(owner: str, options: dict) -> None:
    """Raise for vector-quantize-pytorch options this package does not implement, naming them."""
    unknown = [name for name in options if name not in UNSUPPORTED and name not in INERT]
    if unknown:
        raise TypeError(f"{owner}: unexpected argument(s) {', '.join(sorted(unknown))}")
    used = [f"{name}={value!r}" for name, value in options.items()
            if name in UNSUPPORTED and not _is_default(value, UNSUPPORTED[name])]  # fmt: skip
    if used:
        raise NotImplementedError(
            f"{owner}: vector-quantize-pytorch option(s) {', '.join(used)} are not supported by spae_fast.nn "
            f"(supported: see the README's migration section); remove them or use vector_quantize_pytorch"
        )


def _is_default(value: object, default: object) -> bool:
    if default is None:
        return value is None
    return value is not None and not isinstance(value, torch.Tensor) and value == default


def rotate_to(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024, Sec. 4.2; vector-quantize-pytorch's ``rotate_to``) for rows [.., D]:
    with u = src/|src|, q = tgt/|tgt|, w = sg((u + q)/|u + q|),

        out = (src - 2 (src.w) w + 2 (src.sg(u)) sg(q)) * sg(|tgt| / |src|)

    whose value is tgt (up to rounding) and whose gradient w.r.t. src is the rotation R = I - 2ww^T + 2qu^T
    scaled by |tgt|/|src|."""
    norm_src = src.norm(dim=-1, keepdim=True)
    norm_tgt = tgt.norm(dim=-1, keepdim=True)
    u = src / norm_src.clamp_min(1e-6)
    q = tgt / norm_tgt.clamp_min(1e-6)
    w = l2norm(u + q).detach()
    out = (
        src
        - 2 * (src * w).sum(-1, keepdim=True) * w
        + 2 * (src * u.detach()).sum(-1, keepdim=True) * q.detach()
    )
    return out * (norm_tgt / norm_src.clamp_min(1e-6)).detach()


def straight_through(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    return src + (tgt - src).detach()


class VectorQuantize(nn.Module):
    """vector-quantize-pytorch's ``VectorQuantize`` on the fused native search (math: the module docstring).

    Supported arguments (same names, defaults and meaning as vector-quantize-pytorch 1.32): ``dim``,
    ``codebook_size``, ``codebook_dim`` (projection in / out), ``layernorm_after_project_in``, ``decay``,
    ``eps``, ``freeze_codebook``, ``kmeans_init``, ``kmeans_iters``, ``sync_kmeans`` (k-means statistics
    follow ``sync_codebook``), ``use_cosine_sim``, ``threshold_ema_dead_code``, ``channel_last``,
    ``accept_image_fmap``, ``commitment_weight``, ``stochastic_sample_codes``, ``sample_codebook_temp``,
    ``straight_through`` (vqp's Gumbel straight-through; its softmax gradient is discarded by the layer's own
    straight-through estimator whenever the input requires grad, so it is exactly the plain estimator:
    quantized = x + sg(e - x)), ``rotation_trick`` (default: on for dim > 1), ``sync_codebook`` (default: on
    when a process group of more than one rank is initialised), ``ema_update``, ``manual_ema_update``,
    ``return_zeros_for_masked_padding``, ``route_gradients_to_input``. Everything in `UNSUPPORTED` raises
    `NotImplementedError` unless left at its "off" value.

    spae_fast additions: ``stochastic_sample_topk`` (``"auto"``: exact Gumbel-max sampling over all codes
    when V <= 4096, over the 64 nearest codes (`spae_fast.topk`) above; ``None``: always exact (chunked,
    O(N V) noise); an int k: always the k nearest), and `from_pretrained_vocab` (a frozen LLM vocabulary).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        decay: float = 0.8,
        eps: float = 1e-5,
        freeze_codebook: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        sync_kmeans: bool = True,
        use_cosine_sim: bool = False,
        layernorm_after_project_in: bool = False,
        threshold_ema_dead_code: float = 0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        commitment_weight: float = 1.0,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        straight_through: bool = False,
        rotation_trick: bool | None = None,
        sync_codebook: bool | None = None,
        ema_update: bool | None = None,
        manual_ema_update: bool = False,
        return_zeros_for_masked_padding: bool = True,
        route_gradients_to_input: bool = True,
        *,
        stochastic_sample_topk: int | str | None = "auto",
        _initial_table: torch.Tensor | None = None,
        **unsupported,
    ) -> None:
        super().__init__()
        check_unsupported("VectorQuantize", unsupported)
        for name, value in (("dim", dim), ("codebook_size", codebook_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VectorQuantize: {name} must be a positive int, got {value!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"VectorQuantize: decay must be in [0, 1], got {decay!r}")
        if not (stochastic_sample_topk in ("auto", None) or (isinstance(stochastic_sample_topk, int)
                                                            and stochastic_sample_topk >= 1)):  # fmt: skip
            raise ValueError(f"VectorQuantize: stochastic_sample_topk must be 'auto', None or an int >= 1, "
                             f"got {stochastic_sample_topk!r}")  # fmt: skip
        ema_update = True if ema_update is None else ema_update
        rotation_trick = dim > 1 if rotation_trick is None else rotation_trick
        if straight_through and rotation_trick:
            raise ValueError("VectorQuantize: straight_through=True and rotation_trick=True exclude each other "
                             "(vector-quantize-pytorch asserts the same); pass rotation_trick=False")  # fmt: skip
        self.dim, self.codebook_size = dim, codebook_size
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.codebook_dim = codebook_dim
        self.has_projections = codebook_dim != dim
        if self.has_projections:
            project_in = nn.Linear(dim, codebook_dim)
            self.project_in = (
                nn.Sequential(project_in, nn.LayerNorm(codebook_dim))
                if layernorm_after_project_in
                else project_in
            )
            self.project_out = nn.Linear(codebook_dim, dim)
        else:
            self.project_in = self.project_out = nn.Identity()
        self.commitment_weight = commitment_weight
        self.has_commitment_loss = commitment_weight > 0.0
        self.rotation_trick = rotation_trick
        self.straight_through = straight_through
        self.route_gradients_to_input = route_gradients_to_input
        self.stochastic_sample_codes = stochastic_sample_codes
        self.use_cosine_sim = use_cosine_sim
        self.freeze_codebook = freeze_codebook
        self.channel_last, self.accept_image_fmap = channel_last, accept_image_fmap
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self._codebook = EuclideanCodebook(
            codebook_dim, codebook_size, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, decay=decay, eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code, use_cosine_sim=use_cosine_sim,
            sync_codebook=is_distributed() if sync_codebook is None else sync_codebook, ema_update=ema_update,
            manual_ema_update=manual_ema_update, sample_codebook_temp=sample_codebook_temp,
            stochastic_sample_topk=stochastic_sample_topk, initial_table=_initial_table,
        )  # fmt: skip
        self.vocab = None  # a VocabCodebook, for layers built by from_pretrained_vocab

    # ---- a frozen LLM vocabulary --------------------------------------------------------------------------

    @classmethod
    def from_pretrained_vocab(
        cls,
        path_or_name: str | os.PathLike = "smollm2",
        token_filter: str | Callable[[str], bool] | Sequence[int] | None = "words",
        *,
        dim: int | None = None,
        project: bool = False,
        vocab=None,
        **kwargs,
    ) -> VectorQuantize:
        """A layer whose codebook is a frozen LLM token-embedding table (`spae_fast.VocabCodebook`).

        ``path_or_name`` / ``token_filter`` go to `VocabCodebook.from_pretrained` (``"smollm2"``: the embedded
        SmolLM2-135M table, 49152 x 576, of which the default ``"words"`` filter keeps 47096 rows); pass an
        already-built ``vocab=`` instead to share one. Index i is row i of the kept table: `indices_to_llm_ids`
        and `indices_to_words` map it to the LLM's token id and text. The codebook is frozen (no EMA, no dead
        codes, no k-means) and shares memory with ``vocab.weight`` (fp32 tables; cosine: a normalised copy).
        ``dim`` defaults to the table's D; a different ``dim`` needs ``project=True`` (learned Linear maps
        dim -> D -> dim around the frozen table). Other keyword arguments as the constructor (e.g.
        ``commitment_weight``, ``rotation_trick``, ``use_cosine_sim``).
        """
        vocab, table, dim = load_vocab_table(path_or_name, token_filter, vocab, dim, project, kwargs)
        layer = cls(dim, table.shape[0], codebook_dim=table.shape[1], freeze_codebook=True, ema_update=False,
                    _initial_table=table, **kwargs)  # fmt: skip
        layer.vocab = vocab
        return layer

    def indices_to_llm_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook indices (any shape; -1 = masked / dropped stays -1) -> the LLM's token ids."""
        return indices_to_llm_ids(self.vocab, indices)

    def indices_to_words(self, indices: torch.Tensor) -> list[str]:
        """Codebook indices (flattened, -1 skipped) -> the tokens' text (leading space as ``" "``)."""
        return indices_to_words(self.vocab, indices)

    # ---- the codebook -------------------------------------------------------------------------------------

    @property
    def ema_update(self) -> bool:
        return self._codebook.ema_update

    @property
    def codebook(self) -> torch.Tensor:
        """The ``[V, codebook_dim]`` table (a view of the buffer); assigning a ``[V, codebook_dim]`` tensor
        copies it in (the packed search copy is rebuilt on the next forward)."""
        return self._codebook.embed[0]

    @codebook.setter
    def codebook(self, codes: torch.Tensor) -> None:
        codes = torch.as_tensor(codes)
        if tuple(codes.shape) != (self.codebook_size, self.codebook_dim):
            raise ValueError(f"codebook must have shape [codebook_size, codebook_dim] = "
                             f"[{self.codebook_size}, {self.codebook_dim}], got {tuple(codes.shape)}")  # fmt: skip
        with torch.no_grad():
            self._codebook.embed.copy_(codes[None])

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (as returned by forward) -> codebook rows; channel-first like the input when the layer
        takes channel-first input."""
        codes = self.codebook[indices]
        return self._channel_first(codes)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices -> what forward would output in eval mode (codes, projected out)."""
        return self._channel_first(self.project_out(self.codebook[indices]))

    def _channel_first(self, t: torch.Tensor) -> torch.Tensor:
        if (not self.channel_last or self.accept_image_fmap) and t.ndim > 2:
            return t.movedim(-1, 1)
        return t

    # ---- forward ------------------------------------------------------------------------------------------

    def quantize_rows(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        input_requires_grad: bool,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool = False,
        ema_update: bool | None = None,
        indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The quantizer proper on ``x [B, N, d]`` (projected, normalised) -> (quantized [B, N, d] in x's dtype,
        indices [B, N] int64, commitment loss []). ``indices`` precomputed by a fused multi-layer search skip
        the search; ``ema_update=False`` skips this step's EMA (dead codes are still replaced)."""
        book = self._codebook
        temperature = book.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        flat = x.detach().float().reshape(-1, x.shape[-1])  # [B N, d]
        flat_mask = None if mask is None else mask.reshape(-1)
        if not bool(book.initted):
            book.init_embed_(flat if flat_mask is None else flat[flat_mask])
        if indices is None:
            if self.training and self.stochastic_sample_codes and temperature > 0:
                indices = book.sample(flat, temperature)
            else:
                indices = book.nearest(flat)
        else:
            indices = indices.reshape(-1)
        table = book.embed[0].detach()
        codes = table[indices].reshape(x.shape).to(x.dtype)  # [B, N, d], gathered before the update
        if self.training and not freeze_codebook:
            if flat_mask is None:
                book.update(flat, indices, ema_update)
            else:
                book.update(flat[flat_mask], indices[flat_mask], ema_update)
        indices = indices.reshape(x.shape[:-1])
        commit = x.new_zeros(())
        quantized = codes
        if self.training:
            if input_requires_grad and self.route_gradients_to_input:
                quantized = rotate_to(x, codes) if self.rotation_trick else straight_through(x, codes)
            if self.has_commitment_loss:
                if mask is None:
                    commit = F.mse_loss(codes, x)
                else:
                    commit = F.mse_loss(codes, x, reduction="none")[mask].mean()
        return quantized, indices, commit

    def forward_sequence(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        input_requires_grad: bool,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool = False,
        ema_update: bool | None = None,
        indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, N, dim]`` -> (quantized [B, N, dim], indices [B, N], loss [], commitment []): projection,
        normalisation, `quantize_rows`, projection out, the weighted loss and the mask (zeros / index -1)."""
        dtype, orig_input = x.dtype, x
        x = self._codebook.transform_input(self.project_in(x))
        quantized, embed_ind, commit = self.quantize_rows(
            x, mask, input_requires_grad=input_requires_grad, sample_codebook_temp=sample_codebook_temp,
            freeze_codebook=freeze_codebook, ema_update=ema_update, indices=indices,
        )  # fmt: skip
        quantized = self.project_out(quantized.to(dtype))
        loss = (
            commit * self.commitment_weight if self.training and self.has_commitment_loss else x.new_zeros(())
        )
        if self.training and not loss.requires_grad:
            loss.requires_grad_()
        if mask is not None:
            fill = torch.zeros_like(orig_input) if self.return_zeros_for_masked_padding else orig_input
            quantized = torch.where(mask[..., None], quantized, fill)
            embed_ind = torch.where(mask, embed_ind, -1)
        return quantized, embed_ind, loss, commit

    def forward(
        self,
        x: torch.Tensor,
        indices: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        lens: torch.Tensor | None = None,
        topk: int | None = None,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        return_loss_breakdown: bool = False,
        codebook_transform_fn: Callable | None = None,
        ema_update_weight: torch.Tensor | None = None,
        accum_ema_update: bool = False,
        ema_update: bool | None = None,
    ):
        """x ``[B, N, D]`` (``[B, D, N]`` with channel_last=False, ``[B, D, H, W]`` with accept_image_fmap,
        ``[B, D]`` for one token) -> ``(quantized like x, indices [B, N] / [B, H, W] / [B], loss [])``, plus a
        `LossBreakdown` with ``return_loss_breakdown``. ``mask [B, N]`` (or ``lens [B]``): masked positions
        are excluded from the loss and the codebook update and return index -1 and zeros."""
        rejected = {"indices (cross-entropy loss to given codes)": indices, "topk": topk,
                    "codebook_transform_fn": codebook_transform_fn, "ema_update_weight": ema_update_weight}  # fmt: skip
        used = [name for name, value in rejected.items() if value is not None]
        if accum_ema_update:
            used.append("accum_ema_update")
        if used:
            raise NotImplementedError(
                f"VectorQuantize.forward: {', '.join(used)} not supported by spae_fast.nn"
            )
        if mask is not None and lens is not None:
            raise ValueError("VectorQuantize.forward: pass mask or lens, not both")
        freeze_codebook = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        input_requires_grad = x.requires_grad
        only_one = x.ndim == 2
        if lens is not None:
            mask = torch.arange(x.shape[1], device=x.device) < lens[:, None]
        if only_one:
            if mask is not None:
                raise ValueError("VectorQuantize.forward: mask needs a sequence input [B, N, D]")
            x = x[:, None, :]
        if self.accept_image_fmap:
            if x.ndim != 4 or mask is not None:
                raise ValueError(f"VectorQuantize.forward: accept_image_fmap takes [B, D, H, W] without mask, "
                                 f"got shape {tuple(x.shape)}")  # fmt: skip
            height, width = x.shape[-2:]
            x = x.flatten(2).transpose(1, 2)
        elif not self.channel_last and not only_one:
            x = x.transpose(1, 2)
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantize.forward: expected input with {self.dim} features per vector "
                             f"(dim), got shape {tuple(x.shape)}")  # fmt: skip
        if mask is not None:
            mask = _check_mask(mask, x.shape[:2])
        quantized, embed_ind, loss, commit = self.forward_sequence(
            x, mask, input_requires_grad=input_requires_grad, sample_codebook_temp=sample_codebook_temp,
            freeze_codebook=freeze_codebook, ema_update=ema_update,
        )  # fmt: skip
        if self.accept_image_fmap:
            quantized = quantized.transpose(1, 2).reshape(quantized.shape[0], -1, height, width)
            embed_ind = embed_ind.reshape(-1, height, width)
        elif not self.channel_last and not only_one:
            quantized = quantized.transpose(1, 2)
        if only_one:
            quantized, embed_ind = quantized[:, 0], embed_ind[:, 0]
        if not return_loss_breakdown:
            return quantized, embed_ind, loss
        zero = x.new_zeros(())
        return quantized, embed_ind, loss, LossBreakdown(commit, zero, zero, zero)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
                f"cosine={self.use_cosine_sim}, rotation_trick={self.rotation_trick}, "
                f"ema_update={self.ema_update}, frozen={self.freeze_codebook}")  # fmt: skip


def _check_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(shape):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor [B, N] = {list(shape)}, got {got}")
    return mask


# ----------------------------------------------------------------------------------------------------------
# Frozen LLM vocabularies (shared by VectorQuantize, ResidualVQ and StreamingAverageVQ)
# ----------------------------------------------------------------------------------------------------------

FIXED_BY_VOCAB = ("freeze_codebook", "ema_update", "kmeans_init", "threshold_ema_dead_code", "codebook_dim",
                  "codebook_size", "shared_codebook")  # fmt: skip


def load_vocab_table(path_or_name, token_filter, vocab, dim, project, kwargs):
    """(vocab, table [V, D] fp32, dim) for a ``from_pretrained_vocab``; checks dim against the table's D."""
    from ..vocab import VocabCodebook

    if vocab is None:
        vocab = VocabCodebook.from_pretrained(path_or_name, token_filter=token_filter)
    table = vocab.weight.detach().float()
    if kwargs.get("use_cosine_sim"):
        table = l2norm(table)
    table_dim = table.shape[1]
    dim = table_dim if dim is None else dim
    if dim != table_dim and not project:
        raise ValueError(f"from_pretrained_vocab: dim={dim} but the vocabulary's embeddings have D = {table_dim}; "
                         "pass project=True to learn a projection dim -> D -> dim, or leave dim=None")  # fmt: skip
    for name in FIXED_BY_VOCAB:
        if name in kwargs:
            raise ValueError(
                f"from_pretrained_vocab: {name} is fixed by the frozen vocabulary; do not pass it"
            )
    return vocab, table, dim


def indices_to_llm_ids(vocab, indices: torch.Tensor) -> torch.Tensor:
    if vocab is None:
        raise ValueError("this layer has no LLM vocabulary; build it with from_pretrained_vocab")
    out = torch.full_like(indices, -1)
    keep = indices >= 0
    out[keep] = vocab.to_llm_ids(indices[keep].cpu()).to(indices.device)
    return out


def indices_to_words(vocab, indices: torch.Tensor) -> list[str]:
    if vocab is None:
        raise ValueError("this layer has no LLM vocabulary; build it with from_pretrained_vocab")
    indices = indices.reshape(-1)
    return vocab.text(indices[indices >= 0].cpu())
