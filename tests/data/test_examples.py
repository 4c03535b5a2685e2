"""The real X-Dyna example driving and pose videos from ../shared (skipped when absent)."""
import json

import numpy as np
import pytest

from datapipes.loader import build_clip_loader
from tests.data.conftest import loader_config
from tools.xdyna_data import main

pytestmark = pytest.mark.shared


def test_pack_inspect_load_real_examples(examples, tmp_path, capsys):
    manifest = tmp_path / "examples.jsonl"
    manifest.write_text("".join(json.dumps({
        "video": str(examples / f"example_{i}_driving.mp4"), "pose_video": str(examples / f"example_{i}_pose.mp4"),
        "key": f"example-{i}", "license": "Apache-2.0"}) + "\n" for i in (1, 2)))
    out = tmp_path / "shards"
    assert main(["pack", str(manifest), "--out", str(out), "--workers", "1", "--verify", "open"]) == 0
    assert "packed 2 clip(s)" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json", "--verify", "open", "--workers", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 2 and report["resolutions"] == {"896x512": 2} and report["failures"] == []
    cfg = loader_config(str(out), resample=False, num_frames=2, frame_stride=2, height=224, width=128,
                        batch_size=2, reference="outside")
    (batch,) = list(build_clip_loader(cfg, 0, 1))
    assert sorted(batch["__key__"]) == ["example-1", "example-2"]
    assert batch["video"].shape == (2, 2, 3, 224, 128) and not batch["is_scene"].any()
    # the skeleton lies on the person: where the pose is drawn the frame is not the mean background
    pose_mask = batch["pose"].amax(dim=2) > 0.2
    assert pose_mask.float().mean() > 0.005


def test_mtcnn_face_track_on_the_driving_video(examples):
    pytest.importorskip("facenet_pytorch", reason="facenet-pytorch not installed (pip install --no-deps facenet-pytorch)")
    from datapipes.facetrack import MTCNNFaces, detect_face_track
    from datapipes.face import face_track_from_json

    data = (examples / "example_1_driving.mp4").read_bytes()
    document = detect_face_track(data, "example_1", indices=[0, 200])
    faces = face_track_from_json(document)
    assert len(faces) == 571 and document["landmarks"] == "mtcnn5"
    for index in (0, 200):
        face = faces[index]
        assert face is not None and face.score > 0.9
        x0, y0, x1, y1 = face.box
        assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 896 and 20 < x1 - x0 < 300
        left_eye, right_eye, mouth = face.eye_and_mouth_centres()
        assert x0 <= left_eye[0] < right_eye[0] <= x1 and left_eye[1] < mouth[1] <= y1
    assert faces[1] is None   # not asked for
    assert MTCNNFaces()(np.zeros((1, 128, 96, 3), np.uint8)) == [None]   # no face in a blank frame
