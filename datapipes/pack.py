"""``xdyna-data pack``: source videos (+ pose videos or keypoints, + face tracks) -> shards.

Inputs come from a folder or a JSONL manifest. Every input is validated in a pool of
processes (see :mod:`datapipes.validate`); rejects go to ``quarantine.jsonl`` in the output
directory with their reason. Source files are only ever read, never moved, changed or deleted.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from datapipes import schema, shards
from datapipes.validate import Rejected, Rules, validate_members

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
QUARANTINE = "quarantine.jsonl"
SUMMARY = "pack_summary.json"


@dataclass
class PackItem:
    """One input clip: the video and its optional companions (paths), kind and provenance."""
    video: str
    kind: str = "human"
    pose_video: str | None = None
    keypoints: str | None = None
    face: str | None = None
    key: str | None = None
    source: str | None = None
    license: str = "unknown"


@dataclass
class PackOptions:
    rules: Rules = field(default_factory=Rules)
    face_detector: str | None = None   # "mtcnn": compute face tracks where none is given ...
    face_landmarks_model: str | None = None  # ... with 68 points from this local .onnx (else MTCNN's 5)
    require_pose: bool = True          # human clips need a pose video or keypoints
    pose_estimator: str | None = None  # "dwpose": estimate keypoints where no pose is given ...
    pose_model: str | None = None      # ... with this local model file
    pose_detector_model: str | None = None  # ... and person boxes from this local YOLOX file


@dataclass
class PackSummary:
    accepted: int
    rejected: int
    urls: list[str]
    quarantine: str
    frames: int
    seconds: float
    kinds: dict

    def __str__(self) -> str:
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self.kinds.items())) or "none"
        text = (f"packed {self.accepted} clip(s) ({kinds}; {self.frames} frames, {self.seconds / 60:.1f} min) "
                f"into {len(self.urls)} shard(s): {shards.brace_pattern(self.urls) if self.urls else '-'}")
        if self.rejected:
            text += f"\nrejected {self.rejected} input(s): reasons in {self.quarantine}"
        return text


def key_from_path(path: str, root: str | None = None) -> str:
    """A WebDataset-safe key from a path: relative to ``root``, extension dropped, other dots
    and odd characters replaced with ``_``."""
    relative = os.path.relpath(path, root) if root else os.path.basename(path)
    stem = os.path.splitext(relative)[0].replace(os.sep, "/")
    return re.sub(r"[^A-Za-z0-9_\-/]", "_", stem).strip("/") or "clip"


def items_from_folder(folder: str, kind: str = "human", license: str = "unknown") -> list[PackItem]:
    """Every video under ``folder`` (recursively), with companions found beside it by name:
    ``X.pose.mp4`` (skeleton video), ``X.pose.json`` (keypoints), ``X.face.json`` (face track)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"input folder {folder!r} does not exist")
    items = []
    for directory, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            if not name.lower().endswith(VIDEO_SUFFIXES) or ".pose." in name:
                continue
            path = os.path.join(directory, name)
            stem = os.path.splitext(path)[0]
            companion = lambda suffix: stem + suffix if os.path.isfile(stem + suffix) else None  # noqa: E731
            items.append(PackItem(video=path, kind=kind, pose_video=companion(".pose.mp4"),
                                  keypoints=companion(".pose.json"), face=companion(".face.json"),
                                  key=key_from_path(path, folder), source=path, license=license))
    if not items:
        raise FileNotFoundError(f"input folder {folder!r} holds no video ({', '.join(VIDEO_SUFFIXES)})")
    return items


def items_from_manifest(manifest: str) -> list[PackItem]:
    """One JSON object per line: ``video`` (required), ``kind``, ``pose_video``, ``keypoints``,
    ``face``, ``key``, ``source``, ``license``; relative paths are relative to the manifest."""
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"manifest {manifest!r} does not exist")
    base = os.path.dirname(os.path.abspath(manifest))
    items = []
    with open(manifest, "rb") as lines:  # bytes: the schema reports bad UTF-8 naming the line
        for number, line in enumerate(lines, 1):
            entry = schema.manifest_entry(line, f"{manifest}:{number}")  # SchemaError names the line and field
            if entry is None:  # a blank line
                continue
            for name in schema.MANIFEST_PATHS:
                if entry.get(name):
                    entry[name] = os.path.join(base, entry[name])
            entry.setdefault("source", entry["video"])
            entry.setdefault("key", key_from_path(entry["video"], base))
            items.append(PackItem(**entry))
    if not items:
        raise ValueError(f"manifest {manifest!r} lists no video")
    return items


def _read(path: str, what: str) -> bytes:
    if not os.path.isfile(path):
        raise Rejected(f"{what} {path!r} does not exist")
    with open(path, "rb") as handle:
        return handle.read()


