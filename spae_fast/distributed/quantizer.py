"""`VocabParallelQuantizer`: `SPAEQuantizer` on a `ShardedCodebook`, for training with a vocabulary split over
the ranks of a process group (``spae-fast train --vocab-parallel N``).

The forward contract is `SPAEQuantizer`'s (`SPAEQuantizerOutput`: straight-through latents, ids per layer,
commitment loss, per-prefix latent errors), and so are ``quantize``, ``layer_targets``, ``decode`` and
``prefix_latents``; every one of them is a collective over the codebook's group (the layout is
``queries="replicated"``: every rank of the vocabulary group passes the same latents / ids).

- The SAQ search is `spae_fast.distributed.saq` (bitwise `spae_fast.saq`'s ids on the whole table).
- The embeddings of the chosen ids come from `spae_fast.distributed.lookup` (each row sent bit for bit by its
  owner) for the *unique* ids of the batch only, into a small local table ``[U, D]`` in the table's dtype; the
  ids are remapped to rows of that table and `SPAEQuantizer`'s own reconstruction / commitment / target code
  runs on it. Those results depend only on the values of the rows used and their order inside each bag, which
  the remapping keeps, so they are bitwise the single-process quantizer's.
- The semantic loss (`semantic_loss`) is `spae_fast.distributed.semantic_loss` on the sharded table:
  deterministic, within a few fp32 ulps of the single-process op (not bitwise; docs/DECISIONS.md).

No table buffer is registered (the shard lives in the `ShardedCodebook`, outside the ``state_dict``), so
checkpoints of a model with this quantizer are those of the single-process model: they load on any number of
ranks. Only ``metric="l2"`` quantizers are supported.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .. import _validate
from ..quantizer import IdsLike, SPAEQuantizer, SPAEQuantizerOutput
from .saq import saq as _distributed_saq
from .search import lookup
from .semantic_loss import semantic_loss as _distributed_semantic_loss
from .sharded_codebook import ShardedCodebook


class VocabParallelQuantizer(SPAEQuantizer):
    """SPAE's pyramid quantizer whose frozen table is split by rows over ``codebook.group`` (see the module
    docstring). Build it from a single-process quantizer with `from_quantizer`.

    Args:
        codebook: an l2 `ShardedCodebook` (this rank's rows), or a `ShardedVocabCodebook` (its rows and words).
        vocab: the `VocabCodebook` for words (``to_words`` / ``from_words``), or None (default: ``codebook``
            when it is a `ShardedVocabCodebook`).
        metric: ``"l2"`` only (the merge needs the exact l2 score; a cosine quantizer is refused).
        layers, grid, mode, beta, backend, check_finite, prefilter: as `SPAEQuantizer`.
    """

    def __init__(
        self,
        codebook,
        vocab=None,
        layers=None,
        grid: int | None = None,
        mode: str = "saq",
        beta: float = 0.25,
        backend: str = "auto",
        check_finite: bool = True,
        prefilter: str = "auto",
        *,
        metric: str = "l2",
    ) -> None:
        from .vocab_shard import ShardedVocabCodebook

        if isinstance(codebook, ShardedVocabCodebook):
            vocab = codebook if vocab is None else vocab
            codebook = codebook.sharded
        if not isinstance(codebook, ShardedCodebook):
            raise TypeError(
                "codebook must be a spae_fast.distributed.ShardedCodebook or ShardedVocabCodebook, got "
                f"{type(codebook).__name__}"
            )
        if metric != "l2":
            raise ValueError(f"metric must be 'l2' for a vocabulary-parallel quantizer, got {metric!r}")
        if codebook.metric != "l2":
            raise ValueError(f"codebook must be an l2 ShardedCodebook, got metric={codebook.metric!r}")
        # SPAEQuantizer's checks and geometry on a one-row stand-in table (nothing of the real table is packed).
        stand_in = torch.zeros(1, codebook.dim, dtype=codebook.dtype, device=codebook.device)
        kwargs = {} if layers is None else {"layers": layers}
        if grid is not None:
            kwargs["grid"] = grid
        super().__init__(stand_in, mode=mode, metric="l2", beta=beta, backend=backend, check_finite=check_finite,
                         prefilter=prefilter, **kwargs)  # fmt: skip
        del self._buffers["weight"]  # `weight` is the property below: the rows of the current batch
        self.codebook = codebook
        self.sharded = codebook
        self.vocab = vocab
        self._prefilter_operands = None
        self._searched: torch.Tensor | None = None
        self._table = torch.empty(0, codebook.dim, dtype=codebook.dtype, device=codebook.device)

    @classmethod
    def from_quantizer(
        cls,
        quantizer: SPAEQuantizer,
        *,
        group: dist.ProcessGroup | None = None,
        boundaries=None,
    ) -> VocabParallelQuantizer:
        """The same quantizer with its table split over ``group`` (each rank keeps its rows ``boundaries[rank]``,
        default balanced). A collective over ``group``; every rank passes an equal quantizer."""
        if not isinstance(quantizer, SPAEQuantizer) or isinstance(quantizer, VocabParallelQuantizer):
            raise TypeError(f"quantizer must be a single-process SPAEQuantizer, got {type(quantizer).__name__}")
        if quantizer.metric != "l2":
            raise ValueError(
                f"quantizer.metric must be 'l2' for a vocabulary-parallel quantizer, got {quantizer.metric!r}"
            )
        book = ShardedCodebook.from_full(quantizer.weight, group=group, boundaries=boundaries)
        return cls(book, quantizer.vocab, quantizer.layers, quantizer.grid, mode=quantizer.mode, beta=quantizer.beta,
                   backend=quantizer.backend, check_finite=quantizer.check_finite,
                   prefilter=quantizer.prefilter)  # fmt: skip

    # ---- the local table of the rows in use ----------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The rows that the current call uses (`_rows_of`); outside one, an empty ``[0, D]`` table."""
        return self._table

    @property
    def num_rows(self) -> int:
        return self.sharded.num_rows

    @contextlib.contextmanager
    def _rows_of(self, flat: torch.Tensor):
        """Global ids ``[B, n]`` (the same on every rank of the group) -> yields the same ids as rows of a local
        table of their unique rows, which `weight` returns inside the block. A collective (one lookup)."""
        flat = flat.to(self.sharded.device)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_rows):
            raise ValueError(f"ids must be codebook rows in [0, {self.num_rows}), got {int(flat.min())} .. {int(flat.max())}")
        unique, local = torch.unique(flat, sorted=True, return_inverse=True)
        previous = self._table
        self._table = lookup(self.sharded, unique).to(self.sharded.dtype)  # exact: fp32 holds every 16-bit value
        try:
            yield local.reshape(flat.shape), unique
        finally:
            self._table = previous

    # ---- forward -------------------------------------------------------------------------------------------

    def _saq(self, latent: torch.Tensor) -> torch.Tensor:
        if self._searched is not None:  # inside `forward`: the ids already searched, as local rows
            return self._searched
        return _distributed_saq(latent.detach(), self.sharded, self.layers, mode=self.mode, backend=self.backend,
                                check_finite=self.check_finite, prefilter=self.prefilter)  # fmt: skip

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Token ids (global rows) ``[B, total]``: `SPAEQuantizer.quantize`, a collective over the group."""
        z = _validate.latent(z, self.sharded.dim, self.sharded.device, self.grid)
        return self._saq(z)

    def forward(self, z: torch.Tensor) -> SPAEQuantizerOutput:
        """`SPAEQuantizer.forward` (bitwise: ids, quantized, loss, layer errors); a collective over the group."""
        z = _validate.latent(z, self.sharded.dim, self.sharded.device, self.grid)
        flat = self._saq(z)
        with self._rows_of(flat) as (local, unique):
            self._searched = local  # the parent's forward runs on the local rows; its `_saq` returns these ids
            try:
                out = super().forward(z)
            finally:
                self._searched = None
        return out._replace(ids=[unique[layer] for layer in out.ids])

    def layer_targets(self, z: torch.Tensor, ids: IdsLike, num_layers: int) -> torch.Tensor:
        """`SPAEQuantizer.layer_targets` (bitwise); a collective over the group."""
        num_layers = self.pyramid.check_num_layers(num_layers)
        with self._rows_of(self.flatten_ids(ids, num_layers)) as (local, _):
            return super().layer_targets(z, local, num_layers)

    def decode(self, ids: IdsLike, num_layers: int | None = None) -> torch.Tensor:
        """`SPAEQuantizer.decode` (bitwise); a collective over the group."""
        with self._rows_of(self.flatten_ids(ids, num_layers)) as (local, _):
            return super().decode(local)

    def prefix_latents(self, ids: IdsLike, num_layers: torch.Tensor) -> torch.Tensor:
        """`SPAEQuantizer.prefix_latents` (bitwise); a collective over the group."""
        with self._rows_of(self.flatten_ids(ids)) as (local, _):
            return super().prefix_latents(local, num_layers)

    def semantic_loss(self, targets, candidate_index, candidate_offsets, set_of_position=None, *, tau=1.0,
                      precision="default", reduction="mean"):  # fmt: skip
        """`spae_fast.distributed.semantic_loss` of ``targets`` on the sharded table (replicated positions)."""
        return _distributed_semantic_loss(targets, self.sharded, candidate_index, candidate_offsets, set_of_position,
                                          tau=tau, precision=precision, reduction=reduction)  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"layers={self.layers}, grid={self.grid}, mode={self.mode!r}, beta={self.beta}, backend={self.backend!r}, "
            f"codebook={self.sharded}"
        )


__all__ = ["VocabParallelQuantizer"]
