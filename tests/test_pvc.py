"""Partial-volume correction by linear regression (aslprep_lite.quant.pvc).

A hand-worked 3-voxel system checks Cramer's rule; a folded-ribbon phantom with known tissue
flows checks the recovery (exact without noise, within 2 % with noise) and the locality of the
kernel; small cases check the ill-conditioned rules.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from aslprep_lite.quant.pvc import (
    MIN_INFORMATION,
    PVC_KERNEL,
    PvcResult,
    pvc_linear_regression,
    pvc_record,
)

F_GM = 60.0
F_WM = 20.0
SHAPE = (40, 40, 8)


def _phantom(shape=SHAPE, supersample=4, sigma=0.7):
    """Folded GM ribbons between WM and sulcal CSF, with partial volume at every boundary.

    Tissue labels on a grid supersampled in-plane, averaged down to voxels (partial volume),
    then blurred in-plane (sigma 0.7 voxel), like a segmentation resampled to ASL resolution.
    Returns pGM, pWM and the brain mask (voxels >= 50 % inside the brain disc).
    """
    nx, ny, nz = shape
    x = (np.arange(nx * supersample) + 0.5) / supersample
    y = (np.arange(ny * supersample) + 0.5) / supersample
    z = np.arange(nz) + 0.5
    xx, yy, zz = np.meshgrid(x, y, z, indexing="ij")
    phase = np.sin(2 * np.pi * xx / 12 + 1.2 * np.sin(2 * np.pi * yy / 17) + 0.4 * zz)
    brain = np.hypot(xx - nx / 2, yy - ny / 2) < 0.45 * nx
    gm = brain & (np.abs(phase) < 0.5)
    wm = brain & (phase >= 0.5)  # phase <= -0.5: CSF

    def to_voxels(hires):
        return hires.reshape(nx, supersample, ny, supersample, nz).mean(axis=(1, 3))

    pgm = ndimage.gaussian_filter(to_voxels(gm.astype(float)), (sigma, sigma, 0))
    pwm = ndimage.gaussian_filter(to_voxels(wm.astype(float)), (sigma, sigma, 0))
    return pgm, pwm, to_voxels(brain.astype(float)) >= 0.5


@pytest.fixture(scope="module")
def phantom():
    return _phantom()


def _check_outputs(result: PvcResult, mask: np.ndarray) -> None:
    for values, defined in (
        (result.gm_cbf, result.gm_defined),
        (result.wm_cbf, result.wm_defined),
    ):
        assert values.dtype == np.float32
        assert defined.dtype == bool
        assert values.shape == defined.shape == mask.shape
        assert np.all(np.isfinite(values))
        assert not np.any(defined & ~mask)
        assert np.all(values[~defined] == 0)


def test_hand_worked_three_voxels():
    # pGM = [1, .5, 0], pWM = [0, .5, 1], CBF = [62, 40, 20], kernel 3 along x.
    # Centre: a = 1.25, b = 0.25, c = 1.25, d = 62 + 20 = 82, e = 20 + 20 = 40, det = 1.5;
    #   fGM = (1.25*82 - 0.25*40) / 1.5 = 61.6667, fWM = (1.25*40 - 0.25*82) / 1.5 = 19.6667.
    # Voxel 0 (kernel {0, 1}): a = 1.25, b = .25, c = .25, d = 82, e = 20, det = .25,
    #   GM information det/c = 1 -> fGM = (.25*82 - .25*20) / .25 = 62; pWM = 0: no WM.
    # Voxel 2 (kernel {1, 2}): a = .25, b = .25, c = 1.25, d = 20, e = 40, det = .25,
    #   WM information det/a = 1 -> fWM = (.25*40 - .25*20) / .25 = 20; pGM = 0: no GM.
    cbf = np.array([62.0, 40.0, 20.0]).reshape(3, 1, 1)
    pgm = np.array([1.0, 0.5, 0.0]).reshape(3, 1, 1)
    pwm = np.array([0.0, 0.5, 1.0]).reshape(3, 1, 1)
    result = pvc_linear_regression(cbf, pgm, pwm, np.ones((3, 1, 1)), kernel=(3, 1, 1))
    assert result.gm_defined.ravel().tolist() == [True, True, False]
    assert result.wm_defined.ravel().tolist() == [False, True, True]
    assert result.gm_cbf.ravel() == pytest.approx([62.0, 61.666667, 0.0], abs=1e-5)
    assert result.wm_cbf.ravel() == pytest.approx([0.0, 19.666667, 20.0], abs=1e-5)


def test_noise_free_is_exact(phantom):
    pgm, pwm, mask = phantom
    cbf = pgm * F_GM + pwm * F_WM
    result = pvc_linear_regression(cbf, pgm, pwm, mask)
    _check_outputs(result, mask)
    assert np.max(np.abs(result.gm_cbf[result.gm_defined] - F_GM)) < 1e-4
    assert np.max(np.abs(result.wm_cbf[result.wm_defined] - F_WM)) < 1e-4
    # and it is defined almost everywhere the tissue is substantial (measured: 99.6 % of both)
    gm_voxels = mask & (pgm > 0.3)
    wm_voxels = mask & (pwm > 0.3)
    assert np.count_nonzero(result.gm_defined & gm_voxels) >= 0.98 * np.count_nonzero(gm_voxels)
    assert np.count_nonzero(result.wm_defined & wm_voxels) >= 0.98 * np.count_nonzero(wm_voxels)


def test_noise_free_other_kernel(phantom):
    pgm, pwm, mask = phantom
    cbf = pgm * F_GM + pwm * F_WM
    result = pvc_linear_regression(cbf, pgm, pwm, mask, kernel=(3, 3, 3))
    assert np.count_nonzero(result.gm_defined) > 1000
    assert np.max(np.abs(result.gm_cbf[result.gm_defined] - F_GM)) < 1e-4
    assert np.max(np.abs(result.wm_cbf[result.wm_defined] - F_WM)) < 1e-4


def test_noisy_recovery_beats_uncorrected(phantom):
    pgm, pwm, mask = phantom
    rng = np.random.default_rng(20240)
    cbf = pgm * F_GM + pwm * F_WM + rng.normal(0.0, 3.0, pgm.shape)  # 5 % of GM CBF
    result = pvc_linear_regression(cbf, pgm, pwm, mask)
    _check_outputs(result, mask)
    for truth, prob, values, defined in (
        (F_GM, pgm, result.gm_cbf, result.gm_defined),
        (F_WM, pwm, result.wm_cbf, result.wm_defined),
    ):
        voxels = mask & (prob > 0.3)
        corrected = float(np.mean(values[voxels & defined]))
        uncorrected = float(np.mean(cbf[voxels]))
        assert corrected == pytest.approx(truth, rel=0.02)
        assert abs(corrected - truth) < abs(uncorrected - truth)
    # partial volume biases the uncorrected GM mean low (measured 38.2 instead of 60)
    assert np.mean(cbf[mask & (pgm > 0.3)]) < 0.7 * F_GM


def test_spatially_varying_gm_flow(phantom):
    # fGM rises linearly from 45 to 75 along x: a local kernel follows it, a global fit cannot
    pgm, pwm, mask = phantom
    x = np.arange(SHAPE[0], dtype=float)[:, None, None]
    f_gm = 45.0 + 30.0 * x / (SHAPE[0] - 1) * np.ones(SHAPE)
    rng = np.random.default_rng(7)
    cbf = pgm * f_gm + pwm * F_WM + rng.normal(0.0, 3.0, SHAPE)
    result = pvc_linear_regression(cbf, pgm, pwm, mask)
    voxels = result.gm_defined & (pgm > 0.3)
    estimate = result.gm_cbf[voxels]
    truth = f_gm[voxels]
    local_error = np.mean(np.abs(estimate - truth))
    global_error = np.mean(np.abs(truth.mean() - truth))  # best constant fGM
    assert local_error < 0.4 * global_error  # measured 1.30 vs 5.79
    assert np.corrcoef(estimate, truth)[0, 1] > 0.9  # measured 0.97
    slope = np.polyfit(np.broadcast_to(x, SHAPE)[voxels], estimate, 1)[0]
    assert slope == pytest.approx(30.0 / (SHAPE[0] - 1), rel=0.15)
    assert np.max(np.abs(result.wm_cbf[result.wm_defined & (pwm > 0.3)] - F_WM)) < 15


def test_pure_tissue_kernel_uses_single_tissue_fit():
    # Left half pure GM (pWM = 0 exactly), right half pure WM (pGM = 0), CSF varying in both:
    # away from the boundary one tissue is absent from the kernel -> the other is fitted alone,
    # exactly, and the absent tissue is undefined.
    rng = np.random.default_rng(3)
    shape = (20, 12, 2)
    frac = 0.4 + 0.6 * rng.random(shape)
    left = np.arange(shape[0])[:, None, None] < 10
    pgm = np.where(left, frac, 0.0)
    pwm = np.where(left, 0.0, frac)
    cbf = pgm * F_GM + pwm * F_WM
    result = pvc_linear_regression(cbf, pgm, pwm, np.ones(shape, bool))
    assert result.gm_defined[:10].all() and not result.gm_defined[10:].any()
    assert result.wm_defined[10:].all() and not result.wm_defined[:10].any()
    assert np.max(np.abs(result.gm_cbf[:10] - F_GM)) < 1e-4
    assert np.max(np.abs(result.wm_cbf[10:] - F_WM)) < 1e-4


def test_collinear_tissues_are_undefined():
    # pGM = 0.5 pWM everywhere: fGM and fWM cannot be separated (only 0.5 fGM + fWM can)
    rng = np.random.default_rng(4)
    pwm = 0.2 + 0.4 * rng.random((10, 10, 1))
    pgm = 0.5 * pwm
    cbf = pgm * F_GM + pwm * F_WM
    result = pvc_linear_regression(cbf, pgm, pwm, np.ones(pwm.shape, bool))
    assert not result.gm_defined.any()
    assert not result.wm_defined.any()
    assert not result.gm_cbf.any() and not result.wm_cbf.any()


def test_little_information_is_undefined():
    # A trace of GM (< 0.15) everywhere: pGM > MIN_OUTPUT_PV in places but the kernel's GM
    # information (at most 25 * 0.15**2 = 0.56 < 1 voxel) is too small to estimate fGM.
    rng = np.random.default_rng(5)
    pgm = 0.15 * rng.random((12, 12, 1))
    pwm = 1.0 - pgm
    cbf = pgm * F_GM + pwm * F_WM
    result = pvc_linear_regression(cbf, pgm, pwm, np.ones(pgm.shape, bool))
    assert MIN_INFORMATION == 1.0
    assert not result.gm_defined.any()
    # WM is still separable from the varying GM trace, except in one corner, whose truncated
    # 3 x 3 kernel leaves less than 1 voxel of WM information once the trace is fitted
    assert np.count_nonzero(~result.wm_defined) == 1 and not result.wm_defined[0, 0, 0]
    assert np.max(np.abs(result.wm_cbf[result.wm_defined] - F_WM)) < 1e-4


def test_empty_and_zero_masks(phantom):
    pgm, pwm, mask = phantom
    cbf = pgm * F_GM + pwm * F_WM
    for empty in (np.zeros(SHAPE, bool), np.zeros(SHAPE, np.float32)):
        result = pvc_linear_regression(cbf, pgm, pwm, empty)
        _check_outputs(result, empty.astype(bool))
        assert not result.gm_defined.any() and not result.wm_defined.any()
    # all-zero inputs too
    zeros = np.zeros(SHAPE)
    result = pvc_linear_regression(zeros, zeros, zeros, mask)
    _check_outputs(result, mask)
    assert not result.gm_defined.any() and not result.wm_defined.any()


def test_non_finite_inputs_are_excluded(phantom):
    pgm, pwm, mask = phantom
    cbf = pgm * F_GM + pwm * F_WM
    rng = np.random.default_rng(6)
    bad = rng.random(SHAPE) < 0.05
    cbf[bad] = np.nan
    cbf[~mask] = np.inf  # outside the brain: ignored
    pgm = pgm.copy()
    pgm[rng.random(SHAPE) < 0.01] = np.nan
    result = pvc_linear_regression(cbf, pgm, pwm, mask)
    _check_outputs(result, mask)
    assert not np.any(result.gm_defined & bad)
    assert not np.any(result.gm_defined & np.isnan(pgm))
    assert np.count_nonzero(result.gm_defined) > 1000
    # the missing voxels leave the fits exact: no NaN leaked into a neighbour's sums
    assert np.max(np.abs(result.gm_cbf[result.gm_defined] - F_GM)) < 1e-4
    assert np.max(np.abs(result.wm_cbf[result.wm_defined] - F_WM)) < 1e-4


def test_probabilities_clipped(phantom):
    # Spline resampling overshoots; probabilities outside [0, 1] are clipped, not trusted
    pgm, pwm, mask = phantom
    cbf = pgm * F_GM + pwm * F_WM
    overshoot = pgm.copy()
    overshoot[pgm < 1e-3] = -0.02
    result = pvc_linear_regression(cbf, overshoot, pwm, mask)
    _check_outputs(result, mask)
    assert np.max(np.abs(result.gm_cbf[result.gm_defined] - F_GM)) < 0.1


def test_bad_arguments():
    ones = np.ones((6, 6, 2))
    with pytest.raises(ValueError, match="same shape"):
        pvc_linear_regression(ones, ones, ones[:3], ones)
    with pytest.raises(ValueError, match="odd"):
        pvc_linear_regression(ones, ones, ones, ones, kernel=(4, 4, 1))
    with pytest.raises(ValueError, match="3 integer sizes"):
        pvc_linear_regression(ones, ones, ones, ones, kernel=(5, 5))
    with pytest.raises(ValueError, match="3 integer sizes"):
        pvc_linear_regression(ones, ones, ones, ones, kernel=(5, 5, 1.5))


def test_pvc_record():
    assert PVC_KERNEL == (5, 5, 1)
    record = pvc_record(PVC_KERNEL)["PartialVolumeCorrection"]
    assert record["Method"] == "linear regression"
    assert record["Kernel"] == [5, 5, 1]
    assert record["KernelUnits"] == "voxels"
    assert "Asllani" in record["Reference"] and "1362" in record["Reference"]
    assert "IllConditioned" in record and "OutputMask" in record
    assert pvc_record((3, 3, 1))["PartialVolumeCorrection"]["Kernel"] == [3, 3, 1]
    json.dumps(pvc_record(np.array([5, 5, 1])))  # numpy ints become JSON ints
