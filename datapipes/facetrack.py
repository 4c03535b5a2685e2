"""Face tracks for S-Face maps.

Default detector: facenet-pytorch's MTCNN, whose weights ship inside its wheel (nothing is
downloaded); it gives a box and 5 landmarks (eyes, nose, mouth corners) per face, enough for the
S-Face global box and the eye and mouth patch centres. Install it with
``pip install --no-deps facenet-pytorch`` (its pins are old; it needs torch and torchvision).
68-point (iBUG) landmarks come from a user-supplied ONNX model through :class:`OnnxLandmarks68`
(run on the faces MTCNN finds), or from any :class:`LandmarkModel`.
"""
from __future__ import annotations

import functools
from typing import Protocol

import numpy as np
from PIL import Image

from datapipes.face import FaceFrame, face_track_to_json
from datapipes.onnx_session import load_onnx_session
from datapipes.video import open_video, read_frames


class LandmarkModel(Protocol):
    """A user-supplied landmark model: frames ``uint8 (T, H, W, 3)`` -> one face or ``None``
    per frame, in the frames' pixels (68 or 5 points)."""
    name: str

    def __call__(self, frames: np.ndarray) -> list[FaceFrame | None]: ...


class MTCNNFaces:
    """MTCNN on frames downscaled to ``max_side``; keeps the most confident face per frame."""
    name = "mtcnn"

    def __init__(self, max_side: int = 512, min_score: float = 0.9, device: str = "cpu"):
        try:
            from facenet_pytorch import MTCNN
        except ImportError as error:
            raise ImportError("face tracks need facenet-pytorch: pip install --no-deps facenet-pytorch "
                              f"(and torchvision) ({error})") from None
        self.detector = MTCNN(keep_all=True, device=device)
        self.max_side, self.min_score = max_side, min_score

    def __call__(self, frames: np.ndarray) -> list[FaceFrame | None]:
        import torch
        import torch.nn.functional as F

        height, width = frames.shape[1:3]
        scale = min(1.0, self.max_side / max(height, width))
        batch = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
        if scale < 1.0:
            batch = F.interpolate(batch, scale_factor=scale, mode="bilinear", antialias=True)
        small = batch.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()
        faces: list[FaceFrame | None] = []
        with torch.inference_mode():
            boxes, scores, points = self.detector.detect(list(small), landmarks=True)
        for frame_boxes, frame_scores, frame_points in zip(boxes, scores, points):
            if frame_boxes is None or len(frame_boxes) == 0:
                faces.append(None)
                continue
            best = int(np.argmax(frame_scores))
            if frame_scores[best] < self.min_score:
                faces.append(None)
                continue
            box = tuple(float(v) / scale for v in frame_boxes[best])
            faces.append(FaceFrame(box, np.asarray(frame_points[best], dtype=np.float64) / scale,
                                   float(frame_scores[best])))
        return faces


