"""Pluggable pose estimators: video frames -> keypoints in the layout :mod:`datapipes.pose` renders.

The built-in one is DWPose's whole-body model (an RTMPose with SimCC outputs) run through
onnxruntime from a local ``.onnx`` file; xdyna never downloads weights. DWPose's release file is
``dw-ll_ucoco_384.onnx`` (https://huggingface.co/yzd-v/DWPose, Apache-2.0); fetch it yourself and
pass its path. Install the runtime with ``pip install onnxruntime`` (or ``onnxruntime-gpu``).

DWPose proper first finds people with a YOLOX detector: :class:`YoloxPersonBox` runs DWPose's
``yolox_l.onnx`` (same page) from a local file and hands the best person box to the pose model.
Without it the person box is the whole frame (X-Dyna's clips show one dancer).
"""
from __future__ import annotations

import functools
from typing import Callable, Protocol

import numpy as np
from PIL import Image

from datapipes.onnx_session import load_onnx_session, providers_for
from datapipes.pose import HAND_POINTS

DWPOSE_WEIGHTS_HINT = ("DWPose weights are the file dw-ll_ucoco_384.onnx from "
                       "https://huggingface.co/yzd-v/DWPose (download it yourself; xdyna never downloads)")
# RTMPose/DWPose input normalisation (RGB, ImageNet statistics) and box padding.
MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
BOX_PADDING = 1.25
# COCO(-WholeBody) keypoint indices: body 0-16, feet 17-22, face 23-90, left hand 91-111,
# right hand 112-132. OpenPose-18 order from COCO-17, with the neck (OpenPose point 1) being the
# mean of the shoulders, as DWPose's own conversion does.
COCO_TO_OPENPOSE = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
COCO_SHOULDERS = (5, 6)
WHOLEBODY_LEFT_HAND = 91
WHOLEBODY_POINTS = 133
COCO_BODY_POINTS = 17


class PoseEstimator(Protocol):
    """Frames ``uint8 (T, H, W, 3)`` RGB -> keypoints ``float (T, K, 3)`` ``(x, y, confidence)``
    in the frames' pixels, K = 18 (OpenPose body) or 60 (+ left and right 21-point hands)."""
    name: str

    def __call__(self, frames: np.ndarray) -> np.ndarray: ...


YOLOX_WEIGHTS_HINT = ("DWPose's person detector is the file yolox_l.onnx from "
                      "https://huggingface.co/yzd-v/DWPose (download it yourself; xdyna never downloads)")
YOLOX_STRIDES = (8, 16, 32)
YOLOX_PAD_VALUE = 114.0
PERSON_CLASS = 0


