"""Video bytes in and out: H.264 encoding with PyAV, frame decoding with decord from memory.

Shards hold whole mp4 files as bytes, so everything here works on ``bytes``; decoding goes
through ``io.BytesIO`` and decord, which only reads the needed frames. ``pack`` also opens local
paths, so that a file it rejects is never read into memory as a whole.
"""
from __future__ import annotations

import io
import os
from fractions import Fraction
from typing import NamedTuple, Sequence

import av
import decord
import numpy as np


class VideoDecodeError(ValueError):
    """A video (or pose video) that cannot be decoded; the message names the sample."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"cannot decode video {name!r}: {reason}")
        self.name = name
        self.reason = reason


class VideoInfo(NamedTuple):
    num_frames: int
    fps: float
    height: int
    width: int


def encode_mp4(frames: np.ndarray, fps: float, *, crf: int = 18, preset: str = "veryfast") -> bytes:
    """Encode ``uint8 (T, H, W, 3)`` RGB frames as H.264/yuv420p mp4 and return its bytes.

    yuv420p halves chroma resolution, so H and W must be even. The moov atom stays at the end
    (``faststart`` needs a second pass over a real file); a truncated file therefore fails to
    open at all instead of decoding garbage, which is what the loader's bad-sample path wants.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"encode_mp4 wants uint8 (T, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    num_frames, height, width, _ = frames.shape
    if num_frames == 0:
        raise ValueError("encode_mp4 got zero frames")
    if height % 2 or width % 2:
        raise ValueError(f"encode_mp4 needs even height and width for yuv420p, got {height}x{width}")
    if not fps > 0:
        raise ValueError(f"encode_mp4 needs fps > 0, got {fps}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        # A Fraction keeps fractional rates such as 29.97 exact enough for the container.
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


Source = bytes | bytearray | memoryview | str | os.PathLike


def open_video(source: Source, name: str = "<bytes>", num_threads: int = 1) -> decord.VideoReader:
    """A decord reader over in-memory bytes (or a local file path); raises
    :class:`VideoDecodeError` naming ``name``.

    Create readers inside DataLoader workers (decord state must not cross a fork).
    ``num_threads=1`` because loader parallelism comes from workers, not decoder threads.
    """
    if isinstance(source, (str, os.PathLike)):
        # decord streams a path through FFmpeg's file I/O: nothing beyond what it decodes is read.
        uri = os.fspath(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise VideoDecodeError(name, "zero bytes")
        uri = io.BytesIO(bytes(source))
    else:
        raise VideoDecodeError(name, f"expected bytes or a path, got {type(source).__name__}")
    try:
        reader = decord.VideoReader(uri, num_threads=num_threads)
        count = len(reader)
    except Exception as error:  # decord raises DECORDError/RuntimeError with C++ text
        raise VideoDecodeError(name, _first_line(error)) from None
    if count == 0:
        raise VideoDecodeError(name, "no frames")
    return reader


def read_frames(reader: decord.VideoReader, indices: Sequence[int], name: str = "<bytes>",
                source: Source | None = None) -> np.ndarray:
    """Frames ``indices`` of an open reader as ``uint8 (len, H, W, 3)``; any decoder error
    (decord's threaded decoder raises them at whichever frame it meets them) is a
    :class:`VideoDecodeError`.

    decord 0.6 cannot copy out frames of some widths (e.g. 16 or 48 px: its row padding makes
    the array size check fail); given the ``source`` bytes (or path), those are decoded with PyAV instead.
    """
    indices = [int(i) for i in indices]
    count = len(reader)
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise VideoDecodeError(name, f"frame indices {bad[:5]} outside [0, {count})")
    try:
        frames = reader.get_batch(indices).asnumpy()
    except Exception as error:
        if source is None or "must exactly match" not in str(error):
            raise VideoDecodeError(name, _first_line(error)) from None
        frames = _decode_with_pyav(source, indices, name)
    if frames.shape[0] != len(indices):
        raise VideoDecodeError(name, f"asked for {len(indices)} frames, decoded {frames.shape[0]}")
    return frames


def _decode_with_pyav(source: Source, indices: list[int], name: str) -> np.ndarray:
    wanted, last, found = set(indices), max(indices), {}
    file = os.fspath(source) if isinstance(source, (str, os.PathLike)) else io.BytesIO(bytes(source))
    try:
        with av.open(file) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    found[index] = frame.to_ndarray(format="rgb24")
                if index >= last:
                    break
    except av.error.FFmpegError as error:
        raise VideoDecodeError(name, _first_line(error)) from None
    missing = sorted(wanted - set(found))
    if missing:
        raise VideoDecodeError(name, f"frames {missing[:5]} could not be decoded")
    return np.stack([found[i] for i in indices])


def decode_frames(mp4_bytes: bytes, indices: Sequence[int], name: str = "<bytes>") -> np.ndarray:
    """Decode frames ``indices`` of an mp4 held in memory as ``uint8 (len, H, W, 3)``."""
    return read_frames(open_video(mp4_bytes, name), indices, name, source=mp4_bytes)


def probe(mp4_bytes: bytes, name: str = "<bytes>") -> VideoInfo:
    """``(num_frames, fps, height, width)`` of an mp4 held in memory."""
    reader = open_video(mp4_bytes, name)
    return info_of(reader, name)


def info_of(reader: decord.VideoReader, name: str = "<bytes>") -> VideoInfo:
    """Frame count, fps and size of an open reader (decodes the first frame for its size,
    which also proves the stream decodes). The fps is the header's and may be NaN or 0 for a
    header without a duration: callers that store it check it (``datapipes.validate``)."""
    try:
        first = reader[0]
        reader.seek(0)
        return VideoInfo(len(reader), float(reader.get_avg_fps()), int(first.shape[0]), int(first.shape[1]))
    except Exception as error:  # decord's DECORDError from its threaded decoder
        raise VideoDecodeError(name, _first_line(error)) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
