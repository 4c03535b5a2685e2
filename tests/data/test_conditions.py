"""Pose rendering from keypoints and S-Face maps from face tracks."""
import numpy as np
import pytest
import torch

from datapipes.face import FaceFrame, SFaceGeometry, face_track_from_json, face_track_to_json, s_face_maps
from datapipes.pose import OPENPOSE_COLORS, render_pose, render_pose_video


def _standing_person():
    points = np.zeros((18, 3))
    coords = {0: (50, 20), 1: (50, 40), 2: (35, 42), 3: (30, 60), 4: (28, 80), 5: (65, 42), 6: (70, 60),
              7: (72, 80), 8: (42, 90), 9: (42, 120), 10: (42, 150), 11: (58, 90), 12: (58, 120),
              13: (58, 150), 14: (45, 15), 15: (55, 15), 16: (40, 18), 17: (60, 18)}
    for index, (x, y) in coords.items():
        points[index] = (x, y, 1.0)
    return points


def test_pose_uses_openpose_colours_and_leaves_the_head_out():
    points = _standing_person()
    headless = render_pose(points, 160, 100, no_head=True)
    with_head = render_pose(points, 160, 100, no_head=False)
    assert headless.shape == (160, 100, 3) and headless.dtype == np.uint8
    assert tuple(headless[150, 42]) == OPENPOSE_COLORS[10]       # right ankle point colour
    assert tuple(headless[40, 50]) == OPENPOSE_COLORS[1]          # neck
    assert headless[:30].max() == 0 and with_head[:30].max() > 0  # nothing above the neck
    assert tuple(with_head[20, 50]) == OPENPOSE_COLORS[0]         # the nose when the head is kept


def test_low_confidence_points_and_hands():
    points = _standing_person()
    points[10, 2] = 0.1   # right ankle not detected: neither it nor its limb is drawn
    frame = render_pose(points, 160, 100)
    assert frame[148:153, 40:45].max() == 0
    hands = np.zeros((42, 3))
    hands[:21] = (28, 80, 1.0)
    hands[:21, 1] += np.arange(21)   # a vertical "hand" below the right wrist
    with_hands = render_pose(np.concatenate([points, hands]), 160, 100)
    assert with_hands[90:100, 26:31].max() > 0 and frame[90:100, 26:31].max() == 0
    video = render_pose_video(np.stack([points, points]), 160, 100)
    assert video.shape == (2, 160, 100, 3)
    with pytest.raises(ValueError, match="keypoints"):
        render_pose(np.zeros((17, 3)), 10, 10)


def _face68(cx=50.0, cy=40.0, side=20.0):
    rng = np.random.default_rng(0)
    points = rng.uniform(-side / 2, side / 2, size=(68, 2)) + (cx, cy)
    points[0], points[16] = (cx - side / 2, cy), (cx + side / 2, cy)     # landmark box = side x side
    points[8], points[19] = (cx, cy + side / 2), (cx, cy - side / 2)
    points[36:42] = (cx - 5, cy - 3)
    points[42:48] = (cx + 5, cy - 3)
    points[48:68] = (cx, cy + 6)
    return FaceFrame((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), points)


def test_s_face_maps_mask_the_frame_to_the_enlarged_box_and_the_patches():
    frames = torch.rand(2, 3, 100, 100) * 0.5 + 0.5   # strictly positive
    face = _face68()
    maps = s_face_maps(frames, [face, None])
    assert maps.shape == (2, 6, 100, 100)
    assert maps[1].abs().sum() == 0                  # no face -> exact zeros
    x0, y0, x1, y1 = SFaceGeometry().global_box(face)
    assert (x0, y0, x1, y1) == pytest.approx((50 - 13.5, 40 - 12.5, 50 + 13.5, 40 + 14.5))
    inside = maps[0, :3, int(y0) + 1:int(y1) - 1, int(x0) + 1:int(x1) - 1]
    assert torch.equal(inside, frames[0, :, int(y0) + 1:int(y1) - 1, int(x0) + 1:int(x1) - 1])
    assert maps[0, :3, :int(y0) - 1].abs().sum() == 0 and maps[0, :3, :, int(x1) + 2:].abs().sum() == 0
    local = maps[0, 3:].amax(0) > 0
    assert local[37, 45] and local[37, 55] and local[46, 50]     # both eyes and the mouth
    assert not local[40, 50] and not local[30, 30]                # between them: zero
    assert local.sum() < (maps[0, :3].amax(0) > 0).sum()


def test_face_track_json_round_trip_and_errors():
    five = FaceFrame((10, 10, 30, 34), np.array([[15, 18], [25, 18], [20, 24], [16, 29], [24, 29.0]]), 0.99)
    document = face_track_to_json([five, None], 64, 48, detector="mtcnn")
    track = face_track_from_json(document)
    assert track[1] is None and np.allclose(track[0].points, five.points)
    assert np.allclose(track[0].eye_and_mouth_centres(), [[15, 18], [25, 18], [20, 29]])
    document["frames"][0]["points"] = [[1, 2]] * 7
    with pytest.raises(ValueError, match="clip.face.json"):
        face_track_from_json(document, "clip.face.json")


def test_face_landmarks_in_pose_draws_each_face_into_its_pose_frame(portrait_shards):
    """w/lmk ablation: the same clips, with the face.json landmarks drawn white into the pose."""
    from datapipes.loader import build_clip_loader
    from tests.data.conftest import loader_config

    base = dict(scene_probability=0.0, crop="center", output_dtype="uint8", batches_per_epoch=2)
    plain = next(iter(build_clip_loader(loader_config(portrait_shards, **base), 0, 1)))
    marked = next(iter(build_clip_loader(loader_config(portrait_shards, face_landmarks_in_pose=True, **base), 0, 1)))
    assert plain["__key__"] == marked["__key__"]
    torch.testing.assert_close(plain["video"], marked["video"])
    white = (marked["pose"] == 255).all(dim=2)  # (B, F, H, W)
    changed = (marked["pose"] != plain["pose"]).any(dim=2)
    # Every frame gains white landmark pixels, and only white pixels were added.
    assert white.flatten(2).any(-1).all()
    assert torch.equal(changed & ~white, torch.zeros_like(changed))
    assert not (plain["pose"] == 255).all(dim=2).any()