IBUG_POINTS = 68
# Input scalings of 68-point models: PFLD and FAN take x / 255, others ImageNet statistics.
INPUT_SCALINGS = ("unit", "imagenet", "raw")
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class OnnxLandmarks68:
    """A user-supplied 68-point (iBUG) landmark model run through onnxruntime on each frame's face.

    ``model_path``: a local ``.onnx`` file with one input ``(1, 3, S, S)`` (fixed S) and one
    output, either coordinates ``(1, 136)`` / ``(1, 68, 2)`` as fractions of the crop (PFLD
    style) or heatmaps ``(1, 68, h, w)`` (FAN style; the peak cell's centre is taken).
    ``boxes``: where the faces are (default :class:`MTCNNFaces`; its box and score are kept).
    ``crop_scale``: the square crop's side as a multiple of the box's longer side, around the
    box centre (parts outside the frame are black). xdyna never downloads the model.
    """
    name = "mtcnn+onnx68"

    def __init__(self, model_path: str, boxes: LandmarkModel | None = None, crop_scale: float = 1.2,
                 input_scaling: str = "unit", providers: list[str] | None = None):
        if input_scaling not in INPUT_SCALINGS:
            raise ValueError(f"input_scaling must be one of {INPUT_SCALINGS}, got {input_scaling!r}")
        self.session = load_onnx_session(model_path, "68-point landmark",
                                         "xdyna never downloads weights; pass a local .onnx file", providers)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape
        out_shape = tuple(outputs[0].shape[1:]) if outputs else ()
        square_input = (len(inputs) == 1 and len(shape) == 4 and all(isinstance(v, int) for v in shape[2:])
                        and shape[2] == shape[3])
        known_output = len(outputs) == 1 and (out_shape in ((2 * IBUG_POINTS,), (IBUG_POINTS, 2))
                                              or (len(out_shape) == 3 and out_shape[0] == IBUG_POINTS))
        if not (square_input and known_output):
            raise ValueError(f"68-point landmark model {model_path!r}: want one (1, 3, S, S) input and one output "
                             f"(1, 136), (1, 68, 2) or (1, 68, h, w); got inputs {[i.shape for i in inputs]}, "
                             f"outputs {[o.shape for o in outputs]}")
        self.model_path, self.input_name, self.input_size = model_path, inputs[0].name, shape[2]
        self.boxes = boxes if boxes is not None else MTCNNFaces()
        self.crop_scale, self.input_scaling = float(crop_scale), input_scaling
        self.name = f"{self.boxes.name}+onnx68"

    def __call__(self, frames: np.ndarray) -> list[FaceFrame | None]:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"OnnxLandmarks68 wants uint8 (T, H, W, 3) frames, got {frames.dtype} {frames.shape}")
        return [None if face is None else self._landmarks(frame, face)
                for frame, face in zip(frames, self.boxes(frames))]

    def _landmarks(self, frame: np.ndarray, face: FaceFrame) -> FaceFrame:
        x0, y0, x1, y1 = face.box
        side = max(1, round(max(x1 - x0, y1 - y0) * self.crop_scale))
        left, top = round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2)
        size = self.input_size
        crop = Image.fromarray(frame).crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
        pixels = np.asarray(crop, dtype=np.float32)
        if self.input_scaling != "raw":
            pixels = pixels / 255.0
        if self.input_scaling == "imagenet":
            pixels = (pixels - _IMAGENET_MEAN) / _IMAGENET_STD
        (output,) = self.session.run(None, {self.input_name: np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])})
        fractions = crop_fractions(output[0])
        points = np.stack([left + fractions[:, 0] * side, top + fractions[:, 1] * side], axis=1)
        return FaceFrame(face.box, points, face.score)


def crop_fractions(output: np.ndarray) -> np.ndarray:
    """One image's model output -> ``(68, 2)`` ``(x, y)`` as fractions of the crop: coordinates
    ``(136,)`` / ``(68, 2)`` are taken as they are; heatmaps ``(68, h, w)`` give each peak cell's centre."""
    output = np.asarray(output, dtype=np.float64)
    if output.ndim == 3:
        heat_height, heat_width = output.shape[1:]
        peaks = output.reshape(IBUG_POINTS, -1).argmax(axis=1)
        rows, cols = np.divmod(peaks, heat_width)
        return np.stack([(cols + 0.5) / heat_width, (rows + 0.5) / heat_height], axis=1)
    return output.reshape(IBUG_POINTS, 2)


def load_face_model(detector: str | LandmarkModel = "mtcnn", landmarks_model: str | None = None,
                    device: str = "cpu") -> LandmarkModel:
    """``"mtcnn"`` (5 points), or with ``landmarks_model`` (a local .onnx) 68 points on MTCNN's faces;
    on ``device`` (``cpu`` or ``cuda``: MTCNN in torch, the 68-point model through onnxruntime-gpu)."""
    if not isinstance(detector, str):
        return detector
    if detector != "mtcnn":
        raise ValueError(f"unknown face detector {detector!r}; known: mtcnn")
    from datapipes.onnx_session import DEVICES, providers_for

    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device for MTCNN")
    boxes = MTCNNFaces(device=device)
    return OnnxLandmarks68(landmarks_model, boxes=boxes, providers=providers_for(device)) if landmarks_model else boxes


# One model per process and setting: packing calls detect_face_track once per clip.
cached_face_model = functools.lru_cache(maxsize=2)(load_face_model)


def detect_face_track(video: bytes, name: str, detector: str | LandmarkModel = "mtcnn",
                      indices=None, chunk: int = 16, landmarks_model: str | None = None) -> dict:
    """A ``face.json`` document for ``video`` (all frames, or ``indices`` with the others
    ``null``), computed in chunks to bound memory at full resolution."""
    model = cached_face_model(detector, landmarks_model) if isinstance(detector, str) else detector
    reader = open_video(video, name)
    count = len(reader)
    first = reader[0].shape
    wanted = list(range(count)) if indices is None else sorted(int(i) for i in indices)
    faces: list[FaceFrame | None] = [None] * count
    for start in range(0, len(wanted), chunk):
        part = wanted[start:start + chunk]
        # read_frames: decoder errors as VideoDecodeError, widths decord cannot copy out via PyAV.
        for index, face in zip(part, model(read_frames(reader, part, name, source=video))):
            faces[index] = face
    return face_track_to_json(faces, first[0], first[1], detector=model.name)
