"""Per-run quality-control metrics of a CBF map: the ``desc-qualitycontrol_cbf.tsv`` row.

One row per run, one column per metric (:data:`COLUMNS`, which also gives each column's
description, units and reference for the JSON sidecar, :func:`qc_sidecar`). Undefined values
are None in Python and ``n/a`` in the TSV.

Formulas
--------
Head motion (from the confounds, whose first row is ``n/a``)
    ``mean_fd``, ``max_fd``: mean and largest framewise displacement (Power et al. 2012);
    ``mean_rmsd``: mean RMS displacement relative to the previous volume (Jenkinson et al.
    2002). NaNs (the first row, or every row when head motion was not estimated) are left out.
Tissue CBF
    ``gm_cbf``, ``wm_cbf``, ``gm_wm_ratio``: :func:`aslprep_lite.quant.tissue.tissue_cbf`
    (GM: pGM > 0.7, WM: pWM > 0.9, within the brain mask), so the row and the CBF sidecar's
    ``TissueCBF`` agree to the digit.
Negative grey matter
    ``gm_negative_percent = 100 * #{GM voxels with CBF < 0} / #{GM voxels}`` on the CBF map
    as written (ASLPrep's ``NEG_CBF_PERC``).
Spatial coefficient of variation (Mutsaerts et al. 2017)
    ``gm_spatial_cov = SD / mean`` of CBF over the same GM voxels, SD with ``n - 1``
    (MATLAB's ``std``, as ExploreASL's ``xASL_stat_ComputeSpatialCoV``).
Quality evaluation index (Dolui et al. 2024), :func:`qei`
    On the CBF map smoothed by a 5 mm FWHM Gaussian::

        QEI = cbrt[(1 - exp(-a1 * rho**b1)) * exp(-a2 * D**b2) * exp(-a3 * N**b3)]

    ``rho``: Pearson correlation (negative values set to 0) of the smoothed CBF with the
    pseudo-CBF ``2.5 pGM + pWM`` over the brain mask; ``D``: pooled within-tissue variance of
    the smoothed CBF over GM, WM and CSF (probability > 0.9, in the brain mask) divided by the
    absolute mean GM CBF; ``N``: the fraction of GM voxels with smoothed CBF < 0;
    (a1, b1) = (3.0126, 2.4419), (a2, b2) = (0.0544, 0.9272), (a3, b3) = (2.8478, 0.5196).
Multi-delay fit
    ``median_att``: median ATT over brain-mask voxels where the fit did not fail;
    ``fit_failed_percent = 100 * #{failed brain-mask voxels} / #{brain-mask voxels}``.

References
----------
Dolui S, Wang Z, Wolf RL, Nabavizadeh A, Xie L, Tosun D, Nasrallah IM, Wolk DA, Detre JA
(2024). Automated quality evaluation index for arterial spin labeling derived cerebral blood
flow maps. J Magn Reson Imaging 60(6):2497-2508. doi:10.1002/jmri.29308

Mutsaerts HJMM, Petr J, Václavů L, van Dalen JW, Robertson AD, Caan MW, Masellis M,
Nederveen AJ, Richard E, MacIntosh BJ (2017). The spatial coefficient of variation in arterial
spin labeling cerebral blood flow images. J Cereb Blood Flow Metab 37(9):3184-3192.
doi:10.1177/0271678X16683690
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from aslprep_lite.quant.m0 import voxel_sigma
from aslprep_lite.quant.tissue import GM_THRESHOLD, WM_THRESHOLD, tissue_cbf

__all__ = [
    "COLUMNS",
    "QEI_DISPERSION",
    "QEI_NEGATIVE",
    "QEI_PSEUDO_CBF_WEIGHTS",
    "QEI_SIMILARITY",
    "QEI_SMOOTHING_FWHM",
    "QEI_TISSUE_THRESHOLD",
    "motion_summary",
    "negative_fraction",
    "qc_row",
    "qc_sidecar",
    "qei",
    "qei_components",
    "qei_index",
    "read_confounds",
    "read_qc_tsv",
    "spatial_cov",
    "write_qc_tsv",
]

Value = float | int | None

#: QEI: FWHM (mm) of the Gaussian the CBF map is smoothed with first. Dolui et al. 2024 derived
#: the index's parameters and its 0.5 cut-off on maps smoothed by a 5 mm isotropic kernel.
QEI_SMOOTHING_FWHM = 5.0

#: QEI: tissue probability above which a voxel is GM, WM or CSF for the pooled variance and the
#: negative-GM fraction. 0.9 as in the paper (ASLPrep passes its tissue-mean threshold, 0.7).
QEI_TISSUE_THRESHOLD = 0.9

#: QEI: pseudo-CBF ``2.5 pGM + 1.0 pWM`` (GM flow ~2.5 times WM flow, CSF none).
QEI_PSEUDO_CBF_WEIGHTS = (2.5, 1.0)

# The six fitted QEI constants. The paper's text was not at hand: these are the values of
# Dolui's group's code (QEI-Net, Beltran Urbano, Dolui & Detre, "computeQEI_Sudipto"), which
# round to the paper's formula as quoted elsewhere, (3, 2.4), (0.1, 0.9), (2.8, 0.5); ASLPrep's
# compute_qei has the same values but 0.054 for the dispersion coefficient (the two terms are
# 0.04 % apart at D = 1).
#: QEI: ``(a, b)`` of ``1 - exp(-a * rho**b)``, the structural-similarity term.
QEI_SIMILARITY = (3.0126, 2.4419)
#: QEI: ``(a, b)`` of ``exp(-a * D**b)``, the spatial-variability (dispersion) term.
QEI_DISPERSION = (0.0544, 0.9272)
#: QEI: ``(a, b)`` of ``exp(-a * N**b)``, the negative-GM-fraction term.
QEI_NEGATIVE = (2.8478, 0.5196)

_POWER_2012 = (
    "Power JD, Barnes KA, Snyder AZ, Schlaggar BL, Petersen SE (2012). Spurious but systematic "
    "correlations in functional connectivity MRI networks arise from subject motion. "
    "NeuroImage 59(3):2142-2154. doi:10.1016/j.neuroimage.2011.10.018"
)
_JENKINSON_2002 = (
    "Jenkinson M, Bannister P, Brady M, Smith S (2002). Improved optimization for the robust "
    "and accurate linear registration and motion correction of brain images. NeuroImage "
    "17(2):825-841. doi:10.1006/nimg.2002.1132"
)
_EXPLOREASL_2020 = (
    "Mutsaerts HJMM et al. (2020). ExploreASL: an image processing pipeline for multi-center "
    "ASL perfusion MRI studies. NeuroImage 219:117031. doi:10.1016/j.neuroimage.2020.117031 "
    "(tissue thresholds pGM > 0.7, pWM > 0.9)"
)
_MUTSAERTS_2017 = (
    "Mutsaerts HJMM, Petr J, Vaclavu L, van Dalen JW, Robertson AD, Caan MW, Masellis M, "
    "Nederveen AJ, Richard E, MacIntosh BJ (2017). The spatial coefficient of variation in "
    "arterial spin labeling cerebral blood flow images. J Cereb Blood Flow Metab "
    "37(9):3184-3192. doi:10.1177/0271678X16683690"
)
_DOLUI_2024 = (
    "Dolui S, Wang Z, Wolf RL, Nabavizadeh A, Xie L, Tosun D, Nasrallah IM, Wolk DA, Detre JA "
    "(2024). Automated quality evaluation index for arterial spin labeling derived cerebral "
    "blood flow maps. J Magn Reson Imaging 60(6):2497-2508. doi:10.1002/jmri.29308"
)
_DICE_1945 = (
    "Dice LR (1945). Measures of the amount of ecologic association between species. "
    "Ecology 26(3):297-302. doi:10.2307/1932409"
)
_KINETIC = (
    "Buxton RB et al. (1998). A general kinetic model for quantitative perfusion imaging with "
    "arterial spin labeling. Magn Reson Med 40:383-396. doi:10.1002/mrm.1910400308; "
    "weighted delay: Dai W et al. (2012). Magn Reson Med 67:1252-1265. doi:10.1002/mrm.23103"
)

_GM_VOXELS = f"grey-matter voxels (GM probability > {GM_THRESHOLD:g} within the brain mask)"
_QEI_DESCRIPTION = (
    "Quality evaluation index of the CBF map, 0 (unusable) to 1 (excellent); below 0.5 the "
    "map is usually unacceptable (Dolui et al. 2024). On the CBF map smoothed by a "
    f"{QEI_SMOOTHING_FWHM:g} mm FWHM Gaussian: QEI = cbrt[(1 - exp(-{QEI_SIMILARITY[0]} "
    f"rho^{QEI_SIMILARITY[1]})) * exp(-{QEI_DISPERSION[0]} D^{QEI_DISPERSION[1]}) * "
    f"exp(-{QEI_NEGATIVE[0]} N^{QEI_NEGATIVE[1]})], rho the Pearson correlation (negative: 0) "
    f"with the pseudo-CBF {QEI_PSEUDO_CBF_WEIGHTS[0]:g} pGM + {QEI_PSEUDO_CBF_WEIGHTS[1]:g} "
    "pWM over the brain mask, D the pooled within-tissue variance over GM, WM and CSF "
    f"(probability > {QEI_TISSUE_THRESHOLD:g}, in the brain mask) divided by the absolute mean GM "
    f"CBF, N the fraction of GM voxels (probability > {QEI_TISSUE_THRESHOLD:g}) with "
    "smoothed CBF < 0."
)

#: The columns of ``desc-qualitycontrol_cbf.tsv``, in order: name -> ``Description``,
#: ``Units`` and, where one applies, ``Reference`` (the JSON sidecar's entries).
COLUMNS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "mean_fd": {
            "Description": "Mean framewise displacement over the volumes of the confounds "
            "table (the first volume, without a predecessor, left out); n/a when head motion "
            "was not estimated",
            "Units": "mm",
            "Reference": _POWER_2012,
        },
        "max_fd": {
            "Description": "Largest framewise displacement of the run; n/a when head motion "
            "was not estimated",
            "Units": "mm",
            "Reference": _POWER_2012,
        },
        "mean_rmsd": {
            "Description": "Mean root-mean-square displacement relative to the previous "
            "volume over an 80 mm sphere (MCFLIRT's relative RMS), first volume left out; n/a "
            "when head motion was not estimated",
            "Units": "mm",
            "Reference": _JENKINSON_2002,
        },
        "pairs_used": {
            "Description": "Control/label pairs subtracted into ΔM and averaged into the CBF "
            "map (deltam and cbf volumes passed through are not counted); n/a for a series "
            "without control/label pairs",
            "Units": "count",
        },
        "pairs_removed": {
            "Description": "Control/label pairs formed but left out of the average "
            "(censoring), 0 when none is; control or label volumes without a partner are not "
            "pairs (they are in the CBF sidecar's VolumesLeftOut); n/a without pairs",
            "Units": "count",
        },
        "gm_cbf": {
            "Description": f"Mean CBF over {_GM_VOXELS}, as TissueCBF.MeanCBFGM of the CBF "
            "sidecar",
            "Units": "mL/100 g/min",
            "Reference": _EXPLOREASL_2020,
        },
        "wm_cbf": {
            "Description": "Mean CBF over white-matter voxels (WM probability > "
            f"{WM_THRESHOLD:g} within the brain mask), as TissueCBF.MeanCBFWM of the CBF "
            "sidecar",
            "Units": "mL/100 g/min",
            "Reference": _EXPLOREASL_2020,
        },
        "gm_wm_ratio": {
            "Description": "gm_cbf / wm_cbf (n/a when the WM mean is not positive); ~2-3 in "
            "healthy adults",
            "Units": "1",
        },
        "gm_negative_percent": {
            "Description": f"Percentage of {_GM_VOXELS} with CBF < 0 on the CBF map as written",
            "Units": "%",
        },
        "gm_spatial_cov": {
            "Description": "Spatial coefficient of variation of CBF over the voxels of "
            "gm_cbf: standard deviation (n - 1) / mean, a ratio (ExploreASL reports it x 100, "
            "over pGM + pWM > 0.5); n/a when the mean is not positive. High values point to "
            "long arterial transit times (vascular signal) or artefacts",
            "Units": "1",
            "Reference": _MUTSAERTS_2017,
        },
        "qei": {
            "Description": _QEI_DESCRIPTION,
            "Units": "1",
            "Reference": _DOLUI_2024,
        },
        "coregistration_dice": {
            "Description": "Dice coefficient of the ASL brain mask and the T1w brain mask "
            "(without a T1w: the template's) on the ASL grid after coregistration, as "
            "Coregistration.Dice of the CBF sidecar",
            "Units": "1",
            "Reference": _DICE_1945,
        },
        "normalization_correlation": {
            "Description": "Pearson correlation of the normalized T1w with the template "
            "inside the template's eroded brain mask, as Normalization.Correlation of the "
            "T1w sidecar; n/a without a T1w",
            "Units": "1",
        },
        "median_att": {
            "Description": "Median arterial transit time over brain-mask voxels where the "
            "multi-delay fit did not fail; n/a for single-delay runs",
            "Units": "s",
            "Reference": _KINETIC,
        },
        "fit_failed_percent": {
            "Description": "Percentage of brain-mask voxels where the multi-delay fit failed "
            "(the desc-fitfailed_mask); n/a for single-delay runs",
            "Units": "%",
        },
    }
)

_INTEGER_COLUMNS = frozenset({"pairs_used", "pairs_removed"})
_NA = "n/a"
_DECIMALS = 6  # as the confounds table


# --------------------------------------------------------------------------------------------
# Metrics of one map
# --------------------------------------------------------------------------------------------


def _selected(cbf: ArrayLike, voxels: ArrayLike) -> NDArray[np.float64]:
    """Finite CBF values of the selected voxels."""
    cbf = np.asarray(cbf, dtype=np.float64)
    voxels = np.asarray(voxels, dtype=np.float64) > 0  # NaN > 0 is False
    if cbf.shape != voxels.shape:
        raise ValueError(f"cbf and mask differ in shape: {cbf.shape} vs {voxels.shape}")
    values = cbf[voxels]
    return values[np.isfinite(values)]


def spatial_cov(cbf: ArrayLike, gm_mask: ArrayLike) -> float | None:
    """Spatial coefficient of variation of CBF over grey matter (Mutsaerts et al. 2017).

    Parameters
    ----------
    cbf
        CBF map (mL/100 g/min).
    gm_mask
        Grey-matter voxels (nonzero = in), same shape; voxels with non-finite CBF are left out.

    Returns
    -------
    float or None
        ``std(CBF, ddof=1) / mean(CBF)`` (a ratio, not a percentage); None with fewer than two
        voxels or a mean that is not positive (the ratio then describes no perfusion image).
    """
    values = _selected(cbf, gm_mask)
    if values.size < 2:
        return None
    mean = float(values.mean())
    if not mean > 0:
        return None
    return float(values.std(ddof=1)) / mean


def negative_fraction(cbf: ArrayLike, gm_mask: ArrayLike) -> float | None:
    """Fraction of grey-matter voxels with negative CBF.

    Parameters
    ----------
    cbf
        CBF map.
    gm_mask
        Grey-matter voxels (nonzero = in); voxels with non-finite CBF are left out.

    Returns
    -------
    float or None
        ``#{CBF < 0} / #{voxels}``, in [0, 1] (0 itself is not negative); None without voxels.
    """
    values = _selected(cbf, gm_mask)
    if values.size == 0:
        return None
    return float(np.count_nonzero(values < 0)) / values.size


def qei_index(similarity: float, dispersion: float, negative: float) -> float:
    """The QEI from its three components (Dolui et al. 2024).

    Parameters
    ----------
    similarity
        ``rho``, the Pearson correlation of the smoothed CBF with the pseudo-CBF; negative
        values count as 0.
    dispersion
        ``D``, the pooled within-tissue variance over the absolute mean GM CBF (>= 0; inf is
        allowed and gives 0).
    negative
        ``N``, the fraction (not percentage) of GM voxels with negative smoothed CBF.

    Returns
    -------
    float
        ``cbrt[(1 - exp(-a1 rho^b1)) exp(-a2 D^b2) exp(-a3 N^b3)]``, in [0, 1).
    """
    rho = max(float(similarity), 0.0)
    d = max(float(dispersion), 0.0)
    n = min(max(float(negative), 0.0), 1.0)
    (a1, b1), (a2, b2), (a3, b3) = QEI_SIMILARITY, QEI_DISPERSION, QEI_NEGATIVE
    product = (
        -math.expm1(-a1 * rho**b1)
        * math.exp(-a2 * d**b2 if math.isfinite(d) else -math.inf)
        * math.exp(-a3 * n**b3)
    )
    return float(np.cbrt(product))


def _smooth(cbf: ArrayLike, mask: ArrayLike, zooms: Sequence[float], fwhm: float) -> NDArray:
    """CBF, 0 outside the mask and where not finite, smoothed by a Gaussian of ``fwhm`` mm."""
    cbf = np.asarray(cbf, dtype=np.float64)
    inside = np.asarray(mask, dtype=np.float64) > 0
    data = np.where(inside & np.isfinite(cbf), cbf, 0.0)
    if fwhm <= 0:
        return data
    zooms = np.asarray(zooms, dtype=np.float64)
    if zooms.shape != (3,) or not np.all(zooms > 0):
        raise ValueError(f"zooms must be three positive voxel sizes (mm), got {zooms}")
    # mode "nearest" as nibabel.processing.smooth_image, which ASLPrep's QEI uses: a brain cut
    # by the edge of the field of view is not darkened there.
    return ndimage.gaussian_filter(data, voxel_sigma(fwhm, zooms), mode="nearest")


def qei_components(
    cbf: ArrayLike,
    pgm: ArrayLike,
    pwm: ArrayLike,
    pcsf: ArrayLike,
    mask: ArrayLike,
    *,
    zooms: Sequence[float],
    fwhm: float = QEI_SMOOTHING_FWHM,
    threshold: float = QEI_TISSUE_THRESHOLD,
) -> dict[str, float | None]:
    """The QEI and its components ``rho``, ``D`` and ``N`` (see :func:`qei`).

    Returns
    -------
    dict
        ``similarity`` (rho), ``dispersion`` (D), ``negative`` (N) and ``qei``; all None when
        the index is undefined (no GM voxel in the brain mask, no tissue class of two voxels,
        fewer than two brain voxels, or a uniform pseudo-CBF).
    """
    cbf = np.asarray(cbf, dtype=np.float64)
    pgm = np.asarray(pgm, dtype=np.float64)
    pwm = np.asarray(pwm, dtype=np.float64)
    pcsf = np.asarray(pcsf, dtype=np.float64)
    inside = np.asarray(mask, dtype=np.float64) > 0  # NaN > 0 is False
    if not cbf.shape == pgm.shape == pwm.shape == pcsf.shape == inside.shape:
        raise ValueError(
            "cbf, pgm, pwm, pcsf and mask must have the same shape, got "
            f"{cbf.shape}, {pgm.shape}, {pwm.shape}, {pcsf.shape}, {inside.shape}"
        )
    if cbf.ndim != 3:
        raise ValueError(f"expected 3D maps, got {cbf.ndim}D")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    undefined: dict[str, float | None] = dict.fromkeys(
        ("similarity", "dispersion", "negative", "qei")
    )
    smoothed = _smooth(cbf, inside, zooms, fwhm)

    # Every component over the brain mask, where the CBF map is defined. (ASLPrep correlates
    # over the voxels of non-zero smoothed CBF, i.e. also a shell of the kernel's reach around
    # the brain, where smoothed CBF and pseudo-CBF both fall towards 0: that shell alone gives
    # a structureless map a high correlation.)
    w_gm, w_wm = QEI_PSEUDO_CBF_WEIGHTS
    pseudo = w_gm * pgm + w_wm * pwm
    support = inside & np.isfinite(pseudo)
    if np.count_nonzero(support) < 2:
        return undefined
    x, y = smoothed[support], pseudo[support]
    if np.ptp(y) == 0:
        return undefined
    rho = 0.0 if np.ptp(x) == 0 else max(float(np.corrcoef(x, y)[0, 1]), 0.0)

    # Pooled within-tissue variance (sample variances, MATLAB's var) over the classes with
    # at least two voxels.
    classes = [inside & (p > threshold) for p in (pgm, pwm, pcsf)]  # NaN compares False
    gm = smoothed[classes[0]]
    if gm.size == 0:
        return undefined
    sizes = [int(np.count_nonzero(c)) for c in classes]
    used = [(n, smoothed[c]) for n, c in zip(sizes, classes, strict=True) if n >= 2]
    if not used:
        return undefined
    pooled = sum((n - 1) * float(v.var(ddof=1)) for n, v in used) / (
        sum(n for n, _ in used) - len(used)
    )
    gm_mean = abs(float(gm.mean()))
    dispersion = pooled / gm_mean if gm_mean > 0 else math.inf
    negative = float(np.count_nonzero(gm < 0)) / gm.size
    return {
        "similarity": rho,
        "dispersion": dispersion,
        "negative": negative,
        "qei": qei_index(rho, dispersion, negative),
    }


def qei(
    cbf: ArrayLike,
    pgm: ArrayLike,
    pwm: ArrayLike,
    pcsf: ArrayLike,
    mask: ArrayLike,
    *,
    zooms: Sequence[float],
    fwhm: float = QEI_SMOOTHING_FWHM,
    threshold: float = QEI_TISSUE_THRESHOLD,
) -> float | None:
    """Quality evaluation index of a CBF map (Dolui et al. 2024).

    The CBF map, set to 0 outside the brain mask and where not finite, is smoothed by a
    Gaussian of ``fwhm`` mm FWHM; then::

        QEI = cbrt[(1 - exp(-3.0126 rho^2.4419)) exp(-0.0544 D^0.9272) exp(-2.8478 N^0.5196)]

    * ``rho``: Pearson correlation of the smoothed CBF with the pseudo-CBF
      ``2.5 pGM + pWM`` over the brain mask, negative values set to 0;
    * ``D = V / |mean GM CBF|``, ``V = sum_k (n_k - 1) s_k^2 / (sum_k n_k - K)`` the pooled
      variance of the smoothed CBF over the K tissue classes GM, WM, CSF (probability >
      ``threshold``, within the brain mask) that have at least two voxels, ``s_k^2`` with
      ``n_k - 1``;
    * ``N``: the fraction of GM voxels with smoothed CBF < 0.

    Parameters
    ----------
    cbf
        (X, Y, Z) CBF map (mL/100 g/min).
    pgm, pwm, pcsf
        GM, WM and CSF probability maps on the CBF grid.
    mask
        Brain mask (nonzero = brain): where the CBF map is defined.
    zooms
        Voxel sizes (mm) of the grid, for the smoothing kernel.
    fwhm
        Smoothing FWHM (mm); the published parameters are for 5 mm. 0 skips the smoothing.
    threshold
        Tissue probability threshold of the GM, WM and CSF classes.

    Returns
    -------
    float or None
        The index, in [0, 1), higher is better; None when undefined (see
        :func:`qei_components`).

    References
    ----------
    Dolui S et al. (2024). Automated quality evaluation index for arterial spin labeling
    derived cerebral blood flow maps. J Magn Reson Imaging 60(6):2497-2508.
    doi:10.1002/jmri.29308
    """
    return qei_components(cbf, pgm, pwm, pcsf, mask, zooms=zooms, fwhm=fwhm, threshold=threshold)[
        "qei"
    ]


# --------------------------------------------------------------------------------------------
# The row
# --------------------------------------------------------------------------------------------


def motion_summary(fd: ArrayLike | None, rmsd: ArrayLike | None) -> dict[str, float | None]:
    """Mean and largest framewise displacement and mean RMSD of a run.

    Parameters
    ----------
    fd, rmsd
        The ``framewise_displacement`` and ``rmsd`` columns of the confounds (mm), NaN where
        ``n/a`` (the first row; every row when head motion was not estimated); None when there
        is no confounds table.

    Returns
    -------
    dict
        ``mean_fd``, ``max_fd`` and ``mean_rmsd`` (mm), NaNs left out; None where no value is
        finite.
    """

    def finite(values: ArrayLike | None) -> NDArray[np.float64]:
        if values is None:
            return np.empty(0)
        values = np.asarray(values, dtype=np.float64).ravel()
        return values[np.isfinite(values)]

    fd_values, rmsd_values = finite(fd), finite(rmsd)
    return {
        "mean_fd": float(fd_values.mean()) if fd_values.size else None,
        "max_fd": float(fd_values.max()) if fd_values.size else None,
        "mean_rmsd": float(rmsd_values.mean()) if rmsd_values.size else None,
    }


def _record_value(record: Mapping[str, Any] | None, key: str) -> float | None:
    if record is None or record.get(key) is None:
        return None
    value = float(record[key])
    return value if math.isfinite(value) else None


def _count(value: int | None, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def qc_row(
    cbf: ArrayLike,
    mask: ArrayLike,
    pgm: ArrayLike,
    pwm: ArrayLike,
    pcsf: ArrayLike,
    *,
    zooms: Sequence[float],
    fd: ArrayLike | None = None,
    rmsd: ArrayLike | None = None,
    pairs_used: int | None = None,
    pairs_removed: int | None = None,
    coregistration: Mapping[str, Any] | None = None,
    normalization: Mapping[str, Any] | None = None,
    att: ArrayLike | None = None,
    fit_failed: ArrayLike | None = None,
) -> dict[str, Value]:
    """One row of ``desc-qualitycontrol_cbf.tsv``: every column of :data:`COLUMNS`.

    Parameters
    ----------
    cbf
        (X, Y, Z) CBF map of the run (mL/100 g/min), on the ASL grid.
    mask
        Brain mask (nonzero = brain).
    pgm, pwm, pcsf
        Tissue probability maps on the same grid (T1w segmentation or template priors).
    zooms
        Voxel sizes (mm), for the QEI smoothing.
    fd, rmsd
        Confounds columns ``framewise_displacement`` and ``rmsd`` (NaN for ``n/a``).
    pairs_used, pairs_removed
        Control/label pairs averaged, and formed but left out (None without pairs).
    coregistration
        The CBF sidecar's ``Coregistration`` record (its ``Dice`` is read).
    normalization
        The T1w sidecar's ``Normalization`` record (its ``Correlation`` is read); None
        without a T1w.
    att, fit_failed
        Multi-delay runs: the ATT map (s) and the fit-failure mask; None for single-delay runs.

    Returns
    -------
    dict
        Column name -> value, in :data:`COLUMNS` order; None where undefined (``n/a``).
    """
    cbf = np.asarray(cbf, dtype=np.float64)
    inside = np.asarray(mask, dtype=np.float64) > 0
    pgm = np.asarray(pgm, dtype=np.float64)
    tissue = tissue_cbf(cbf, pgm, pwm, inside)
    gm_voxels = inside & (pgm > GM_THRESHOLD)
    negative = negative_fraction(cbf, gm_voxels)

    median_att = fit_failed_percent = None
    if att is not None:
        att = np.asarray(att, dtype=np.float64)
        failed = (
            np.zeros(att.shape, dtype=bool)
            if fit_failed is None
            else np.asarray(fit_failed, dtype=np.float64) > 0
        )
        if att.shape != inside.shape or failed.shape != inside.shape:
            raise ValueError("att and fit_failed must have the shape of the CBF map")
        n_brain = int(np.count_nonzero(inside))
        good = _selected(att, inside & ~failed)
        median_att = float(np.median(good)) if good.size else None
        if n_brain:
            fit_failed_percent = 100.0 * np.count_nonzero(inside & failed) / n_brain
    elif fit_failed is not None:
        raise ValueError("fit_failed without att")

    row: dict[str, Value] = {
        **motion_summary(fd, rmsd),
        "pairs_used": _count(pairs_used, "pairs_used"),
        "pairs_removed": _count(pairs_removed, "pairs_removed"),
        "gm_cbf": tissue["MeanCBFGM"],
        "wm_cbf": tissue["MeanCBFWM"],
        "gm_wm_ratio": tissue["GMWMRatio"],
        "gm_negative_percent": None if negative is None else 100.0 * negative,
        "gm_spatial_cov": spatial_cov(cbf, gm_voxels),
        "qei": qei(cbf, pgm, pwm, pcsf, inside, zooms=zooms),
        "coregistration_dice": _record_value(coregistration, "Dice"),
        "normalization_correlation": _record_value(normalization, "Correlation"),
        "median_att": median_att,
        "fit_failed_percent": fit_failed_percent,
    }
    return {name: row[name] for name in COLUMNS}


# --------------------------------------------------------------------------------------------
# The TSV and its sidecar
# --------------------------------------------------------------------------------------------


def _format(name: str, value: Value) -> str:
    if value is None:
        return _NA
    if isinstance(value, bool):
        raise ValueError(f"{name}: a boolean is not a QC value")
    if name in _INTEGER_COLUMNS:
        return str(_count(value, name))
    value = float(value)
    return _NA if not math.isfinite(value) else f"{value:.{_DECIMALS}f}"


def write_qc_tsv(rows: Sequence[Mapping[str, Value]], path: str | PathLike[str]) -> None:
    """Write QC rows as a tab-separated table: header, :data:`COLUMNS` order, ``n/a``.

    Floats get 6 decimals (as the confounds table), counts are integers, None and non-finite
    values are ``n/a``.

    Raises
    ------
    ValueError
        A row lacks a column or has one that is not in :data:`COLUMNS`.
    """
    lines = ["\t".join(COLUMNS)]
    for row in rows:
        missing = [name for name in COLUMNS if name not in row]
        unknown = [name for name in row if name not in COLUMNS]
        if missing or unknown:
            raise ValueError(f"QC row: missing columns {missing}, unknown columns {unknown}")
        lines.append("\t".join(_format(name, row[name]) for name in COLUMNS))
    with open(path, "w", encoding="utf-8") as fobj:
        fobj.write("\n".join(lines) + "\n")


def read_confounds(path: str | PathLike[str]) -> dict[str, NDArray[np.float64]]:
    """The columns of a confounds TSV as float arrays (NaN for ``n/a``)."""
    with open(path, encoding="utf-8") as fobj:
        lines = fobj.read().splitlines()
    header = lines[0].split("\t")
    values = [
        [math.nan if v == "n/a" else float(v) for v in line.split("\t")] for line in lines[1:]
    ]
    table = np.asarray(values, dtype=np.float64).reshape(len(values), len(header))
    return {name: table[:, i] for i, name in enumerate(header)}


def read_qc_tsv(path: str | PathLike[str]) -> list[dict[str, Value]]:
    """Read a table of :func:`write_qc_tsv` back: ``n/a`` as None, counts as int."""
    with open(path, encoding="utf-8") as fobj:
        lines = fobj.read().splitlines()
    header = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{path}: {len(fields)} fields for {len(header)} columns")
        row: dict[str, Value] = {}
        for name, text in zip(header, fields, strict=True):
            if text == _NA:
                row[name] = None
            elif name in _INTEGER_COLUMNS:
                row[name] = int(text)
            else:
                row[name] = float(text)
        rows.append(row)
    return rows


def qc_sidecar(tissue_source: str) -> dict[str, Any]:
    """JSON sidecar of ``desc-qualitycontrol_cbf.tsv``.

    Parameters
    ----------
    tissue_source
        Where the tissue maps come from: ``"T1w segmentation"``, or e.g.
        ``"MNI152NLin2009aSym tissue priors (no T1w)"`` in T1w-free mode.

    Returns
    -------
    dict
        One entry per column (``Description``, ``Units``, ``Reference`` where one applies),
        then ``TissueSource`` and ``QEIParameters``.
    """
    sidecar: dict[str, Any] = {name: dict(copy.deepcopy(entry)) for name, entry in COLUMNS.items()}
    sidecar["TissueSource"] = tissue_source
    sidecar["QEIParameters"] = {
        "SmoothingFWHM": {"Value": QEI_SMOOTHING_FWHM, "Units": "mm"},
        "TissueThreshold": QEI_TISSUE_THRESHOLD,
        "PseudoCBFWeights": {"GM": QEI_PSEUDO_CBF_WEIGHTS[0], "WM": QEI_PSEUDO_CBF_WEIGHTS[1]},
        "Similarity": list(QEI_SIMILARITY),
        "Dispersion": list(QEI_DISPERSION),
        "NegativeGM": list(QEI_NEGATIVE),
    }
    return sidecar
