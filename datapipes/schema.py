"""The one schema of every JSON document the data pipeline reads: a sample's metadata
(``<key>.json``), its keypoints (``<key>.pose.json``), its face track (``<key>.face.json``) and
one line of a ``pack`` manifest.

Each document has one validating function that returns the parsed object or raises one
:class:`SchemaError` naming where (the sample key and member, or the manifest and line), the field
(``frames[3].box``) and what is wrong. ``pack`` (before writing), ``inspect`` and the loader all
call these functions, so a document one accepts the others accept too. The functions take the
member's bytes or an already parsed value; nothing else may raise out of them, whatever the input.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from datapipes.face import FORMATS, TRACK_FORMAT, FaceFrame
from datapipes.pose import BODY_POINTS, HAND_POINTS

KINDS = ("human", "scene")
META_REQUIRED = ("fps", "num_frames", "height", "width", "kind", "source", "license")
MANIFEST_PATHS = ("video", "pose_video", "keypoints", "face")
MANIFEST_FIELDS = ("video", "kind", "pose_video", "keypoints", "face", "key", "source", "license")


class SchemaError(ValueError):
    """A document that does not match its schema. ``where``: the sample member
    (``clip7.face.json``) or manifest line (``list.jsonl:3``); ``field``: the field path or ``""``
    for the whole document."""

    def __init__(self, where: str, field: str, problem: str):
        super().__init__(f"{where}: {field + ': ' if field else ''}{problem}")
        self.where, self.field, self.problem = where, field, problem


def _describe(value: Any) -> str:
    """A short, one-line rendering of a wrong value for error messages."""
    try:
        text = json.dumps(value) if isinstance(value, (dict, list, str)) else repr(value)
    except (ValueError, RecursionError):
        text = "..."
    return f"{type(value).__name__} {text[:60].strip()}"


def load_json(data: Any, where: str) -> Any:
    """``data`` (bytes or str) parsed as strict JSON (no NaN/Infinity, UTF-8); a value that is
    not bytes or str is taken as already parsed."""
    if not isinstance(data, (bytes, bytearray, memoryview, str)):
        return data
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError as error:
        raise SchemaError(where, "", f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    except RecursionError:
        raise SchemaError(where, "", "not JSON (nested too deeply)") from None
    except ValueError as error:  # JSONDecodeError, and ints too long to convert
        raise SchemaError(where, "", f"not JSON ({str(error).splitlines()[0][:200]})") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


class _Fields:
    """Typed reads of one JSON object's fields, each failure a :class:`SchemaError`."""

    def __init__(self, value: Any, where: str, what: str, prefix: str = ""):
        if not isinstance(value, dict):
            raise SchemaError(where, prefix, f"{what} must be a JSON object, got {_describe(value)}")
        self.value, self.where, self.prefix = value, where, prefix

    def path(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> SchemaError:
        return SchemaError(self.where, self.path(name), problem)

    def get(self, name: str, default: Any = None, required: bool = False) -> Any:
        if name not in self.value:
            if required:
                raise self.error(name, "missing")
            return default
        return self.value[name]

    def integer(self, name: str, minimum: int = 1) -> int:
        value = self.get(name, required=True)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"must be an integer, got {_describe(value)}")
        if value < minimum:
            raise self.error(name, f"must be >= {minimum}, got {value}")
        return value

    def number(self, name: str, positive: bool = True, required: bool = True, default: float = 0.0) -> float:
        value = self.get(name, default, required)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(name, f"must be a finite number, got {_describe(value)}")
        if positive and not value > 0:
            raise self.error(name, f"must be > 0, got {value}")
        return float(value)

    def string(self, name: str, required: bool = True, default: str | None = None,
               choices: tuple[str, ...] | None = None, nullable: bool = False) -> str | None:
        value = self.get(name, default, required)
        if value is None and (nullable or not required):
            return None
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {_describe(value)}")
        if choices is not None and value not in choices:
            raise self.error(name, f"{value!r} is not one of {choices}")
        return value

    def array(self, name: str, ndim: int) -> np.ndarray:
        """The field as a finite float array of ``ndim`` dimensions (ragged lists, strings,
        objects and nulls inside are errors)."""
        field, value = self.path(name), self.get(name, required=True)
        try:
            # No dtype: strings, nulls, objects or huge ints inside give a non-numeric dtype
            # instead of being converted.
            array = np.asarray(value)
        except (TypeError, ValueError, RecursionError):  # ragged lists
            array = None
        if array is None or array.dtype.kind not in "iuf" or array.ndim != ndim:
            raise SchemaError(self.where, field, f"must be {ndim}-dimensional lists of numbers, "
                                                 f"got {_describe(value)}")
        array = array.astype(np.float64)
        if not np.isfinite(array).all():
            raise SchemaError(self.where, field, "holds a non-finite number")
        return array


def _frame_count(fields: _Fields, name: str, count: int, num_frames: int | None) -> None:
    if num_frames is not None and count != num_frames:
        raise fields.error(name, f"has {count} entries, want one per video frame ({num_frames})")


# ----------------------------------------------------------------------------- <key>.json


