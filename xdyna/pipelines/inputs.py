"""User inputs of the pipeline read from disk: images and videos, with errors naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from datapipes.video import VideoDecodeError, VideoInfo, open_video, read_frames, info_of

from .checks import InputError, require_file


def load_image(path: str | Path, what: str = "reference image") -> np.ndarray:
    """An image file as ``uint8 (H, W, 3)`` RGB (alpha dropped, grey expanded)."""
    file = require_file(path, what)
    try:
        with Image.open(file) as image:
            return np.array(image.convert("RGB"))  # a writable copy
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"{what} {str(file)!r} is not a readable image ({error})") from None


class VideoFile:
    """A video on disk, opened once; frames are decoded on demand by index."""

    def __init__(self, path: str | Path, what: str):
        self.path = require_file(path, what)
        self.what = what
        try:
            self.reader = open_video(self.path.read_bytes(), f"{what} {self.path}")
            self.info: VideoInfo = info_of(self.reader)
        except VideoDecodeError as error:
            raise InputError(f"{what} {str(self.path)!r} is not a readable video ({error.reason})") from None

    def __len__(self) -> int:
        return self.info.num_frames

    @property
    def fps(self) -> float:
        return self.info.fps

    def frames(self, indices) -> np.ndarray:
        """``uint8 (len(indices), H, W, 3)``."""
        try:
            return read_frames(self.reader, indices, f"{self.what} {self.path}")
        except VideoDecodeError as error:
            raise InputError(f"{self.what} {str(self.path)!r}: {error.reason}") from None
