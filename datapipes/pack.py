"""``xdyna-data pack``: source videos (+ pose videos or keypoints, + face tracks) -> shards.

Inputs come from a folder or a JSONL manifest. Every input ends in exactly one of two places:
a shard, or ``quarantine.jsonl`` in the output directory with its reason; the summary counts
both (and warns about valid but suspicious clips). Inputs are validated in worker processes
started fresh (``forkserver``/``spawn``, never ``fork``: torch or decoder state of the caller
must not be inherited), one input at a time, so a worker that crashes or hangs costs that input
only. Shards are written under a temporary name and renamed when complete; Ctrl-C or SIGTERM
stops every worker and publishes no partial shard. Source files are only ever read, never
moved, changed or deleted, and a rejected file is never read whole.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import signal
import stat
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait

from tqdm import tqdm

from datapipes import schema, shards
from datapipes.atomic import publish, temporary_sibling
from datapipes.validate import NO_FACE, NO_PERSON, Rejected, Rules, content_warnings, validate_members

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
# Companion files found beside X.<video suffix>, by role (a pose video is X.pose.<video suffix>).
COMPANION_SUFFIXES = {"keypoints": ".pose.json", "face": ".face.json"}
QUARANTINE = "quarantine.jsonl"
SUMMARY = "pack_summary.json"
START_METHODS = ("spawn", "forkserver")
# First bytes of the containers in VIDEO_SUFFIXES: ISO BMFF (mp4, mov, m4v) starts with a box
# whose type is one of these at byte 4; Matroska/WebM with the EBML magic; AVI is RIFF .. AVI.
ISO_BOX_TYPES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"styp",
                 b"sidx", b"moof", b"prfl", b"junk"}
EBML_MAGIC = b"\x1a\x45\xdf\xa3"


@dataclass
class PackItem:
    """One input clip: the video and its optional companions (paths), kind and provenance.
    ``problem``: a reason found while listing inputs (e.g. a companion without its video); such
    an item is quarantined with it."""
    video: str
    kind: str = "human"
    pose_video: str | None = None
    keypoints: str | None = None
    face: str | None = None
    key: str | None = None
    source: str | None = None
    license: str = "unknown"
    problem: str | None = None


@dataclass
class PackOptions:
    rules: Rules = field(default_factory=Rules)
    face_detector: str | None = None   # "mtcnn" or "package.module:factory": face tracks where none is given ...
    face_landmarks_model: str | None = None  # ... with 68 points from this local .onnx (else MTCNN's 5)
    require_pose: bool = True          # human clips need a pose video or keypoints
    pose_estimator: str | None = None  # "dwpose": estimate keypoints where no pose is given ...
    pose_model: str | None = None      # ... with this local model file
    pose_detector_model: str | None = None  # ... and person boxes from this local YOLOX file
    max_video_bytes: int = 4 << 30     # larger source videos are rejected before being read
    max_json_bytes: int = 256 << 20    # larger keypoint / face-track files likewise
    item_timeout: float | None = 3600.0  # seconds one input may take in a worker (None: no limit)
    device: str = "cpu"                # "cuda": pose (onnxruntime-gpu) and face (MTCNN) models on the GPU


@dataclass
class PackSummary:
    accepted: int
    rejected: int
    urls: list[str]
    quarantine: str
    frames: int
    seconds: float
    kinds: dict
    warnings: dict = field(default_factory=dict)  # category -> keys of packed clips

    def __str__(self) -> str:
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self.kinds.items())) or "none"
        text = (f"packed {self.accepted} clip(s) ({kinds}; {self.frames} frames, {self.seconds / 60:.1f} min) "
                f"into {len(self.urls)} shard(s): {shards.brace_pattern(self.urls) if self.urls else '-'}")
        for category, keys in sorted(self.warnings.items()):
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            text += f"\nwarning: {len(keys)} packed clip(s) with {category} detected: {shown} (all in {SUMMARY})"
        if self.rejected:
            text += f"\nrejected {self.rejected} input(s): reasons in {self.quarantine}"
        return text


class PackInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a pack; every worker was stopped and no partial shard published."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def key_from_path(path: str, root: str | None = None) -> str:
    """A WebDataset-safe key from a path: relative to ``root``, extension dropped, other dots
    and odd characters replaced with ``_``."""
    relative = os.path.relpath(path, root) if root else os.path.basename(path)
    stem = os.path.splitext(relative)[0].replace(os.sep, "/")
    return re.sub(r"[^A-Za-z0-9_\-/]", "_", stem).strip("/") or "clip"


def _role(name: str) -> tuple[str, str]:
    """``(base, role)`` of a file name: ``X.mp4`` -> ``(X, video)``, ``X.pose.mp4`` ->
    ``(X, pose_video)``, ``X.pose.json`` -> ``(X, keypoints)``, ``X.face.json`` -> ``(X, face)``;
    anything else ``(name, other)``. Only a trailing ``.pose.<suffix>`` makes a pose video:
    ``warm.pose.up.mp4`` is a video of its own."""
    lower = name.lower()
    for role, suffix in COMPANION_SUFFIXES.items():
        if lower.endswith(suffix):
            return name[:-len(suffix)], role
    for suffix in VIDEO_SUFFIXES:
        if lower.endswith(suffix):
            stem = name[:-len(suffix)]
            return (stem[:-len(".pose")], "pose_video") if stem.lower().endswith(".pose") else (stem, "video")
    return name, "other"


def items_from_folder(folder: str, kind: str = "human", license: str = "unknown") -> list[PackItem]:
    """Every file under ``folder`` (recursively) as an input: each video with the companions
    found beside it by name (``X.pose.mp4`` skeleton video, ``X.pose.json`` keypoints,
    ``X.face.json`` face track). A file that is neither a video nor a companion of one becomes
    an item with a ``problem`` (quarantined with that reason): nothing is dropped silently."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"input folder {folder!r} does not exist")
    items, videos = [], 0
    for directory, subdirectories, names in os.walk(folder):
        subdirectories.sort()
        groups: dict[str, dict[str, list[str]]] = {}
        for name in sorted(names):
            base, role = _role(name)
            groups.setdefault(base, {}).setdefault(role, []).append(os.path.join(directory, name))
        for base, roles in sorted(groups.items()):
            companions = {role: paths[0] for role, paths in roles.items() if role not in ("video", "other")}
            for path in roles.get("video", []):
                videos += 1
                items.append(PackItem(video=path, kind=kind, **companions, key=key_from_path(path, folder),
                                      source=path, license=license))
            for role, paths in roles.items():
                what = role.replace("_", " ")
                if role == "video":  # x.mp4 beside x.mov: both are inputs, the second a duplicate key
                    continue
                if role == "other":
                    problem, unused = (f"not a video ({', '.join(VIDEO_SUFFIXES)}) nor a companion of one "
                                       f"(X.pose.mp4, X.pose.json, X.face.json)"), paths
                elif "video" not in roles:
                    problem, unused = (f"a {what} companion of {base!r}, but no video {base}.mp4 "
                                       f"(or {', '.join(VIDEO_SUFFIXES[1:])}) is beside it"), paths
                else:
                    problem, unused = f"a second {what} for {base!r} beside {os.path.basename(paths[0])!r}", paths[1:]
                for path in unused:
                    items.append(PackItem(video=path, kind=kind, source=path, license=license, problem=problem))
    if not videos:
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


