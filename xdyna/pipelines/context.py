"""Context windows: how a video longer than the motion modules' reach is denoised.

The motion modules see at most 24 positions and were trained on 16-frame clips, so a long video
is cut into overlapping windows of ``size`` frames at every denoising step; each window is
denoised on its own and the noise predictions of frames covered by several windows are averaged.
Overlaps carry motion across window borders, and a new random offset at every step moves the
borders so that no frame sits on a border at every step (which would show as a periodic jerk).

``closed_loop`` windows wrap around the end of the video (the last frames share windows with the
first), as X-Dyna's release does; open windows stay inside the video and the last one is
aligned to its end.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class ContextOptions:
    """How long videos are windowed. ``windows_per_batch`` windows go through one forward pass:
    faster on a GPU with memory to spare, the same result (tested)."""

    size: int = 16
    overlap: int = 4
    closed_loop: bool = True
    random_offset: bool = True
    windows_per_batch: int = 1

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"context window size must be >= 1, got {self.size}")
        if not 0 <= self.overlap < self.size:
            raise ConfigError(f"context overlap must be in [0, {self.size}), got {self.overlap}")
        if self.windows_per_batch < 1:
            raise ConfigError(f"windows_per_batch must be >= 1, got {self.windows_per_batch}")


def context_windows(num_frames: int, size: int = 16, overlap: int = 4, closed_loop: bool = True, offset: int = 0) -> list[list[int]]:
    """Frame indices of every window; together they cover each frame at least once.

    A video of at most ``size`` frames is one window holding every frame in order, whatever the
    offset: short videos are denoised exactly as one clip.
    """
    if num_frames < 1:
        raise ValueError(f"context_windows needs at least one frame, got {num_frames}")
    if num_frames <= size:
        return [list(range(num_frames))]
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, {size}), got {overlap}")
    step = size - overlap
    if closed_loop:
        return [[(start + offset + i) % num_frames for i in range(size)] for start in range(0, num_frames, step)]
    # Open windows: a grid of starts shifted by the offset, clipped to the video, plus windows
    # flush with both ends. Consecutive starts are at most `step` apart, so every overlap is at
    # least `overlap` frames.
    last = num_frames - size
    starts = {0, last} | {start for start in range(offset % step, last, step)}
    return [list(range(start, start + size)) for start in sorted(starts)]
