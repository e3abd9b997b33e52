"""Huber M-estimate of location per voxel (aslprep_lite.quant.robust).

Checks the defining properties (the mean of symmetric data, a bounded pull of a gross
outlier), agreement with a slow scalar implementation that solves Huber's equation by
bisection, the NaN and zero-MAD rules, and the speed of the vectorized loop.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from aslprep_lite.quant.robust import HUBER_K, MAD_TO_SD, ROBUST_REFERENCE, huber_mean


def _huber_scalar(values: np.ndarray, k: float = HUBER_K) -> float:
    """Reference: root of sum psi((x - mu) / s) = 0 by bisection, one voxel at a time.

    Independent of the vectorized code's algorithm (IRLS): psi is monotone, so the sum is a
    non-increasing function of mu that changes sign between min(x) and max(x).
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    median = float(np.median(x))
    scale = MAD_TO_SD * float(np.median(np.abs(x - median)))
    if scale == 0:
        return float(np.mean(x))

    def total_psi(mu: float) -> float:
        return float(np.clip((x - mu) / scale, -k, k).sum())

    low, high = float(x.min()), float(x.max())
    for _ in range(200):
        middle = 0.5 * (low + high)
        if total_psi(middle) > 0:
            low = middle
        else:
            high = middle
        if high - low < 1e-13 * max(1.0, abs(middle)):
            break
    return 0.5 * (low + high)


def test_reference_cites_huber_1964():
    assert "10.1214/aoms/1177703732" in ROBUST_REFERENCE
    assert "1964" in ROBUST_REFERENCE


def test_symmetric_data_gives_the_mean():
    rng = np.random.default_rng(1)
    centre = rng.uniform(-50, 50, size=(30, 1))
    offsets = rng.exponential(3.0, size=(30, 8))  # skewed offsets, mirrored: symmetric, heavy
    values = np.concatenate([centre + offsets, centre - offsets, centre], axis=1)
    np.testing.assert_allclose(huber_mean(values), values.mean(axis=1), rtol=0, atol=1e-9)


def test_clean_data_within_k_scales_gives_the_mean():
    # Every value within k robust SDs of the mean: all weights are 1.
    values = np.array([[9.4, 9.5, 10.0, 10.5, 10.4, 10.2, 9.7]])
    np.testing.assert_allclose(huber_mean(values), values.mean(axis=1), atol=1e-12)


def test_gross_outlier_moves_the_estimate_by_less_than_1_percent_of_it():
    rng = np.random.default_rng(2)
    clean = rng.normal(60.0, 10.0, size=9)
    values = np.append(clean, 1000.0)
    shift = huber_mean(values) - huber_mean(clean)
    assert abs(shift) < 0.01 * 1000.0
    assert values.mean() - clean.mean() > 90.0  # the mean moves by a tenth of it


def test_matches_scalar_reference():
    rng = np.random.default_rng(3)
    values = rng.standard_t(3, size=(300, 25)) * rng.uniform(0.5, 20, size=(300, 1))
    values += rng.uniform(-100, 100, size=(300, 1))
    values[rng.random(values.shape) < 0.05] += 500.0  # one-sided outliers
    values[rng.random(values.shape) < 0.05] = np.nan
    values[:10, 3:] = np.nan  # few values left
    expected = np.array([_huber_scalar(row) for row in values])
    np.testing.assert_allclose(huber_mean(values), expected, rtol=0, atol=1e-6)


def test_axis_and_shape():
    rng = np.random.default_rng(4)
    values = rng.normal(size=(4, 30, 5, 6))
    moved = huber_mean(values, axis=1)
    assert moved.shape == (4, 5, 6)
    np.testing.assert_allclose(moved, huber_mean(np.moveaxis(values, 1, -1)), atol=1e-12)


def test_nan_and_zero_mad_rules():
    values = np.array(
        [
            [np.nan, np.nan, np.nan, np.nan],  # no data: NaN
            [0.0, 0.0, 0.0, 8.0],  # MAD 0: the mean
            [1.0, np.nan, 3.0, np.inf],  # non-finite values left out
            [5.0, 5.0, 5.0, 5.0],  # constant: itself
        ]
    )
    with np.errstate(all="raise"):
        result = huber_mean(values)
    assert np.isnan(result[0])
    assert result[1] == pytest.approx(2.0)
    assert result[2] == pytest.approx(2.0)
    assert result[3] == 5.0


def test_rejects_bad_parameters():
    with pytest.raises(ValueError, match="positive"):
        huber_mean(np.zeros((2, 3)), k=0)
    with pytest.raises(ValueError, match="max_iter"):
        huber_mean(np.zeros((2, 3)), max_iter=-1)


def test_vectorized_speed():
    rng = np.random.default_rng(5)
    series = rng.normal(60.0, 40.0, size=(64, 64, 24, 40)).astype(np.float32)
    series[rng.random(series.shape) < 0.02] += 1000.0
    start = time.perf_counter()
    result = huber_mean(series)
    elapsed = time.perf_counter() - start
    print(f"huber_mean of 64x64x24x40: {elapsed:.2f} s")
    assert result.shape == (64, 64, 24)
    # 2 % one-sided outliers: the Huber estimate is biased by ~1 (the bound k s times the
    # contamination), the mean by ~20.
    assert abs(np.median(result) - 60.0) < 2.0
    assert np.median(series.mean(axis=-1)) - 60.0 > 15.0
    assert elapsed < 3.0  # ~0.5 s on 2 shared cores; a loop over voxels takes minutes