def _check_source(path: str, what: str, max_bytes: int) -> None:
    """Reject a source that is missing, not a regular file (a directory or a FIFO, whose open
    would block), empty, larger than ``max_bytes`` or unreadable, from its metadata alone."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise Rejected(f"{what} {path!r} does not exist") from None
    except OSError as error:
        raise Rejected(f"{what} {path!r} cannot be read: {error.strerror or error}") from None
    if stat.S_ISDIR(info.st_mode):
        raise Rejected(f"{what} {path!r} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise Rejected(f"{what} {path!r} is not a regular file (a FIFO, socket or device)")
    if info.st_size == 0:
        raise Rejected(f"{what} {path!r} is empty (zero bytes)")
    if info.st_size > max_bytes:
        raise Rejected(f"{what} {path!r} has {info.st_size / 2**20:.0f} MiB, more than the limit of "
                       f"{max_bytes / 2**20:.0f} MiB (--max-video-mib / --max-json-mib)")
    if not os.access(path, os.R_OK):
        raise Rejected(f"{what} {path!r} is not readable (permission denied)")


def _read(path: str, what: str, max_bytes: int, length: int | None = None) -> bytes:
    """The bytes of a checked source (its first ``length`` bytes with ``length``)."""
    _check_source(path, what, max_bytes)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1 if length is None else length)
    except OSError as error:
        raise Rejected(f"{what} {path!r} cannot be read: {error.strerror or error}") from None
    if len(data) > max_bytes:
        raise Rejected(f"{what} {path!r} grew beyond {max_bytes / 2**20:.0f} MiB while being read")
    return data


def _check_container(path: str, what: str, max_bytes: int) -> None:
    """Reject a video file whose first bytes are no container ``pack`` accepts, before any
    decoder sees it (a sparse or text file is rejected after reading 12 bytes)."""
    head = _read(path, what, max_bytes, length=12)
    if head[4:8] in ISO_BOX_TYPES or head[:4] == EBML_MAGIC or (head[:4] == b"RIFF" and head[8:12] == b"AVI "):
        return
    raise Rejected(f"cannot decode {what} {path!r}: not an mp4/mov, mkv/webm or avi container "
                   f"(first bytes {head[:8].hex(' ')})")


_plugin_face_models: dict = {}


def _face_model(options: PackOptions):
    """The face detector named by the options, built once per process: ``"mtcnn"`` (through
    :func:`datapipes.facetrack.cached_face_model`) or a ``"package.module:factory"`` plugin
    returning a :class:`~datapipes.facetrack.LandmarkModel`."""
    name = options.face_detector
    if ":" not in name:
        from datapipes.facetrack import cached_face_model

        return cached_face_model(name, options.face_landmarks_model, options.device)
    if name not in _plugin_face_models:
        from datapipes.plugins import import_object

        _plugin_face_models[name] = import_object(name, "--face-detector")()
    return _plugin_face_models[name]


def _dumps(document) -> bytes:
    # allow_nan=False: NaN/Infinity are not JSON, and a shard must hold only valid JSON.
    return json.dumps(document, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def prepare_sample(item: PackItem, options: PackOptions, warnings: list | None = None) -> dict:
    """Check, validate and assemble one shard sample; raises :class:`Rejected` with the reason.
    Videos are decoded from their files in place and read whole only once accepted. With
    ``warnings``, ``(category, message)`` pairs for a valid but suspicious clip are appended."""
    if item.problem:
        raise Rejected(item.problem)
    if item.kind not in shards.KINDS:
        raise Rejected(f"kind {item.kind!r} is not one of {shards.KINDS}")
    key = shards.check_key(item.key or key_from_path(item.video))
    notes = warnings if warnings is not None else []
    _check_container(item.video, "video", options.max_video_bytes)
    members: dict = {shards.VIDEO: item.video}
    for attribute, member, what in (("pose_video", shards.POSE_VIDEO, "pose video"),
                                    ("keypoints", shards.POSE_KEYPOINTS, "keypoints"),
                                    ("face", shards.FACE, "face track")):
        path = getattr(item, attribute)
        if path and item.kind == "human":
            if member == shards.POSE_VIDEO:
                _check_container(path, what, options.max_video_bytes)
                members[member] = path
            else:
                members[member] = _read(path, what, options.max_json_bytes)
    needs_pose = (item.kind == "human" and shards.POSE_VIDEO not in members
                  and shards.POSE_KEYPOINTS not in members)
    if needs_pose and options.require_pose and not options.pose_estimator:
        raise Rejected(f"{key}: human clip has no pose video or keypoints")
    facts = validate_members(key, members, options.rules, notes)
    if needs_pose and options.pose_estimator:
        from datapipes.pose import keypoints_to_json
        from datapipes.pose_estimator import estimate_keypoints, load_pose_estimator

        estimator = load_pose_estimator(options.pose_estimator, options.pose_model, options.pose_detector_model,
                                        options.device)
        keypoints = _model_step("pose estimation", key, estimate_keypoints, item.video, key, estimator)
        document = keypoints_to_json(keypoints, facts["height"], facts["width"])
        members[shards.POSE_KEYPOINTS] = _dumps(dict(document, estimator=estimator.name))
        notes.extend(content_warnings(key, shards.POSE_KEYPOINTS, keypoints))
    if item.kind == "human" and shards.FACE not in members and options.face_detector:
        from datapipes.face import face_track_from_json
        from datapipes.facetrack import detect_face_track

        track = _model_step("face detection", key, detect_face_track, item.video, key,
                            detector=_face_model(options))
        members[shards.FACE] = _dumps(track)
        notes.extend(content_warnings(key, shards.FACE, face_track_from_json(track, f"{key}.{shards.FACE}")))
    for member, what in ((shards.VIDEO, "video"), (shards.POSE_VIDEO, "pose video")):
        if member in members:  # accepted: now (and only now) read whole
            members[member] = _read(members[member], what, options.max_video_bytes)
    meta = schema.sample_meta(dict(facts, kind=item.kind, source=item.source or item.video,
                                   license=item.license), key)  # the loader's rule, checked before writing
    return {"__key__": key, **members, shards.META: _dumps(meta)}


def _model_step(what: str, key: str, function, *args, **kwargs):
    """Run a pose estimator or face detector over a validated clip: a decoder error at a frame
    the validation did not decode, or a model failing on the clip, rejects that clip only."""
    try:
        return function(*args, **kwargs)
    except Exception as error:  # decord's DECORDError, onnxruntime's and plugins' own errors
        raise Rejected(f"{key}: {what} failed: {type(error).__name__}: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def check_pose_estimator(name: str, model_path: str | None, detector_path: str | None = None,
                         device: str = "cpu") -> None:
    """Fail before any clip is read when the estimator cannot be built (unknown name, missing
    model file or onnxruntime, unreadable model). The session is dropped again: the workers
    build their own (and are never forked from this process, so nothing built here reaches them)."""
    from datapipes.pose_estimator import make_pose_estimator

    make_pose_estimator(name, model_path, detector_path, device)


def check_face_model(options: PackOptions) -> None:
    """Like :func:`check_pose_estimator`, for the face detector and the 68-point model."""
    if options.face_landmarks_model and not options.face_detector:
        raise ValueError("a 68-point landmark model needs a face detector for its boxes (--face-detector mtcnn)")
    if options.face_detector and ":" in options.face_detector:
        if options.face_landmarks_model:
            raise ValueError(f"--face-landmarks-model runs on MTCNN's faces; it does not combine with the "
                             f"plugin detector {options.face_detector!r}")
        from datapipes.plugins import import_object

        if not callable(import_object(options.face_detector, "--face-detector")):
            raise ValueError(f"--face-detector {options.face_detector!r} must name a factory (a callable)")
    elif options.face_detector:
        from datapipes.facetrack import load_face_model

        load_face_model(options.face_detector, options.face_landmarks_model, options.device)


def _prepare(item: PackItem, options: PackOptions) -> tuple[PackItem, dict | None, str | None, list]:
    """``(item, sample, None, warnings)`` or ``(item, None, reason, warnings)``: whatever goes
    wrong with one input rejects that input, never the run."""
    warnings: list = []
    try:
        return item, prepare_sample(item, options, warnings), None, warnings
    except ValueError as error:  # Rejected, a schema error, a key WebDataset cannot carry
        return item, None, str(error), warnings
    except Exception as error:  # an untyped library error on odd input costs this input only
        return item, None, f"unexpected {type(error).__name__} while packing it: {_first_line(error)}", warnings


# ----------------------------------------------------------------------------- worker processes


def _failed(item: PackItem, reason: str) -> tuple:
    """The result of an input whose worker died or overran its time: rejected with ``reason``."""
    return item, None, reason, []


def _worker_main(connection, options, threads: int, task=_prepare) -> None:
    """A pack worker: announces itself, then runs ``task(item, options)`` on one input per message
    until ``None`` (``_prepare``; ``datapipes.curate`` runs its cutting this way too)."""
    # Ctrl-C reaches the whole process group: the parent decides, then stops its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    import torch  # already imported by datapipes.face; one thread each, the parallelism is the workers

    torch.set_num_threads(threads)
    connection.send(("ready", os.getpid()))
    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        index, item = job
        connection.send((index, task(item, options)))


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when its parent dies, even of SIGKILL (no orphan keeps running)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


@dataclass
class _Slot:
    process: object
    connection: object
    ready: bool = False
    job: int | None = None
    started: float = 0.0


class _WorkerPool:
    """``count`` worker processes, one input at a time each, results yielded in input order.

    Unlike ``multiprocessing.Pool`` it knows which input each worker holds: a worker that dies
    (a native crash in a decoder) or overruns ``item_timeout`` rejects that input and is
    replaced, instead of hanging the run. At most ``4 * count`` results wait for their turn.
    ``task(item, options)`` (module level: it is pickled to the workers) makes a result,
    ``failure(item, reason)`` the result of an input whose worker died or overran ``timeout``."""

    def __init__(self, count: int, options, start_method: str, task=_prepare, failure=_failed,
                 timeout: float | None = None):
        if start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {START_METHODS} (fork would hand the caller's "
                             f"torch and decoder state to the workers), got {start_method!r}")
        self.context = multiprocessing.get_context(start_method)
        self.options, self.count, self.task, self.failure = options, count, task, failure
        self.timeout = options.item_timeout if timeout is None and isinstance(options, PackOptions) else timeout
        self.threads = max(1, (os.cpu_count() or 1) // count)
        self.slots: list[_Slot] = []
        for _ in range(count):
            self._start()

    def _start(self) -> None:
        parent, child = self.context.Pipe(duplex=True)
        process = self.context.Process(target=_worker_main, args=(child, self.options, self.threads, self.task),
                                       name="xdyna-pack-worker", daemon=True)
        process.start()
        child.close()
        self.slots.append(_Slot(process, parent))

    def _replace(self, slot: _Slot, needed: bool) -> None:
        self._stop(slot, force=True)
        self.slots.remove(slot)
        if needed:
            self._start()

    @staticmethod
    def _stop(slot: _Slot, force: bool) -> None:
        if not force:
            try:
                slot.connection.send(None)
            except OSError:
                force = True
            slot.process.join(timeout=10)
        if slot.process.is_alive():
            slot.process.terminate()
            slot.process.join(timeout=5)
        if slot.process.is_alive():
            slot.process.kill()
            slot.process.join()
        slot.connection.close()

    def close(self, force: bool) -> None:
        """Stop every worker: politely after a finished run, at once (SIGTERM, then SIGKILL) else."""
        for slot in self.slots:
            self._stop(slot, force=force or slot.job is not None)
        self.slots = []

    def results(self, items: list[PackItem]):
        done: dict[int, tuple] = {}
        next_out = next_in = 0
        window = 4 * self.count
        while next_out < len(items):
            if next_out in done:
                yield done.pop(next_out)
                next_out += 1
                continue
            for slot in self.slots:
                if slot.ready and slot.job is None and next_in < min(len(items), next_out + window):
                    slot.job, slot.started = next_in, time.monotonic()
                    next_in += 1
                    try:
                        slot.connection.send((slot.job, items[slot.job]))
                    except OSError:
                        pass  # it died: its sentinel says so below
            timeout = self.timeout
            busy = [slot.started + timeout - time.monotonic() for slot in self.slots if slot.job is not None]
            ready = wait([s.connection for s in self.slots] + [s.process.sentinel for s in self.slots],
                         timeout=max(0.0, min(busy)) if timeout and busy else None)
            for slot in list(self.slots):
                message = None
                if slot.connection in ready:
                    try:
                        message = slot.connection.recv()
                    except (EOFError, OSError):
                        message = None
                if message is not None and message[0] == "ready":
                    slot.ready = True
                elif message is not None:
                    done[message[0]], slot.job = message[1], None
                elif slot.process.sentinel in ready or slot.connection in ready:
                    slot.process.join(timeout=5)
                    if not slot.ready:  # it never started: replacing it would fail the same way
                        raise RuntimeError(f"a pack worker process stopped before its first input "
                                           f"({_exit_text(slot.process.exitcode)})")
                    if slot.job is not None:
                        done[slot.job] = self.failure(items[slot.job], f"the worker process died while "
                                                      f"packing it ({_exit_text(slot.process.exitcode)}): a crash "
                                                      f"in a decoder or model")
                        slot.job = None
                    self._replace(slot, needed=next_in < len(items))
                elif timeout and slot.job is not None and time.monotonic() - slot.started > timeout:
                    done[slot.job] = self.failure(items[slot.job], f"took longer than {timeout:g} s "
                                                  f"(--item-timeout); its worker was stopped")
                    slot.job = None
                    self._replace(slot, needed=next_in < len(items))


# ----------------------------------------------------------------------------- output


class _PublishingSink:
    """Shards of at most ``max_count`` samples / ``max_bytes`` bytes, each written under a hidden
    temporary name and renamed to ``<prefix>-%06d.tar`` only when complete (:func:`abort` removes
    the unfinished one), so no reader ever sees a partial shard under a final name."""

    def __init__(self, out_dir: str, prefix: str, max_count: int, max_bytes: float, on_shard=None):
        import webdataset

        self.on_shard = on_shard  # called with each shard's final path once it is published

        self._writer_class = webdataset.TarWriter
        self.pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
        self.max_count, self.max_bytes = max_count, max_bytes
        self.urls: list[str] = []
        self._stream = self._final = self._temporary = None
        self._count = self._bytes = 0

    def write(self, sample: dict) -> None:
        if self._stream is None or self._count >= self.max_count or self._bytes >= self.max_bytes:
            self._publish()
            self._final = self.pattern % len(self.urls)
            self._temporary = str(temporary_sibling(self._final))
            self._stream = self._writer_class(self._temporary, encoder=False)
            self._count = self._bytes = 0
        self._bytes += self._stream.write(sample)
        self._count += 1

    def _publish(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
            publish(self._temporary, self._final)
            self.urls.append(self._final)
            if self.on_shard is not None:
                self.on_shard(self._final)

    def close(self) -> list[str]:
        self._publish()
        return self.urls

    def abort(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
            os.unlink(self._temporary)


class _Progress:
    """tqdm on a terminal; else (a log file, a SLURM job) one plain line every ``every`` seconds
    and a last one at the end."""

    def __init__(self, total: int, enabled: bool, every: float, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.every, self.done, self.packed = total, every, 0, 0
        self.plain = enabled and not self.stream.isatty()
        self.bar = tqdm(total=total, desc="pack", unit="input", disable=not enabled or self.plain,
                        file=self.stream)
        self.start = self.last = time.monotonic()

    def update(self, packed: bool) -> None:
        self.done, self.packed = self.done + 1, self.packed + packed
        self.bar.update(1)
        now = time.monotonic()
        if self.plain and (now - self.last >= self.every or self.done == self.total or self.done == 1):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            print(f"pack: {self.done}/{self.total} inputs ({100 * self.done / self.total:.0f}%), "
                  f"{self.packed} packed, {self.done - self.packed} rejected; {rate:.2f} input/s, "
                  f"about {(self.total - self.done) / rate / 60:.1f} min left", file=self.stream, flush=True)

    def close(self) -> None:
        self.bar.close()


def _install_stop_handlers():
    """SIGINT and SIGTERM raise :class:`PackInterrupted` in this (main) thread, so the cleanup
    runs; returns the previous handlers (``{}`` off the main thread, where Python keeps them)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum, frame):
        raise PackInterrupted(signum)

    return {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}


