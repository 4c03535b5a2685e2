"""Frechet distance between Gaussian fits of feature sets: the one implementation behind FID,
FVD, cd-FVD, DTFVD and their FG/BG variants.

Computed in float64 by the symmetric eigen route,
``tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2)``, which only ever takes square roots of symmetric
PSD matrices (``eigh``), so there is no complex round-off to discard as with ``scipy.linalg.sqrtm``
(whose ``disp`` argument is deprecated). Tiny negative eigenvalues from round-off are clipped to 0.

The estimate is biased upward for finite samples: two samples of N draws each from the same
d-dimensional Gaussian with covariance eigenvalues c_i give, to first order in 1/N
(mean term plus the Bures metric's second-order term under Wishart noise),
``E[FD] = 2 sum_i c_i / N + (sum_i c_i / 2 + sum_ij c_i c_j / (c_i + c_j)) / (N - 1)``,
about ``d (d + 5) / (2 N)`` for C = I: it grows like d^2 / N. So the sample counts are always
reported beside the value, with a bootstrap interval.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GaussianStats:
    mean: np.ndarray  # (d,) float64
    cov: np.ndarray  # (d, d) float64, unbiased (N - 1)
    count: int


@dataclass(frozen=True)
class FrechetResult:
    value: float
    ci_low: float
    ci_high: float
    ci_level: float
    count_a: int
    count_b: int
    dim: int

    def as_dict(self) -> dict:
        return {"value": self.value, "ci": [self.ci_low, self.ci_high], "ci_level": self.ci_level,
                "n_pred": self.count_a, "n_gt": self.count_b, "dim": self.dim}


def gaussian_stats(features: np.ndarray) -> GaussianStats:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, d), got shape {features.shape}")
    if features.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {features.shape[0]}")
    return GaussianStats(features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1),
                         features.shape[0])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """``||mu_a - mu_b||^2 + tr(C_a) + tr(C_b) - 2 tr sqrt(C_a^1/2 C_b C_a^1/2)`` in float64."""
    if a.mean.shape != b.mean.shape or a.cov.shape != b.cov.shape:
        raise ValueError(f"feature dimensions differ: {a.mean.shape} vs {b.mean.shape}")
    mean_a, mean_b = a.mean.astype(np.float64), b.mean.astype(np.float64)
    cov_a, cov_b = a.cov.astype(np.float64), b.cov.astype(np.float64)
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    middle_eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_cross = np.sqrt(np.clip(middle_eigenvalues, 0, None)).sum()
    diff = mean_a - mean_b
    value = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_cross
    # Round-off can push a true 0 slightly negative; a distance is never below 0.
    return float(max(value, 0.0))


def frechet_distance_of_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FD of two feature sets. When a set has fewer samples than dimensions the trace term is
    taken from the samples: with centred A (n x d) and B (m x d),
    ``tr sqrt(C_a^1/2 C_b C_a^1/2) = ||A B^T||_* / sqrt((n - 1)(m - 1))`` (nuclear norm: the
    singular values of an n x m matrix), exact and far cheaper than two d x d eigen-decompositions."""
    features_a = np.asarray(features_a, dtype=np.float64)
    features_b = np.asarray(features_b, dtype=np.float64)
    if min(len(features_a), len(features_b)) >= features_a.shape[1]:
        return frechet_distance(gaussian_stats(features_a), gaussian_stats(features_b))
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature dimensions differ: {features_a.shape} vs {features_b.shape}")
    if min(len(features_a), len(features_b)) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {min(len(features_a), len(features_b))}")
    mean_a, mean_b = features_a.mean(axis=0), features_b.mean(axis=0)
    centred_a, centred_b = features_a - mean_a, features_b - mean_b
    trace_a = (centred_a ** 2).sum() / (len(features_a) - 1)  # tr C_a without forming the d x d matrix
    trace_b = (centred_b ** 2).sum() / (len(features_b) - 1)
    scale = np.sqrt((len(features_a) - 1) * (len(features_b) - 1))
    trace_cross = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum() / scale
    diff = mean_a - mean_b
    value = diff @ diff + trace_a + trace_b - 2 * trace_cross
    return float(max(value, 0.0))


def expected_same_distribution_bias(cov: np.ndarray, count: int) -> float:
    """First-order E[FD] between two independent N-sample estimates of one Gaussian (see module doc)."""
    eigenvalues = np.clip(np.linalg.eigvalsh(np.asarray(cov, dtype=np.float64)), 0, None)
    pair_sums = eigenvalues[:, None] + eigenvalues[None, :]
    pair_term = np.divide(np.outer(eigenvalues, eigenvalues), pair_sums, out=np.zeros_like(pair_sums),
                          where=pair_sums > 0).sum()
    return float(2 * eigenvalues.sum() / count + (eigenvalues.sum() / 2 + pair_term) / (count - 1))


def frechet_with_bootstrap(features_a: np.ndarray, features_b: np.ndarray, *, num_bootstrap: int = 100,
                           ci_level: float = 0.95, seed: int = 0) -> FrechetResult:
    """FD of the two feature sets plus a percentile bootstrap interval (both sets resampled
    with replacement, independently). ``num_bootstrap=0`` reports the value as its own interval."""
    features_a = np.asarray(features_a, dtype=np.float64)
    features_b = np.asarray(features_b, dtype=np.float64)
    value = frechet_distance_of_features(features_a, features_b)
    low = high = value
    if num_bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws = np.empty(num_bootstrap)
        for i in range(num_bootstrap):
            pick_a = rng.integers(0, len(features_a), len(features_a))
            pick_b = rng.integers(0, len(features_b), len(features_b))
            draws[i] = frechet_distance_of_features(features_a[pick_a], features_b[pick_b])
        tail = (1 - ci_level) / 2
        low, high = (float(q) for q in np.quantile(draws, [tail, 1 - tail]))
    return FrechetResult(value, low, high, ci_level, len(features_a), len(features_b), features_a.shape[1])
