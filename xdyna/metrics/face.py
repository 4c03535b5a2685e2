"""Face metrics: Face-Det, Face-Cos (AdaFace identity cosine) and a pluggable Face-Exp.

* Face-Det: share of generated frames in which MTCNN (facenet-pytorch, weights shipped in its
  wheel) finds a face with its default cascade thresholds; the largest face is kept.
* Face-Cos: cosine between AdaFace embeddings of the face in each generated frame and the face
  of a target (the reference image when given, else the ground-truth frame). Faces are aligned
  to the standard 112x112 five-point template with a similarity transform. Policy for frames
  without a face (in the generated frame or its target): ``skip`` (excluded; the detection rate
  is reported beside the mean) or ``zero`` (counted as cosine 0).
* Face-Exp: distance between expression coefficients of generated and driving faces from a
  user-supplied backend (``module:callable``). X-Dyna's expression model is unpublished, so no
  backend here is verified against the paper's numbers.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from skimage.transform import SimilarityTransform, warp

from .adaface import AdaFaceIR, adaface_state_dict
from .weights import WeightsManifest, load_checkpoint, load_into

# ArcFace/InsightFace 112x112 template: eye centres, nose tip, mouth corners (x, y).
FACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                              [41.5493, 92.3655], [70.7299, 92.2041]])
ADAFACE_FLAVOURS = {"full": 100, "ir101": 100, "ir50": 50, "tiny": 18}


@dataclass(frozen=True)
class FaceDetection:
    box: np.ndarray  # (4,) x1, y1, x2, y2 in pixels
    probability: float
    landmarks: np.ndarray  # (5, 2) x, y: eyes, nose, mouth corners


class FaceDetector:
    """MTCNN over uint8 ``(F, 3, H, W)`` frames -> one :class:`FaceDetection` or ``None`` per frame."""

    def __init__(self, device: str | torch.device = "cpu", min_face_size: int = 20):
        from facenet_pytorch import MTCNN  # import here: it pulls torchvision ops only when used

        self.mtcnn = MTCNN(keep_all=False, select_largest=True, min_face_size=min_face_size, device=device)

    def __call__(self, frames: torch.Tensor) -> list[FaceDetection | None]:
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"FaceDetector wants uint8 (F, 3, H, W) frames, got {frames.dtype} {tuple(frames.shape)}")
        images = frames.permute(0, 2, 3, 1).cpu().numpy()
        boxes, probabilities, points = self.mtcnn.detect(images, landmarks=True)
        detections: list[FaceDetection | None] = []
        for box, probability, landmarks in zip(boxes, probabilities, points):
            if box is None or len(box) == 0:
                detections.append(None)
            else:
                detections.append(FaceDetection(np.asarray(box[0], dtype=np.float64), float(np.ravel(probability)[0]),
                                                np.asarray(landmarks[0], dtype=np.float64)))
        return detections


def align_face(frame: torch.Tensor, landmarks: np.ndarray) -> torch.Tensor:
    """uint8 ``(3, H, W)`` frame + 5 landmarks -> aligned float ``(3, 112, 112)`` in [0, 1]."""
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        transform = SimilarityTransform.from_estimate(landmarks, FACE_TEMPLATE_112)
    else:
        transform = SimilarityTransform()
        transform.estimate(landmarks, FACE_TEMPLATE_112)
    image = frame.permute(1, 2, 0).cpu().numpy().astype(np.float64) / 255.0
    aligned = warp(image, transform.inverse, output_shape=(112, 112), order=1, mode="constant")
    return torch.from_numpy(aligned).permute(2, 0, 1).float()


def aligned_faces(frames: torch.Tensor, detections: Sequence[FaceDetection | None]) -> tuple[torch.Tensor, list[int]]:
    """Aligned crops of the frames that have a face, and those frames' indices."""
    indices = [i for i, detection in enumerate(detections) if detection is not None]
    if not indices:
        return torch.zeros(0, 3, 112, 112), []
    return torch.stack([align_face(frames[i], detections[i].landmarks) for i in indices]), indices


def build_adaface(manifest: WeightsManifest) -> AdaFaceIR:
    entry = manifest.resolve("adaface", needed_by="face_cos")
    flavour = entry.flavour
    if flavour not in ADAFACE_FLAVOURS:
        raise ValueError(f"adaface flavour must be one of {sorted(ADAFACE_FLAVOURS)}, got {flavour!r}")
    net = AdaFaceIR(ADAFACE_FLAVOURS[flavour])
    load_into(net, adaface_state_dict(load_checkpoint(entry)), "adaface", entry.path)
    return net


def embed_faces(net: AdaFaceIR, frames: torch.Tensor, detections: Sequence[FaceDetection | None]) -> torch.Tensor:
    """``(F, 512)`` unit embeddings, NaN rows for frames without a face."""
    embeddings = torch.full((len(detections), 512), float("nan"))
    crops, indices = aligned_faces(frames, detections)
    if indices:
        device = next(net.parameters()).device
        with torch.no_grad():
            embeddings[indices] = net(crops.to(device)).float().cpu()
    return embeddings


FACE_POLICIES = ("skip", "zero")


def face_cosines(pred_embeddings: torch.Tensor, target_embeddings: torch.Tensor, policy: str) -> torch.Tensor:
    """Per-frame cosine; frames where either side has no face are dropped (``skip``) or 0 (``zero``)."""
    if policy not in FACE_POLICIES:
        raise ValueError(f"face policy must be one of {FACE_POLICIES}, got {policy!r}")
    if target_embeddings.shape[0] == 1:
        target_embeddings = target_embeddings.expand_as(pred_embeddings)
    cosines = (pred_embeddings * target_embeddings).sum(dim=1).double()
    missing = torch.isnan(cosines)
    return cosines[~missing] if policy == "skip" else torch.where(missing, torch.zeros_like(cosines), cosines)


class ExpressionBackend(Protocol):
    """Aligned faces ``(N, 3, 112, 112)`` in [0, 1] -> expression coefficients ``(N, K)``."""

    def __call__(self, faces: torch.Tensor) -> torch.Tensor: ...


def load_callable(spec: str) -> Callable:
    """``package.module:attribute`` -> the object (a backend class/factory or a callable)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"expected 'module:attribute', got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load {spec!r}: {error}") from None


def expression_errors(backend: ExpressionBackend, pred_faces: torch.Tensor, driving_faces: torch.Tensor) -> torch.Tensor:
    """Per-frame mean absolute difference of expression coefficients (frames with a face on both sides)."""
    if len(pred_faces) == 0:
        return torch.zeros(0, dtype=torch.float64)
    with torch.no_grad():
        pred_coefficients, driving_coefficients = backend(pred_faces), backend(driving_faces)
    return (pred_coefficients - driving_coefficients).abs().mean(dim=1).double().cpu()