def pack(items: list[PackItem], out_dir: str, options: PackOptions | None = None,
         shard_size: int = 1000, shard_bytes: float = 1e9, workers: int = 1,
         prefix: str = "shard", progress: bool = False, log_every: float = 30.0,
         start_method: str = "spawn", on_shard=None) -> PackSummary:
    """Validate ``items`` in ``workers`` processes (0: in this process, without the protection
    against crashing or hanging decoders) and write the good ones as shards to
    ``out_dir/<prefix>-%06d.tar`` (at most ``shard_size`` samples / ``shard_bytes`` bytes each);
    rejects go to ``out_dir/quarantine.jsonl``. The output order follows ``items``.
    ``progress``: a bar on a terminal, else a plain line every ``log_every`` seconds.
    Ctrl-C / SIGTERM raise :class:`PackInterrupted` after stopping the workers; shards completed
    until then stay published, the unfinished one is removed. ``on_shard(path)`` is called after
    each shard is published (:mod:`datapipes.parts` hooks its kill test there)."""
    options = options or PackOptions()
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
    # Built here only to fail early, then dropped: workers are started fresh, never forked from here.
    if options.pose_estimator:
        check_pose_estimator(options.pose_estimator, options.pose_model, options.pose_detector_model, options.device)
    check_face_model(options)
    if os.path.isdir(out_dir) and any(name.endswith(".tar") for name in os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir!r} already holds .tar shards; choose an empty directory")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # unfinished shards of a killed run (SIGKILL leaves no cleanup)
        if name.startswith(f".{prefix}-") and ".tar.partial-" in name:
            os.unlink(os.path.join(out_dir, name))
    quarantine_path = os.path.join(out_dir, QUARANTINE)
    accepted, rejected, frames, seconds, kinds, seen, warned = 0, 0, 0, 0.0, {}, set(), {}
    sink = _PublishingSink(out_dir, prefix, shard_size, shard_bytes, on_shard)
    meter = _Progress(len(items), progress, log_every)
    previous_handlers = _install_stop_handlers()
    pool, finished = None, False
    try:
        if workers > 0 and items:
            pool = _WorkerPool(min(workers, len(items)), options, start_method)
            results = pool.results(items)
        else:
            results = (_prepare(item, options) for item in items)
        with open(quarantine_path, "w") as quarantine:
            for item, sample, reason, notes in results:
                if sample is not None and sample["__key__"] in seen:
                    sample, reason = None, f"duplicate key {sample['__key__']!r}"
                meter.update(sample is not None)
                if sample is None:
                    rejected += 1
                    quarantine.write(json.dumps({"input": asdict(item), "reason": reason}, allow_nan=False) + "\n")
                    quarantine.flush()
                    continue
                seen.add(sample["__key__"])
                sink.write(sample)
                meta = json.loads(sample[shards.META])
                accepted += 1
                frames += meta["num_frames"]
                seconds += meta["num_frames"] / meta["fps"]  # fps > 0 and finite: validate checked it
                kinds[meta["kind"]] = kinds.get(meta["kind"], 0) + 1
                for category in dict(notes):
                    warned.setdefault(category, []).append(sample["__key__"])
        sink.close()
        finished = True
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if pool:
            pool.close(force=not finished)
        if not finished:
            sink.abort()
        meter.close()
    assert accepted + rejected == len(items), (accepted, rejected, len(items))
    summary = PackSummary(accepted, rejected, sink.urls, quarantine_path, frames, seconds, kinds, warned)
    with open(os.path.join(out_dir, SUMMARY), "w") as handle:
        json.dump(asdict(summary), handle, indent=1, allow_nan=False)
    return summary
