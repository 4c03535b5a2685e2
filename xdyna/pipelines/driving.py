"""Driving signals: from a driving video (or its pose video) to the per-frame conditions.

* Frames: ``start``, ``stride`` and ``max_frames`` pick the same source frames for the pose, the
  face maps and the preview in every mode (the public release ignored the stride in face mode).
* Geometry: every frame (reference, pose, driving) is resized to cover the output size and
  centre-cropped, the transform the training loader applies in its ``center`` crop mode.
* Pose: a rendered head-less skeleton video, or keypoints from a pluggable
  :class:`PoseEstimator` rendered with :func:`datapipes.pose.render_pose`.
* Face: S-Face maps (:func:`datapipes.face.s_face_maps`) from per-frame face tracks; a frame
  without a detection reuses the last good face box (the first good one for leading frames), so
  one missed detection never blanks the face condition of that frame. A w/lmk model
  (``face_landmarks_in_pose``) gets the detected landmarks drawn into its pose images instead, as
  its training data drew them (:func:`datapipes.pose.draw_face_landmarks`; a frame without a
  detection keeps a face-less pose, as in training).
* Alignment: :class:`PoseAlignment` scales and centres the skeleton (and the face maps with it)
  onto the reference person's body box.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from datapipes.clips import ResizeCrop
from datapipes.face import FaceFrame, s_face_maps
from datapipes.facetrack import LandmarkModel, load_face_model
from datapipes.plugins import import_object
from datapipes.pose import draw_face_landmarks, render_pose
from datapipes.pose_estimator import PoseEstimator

from .inputs import InputError, VideoFile

# H.264 leaves an all-black frame with a few units of noise; skeleton limbs are drawn at 60 % of
# full colour (>= 150), so anything under this level is "no skeleton here".
BLANK_LEVEL = 16 / 255
DECODE_CHUNK = 32  # frames decoded and resized at a time: bounds memory on long, large videos
log = logging.getLogger(__name__)


def load_pose_estimator(spec: str, model_path: str | None = None, detector_path: str | None = None) -> PoseEstimator:
    """``dwpose`` (datapipes' DWPose through onnxruntime, weights from ``model_path``, person boxes
    from the YOLOX model at ``detector_path`` if given) or a ``module:attribute`` plugin (see
    :func:`load_plugin`)."""
    if spec == "dwpose":
        if model_path is None:
            raise InputError("--pose-estimator dwpose needs --pose-model PATH (a local DWPose .onnx file)")
        from datapipes.pose_estimator import make_pose_estimator

        try:
            return make_pose_estimator(spec, model_path, detector_path)
        except ImportError as error:
            raise InputError(f"--pose-estimator dwpose needs onnxruntime (pip install 'xdyna[pose]'): {error}") from None
    return load_plugin(spec, "pose estimator")


def load_plugin(spec: str, what: str) -> Any:
    """``module:attribute`` -> the object ``attribute()`` builds (a class or a factory taking no
    arguments), e.g. ``my_dwpose:DWPoseEstimator``."""
    try:
        factory = import_object(spec, what)
    except ValueError as error:
        raise InputError(str(error)) from None
    return factory()


# ---------------------------------------------------------------------- frames and geometry

def select_frames(num_frames: int, stride: int = 1, max_frames: int | None = None, start: int = 0) -> np.ndarray:
    """Source frame indices ``start, start + stride, ...``, at most ``max_frames`` of them."""
    if stride < 1:
        raise InputError(f"frame stride must be >= 1, got {stride}")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"max frames must be >= 1, got {max_frames}")
    if not 0 <= start < num_frames:
        raise InputError(f"start frame {start} is outside the driving video's {num_frames} frames")
    indices = np.arange(start, num_frames, stride)
    return indices[:max_frames] if max_frames is not None else indices


def center_geometry(source_hw: tuple[int, int], size: tuple[int, int]) -> ResizeCrop:
    """Cover ``size`` with the source, crop the centre (aspect ratio kept, nothing stretched)."""
    return ResizeCrop.plan(tuple(source_hw), tuple(size), "center", np.random.default_rng(0))


def fit_frames(frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """``uint8 (T, h, w, 3)`` -> ``float32 (T, 3, H, W)`` in [0, 1], cover-resized and centre-cropped."""
    return center_geometry(frames.shape[1:3], size).frames(frames).to(torch.float32, memory_format=torch.contiguous_format) / 255.0


def prepare_reference(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Reference ``uint8 (h, w, 3)`` of any aspect ratio -> ``(3, H, W)`` in [-1, 1]."""
    return fit_frames(image[None], size)[0] * 2 - 1


