"""Cheap metrics for the training-time validation callback (the Lightning glue logs them).

Same code as ``xdyna-eval``'s per-frame metrics, on in-memory tensors in the project's pixel
convention: ``(B, F, 3, H, W)`` float in [-1, 1]. Frames are quantised to uint8 first, as the
offline evaluation sees decoded videos.
"""
from __future__ import annotations

import torch

from .face import FaceDetector
from .fidelity import fidelity_per_frame, to_uint8
from .lpips import LPIPSVGG


def validation_metrics(pred: torch.Tensor, gt: torch.Tensor, lpips_net: LPIPSVGG | None = None,
                       face_detector: FaceDetector | None = None, prefix: str = "val/") -> dict[str, float]:
    """Mean PSNR / SSIM (and LPIPS, Face-Det when their models are given) over all frames."""
    if pred.shape != gt.shape or pred.ndim != 5 or pred.shape[2] != 3:
        raise ValueError(f"validation_metrics wants two (B, F, 3, H, W) tensors of one shape, "
                         f"got {tuple(pred.shape)} and {tuple(gt.shape)}")
    pred_frames = to_uint8((pred.detach().float().flatten(0, 1) + 1) / 2).cpu()
    gt_frames = to_uint8((gt.detach().float().flatten(0, 1) + 1) / 2).cpu()
    names = ["psnr", "ssim"] + (["lpips"] if lpips_net is not None else [])
    results = {}
    for name in names:
        values = fidelity_per_frame(name, pred_frames, gt_frames, lpips_net)
        results[prefix + name] = float(values[torch.isfinite(values)].mean()) if torch.isfinite(values).any() else float("inf")
    if face_detector is not None:
        detections = face_detector(pred_frames)
        results[prefix + "face_det"] = sum(d is not None for d in detections) / len(detections)
    return results
