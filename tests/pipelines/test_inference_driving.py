"""Driving-signal preparation: frame selection in every mode, faces with carry-over, blank and
broken inputs, aspect ratios, alignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datapipes.face import FaceFrame
from xdyna.pipelines.driving import (
    PoseAlignment,
    blank_frames,
    carry_over_faces,
    prepare_driving,
    prepare_reference,
    reference_body_box,
    select_frames,
    skeleton_box,
)
from xdyna.pipelines.inputs import InputError, load_image

SIZE = (64, 64)


def test_select_frames_honours_start_stride_and_length():
    np.testing.assert_array_equal(select_frames(10, stride=3), [0, 3, 6, 9])
    np.testing.assert_array_equal(select_frames(10, stride=2, max_frames=3, start=1), [1, 3, 5])
    for kwargs, message in ((dict(stride=0), "stride"), (dict(max_frames=0), "max frames"), (dict(start=10), "start frame")):
        with pytest.raises(InputError, match=message):
            select_frames(10, **kwargs)


def face(x: float) -> FaceFrame:
    points = np.array([[x, 10.0], [x + 8, 10.0], [x + 4, 14.0], [x + 1, 18.0], [x + 7, 18.0]])
    return FaceFrame((x - 2, 6.0, x + 10, 22.0), points)


def test_carry_over_fills_missing_faces_from_the_last_good_one():
    a, b = face(10), face(30)
    filled, count = carry_over_faces([None, a, None, None, b, None])
    assert filled == [a, a, a, a, b, b] and count == 4
    assert carry_over_faces([None, None]) == ([None, None], 0)


class RecordingFaceModel:
    """A landmark model that finds a fixed face except in frames whose index it is told to miss.
    The driving frames' index is read from their brightness ramp, so the test sees exactly which
    source frames the pipeline fed it."""

    name = "recording"

    def __init__(self, miss_every: int | None = None):
        self.seen: list[int] = []
        self.miss_every = miss_every

    def __call__(self, frames: np.ndarray):
        out = []
        for frame in frames:
            index = int(round(frame[..., 0].mean() / 8))
            self.seen.append(index)
            missed = self.miss_every is not None and index % self.miss_every == 0 and index > 0
            out.append(None if missed else face(40.0))
        return out


@pytest.fixture(scope="module")
def ramp_video(tmp_path_factory):
    """30 frames 96x128 whose red channel encodes the frame index (8 levels per frame)."""
    from datapipes.video import encode_mp4

    frames = np.zeros((30, 96, 128, 3), dtype=np.uint8)
    for index in range(30):
        frames[index, ..., 0] = 8 * index
        frames[index, ..., 1] = 128
    path = tmp_path_factory.mktemp("ramp") / "ramp.mp4"
    path.write_bytes(encode_mp4(frames, 30.0, crf=0))
    return path


def test_stride_and_length_apply_to_face_maps_too(driving_files, ramp_video):
    detector = RecordingFaceModel()
    signals = prepare_driving(SIZE, pose_video=driving_files["pose"], face_video=ramp_video, face_model=detector,
                              stride=2, max_frames=6, start=1)
    np.testing.assert_array_equal(signals.indices, [1, 3, 5, 7, 9, 11])
    assert detector.seen == [1, 3, 5, 7, 9, 11]
    assert signals.pose.shape == (6, 3, *SIZE) and signals.face.shape == (6, 6, *SIZE)
    assert signals.fps == pytest.approx(8.0 / 2)  # the pose video's fps over the stride
    assert all(float(signals.face[i].amax()) > 0 for i in range(6))


def test_a_frame_without_a_face_keeps_a_face_condition(driving_files, ramp_video):
    detector = RecordingFaceModel(miss_every=2)  # frames 2, 4, ... are missed
    signals = prepare_driving(SIZE, pose_video=driving_files["pose"], face_video=ramp_video, face_model=detector,
                              stride=1, max_frames=4)
    assert detector.seen == [0, 1, 2, 3]
    assert any("no face detection" in note for note in signals.notes)
    for index in range(4):
        global_map, local_map = signals.face[index, :3], signals.face[index, 3:]
        assert float(global_map.amax()) > 0 and float(local_map.amax()) > 0, index
    # The carried box covers the same pixels as the detected one.
    torch.testing.assert_close(signals.face[2, 0] > 0, signals.face[1, 0] > 0)


def test_no_face_anywhere_gives_a_blank_condition_and_a_note(driving_files, ramp_video):
    class NoFaces:
        name = "none"

        def __call__(self, frames):
            return [None] * len(frames)

    signals = prepare_driving(SIZE, pose_video=driving_files["pose"], face_video=ramp_video, face_model=NoFaces(), max_frames=3)
    assert float(signals.face.abs().max()) == 0
    assert any("no face found" in note for note in signals.notes)


def test_driving_video_longer_than_pose_video_uses_the_common_length(driving_files):
    signals = prepare_driving(SIZE, pose_video=driving_files["short_pose"], driving_video=driving_files["driving"],
                              face_model=RecordingFaceModel(), stride=1)
    assert len(signals) == 14 and signals.face.shape[0] == 14
    assert any("24 frames" in note and "first 14" in note for note in signals.notes)


def test_all_black_pose_is_refused_unless_allowed(driving_files):
    with pytest.raises(InputError, match="no skeleton"):
        prepare_driving(SIZE, pose_video=driving_files["black_pose"])
    signals = prepare_driving(SIZE, pose_video=driving_files["black_pose"], allow_blank_pose=True)
    assert float(signals.pose.abs().max()) == 0  # exactly zero, like training's blank condition
    assert any("blank in every frame" in note for note in signals.notes)


def test_pose_estimator_runs_on_the_selected_driving_frames(driving_files, synthetic_clip):
    class ReplayEstimator:
        """Returns the synthetic clip's true keypoints for the frames it is given (matched by index
        of call), the way a real estimator would return what it sees."""

        def __init__(self):
            self.calls = 0

        def __call__(self, frames):
            self.calls += len(frames)
            return synthetic_clip["keypoints"][::3][: len(frames)]

    estimator = ReplayEstimator()
    signals = prepare_driving(SIZE, driving_video=driving_files["driving"], pose_estimator=estimator, stride=3, max_frames=5)
    assert estimator.calls == 5 and len(signals) == 5
    assert not bool(blank_frames(signals.pose).any())
    with pytest.raises(InputError, match="needs a pose"):
        prepare_driving(SIZE, driving_video=driving_files["driving"])


@pytest.mark.parametrize("kind", ["missing", "folder", "garbage", "empty"])
def test_unusable_files_are_named(tmp_path, kind):
    path = tmp_path / "pose.mp4"
    if kind == "folder":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(b"this is not an mp4 file at all" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    expected = {"missing": "does not exist", "folder": "is a folder", "garbage": "not a readable video", "empty": "empty"}[kind]
    with pytest.raises(InputError, match=expected) as caught:
        prepare_driving(SIZE, pose_video=path)
    assert str(path) in str(caught.value)


def test_unreadable_reference_image_is_named(tmp_path):
    path = tmp_path / "ref.png"
    path.write_bytes(b"\x89PNG but not really")
    with pytest.raises(InputError, match="not a readable image"):
        load_image(path)


def test_reference_of_another_aspect_ratio_is_centre_cropped(driving_files):
    image = load_image(driving_files["wide_reference"])
    reference = prepare_reference(image, (128, 64))
    assert reference.shape == (3, 128, 64) and reference.min() >= -1 and reference.max() <= 1
    red = (reference[0] > 0.5) & (reference[1] < -0.5)
    columns = torch.nonzero(red.any(dim=0)).flatten()
    assert columns.numel() > 0 and abs(float(columns.float().mean()) - 31.5) < 2  # the centre band stays centred


def test_alignment_moves_the_skeleton_onto_the_reference_body(driving_files):
    signals = prepare_driving(SIZE, pose_video=driving_files["pose"], max_frames=4)
    driving_box = skeleton_box(signals.pose)
    target = (10.0, 20.0, 40.0, 60.0)
    alignment = PoseAlignment.fit(driving_box, target)
    moved = skeleton_box(alignment.warp(signals.pose))
    expected = alignment.apply_box(driving_box)
    assert expected[1] == pytest.approx(target[1]) and expected[3] == pytest.approx(target[3])
    assert np.allclose(moved, expected, atol=2.5), (moved, expected)

    aligned = prepare_driving(SIZE, pose_video=driving_files["pose"], max_frames=4, reference_box=target)
    assert np.allclose(skeleton_box(aligned.pose), moved, atol=1e-4)


def test_reference_body_box_from_a_user_box_follows_the_resize(driving_files):
    image = load_image(driving_files["wide_reference"])  # 60 x 200 -> cover 64 x 64: scale 64/60, crop x
    box = reference_body_box(image, SIZE, box=(90, 0, 110, 60))
    resized_width = round(200 * 64 / 60)  # the frame is resized to whole pixels, then cropped
    scale_x, crop_left = resized_width / 200, (resized_width - 64) // 2
    assert box == pytest.approx((90 * scale_x - crop_left, 0, 110 * scale_x - crop_left, 64))
    with pytest.raises(InputError, match="reference box or a pose estimator"):
        reference_body_box(image, SIZE)