def decode_fitted(video: VideoFile, indices: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Frames ``indices`` of ``video`` fitted to ``size`` (as :func:`fit_frames`), ``(T, 3, H, W)``
    in [0, 1], decoded ``DECODE_CHUNK`` frames at a time."""
    chunks = [fit_frames(video.frames(indices[i : i + DECODE_CHUNK]), size) for i in range(0, len(indices), DECODE_CHUNK)]
    return torch.cat(chunks)


def render_keypoints(keypoints: np.ndarray, source_hw: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Head-less skeletons ``(T, 3, H, W)`` in [0, 1] from keypoints in ``source_hw`` pixels."""
    scale_x, scale_y, shift_x, shift_y = center_geometry(source_hw, size).point_transform(*source_hw)
    frames = []
    for points in np.asarray(keypoints, dtype=np.float64):
        points = points.copy()
        points[:, 0] = points[:, 0] * scale_x + shift_x
        points[:, 1] = points[:, 1] * scale_y + shift_y
        frames.append(render_pose(points, size[0], size[1], no_head=True))
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0


def blank_frames(pose: torch.Tensor) -> torch.Tensor:
    """``bool (T,)``: frames of ``pose (T, 3, H, W)`` with no skeleton pixel."""
    return pose.flatten(1).amax(dim=1) < BLANK_LEVEL


# ---------------------------------------------------------------------- faces

def carry_over_faces(faces: list[FaceFrame | None]) -> tuple[list[FaceFrame | None], int]:
    """Fill frames without a face with the last good face (the first good one before any);
    returns the filled track and how many frames were filled. No face at all stays all ``None``."""
    first_good = next((face for face in faces if face is not None), None)
    if first_good is None:
        return list(faces), 0
    filled, last, count = [], first_good, 0
    for face in faces:
        if face is None:
            filled.append(last)
            count += 1
        else:
            filled.append(face)
            last = face
    return filled, count


def detect_faces(video: VideoFile, indices: np.ndarray, face_model: LandmarkModel, chunk: int = 16) -> list[FaceFrame | None]:
    """One face (in source pixels) or ``None`` per selected frame."""
    faces: list[FaceFrame | None] = []
    for i in range(0, len(indices), chunk):
        found = face_model(video.frames(indices[i : i + chunk]))
        if len(found) != len(indices[i : i + chunk]):
            raise InputError(f"face model returned {len(found)} results for {len(indices[i : i + chunk])} frames")
        faces.extend(found)
    return faces


def face_maps(frames: torch.Tensor, faces: list[FaceFrame | None], source_hw: tuple[int, int]) -> torch.Tensor:
    """S-Face maps ``(T, 6, H, W)`` from fitted frames ``(T, 3, H, W)`` in [0, 1] and faces in
    source pixels (moved into the fitted frames' pixels here)."""
    return s_face_maps(frames, faces_in_output(faces, source_hw, tuple(frames.shape[-2:])))


def faces_in_output(faces: list[FaceFrame | None], source_hw: tuple[int, int], size: tuple[int, int]) -> list[FaceFrame | None]:
    """Faces in source pixels moved into the pixels of the fitted (cover-resized, centre-cropped) frames."""
    transform = center_geometry(source_hw, size).point_transform(*source_hw)
    return [None if face is None else face.transformed(*transform) for face in faces]


def draw_landmarks_into_pose(pose: torch.Tensor, faces: list[FaceFrame | None]) -> torch.Tensor:
    """Pose frames ``(T, 3, H, W)`` in [0, 1] with each frame's face landmarks (in output pixels)
    drawn into the uint8 rendering, as the w/lmk training data draws them."""
    drawn = pose.clone()
    for index, face in enumerate(faces):
        if face is not None:
            frame = (pose[index] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            marked = draw_face_landmarks(frame, face.points)
            drawn[index] = torch.tensor(marked).permute(2, 0, 1).to(pose.dtype) / 255.0  # a copy: PIL's array is read-only
    return drawn


# ---------------------------------------------------------------------- alignment

Box = tuple[float, float, float, float]


def skeleton_box(pose: torch.Tensor) -> Box | None:
    """The body box ``(x0, y0, x1, y1)`` of a skeleton video ``(T, 3, H, W)``: the median over
    frames of each frame's box of skeleton pixels (robust to a frame with a stray limb);
    ``None`` when no frame has a skeleton."""
    boxes = []
    for frame in pose:
        mask = frame.amax(dim=0) >= BLANK_LEVEL
        if not mask.any():
            continue
        rows = torch.nonzero(mask.any(dim=1)).flatten()
        cols = torch.nonzero(mask.any(dim=0)).flatten()
        boxes.append([float(cols[0]), float(rows[0]), float(cols[-1]) + 1, float(rows[-1]) + 1])
    if not boxes:
        return None
    return tuple(float(v) for v in np.median(np.asarray(boxes), axis=0))


@dataclass(frozen=True)
class PoseAlignment:
    """``x' = scale * x + shift_x`` (and y) in output pixels: one uniform scale, so the driving
    body's proportions are kept while its height and centre match the reference body."""

    scale: float
    shift_x: float
    shift_y: float

    @classmethod
    def fit(cls, driving: Box, reference: Box) -> "PoseAlignment":
        driving_height = driving[3] - driving[1]
        if driving_height <= 0 or reference[3] - reference[1] <= 0:
            raise InputError(f"cannot align: degenerate body box (driving {driving}, reference {reference})")
        scale = (reference[3] - reference[1]) / driving_height
        shift_x = (reference[0] + reference[2]) / 2 - scale * (driving[0] + driving[2]) / 2
        shift_y = (reference[1] + reference[3]) / 2 - scale * (driving[1] + driving[3]) / 2
        return cls(scale, shift_x, shift_y)

    def apply_box(self, box: Box) -> Box:
        x0, y0, x1, y1 = box
        return (x0 * self.scale + self.shift_x, y0 * self.scale + self.shift_y,
                x1 * self.scale + self.shift_x, y1 * self.scale + self.shift_y)

    def warp(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``(T, C, H, W)`` moved by this transform (bilinear, zeros outside)."""
        count, _, height, width = frames.shape
        # Output pixel centre x_o samples input x_i = (x_o - shift) / scale; written in the
        # normalised coordinates of grid_sample (align_corners=False: pixel x is at (2x+1)/W-1).
        def row(size: int, shift: float) -> tuple[float, float]:
            return 1 / self.scale, 1 / self.scale - (1 + 2 * shift) / (self.scale * size) + 1 / size - 1

        sx, tx = row(width, self.shift_x)
        sy, ty = row(height, self.shift_y)
        theta = torch.tensor([[sx, 0.0, tx], [0.0, sy, ty]], dtype=torch.float32).expand(count, 2, 3)
        grid = F.affine_grid(theta, (count, 1, height, width), align_corners=False)
        return F.grid_sample(frames.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def reference_body_box(
    reference_image: np.ndarray,
    size: tuple[int, int],
    box: Box | None = None,
    pose_estimator: PoseEstimator | None = None,
) -> Box:
    """The reference person's body box in output pixels: ``box`` given in the reference image's
    pixels, or the box of the head-less skeleton the pose estimator finds in it (measured the
    same way as the driving skeleton, so the two boxes are comparable)."""
    source_hw = reference_image.shape[:2]
    if box is not None:
        scale_x, scale_y, shift_x, shift_y = center_geometry(source_hw, size).point_transform(*source_hw)
        x0, y0, x1, y1 = box
        return (x0 * scale_x + shift_x, y0 * scale_y + shift_y, x1 * scale_x + shift_x, y1 * scale_y + shift_y)
    if pose_estimator is None:
        raise InputError("alignment needs the reference body: give a reference box or a pose estimator")
    rendered = render_keypoints(pose_estimator(reference_image[None]), source_hw, size)
    found = skeleton_box(rendered)
    if found is None:
        raise InputError("alignment: the pose estimator found no body in the reference image")
    return found


# ---------------------------------------------------------------------- all together

@dataclass
class DrivingSignals:
    """Per-frame conditions at the output size, and where they came from."""

    pose: torch.Tensor  # (F, 3, H, W) in [0, 1]
    face: torch.Tensor | None  # (F, 6, H, W) in [0, 1], or None (no S-Face condition)
    indices: np.ndarray  # source frame of each output frame
    fps: float  # source fps / stride: the output plays at the driving video's speed
    notes: list[str] = field(default_factory=list)  # what was adjusted, for the user to read

    def __len__(self) -> int:
        return self.pose.shape[0]


def prepare_driving(
    size: tuple[int, int],
    pose_video: str | Path | None = None,
    driving_video: str | Path | None = None,
    face_video: str | Path | None = None,
    pose_estimator: PoseEstimator | None = None,
    face_model: str | LandmarkModel | None = None,
    stride: int = 1,
    max_frames: int | None = None,
    start: int = 0,
    allow_blank_pose: bool = False,
    reference_box: Box | None = None,
    face_landmarks_in_pose: bool = False,
) -> DrivingSignals:
    """Conditions for ``size = (H, W)``.

    The pose comes from ``pose_video`` (a rendered head-less skeleton video) or, without one, from
    ``pose_estimator`` run on ``driving_video``. Face maps come from ``face_video`` (default:
    ``driving_video``) when a ``face_model`` (``"mtcnn"`` or a :class:`LandmarkModel`) is given;
    with ``face_landmarks_in_pose`` (a w/lmk model) its landmarks are drawn into the pose instead
    and ``face`` stays None.
    When the pose and face sources differ in length the shorter one sets the length (noted).
    ``reference_box`` (output pixels, see :func:`reference_body_box`) turns on alignment.
    """
    notes: list[str] = []
    face_condition = "the face landmarks in the pose" if face_landmarks_in_pose else "the S-Face condition"
    driving = VideoFile(driving_video, "driving video") if driving_video is not None else None
    if pose_video is not None:
        pose_source = VideoFile(pose_video, "pose video")
    elif driving is not None and pose_estimator is not None:
        pose_source = driving
    elif driving is not None:
        raise InputError("a driving video needs a pose: give its pose video, or a pose estimator to make one")
    else:
        raise InputError("no driving signal: give a pose video or a driving video")

    face_source = None
    if face_model is not None:
        if face_video is not None:
            face_source = VideoFile(face_video, "face video")
        elif driving is not None:
            face_source = driving
        else:
            notes.append(f"no face video given: {face_condition} is off")
    elif face_video is not None:
        notes.append(f"face video {str(face_video)!r} ignored: no face model in use")

    count = len(pose_source)
    others = []
    for video in (driving, face_source):
        if video is not None and video is not pose_source and all(video is not o for o in others):
            others.append(video)
    for other in others:
        if len(other) != count:
            notes.append(f"{other.what} has {len(other)} frames, {pose_source.what} {count}: using the first {min(count, len(other))}")
            count = min(count, len(other))
        if abs(other.fps - pose_source.fps) > 0.01 * pose_source.fps:
            notes.append(f"{other.what} runs at {other.fps:g} fps, {pose_source.what} at {pose_source.fps:g} fps: frames are paired by index")
    indices = select_frames(count, stride, max_frames, start)

    if pose_source is driving and pose_video is None:
        keypoints = []
        for i in range(0, len(indices), DECODE_CHUNK):
            keypoints.append(np.asarray(pose_estimator(driving.frames(indices[i : i + DECODE_CHUNK]))))
        pose = render_keypoints(np.concatenate(keypoints), (driving.info.height, driving.info.width), size)
    else:
        pose = decode_fitted(pose_source, indices, size)
    blank = blank_frames(pose)
    if bool(blank.all()):
        if not allow_blank_pose:
            raise InputError(
                f"{pose_source.what} {str(pose_source.path)!r} shows no skeleton in any selected frame (all black); "
                "allow a blank pose explicitly to animate the scene without body motion"
            )
        notes.append("the pose is blank in every frame: the body is not driven (scene dynamics only)")
        pose = torch.zeros_like(pose)  # exactly zero, as training's blank condition
    elif bool(blank.any()):
        notes.append(f"{int(blank.sum())} of {len(indices)} frames have no skeleton")

    face = None
    landmarks: list[FaceFrame | None] = []  # w/lmk: drawn after the alignment, which measures the bare skeleton
    if face_source is not None:
        model = load_face_model(face_model)
        detected = detect_faces(face_source, indices, model)
        faces, filled = carry_over_faces(detected)
        if all(f is None for f in faces):
            notes.append(f"no face found in any frame of the {face_source.what}: {face_condition} is blank")
        elif face_landmarks_in_pose:
            if filled:
                notes.append(f"{filled} of {len(indices)} frames had no face detection: their pose shows no face landmarks")
            landmarks = faces_in_output(detected, (face_source.info.height, face_source.info.width), size)
        elif filled:
            notes.append(f"{filled} of {len(indices)} frames had no face detection: the last good face box was used")
        if not face_landmarks_in_pose:
            frames = decode_fitted(face_source, indices, size)
            face = face_maps(frames, faces, (face_source.info.height, face_source.info.width))

    if reference_box is not None:
        body = skeleton_box(pose)
        if body is None:
            notes.append("alignment skipped: the pose is blank")
        else:
            alignment = PoseAlignment.fit(body, reference_box)
            pose = alignment.warp(pose)
            face = alignment.warp(face) if face is not None else None
            moved = (alignment.scale, alignment.scale, alignment.shift_x, alignment.shift_y)
            landmarks = [None if f is None else f.transformed(*moved) for f in landmarks]
            notes.append(f"skeleton aligned to the reference body: scale {alignment.scale:.3f}")
    if landmarks:
        pose = draw_landmarks_into_pose(pose, landmarks)

    fps = pose_source.fps / stride
    for note in notes:
        log.warning(note)
    return DrivingSignals(pose=pose, face=face, indices=indices, fps=fps, notes=notes)