class YoloxPersonBox:
    """The most confident person box of a frame from a YOLOX ONNX detector (DWPose's
    ``yolox_l.onnx``, COCO classes, person = 0); ``None`` when no person scores ``min_score``.

    ``model_path``: a local ``.onnx`` file with one input ``(1, 3, S, S)`` and one output
    ``(1, N, 5 + classes)`` of raw grid predictions (N = sum of (S / s)^2 over strides 8, 16, 32),
    decoded here as YOLOX does. Input: the frame letterboxed into S x S (scaled to fit, padded
    with 114 at the right and bottom), BGR, 0..255, as DWPose feeds it.
    """

    def __init__(self, model_path: str, min_score: float = 0.3, providers: list[str] | None = None):
        self.session = load_onnx_session(model_path, "YOLOX person detector", YOLOX_WEIGHTS_HINT, providers)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape, out_shape = inputs[0].shape, outputs[0].shape if outputs else ()
        size = shape[2] if len(shape) == 4 and isinstance(shape[2], int) and shape[2] == shape[3] else None
        anchors = sum((size // stride) ** 2 for stride in YOLOX_STRIDES) if size else None
        if (len(inputs) != 1 or size is None or len(outputs) != 1 or len(out_shape) != 3
                or out_shape[1] != anchors or not isinstance(out_shape[2], int) or out_shape[2] < 6):
            raise ValueError(f"YOLOX model {model_path!r}: want one (1, 3, S, S) input and one (1, N, 5 + classes) "
                             f"output of raw predictions for strides {YOLOX_STRIDES}; got inputs "
                             f"{[i.shape for i in inputs]}, outputs {[o.shape for o in outputs]}")
        self.input_name, self.size, self.min_score = inputs[0].name, size, min_score
        grids, strides = [], []
        for stride in YOLOX_STRIDES:
            cells = size // stride
            ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
            grids.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
            strides.append(np.full((cells * cells, 1), stride))
        self.grid, self.stride = np.concatenate(grids).astype(np.float32), np.concatenate(strides).astype(np.float32)

    def __call__(self, frame: np.ndarray) -> tuple[float, float, float, float] | None:
        boxes, scores = self.detect(frame)
        best = int(np.argmax(scores))
        if scores[best] < self.min_score:
            return None
        height, width = frame.shape[:2]
        x0, y0, x1, y1 = boxes[best].tolist()
        return max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)

    def detect(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every candidate person box ``(N, 4)`` in frame pixels and its score (``datapipes.curate``
        counts people from them)."""
        height, width = frame.shape[:2]
        ratio = min(self.size / height, self.size / width)
        resized = Image.fromarray(frame).resize((max(1, round(width * ratio)), max(1, round(height * ratio))),
                                                Image.BILINEAR)
        canvas = np.full((self.size, self.size, 3), YOLOX_PAD_VALUE, dtype=np.float32)
        canvas[:resized.height, :resized.width] = np.asarray(resized, dtype=np.float32)
        tensor = canvas[:, :, ::-1].transpose(2, 0, 1)[None]  # RGB -> BGR, HWC -> NCHW
        (raw,) = self.session.run(None, {self.input_name: np.ascontiguousarray(tensor)})
        boxes, scores = decode_yolox(raw[0], self.grid, self.stride)
        return boxes / ratio, scores


def decode_yolox(raw: np.ndarray, grid: np.ndarray, stride: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """YOLOX raw predictions ``(N, 5 + C)`` -> person boxes ``(N, 4)`` x0 y0 x1 y1 in input pixels
    and their scores (objectness x person probability)."""
    centres = (raw[:, :2] + grid) * stride
    sizes = np.exp(raw[:, 2:4]) * stride
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    return boxes, raw[:, 4] * raw[:, 5 + PERSON_CLASS]


class DWPoseOnnx:
    """DWPose (or any RTMPose SimCC model with 17 or 133 COCO keypoints) through onnxruntime.

    ``model_path``: a local ``.onnx`` file with one input ``(1, 3, h, w)`` and two outputs
    ``simcc_x (1, K, w * r)`` and ``simcc_y (1, K, h * r)`` (r = SimCC split ratio, 2 for DWPose).
    ``person_box(frame) -> (x0, y0, x1, y1) or None``: where the person is (e.g.
    :class:`YoloxPersonBox`); the whole frame without one or when it returns ``None``.
    """
    name = "dwpose"

    def __init__(self, model_path: str, person_box: Callable[[np.ndarray], tuple] | None = None,
                 providers: list[str] | None = None):
        self.session = load_onnx_session(model_path, "DWPose", DWPOSE_WEIGHTS_HINT, providers)
        self.model_path, self.person_box = model_path, person_box
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape
        if len(inputs) != 1 or len(shape) != 4 or not all(isinstance(v, int) for v in shape[2:]) or len(outputs) != 2:
            raise ValueError(f"DWPose model {model_path!r}: want one (1, 3, h, w) input with fixed h, w and "
                             f"two SimCC outputs, got inputs {[i.shape for i in inputs]}, "
                             f"outputs {[o.shape for o in outputs]}")
        self.input_name = inputs[0].name
        self.input_height, self.input_width = shape[2], shape[3]

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"DWPoseOnnx wants uint8 (T, H, W, 3) frames, got {frames.dtype} {frames.shape}")
        return np.stack([self._frame(frame) for frame in frames])

    def _frame(self, frame: np.ndarray) -> np.ndarray:
        height, width = frame.shape[:2]
        box = self.person_box(frame) if self.person_box else None
        if box is None:  # no detector, or it found nobody: the whole frame
            box = (0.0, 0.0, float(width), float(height))
        x0, y0, crop_width, crop_height = _padded_box(box, self.input_width / self.input_height)
        # Crop (zero padding outside the frame) and resize: DWPose's affine warp without rotation.
        crop = Image.fromarray(frame).crop((x0, y0, x0 + crop_width, y0 + crop_height))
        crop = np.asarray(crop.resize((self.input_width, self.input_height), Image.BILINEAR), dtype=np.float32)
        tensor = ((crop - MEAN) / STD).transpose(2, 0, 1)[None]
        simcc_x, simcc_y = self.session.run(None, {self.input_name: np.ascontiguousarray(tensor)})
        points = decode_simcc(simcc_x[0], simcc_y[0], self.input_width, self.input_height)
        points[:, 0] = points[:, 0] * crop_width / self.input_width + x0
        points[:, 1] = points[:, 1] * crop_height / self.input_height + y0
        return to_openpose(points)


def _padded_box(box, aspect: float) -> tuple[int, int, int, int]:
    """``(x0, y0, width, height)`` of ``box`` grown by BOX_PADDING and widened or heightened to
    the model's aspect ratio around its centre (whole pixels: the crop is taken on the pixel grid)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    center_x, center_y = (x0 + x1) / 2, (y0 + y1) / 2
    box_width, box_height = (x1 - x0) * BOX_PADDING, (y1 - y0) * BOX_PADDING
    if box_width > box_height * aspect:
        box_height = box_width / aspect
    else:
        box_width = box_height * aspect
    left, top = round(center_x - box_width / 2), round(center_y - box_height / 2)
    return left, top, max(1, round(box_width)), max(1, round(box_height))


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, input_width: int, input_height: int) -> np.ndarray:
    """``(K, w * r)`` and ``(K, h * r)`` SimCC scores -> ``(K, 3)`` ``(x, y, score)`` in input
    pixels; the score is the smaller of the two maxima (as DWPose does)."""
    ratio_x, ratio_y = simcc_x.shape[1] / input_width, simcc_y.shape[1] / input_height
    if simcc_x.shape[0] != simcc_y.shape[0] or ratio_x != ratio_y:
        raise ValueError(f"SimCC outputs {simcc_x.shape} and {simcc_y.shape} do not fit a "
                         f"{input_height}x{input_width} input with one split ratio")
    x = simcc_x.argmax(axis=1) / ratio_x
    y = simcc_y.argmax(axis=1) / ratio_y
    score = np.minimum(simcc_x.max(axis=1), simcc_y.max(axis=1))
    return np.stack([x, y, score], axis=1).astype(np.float64)


def to_openpose(points: np.ndarray) -> np.ndarray:
    """COCO-17 ``(17, 3)`` -> OpenPose-18 ``(18, 3)``; COCO-WholeBody ``(133, 3)`` -> OpenPose-18
    plus left and right hands ``(60, 3)`` (feet and face points are not rendered)."""
    if points.shape[0] not in (COCO_BODY_POINTS, WHOLEBODY_POINTS):
        raise ValueError(f"pose model gives {points.shape[0]} keypoints; want 17 (COCO) or 133 (COCO-WholeBody)")
    neck = points[list(COCO_SHOULDERS)].mean(axis=0)
    neck[2] = points[list(COCO_SHOULDERS), 2].min()  # a neck only where both shoulders are seen
    body = np.stack([neck if index is None else points[index] for index in COCO_TO_OPENPOSE])
    if points.shape[0] == COCO_BODY_POINTS:
        return body
    hands = points[WHOLEBODY_LEFT_HAND:WHOLEBODY_LEFT_HAND + 2 * HAND_POINTS]
    return np.concatenate([body, hands])


ESTIMATORS = ("dwpose",)


def make_pose_estimator(name: str, model_path: str | None, detector_path: str | None = None,
                        device: str = "cpu") -> PoseEstimator:
    """``dwpose`` from a local model file, with the YOLOX person detector when ``detector_path`` is given,
    on ``device`` (``cuda``: onnxruntime-gpu's CUDA provider)."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown pose estimator {name!r}; known: {ESTIMATORS}")
    if not model_path:
        raise ValueError(f"pose estimator {name!r} needs a model file (--pose-model PATH); {DWPOSE_WEIGHTS_HINT}")
    providers = providers_for(device)
    return DWPoseOnnx(model_path, person_box=YoloxPersonBox(detector_path, providers=providers) if detector_path else None,
                      providers=providers)


# One estimator per process and model: sessions are expensive to create.
load_pose_estimator = functools.lru_cache(maxsize=2)(make_pose_estimator)


def estimate_keypoints(video: bytes, name: str, estimator: PoseEstimator, chunk: int = 16) -> np.ndarray:
    """``(T, K, 3)`` keypoints for every frame of ``video``, decoded in chunks to bound memory."""
    from datapipes.video import open_video, read_frames

    reader = open_video(video, name)
    count = len(reader)
    return np.concatenate([estimator(read_frames(reader, range(start, min(start + chunk, count)), name, video))
                           for start in range(0, count, chunk)])
