"""Robust z-scores of the group level (quant/group.py) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aslprep_lite.quant.group import MEANAD_CONSTANT, OUTLIER_SIDES, robust_z


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


def test_sides():
    # median 3, MAD 1: z(100) = 0.6745 * 97 = 65.4265, z(-94) = -65.4265
    high, low = [1.0, 2.0, 3.0, 4.0, 100.0], [-94.0, 2.0, 3.0, 4.0, 5.0]
    assert robust_z(high, side="high").flags.tolist() == [False] * 4 + [True]
    assert robust_z(high, side="low").flags.tolist() == [False] * 5
    assert robust_z(low, side="low").flags.tolist() == [True] + [False] * 4
    assert robust_z(low, side="high").flags.tolist() == [False] * 5
    assert robust_z(low, side="both").flags.tolist() == [True] + [False] * 4
    result = robust_z(low, side="low")
    assert result.z[0] == pytest.approx(-65.4265, abs=1e-9) and result.side == "low"
    # the threshold stays strict on each side: z = -3.5 exactly is not flagged
    x = -3.5 / 0.6745
    result = robust_z([3.0, 2.0, 1.0, 1.0, 0.0, -1.0, -1.0, x, x - 1e-6], side="low")
    assert result.flags.tolist() == [False] * 8 + [True]
    with pytest.raises(ValueError, match="side must be one of"):
        robust_z(high, side="upper")


def test_metric_sides():
    assert OUTLIER_SIDES == {
        "gm_cbf": "both",
        "gm_spatial_cov": "high",
        "mean_fd": "high",
        "qei": "low",
    }
    # an unusually good QEI (0.97 among 0.80-0.84) is not flagged, a poor one (0.60) is:
    # median 0.825 / 0.815, MAD 0.015
    good = robust_z([0.80, 0.81, 0.82, 0.83, 0.84, 0.97], side=OUTLIER_SIDES["qei"])
    assert good.z[5] == pytest.approx(0.6745 * 0.145 / 0.015, rel=1e-9)
    assert good.z[5] == pytest.approx(6.5202, abs=1e-4) and not good.flags.any()
    poor = robust_z([0.80, 0.81, 0.82, 0.83, 0.84, 0.60], side=OUTLIER_SIDES["qei"])
    assert poor.z[5] == pytest.approx(-9.6678, abs=1e-4)
    assert poor.flags.tolist() == [False] * 5 + [True]
    # mean FD 0.02 mm among 0.10-0.14 (median 0.115, MAD 0.015): z = -4.2718, not flagged
    still = robust_z([0.10, 0.11, 0.12, 0.13, 0.14, 0.02], side=OUTLIER_SIDES["mean_fd"])
    assert still.z[5] == pytest.approx(-4.2718, abs=1e-4) and not still.flags.any()
    moving = robust_z([0.10, 0.11, 0.12, 0.13, 0.14, 0.60], side=OUTLIER_SIDES["mean_fd"])
    assert moving.z[5] == pytest.approx(21.3592, abs=1e-4)
    assert moving.flags.tolist() == [False] * 5 + [True]
    # GM CBF both ways: a tenth (6) and twice (120) the median 60; |x - 60| sorted
    # 0 1 1 2 2 54 60: MAD 2, z = 0.6745 * (-54) / 2 = -18.2115 and 0.6745 * 60 / 2 = 20.235
    cbf = [58.0, 59.0, 60.0, 61.0, 62.0, 6.0, 120.0]
    result = robust_z(cbf, side=OUTLIER_SIDES["gm_cbf"])
    np.testing.assert_allclose(result.z[5:], [-18.2115, 20.235], rtol=1e-12)
    assert result.flags.tolist() == [False] * 5 + [True, True]
