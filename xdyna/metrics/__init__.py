"""Evaluation metrics for X-Dyna and the ``xdyna-eval`` CLI (see docs/metrics.md).

Everything runs offline: backbones read local weight files listed in a SHA-256 manifest.
"""
from .fidelity import (FIDELITY_METRICS, disco_l1, disco_lpips, disco_psnr, disco_ssim, fidelity_per_frame, l1, lpips,
                       psnr, ssim)
from .frechet import (FrechetResult, GaussianStats, expected_same_distribution_bias, frechet_distance,
                      frechet_with_bootstrap, gaussian_stats)
from .lpips import LPIPSVGG, build_lpips
from .runner import ALL_METRICS, METRIC_GROUPS, EvalOptions, evaluate, resolve_metrics
from .sources import EvalInputError, pair_videos
from .validation import validation_metrics
from .weights import WEIGHT_SOURCES, WeightsError, WeightsManifest

__all__ = [
    "ALL_METRICS", "EvalInputError", "EvalOptions", "FIDELITY_METRICS", "FrechetResult", "GaussianStats", "LPIPSVGG",
    "METRIC_GROUPS", "WEIGHT_SOURCES", "WeightsError", "WeightsManifest", "build_lpips", "disco_l1", "disco_lpips",
    "disco_psnr", "disco_ssim", "evaluate", "expected_same_distribution_bias", "fidelity_per_frame",
    "frechet_distance", "frechet_with_bootstrap", "gaussian_stats", "l1", "lpips", "pair_videos", "psnr",
    "resolve_metrics", "ssim", "validation_metrics",
]
