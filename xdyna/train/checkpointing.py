"""Atomic checkpoint commits and the search for the newest complete checkpoint.

Every checkpoint, single file (DDP, one device) or directory (DeepSpeed, one shard per rank), is
first written under a hidden temporary name in the same directory and then renamed into place
(``os.replace`` on one filesystem is atomic). Only after the rename is the ``latest`` pointer
rewritten, itself through a temporary file and a rename. A job killed while writing therefore
leaves at worst a hidden ``.<name>.partial-*`` entry that is never a resume candidate and is
swept away by :func:`remove_stale_partials`.

Directory checkpoints also carry a ``COMPLETE`` marker written after every rank has finished its
shards, so a directory copied or restored by hand without it is not trusted either.

Multi-node runs need the run directory on a filesystem every node sees (the usual SLURM setup):
all ranks write into the same temporary directory, rank 0 commits it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

LATEST_POINTER = "latest"
COMPLETE_MARKER = "COMPLETE"
# The universal conversion of a DeepSpeed checkpoint for a resume on another world size
# (:mod:`xdyna.train.elastic`) lives beside it under this suffix.
UNIVERSAL_SUFFIX = ".universal"
_PARTIAL_TAG = ".partial-"
# Checkpoint names carry the optimizer step: ``step=000123.ckpt`` (Lightning's ModelCheckpoint
# with ``filename="{step:06d}"``) or ``step=000123-<suffix>.ckpt``.
_STEP_NAME = re.compile(r"^step=(\d+)(?:-[^/]*)?\.ckpt$")


class CheckpointError(RuntimeError):
    """A checkpoint directory or file cannot be used to resume."""


def checkpoint_name(step: int, suffix: str = "") -> str:
    """The file/directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step={step:06d}" + (f"-{suffix}" if suffix else "") + ".ckpt"


def partial_path(final_path: str | os.PathLike, token: str | None = None) -> Path:
    """Hidden temporary sibling of ``final_path``; never matches a checkpoint name."""
    final_path = Path(final_path)
    token = token or uuid.uuid4().hex[:12]
    return final_path.with_name(f".{final_path.name}{_PARTIAL_TAG}{token}")


def _fsync_dir(directory: Path) -> None:
    # The rename itself lives in the directory entry: flush it so a crash right after the
    # commit cannot bring back the old state.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = partial_path(path)
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def commit(partial: str | os.PathLike, final_path: str | os.PathLike, metadata: dict[str, Any] | None = None,
           *, move_latest: bool = True) -> Path:
    """Rename a fully written ``partial`` file or directory to ``final_path``, then point ``latest`` at it
    (unless ``move_latest`` is off: a derived folder such as a universal conversion).

    Runs on one process only (rank 0). A directory gets its ``COMPLETE`` marker (with
    ``metadata``) before the rename. An existing ``final_path`` is replaced: it is renamed aside
    first, so at every instant either the old or the new checkpoint exists under a final name.
    """
    partial, final_path = Path(partial), Path(final_path)
    if partial.is_dir():
        write_text_atomic(partial / COMPLETE_MARKER, json.dumps(metadata or {}, sort_keys=True))
    retired = None
    if final_path.is_dir():
        # os.replace cannot replace a non-empty directory.
        retired = partial_path(final_path, "retired-" + uuid.uuid4().hex[:8])
        os.replace(final_path, retired)
    os.replace(partial, final_path)
    _fsync_dir(final_path.parent)
    if move_latest:
        write_text_atomic(final_path.parent / LATEST_POINTER, final_path.name + "\n")
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
        # A universal conversion of the replaced checkpoint no longer describes it.
        stale = final_path.with_name(final_path.name + UNIVERSAL_SUFFIX)
        if stale.exists():
            remove_checkpoint(stale)
    return final_path


