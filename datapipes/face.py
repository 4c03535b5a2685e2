"""Face tracks (``<key>.face.json``) and S-Face maps.

A face track holds, per frame, the main face's box and landmarks in pixels of the source video,
or ``null`` where no face was found. Landmarks are either iBUG 68 points or the 5 points of
MTCNN (left eye, right eye, nose, left mouth corner, right mouth corner): both give what the
S-Face maps need, the face box side and the eye and mouth centres.

S-Face map (6 channels, [0, 1]): channels 0-2 are the frame zeroed outside an enlarged face
box, channels 3-5 the frame zeroed except square patches around both eyes and the mouth.
The enlargement (left/right 1.35, up 1.25, down 1.45, as multiples of half the landmark box side
L around its centre) and the patch sizes are our reading of X-Dyna's preprocessing [inferred];
they are parameters of :class:`SFaceGeometry`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch at call time: the sample schema (datapipes.schema) and the config checks import this module
    import torch

FORMATS = {"ibug68": 68, "mtcnn5": 5}
TRACK_FORMAT = "xdyna-face-v1"


@dataclass(frozen=True)
class FaceFrame:
    """One frame's face: ``box`` (x0, y0, x1, y1) and ``points`` float (N, 2), in pixels."""
    box: tuple[float, float, float, float]
    points: np.ndarray
    score: float = 1.0

    @property
    def landmark_format(self) -> str:
        return "ibug68" if len(self.points) == 68 else "mtcnn5"

    def eye_and_mouth_centres(self) -> np.ndarray:
        """float (3, 2): left eye, right eye, mouth centre (image left/right)."""
        p = self.points
        if len(p) == 68:
            centres = [p[36:42].mean(0), p[42:48].mean(0), p[48:68].mean(0)]
        else:
            centres = [p[0], p[1], p[3:5].mean(0)]
        return np.asarray(centres, dtype=np.float64)

    def landmark_box(self) -> tuple[float, float, float, float]:
        """The box of the 68 landmarks; for 5-point tracks the detector's box stands in."""
        if len(self.points) == 68:
            x0, y0 = self.points.min(0)
            x1, y1 = self.points.max(0)
            return float(x0), float(y0), float(x1), float(y1)
        return tuple(float(v) for v in self.box)

    def transformed(self, scale_x: float, scale_y: float, shift_x: float, shift_y: float) -> "FaceFrame":
        """The same face after ``x' = x * scale_x + shift_x`` (and y): resize and crop."""
        x0, y0, x1, y1 = self.box
        points = self.points * [scale_x, scale_y] + [shift_x, shift_y]
        box = (x0 * scale_x + shift_x, y0 * scale_y + shift_y, x1 * scale_x + shift_x, y1 * scale_y + shift_y)
        return FaceFrame(box, points, self.score)


@dataclass(frozen=True)
class SFaceGeometry:
    left_right: float = 1.35
    up: float = 1.25
    down: float = 1.45
    eye_patch: float = 0.35   # square side, as a fraction of L
    mouth_patch: float = 0.5

    def global_box(self, face: FaceFrame) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = face.landmark_box()
        side = max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        half = side / 2
        return (cx - self.left_right * half, cy - self.up * half,
                cx + self.left_right * half, cy + self.down * half)

    def local_boxes(self, face: FaceFrame) -> list[tuple[float, float, float, float]]:
        x0, y0, x1, y1 = face.landmark_box()
        side = max(x1 - x0, y1 - y0)
        boxes = []
        for (cx, cy), fraction in zip(face.eye_and_mouth_centres(),
                                      (self.eye_patch, self.eye_patch, self.mouth_patch)):
            half = fraction * side / 2
            boxes.append((cx - half, cy - half, cx + half, cy + half))
        return boxes


def face_track_to_json(faces: list[FaceFrame | None], height: int, width: int,
                       detector: str) -> dict:
    """The ``<key>.face.json`` member for a track of ``len(faces)`` frames."""
    formats = {face.landmark_format for face in faces if face is not None}
    if len(formats) > 1:
        raise ValueError(f"a face track mixes landmark formats {sorted(formats)}")
    frames = [None if face is None else {
        "box": [round(float(v), 2) for v in face.box],
        "points": np.round(np.asarray(face.points, dtype=np.float64), 2).tolist(),
        "score": round(float(face.score), 4)} for face in faces]
    return {"format": TRACK_FORMAT, "landmarks": formats.pop() if formats else None,
            "detector": detector, "height": int(height), "width": int(width), "frames": frames}


def face_track_from_json(document, name: str = "<face.json>") -> list[FaceFrame | None]:
    """Per-frame faces from a ``face.json`` member (bytes or parsed); a
    :class:`~datapipes.schema.SchemaError` (a ``ValueError``) naming ``name`` and the field if it
    does not match the schema (:func:`datapipes.schema.face_track`, which needs ``height``/``width``)."""
    from datapipes.schema import face_track  # the schema builds FaceFrames: imported late

    return face_track(document, name).faces


def _box_mask(boxes, height: int, width: int) -> torch.Tensor:
    import torch

    mask = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        left, top = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        right, bottom = min(width, int(np.ceil(x1))), min(height, int(np.ceil(y1)))
        if right > left and bottom > top:
            mask[top:bottom, left:right] = True
    return mask


def s_face_maps(frames: torch.Tensor, faces: list[FaceFrame | None],
                geometry: SFaceGeometry = SFaceGeometry()) -> torch.Tensor:
    """S-Face maps ``float32 (F, 6, H, W)`` in [0, 1] from frames ``(F, 3, H, W)`` in [0, 1] and
    one face (in the frames' pixel coordinates) or ``None`` per frame; no face -> exact zeros."""
    import torch

    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"s_face_maps wants frames (F, 3, H, W), got {tuple(frames.shape)}")
    if len(faces) != frames.shape[0]:
        raise ValueError(f"s_face_maps got {len(faces)} faces for {frames.shape[0]} frames")
    count, _, height, width = frames.shape
    maps = torch.zeros(count, 6, height, width, dtype=torch.float32)
    for index, face in enumerate(faces):
        if face is None:
            continue
        frame = frames[index].float()
        maps[index, :3] = frame * _box_mask([geometry.global_box(face)], height, width)
        maps[index, 3:] = frame * _box_mask(geometry.local_boxes(face), height, width)
    return maps
