"""Crash-safe file writes: a reader sees the old file or the new one, never half of one.

One file (`atomic_write_bytes`, `atomic_write_text`, `atomic_write_json`):

    PATH.<pid>.<random>.partial  <- the bytes, written in full, flushed and fsync'ed
    os.replace(partial, PATH)    <- the commit: one rename, atomic on POSIX and Windows
    fsync(PATH's directory)      <- the rename itself survives a power cut

A kill before the rename leaves the old PATH (and a ``*.partial`` leftover that the next write of a sibling
removes); after it, the new one.

A folder of several files that must change together (`commit_directory`; the trainer's checkpoint):

    1. the new folder is written in full as a sibling, TARGET.staging-<pid>-<random>, and fsync'ed
    2. TARGET -> TARGET.previous          (rename; skipped when there is no TARGET yet)
    3. TARGET.staging-... -> TARGET       (rename: the commit)
    4. fsync the parent folder, then remove TARGET.previous

A kill at any point leaves either TARGET complete (old before step 2, new after step 3) or, between steps 2 and
3, no TARGET and a complete TARGET.previous: `readable_directory` falls back to it, and the next
`commit_directory` first puts it back (`recover_directory`). POSIX has no portable atomic exchange of two
folders, hence the recoverable fallback instead of a single rename.

Every filesystem change goes through ``os`` functions looked up at call time (``os.write``, ``os.fsync``,
``os.replace``, ``os.rename``, ``os.mkdir``, ``os.unlink``, ``os.rmdir``), so tests can stop a writer at any of
them and check what a reader then finds.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
PREVIOUS_SUFFIX = ".previous"
STAGING_INFIX = ".staging-"
_CHUNK = 16 << 20  # bytes per os.write call


def fsync_directory(folder: str | os.PathLike) -> None:
    """Makes the entries of ``folder`` (renames, new files) durable. No-op where folders cannot be opened
    (Windows)."""
    if os.name == "nt":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _unique(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def _write_all(descriptor: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(descriptor, view[:_CHUNK])
        view = view[written:]


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes | bytearray | memoryview, *, durable: bool = True
) -> None:
    """Replaces ``path`` with ``data`` atomically (see the module docstring). ``durable=False`` skips the
    fsyncs (caches that can be rebuilt): still atomic against a killed process, not against a power cut."""
    path = Path(path)
    partial = _unique(path, PARTIAL_SUFFIX)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        _write_all(descriptor, data)
        if durable:
            os.fsync(descriptor)
    except Exception:  # an error (disk full, ...): leave no partial file. A kill skips this, by design.
        os.close(descriptor)
        _remove_quietly(partial)
        raise
    os.close(descriptor)
    try:
        os.replace(partial, path)
    except Exception:
        _remove_quietly(partial)
        raise
    if durable:
        fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: str | os.PathLike, value: object, *, durable: bool = True) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n", durable=durable)


def _remove_quietly(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def remove_partial_files(folder: str | os.PathLike, name: str) -> None:
    """Removes ``name.*.partial`` leftovers of writers that were killed (never a completed file)."""
    for leftover in Path(folder).glob(f"{name}.*{PARTIAL_SUFFIX}"):
        _remove_quietly(leftover)


# ---- folders -------------------------------------------------------------------------------------------------


def previous_directory(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.with_name(target.name + PREVIOUS_SUFFIX)


def new_staging_directory(target: str | os.PathLike) -> Path:
    """A fresh, empty sibling of ``target`` to write its next version into; leftovers of killed writers of
    ``target`` are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f"{target.name}{STAGING_INFIX}*"):
        _remove_quietly(leftover)
    staging = target.with_name(f"{target.name}{STAGING_INFIX}{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(staging)
    return staging


def recover_directory(target: str | os.PathLike) -> None:
    """Finishes what a killed `commit_directory` left: puts ``target.previous`` back when ``target`` is gone
    (killed between the two renames), or removes it when ``target`` is there (killed while removing it)."""
    target, previous = Path(target), previous_directory(target)
    if not previous.exists():
        return
    if target.exists():
        _remove_quietly(previous)
    else:
        os.rename(previous, target)
        fsync_directory(target.parent)


def readable_directory(target: str | os.PathLike) -> Path:
    """``target``, or its complete previous version when a killed `commit_directory` left no ``target``
    (read-only: nothing is moved; the next commit repairs it)."""
    target, previous = Path(target), previous_directory(target)
    if not target.exists() and previous.is_dir():
        warnings.warn(
            f"{target} is missing but {previous.name} is there (a save was interrupted between its two renames); "
            "reading the previous version",
            RuntimeWarning,
            stacklevel=3,
        )
        return previous
    return target


def commit_directory(
    staging: str | os.PathLike, target: str | os.PathLike, *, replaceable: Iterable[str] | None = None
) -> Path:
    """Makes the complete folder ``staging`` (from `new_staging_directory`) the new ``target`` (see the module
    docstring). ``replaceable``: the only entry names an existing ``target`` may hold; anything else in it
    (files the caller does not own) makes this refuse, so that no foreign file is ever deleted."""
    staging, target = Path(staging), Path(target)
    recover_directory(target)
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"cannot write the folder {target}: a file of that name exists")
        if replaceable is not None:
            allowed = set(replaceable)
            foreign = sorted(p.name for p in target.iterdir() if p.name not in allowed)
            if foreign:
                raise FileExistsError(
                    f"refusing to replace {target}: it holds entries that are not part of this checkpoint "
                    f"({foreign[:5]}); pick an empty or dedicated folder"
                )
    fsync_directory(staging)
    previous = previous_directory(target)
    if target.exists():
        os.rename(target, previous)
    os.rename(staging, target)  # the commit
    fsync_directory(target.parent)
    if previous.exists():
        shutil.rmtree(previous)
    return target
