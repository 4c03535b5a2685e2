import numpy as np
import pytest

from xdyna.metrics.frechet import (GaussianStats, expected_same_distribution_bias, frechet_distance,
                                   frechet_distance_of_features,
                                   frechet_with_bootstrap, gaussian_stats)


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20))  # correlated, full rank
    stats = gaussian_stats(features)
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-8)


def test_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(1)
    mean_a, mean_b = rng.normal(size=7), rng.normal(size=7)
    var_a, var_b = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7)
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    value = frechet_distance(GaussianStats(mean_a, np.diag(var_a), 0), GaussianStats(mean_b, np.diag(var_b), 0))
    assert value == pytest.approx(expected, rel=1e-10)


def test_rotation_invariance_non_commuting_covariances():
    # Non-commuting covariances exercise the symmetric route against the 1-d closed form after rotation.
    rng = np.random.default_rng(2)
    rotation, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    var_a, var_b = rng.uniform(0.2, 2, 5), rng.uniform(0.2, 2, 5)
    cov_a = np.diag(var_a)
    cov_b = rotation @ np.diag(var_b) @ rotation.T
    value = frechet_distance(GaussianStats(np.zeros(5), cov_a, 0), GaussianStats(np.zeros(5), cov_b, 0))
    # Reference: trace formula with scipy's general matrix square root.
    from scipy.linalg import sqrtm
    reference = np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(sqrtm(cov_a @ cov_b)).real
    assert value == pytest.approx(reference, rel=1e-8)


def test_small_sample_bias_follows_formula():
    rng = np.random.default_rng(3)
    variances = np.array([0.5, 1.0, 2.0, 3.0, 0.2, 1.5])
    count, trials = 400, 300
    values = [frechet_distance(gaussian_stats(rng.normal(size=(count, 6)) * np.sqrt(variances)),
                               gaussian_stats(rng.normal(size=(count, 6)) * np.sqrt(variances)))
              for _ in range(trials)]
    expected = expected_same_distribution_bias(np.diag(variances), count)
    standard_error = np.std(values) / np.sqrt(trials)
    assert abs(np.mean(values) - expected) < 4 * standard_error + 0.02 * expected
    # and the bias shrinks like 1/N
    assert expected_same_distribution_bias(np.diag(variances), 4 * count) == pytest.approx(expected / 4, rel=0.01)


def test_bootstrap_reports_counts_and_brackets_value():
    rng = np.random.default_rng(4)
    result = frechet_with_bootstrap(rng.normal(size=(200, 4)), rng.normal(0.5, 1, size=(150, 4)), num_bootstrap=50)
    assert (result.count_a, result.count_b, result.dim) == (200, 150, 4)
    assert result.ci_low <= result.value <= result.ci_high
    assert result.value == pytest.approx(4 * 0.25, abs=0.4)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least 2 samples"):
        gaussian_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(gaussian_stats(np.random.rand(5, 3)), gaussian_stats(np.random.rand(5, 4)))


def test_sample_route_equals_covariance_route_when_samples_are_few():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(12, 40)), rng.normal(0.3, 1.2, size=(9, 40))
    assert frechet_distance_of_features(a, b) == pytest.approx(frechet_distance(gaussian_stats(a), gaussian_stats(b)),
                                                               rel=1e-6)
