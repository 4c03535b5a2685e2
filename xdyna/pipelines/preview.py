"""Writing an animation: the video, a side-by-side preview video and a PNG contact sheet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datapipes.atomic import publish, temporary_sibling, write_bytes_atomic
from datapipes.video import encode_mp4

from .checks import InputError


def to_uint8(frames: torch.Tensor, value_range: tuple[float, float]) -> np.ndarray:
    """``(..., 3, H, W)`` float in ``value_range`` -> ``uint8 (..., H, W, 3)``."""
    low, high = value_range
    scaled = ((frames.detach().float().cpu().clamp(low, high) - low) / (high - low) * 255).round().to(torch.uint8)
    return scaled.movedim(-3, -1).numpy()


def side_by_side(reference: np.ndarray, pose: np.ndarray, result: np.ndarray) -> np.ndarray:
    """``reference | driving pose | result`` per frame: ``uint8 (F, H, 3W, 3)`` from a reference
    ``(H, W, 3)`` and ``(F, H, W, 3)`` pose and result frames."""
    frames = result.shape[0]
    if pose.shape != result.shape or reference.shape != result.shape[1:]:
        raise ValueError(f"preview panels differ in shape: {reference.shape}, {pose.shape}, {result.shape}")
    return np.concatenate([np.broadcast_to(reference, (frames, *reference.shape)), pose, result], axis=2)


def contact_sheet(panels: np.ndarray, columns: int = 8) -> np.ndarray:
    """Up to ``columns`` evenly spaced frames of ``panels (F, H, W', 3)`` side by side, the first
    and the last included: one image that shows the whole animation at a glance."""
    count = panels.shape[0]
    picks = np.unique(np.linspace(0, count - 1, min(columns, count)).round().astype(int))
    # A thin dark gap between time steps keeps the panels of neighbouring frames apart.
    gap = np.full((panels.shape[1], 2, 3), 32, dtype=np.uint8)
    strips = []
    for i, index in enumerate(picks):
        strips.append(panels[index])
        if i + 1 < len(picks):
            strips.append(gap)
    return np.concatenate(strips, axis=1)


def ground_truth_frames(driving_video, indices, size: tuple[int, int]) -> np.ndarray:
    """The ground truth of an animation made from ``driving_video`` (a path or an open
    ``VideoFile``): ``uint8 (F, H, W, 3)``, its frames at ``indices`` (the pipeline's
    ``DrivingSignals.indices``: same start, stride and length), cover-resized and centre-cropped to
    ``size`` by the decoding the face maps use."""
    from .driving import decode_fitted
    from .inputs import VideoFile

    video = driving_video if isinstance(driving_video, VideoFile) else VideoFile(driving_video, "driving video")
    return to_uint8(decode_fitted(video, np.asarray(indices), size), (0, 1))


def write_ground_truth(out: str | Path, driving_video: str | Path, size: tuple[int, int], stride: int, start: int = 0,
                       max_frames: int | None = None, fps: float | None = None, pose_video: str | Path | None = None) -> Path:
    """What ``xdyna-animate --save-ground-truth`` writes, without running a model: the frames
    ``prepare_driving`` selects (a pose video given beside the driving video bounds the length, as
    there) at ``fps`` (default: driving fps / stride, the animation's)."""
    from .driving import select_frames
    from .inputs import VideoFile

    path = check_output_path(out, "ground-truth output")
    driving = VideoFile(driving_video, "driving video")
    count = len(driving) if pose_video is None else min(len(driving), len(VideoFile(pose_video, "pose video")))
    frames = ground_truth_frames(driving, select_frames(count, stride, max_frames, start), size)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, encode_mp4(frames, fps or driving.fps / stride))


@dataclass
class WrittenFiles:
    video: Path
    preview: Path | None
    contact_sheet: Path | None


def preview_paths(out: Path) -> tuple[Path, Path]:
    """``out.mp4`` -> ``out.preview.mp4``, ``out.contact.png``."""
    return out.with_suffix(".preview.mp4"), out.with_suffix(".contact.png")


def check_output_path(out: str | Path, what: str = "output") -> Path:
    """The output video path: an ``.mp4`` whose folder exists (or can be made), not a folder."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a folder, expected an .mp4 file path")
    if path.suffix.lower() != ".mp4":
        raise InputError(f"{what} {str(path)!r} must end in .mp4")
    if path.parent.exists() and not path.parent.is_dir():
        raise InputError(f"{what} folder {str(path.parent)!r} is a file")
    return path


def write_animation(out: str | Path, frames: np.ndarray, fps: float, reference: np.ndarray | None = None,
                    pose: np.ndarray | None = None, preview: bool = True) -> WrittenFiles:
    """Write ``frames uint8 (F, H, W, 3)`` to ``out`` at ``fps``; with ``preview`` (and the
    reference ``(H, W, 3)`` and pose ``(F, H, W, 3)`` as uint8) also the side-by-side video and the
    contact sheet beside it."""
    path = check_output_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, encode_mp4(frames, fps))
    if not preview:
        return WrittenFiles(path, None, None)
    if reference is None or pose is None:
        raise ValueError("a preview needs the reference and the pose frames")
    panels = side_by_side(reference, pose, frames)
    preview_video, sheet = preview_paths(path)
    write_bytes_atomic(preview_video, encode_mp4(panels, fps))
    temporary = temporary_sibling(sheet)
    Image.fromarray(contact_sheet(panels)).save(temporary, format="PNG")
    publish(temporary, sheet)
    return WrittenFiles(path, preview_video, sheet)
