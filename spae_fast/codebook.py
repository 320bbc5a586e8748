"""`Codebook`: a frozen embedding table with everything the kernels need computed once."""

from __future__ import annotations

import torch

from . import _validate

METRICS = ("l2", "ip", "cosine")


class Codebook:
    """A frozen codebook ``[V, D]`` (for SPAE: an LLM's token-embedding table) prepared for fast search.

    Construction packs the table once for the CPU kernel: ``ceil(V / 16)`` panels of ``[D, 16]`` rows,
    pre-scaled for the metric, plus the per-row bias (``||e||^2`` for l2). Every later ``nearest`` /
    ``topk`` call reuses them, so repeated calls pay nothing for the codebook. The panels are fp32, except for
    bf16 / fp16 tables with metric l2 or ip, which are packed in their own dtype (the kernels widen them
    exactly, so every result is bitwise that of fp32 panels; cosine's ``-e / |e|`` is not exact in bf16 / fp16
    and keeps fp32 panels): ``V * D`` elements of the panel dtype next to ``weight``. Passing a plain tensor to
    the ops instead packs it on every call.

    The table is frozen. By default the Codebook holds its own copy of it (``weight``, detached), so later
    edits of the caller's tensor, in place, through ``.data`` or through ``.numpy()``, cannot make the packed
    forms stale: the Codebook keeps searching the table as it was when built (as a FAISS index does). Build a
    new Codebook to search a changed table. An in-place torch op on ``Codebook.weight`` itself is detected
    (torch's version counter; the copy is a normal tensor even when built under ``torch.inference_mode()``)
    and raises instead of searching stale data. Writes into the Codebook's own copy through ``.data`` or
    ``.numpy()`` bypass the counter and are not detected (checking would cost a pass over the table per
    call; see docs/DECISIONS.md): treat ``weight`` as read-only. The one sanctioned way to change a Codebook
    is `repack_`, for the owner of a table trained in place (an EMA codebook): it re-packs the changed table
    into the Codebook's existing buffers, much cheaper than building a new Codebook.

    Args:
        weight: ``[V, D]`` fp32, bf16 or fp16 tensor, V >= 1, D >= 1 (at most `spae_fast.ops.boundary`'s
            MAX_ROWS / MAX_DIM), finite.
        metric: ``"l2"`` (squared Euclidean, the paper's), ``"ip"`` (largest inner product) or ``"cosine"``.
        copy: ``False`` shares the caller's tensor instead of copying it (saves ``V * D`` elements). The
            caller then promises not to modify it: in-place torch ops are still detected, but writes through
            ``.data`` or ``.numpy()`` are not.
        keep_weight: ``False`` keeps only the packed form (CPU tables, metric l2 or ip, whose panels ``-2e`` /
            ``-e`` unpack exactly): the Codebook holds no copy of the table and no reference to the caller's,
            so it costs the panels alone (1x the table's bytes, plus the int8 copy once the pre-filter runs).
            Row lookups (`rows`) then read the packed panels, bitwise the table's rows. ``weight`` becomes an
            exact unpack of the whole table made on each access, and so does every op given this Codebook
            (one transient ``V x D`` tensor per call, O(V D) time next to the search's O(N V D)): use
            `rows` for lookups, and keep the table for workloads of many tiny searches.
    """

    def __init__(
        self, weight: torch.Tensor, metric: str = "l2", *, copy: bool = True, keep_weight: bool = True
    ) -> None:
        _validate.codebook_weight(weight, "weight")
        _validate.metric(metric)
        if not isinstance(copy, bool):
            raise TypeError(f"copy must be a bool, got {type(copy).__name__} {copy!r}")
        if not isinstance(keep_weight, bool):
            raise TypeError(f"keep_weight must be a bool, got {type(keep_weight).__name__} {keep_weight!r}")
        if not keep_weight:
            if weight.device.type != "cpu" or metric not in ("l2", "ip"):
                raise ValueError(
                    "keep_weight=False needs a CPU table and metric 'l2' or 'ip' (their packed panels unpack to "
                    f"the rows exactly; cosine's -e/|e| does not), got a {weight.device.type} table and {metric!r}"
                )
            self._weight = None
            self._shape, self._dtype = tuple(weight.shape), weight.dtype
            self.metric = metric
            self._version = None
            self._owns_copy, self._broken = False, None
            self.cpu_panels, self.cpu_bias, self.cpu_norm_bound = torch.ops.spae_fast.pack_codebook(
                weight.detach(), metric
            )
            self._derived: dict[str, object] = {}
            self._refresh: dict[str, object] = {}
            return
        if (
            copy
        ):  # a normal tensor even under inference_mode, so in-place edits of it bump its version counter
            with torch.inference_mode(False):
                self._weight = weight.detach().clone(memory_format=torch.contiguous_format)
        else:
            self._weight = weight.detach()
        self._shape, self._dtype = tuple(weight.shape), weight.dtype
        self.metric = metric
        self._version = _version_of(self._weight)
        self._owns_copy, self._broken = copy, None
        if self._weight.device.type == "cpu":
            # [num_panels, D, 16] fp32, [num_panels * 16] fp32, [] fp64
            self.cpu_panels, self.cpu_bias, self.cpu_norm_bound = torch.ops.spae_fast.pack_codebook(
                self.weight, metric
            )
        else:
            self.cpu_panels = self.cpu_bias = self.cpu_norm_bound = None
        self._derived: dict[str, object] = {}
        self._refresh: dict[str, object] = {}

    @property
    def weight(self) -> torch.Tensor:
        """The table ``[V, D]``: the Codebook's own copy (or the shared tensor), or with ``keep_weight=False``
        an exact unpack of the packed panels, made on each access."""
        return self._weight if self._weight is not None else self.rows(None)

    @property
    def keeps_weight(self) -> bool:
        """Whether the Codebook holds the table itself (``keep_weight=True``) besides the packed form."""
        return self._weight is not None

    def rows(self, ids: torch.Tensor | None) -> torch.Tensor:
        """Rows ``ids`` (int64 of any shape; None: all) of the table, ``[*ids.shape, D]`` in its dtype: read from
        the table when kept, else unpacked from the panels, bitwise the same (l2 panels hold -2e: halving is
        exact; fp16 l2 panels and ip panels hold -e)."""
        if ids is not None and not (isinstance(ids, torch.Tensor) and ids.dtype == torch.int64):
            raise TypeError(
                f"ids must be an int64 tensor, got {type(ids).__name__} {getattr(ids, 'dtype', '')}"
            )
        if ids is not None and ids.numel() and not bool(((ids >= 0) & (ids < self.num_rows)).all()):
            raise IndexError(f"ids must be in [0, {self.num_rows}) (rows of the codebook)")
        if self._weight is not None:
            return self._weight if ids is None else self._weight[ids]
        flat = torch.arange(self.num_rows) if ids is None else ids.reshape(-1)
        packed = self.cpu_panels[flat // 16, :, flat % 16]  # [n, D] in the panel dtype
        halve = self.metric == "l2" and packed.dtype != torch.float16  # fp16 l2 panels hold -e
        table = (packed * -0.5 if halve else -packed).to(self._dtype)
        return table if ids is None else table.reshape(*ids.shape, self.dim)

    @property
    def num_rows(self) -> int:
        return self._shape[0]

    @property
    def dim(self) -> int:
        return self._shape[1]

    @property
    def device(self) -> torch.device:
        return self.cpu_panels.device if self._weight is None else self._weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def check_unchanged(self) -> None:
        if self._broken is not None:
            raise RuntimeError(
                f"this Codebook's last repack_ failed ({self._broken}); call repack_ with a valid table"
            )
        if self._weight is None:  # only the Codebook's own panels: nothing outside can change them
            return
        if _version_of(self._weight) != self._version:
            raise RuntimeError(
                "Codebook.weight was modified in place after the Codebook was built; the packed copy is "
                "stale. Build a new spae_fast.Codebook from the updated table, or, as the owner of a table "
                "trained in place, call Codebook.repack_() after each update."
            )

    @torch.no_grad()
    def repack_(self, weight: torch.Tensor | None = None) -> Codebook:
        """Re-packs a changed table into this Codebook's existing buffers; returns the Codebook.

        For the owner of a table trained in place (e.g. an EMA codebook, `spae_fast.nn`): after each update
        of the table, one call re-validates it, re-packs the panels and bias into their own storage (no new
        ``V x D`` allocation, so none of the first-touch page faults of a fresh one), re-derives the int8
        pre-filter copy into its storage if one was built (other derived forms are dropped and rebuilt on next
        use) and accepts the table's current version, so the stale-pack check passes again. Every result
        afterwards is bitwise that of a new ``Codebook`` of the table. Everyone else keeps the frozen-table
        contract (docs/DECISIONS.md, "Re-packing a Codebook in place").

        Args:
            weight: None re-packs the table the Codebook holds: with ``copy=False`` the caller's tensor its
                owner updated in place; with ``copy=True`` the Codebook's own copy (``weight``) edited in place.
                Else a table of the same shape, dtype and device: copied into the Codebook's own copy
                (``copy=True``), held instead of the old one (``copy=False``), or only packed
                (``keep_weight=False``, which needs it).

        Raises:
            ValueError: a table of another shape, dtype or device, or a non-finite / overflowing row (as the
                constructor). After a rejected table the Codebook refuses to search until a successful
                `repack_`.
        """
        if weight is None:
            if self._weight is None:
                raise ValueError("repack_ of a keep_weight=False Codebook needs the new table as `weight`")
            table = self._weight
        else:
            _validate.codebook_weight(weight, "weight")
            if (tuple(weight.shape), weight.dtype, weight.device) != (self._shape, self._dtype, self.device):
                raise ValueError(
                    f"weight must have the Codebook's shape {list(self._shape)}, dtype {self._dtype} and device "
                    f"{self.device}, got {list(weight.shape)} {weight.dtype} on {weight.device}"
                )
            table = weight.detach()
            if self._weight is not None and self._owns_copy:
                self._weight.copy_(table)
                table = self._weight
            elif self._weight is not None:
                self._weight = table
        self._broken = "repack_ in progress"
        if self.cpu_panels is not None:
            from .ops import common  # imports this module

            try:
                self.cpu_norm_bound = common.pack_codebook_into(
                    table, self.metric, self.cpu_panels, self.cpu_bias
                )
            except Exception as error:
                self._broken = str(error)
                raise
        derived, self._derived = self._derived, {}
        for key, refresh in self._refresh.items():
            if key in derived:
                self._derived[key] = refresh(self, derived[key])
        self._refresh = {key: self._refresh[key] for key in self._derived}
        self._version = None if self._weight is None else _version_of(self._weight)
        self._broken = None
        return self

    def derived(self, key: str, build, refresh=None):
        """Another prepared form of the table (e.g. the semantic loss's bf16 packing), built by ``build()`` on
        first use and kept; counted by `nbytes_packed`. `repack_` re-derives it with ``refresh(codebook,
        old_form)`` (into the old form's storage) when given, else drops it."""
        if key not in self._derived:
            self._derived[key] = build()
            if refresh is not None:
                self._refresh[key] = refresh
        return self._derived[key]

    def nbytes_packed(self) -> int:
        """Bytes held by the packed CPU copies (0 when the codebook lives on another device): the search's
        fp32 panels, plus any `derived` form built so far (tensors other than the table itself)."""
        if self.cpu_panels is None:
            return 0
        extra = 0
        table = self._weight.data_ptr() if self._weight is not None else None
        for value in self._derived.values():
            for tensor in value if isinstance(value, tuple) else (value,):
                if isinstance(tensor, torch.Tensor) and tensor.data_ptr() != table:
                    extra += tensor.nbytes
        return self.cpu_panels.nbytes + self.cpu_bias.nbytes + extra

    def __repr__(self) -> str:
        return (
            f"Codebook(rows={self.num_rows}, dim={self.dim}, dtype={self.dtype}, metric={self.metric!r}, "
            f"device={self.device}" + ("" if self.keeps_weight else ", keep_weight=False") + ")"
        )


def _version_of(tensor: torch.Tensor) -> int | None:
    """torch's in-place version counter; None for inference tensors, which have none."""
    return None if tensor.is_inference() else tensor._version
