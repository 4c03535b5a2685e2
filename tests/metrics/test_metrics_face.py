import numpy as np
import pytest
import torch

from xdyna.metrics.face import FaceDetector, align_face, build_adaface, embed_faces, face_cosines
from xdyna.metrics.sources import VideoSource
from xdyna.metrics.weights import WeightsManifest


@pytest.fixture(scope="module")
def detector():
    return FaceDetector()


@pytest.mark.shared
@pytest.mark.parametrize("video", ["example_1_driving.mp4", "example_2_driving.mp4"])
def test_face_det_finds_the_face_in_real_frames_and_none_in_a_blank_one(examples, detector, video):
    frames = VideoSource(examples / video).read(120, 2)
    blank = torch.zeros(1, *frames.shape[1:], dtype=torch.uint8)
    found = detector(torch.cat([frames, blank]))
    assert found[0] is not None and found[1] is not None and found[2] is None
    box, landmarks = found[0].box, found[0].landmarks
    assert found[0].probability > 0.9 and landmarks.shape == (5, 2)
    # the landmarks lie inside the box, eyes above the mouth
    assert (landmarks[:, 0] >= box[0]).all() and (landmarks[:, 0] <= box[2]).all()
    assert landmarks[:2, 1].max() < landmarks[3:, 1].min()


def test_alignment_maps_landmarks_onto_the_template():
    frame = torch.zeros(3, 200, 160, dtype=torch.uint8)
    template = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]])
    landmarks = template * 1.5 + [20, 30]
    for x, y in landmarks.round().astype(int):
        frame[:, y - 1:y + 2, x - 1:x + 2] = 255
    aligned = align_face(frame, landmarks)
    assert aligned.shape == (3, 112, 112)
    for x, y in template.round().astype(int):
        assert aligned[:, y, x].mean() > 0.3  # the dot landed on its template position


def test_face_cos_policy_for_frames_without_a_face():
    pred = torch.tensor([[1.0, 0.0], [float("nan"), float("nan")], [0.0, 1.0]])
    target = torch.tensor([[1.0, 0.0]])
    assert face_cosines(pred, target, "skip").tolist() == [1.0, 0.0]
    assert face_cosines(pred, target, "zero").tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="face policy"):
        face_cosines(pred, target, "ignore")


def test_adaface_embeddings_are_unit_and_nan_without_face(tiny_manifest):
    net = build_adaface(WeightsManifest.load(tiny_manifest))
    frames = torch.randint(0, 255, (2, 3, 160, 128), dtype=torch.uint8)
    from xdyna.metrics.face import FaceDetection
    landmarks = np.array([[50.0, 60], [80, 60], [65, 80], [52, 100], [78, 100]])
    embeddings = embed_faces(net, frames, [FaceDetection(np.zeros(4), 1.0, landmarks), None])
    assert torch.linalg.vector_norm(embeddings[0]).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.isnan(embeddings[1]).all()
