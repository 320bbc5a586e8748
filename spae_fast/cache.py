"""The on-disk cache: one root folder, one keying scheme, entries that check themselves.

Root: ``$SPAE_FAST_CACHE``, else ``~/.cache/spae_fast`` (`cache_dir`). Every entry lies directly in it, named

    <kind>-<label>-<key>        key = sha256(canonical JSON of (kind, format, source, parameters))[:24]

- kind: what the entry holds (`EMBEDDING_TABLE`, `TEXT_FEATURES`, `GGUF_CONVERSION`); its ``format`` is the
  version of that layout, so a new layout simply finds no old entry and builds a new one.
- source: the identity of what the entry is derived from, never its content: `file_identity` (resolved path,
  size and mtime of each file) for model files, a checksum of the parameters for a model in memory.
- parameters: everything else the content depends on (texts, templates, ...).
- label: a readable hint such as the model file's name; not part of the key.

Any change of these names a new entry; an entry is never updated in place. Two entry types:

- a tensor file ``<name>.safetensors`` (`write_tensors` / `read_tensors`): written atomically, with the sha256 of
  its tensors, its kind, format and key in the metadata (`spae_fast._integrity.write_tensor_cache`);
- a folder ``<name>/`` (`commit_folder` / `folder_problem`): built beside its place, a manifest
  (``spae_fast_cache.json``: size and sha256 of every file) written last, renamed into place.

A read verifies the entry; one that is corrupt, tampered with, incomplete or of another kind or format is
reported with a RuntimeWarning (folders: by the caller, naming its source) and rebuilt from its source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ._atomic import atomic_write_json, fsync_directory
from ._integrity import CorruptFileError, read_json, read_tensor_cache, sha256_file, write_tensor_cache

CACHE_ENV = "SPAE_FAST_CACHE"
MANIFEST = "spae_fast_cache.json"
KEY_LENGTH = 24  # hex digits of the sha256 in an entry's name


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a cache entry holds. ``format``: the version of its layout (bump it when the layout changes)."""

    name: str
    format: int
    folder: bool = False  # a folder with a manifest instead of one safetensors file


EMBEDDING_TABLE = Kind("embedding-table", 3)  # fp32 "weight" [V, D]; token strings and source in the metadata
TEXT_FEATURES = Kind("text-features", 3)  # fp32 "features" [N, P] of N texts
GGUF_CONVERSION = Kind("gguf-conversion", 3, folder=True)  # a GGUF model saved as a safetensors HF folder


def cache_dir() -> Path:
    """The cache's root: ``$SPAE_FAST_CACHE``, else ``~/.cache/spae_fast``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "spae_fast")
    return Path(root)


def json_sha256(value: Any) -> str:
    """sha256 of ``value`` as canonical JSON (sorted keys; other objects by ``str``)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def file_identity(*paths: Path | None) -> list[str | None]:
    """The identity of source files without reading them: resolved path, size and mtime of each (None: absent)."""
    return [None if p is None else f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths]


def entry_key(kind: Kind, source: Any, parameters: Mapping[str, Any] | None = None) -> str:
    record = {
        "kind": kind.name,
        "format": kind.format,
        "source": source,
        "parameters": dict(parameters or {}),
    }
    return json_sha256(record)[:KEY_LENGTH]


def entry_path(
    kind: Kind, source: Any, parameters: Mapping[str, Any] | None = None, *, label: str = ""
) -> Path:
    """Where the entry of (kind, source, parameters) lives (module docstring); nothing is read or created."""
    safe_label = "".join(c if c.isalnum() or c in "-._" else "_" for c in label)[:80]
    name = "-".join(part for part in (kind.name, safe_label, entry_key(kind, source, parameters)) if part)
    return cache_dir() / (name if kind.folder else f"{name}.safetensors")


def _identity(kind: Kind, path: Path) -> dict[str, str]:
    """The metadata that ties an entry file to its kind, format and key (the key is the last part of its name)."""
    key = path.name.removesuffix(".safetensors").rsplit("-", 1)[-1]
    return {
        "spae_fast_cache": kind.name,
        "spae_fast_cache_format": str(kind.format),
        "spae_fast_cache_key": key,
    }


# ---- tensor entries ----------------------------------------------------------------------------------------


def write_tensors(
    path: Path, kind: Kind, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Stores ``tensors`` (and string ``metadata``) as the entry ``path`` of `entry_path`, atomically."""
    write_tensor_cache(path, tensors, {**(metadata or {}), **_identity(kind, path)})


def read_tensors(path: Path, kind: Kind) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """``(tensors, metadata)`` of the entry ``path``; None when absent, and None with a RuntimeWarning when it
    is corrupt, tampered with, or of another kind, format or key (the caller rebuilds it)."""
    return read_tensor_cache(path, _identity(kind, path))


# ---- folder entries ----------------------------------------------------------------------------------------


def folder_problem(folder: Path, kind: Kind) -> str | None:
    """None when ``folder``'s manifest is of ``kind`` and every file it lists has its recorded size and
    sha256; else what is wrong."""
    try:
        manifest = read_json(folder / MANIFEST, "the cache manifest")
    except FileNotFoundError:
        return f"no {MANIFEST} (an interrupted or foreign build)"
    except CorruptFileError as error:
        return str(error)
    if not isinstance(manifest, dict) or (manifest.get("kind"), manifest.get("format")) != (
        kind.name,
        kind.format,
    ):
        return f"{MANIFEST} is not a {kind.name} entry of format {kind.format}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MANIFEST} lists no files"
    for name, entry in files.items():
        path = folder / name
        if not isinstance(entry, dict) or not path.is_file() or path.parent != folder:
            return f"{name} is missing"
        if path.stat().st_size != entry.get("size") or sha256_file(path) != entry.get("sha256"):
            return f"{name} does not match its recorded size / sha256"
    return None


def commit_folder(target: Path, kind: Kind, build: Callable[[Path], None], source: str) -> Path:
    """Builds a folder entry: ``build(folder)`` fills a fresh sibling of ``target``, the manifest is written
    last, and the folder is renamed into place (replacing a damaged ``target``). Returns ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    build(temporary)
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(temporary.iterdir())
        if p.is_file()
    }
    atomic_write_json(
        temporary / MANIFEST, {"kind": kind.name, "format": kind.format, "source": source, "files": files}
    )
    fsync_directory(temporary)
    if (
        target.exists() and folder_problem(target, kind) is not None
    ):  # still damaged: no other process fixed it
        damaged = target.with_name(f"{target.name}.{os.getpid()}.damaged")
        os.rename(target, damaged)
        shutil.rmtree(damaged, ignore_errors=True)
    try:
        os.replace(temporary, target)
    except OSError:  # another process finished first
        shutil.rmtree(temporary, ignore_errors=True)
        if folder_problem(target, kind) is not None:
            raise
    return target
