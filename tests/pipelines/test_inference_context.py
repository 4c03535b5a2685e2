"""Context windows: coverage, overlaps and the single-window case."""

from __future__ import annotations

import pytest

from xdyna.errors import ConfigError
from xdyna.pipelines.context import ContextOptions, context_windows


@pytest.mark.parametrize("closed_loop", [True, False])
@pytest.mark.parametrize("offset", [0, 5, 15])
def test_short_video_is_one_ordered_window(closed_loop, offset):
    assert context_windows(12, 16, 4, closed_loop, offset) == [list(range(12))]
    assert context_windows(16, 16, 4, closed_loop, offset) == [list(range(16))]


@pytest.mark.parametrize("num_frames", [17, 28, 40, 61, 100])
@pytest.mark.parametrize("offset", [0, 3, 11, 15])
@pytest.mark.parametrize("closed_loop", [True, False])
def test_windows_cover_every_frame_with_the_overlap(num_frames, offset, closed_loop):
    size, overlap = 16, 4
    windows = context_windows(num_frames, size, overlap, closed_loop, offset)
    assert all(len(window) == size and len(set(window)) == size for window in windows)
    assert set().union(*map(set, windows)) == set(range(num_frames))
    if closed_loop:
        # Consecutive windows (and the last with the first, around the loop) share `overlap` frames.
        for a, b in zip(windows, windows[1:]):
            assert len(set(a) & set(b)) >= overlap
        assert any(w[i] == num_frames - 1 and w[i + 1] == 0 for w in windows for i in range(size - 1))  # wraps
    else:
        for a, b in zip(windows, windows[1:]):
            assert a == sorted(a) and b[0] > a[0]
            assert a[-1] - b[0] + 1 >= overlap
        assert windows[0][0] == 0 and windows[-1][-1] == num_frames - 1


def test_offset_moves_window_borders():
    borders = {tuple(w[0] for w in context_windows(40, 16, 4, True, offset)) for offset in range(16)}
    assert len(borders) == 16


@pytest.mark.parametrize("kwargs", [dict(size=0), dict(overlap=16), dict(overlap=-1), dict(windows_per_batch=0)])
def test_bad_options_are_refused(kwargs):
    with pytest.raises(ConfigError):
        ContextOptions(**kwargs)