def save_file_atomic(checkpoint: dict[str, Any], final_path: str | os.PathLike) -> Path:
    """``torch.save`` into a hidden temporary file, fsync, commit."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final_path)
    try:
        with open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return commit(tmp, final_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """What :func:`commit` recorded in a directory checkpoint's ``COMPLETE`` marker (``world_size``,
    ``zero_stage``, ``global_step``, ...); ``{}`` for a file checkpoint or an empty marker."""
    marker = Path(path) / COMPLETE_MARKER
    if not marker.is_file():
        return {}
    text = marker.read_text().strip()
    try:
        metadata = json.loads(text) if text else {}
    except ValueError:
        raise CheckpointError(f"{marker} is not the JSON xdyna-train writes ({text[:80]!r})") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{marker} holds {type(metadata).__name__}, expected a JSON object")
    return metadata


def is_complete(path: str | os.PathLike) -> bool:
    """A committed checkpoint: a non-empty file, or a directory holding the ``COMPLETE`` marker."""
    path = Path(path)
    if path.name.startswith(".") or _PARTIAL_TAG in path.name:
        return False
    if path.is_dir():
        return (path / COMPLETE_MARKER).is_file()
    return path.is_file() and path.stat().st_size > 0


@dataclass(frozen=True)
class CheckpointEntry:
    path: Path
    step: int


def list_complete_checkpoints(directory: str | os.PathLike) -> list[CheckpointEntry]:
    """Complete checkpoints in ``directory``, oldest step first (ties: older modification first)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    entries = []
    for child in directory.iterdir():
        match = _STEP_NAME.match(child.name)
        if match and is_complete(child):
            entries.append((int(match.group(1)), child.stat().st_mtime, child))
    entries.sort()
    return [CheckpointEntry(path=path, step=step) for step, _, path in entries]


def newest_complete_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint a restarted job resumes from, or None when there is none yet.

    The ``latest`` pointer is trusted when it names a complete checkpoint at least as new as any
    other; otherwise (pointer missing, dangling, or behind a newer complete entry) the highest
    step wins.
    """
    directory = Path(directory)
    entries = list_complete_checkpoints(directory)
    if not entries:
        return None
    newest = entries[-1]
    pointer = directory / LATEST_POINTER
    if pointer.is_file():
        named = directory / pointer.read_text().strip()
        match = _STEP_NAME.match(named.name)
        if match and is_complete(named) and int(match.group(1)) >= newest.step:
            return named
    return newest.path


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint so that no half-deleted one ever looks complete: rename it away first.
    Folders derived from it (its universal conversion, ``<name>.universal``) go with it."""
    path = Path(path)
    universal = path.with_name(path.name + UNIVERSAL_SUFFIX)
    for victim in (path, universal) if universal.exists() else (path,):
        doomed = partial_path(victim, "deleting-" + uuid.uuid4().hex[:8])
        os.replace(victim, doomed)
        if doomed.is_dir():
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            doomed.unlink(missing_ok=True)


def remove_stale_partials(directory: str | os.PathLike, older_than_s: float = 0.0) -> list[Path]:
    """Delete leftovers of killed writes. Call while no process writes checkpoints (job start)."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    now = time.time()
    for child in directory.iterdir():
        if child.name.startswith(".") and _PARTIAL_TAG in child.name and now - child.stat().st_mtime >= older_than_s:
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    return removed


def save_directory_checkpoint(
    final_path: str | os.PathLike,
    write_shards: Callable[[Path], None],
    *,
    is_global_zero: bool,
    broadcast: Callable[[Any], Any],
    barrier: Callable[[], None],
    metadata: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Collective save of a sharded checkpoint directory, committed by rank 0 once every rank is done.

    ``write_shards(tmp_dir)`` is called on every rank with the same temporary directory. Rank 0's
    ``provenance`` (:mod:`xdyna.provenance`) lands beside the shards as ``provenance.json``, where
    it is read without DeepSpeed; the ``COMPLETE`` marker stays the small ``metadata``.
    """
    final_path = Path(final_path)
    tmp = Path(broadcast(str(partial_path(final_path)) if is_global_zero else None))
    if is_global_zero:
        tmp.mkdir(parents=True, exist_ok=True)
    barrier()
    write_shards(tmp)
    barrier()  # every shard is on disk before rank 0 makes the directory visible
    if is_global_zero:
        if provenance is not None:
            from xdyna.provenance import write_file

            write_file(tmp, provenance)
        commit(tmp, final_path, metadata)
    barrier()  # no rank goes on (e.g. requeues, deletes old checkpoints) before the commit
    return final_path
