"""Evaluation inputs: folders of mp4 files or of frame folders, matched by name.

Decoding goes through the shared ``datapipes.video`` (decord over in-memory bytes); frame
folders (PNG/JPEG, sorted by file name) are read with Pillow. Every problem is an
:class:`EvalInputError` whose message names the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datapipes.video import open_video, read_frames

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class EvalInputError(ValueError):
    """An input video, frame folder or folder pairing that cannot be evaluated."""


class VideoSource:
    """One video (mp4 file or frame folder): size, frame count, and uint8 ``(n, 3, H, W)`` reads."""

    def __init__(self, path: Path):
        self.path = path
        self.name = path.stem if path.is_file() else path.name
        if path.is_file():
            try:
                self._reader = open_video(path.read_bytes(), str(path))
                first = read_frames(self._reader, [0], str(path))
            except Exception as error:  # VideoDecodeError and I/O errors alike
                raise EvalInputError(f"cannot read video {path}: {error}") from None
            self.num_frames = len(self._reader)
            self._frame_files: list[Path] = []
        else:
            self._frame_files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self._frame_files:
                raise EvalInputError(f"frame folder {path} holds no {'/'.join(IMAGE_SUFFIXES)} files")
            first = self._load_images([0])
            self.num_frames = len(self._frame_files)
        self.height, self.width = int(first.shape[1]), int(first.shape[2])

    def _load_images(self, indices: list[int]) -> np.ndarray:
        frames = []
        for index in indices:
            file = self._frame_files[index]
            try:
                with Image.open(file) as image:
                    frames.append(np.asarray(image.convert("RGB")))
            except Exception as error:
                raise EvalInputError(f"cannot read frame {file}: {error}") from None
        shapes = {frame.shape for frame in frames}
        if len(shapes) > 1:
            raise EvalInputError(f"frames in {self.path} differ in size: {sorted(shapes)}")
        return np.stack(frames)

    def read(self, start: int, count: int) -> torch.Tensor:
        indices = list(range(start, min(start + count, self.num_frames)))
        if self._frame_files:
            frames = self._load_images(indices)
        else:
            try:
                frames = read_frames(self._reader, indices, str(self.path))
            except Exception as error:
                raise EvalInputError(f"cannot decode frames {indices[0]}..{indices[-1]} of {self.path}: {error}") from None
        if frames.shape[1:3] != (self.height, self.width):
            raise EvalInputError(f"{self.path} changes frame size mid-video: {frames.shape[1:3]} vs {(self.height, self.width)}")
        return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)


def list_videos(folder: Path, role: str) -> dict[str, Path]:
    """``name -> path`` of the mp4 files and frame folders directly inside ``folder``."""
    if not folder.is_dir():
        raise EvalInputError(f"--{role} folder {folder} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() == ".mp4":
            name = path.stem
        elif path.is_dir() and not path.name.startswith("."):
            name = path.name
        else:
            continue
        if name in found:
            raise EvalInputError(f"--{role} folder {folder} has both {found[name].name} and {path.name} for {name!r}")
        found[name] = path
    if not found:
        raise EvalInputError(f"--{role} folder {folder} holds no videos (*.mp4 files or frame folders)")
    return found


@dataclass
class VideoPair:
    name: str
    pred: VideoSource
    gt: VideoSource
    reference: Path | None
    mask: VideoSource | None


def find_reference(folder: Path, name: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    raise EvalInputError(f"--ref folder {folder} has no image for {name!r} ({'/'.join(IMAGE_SUFFIXES)})")


def read_image(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    except Exception as error:
        raise EvalInputError(f"cannot read image {path}: {error}") from None


def pair_videos(pred_dir: Path, gt_dir: Path, ref_dir: Path | None = None, mask_dir: Path | None = None,
                ) -> list[VideoPair]:
    """Match prediction and ground-truth videos by name and check they can be compared frame by
    frame. Two files (``--pred out.mp4 --gt gt.mp4``) are one pair named after the prediction."""
    if pred_dir.is_file() and gt_dir.is_file():
        preds, gts = {pred_dir.stem: pred_dir}, {pred_dir.stem: gt_dir}
    else:
        preds, gts = list_videos(pred_dir, "pred"), list_videos(gt_dir, "gt")
    missing = sorted(set(preds) - set(gts))
    if missing:
        raise EvalInputError(f"{len(missing)} predicted videos have no ground truth in {gt_dir}: {missing[:5]}")
    masks = {}
    if mask_dir is not None:
        masks = {name: mask_dir for name in preds} if mask_dir.is_file() else list_videos(mask_dir, "masks")
    pairs = []
    for name in sorted(preds):
        pred, gt = VideoSource(preds[name]), VideoSource(gts[name])
        if pred.num_frames != gt.num_frames:
            raise EvalInputError(f"{name!r}: prediction has {pred.num_frames} frames, ground truth {gt.num_frames} "
                                 f"({pred.path} vs {gt.path}); a driving video is not the ground truth as is: "
                                 "xdyna-animate --save-ground-truth GT.mp4 writes it (docs/metrics.md)")
        if (pred.height, pred.width) != (gt.height, gt.width):
            raise EvalInputError(f"{name!r}: prediction is {pred.height}x{pred.width}, ground truth {gt.height}x{gt.width} "
                                 f"({pred.path} vs {gt.path}); make the ground truth at the inference size with "
                                 "xdyna-animate --save-ground-truth GT.mp4 (docs/metrics.md)")
        mask = None
        if mask_dir is not None:
            if name not in masks:
                raise EvalInputError(f"--masks folder {mask_dir} has no mask video for {name!r}")
            mask = VideoSource(masks[name])
            if (mask.num_frames, mask.height, mask.width) != (gt.num_frames, gt.height, gt.width):
                raise EvalInputError(f"{name!r}: mask video {mask.path} is {mask.num_frames}x{mask.height}x{mask.width}, "
                                     f"video is {gt.num_frames}x{gt.height}x{gt.width}")
        reference = None if ref_dir is None else ref_dir if ref_dir.is_file() else find_reference(ref_dir, name)
        pairs.append(VideoPair(name, pred, gt, reference, mask))
    return pairs
