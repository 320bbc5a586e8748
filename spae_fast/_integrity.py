"""Reading files that may be truncated, corrupted or tampered with, with errors that name the file, and the
self-checking cache files.

- `read_json`: UTF-8 JSON, or a `CorruptFileError` naming the file, the byte / line and what was expected.
- `read_safetensors_header`: the header of a ``.safetensors`` file, checked against the file before any tensor
  is read: 8-byte little-endian header length, UTF-8 JSON, every tensor's dtype, shape and byte range inside the
  data section, ranges that tile the data section exactly (what the format promises). `load_safetensors` reads
  the tensors after that check.
- `tensors_sha256`: a digest of a set of named tensors independent of the file layout (sorted names; each
  name, dtype, shape and raw bytes).
- Cache files (`write_tensor_cache` / `read_tensor_cache`): one safetensors file whose metadata records the
  `tensors_sha256` of its tensors. A read recomputes it; a file that does not match (or cannot be read) is
  reported with a warning and treated as absent, so the caller rebuilds it from its source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ._atomic import atomic_write_bytes

# safetensors dtype -> bytes per element
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
MAX_SAFETENSORS_HEADER = 100_000_000  # the limit of the safetensors library itself
CACHE_DIGEST_KEY = "spae_fast_sha256"


class CorruptFileError(ValueError):
    """A file that exists but is not what it should be (truncated, corrupted, another format, tampered)."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def read_json(path: str | os.PathLike, what: str = "the file", *, max_bytes: int = 64 << 20) -> Any:
    """``path`` parsed as UTF-8 JSON. FileNotFoundError when missing; `CorruptFileError` (a ValueError) naming
    the file and ``what`` it should hold when it is too large, not UTF-8 or not JSON."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise CorruptFileError(f"{path}: {what} is {size} bytes, more than the {max_bytes} expected")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorruptFileError(
            f"{path}: {what} must be UTF-8 JSON, but byte {error.start} (0x{data[error.start]:02x}) is not UTF-8 "
            "(corrupted or not a JSON file)"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CorruptFileError(
            f"{path}: {what} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        ) from None


# ---- safetensors ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte range in the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    file_size: int

    def total_elements(self) -> int:
        return sum(entry.numel for entry in self.tensors.values())


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """The checked header of a safetensors file (see the module docstring); `CorruptFileError` naming the file
    and what was expected otherwise. Reads only the header, never the tensors."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CorruptFileError(
                f"{path}: a safetensors file starts with an 8-byte header length; the file has {size} bytes"
            )
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise CorruptFileError(
                f"{path}: the safetensors header claims {length} bytes but the file has {size} (truncated, or not a "
                "safetensors file)"
            )
        raw = file.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(
            f"{path}: the safetensors header is not UTF-8 JSON ({error}); corrupted?"
        ) from None
    if not isinstance(header, dict):
        raise CorruptFileError(
            f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}"
        )
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptFileError(f"{path}: the safetensors __metadata__ must map strings to strings")
    data_size = size - 8 - length
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            valid = (
                dtype in SAFETENSORS_DTYPES
                and isinstance(shape, list)
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
                and all(isinstance(o, int) and not isinstance(o, bool) for o in (begin, end))
            )
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise CorruptFileError(f"{path}: tensor {name!r} has a malformed header entry {str(info)[:200]}")
        entry = TensorEntry(dtype, tuple(shape), begin, end)
        if not 0 <= begin <= end <= data_size or end - begin != entry.numel * SAFETENSORS_DTYPES[dtype]:
            raise CorruptFileError(
                f"{path}: tensor {name!r} ({dtype} {list(shape)}) needs bytes [{begin}, {end}) of a {data_size}-byte "
                "data section, which it does not fit (truncated or corrupted)"
            )
        tensors[name] = entry
    covered = 0
    for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != covered:
            break
        covered = entry.end
    if covered != data_size:
        raise CorruptFileError(
            f"{path}: the tensors cover {covered} of the {data_size} data bytes (overlapping or missing ranges, or "
            "bytes appended or cut off)"
        )
    return SafetensorsHeader(tensors, metadata, size)


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, after `read_safetensors_header` checked the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_safetensors_header(path)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as error:
        raise CorruptFileError(f"{path}: cannot read the safetensors tensors: {error}") from None


def tensors_sha256(tensors: Mapping[str, torch.Tensor], prefix: bytes = b"") -> str:
    """sha256 of ``prefix`` and, in sorted name order, each tensor's name, dtype, shape and raw bytes."""
    digest = hashlib.sha256(prefix)
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"|{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ---- self-checking cache files -------------------------------------------------------------------------------


def write_tensor_cache(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Writes ``tensors`` and ``metadata`` to the cache file ``path`` (atomically), recording their digest."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    recorded = {**metadata, CACHE_DIGEST_KEY: tensors_sha256(tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not fsync'ed: a cache lost to a power cut fails its digest check and is rebuilt.
    atomic_write_bytes(path, save(tensors, metadata=recorded), durable=False)


def read_tensor_cache(
    path: str | os.PathLike, expected: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """``(tensors, metadata)`` of a `write_tensor_cache` file whose tensors match their recorded digest and whose
    metadata holds ``expected``; None when there is no file, and None with a RuntimeWarning when the file is
    corrupt, tampered with or stale (the caller then rebuilds it from its source)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        header = read_safetensors_header(path)
        tensors = load_safetensors(path)
        recorded = header.metadata.get(CACHE_DIGEST_KEY)
        if recorded is None:
            raise CorruptFileError(f"{path}: the cache file records no content digest")
        if tensors_sha256(tensors) != recorded:
            raise CorruptFileError(f"{path}: the cached tensors do not match their recorded sha256")
        for key, value in (expected or {}).items():
            if header.metadata.get(key) != value:
                raise CorruptFileError(
                    f"{path}: the cache's {key!r} is {header.metadata.get(key)!r}, expected {value!r}"
                )
    except (CorruptFileError, OSError) as error:
        warnings.warn(
            f"{error}; ignoring this cache file and rebuilding it from the source",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return tensors, header.metadata
