"""The DWPose ONNX estimator plumbing, with a tiny ONNX model built here: it "finds" the brightest
column and row of its input, so every keypoint lands on a bright square we draw in the frame.
It has DWPose's interface: one (1, 3, h, w) input, SimCC outputs (1, 133, 2w) and (1, 133, 2h)."""
import json

import numpy as np
import pytest

from datapipes import shards
from datapipes.pose import BODY_POINTS, HAND_POINTS
from datapipes.pose_estimator import to_openpose
from datapipes.video import encode_mp4
from tools.xdyna_data import main

INPUT_HEIGHT, INPUT_WIDTH, KEYPOINTS = 32, 24, 133


def _bright_spot_model(path) -> str:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    def axis_profile(axes, length, name):
        """(1, 3, h, w) -> max over the other axes -> (1, 133, 2 * length) SimCC scores."""
        return [
            helper.make_node("ReduceMax", ["image"], [f"{name}_max"], axes=axes, keepdims=1),
            helper.make_node("Reshape", [f"{name}_max", f"{name}_row_shape"], [f"{name}_row"]),
            helper.make_node("Expand", [f"{name}_row", f"{name}_all_shape"], [f"{name}_all"]),
            helper.make_node("Resize", [f"{name}_all", "", "twice_along_last"], [name], mode="nearest"),
        ], [
            helper.make_tensor(f"{name}_row_shape", TensorProto.INT64, [3], [1, 1, length]),
            helper.make_tensor(f"{name}_all_shape", TensorProto.INT64, [3], [1, KEYPOINTS, length]),
        ]

    nodes_x, constants_x = axis_profile([1, 2], INPUT_WIDTH, "simcc_x")
    nodes_y, constants_y = axis_profile([1, 3], INPUT_HEIGHT, "simcc_y")
    graph = helper.make_graph(
        nodes_x + nodes_y, "bright_spot",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, INPUT_HEIGHT, INPUT_WIDTH])],
        [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [1, KEYPOINTS, 2 * INPUT_WIDTH]),
         helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [1, KEYPOINTS, 2 * INPUT_HEIGHT])],
        initializer=constants_x + constants_y + [
            helper.make_tensor("twice_along_last", TensorProto.FLOAT, [3], [1.0, 1.0, 2.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by older onnxruntime releases too
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _frames_with_square(centres, height=64, width=48, half=3) -> np.ndarray:
    frames = np.zeros((len(centres), height, width, 3), dtype=np.uint8)
    for frame, (x, y) in zip(frames, centres):
        frame[y - half:y + half + 1, x - half:x + half + 1] = 255
    return frames


CENTRES = [(10, 12), (24, 32), (37, 50), (30, 20)]


def test_keypoints_land_on_the_bright_square_in_frame_pixels(tmp_path):
    from datapipes.pose_estimator import DWPoseOnnx

    estimator = DWPoseOnnx(_bright_spot_model(tmp_path / "spot.onnx"))
    keypoints = estimator(_frames_with_square(CENTRES))
    assert keypoints.shape == (len(CENTRES), BODY_POINTS + 2 * HAND_POINTS, 3)
    # A 64x48 frame padded by 1.25 is an 80x60 crop: one model pixel is 2.5 frame pixels.
    for points, (x, y) in zip(keypoints, CENTRES):
        assert np.abs(points[:, 0] - x).max() <= 2.5 and np.abs(points[:, 1] - y).max() <= 2.5
        assert points[:, 2].min() > 2  # a normalised white pixel scores about 2.2


def test_wholebody_points_map_to_openpose_body_and_hands():
    points = np.stack([np.arange(KEYPOINTS), np.arange(KEYPOINTS) + 1000, np.full(KEYPOINTS, 0.9)], axis=1)
    points[5, 2] = 0.2  # left shoulder barely seen: no neck either
    mapped = to_openpose(points.astype(float))
    assert mapped.shape == (60, 3)
    assert list(mapped[[0, 2, 5, 8, 11, 14, 15, 16, 17], 0]) == [0, 6, 5, 12, 11, 2, 1, 4, 3]
    assert mapped[1, 0] == 5.5 and mapped[1, 2] == pytest.approx(0.2)  # neck between the shoulders
    assert list(mapped[BODY_POINTS:, 0]) == list(range(91, 133))  # left hand, then right hand
    with pytest.raises(ValueError, match="want 17"):
        to_openpose(points[:20])


def test_pack_estimates_pose_for_human_clips_without_one(tmp_path, capsys):
    model = _bright_spot_model(tmp_path / "spot.onnx")
    folder = tmp_path / "videos"
    folder.mkdir()
    centres = [(10 + 2 * i, 12 + 3 * i) for i in range(16)]
    (folder / "dancer.mp4").write_bytes(encode_mp4(_frames_with_square(centres, half=4), 8))
    out = tmp_path / "shards"
    assert main(["pack", str(folder), "--out", str(out), "--workers", "1", "--min-height", "32",
                 "--min-width", "32", "--pose-estimator", "dwpose", "--pose-model", model]) == 0, capsys.readouterr()
    reader = shards.TarSampleReader(shards.expand_shard_urls(str(out)))
    (sample,) = list(reader.iter_shard(0))
    reader.close()
    document = json.loads(sample.members[shards.POSE_KEYPOINTS])
    assert document["estimator"] == "dwpose" and (document["height"], document["width"]) == (64, 48)
    keypoints = np.asarray(document["keypoints"])
    assert keypoints.shape == (16, 60, 3)
    expected = np.asarray(centres, dtype=float)
    assert np.abs(keypoints[:, :, :2] - expected[:, None, :]).max() <= 3.0  # H.264 blurs the edges


def _dancer_folder(tmp_path):
    """A folder with one 16-frame human clip and no pose: what --pose-estimator has to fill in."""
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "dancer.mp4").write_bytes(encode_mp4(_frames_with_square(CENTRES * 4), 8))
    return folder


def test_missing_pose_model_is_a_one_line_error_naming_it_and_the_weights(tmp_path, capsys):
    folder = _dancer_folder(tmp_path)
    missing = tmp_path / "dw-ll_ucoco_384.onnx"
    code = main(["pack", str(folder), "--out", str(tmp_path / "o"), "--workers", "1",
                 "--pose-estimator", "dwpose", "--pose-model", str(missing)])
    error = capsys.readouterr().err
    assert code == 2 and str(missing) in error and "yzd-v/DWPose" in error and error.count("\n") == 1
    assert not (tmp_path / "o").exists()  # nothing is written before the model is found
    assert main(["pack", str(folder), "--out", str(tmp_path / "o"), "--pose-estimator", "dwpose"]) == 2
    assert "--pose-model" in capsys.readouterr().err


DETECTOR_SIZE, CLASSES = 64, 80
ANCHORS = sum((DETECTOR_SIZE // s) ** 2 for s in (8, 16, 32))   # 64 + 16 + 4


def _blue_finder_yolox(path) -> str:
    """A YOLOX-shaped detector (1, 3, 64, 64) -> (1, 84, 85) raw predictions: the stride-8 anchors'
    objectness is the max of the input's channel 0 over their 8 x 8 cell (channel 0 is blue when
    the input is BGR, as DWPose feeds YOLOX), class = person, offsets 0, size 8 px; every other
    anchor scores 0."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    cells = (DETECTOR_SIZE // 8) ** 2
    nodes = [
        helper.make_node("Gather", ["image", "channel0"], ["first"], axis=1),            # (1, 1, 64, 64)
        helper.make_node("MaxPool", ["first"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Reshape", ["pooled", "column"], ["objectness"]),                # (1, 64, 1)
        helper.make_node("Concat", ["zeros4", "objectness", "ones1", "zeros79"], ["fine"], axis=2),
        helper.make_node("Concat", ["fine", "coarse"], ["raw"], axis=1),                  # (1, 84, 85)
    ]
    constants = [
        helper.make_tensor("channel0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("column", TensorProto.INT64, [3], [1, cells, 1]),
        helper.make_tensor("zeros4", TensorProto.FLOAT, [1, cells, 4], [0.0] * cells * 4),
        helper.make_tensor("ones1", TensorProto.FLOAT, [1, cells, 1], [1.0] * cells),
        helper.make_tensor("zeros79", TensorProto.FLOAT, [1, cells, CLASSES - 1], [0.0] * cells * (CLASSES - 1)),
        helper.make_tensor("coarse", TensorProto.FLOAT, [1, ANCHORS - cells, 5 + CLASSES],
                           [0.0] * (ANCHORS - cells) * (5 + CLASSES)),
    ]
    graph = helper.make_graph(
        nodes, "blue_finder",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, DETECTOR_SIZE, DETECTOR_SIZE])],
        [helper.make_tensor_value_info("raw", TensorProto.FLOAT, [1, ANCHORS, 5 + CLASSES])],
        initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def test_yolox_person_box_is_decoded_through_the_letterbox_and_reads_bgr(tmp_path):
    from datapipes.pose_estimator import YoloxPersonBox

    detector = YoloxPersonBox(_blue_finder_yolox(tmp_path / "yolox.onnx"), min_score=200)
    # 48 x 96 frame -> letterboxed x 2/3 into 64 x 64 (rows 32..63 are padding, 114 < min_score).
    frame = np.zeros((48, 96, 3), np.uint8)
    frame[30:36, 66:72] = (0, 0, 255)   # blue, centre (69, 33): letterboxed (46, 22): cell (5, 2)
    frame[6:12, 12:18] = (255, 0, 0)    # red: invisible to a detector reading BGR channel 0
    x0, y0, x1, y1 = detector(frame)
    # Cell (5, 2) of stride 8, offsets 0: centre at its corner (40, 16), 8 px box -> (36, 12, 44, 20)
    # letterboxed, x 1.5 in the frame.
    assert (x0, y0, x1, y1) == pytest.approx((54.0, 18.0, 66.0, 30.0))
    assert detector(np.zeros((48, 96, 3), np.uint8)) is None   # nobody scores min_score


def test_dwpose_crops_around_the_detected_person(tmp_path):
    from datapipes.pose_estimator import DWPoseOnnx, YoloxPersonBox

    frame = np.zeros((64, 96, 3), np.uint8)
    # The "person": blue, inside one detector cell (letterboxed x 2/3: cell (6, 3)); an 8 px box at
    # the cell's corner (48, 24) is (66, 30, 78, 42) in the frame, and the padded crop covers the square.
    frame[40:46, 78:84] = (0, 0, 255)
    frame[5:8, 5:8] = (0, 0, 200)       # a dimmer blue patch outside the person's box
    box = YoloxPersonBox(_blue_finder_yolox(tmp_path / "yolox.onnx"), min_score=220)
    estimator = DWPoseOnnx(_bright_spot_model(tmp_path / "spot.onnx"), person_box=box)
    (points,) = estimator(frame[None])
    # On the 6 px square (the spot model takes its first brightest column and row; one model
    # pixel is 0.625 frame pixels in this 15 x 20 crop).
    assert np.all((78 - 1 <= points[:, 0]) & (points[:, 0] <= 84)) and np.all((40 - 1 <= points[:, 1]) & (points[:, 1] <= 46))
    assert box(frame) == pytest.approx((66.0, 30.0, 78.0, 42.0))


def test_wrong_yolox_model_is_rejected_naming_it(tmp_path):
    from datapipes.pose_estimator import YoloxPersonBox

    with pytest.raises(FileNotFoundError, match="yolox_l.onnx"):
        YoloxPersonBox(str(tmp_path / "missing.onnx"))
    with pytest.raises(ValueError, match="spot.onnx.*raw predictions"):
        YoloxPersonBox(_bright_spot_model(tmp_path / "spot.onnx"))


def test_pack_with_a_missing_person_detector_stops_naming_it(tmp_path, capsys):
    folder = _dancer_folder(tmp_path)
    missing = tmp_path / "yolox_l.onnx"
    code = main(["pack", str(folder), "--out", str(tmp_path / "o"), "--pose-estimator", "dwpose",
                 "--pose-model", _bright_spot_model(tmp_path / "spot.onnx"), "--pose-detector-model", str(missing)])
    error = capsys.readouterr().err
    assert code == 2 and str(missing) in error and "yzd-v/DWPose" in error
    assert not (tmp_path / "o").exists()
