"""`ShardedCodebook`: a frozen codebook ``[V, D]`` split by rows over the ranks of a process group.

Rank r of the group holds the rows ``[start_r, stop_r)`` of the table, packed once as an ordinary
`spae_fast.Codebook` (its ``local`` codebook). The shards must tile the table: sorted by ``start`` they begin
at 0, each begins where the previous one stops, the last stops at V, and none is empty; they agree on D, the
dtype, the device type and the metric. Construction is a collective over the group (every rank calls it with
its own shard); it all-gathers each rank's description and raises the same error on every rank when the
shards do not tile the table, overlap, leave a gap, or disagree - so no rank is left waiting in a later
collective. Global row ``j`` lives on the rank whose range contains it; results of the ops in
`spae_fast.distributed` are always global row indices.

The default split is balanced (`balanced_boundaries`): rank r of P holds ``[r V // P, (r + 1) V // P)``, so
shard sizes differ by at most one row (Megatron-LM pads the vocabulary to a multiple of P instead; a frozen
LLM table cannot be padded without changing the search). Any other tiling can be passed as ``boundaries``
(one ``(start, stop)`` per rank of the group, in group-rank order); shards need not be in rank order.

Build it

- from the whole table on every rank: `ShardedCodebook.from_full` (each rank keeps only its rows);
- from a file, shard by shard: `ShardedCodebook.from_file` reads only the header and this rank's rows of a
  safetensors file (or of the input-embedding tensor of a Hugging Face model folder), so no rank ever holds
  the whole table;
- from a shard the caller already has: ``ShardedCodebook(shard, start, num_rows=V)``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from .. import _validate
from ..codebook import Codebook

SUPPORTED_METRICS = ("l2", "ip")  # cosine: see `ShardedCodebook` (normalise the table, then use "ip")


def balanced_boundaries(num_rows: int, world_size: int) -> list[tuple[int, int]]:
    """The default split of ``num_rows`` rows over ``world_size`` ranks: rank r holds
    ``[r * V // P, (r + 1) * V // P)`` (sizes differ by at most one; every shard non-empty when V >= P)."""
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 1:
        raise ValueError(f"num_rows must be a positive int, got {num_rows!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if num_rows < world_size:
        raise ValueError(
            f"cannot split a table of V = {num_rows} rows over {world_size} ranks: every rank needs at least one row"
        )
    return [(r * num_rows // world_size, (r + 1) * num_rows // world_size) for r in range(world_size)]


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "spae_fast.distributed needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group(backend='gloo' on CPU, 'nccl' on GPU))"
        )
    return dist.get_rank(group), dist.get_world_size(group)


@dataclasses.dataclass(frozen=True)
class _ShardInfo:
    """What every rank tells the others about its shard (all-gathered at construction)."""

    start: int
    stop: int
    dim: int
    dtype: str
    device_type: str
    metric: str
    num_rows: int | None  # the caller's V, if given
    max_norm: float  # max_j ||e_j|| of the shard (fp64), for the overflow checks of the search
    error: str | None  # a local failure (bad tensor, non-finite row, ...), raised on every rank


def _check_tiling(infos: Sequence[_ShardInfo]) -> tuple[int, int, str]:
    """(V, D, dtype) of shards that tile a table exactly, else ValueError naming what is wrong."""
    for rank, info in enumerate(infos):
        if info.error is not None:
            raise ValueError(f"ShardedCodebook: rank {rank} could not build its shard: {info.error}")
    dims = sorted({info.dim for info in infos})
    if len(dims) > 1:
        per_rank = ", ".join(f"rank {r}: D = {info.dim}" for r, info in enumerate(infos))
        raise ValueError(f"ShardedCodebook: the shards disagree on the row dimension D ({per_rank})")
    dtypes = sorted({info.dtype for info in infos})
    if len(dtypes) > 1:
        per_rank = ", ".join(f"rank {r}: {info.dtype}" for r, info in enumerate(infos))
        raise ValueError(f"ShardedCodebook: the shards disagree on the dtype ({per_rank}); convert them to one dtype")
    for name in ("device_type", "metric"):
        values = {getattr(info, name) for info in infos}
        if len(values) > 1:
            per_rank = ", ".join(f"rank {r}: {getattr(info, name)!r}" for r, info in enumerate(infos))
            raise ValueError(f"ShardedCodebook: the shards disagree on the {name.replace('_', ' ')} ({per_rank})")
    expected = {info.num_rows for info in infos if info.num_rows is not None}
    if len(expected) > 1:
        raise ValueError(f"ShardedCodebook: the ranks were given different num_rows: {sorted(expected)}")
    order = sorted(range(len(infos)), key=lambda r: (infos[r].start, infos[r].stop))
    position = 0
    for rank in order:
        start, stop = infos[rank].start, infos[rank].stop
        if start > position:
            raise ValueError(
                f"ShardedCodebook: the shards do not cover the table: rows [{position}, {start}) belong to no rank "
                f"(rank {rank} starts at {start}); shards: {_describe(infos)}"
            )
        if start < position:
            other = next(r for r in order if infos[r].start <= start < infos[r].stop and r != rank)
            raise ValueError(
                f"ShardedCodebook: the shards overlap: rank {rank} holds [{start}, {stop}) and rank {other} holds "
                f"[{infos[other].start}, {infos[other].stop}); shards: {_describe(infos)}"
            )
        position = stop
    num_rows = position
    if expected and num_rows != next(iter(expected)):
        wanted = next(iter(expected))
        what = "do not cover" if num_rows < wanted else "go beyond"
        raise ValueError(
            f"ShardedCodebook: the shards {what} the table of num_rows = {wanted}: together they hold rows "
            f"[0, {num_rows}); shards: {_describe(infos)}"
        )
    return num_rows, dims[0], dtypes[0]


def _describe(infos: Sequence[_ShardInfo]) -> str:
    return ", ".join(f"rank {r}: [{info.start}, {info.stop})" for r, info in enumerate(infos))


class ShardedCodebook:
    """Rows ``[start, stop)`` of a frozen ``[V, D]`` table on each rank of ``group`` (see the module docstring).

    Args:
        shard: ``[stop - start, D]`` fp32 / bf16 / fp16 rows of this rank (at least one row, finite).
        start: global index of the shard's first row.
        num_rows: the table's V; optional (checked against the union of the shards when given).
        group: the process group over which the vocabulary is split (default: the world).
        metric: ``"l2"`` (default; SPAE's) or ``"ip"``. ``"cosine"`` is not offered: its selection score
            and its reported distance round differently, and the distributed merge needs the exact score
            (normalise the table and the queries and use ``"ip"``).
        copy: as `spae_fast.Codebook` (False shares ``shard``).

    Attributes: ``local`` (the `Codebook` of this rank's rows), ``start``, ``stop``, ``num_rows`` (V), ``dim``,
    ``dtype``, ``metric``, ``group``, ``rank``, ``world_size``, ``boundaries`` (the ``(start, stop)`` of every
    group rank) and ``max_norm`` (max_j ||e_j|| over the whole table, fp64).
    """

    def __init__(
        self,
        shard: torch.Tensor,
        start: int,
        num_rows: int | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        metric: str = "l2",
        copy: bool = True,
    ) -> None:
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        error, local, info = None, None, None
        try:  # a local failure must reach every rank, or the others would wait in the next collective
            if metric not in SUPPORTED_METRICS:
                raise ValueError(
                    f"metric must be one of {SUPPORTED_METRICS} for a ShardedCodebook, got {metric!r} (for cosine: "
                    "normalise the table's rows and the queries and use metric='ip')"
                )
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise ValueError(f"start must be an int >= 0 (the global index of the shard's first row), got {start!r}")
            if num_rows is not None and (isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 1):
                raise ValueError(f"num_rows must be a positive int or None, got {num_rows!r}")
            _validate.codebook_weight(shard, "shard")
            local = Codebook(shard, metric, copy=copy)
            norm_bound = local.cpu_norm_bound
            if norm_bound is None:  # a GPU shard: no CPU packing
                norm_bound = torch.linalg.vector_norm(shard.detach().double(), dim=-1).max()
            info = _ShardInfo(start, start + shard.shape[0], shard.shape[1], str(shard.dtype).removeprefix("torch."),
                              shard.device.type, metric, num_rows, float(norm_bound), None)  # fmt: skip
        except (TypeError, ValueError, RuntimeError) as failure:
            error = f"{type(failure).__name__}: {failure}"
            info = _ShardInfo(-1, -1, -1, "?", "?", str(metric), None, 0.0, error)
        infos: list[_ShardInfo | None] = [None] * self.world_size
        dist.all_gather_object(infos, info, group=group)
        self.num_rows, self.dim, dtype_name = _check_tiling(infos)  # type: ignore[arg-type]
        assert local is not None  # _check_tiling raised if any rank failed
        self.local = local
        self.start, self.stop = info.start, info.stop
        self.metric = metric
        self.dtype = getattr(torch, dtype_name)
        self.boundaries = tuple((i.start, i.stop) for i in infos)  # type: ignore[union-attr]
        self.max_norm = max(i.max_norm for i in infos)  # type: ignore[union-attr]

    # ------------------------------------------------------------------------------------------------------
    # Builders
    # ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_full(
        cls,
        table: torch.Tensor,
        *,
        group: dist.ProcessGroup | None = None,
        metric: str = "l2",
        boundaries: Sequence[tuple[int, int]] | None = None,
    ) -> ShardedCodebook:
        """Every rank passes the whole ``[V, D]`` table (e.g. one it already has); each keeps a copy of its rows
        ``boundaries[rank]`` (default `balanced_boundaries`)."""
        table = _validate.codebook_weight(table, "table")
        rank, world_size = group_rank_and_size(group)
        start, stop = _own_range(boundaries, table.shape[0], rank, world_size)
        return cls(table.detach()[start:stop].clone(), start, table.shape[0], group=group, metric=metric, copy=False)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        tensor: str | None = None,
        group: dist.ProcessGroup | None = None,
        metric: str = "l2",
        boundaries: Sequence[tuple[int, int]] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> ShardedCodebook:
        """Reads only this rank's rows of a table stored in a safetensors file.

        ``path`` is a ``.safetensors`` file (``tensor`` names the ``[V, D]`` tensor; default: its input-embedding
        tensor, `spae_fast.embedding_tables.pick_embedding_key`) or a Hugging Face model folder (its input
        embedding, found through ``model.safetensors.index.json`` when sharded). Each rank reads the header
        (shape and dtype: no tensor data), computes its rows ``boundaries[rank]`` (default balanced) and reads
        those rows only (safetensors slice of the memory-mapped file). ``dtype``: convert the shard (default:
        keep the file's dtype when fp32 / bf16 / fp16, else fp32).
        """
        rank, world_size = group_rank_and_size(group)
        error, shard, start, num_rows = None, None, 0, None
        try:
            file, key = _locate_table(Path(path), tensor)
            shape = _table_shape(file, key)
            num_rows = shape[0]
            start, stop = _own_range(boundaries, num_rows, rank, world_size)
            shard = _read_rows(file, key, start, stop)
            if dtype is not None:
                shard = shard.to(dtype)
            elif shard.dtype not in _validate.SUPPORTED_DTYPES:
                shard = shard.float()
            shard = shard.to(device)
        except (OSError, TypeError, ValueError, RuntimeError) as failure:
            error = f"{type(failure).__name__}: {failure}"
        if error is not None:  # joins the constructor's collective, so every rank raises it
            cls._raise_everywhere(error, group, metric)
        return cls(shard, start, num_rows, group=group, metric=metric, copy=False)

    @staticmethod
    def _raise_everywhere(error: str, group, metric) -> None:
        """Joins the collective of the constructor with a failure, so every rank raises it."""
        infos: list[_ShardInfo | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(infos, _ShardInfo(-1, -1, -1, "?", "?", metric, None, 0.0, error), group=group)
        _check_tiling(infos)  # type: ignore[arg-type]
        raise AssertionError("unreachable: _check_tiling raises for a failed rank")

    # ------------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def shard_rows(self) -> int:
        return self.stop - self.start

    def owner_of(self, index: torch.Tensor) -> torch.Tensor:
        """Group rank that holds each global row of ``index`` (int64, same shape)."""
        starts = torch.tensor([b[0] for b in self.boundaries], device=index.device)
        order = torch.argsort(starts)
        position = torch.searchsorted(starts[order], index, right=True) - 1
        return order[position.clamp_min(0)]

    def __repr__(self) -> str:
        return (
            f"ShardedCodebook(rows [{self.start}, {self.stop}) of V={self.num_rows}, dim={self.dim}, "
            f"dtype={self.dtype}, metric={self.metric!r}, rank {self.rank} of {self.world_size}, device={self.device})"
        )


def _own_range(boundaries, num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    if boundaries is None:
        return balanced_boundaries(num_rows, world_size)[rank]
    boundaries = [tuple(b) for b in boundaries]
    if len(boundaries) != world_size:
        raise ValueError(f"boundaries must hold one (start, stop) per rank of the group ({world_size}), got {len(boundaries)}")
    start, stop = boundaries[rank]
    if not (isinstance(start, int) and isinstance(stop, int)) or not 0 <= start < stop <= num_rows:
        raise ValueError(
            f"boundaries[{rank}] = ({start!r}, {stop!r}) must satisfy 0 <= start < stop <= V = {num_rows} (ints)"
        )
    return start, stop


def _locate_table(path: Path, tensor: str | None) -> tuple[Path, str]:
    from ..embedding_tables import _locate_embedding  # the same file / tensor VocabCodebook reads

    if not path.exists():
        raise FileNotFoundError(f"path {path} does not exist")
    if tensor is not None:
        if not path.is_file():
            raise ValueError(f"tensor={tensor!r} needs path to be one .safetensors file, got the folder {path}")
        return path, tensor
    file, key = _locate_embedding(path)
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: ShardedCodebook.from_file reads safetensors files only (got {file.name})")
    return file, key


def _table_shape(file: Path, key: str) -> tuple[int, int]:
    from .._integrity import read_safetensors_header  # checked header: no tensor data is read

    header = read_safetensors_header(file)
    if key not in header.tensors:
        raise ValueError(f"{file} has no tensor {key!r} (it holds {sorted(header.tensors)[:8]} ...)")
    shape = header.tensors[key].shape
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{file}: tensor {key!r} must be a [V, D] table, got shape {list(shape)}")
    return int(shape[0]), int(shape[1])


def _read_rows(file: Path, key: str, start: int, stop: int) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:  # memory-mapped; the slice reads these rows only
        return handle.get_slice(key)[start:stop].contiguous()
