"""Skeleton rendering from keypoints in OpenPose/DWPose colours, with the head left out.

Keypoints are OpenPose-18 body points (COCO order: 0 nose, 1 neck, 2-4 right arm,
5-7 left arm, 8-10 right leg, 11-13 left leg, 14/15 eyes, 16/17 ears), optionally followed by
two 21-point hands (left then right), as ``float (K, 3)`` rows ``(x, y, confidence)`` in pixels
of the frame they were estimated on. X-Dyna conditions on the skeleton **without** head points
(``no_head=True``): the face is driven by the S-Face ControlNet instead.
"""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

BODY_POINTS = 18
HAND_POINTS = 21
HEAD_POINTS = (0, 14, 15, 16, 17)
# Limbs as (start, end) body points, in OpenPose's drawing order; the i-th limb and the i-th
# point take the i-th colour of OPENPOSE_COLORS.
BODY_LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
              (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
OPENPOSE_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
# OpenPose blends each limb at 60 % over the canvas; on a black canvas that is colour * 0.6.
LIMB_OPACITY = 0.6
# Hand bones: 5 fingers of 4 bones from the wrist (point 0); DWPose colours them along the HSV hue
# circle and draws the points in blue.
HAND_BONES = tuple((0 if j == 0 else 4 * f + j, 4 * f + j + 1) for f in range(5) for j in range(4))
HAND_POINT_COLOR = (0, 0, 255)
MIN_CONFIDENCE = 0.3


def _hand_bone_colors() -> tuple[tuple[int, int, int], ...]:
    colors = []
    for index in range(len(HAND_BONES)):
        r, g, b = colorsys.hsv_to_rgb(index / len(HAND_BONES), 1.0, 1.0)
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    return tuple(colors)


HAND_BONE_COLORS = _hand_bone_colors()


def stroke_width(height: int, width: int) -> int:
    """OpenPose draws 4 px limbs on ~512 px frames; keep that proportion at any size."""
    return max(1, round(4 * min(height, width) / 512))


def render_pose(keypoints: np.ndarray, height: int, width: int, *, no_head: bool = True,
                min_confidence: float = MIN_CONFIDENCE) -> np.ndarray:
    """One skeleton frame ``uint8 (height, width, 3)`` on black from ``(K, 3)`` keypoints
    (K = 18 body, or 18 + 42 with hands) given in pixels of a ``height x width`` frame."""
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.ndim != 2 or keypoints.shape[1] != 3 or keypoints.shape[0] not in (
            BODY_POINTS, BODY_POINTS + 2 * HAND_POINTS):
        raise ValueError(f"render_pose wants (18, 3) or (60, 3) keypoints, got {keypoints.shape}")
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    line = stroke_width(height, width)
    radius = line
    body = keypoints[:BODY_POINTS]
    visible = body[:, 2] >= min_confidence
    if no_head:
        visible[list(HEAD_POINTS)] = False
    for index, (a, b) in enumerate(BODY_LIMBS):
        if visible[a] and visible[b]:
            color = tuple(int(c * LIMB_OPACITY) for c in OPENPOSE_COLORS[index])
            draw.line([tuple(body[a, :2]), tuple(body[b, :2])], fill=color, width=2 * line)
    for index in np.flatnonzero(visible):
        x, y = body[index, :2]
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=OPENPOSE_COLORS[index])
    for hand in range(2 if keypoints.shape[0] > BODY_POINTS else 0):
        points = keypoints[BODY_POINTS + hand * HAND_POINTS: BODY_POINTS + (hand + 1) * HAND_POINTS]
        seen = points[:, 2] >= min_confidence
        for index, (a, b) in enumerate(HAND_BONES):
            if seen[a] and seen[b]:
                draw.line([tuple(points[a, :2]), tuple(points[b, :2])],
                          fill=HAND_BONE_COLORS[index], width=max(1, line // 2))
        for x, y, _ in points[seen]:
            r = max(1, radius // 2)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=HAND_POINT_COLOR)
    return np.asarray(canvas)


FACE_LANDMARK_COLOR = (255, 255, 255)  # OpenPose draws face keypoints as white dots


def draw_face_landmarks(frame: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``frame`` (uint8 H x W x 3 pose rendering) with face ``points`` (N, 2, pixels) drawn on it
    as OpenPose does (white dots): the w/lmk ablation's face signal, carried by the pose image."""
    height, width = frame.shape[:2]
    canvas = Image.fromarray(np.ascontiguousarray(frame))
    draw = ImageDraw.Draw(canvas)
    r = max(1, stroke_width(height, width) // 2)
    for x, y in np.asarray(points, dtype=np.float64):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=FACE_LANDMARK_COLOR)
    return np.asarray(canvas)


def render_pose_video(keypoints: np.ndarray, height: int, width: int, **kwargs) -> np.ndarray:
    """``uint8 (T, height, width, 3)`` from ``(T, K, 3)`` keypoints; see :func:`render_pose`."""
    keypoints = np.asarray(keypoints)
    return np.stack([render_pose(frame, height, width, **kwargs) for frame in keypoints])


def keypoints_to_json(keypoints: np.ndarray, height: int, width: int) -> dict:
    """The ``<key>.pose.json`` member: keypoints in pixels of the source video."""
    keypoints = np.asarray(keypoints, dtype=np.float64)
    return {"format": "openpose18" if keypoints.shape[1] == BODY_POINTS else "openpose18+hands",
            "height": int(height), "width": int(width),
            "keypoints": np.round(keypoints, 2).tolist()}


def keypoints_from_json(document, name: str = "<pose.json>") -> np.ndarray:
    """``float (T, K, 3)`` keypoints from a ``pose.json`` member (bytes or parsed); a
    :class:`~datapipes.schema.SchemaError` (a ``ValueError``) naming ``name`` and the field if it
    does not match the schema (:func:`datapipes.schema.pose_keypoints`)."""
    from datapipes.schema import pose_keypoints  # the schema uses this module's constants: imported late

    return pose_keypoints(document, name).keypoints


def person_frames(keypoints: np.ndarray, min_confidence: float = MIN_CONFIDENCE) -> np.ndarray:
    """bool (T,): frames of ``(T, K, 3)`` keypoints in which :func:`render_pose` (no head) draws
    anything, i.e. a person was detected; the others render all black."""
    keypoints = np.asarray(keypoints, dtype=np.float64)
    seen = keypoints[:, :, 2] >= min_confidence
    seen[:, list(HEAD_POINTS)] = False
    return seen.any(axis=1)
