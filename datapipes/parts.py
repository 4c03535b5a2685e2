"""Distributed, resumable ``pack``: a list of inputs split into parts that run independently.

``xdyna-data pack INPUT --out DIR --parts P --part i`` packs the i-th contiguous slice of the
inputs (the whole list, in order, is what a single pack would see). A part works in a hidden
staging folder ``DIR/.parts/part-0000i.<host>.<pid>/`` with the ordinary :func:`datapipes.pack.pack`
(shards there are themselves written under hidden names and renamed when complete), then
renames its shards into ``DIR`` as ``PREFIX-0000i-%06d.tar`` and, last, writes its completion
record ``DIR/parts/part-0000i.json`` atomically. Hence:

* rerunning the same command skips a part whose record exists (same plan fingerprint);
* a part killed at any point has no record: its rerun removes its staging folders and any of
  its shards already moved into ``DIR``, and packs its slice again from scratch; nothing of the
  killed attempt survives, so no sample is duplicated or lost;
* two copies of one part (the same array task submitted twice, a rerun started while the first
  still runs) cannot both run: a part holds an exclusive lock on ``DIR/.parts/part-0000i.lock``
  (``flock``; the kernel drops it when its process dies, so a killed part leaves no stale lock;
  a finished part removes the file),
  and a second copy stops with one line naming the holder's host, pid and SLURM job instead of
  removing the first one's work;
* a reader that goes through the index (:mod:`datapipes.index`) sees only shards of finished
  parts; one that globs ``DIR`` may see a part's shards between their rename and its record,
  always whole shards, never a partial one.

``DIR/pack_plan.json`` pins the inputs, options and part count: a rerun with another manifest,
other options or another ``--parts`` is refused (one line saying what differs) instead of mixing
two packs. Keys are made unique across parts before splitting (a later duplicate is quarantined),
the same rule a single pack applies, so parts never collide.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from datapipes.atomic import write_bytes_atomic
from datapipes.pack import PackItem, PackOptions, key_from_path, pack

PLAN = "pack_plan.json"
PARTS = "parts"
STAGING = ".parts"
# A debug hook for the kill-and-rerun test: "PART:SHARDS" makes part PART exit hard (os._exit,
# no cleanup, as SIGKILL or a node failure would) right after its SHARDS-th shard is written.
DEBUG_EXIT_ENV = "XDYNA_PACK_DEBUG_EXIT"


@dataclass(frozen=True)
class PartSettings:
    """Everything besides the inputs that decides a pack's output: part of the plan's fingerprint."""
    parts: int
    prefix: str = "shard"
    shard_size: int = 1000
    shard_bytes: float = 1e9
    options: PackOptions = field(default_factory=PackOptions)
    curate: object | None = None  # a datapipes.curate.CurateConfig: raw footage cut into clips first

    def document(self) -> dict:
        return {"parts": self.parts, "prefix": self.prefix, "shard_size": self.shard_size,
                "shard_bytes": self.shard_bytes, "options": _plain(asdict(self.options)),
                "curate": _plain(asdict(self.curate)) if self.curate is not None else None}


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def dedupe_keys(items: list[PackItem]) -> list[PackItem]:
    """Items with their final keys; an item whose key an earlier item already has gets a
    ``problem`` (quarantined), as a single pack rejects the later of two equal keys."""
    seen: dict[str, str] = {}
    out = []
    for item in items:
        key = item.key or key_from_path(item.video)
        if item.problem is None and key in seen:
            item = replace(item, problem=f"duplicate key {key!r} (first: {seen[key]!r})")
        elif item.problem is None:
            seen[key] = item.video
        out.append(replace(item, key=key))
    return out


def part_slice(total: int, parts: int, part: int) -> range:
    """The inputs of ``part``: contiguous, sizes differing by at most one, in input order."""
    if parts < 1:
        raise ValueError(f"--parts must be >= 1, got {parts}")
    if not 0 <= part < parts:
        raise ValueError(f"--part must be in [0, {parts - 1}] for --parts {parts}, got {part}")
    return range(total * part // parts, total * (part + 1) // parts)


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def record_path(out_dir: str, part: int) -> str:
    return os.path.join(out_dir, PARTS, f"{part_name(part)}.json")


def make_plan(items: list[PackItem], settings: PartSettings) -> dict:
    inputs = [_plain(asdict(item)) for item in items]
    digest = hashlib.sha256(json.dumps([inputs, settings.document()], sort_keys=True).encode()).hexdigest()
    return {"format": "xdyna-pack-plan-v1", "fingerprint": digest, "inputs": len(items), **settings.document()}


def ensure_plan(out_dir: str, plan: dict) -> None:
    """Write ``DIR/pack_plan.json`` (every part writes the same bytes, so a race is harmless), or
    refuse when ``DIR`` holds the plan of another pack."""
    path = os.path.join(out_dir, PLAN)
    if os.path.exists(path):
        with open(path) as handle:
            old = json.load(handle)
        if old.get("fingerprint") != plan["fingerprint"]:
            changed = [name for name in sorted(set(old) | set(plan)) if name != "fingerprint"  # any plan's fields
                       and old.get(name) != plan.get(name)] or ["the inputs' paths, keys or kinds"]
            raise ValueError(f"{out_dir!r} holds a pack of another plan ({path}; differs in: {', '.join(changed)}); "
                             f"rerun with the same manifest and options, or choose another directory")
        return
    if any(name.endswith(".tar") for name in os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir!r} already holds .tar shards of a pack without parts; choose an empty directory")
    write_bytes_atomic(path, json.dumps(plan, indent=1, sort_keys=True).encode())


def finished_parts(out_dir: str, plan: dict) -> list[int]:
    done = []
    for part in range(plan["parts"]):
        record = read_record(out_dir, part)
        if record is not None and record.get("fingerprint") == plan["fingerprint"]:
            done.append(part)
    return done


def read_record(out_dir: str, part: int) -> dict | None:
    try:
        with open(record_path(out_dir, part)) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def _remove_leftovers(out_dir: str, part: int, prefix: str) -> list[str]:
    """Everything a killed attempt of ``part`` may have left: staging folders and shards already
    renamed into ``out_dir`` (a kill between the renames and the record)."""
    removed = []
    staging = os.path.join(out_dir, STAGING)
    if os.path.isdir(staging):
        for name in sorted(os.listdir(staging)):
            if name.startswith(part_name(part) + ".") and name != os.path.basename(_lock_path(out_dir, part)):
                shutil.rmtree(os.path.join(staging, name), ignore_errors=True)
                removed.append(os.path.join(STAGING, name))
    own = f"{prefix}-{part:05d}-"
    for name in sorted(os.listdir(out_dir)):
        if name.startswith(own) and name.endswith(".tar"):
            os.unlink(os.path.join(out_dir, name))
            removed.append(name)
    return removed


def _debug_exit_hook(part: int) -> Callable[[str], None] | None:
    value = os.environ.get(DEBUG_EXIT_ENV)
    if not value:
        return None
    target, _, after = value.partition(":")
    if int(target) != part:
        return None
    written = []

    def hook(url: str) -> None:
        written.append(url)
        if len(written) >= int(after or 1):
            os._exit(99)  # no cleanup on purpose: what a SIGKILL or a lost node leaves

    return hook


def run_part(items: list[PackItem], out_dir: str, settings: PartSettings, part: int, workers: int = 1,
             progress: bool = False, log_every: float = 30.0) -> dict:
    """Pack part ``part`` of ``items`` (the whole input list) into ``out_dir``; returns its
    completion record (``skipped: True`` when it was already finished)."""
    items = dedupe_keys(items)
    chosen = part_slice(len(items), settings.parts, part)
    plan = make_plan(items, settings)
    started = time.monotonic()
    finished, removed, staging = begin_part(out_dir, plan, part)
    if finished is not None:
        return finished
    part_items, curation, curate_seconds = [items[i] for i in chosen], [], 0.0
    if settings.curate is not None:
        from datapipes.curate import curate_items

        part_items, curation = curate_items(part_items, os.path.join(staging, "clips"), settings.curate,
                                            workers, settings.options.item_timeout, settings.options.max_video_bytes)
        curate_seconds = time.monotonic() - started
    shard_dir = os.path.join(staging, "shards")
    summary = pack(part_items, shard_dir, settings.options, shard_size=settings.shard_size,
                   shard_bytes=settings.shard_bytes, workers=workers,
                   prefix=f"{settings.prefix}-{part:05d}", progress=progress, log_every=log_every,
                   on_shard=_debug_exit_hook(part)) if part_items else None
    pack_seconds = time.monotonic() - started - curate_seconds
    quarantined = []
    if summary:
        with open(summary.quarantine) as lines:
            quarantined = [json.loads(line) for line in lines if line.strip()]
    return end_part(out_dir, plan, part, summary.urls if summary else [], staging, {
        "format": "xdyna-pack-part-v1", "inputs": [chosen.start, chosen.stop],
        "packed": summary.accepted if summary else 0, "quarantined": quarantined,
        "warnings": summary.warnings if summary else {}, "curation": curation,
        "timings": {"curate_s": round(curate_seconds, 3), "pack_s": round(pack_seconds, 3),
                    "total_s": round(time.monotonic() - started, 3)},
        "removed_leftovers": removed})


class PartBusyError(RuntimeError):
    """Another process is running this part now."""


def _lock_path(out_dir: str, part: int) -> str:
    # Removed only by the holder, after the part's record is written (see _release_part).
    return os.path.join(out_dir, STAGING, f"{part_name(part)}.lock")


# Part locks this process holds, by lock path: released by end_part (or by the process's exit).
_HELD_LOCKS: dict[str, int] = {}


def _claim_part(out_dir: str, part: int) -> None:
    """Take part ``part``'s exclusive lock (see the module docstring), or raise PartBusyError
    naming its holder."""
    from xdyna.train.slurm import slurm_job_id  # the one reader of SLURM's job id (stdlib only)

    path = _lock_path(out_dir, part)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _release_part(path)  # an earlier attempt in this process that raised before end_part
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        raise PartBusyError(f"part {part} of {out_dir} is being written by another process ({holder}); "
                            "not starting a second copy (it would remove that one's work)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job": slurm_job_id()}).encode(), 0)
    _HELD_LOCKS[path] = fd


def _release_part(path: str, finished: bool = False) -> None:
    fd = _HELD_LOCKS.pop(path, None)
    if fd is None:
        return
    if finished:
        # Only once the part's record exists: a copy that locks a fresh file after this finds
        # the record under its lock and skips, whichever inode it locked.
        os.unlink(path)
    os.close(fd)  # closing the descriptor drops its flock


def begin_part(out_dir: str, plan: dict, part: int) -> tuple[dict | None, list[str], str]:
    """Start part ``part`` of ``plan`` (a pack's, or an encode's: datapipes.latents) in ``out_dir``:
    ``(its record with skipped: True, [], "")`` when it is finished already, else ``(None, the
    leftovers of a killed attempt it removed, a fresh staging folder)``, holding the part's lock
    until :func:`end_part` (:class:`PartBusyError` when another process holds it)."""
    os.makedirs(out_dir, exist_ok=True)
    ensure_plan(out_dir, plan)
    record = read_record(out_dir, part)
    if record is not None and record.get("fingerprint") == plan["fingerprint"]:
        return dict(record, skipped=True), [], ""
    _claim_part(out_dir, part)
    # Under the lock: a copy that finished while this one waited to start leaves its record.
    record = read_record(out_dir, part)
    if record is not None and record.get("fingerprint") == plan["fingerprint"]:
        _release_part(_lock_path(out_dir, part), finished=True)
        return dict(record, skipped=True), [], ""
    removed = _remove_leftovers(out_dir, part, plan["prefix"])
    staging = os.path.join(out_dir, STAGING, f"{part_name(part)}.{socket.gethostname()}.{os.getpid()}")
    os.makedirs(staging)
    return None, removed, staging


def end_part(out_dir: str, plan: dict, part: int, urls: list[str], staging: str, facts: dict) -> dict:
    """Finish a part: its complete shards ``urls`` (in ``staging``) renamed into ``out_dir``, then
    its record (``facts`` + shards, clips, host, SLURM node and job) written atomically, last."""
    from datapipes.index import clip_records
    from xdyna.train.slurm import slurm_job_id  # the one reader of SLURM's job id (stdlib only)

    clips = clip_records(urls)
    shard_names = []
    for url in urls:
        name = os.path.basename(url)
        os.replace(url, os.path.join(out_dir, name))  # same filesystem: atomic, whole shards only
        shard_names.append(name)
    for clip in clips:
        clip["shard"] = os.path.basename(clip["shard"])
    record = {"format": facts.get("format"), "fingerprint": plan["fingerprint"], "part": part, "parts": plan["parts"], "shards": shard_names,
              "clips": clips, **facts, "host": socket.gethostname(), "node": os.environ.get("SLURMD_NODENAME"),
              "job": slurm_job_id()}
    os.makedirs(os.path.join(out_dir, PARTS), exist_ok=True)
    write_bytes_atomic(record_path(out_dir, part), json.dumps(record, indent=1, allow_nan=False).encode())
    shutil.rmtree(staging, ignore_errors=True)
    _release_part(_lock_path(out_dir, part), finished=True)
    return dict(record, skipped=False)
