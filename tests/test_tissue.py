"""Mean CBF per tissue (aslprep_lite.quant.tissue) against means worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aslprep_lite.quant.tissue import GM_THRESHOLD, WM_THRESHOLD, tissue_cbf


def _arrays():
    """Six voxels: three GM, two WM, one excluded at the WM threshold, plus a masked-out one."""
    cbf = np.array([[[50.0], [70.0], [30.0], [1000.0]], [[20.0], [24.0], [10.0], [15.0]]])
    pgm = np.array([[[0.8], [0.9], [0.71], [0.95]], [[0.05], [0.0], [0.2], [0.7]]])
    pwm = np.array([[[0.1], [0.05], [0.2], [0.0]], [[0.95], [0.91], [0.9], [0.3]]])
    mask = np.ones(cbf.shape, dtype=bool)
    mask[0, 3, 0] = False  # pure GM with CBF 1000, outside the brain: must not count
    return cbf, pgm, pwm, mask


def test_thresholds():
    assert GM_THRESHOLD == 0.7
    assert WM_THRESHOLD == 0.9


def test_means_and_ratio_by_hand():
    # GM (pGM > 0.7, in mask): 50, 70, 30 -> 50; pGM = 0.7 exactly (CBF 15) is not > 0.7.
    # WM (pWM > 0.9): 20, 24 -> 22; pWM = 0.9 exactly (CBF 10) is not > 0.9.
    # ratio 50 / 22 = 2.272727 -> 2.273
    record = tissue_cbf(*_arrays())
    assert record["MeanCBFGM"] == 50.0
    assert record["MeanCBFWM"] == 22.0
    assert record["GMWMRatio"] == 2.273
    assert record["GMVoxels"] == 3
    assert record["WMVoxels"] == 2
    assert "TissueCBFNote" not in record
    assert "0.7" in record["TissueMasks"] and "0.9" in record["TissueMasks"]


def test_rounding():
    # GM: (50 + 70 + 31) / 3 = 50.3333 -> 50.33; WM 22 -> ratio 50.3333 / 22 = 2.28788 -> 2.288
    cbf, pgm, pwm, mask = _arrays()
    cbf[0, 2, 0] = 31.0
    record = tissue_cbf(cbf, pgm, pwm, mask)
    assert record["MeanCBFGM"] == 50.33
    assert record["GMWMRatio"] == 2.288


def test_custom_thresholds():
    # pGM > 0.75: 50, 70 -> 60; pWM > 0.85: 20, 24, 10 -> 18; ratio 60 / 18 = 3.3333
    record = tissue_cbf(*_arrays(), gm_threshold=0.75, wm_threshold=0.85)
    assert record["MeanCBFGM"] == 60.0
    assert record["MeanCBFWM"] == 18.0
    assert record["GMWMRatio"] == 3.333
    assert "0.75" in record["TissueMasks"] and "0.85" in record["TissueMasks"]


def test_nan_cbf_excluded():
    # The GM voxel at 70 becomes NaN: GM (50 + 30) / 2 = 40 over 2 voxels; ratio 40 / 22
    cbf, pgm, pwm, mask = _arrays()
    cbf[0, 1, 0] = np.nan
    cbf[1, 1, 0] = np.inf  # WM voxel at 24: WM is 20 alone
    record = tissue_cbf(cbf, pgm, pwm, mask)
    assert record["MeanCBFGM"] == 40.0
    assert record["GMVoxels"] == 2
    assert record["MeanCBFWM"] == 20.0
    assert record["WMVoxels"] == 1
    assert record["GMWMRatio"] == 2.0


def test_nan_probability_excluded():
    cbf, pgm, pwm, mask = _arrays()
    pgm[0, 0, 0] = np.nan  # the GM voxel at 50: GM is (70 + 30) / 2 = 50
    record = tissue_cbf(cbf, pgm, pwm, mask)
    assert record["GMVoxels"] == 2
    assert record["MeanCBFGM"] == 50.0


def test_empty_tissue_is_null_with_note():
    cbf, pgm, pwm, mask = _arrays()
    pwm = np.minimum(pwm, 0.5)  # no WM voxel left
    record = tissue_cbf(cbf, pgm, pwm, mask)
    assert record["MeanCBFGM"] == 50.0
    assert record["MeanCBFWM"] is None
    assert record["GMWMRatio"] is None
    assert record["WMVoxels"] == 0
    assert "MeanCBFWM is null" in record["TissueCBFNote"]
    assert "GMWMRatio" in record["TissueCBFNote"]
    assert '"MeanCBFWM": null' in json.dumps(record)


def test_empty_mask():
    cbf, pgm, pwm, mask = _arrays()
    record = tissue_cbf(cbf, pgm, pwm, np.zeros_like(mask))
    assert record["MeanCBFGM"] is None and record["MeanCBFWM"] is None
    assert record["GMWMRatio"] is None
    assert record["GMVoxels"] == 0 and record["WMVoxels"] == 0
    assert "MeanCBFGM is null" in record["TissueCBFNote"]
    assert "MeanCBFWM is null" in record["TissueCBFNote"]
    json.dumps(record)


def test_non_positive_wm_mean_gives_null_ratio():
    cbf, pgm, pwm, mask = _arrays()
    cbf[1, 0, 0] = -30.0  # WM: (-30 + 24) / 2 = -3
    record = tissue_cbf(cbf, pgm, pwm, mask)
    assert record["MeanCBFWM"] == -3.0
    assert record["GMWMRatio"] is None
    assert "not positive" in record["TissueCBFNote"]


def test_float_mask_and_types():
    cbf, pgm, pwm, mask = _arrays()
    record = tissue_cbf(cbf, pgm, pwm, mask.astype(np.float32))
    assert record["MeanCBFGM"] == 50.0
    assert type(record["MeanCBFGM"]) is float
    assert type(record["GMVoxels"]) is int
    assert type(record["GMWMRatio"]) is float


def test_bad_inputs():
    cbf, pgm, pwm, mask = _arrays()
    with pytest.raises(ValueError, match="same shape"):
        tissue_cbf(cbf, pgm[:1], pwm, mask)
    with pytest.raises(ValueError, match="gm_threshold"):
        tissue_cbf(cbf, pgm, pwm, mask, gm_threshold=1.0)
    with pytest.raises(ValueError, match="wm_threshold"):
        tissue_cbf(cbf, pgm, pwm, mask, wm_threshold=-0.1)
