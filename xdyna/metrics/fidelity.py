"""Per-frame fidelity against ground truth: L1, PSNR, SSIM, LPIPS.

Two labelled definitions of each:

* ``correct``: L1 = mean |pred - gt| on [0, 1]; PSNR with data range 1 per frame (torchmetrics);
  SSIM per frame on RGB with the Wang et al. protocol (11x11 Gaussian, sigma 1.5, population
  covariance; torchmetrics); LPIPS-VGG on inputs mapped to [-1, 1] as LPIPS expects.
* ``disco``: the script the animation literature copies (DisCo, ``tool/metrics/ssim_l1_lpips_psnr.py``),
  restated on the uint8 frames it read from disk: PSNR from an MSE computed in uint8 arithmetic
  (the difference and its square wrap modulo 256), L1 = mean |pred - gt| in 0..255 divided by
  H*W, SSIM of OpenCV-grayscale frames with scikit-image defaults (7x7 uniform window, sample
  covariance, range 255), LPIPS-VGG fed [0, 1] images as if they were [-1, 1].

Every function takes ``(F, 3, H, W)`` frames and returns one value per frame ``(F,)``; the
correct ones take float in [0, 1], the DisCo ones the uint8 frames (what their script saw).
"""
from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from .lpips import LPIPSVGG


def _check_pair(pred: torch.Tensor, gt: torch.Tensor, dtype_kind: str) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt frames differ in shape: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    if pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"frames must be (F, 3, H, W), got {tuple(pred.shape)}")
    if dtype_kind == "uint8" and (pred.dtype != torch.uint8 or gt.dtype != torch.uint8):
        raise ValueError(f"DisCo-compatible metrics take uint8 frames, got {pred.dtype} and {gt.dtype}")
    if dtype_kind == "float" and (not pred.is_floating_point() or not gt.is_floating_point()):
        raise ValueError(f"these metrics take float frames in [0, 1], got {pred.dtype} and {gt.dtype}")


def to_unit_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 ``(F, 3, H, W)`` -> float32 in [0, 1]."""
    return frames.to(torch.float32) / 255.0


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """float in [0, 1] -> uint8 by rounding (what saving a PNG does)."""
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8)


def l1(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    _check_pair(pred, gt, "float")
    return (pred - gt).abs().mean(dim=(1, 2, 3))


def psnr(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """dB per frame, data range 1; identical frames give +inf (reported as such, never capped)."""
    _check_pair(pred, gt, "float")
    return peak_signal_noise_ratio(pred, gt, data_range=1.0, reduction="none", dim=(1, 2, 3))


_SSIM_RADIUS = 5  # the 11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma) reaches 5 px


def ssim(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Wang et al. SSIM averaged over the frame's valid region and the 3 channels.

    torchmetrics averages its map over the whole frame including the reflect-padded border; the
    reference (and scikit-image) only averages where the window fits, so the border is cropped
    here from torchmetrics' full map.
    """
    _check_pair(pred, gt, "float")
    if min(pred.shape[-2:]) <= 2 * _SSIM_RADIUS:
        raise ValueError(f"SSIM needs frames larger than {2 * _SSIM_RADIUS} px, got {tuple(pred.shape[-2:])}")
    _, full_map = structural_similarity_index_measure(pred, gt, data_range=1.0, gaussian_kernel=True, sigma=1.5,
                                                      kernel_size=11, reduction="none", return_full_image=True)
    radius = _SSIM_RADIUS
    return full_map[..., radius:-radius, radius:-radius].mean(dim=(1, 2, 3))


def lpips(pred: torch.Tensor, gt: torch.Tensor, net: LPIPSVGG) -> torch.Tensor:
    _check_pair(pred, gt, "float")
    return net(pred * 2 - 1, gt * 2 - 1)


def _hwc_numpy(frames: torch.Tensor) -> np.ndarray:
    return frames.permute(0, 2, 3, 1).cpu().numpy()


def disco_l1(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    _check_pair(pred, gt, "uint8")
    height, width = pred.shape[-2:]
    return (pred.double() - gt.double()).abs().mean(dim=(1, 2, 3)) / (height * width)


def disco_psnr(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    _check_pair(pred, gt, "uint8")
    values = []
    for a, b in zip(_hwc_numpy(pred), _hwc_numpy(gt)):
        wrapped = (a - b) ** 2  # uint8 arithmetic on purpose: this is the quirk being reproduced
        mse = float(np.mean(wrapped))
        values.append(100.0 if mse == 0 else 20 * np.log10(255.0 / np.sqrt(mse)))
    return torch.tensor(values, dtype=torch.float64)


def opencv_gray(frames_hwc_rgb: np.ndarray) -> np.ndarray:
    """OpenCV's ``COLOR_BGR2GRAY`` for 8-bit input: fixed-point BT.601 weights in Q14 with rounding."""
    rgb = frames_hwc_rgb.astype(np.int64)
    gray = (rgb[..., 0] * 4899 + rgb[..., 1] * 9617 + rgb[..., 2] * 1868 + (1 << 13)) >> 14
    return gray.astype(np.uint8)


def disco_ssim(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    _check_pair(pred, gt, "uint8")
    values = [structural_similarity(a, b, data_range=255)
              for a, b in zip(opencv_gray(_hwc_numpy(pred)), opencv_gray(_hwc_numpy(gt)))]
    return torch.tensor(values, dtype=torch.float64)


def disco_lpips(pred: torch.Tensor, gt: torch.Tensor, net: LPIPSVGG) -> torch.Tensor:
    _check_pair(pred, gt, "uint8")
    return net(to_unit_float(pred), to_unit_float(gt))


# name -> (function, input kind, needs the LPIPS network)
FIDELITY_METRICS = {
    "l1": (l1, "float", False),
    "psnr": (psnr, "float", False),
    "ssim": (ssim, "float", False),
    "lpips": (lpips, "float", True),
    "disco_l1": (disco_l1, "uint8", False),
    "disco_psnr": (disco_psnr, "uint8", False),
    "disco_ssim": (disco_ssim, "uint8", False),
    "disco_lpips": (disco_lpips, "uint8", True),
}


def fidelity_per_frame(name: str, pred_uint8: torch.Tensor, gt_uint8: torch.Tensor,
                       lpips_net: LPIPSVGG | None = None) -> torch.Tensor:
    """One fidelity metric on decoded uint8 ``(F, 3, H, W)`` frames, per frame, as float64 on CPU."""
    function, kind, needs_lpips = FIDELITY_METRICS[name]
    if needs_lpips and lpips_net is None:
        raise ValueError(f"metric {name!r} needs an LPIPS network")
    device = next(lpips_net.parameters()).device if needs_lpips else pred_uint8.device
    if kind == "float":
        args = (to_unit_float(pred_uint8.to(device)), to_unit_float(gt_uint8.to(device)))
    else:
        args = (pred_uint8.to(device), gt_uint8.to(device))
    with torch.no_grad():
        values = function(*args, lpips_net) if needs_lpips else function(*args)
    return values.detach().to("cpu", torch.float64)