def prepare_sample(item: PackItem, options: PackOptions) -> dict:
    """Read, validate and assemble one shard sample; raises :class:`Rejected` with the reason."""
    if item.kind not in shards.KINDS:
        raise Rejected(f"kind {item.kind!r} is not one of {shards.KINDS}")
    key = shards.check_key(item.key or key_from_path(item.video))
    members = {shards.VIDEO: _read(item.video, "video")}
    for attribute, member, what in (("pose_video", shards.POSE_VIDEO, "pose video"),
                                    ("keypoints", shards.POSE_KEYPOINTS, "keypoints"),
                                    ("face", shards.FACE, "face track")):
        path = getattr(item, attribute)
        if path and item.kind == "human":
            members[member] = _read(path, what)
    needs_pose = (item.kind == "human" and shards.POSE_VIDEO not in members
                  and shards.POSE_KEYPOINTS not in members)
    if needs_pose and options.require_pose and not options.pose_estimator:
        raise Rejected(f"{key}: human clip has no pose video or keypoints")
    facts = validate_members(key, members, options.rules)
    if needs_pose and options.pose_estimator:
        from datapipes.pose import keypoints_to_json
        from datapipes.pose_estimator import estimate_keypoints, load_pose_estimator

        estimator = load_pose_estimator(options.pose_estimator, options.pose_model, options.pose_detector_model)
        keypoints = estimate_keypoints(members[shards.VIDEO], key, estimator)
        document = keypoints_to_json(keypoints, facts["height"], facts["width"])
        members[shards.POSE_KEYPOINTS] = json.dumps(dict(document, estimator=estimator.name),
                                                    separators=(",", ":")).encode()
    if item.kind == "human" and shards.FACE not in members and options.face_detector:
        from datapipes.facetrack import detect_face_track

        track = detect_face_track(members[shards.VIDEO], key, detector=options.face_detector,
                                  landmarks_model=options.face_landmarks_model)
        members[shards.FACE] = json.dumps(track, separators=(",", ":")).encode()
    meta = schema.sample_meta(dict(facts, kind=item.kind, source=item.source or item.video,
                                   license=item.license), key)  # the loader's rule, checked before writing
    return {"__key__": key, **members, shards.META: json.dumps(meta, sort_keys=True).encode()}


def check_pose_estimator(name: str, model_path: str | None, detector_path: str | None = None) -> None:
    """Fail before any clip is read when the estimator cannot be built (unknown name, missing
    model file or onnxruntime, unreadable model). The session is dropped again: worker processes
    build their own (onnxruntime sessions must not cross a fork)."""
    from datapipes.pose_estimator import make_pose_estimator

    make_pose_estimator(name, model_path, detector_path)


def check_face_model(options: PackOptions) -> None:
    """Like :func:`check_pose_estimator`, for the face detector and the 68-point model."""
    if options.face_landmarks_model and not options.face_detector:
        raise ValueError("a 68-point landmark model needs a face detector for its boxes (--face-detector mtcnn)")
    if options.face_detector:
        from datapipes.facetrack import load_face_model

        load_face_model(options.face_detector, options.face_landmarks_model)


def _prepare(job: tuple[PackItem, PackOptions]) -> tuple[PackItem, dict | None, str | None]:
    item, options = job
    try:
        return item, prepare_sample(item, options), None
    except Rejected as rejected:
        return item, None, str(rejected)
    except ValueError as error:  # e.g. a key that WebDataset cannot carry
        return item, None, str(error)


def pack(items: list[PackItem], out_dir: str, options: PackOptions | None = None,
         shard_size: int = 1000, shard_bytes: float = 1e9, workers: int = 1,
         prefix: str = "shard", progress: bool = False) -> PackSummary:
    """Validate ``items`` in ``workers`` processes and write the good ones as shards to
    ``out_dir/<prefix>-%06d.tar`` (at most ``shard_size`` samples / ``shard_bytes`` bytes each);
    rejects go to ``out_dir/quarantine.jsonl``. The output order follows ``items``."""
    options = options or PackOptions()
    if options.pose_estimator:
        check_pose_estimator(options.pose_estimator, options.pose_model, options.pose_detector_model)
    check_face_model(options)
    if os.path.isdir(out_dir) and any(name.endswith(".tar") for name in os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir!r} already holds .tar shards; choose an empty directory")
    os.makedirs(out_dir, exist_ok=True)
    quarantine_path = os.path.join(out_dir, QUARANTINE)
    accepted, rejected, frames, seconds, kinds, seen = 0, 0, 0, 0.0, {}, set()
    jobs = [(item, options) for item in items]
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    results = pool.imap(_prepare, jobs, chunksize=1) if pool else map(_prepare, jobs)
    try:
        with shards.ShardSink(out_dir, prefix, shard_size, shard_bytes) as sink, \
                open(quarantine_path, "w") as quarantine:
            for item, sample, reason in tqdm(results, total=len(jobs), desc="pack", unit="clip",
                                             disable=not progress):
                if sample is not None and sample["__key__"] in seen:
                    sample, reason = None, f"duplicate key {sample['__key__']!r}"
                if sample is None:
                    rejected += 1
                    quarantine.write(json.dumps({"input": asdict(item), "reason": reason}) + "\n")
                    continue
                seen.add(sample["__key__"])
                sink.write(sample)
                meta = json.loads(sample[shards.META])
                accepted += 1
                frames += meta["num_frames"]
                seconds += meta["num_frames"] / meta["fps"] if meta["fps"] else 0.0
                kinds[meta["kind"]] = kinds.get(meta["kind"], 0) + 1
    finally:
        if pool:
            pool.close()
            pool.join()
    summary = PackSummary(accepted, rejected, sink.urls, quarantine_path, frames, seconds, kinds)
    with open(os.path.join(out_dir, SUMMARY), "w") as handle:
        json.dump(asdict(summary), handle, indent=1)
    return summary
