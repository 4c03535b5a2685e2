"""Face tracks for S-Face maps.

Default detector: facenet-pytorch's MTCNN, whose weights ship inside its wheel (nothing is
downloaded); it gives a box and 5 landmarks (eyes, nose, mouth corners) per face, enough for the
S-Face global box and the eye and mouth patch centres. Install it with
``pip install --no-deps facenet-pytorch`` (its pins are old; it needs torch and torchvision).
A 68-point model can be plugged in through :class:`LandmarkModel`.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from datapipes.face import FaceFrame, face_track_to_json
from datapipes.video import open_video


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


def load_face_model(detector: str | LandmarkModel = "mtcnn") -> LandmarkModel:
    return MTCNNFaces() if detector == "mtcnn" else detector


def detect_face_track(video: bytes, name: str, detector: str | LandmarkModel = "mtcnn",
                      indices=None, chunk: int = 16) -> dict:
    """A ``face.json`` document for ``video`` (all frames, or ``indices`` with the others
    ``null``), computed in chunks to bound memory at full resolution."""
    model = load_face_model(detector)
    reader = open_video(video, name)
    count = len(reader)
    first = reader[0].shape
    wanted = list(range(count)) if indices is None else sorted(int(i) for i in indices)
    faces: list[FaceFrame | None] = [None] * count
    for start in range(0, len(wanted), chunk):
        part = wanted[start:start + chunk]
        for index, face in zip(part, model(reader.get_batch(part).asnumpy())):
            faces[index] = face
    return face_track_to_json(faces, first[0], first[1], detector=model.name)
