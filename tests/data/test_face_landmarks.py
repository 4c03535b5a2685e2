"""68-point landmarks from a user-supplied ONNX model, with tiny ONNX models built here in both
accepted output layouts: normalised coordinates (PFLD style) and heatmaps (FAN style)."""
import json

import numpy as np
import pytest

from datapipes.face import FaceFrame, face_track_from_json
from datapipes.facetrack import IBUG_POINTS, OnnxLandmarks68, crop_fractions
from datapipes.video import encode_mp4
from tools.xdyna_data import main

SIZE, HEAT = 32, 8
BOX = (20.0, 10.0, 60.0, 40.0)   # 40 x 30: the square crop is 48 px (x 1.2) centred at (40, 25)
CROP_LEFT, CROP_TOP, CROP_SIDE = 16, 1, 48


class FixedBoxes:
    """A box source that finds the same face in every frame (or none)."""
    name = "fixed"

    def __init__(self, box=BOX):
        self.box = box

    def __call__(self, frames):
        return [None if self.box is None else FaceFrame(self.box, np.zeros((5, 2)), 0.99) for _ in frames]


def _save(graph, path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _image_input():
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, SIZE, SIZE])


def template_model(path, template: np.ndarray) -> str:
    """Outputs ``template`` (68, 2 fractions) as (1, 136), whatever the image (0 x its mean added)."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
             helper.make_node("Add", ["template", "nothing"], ["landmarks"])]
    graph = helper.make_graph(
        nodes, "template", [_image_input()],
        [helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, [1, 2 * IBUG_POINTS])],
        initializer=[helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                     helper.make_tensor("template", TensorProto.FLOAT, [1, 2 * IBUG_POINTS],
                                        template.astype(np.float32).ravel().tolist())])
    return _save(graph, path)


def bright_spot_heatmap_model(path) -> str:
    """68 identical heatmaps (1, 68, 8, 8): the image's brightest 4 x 4 cell."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ReduceMax", ["image"], ["gray"], axes=[1], keepdims=1),
             helper.make_node("MaxPool", ["gray"], ["cells"], kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("Expand", ["cells", "shape"], ["heatmaps"])]
    graph = helper.make_graph(
        nodes, "bright_spot", [_image_input()],
        [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, [1, IBUG_POINTS, HEAT, HEAT])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [4], [1, IBUG_POINTS, HEAT, HEAT])])
    return _save(graph, path)


def test_coordinate_output_maps_from_crop_fractions_to_frame_pixels(tmp_path):
    template = np.random.default_rng(0).uniform(0.1, 0.9, (IBUG_POINTS, 2))
    model = OnnxLandmarks68(template_model(tmp_path / "pfld.onnx", template), boxes=FixedBoxes())
    frames = np.zeros((2, 64, 80, 3), np.uint8)
    faces = model(frames)
    assert len(faces) == 2 and faces[0].landmark_format == "ibug68"
    expected = np.stack([CROP_LEFT + template[:, 0] * CROP_SIDE, CROP_TOP + template[:, 1] * CROP_SIDE], axis=1)
    np.testing.assert_allclose(faces[0].points, expected, atol=1e-4)
    assert faces[0].box == BOX and faces[0].score == pytest.approx(0.99)
    assert OnnxLandmarks68(template_model(tmp_path / "p2.onnx", template), boxes=FixedBoxes(None))(frames) == [None, None]


def test_heatmap_output_lands_on_the_bright_square(tmp_path):
    model = OnnxLandmarks68(bright_spot_heatmap_model(tmp_path / "fan.onnx"), boxes=FixedBoxes())
    frames = np.zeros((1, 64, 80, 3), np.uint8)
    # One crop cell is 48 / 8 = 6 px; fill cell (row 5, col 2) of the crop: x 28..33, y 31..36.
    frames[0, 31:37, 28:34] = 255
    (face,) = model(frames)
    np.testing.assert_allclose(face.points, np.tile([[28 + 3, 31 + 3]], (IBUG_POINTS, 1)), atol=1e-6)


def test_crop_fractions_of_both_layouts():
    heat = np.zeros((IBUG_POINTS, 4, 8))
    heat[:, 1, 6] = 1
    np.testing.assert_allclose(crop_fractions(heat)[0], [6.5 / 8, 1.5 / 4])
    coords = np.arange(2 * IBUG_POINTS, dtype=float)
    assert crop_fractions(coords).shape == (IBUG_POINTS, 2) and crop_fractions(coords)[1, 0] == 2


def test_bad_landmark_models_are_rejected_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.onnx"):
        OnnxLandmarks68(str(tmp_path / "no-such.onnx"), boxes=FixedBoxes())
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["out"])], "wrong", [_image_input()],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, SIZE, SIZE])])
    wrong = _save(graph, tmp_path / "wrong.onnx")
    with pytest.raises(ValueError, match="wrong.onnx.*want one"):
        OnnxLandmarks68(wrong, boxes=FixedBoxes())


def test_pack_needs_a_detector_for_the_landmark_model(tmp_path, capsys):
    video = tmp_path / "in" / "clip.mp4"
    video.parent.mkdir()
    video.write_bytes(encode_mp4(np.zeros((20, 64, 64, 3), np.uint8), 8))
    code = main(["pack", str(video.parent), "--out", str(tmp_path / "out"), "--allow-missing-pose",
                 "--face-landmarks-model", str(tmp_path / "m.onnx")])
    assert code == 2 and "needs a face detector" in capsys.readouterr().err


@pytest.mark.shared
def test_68_points_on_the_real_driving_video_around_mtcnn_faces(examples, tmp_path):
    pytest.importorskip("facenet_pytorch")
    from datapipes.facetrack import detect_face_track

    template = np.random.default_rng(1).uniform(0.2, 0.8, (IBUG_POINTS, 2))
    path = template_model(tmp_path / "pfld.onnx", template)
    data = (examples / "example_1_driving.mp4").read_bytes()
    document = detect_face_track(data, "example_1", indices=[0, 200], landmarks_model=path)
    assert document["detector"] == "mtcnn+onnx68"
    faces = face_track_from_json(json.loads(json.dumps(document)), "example_1")
    for index in (0, 200):
        face = faces[index]
        assert face is not None and face.landmark_format == "ibug68"
        x0, y0, x1, y1 = face.box
        side = max(x1 - x0, y1 - y0) * 1.2
        # Every point lies inside the square crop around MTCNN's box, where the template put it.
        assert np.all(np.abs(face.points[:, 0] - (x0 + x1) / 2) <= side / 2 + 1)
        assert np.all(np.abs(face.points[:, 1] - (y0 + y1) / 2) <= side / 2 + 1)


def test_face_track_of_a_width_decord_cannot_copy_out():
    """decord 0.6 cannot copy frames 48 px wide out of its buffers; face tracking reads them
    through read_frames like the loader does (PyAV fallback), so such clips are tracked, not lost."""
    from datapipes.facetrack import detect_face_track

    frames = np.random.default_rng(0).integers(0, 255, (6, 64, 48, 3), dtype=np.uint8)
    seen = []

    class Recording(FixedBoxes):
        def __call__(self, batch):
            seen.append(np.asarray(batch).shape)
            return super().__call__(batch)

    document = detect_face_track(encode_mp4(frames, 8.0), "narrow", detector=Recording(), chunk=4)
    assert (document["height"], document["width"]) == (64, 48)
    assert seen == [(4, 64, 48, 3), (2, 64, 48, 3)]
    assert len(face_track_from_json(json.dumps(document).encode(), "narrow")) == 6
