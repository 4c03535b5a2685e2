"""Foreground/background regions for FG-/BG- metrics: masks from supplied mask videos or from a
pluggable segmenter, applied by one function so every metric's FG/BG variant is the same code."""
from __future__ import annotations

from typing import Protocol

import torch

from .weights import WeightsManifest, load_checkpoint, load_into

REGIONS = ("full", "fg", "bg")


class Segmenter(Protocol):
    """uint8 ``(F, 3, H, W)`` frames -> bool ``(F, H, W)`` foreground (person) masks."""

    def __call__(self, frames: torch.Tensor) -> torch.Tensor: ...


def apply_region(frames: torch.Tensor, masks: torch.Tensor | None, region: str) -> torch.Tensor:
    """Keep the foreground (``fg``) or background (``bg``) and zero the rest; ``full`` is a no-op.

    Zero (black) fill: the paper does not state its fill value, so FG/BG numbers compare only
    with runs that use the same rule.
    """
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    if region == "full":
        return frames
    if masks is None:
        raise ValueError(f"region {region!r} needs masks (--masks DIR or a segmenter)")
    if masks.shape != (frames.shape[0], *frames.shape[2:]):
        raise ValueError(f"masks {tuple(masks.shape)} do not match frames {tuple(frames.shape)}")
    keep = masks if region == "fg" else ~masks
    return frames * keep.unsqueeze(1).to(frames.dtype)


def masks_from_video_frames(frames: torch.Tensor) -> torch.Tensor:
    """Mask video frames (white = foreground, compressed) -> bool masks by thresholding at mid-grey."""
    return frames.float().mean(dim=1) > 127.5


class PersonDeepLabSegmenter:
    """torchvision DeepLabV3-ResNet50 (COCO with VOC labels) from local weights; person = class 15."""

    PERSON_CLASS = 15

    def __init__(self, manifest: WeightsManifest, device: str | torch.device = "cpu"):
        from torchvision.models.segmentation import deeplabv3_resnet50

        entry = manifest.resolve("deeplabv3_person", needed_by="FG/BG masks")
        self.net = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
        load_into(self.net, load_checkpoint(entry), "deeplabv3_person", entry.path)
        self.net.eval().requires_grad_(False).to(device)
        self.device = device
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        x = ((frames.float() / 255 - self.mean) / self.std).to(self.device)
        with torch.no_grad():
            logits = self.net(x)["out"]
        return (logits.argmax(dim=1) == self.PERSON_CLASS).cpu()
