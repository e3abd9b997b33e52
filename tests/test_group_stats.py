"""Robust z-scores of the group level (quant/group.py) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aslprep_lite.quant.group import MEANAD_CONSTANT, robust_z


def test_hand_values():
    # median 3, |x - 3| = 2 1 0 1 97, MAD 1: z = 0.6745 (x - 3)
    result = robust_z([1.0, 2.0, 3.0, 4.0, 100.0])
    np.testing.assert_allclose(result.z, [-1.349, -0.6745, 0.0, 0.6745, 65.4265], atol=1e-12)
    assert result.flags.tolist() == [False, False, False, False, True]
    assert (result.median, result.scale, result.scale_estimator) == (3.0, 1 / 0.6745, "MAD")
    assert result.n == 5 and result.reliable


def test_threshold_is_strict():
    # median 0, |x| sorted 0 1 1 1 1 2 3 5.19 5.19: MAD 1; 3.5 / 0.6745 gives z = 3.5, not flagged
    x = 3.5 / 0.6745
    result = robust_z([-3.0, -2.0, -1.0, -1.0, 0.0, 1.0, 1.0, x, x + 1e-6])
    assert (result.median, result.scale) == (0.0, 1 / 0.6745)
    np.testing.assert_allclose(result.z[7:], [3.5, 3.5 + 0.6745e-6], rtol=1e-12)
    assert result.flags.tolist() == [False] * 8 + [True]


def test_mad_zero_falls_back_to_mean_absolute_deviation():
    # median 5, |x - 5| = 0 0 0 0 0 4: MAD 0, MeanAD 4/6; z = 4 / (1.2533 * 2/3) = 4.7873
    result = robust_z([5.0, 5.0, 5.0, 5.0, 5.0, 9.0])
    assert result.scale_estimator == "MeanAD"
    assert MEANAD_CONSTANT == pytest.approx(1.2533141373155, abs=1e-12)
    assert result.z[5] == pytest.approx(6.0 / math.sqrt(math.pi / 2.0), rel=1e-12)
    assert result.z[5] == pytest.approx(4.78731, abs=1e-5)
    assert result.flags.tolist() == [False] * 5 + [True]
    np.testing.assert_array_equal(result.z[:5], 0.0)


def test_all_equal_flags_nothing():
    result = robust_z([2.0, 2.0, 2.0, 2.0, 2.0])
    assert result.scale_estimator == "none"
    np.testing.assert_array_equal(result.z, 0.0)
    assert not result.flags.any()


def test_undefined_values_are_left_out_and_never_flagged():
    result = robust_z([None, 1.0, 2.0, 3.0, float("nan"), 4.0, 100.0])
    assert result.n == 5
    assert math.isnan(result.z[0]) and math.isnan(result.z[4])
    np.testing.assert_allclose(
        result.z[[1, 2, 3, 5, 6]], [-1.349, -0.6745, 0.0, 0.6745, 65.4265], atol=1e-12
    )
    assert result.flags.tolist() == [False, False, False, False, False, False, True]


def test_small_and_empty_groups():
    small = robust_z([1.0, 2.0, 50.0])
    assert small.n == 3 and not small.reliable
    # median 2, MAD 1: z = 0.6745 * 48 = 32.376, computed even though unreliable
    assert small.z[2] == pytest.approx(32.376)
    assert small.flags.tolist() == [False, False, True]
    empty = robust_z([None, None])
    assert empty.n == 0 and not empty.flags.any() and np.isnan(empty.z).all()
    assert math.isnan(empty.median) and empty.scale_estimator == "none"