def sample_meta(data: Any, key: str) -> dict:
    """The validated ``<key>.json`` metadata (``None`` = member missing): ``fps`` > 0,
    ``num_frames``, ``height``, ``width`` >= 1, ``kind`` in :data:`KINDS`, ``source`` and
    ``license`` strings; other fields are kept as they are."""
    where = f"{key}.json"
    if data is None:
        raise SchemaError(where, "", "missing (every sample needs its metadata)")
    fields = _Fields(load_json(data, where), where, "metadata")
    meta = dict(fields.value)
    meta.update(fps=fields.number("fps"), num_frames=fields.integer("num_frames"),
                height=fields.integer("height"), width=fields.integer("width"),
                kind=fields.string("kind", choices=KINDS), source=fields.string("source"),
                license=fields.string("license"))
    return meta


# ----------------------------------------------------------------------------- <key>.pose.json


@dataclass(frozen=True)
class PoseKeypoints:
    """A validated ``pose.json``: ``keypoints`` float (T, 18 or 60, 3) ``(x, y, confidence)`` in
    pixels of a ``height x width`` frame."""
    keypoints: np.ndarray
    height: int
    width: int


def pose_keypoints(data: Any, where: str, num_frames: int | None = None) -> PoseKeypoints:
    """The validated ``pose.json`` member ``where`` (e.g. ``clip7.pose.json``); with
    ``num_frames``, one row per video frame is required."""
    fields = _Fields(load_json(data, where), where, "pose keypoints")
    height, width = fields.integer("height"), fields.integer("width")
    keypoints = fields.array("keypoints", ndim=3)
    if keypoints.shape[2] != 3 or keypoints.shape[1] not in (BODY_POINTS, BODY_POINTS + 2 * HAND_POINTS):
        raise fields.error("keypoints", f"must be (frames, 18 or 60, 3), got {keypoints.shape}")
    _frame_count(fields, "keypoints", len(keypoints), num_frames)
    return PoseKeypoints(keypoints, height, width)


# ----------------------------------------------------------------------------- <key>.face.json


@dataclass(frozen=True)
class FaceTrack:
    """A validated ``face.json``: one :class:`~datapipes.face.FaceFrame` or ``None`` per video
    frame, in pixels of a ``height x width`` frame."""
    faces: list
    height: int
    width: int
    landmarks: str | None


def face_track(data: Any, where: str, num_frames: int | None = None) -> FaceTrack:
    """The validated ``face.json`` member ``where`` (e.g. ``clip7.face.json``); with
    ``num_frames``, one entry per video frame is required."""
    fields = _Fields(load_json(data, where), where, "face track")
    fields.string("format", choices=(TRACK_FORMAT,))
    height, width = fields.integer("height"), fields.integer("width")
    landmarks = fields.string("landmarks", required=False, choices=tuple(FORMATS))
    frames = fields.get("frames", required=True)
    if not isinstance(frames, list):
        raise fields.error("frames", f"must be a list (one entry per frame), got {_describe(frames)}")
    faces: list[FaceFrame | None] = []
    # One landmark format per track: the declared one, else the first face's.
    points_count, declared_by = FORMATS.get(landmarks), f"landmarks {landmarks!r}"
    for index, entry in enumerate(frames):
        if entry is None:
            faces.append(None)
            continue
        face = _Fields(entry, where, "a frame's face (or null)", f"frames[{index}]")
        points = face.array("points", ndim=2)
        if points.shape[1:] != (2,) or len(points) not in FORMATS.values():
            raise face.error("points", f"must be (68, 2) or (5, 2), got {points.shape}")
        if points_count is None:
            points_count, declared_by = len(points), f"frames[{index}]"
        elif len(points) != points_count:
            raise face.error("points", f"has {len(points)} points, {declared_by} has {points_count}")
        box = face.array("box", ndim=1)
        if box.shape != (4,):
            raise face.error("box", f"must be [x0, y0, x1, y1], got {box.tolist()}")
        score = face.number("score", positive=False, required=False, default=1.0)
        faces.append(FaceFrame(tuple(float(v) for v in box), points, score))
    _frame_count(fields, "frames", len(faces), num_frames)
    return FaceTrack(faces, height, width, landmarks)


# ----------------------------------------------------------------------------- manifest lines


def manifest_entry(line: Any, where: str) -> dict | None:
    """One line of a ``pack`` manifest (``where`` = ``list.jsonl:3``) as a dict of the fields it
    sets, or ``None`` for a blank line: ``video`` (a non-empty string, required), ``kind``
    (:data:`KINDS`), ``pose_video``, ``keypoints``, ``face``, ``key``, ``source`` (strings or
    null), ``license`` (a string). Unknown fields are an error."""
    if isinstance(line, (bytes, bytearray)) and not bytes(line).strip():
        return None
    if isinstance(line, str) and not line.strip():
        return None
    fields = _Fields(load_json(line, where), where, "a manifest line")
    unknown = sorted(set(fields.value) - set(MANIFEST_FIELDS))
    if unknown:
        raise SchemaError(where, "", f"unknown fields {unknown}; known: {list(MANIFEST_FIELDS)}")
    entry = {"video": fields.string("video")}
    if "kind" in fields.value:
        entry["kind"] = fields.string("kind", choices=KINDS)
    if "license" in fields.value:
        entry["license"] = fields.string("license")
    for name in ("pose_video", "keypoints", "face", "key", "source"):
        if name in fields.value:
            entry[name] = fields.string(name, nullable=True)
    for name in MANIFEST_PATHS:
        if name == "video" and not entry["video"]:
            raise fields.error(name, "must not be empty")
        if "\0" in (entry.get(name) or ""):
            raise fields.error(name, "holds a NUL character (no file can have that name)")
    return entry
