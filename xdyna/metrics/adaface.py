"""AdaFace's IR backbone (Kim et al. 2022; the "IR" ResNet of ArcFace / face.evoLVe), for Face-Cos.

State-dict layout of mk-minchul/AdaFace ``net.py`` (``input_layer.0.weight``,
``body.N.res_layer.K.*``, ``body.N.shortcut_layer.*``, ``output_layer.3.weight`` ...); its
released ``.ckpt`` files keep the backbone under ``model.`` (stripped on load) beside the
margin head ``head.kernel`` (ignored). Input: aligned 112x112 faces, **BGR** channel order,
scaled to [-1, 1]; output: the L2-normalised 512-d embedding.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Units per stage for the depths AdaFace releases (18 is the tiny flavour used by tests).
_STAGE_UNITS = {18: (2, 2, 2, 2), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}
_STAGE_WIDTHS = (64, 128, 256, 512)


class BasicBlockIR(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if in_channels == out_channels:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                                nn.BatchNorm2d(out_channels))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class AdaFaceIR(nn.Module):
    """``forward(faces)``: aligned ``(N, 3, 112, 112)`` RGB in [0, 1] -> unit ``(N, 512)`` embeddings."""

    def __init__(self, num_layers: int = 100):
        super().__init__()
        if num_layers not in _STAGE_UNITS:
            raise ValueError(f"AdaFace IR depth must be one of {sorted(_STAGE_UNITS)}, got {num_layers}")
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        blocks: list[nn.Module] = []
        in_channels = 64
        for units, width in zip(_STAGE_UNITS[num_layers], _STAGE_WIDTHS):
            for unit in range(units):
                blocks.append(BasicBlockIR(in_channels, width, 2 if unit == 0 else 1))
                in_channels = width
        self.body = nn.Sequential(*blocks)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(0.4), nn.Flatten(),
                                          nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512, affine=False))
        self.eval().requires_grad_(False)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        x = faces.flip(1) * 2 - 1  # RGB -> BGR, [0, 1] -> [-1, 1], as AdaFace was trained
        x = self.output_layer(self.body(self.input_layer(x)))
        return F.normalize(x, dim=1)


def adaface_state_dict(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone weights from an AdaFace release checkpoint (``model.`` prefix, ``head.*`` dropped)."""
    if any(key.startswith("model.") for key in checkpoint):
        return {key[len("model."):]: value for key, value in checkpoint.items() if key.startswith("model.")}
    return {key: value for key, value in checkpoint.items() if not key.startswith("head.")}
