"""LPIPS (Zhang et al. 2018, v0.1) with a VGG16 trunk, built from local weight files only.

torchmetrics' LPIPS asks torchvision to download the VGG trunk; here the trunk comes from the
user's copy of torchvision's ``vgg16-397923af.pth`` (state-dict keys ``features.N.*``, read
as-is) and the linear heads from the ``vgg.pth`` that the torchmetrics wheel ships (the same
file as ``lpips/weights/v0.1/vgg.pth``; keys ``linK.model.1.weight``). The computation follows
the reference: scale inputs with the fixed shift/scale, take relu1_2 .. relu5_3, unit-normalise
channels, squared difference, 1x1 conv heads, spatial mean, sum over layers.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .weights import LPIPS_VGG_LIN_SHA256, WeightEntry, WeightsError, WeightsManifest, load_checkpoint, load_into, sha256_of

# VGG16 ("D") convolution widths; "M" is a 2x2 max-pool. Layer indices then coincide with
# torchvision's ``vgg16().features`` so its weight file loads without renaming.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in that Sequential.
_LPIPS_TAPS = (3, 8, 15, 22, 29)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = item
    return nn.Sequential(*layers)


class _LinearHead(nn.Module):
    # ``model.1`` mirrors the reference layout (Dropout at index 0, unused at eval) so the
    # shipped head file loads by name.
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPSVGG(nn.Module):
    """``forward(x, y)`` on ``(N, 3, H, W)`` in [-1, 1] returns the per-image distance ``(N,)``."""

    def __init__(self):
        super().__init__()
        self.features = _vgg16_features()
        for index, channels in enumerate(_LPIPS_CHANNELS):
            self.add_module(f"lin{index}", _LinearHead(channels))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _LPIPS_TAPS:
                outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS wants two (N, 3, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        taps_x = self._taps((x - self.shift) / self.scale)
        taps_y = self._taps((y - self.shift) / self.scale)
        total = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for index, (fx, fy) in enumerate(zip(taps_x, taps_y)):
            fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
            fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
            total = total + getattr(self, f"lin{index}")((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return total

    def load_trunk(self, state: dict[str, torch.Tensor], path: Path | str) -> None:
        """Load torchvision VGG16 weights (``features.*``; ``classifier.*`` is ignored)."""
        trunk = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        load_into(self.features, trunk, "vgg16_imagenet", path)

    def load_heads(self, state: dict[str, torch.Tensor], path: Path | str) -> None:
        heads = {k: v for k, v in state.items() if k.startswith("lin")}
        load_into(nn.ModuleDict({f"lin{i}": getattr(self, f"lin{i}") for i in range(5)}), heads, "lpips_vgg_lin", path)


def shipped_lpips_heads() -> WeightEntry:
    """The LPIPS VGG heads inside the installed torchmetrics (or lpips) wheel, checksum-verified."""
    candidates = []
    try:
        import torchmetrics.functional.image.lpips as tm_lpips
        candidates.append(Path(tm_lpips.__file__).parent / "lpips_models" / "vgg.pth")
    except ImportError:
        pass
    try:
        import lpips as lpips_package  # optional; only its shipped file is used
        candidates.append(Path(lpips_package.__file__).parent / "weights" / "v0.1" / "vgg.pth")
    except ImportError:
        pass
    for path in candidates:
        if path.is_file():
            digest = sha256_of(path)
            if digest != LPIPS_VGG_LIN_SHA256:
                raise WeightsError(f"LPIPS heads {path} have sha256 {digest}, expected {LPIPS_VGG_LIN_SHA256}")
            return WeightEntry("lpips_vgg_lin", path, digest, "full", False)
    raise WeightsError("LPIPS VGG heads not found in torchmetrics or lpips wheels: list 'lpips_vgg_lin' in the weights manifest")


def build_lpips(manifest: WeightsManifest) -> LPIPSVGG:
    """LPIPS-VGG with the trunk from manifest entry ``vgg16_imagenet`` and heads from
    ``lpips_vgg_lin`` (default: the file shipped in the torchmetrics wheel)."""
    net = LPIPSVGG()
    trunk = manifest.resolve("vgg16_imagenet", needed_by="lpips")
    net.load_trunk(load_checkpoint(trunk), trunk.path)
    heads = manifest.resolve("lpips_vgg_lin", needed_by="lpips") if "lpips_vgg_lin" in manifest else shipped_lpips_heads()
    net.load_heads(load_checkpoint(heads), heads.path)
    return net
