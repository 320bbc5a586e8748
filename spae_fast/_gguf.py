"""GGUF files (v2 / v3), read by streaming: the one GGUF parser of spae_fast, used by the vocabulary tables
(`spae_fast.embedding_tables`, `spae_fast.distributed.vocab_shard`) and the pre-flight check of a GGUF model
(`spae_fast.llm.loading`).

Layout (little-endian): b"GGUF", u32 version, u64 tensor count, u64 metadata count; metadata entries
(string key, u32 value type, value; a string is u64 length + utf-8 bytes, an array u32 item type + u64 count +
items); tensor infos (string name, u32 n_dims, u64 dims (innermost first), u32 ggml type, u64 offset); the
tensor data from the next multiple of ``general.alignment`` (default 32), each tensor at its offset.

Why not ``gguf.GGUFReader``: it builds a numpy view per metadata array element (about 250k for SmolLM2's
tokens, token types and merges: over 100 MiB of peak memory, more than a 4-rank shard of its table) and maps
the whole file. Here the header is walked with the format's fixed layout, keeping only the fields asked for,
and a tensor's rows come from positioned reads. The ``gguf`` package still provides the quantisation types and
``gguf.quants.dequantize``. Every structural problem raises `CorruptFileError` naming the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from pathlib import Path

import numpy as np

from ._integrity import CorruptFileError

EMBEDDING = "token_embd.weight"
TOKENS = "tokenizer.ggml.tokens"
MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9


def gguf_package():
    try:
        import gguf
    except ImportError as error:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from error
    return gguf


def unreadable(path, detail: str) -> CorruptFileError:
    return CorruptFileError(f"{path} is not a readable GGUF file (truncated or corrupted?): {detail}")


def read_exactly(path, offset: int, buffer: bytearray, what: str) -> None:
    """Fills `buffer` from byte `offset` of `path`: positioned reads until full (one read() returns at most
    ~2 GiB on Linux), `CorruptFileError` if the file ends first."""
    view, filled = memoryview(buffer), 0
    with open(path, "rb", buffering=0) as file:
        file.seek(offset)
        while filled < len(buffer):
            read = file.readinto(view[filled:])
            if not read:
                raise CorruptFileError(f"{path}: {what} runs past the end of the file (truncated?)")
            filled += read


def check_magic(path) -> None:
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise CorruptFileError(f"{path} is not a GGUF file: it starts with {magic!r}, expected b'GGUF'")


class GGUFHeader:
    """A GGUF file's header: `fields` (the metadata values whose keys are in `keep`, plus the alignment),
    `tensors` (name -> (dims, ggml type, offset from `data_start`)), `data_start`. Values not kept are skipped
    by seeking, so memory stays that of the kept fields."""

    def __init__(self, path: str | os.PathLike, keep: tuple[str, ...] = ()) -> None:
        self.path = Path(path)
        check_magic(self.path)
        try:
            with open(self.path, "rb") as self._file:
                self._file.seek(4)
                self._read_all(set(keep))
        except CorruptFileError:
            raise
        except (ValueError, OverflowError, MemoryError, struct.error) as error:
            raise unreadable(self.path, f"{type(error).__name__}: {error}") from None
        finally:
            self._file = None

    def _read_all(self, keep: set[str]) -> None:
        version, tensor_count, kv_count = self._unpack("<IQQ")
        if version not in (2, 3):
            byte_swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            hint = " (a big-endian GGUF file; only little-endian ones are read)" if byte_swapped in (2, 3) else ""
            raise CorruptFileError(f"{self.path}: GGUF version {version} is not supported (2 or 3){hint}")
        self.fields: dict[str, object] = {}
        alignment, seen = 32, set()
        for _ in range(kv_count):
            key = self._string()
            if key in seen:
                raise unreadable(self.path, f"duplicate metadata key {key!r}")
            seen.add(key)
            kind = self._unpack("<I")[0]
            if key == "general.alignment":
                alignment = self._value(kind, keep=True)
                if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1:
                    raise unreadable(self.path, f"general.alignment = {alignment}")
                self.fields[key] = alignment
            elif key in keep:
                self.fields[key] = self._value(kind, keep=True)
            else:
                self._value(kind, keep=False)
        self.tensors: dict[str, tuple[tuple[int, ...], int, int]] = {}
        for _ in range(tensor_count):
            name = self._string()
            ndim = self._unpack("<I")[0]
            if not 1 <= ndim <= MAX_DIMS:
                raise unreadable(self.path, f"tensor {name!r} has {ndim} dimensions (ggml allows 1..{MAX_DIMS})")
            dims = self._unpack("<" + "Q" * ndim)
            kind, offset = self._unpack("<IQ")
            if name in self.tensors:
                raise unreadable(self.path, f"duplicate tensor {name!r}")
            self.tensors[name] = (dims, kind, offset)
        self.data_start = -(-self._file.tell() // alignment) * alignment

    def _unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        raw = self._file.read(size)
        if len(raw) != size:
            raise unreadable(self.path, "the header ends early")
        return struct.unpack(fmt, raw)

    def _string(self, keep: bool = True) -> str | None:
        length = self._unpack("<Q")[0]
        if not keep:
            self._file.seek(length, os.SEEK_CUR)
            return None
        raw = self._file.read(length)
        if len(raw) != length:
            raise unreadable(self.path, "the header ends early")
        return raw.decode("utf-8", errors="replace")

    def _value(self, kind: int, keep: bool):
        if kind == _STRING:
            return self._string(keep)
        if kind == _ARRAY:
            item, count = self._unpack("<IQ")
            if item in _SCALARS and not keep:
                self._file.seek(count * struct.calcsize(_SCALARS[item]), os.SEEK_CUR)
                return None
            return [self._value(item, keep) for _ in range(count)]
        if kind not in _SCALARS:
            raise unreadable(self.path, f"unknown GGUF value type {kind}")
        return self._unpack(_SCALARS[kind])[0]

    def tensor_bytes(self, name: str) -> tuple[int, int]:
        """(file offset, byte size) of tensor `name`, checked to lie inside the file."""
        gguf = gguf_package()
        dims, kind, offset = self.tensors[name]
        try:
            quant = gguf.GGMLQuantizationType(kind)
        except ValueError:
            raise unreadable(self.path, f"tensor {name!r} has an unknown ggml type {kind}") from None
        block, block_bytes = gguf.GGML_QUANT_SIZES[quant]
        count = math.prod(dims)
        if dims and dims[0] % block:
            raise unreadable(
                self.path, f"tensor {name!r} of shape {list(dims)} is not whole {quant.name} blocks"
            )
        start, size = self.data_start + offset, count // block * block_bytes
        if start + size > self.path.stat().st_size:
            raise unreadable(self.path, f"tensor {name!r} runs past the end of the file")
        return start, size


def check_file(path: str | os.PathLike, keep: tuple[str, ...] = ()) -> GGUFHeader:
    """The header (`GGUFHeader`), its metadata and tensor table parsed and every tensor checked to lie inside
    the file: a file truncated anywhere is refused, not only in the tensors read."""
    header = GGUFHeader(path, keep)
    for name in header.tensors:
        header.tensor_bytes(name)
    return header


@dataclasses.dataclass(frozen=True)
class GGUFTable:
    """Where the ``[V, D]`` rows of a GGUF tensor lie in the file and how they are stored."""

    offset: int  # file offset of row 0
    row_bytes: int
    num_rows: int
    dim: int
    quant: object  # gguf.GGMLQuantizationType
    stored: object  # the numpy dtype of unquantised rows (F32 / F16), None when quantised

    def decode(self, raw, count: int) -> np.ndarray:
        """The bytes of `count` whole rows -> fp32 ``[count, D]`` (``gguf.quants.dequantize`` of whole rows)."""
        from gguf import quants

        if count == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        data = np.frombuffer(raw, dtype=np.uint8 if self.stored is None else self.stored).reshape(count, -1)
        rows = data if self.stored is not None else quants.dequantize(data, self.quant)
        return np.ascontiguousarray(rows, dtype=np.float32).reshape(count, self.dim)


def embedding_table(path: str | os.PathLike) -> tuple[GGUFTable, list[str]]:
    """The token-embedding table (``token_embd.weight``) and the token strings of a GGUF model file (checked
    whole, `check_file`)."""
    gguf = gguf_package()
    header = check_file(path, keep=(TOKENS,))
    tokens = header.fields.get(TOKENS)
    if EMBEDDING not in header.tensors or not isinstance(tokens, list):
        raise CorruptFileError(f"{path} has no {EMBEDDING} tensor or no {TOKENS} field")
    offset, _ = header.tensor_bytes(EMBEDDING)
    dims, kind, _ = header.tensors[EMBEDDING]
    quant = gguf.GGMLQuantizationType(kind)
    if len(dims) != 2 or len(tokens) != dims[1]:
        raise CorruptFileError(
            f"{path}: {len(tokens)} tokens but an embedding table of shape {list(dims[::-1])} ({quant.name})"
        )
    dim, num_rows = dims
    block, block_bytes = gguf.GGML_QUANT_SIZES[quant]
    stored = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(quant)
    return GGUFTable(offset, dim // block * block_bytes, num_rows, dim, quant, stored), tokens
