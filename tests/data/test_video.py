import numpy as np
import pytest

from datapipes.video import VideoDecodeError, decode_frames, encode_mp4, probe


def _gradient_frames(count=6, height=32, width=64):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([(x * 5 + 20 * t) % 256, (y * 7) % 256, np.full_like(x, 40 * t % 256)], -1)
                     for t in range(count)]).astype(np.uint8)


def test_encode_decode_round_trip_keeps_frames_and_facts():
    frames = _gradient_frames()
    data = encode_mp4(frames, fps=12.5)
    assert probe(data) == (6, 12.5, 32, 64)
    decoded = decode_frames(data, [4, 1])
    assert decoded.shape == (2, 32, 64, 3) and decoded.dtype == np.uint8
    # lossy codec: close, and frame 4 is nearer to source frame 4 than to frame 1
    error = np.abs(decoded.astype(int) - frames[[4, 1]].astype(int)).mean()
    assert error < 8
    assert np.abs(decoded[0].astype(int) - frames[4]).mean() < np.abs(decoded[0].astype(int) - frames[1]).mean()


@pytest.mark.parametrize("data, reason", [(b"", "zero bytes"), (b"GIF89a not a video at all", "cannot decode")])
def test_bad_bytes_raise_one_clear_error_naming_the_sample(data, reason):
    with pytest.raises(VideoDecodeError, match="clip-7") as info:
        probe(data, "clip-7")
    assert reason in str(info.value)


def test_truncated_video_is_an_error():
    data = encode_mp4(_gradient_frames(), fps=8)
    with pytest.raises(VideoDecodeError, match="cut"):
        decode_frames(data[: len(data) * 2 // 3], [0], "cut")


def test_out_of_range_frames_and_odd_sizes_are_refused():
    data = encode_mp4(_gradient_frames(), fps=8)
    with pytest.raises(VideoDecodeError, match="outside"):
        decode_frames(data, [6], "short")
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, 31, 32, 3), np.uint8), fps=8)


def test_widths_decord_cannot_copy_are_decoded_through_pyav():
    frames = _gradient_frames(height=32, width=48)   # decord 0.6 fails on 48 px rows
    decoded = decode_frames(encode_mp4(frames, fps=8), [0, 5])
    assert decoded.shape == (2, 32, 48, 3)
    assert np.abs(decoded.astype(int) - frames[[0, 5]].astype(int)).mean() < 8
