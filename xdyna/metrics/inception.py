"""The FID Inception-v3: torchvision's ``Inception3`` with the pooling of the TF 2015-12-05 graph.

The FID network is not torchvision's ImageNet Inception: its weights
(``pt_inception-2015-12-05-6726825d.pth``, torchvision key layout, 1008 classes) come from the
TF graph, whose average pools exclude padding and whose last block (Mixed_7c) max-pools. So the
torchvision blocks are kept (their weights load by name) and only the pooling branch of those
blocks is recomputed the TF way. Features: the 2048-d global average pool; input: frames in
[0, 1], resized to 299x299 bilinearly and mapped to [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE


class _TFPoolInceptionA(InceptionA):
    def _forward(self, x):
        outputs = super()._forward(x)
        outputs[-1] = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return outputs


class _TFPoolInceptionC(InceptionC):
    def _forward(self, x):
        outputs = super()._forward(x)
        outputs[-1] = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return outputs


class _TFPoolInceptionE(InceptionE):
    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x):
        outputs = super()._forward(x)
        pooled = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool
                  else F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        outputs[-1] = self.branch_pool(pooled)
        return outputs


class FIDInceptionV3(nn.Module):
    """``forward(frames)``: ``(N, 3, H, W)`` in [0, 1] -> ``(N, 2048)`` pool features.

    ``input_size`` is 299 for real use; the tiny flavour runs the same network at 75 px
    (the smallest size Inception-v3 accepts) so tests stay fast.
    """

    feature_dim = 2048

    def __init__(self, input_size: int = 299):
        super().__init__()
        self.input_size = input_size
        net = Inception3(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
        for name, in_channels in (("Mixed_5b", 192), ("Mixed_5c", 256), ("Mixed_5d", 288)):
            pool_features = getattr(net, name).branch_pool.conv.out_channels
            setattr(net, name, _TFPoolInceptionA(in_channels, pool_features))
        for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            setattr(net, name, _TFPoolInceptionC(768, getattr(net, name).branch7x7_1.conv.out_channels))
        net.Mixed_7b = _TFPoolInceptionE(1280, max_pool=False)
        net.Mixed_7c = _TFPoolInceptionE(2048, max_pool=True)
        self.net = net
        self.eval().requires_grad_(False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(frames, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        net = self.net
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):
            x = getattr(net, name)(x)
        return torch.flatten(x, 1)
