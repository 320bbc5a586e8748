"""`Codebook`: a frozen embedding table with everything the kernels need computed once."""

from __future__ import annotations

import torch

from . import _validate

METRICS = ("l2", "ip", "cosine")


class Codebook:
    """A frozen codebook ``[V, D]`` (for SPAE: an LLM's token-embedding table) prepared for fast search.

    Construction packs the table once for the CPU kernel: ``ceil(V / 16)`` panels of ``[D, 16]`` fp32 rows,
    pre-scaled for the metric, plus the per-row bias (``||e||^2`` for l2). Every later ``nearest`` /
    ``topk`` call reuses them, so repeated calls pay nothing for the codebook. The packed copy takes
    ``V * D * 4`` bytes next to ``weight``; passing a plain tensor to the ops instead packs it on every call.

    The table is frozen. By default the Codebook holds its own copy of it (``weight``, detached), so later
    edits of the caller's tensor, in place, through ``.data`` or through ``.numpy()``, cannot make the packed
    forms stale: the Codebook keeps searching the table as it was when built (as a FAISS index does). Build a
    new Codebook to search a changed table. An in-place torch op on ``Codebook.weight`` itself is detected
    (torch's version counter; the copy is a normal tensor even when built under ``torch.inference_mode()``)
    and raises instead of searching stale data. Writes into the Codebook's own copy through ``.data`` or
    ``.numpy()`` bypass the counter and are not detected (checking would cost a pass over the table per
    call; see docs/DECISIONS.md): treat ``weight`` as read-only.

    Args:
        weight: ``[V, D]`` fp32, bf16 or fp16 tensor, V >= 1, D >= 1 (at most `spae_fast.ops.boundary`'s
            MAX_ROWS / MAX_DIM), finite.
        metric: ``"l2"`` (squared Euclidean, the paper's), ``"ip"`` (largest inner product) or ``"cosine"``.
        copy: ``False`` shares the caller's tensor instead of copying it (saves ``V * D`` elements). The
            caller then promises not to modify it: in-place torch ops are still detected, but writes through
            ``.data`` or ``.numpy()`` are not.
    """

    def __init__(self, weight: torch.Tensor, metric: str = "l2", *, copy: bool = True) -> None:
        _validate.codebook_weight(weight, "weight")
        _validate.metric(metric)
        if not isinstance(copy, bool):
            raise TypeError(f"copy must be a bool, got {type(copy).__name__} {copy!r}")
        if copy:  # a normal tensor even under inference_mode, so in-place edits of it bump its version counter
            with torch.inference_mode(False):
                self.weight = weight.detach().clone(memory_format=torch.contiguous_format)
        else:
            self.weight = weight.detach()
        self.metric = metric
        self._version = _version_of(self.weight)
        if self.weight.device.type == "cpu":
            # [num_panels, D, 16] fp32, [num_panels * 16] fp32, [] fp64
            self.cpu_panels, self.cpu_bias, self.cpu_norm_bound = torch.ops.spae_fast.pack_codebook(
                self.weight, metric
            )
        else:
            self.cpu_panels = self.cpu_bias = self.cpu_norm_bound = None
        self._derived: dict[str, object] = {}

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def check_unchanged(self) -> None:
        if _version_of(self.weight) != self._version:
            raise RuntimeError(
                "Codebook.weight was modified in place after the Codebook was built; the packed copy is "
                "stale. Build a new spae_fast.Codebook from the updated table."
            )

    def derived(self, key: str, build):
        """Another prepared form of the table (e.g. the semantic loss's bf16 packing), built by ``build()`` on
        first use and kept; counted by `nbytes_packed`."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def nbytes_packed(self) -> int:
        """Bytes held by the packed CPU copies (0 when the codebook lives on another device): the search's
        fp32 panels, plus any `derived` form built so far (tensors other than the table itself)."""
        if self.cpu_panels is None:
            return 0
        extra = 0
        for value in self._derived.values():
            for tensor in value if isinstance(value, tuple) else (value,):
                if isinstance(tensor, torch.Tensor) and tensor.data_ptr() != self.weight.data_ptr():
                    extra += tensor.nbytes
        return self.cpu_panels.nbytes + self.cpu_bias.nbytes + extra

    def __repr__(self) -> str:
        return (
            f"Codebook(rows={self.num_rows}, dim={self.dim}, dtype={self.dtype}, metric={self.metric!r}, "
            f"device={self.device})"
        )


def _version_of(tensor: torch.Tensor) -> int | None:
    """torch's in-place version counter; None for inference tensors, which have none."""
    return None if tensor.is_inference() else tensor._version
