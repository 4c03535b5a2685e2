"""Where a checkpoint, an export or a W&B run came from: one record, collected here.

The record (a JSON-able dict, see :func:`collect`) holds

- ``git``: the commit of the source tree the running ``xdyna`` package was imported from and whether
  tracked files differ from it (``"unknown"`` for both when git is missing or the package is not in
  a git checkout, e.g. installed from a wheel);
- ``config``: the fully composed, resolved training config;
- ``data``: the shard list every source expands to, each shard with its size in bytes, a sha256 of
  that list (:func:`shard_list_sha256`) and the dataset index files (``index.json``) named by the
  config or lying in a shard folder, each with its sha256;
- ``versions``: python, xdyna, torch, diffusers, deepspeed, lightning;
- ``world_size`` and ``resume_chain``: every resume the run went through, oldest first
  (:func:`resume_entry`: checkpoint, step, world size before and after, SLURM job id, time);
- ``pretrained``: every configured pretrained path (``model.pretrained.*``, components included)
  with the sha256 of each file under it.

Hashing reads every byte of the pretrained weights (an SD1.5 folder is several GB): files are
streamed in 8 MiB blocks and their digests cached in memory by ``(path, size, mtime)``, so a
process hashes each file once however many checkpoints it writes.

Pure: no Lightning, Hydra or W&B import (the pipeline reads provenance too).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

# The file an export (and a DeepSpeed checkpoint directory) carries beside its weights.
PROVENANCE_FILE = "provenance.json"
# The key of the record in a checkpoint dict.
CHECKPOINT_KEY = "provenance"
UNKNOWN = "unknown"
_BLOCK = 8 << 20
_VERSIONED = ("torch", "diffusers", "deepspeed", "lightning")
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


# ---------------------------------------------------------------------- code

def git_state(source_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the git checkout holding ``source_dir`` (default: this package's
    source). ``dirty`` counts tracked files only: untracked scratch files do not change the code
    that ran. Without git, outside a checkout or on any git failure both are ``"unknown"``."""
    source_dir = Path(source_dir) if source_dir is not None else Path(__file__).resolve().parent
    git = shutil.which("git")
    if git is None:
        return {"commit": UNKNOWN, "dirty": UNKNOWN}

    def ask(*args: str) -> str | None:
        try:
            done = subprocess.run([git, "-C", str(source_dir), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = ask("rev-parse", "HEAD")
    if not commit:
        return {"commit": UNKNOWN, "dirty": UNKNOWN}
    status = ask("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": UNKNOWN if status is None else bool(status.strip())}


def versions() -> dict[str, str]:
    """The versions that decide what a run computes; a package that is not installed is ``"absent"``.
    torch's is its own ``__version__``, which names the build (``2.x+cu130``); its distribution
    metadata does not."""
    import torch

    found = {"python": platform.python_version()}
    for name in ("xdyna", *_VERSIONED):
        try:
            found[name] = _metadata.version(name)
        except _metadata.PackageNotFoundError:
            found[name] = "absent"
    found["torch"] = str(torch.__version__)  # a TorchVersion object would not load weights-only
    return found


# ---------------------------------------------------------------------- files

def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in blocks; cached by ``(real path, size, mtime)`` for this process."""
    path = Path(path)
    stat = path.stat()
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    cached = _SHA256_CACHE.get(key)
    if cached is None:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(_BLOCK):
                digest.update(block)
        cached = _SHA256_CACHE[key] = digest.hexdigest()
    return cached


def _files_under(root: Path) -> list[Path]:
    # Hidden entries (.cache/ of huggingface downloads, .git) are bookkeeping, not weights.
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def path_hashes(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "files": {relative name: {"bytes", "sha256"}}}`` of a file or folder (a file's own
    name is its relative name); a missing path gives ``{"path", "missing": true}``."""
    root = Path(path).expanduser()
    if not root.exists():
        return {"path": str(root), "missing": True}
    files = [root] if root.is_file() else _files_under(root)
    return {"path": str(root.resolve()),
            "files": {(f.name if f == root else f.relative_to(root).as_posix()): {"bytes": f.stat().st_size,
                                                                                   "sha256": file_sha256(f)}
                      for f in files}}


def pretrained_sources(pretrained: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every set ``model.pretrained`` entry with the hashes of its files; ``components`` entries are
    keyed ``components.<name>``."""
    sources: dict[str, Any] = {}
    for key, value in sorted((pretrained or {}).items()):
        if value is None:
            continue
        if isinstance(value, Mapping):
            for name, path in sorted(value.items()):
                sources[f"{key}.{name}"] = path_hashes(path)
        else:
            sources[key] = path_hashes(value)
    return sources


# ---------------------------------------------------------------------- data

def shard_list_sha256(shards: Iterable[tuple[str, int | None]]) -> str:
    """sha256 of the shard list: one ``<path>\\t<bytes>\\n`` line per shard, in loading order
    (a remote url's size is unknown: ``-``)."""
    digest = hashlib.sha256()
    for path, size in shards:
        digest.update(f"{path}\t{'-' if size is None else size}\n".encode())
    return digest.hexdigest()


def _spec_items(spec: Any) -> list[str]:
    if spec is None:
        return []
    return [os.fspath(spec)] if isinstance(spec, (str, os.PathLike)) else [os.fspath(s) for s in spec]


def data_provenance(data: Mapping[str, Any]) -> dict[str, Any]:
    """The shards the ``data`` config group reads (every source's, in the loader's order, each
    once), their sizes and hash, and the dataset indexes involved."""
    from datapipes.index import INDEX
    from datapipes.loader import config_from_dict, shard_sets

    config = config_from_dict(dict(data))
    sets, _ = shard_sets(config)
    seen: dict[str, int | None] = {}
    for urls in sets:
        for url in urls:
            local = os.path.abspath(url) if os.path.isfile(url) else None
            seen.setdefault(local or url, os.path.getsize(local) if local else None)
    indexes = {}
    for source in config.data_sources():
        for item in _spec_items(source.shards):
            path = os.path.expanduser(item)
            candidate = os.path.join(path, INDEX) if os.path.isdir(path) else path
            if candidate.endswith(".json") and os.path.isfile(candidate):
                indexes[os.path.abspath(candidate)] = file_sha256(candidate)
    shards = [{"path": path, "bytes": size} for path, size in seen.items()]
    return {"shards_sha256": shard_list_sha256(seen.items()), "num_shards": len(shards),
            "total_bytes": sum(size or 0 for size in seen.values()), "shards": shards,
            "indexes": [{"path": path, "sha256": digest} for path, digest in indexes.items()]}


# ---------------------------------------------------------------------- the record

def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def resume_entry(checkpoint: str | os.PathLike | None, step: int, world_size: int, from_world_size: int | None,
                 slurm_job_id: str | None) -> dict[str, Any]:
    """One link of the resume chain: the run resumed ``checkpoint`` (written at ``step`` on
    ``from_world_size`` ranks) on ``world_size`` ranks, in ``slurm_job_id`` (``None`` outside SLURM)."""
    return {"checkpoint": None if checkpoint is None else str(checkpoint), "step": int(step),
            "from_world_size": from_world_size, "world_size": int(world_size), "slurm_job_id": slurm_job_id,
            "time": now()}


def collect(config: Mapping[str, Any], *, data: Mapping[str, Any] | None = None,
            pretrained: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run-constant part of the record: git, config, data, versions, pretrained. The callback
    adds ``world_size`` and ``resume_chain`` when it saves (:func:`with_run_state`)."""
    return {"git": git_state(), "config": json.loads(json.dumps(config, default=str)),
            "data": data_provenance(data) if data is not None else None,
            "versions": versions(), "pretrained": pretrained_sources(pretrained), "collected_at": now()}


def with_run_state(base: Mapping[str, Any], step: int, world_size: int, resume_chain: list[dict]) -> dict[str, Any]:
    """``base`` plus what changes as the run goes: the optimizer step, the world size, the resumes."""
    return {**base, "step": int(step), "world_size": int(world_size), "resume_chain": [dict(link) for link in resume_chain]}


def compact(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record without its per-shard list (thousands of rows on a real dataset): what the W&B
    run config holds; the checkpoint and the export keep the whole list."""
    data = record.get("data")
    return {**record, "data": {k: v for k, v in data.items() if k != "shards"} if isinstance(data, Mapping) else data}


def write_file(folder: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """``<folder>/provenance.json`` (atomic)."""
    from datapipes.atomic import write_bytes_atomic

    target = Path(folder) / PROVENANCE_FILE
    write_bytes_atomic(target, json.dumps(record, indent=2, sort_keys=True, default=str).encode())
    return target


def read(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record of an export folder, a DeepSpeed checkpoint folder or a ``.ckpt`` file (``None``
    when it has none). A ``.ckpt`` is memory-mapped and read weights-only: no tensor data is read."""
    path = Path(path).expanduser()
    if path.is_dir():
        file = path / PROVENANCE_FILE
        return json.loads(file.read_text()) if file.is_file() else None
    if not path.is_file():
        return None
    import torch

    from xdyna.checkpoint_io import weights_only_loading

    with weights_only_loading():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not a zip checkpoint, or refused: the weights reader reports it properly
            return None
    record = state.get(CHECKPOINT_KEY) if isinstance(state, Mapping) else None
    return dict(record) if isinstance(record, Mapping) else None


def describe(record: Mapping[str, Any]) -> str:
    """A short block saying where weights came from: commit, step, run chain, pretrained sources."""
    git = record.get("git") or {}
    dirty = git.get("dirty")
    state = " (dirty tree)" if dirty is True else " (tree state unknown)" if dirty == UNKNOWN else ""
    exported = record.get("exported_from") or {}
    lines = [f"weights from: commit {git.get('commit', UNKNOWN)}{state}",
             f"  step {exported.get('step', record.get('step', '?'))} on {record.get('world_size', '?')} rank(s)"
             + (f", checkpoint {exported['checkpoint']}" if exported.get("checkpoint") else "")]
    chain = record.get("resume_chain") or []
    if chain:
        lines.append("  resumed: " + " -> ".join(
            f"step {link.get('step')} ({link.get('from_world_size') or '?'}->{link.get('world_size')} ranks"
            + (f", job {link['slurm_job_id']}" if link.get("slurm_job_id") else "") + ")" for link in chain))
    for key, source in (record.get("pretrained") or {}).items():
        files = source.get("files") or {}
        if source.get("missing"):
            what = "missing when recorded"
        elif len(files) == 1:
            what = "sha256 " + next(iter(files.values()))["sha256"][:16]
        else:
            what = f"{len(files)} files, sha256 of all {hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]}"
        lines.append(f"  pretrained {key}: {source.get('path')} ({what})")
    return "\n".join(lines)
