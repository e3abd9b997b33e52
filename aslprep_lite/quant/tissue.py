"""Mean CBF per tissue, for the CBF sidecar.

Mean GM and WM CBF and their ratio are the usual first check of a CBF map (a healthy adult GM/WM
ratio is ~2-3; Asllani et al. 2008 report ~3.2 after partial-volume correction). Means are taken
over voxels of nearly pure tissue, so that the partial-volume mixing of GM and WM flows biases
them little.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["GM_THRESHOLD", "WM_THRESHOLD", "tissue_cbf", "tissue_classes"]

#: GM voxels: GM probability > 0.7, the GM mask of ExploreASL (``pGM>0.7``) and ASLPrep's
#: tissue-mean threshold (0.7). GM is a thin ribbon, so at ASL resolution few voxels are purer;
#: 0.7 keeps enough voxels while the GM share still dominates the mean.
GM_THRESHOLD = 0.7

#: WM voxels: WM probability > 0.9, ExploreASL's "pure WM" (``pWM>0.9``). Stricter than GM
#: because GM flow is ~2.5x WM flow: a 30 % GM share (ASLPrep's 0.7 for WM) would raise the WM
#: mean by ~45 %, a 10 % share by ~15 %, and WM is thick enough to leave plenty of such voxels.
WM_THRESHOLD = 0.9

_CBF_DECIMALS = 2  # mL/100 g/min: 0.01 is far below the precision of any ASL measurement
_RATIO_DECIMALS = 3


def tissue_arrays(
    cbf: ArrayLike, pgm: ArrayLike, pwm: ArrayLike, mask: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CBF, GM and WM probabilities as float64 and the mask as bool, checked to share a shape.

    Raises
    ------
    ValueError
        If the arrays differ in shape.
    """
    cbf = np.asarray(cbf, dtype=np.float64)
    pgm = np.asarray(pgm, dtype=np.float64)
    pwm = np.asarray(pwm, dtype=np.float64)
    inside = np.asarray(mask, dtype=np.float64) > 0  # NaN > 0 is False
    if not cbf.shape == pgm.shape == pwm.shape == inside.shape:
        raise ValueError(
            "cbf, pgm, pwm and mask must have the same shape, got "
            f"{cbf.shape}, {pgm.shape}, {pwm.shape}, {inside.shape}"
        )
    return cbf, pgm, pwm, inside


def _check_threshold(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def tissue_cbf(
    cbf: ArrayLike,
    pgm: ArrayLike,
    pwm: ArrayLike,
    mask: ArrayLike,
    *,
    gm_threshold: float = GM_THRESHOLD,
    wm_threshold: float = WM_THRESHOLD,
) -> dict[str, object]:
    """Mean GM and WM CBF and their ratio, as CBF sidecar fields.

    GM voxels are brain-mask voxels with ``pgm > gm_threshold``, WM voxels those with
    ``pwm > wm_threshold``; voxels whose CBF is not finite are left out of both.

    Parameters
    ----------
    cbf
        (X, Y, Z) CBF map (mL/100 g/min).
    pgm, pwm
        GM and WM probability maps on the CBF grid.
    mask
        Brain mask (nonzero = brain).
    gm_threshold, wm_threshold
        Probability thresholds, in [0, 1) (:data:`GM_THRESHOLD`, :data:`WM_THRESHOLD`).

    Returns
    -------
    dict
        ``MeanCBFGM`` and ``MeanCBFWM`` (mL/100 g/min, 2 decimals), ``GMWMRatio`` (3
        decimals), ``GMVoxels`` and ``WMVoxels`` (counts) and ``TissueMasks`` (how the voxels
        were chosen). A mean without voxels is None (JSON null), and so is the ratio without
        both means or with a WM mean <= 0; ``TissueCBFNote`` then says why.

    Raises
    ------
    ValueError
        If the arrays differ in shape or a threshold is outside [0, 1).
    """
    cbf, pgm, pwm, inside = tissue_arrays(cbf, pgm, pwm, mask)
    gm_threshold = _check_threshold("gm_threshold", gm_threshold)
    wm_threshold = _check_threshold("wm_threshold", wm_threshold)

    valid = inside & np.isfinite(cbf)
    gm_voxels = valid & (pgm > gm_threshold)  # NaN probabilities compare False: left out
    wm_voxels = valid & (pwm > wm_threshold)
    n_gm = int(np.count_nonzero(gm_voxels))
    n_wm = int(np.count_nonzero(wm_voxels))
    gm_mean = float(np.mean(cbf[gm_voxels])) if n_gm else None
    wm_mean = float(np.mean(cbf[wm_voxels])) if n_wm else None

    notes = []
    for label, count, threshold in (("GM", n_gm, gm_threshold), ("WM", n_wm, wm_threshold)):
        if not count:
            notes.append(
                f"no voxel with {label} probability > {threshold:g} and finite CBF in the brain "
                f"mask: MeanCBF{label} is null"
            )
    ratio = None
    if gm_mean is not None and wm_mean is not None:
        if wm_mean > 0:
            ratio = round(gm_mean / wm_mean, _RATIO_DECIMALS)
        else:
            notes.append(f"mean WM CBF is {wm_mean:.2f} (not positive): GMWMRatio is null")
    elif notes:
        notes.append("GMWMRatio needs both means: null")

    record: dict[str, object] = {
        "MeanCBFGM": None if gm_mean is None else round(gm_mean, _CBF_DECIMALS),
        "MeanCBFWM": None if wm_mean is None else round(wm_mean, _CBF_DECIMALS),
        "GMWMRatio": ratio,
        "GMVoxels": n_gm,
        "WMVoxels": n_wm,
        "TissueMasks": (
            f"GM: GM probability > {gm_threshold:g}; WM: WM probability > {wm_threshold:g}; "
            "both within the brain mask, voxels with non-finite CBF excluded (thresholds as "
            "ExploreASL's GM and pure-WM masks)"
        ),
    }
    if notes:
        record["TissueCBFNote"] = "; ".join(notes)
    return record


def tissue_classes(tissue: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GM, WM and CSF fractions from an (X, Y, Z, K) stack of K = 2 or 3 tissue maps.

    Template priors may lack a CSF map (the embedded MNI152NLin2009aSym has GM and WM only):
    CSF is then what the two leave, ``clip(1 - GM - WM, 0, 1)``, as the template's own CSF
    prior is made from its brain mask (:func:`aslprep_lite.quant.anatomy.make_template`).

    Raises
    ------
    ValueError
        If the stack is not 4D with 2 or 3 maps.
    """
    tissue = np.asarray(tissue, dtype=np.float64)
    if tissue.ndim != 4 or tissue.shape[-1] not in (2, 3):
        raise ValueError(f"expected (X, Y, Z, 2 or 3) tissue maps, got {tissue.shape}")
    gm, wm = tissue[..., 0], tissue[..., 1]
    csf = tissue[..., 2] if tissue.shape[-1] == 3 else np.clip(1.0 - gm - wm, 0.0, 1.0)
    return gm, wm, csf
