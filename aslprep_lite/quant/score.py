"""SCORE outlier rejection and SCRUB robust Bayesian averaging of a CBF time series.

SCORE (Structural Correlation based Outlier REjection)
    Dolui S, Wang Z, Shinohara RT, Wolk DA, Detre JA (2017). Structural Correlation-based
    Outlier Rejection (SCORE) algorithm for arterial spin labeling time series. J Magn Reson
    Imaging 45:1786-1797, doi:10.1002/jmri.25436.

SCRUB (Structural Correlation with RobUst Bayesian)
    Dolui S, Wolk DA, Detre JA (2016). SCRUB: a structural correlation and empirical robust
    Bayesian method for ASL data. Proc Intl Soc Mag Reson Med 24, abstract 2880 (a conference
    abstract; it has no DOI). This is the reference ASLPrep cites for SCRUB (``scrub_dolui`` /
    ``dolui2016scrub`` in its bibliography).

Both follow the algorithms as written by their author, Sudipto Dolui, in MATLAB
(``SCORE_denoising.m`` and ``SCRUBdenoising.m``, circulated with public ASL toolboxes), which
ASLPrep (``aslprep/utils/cbf.py``: ``_getcbfscore``, ``_scrub_cbf``) and
xcpEngine (``utils/scrub_cbf.R``) translated. Where the translations differ from the
author's code, this module follows the author; each such place is marked "ASLPrep differs".

Everything reduces to arrays over voxels: SCORE's iterative step works on ``T x T`` Gram
matrices computed once (``O(N T^2)``, then ``O(T^2)`` per removed volume), SCRUB's iteratively
reweighted least squares updates every voxel at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import chdtri

__all__ = [
    "DEFAULT_MAD_FACTOR",
    "DEFAULT_THRESH",
    "FLAG_GM_OUTLIER",
    "FLAG_KEPT",
    "FLAG_STRUCTURAL",
    "MIN_VOLUMES",
    "SCORE_REFERENCE",
    "SCRUB_REFERENCE",
    "TUNING_CONSTANTS",
    "ScoreResult",
    "score",
    "score_record",
    "scrub",
]

SCORE_REFERENCE = (
    "Dolui S, Wang Z, Shinohara RT, Wolk DA, Detre JA; Alzheimer's Disease Neuroimaging "
    "Initiative. Structural Correlation-based Outlier Rejection (SCORE) algorithm for arterial "
    "spin labeling time series. J Magn Reson Imaging 2017;45(6):1786-1797. "
    "doi:10.1002/jmri.25436"
)

SCRUB_REFERENCE = (
    "Dolui S, Wolk DA, Detre JA. SCRUB: A Structural Correlation and Empirical Robust Bayesian "
    "Method for ASL Data. Proc Intl Soc Mag Reson Med 24 (2016), abstract 2880. "
    "https://archive.ismrm.org/2016/2880.html (conference abstract, no DOI)"
)

#: Per-volume codes of :attr:`ScoreResult.flags`, those of the author's index file.
FLAG_KEPT = 0
FLAG_GM_OUTLIER = 1  # first pass: mean GM CBF far from the median
FLAG_STRUCTURAL = 2  # second pass: structural correlation

#: Fewer volumes than this and SCORE is not applied (the plain mean is returned): a median and
#: a median absolute deviation of one or two values cannot single out an outlier, and the
#: author's loop never leaves fewer than two volumes, so with two it can remove nothing.
MIN_VOLUMES = 3

#: Default tissue-probability threshold (strict) of the GM, WM and CSF masks (the author's
#: code has 0.95, ASLPrep 0.7; see :func:`score`).
DEFAULT_THRESH = 0.90
#: Robust standard deviations beyond which a volume's mean GM CBF is an outlier.
DEFAULT_MAD_FACTOR = 2.5

# Robust SD from the median absolute deviation, MAD / 0.675, the constant of the author's code
# (the Gaussian consistency constant is 0.6745; the difference is 0.07 %).
_MAD_TO_SD = 0.675

# A removal must lower the pooled within-tissue variance by more than rounding: the same V
# recomputed from a different set of identical volumes differs in its last bits.
_V_RTOL = 1e-10

# SCRUB: a voxel's temporal variance is judged against the chi-square law of the sample
# variance of white noise. Above its 99.99th percentile the excess is artefact and the voxel is
# pulled towards the tissue prior; 10 x that percentile is where the prior weight turns from
# linear to quadratic in the variance (author's code, ``getchisquarevals``).
_NOISE_PERCENTILE = 0.9999
_QUADRATIC_FACTOR = 10.0
# The modified-robust residual scale is 1 - exp(-mu / 10) (author's ``modrobprior = mu/10``).
_MODROBUST_SCALE = 10.0
# Leverage cap and residual-scale floor of MATLAB's robustfit, which the author's
# ``myrobustfit`` follows.
_MAX_LEVERAGE = 0.9999
_TINY_SCALE = 1e-6
_MAX_ITER = 50


def _w_andrews(u: NDArray) -> NDArray:
    r = np.maximum(np.sqrt(np.finfo(float).eps), np.abs(u))  # sin(r)/r -> 1 as r -> 0
    return (r < np.pi) * np.sin(r) / r


def _w_logistic(u: NDArray) -> NDArray:
    r = np.maximum(np.sqrt(np.finfo(float).eps), np.abs(u))  # tanh(r)/r -> 1 as r -> 0
    return np.tanh(r) / r


# Weight functions w(u) of the M-estimators (u: residual / (tuning constant x scale)) and their
# tuning constants, those of MATLAB's robustfit (95 % asymptotic efficiency for Gaussian
# errors) that the author's code uses. ASLPrep differs: its Huber weight is 1/|u| (unbounded
# as u -> 0, instead of 1/max(1, |u|)) and its Andrews weight lacks the division by u.
_WEIGHTS: dict[str, Callable[[NDArray], NDArray]] = {
    "andrews": _w_andrews,
    "bisquare": lambda u: (np.abs(u) < 1) * (1.0 - u**2) ** 2,
    "cauchy": lambda u: 1.0 / (1.0 + u**2),
    "fair": lambda u: 1.0 / (1.0 + np.abs(u)),
    "huber": lambda u: 1.0 / np.maximum(1.0, np.abs(u)),
    "logistic": _w_logistic,
    "ols": np.ones_like,
    "talwar": lambda u: (np.abs(u) < 1).astype(float),
    "welsch": lambda u: np.exp(-(u**2)),
}

#: Tuning constant of each SCRUB weight function (``wfun``).
TUNING_CONSTANTS: dict[str, float] = {
    "andrews": 1.339,
    "bisquare": 4.685,
    "cauchy": 2.385,
    "fair": 1.400,
    "huber": 1.345,
    "logistic": 1.205,
    "ols": 1.0,
    "talwar": 2.795,
    "welsch": 2.985,
}


@dataclass(frozen=True, eq=False)  # eq=False: array fields make a generated __eq__ ambiguous
class ScoreResult:
    """Outcome of :func:`score`.

    Attributes
    ----------
    cbf : numpy.ndarray
        float32 (X, Y, Z) mean CBF of the kept volumes, 0 outside the analysis mask (the brain
        mask less voxels with a non-finite value in any volume).
    removed : tuple of int
        0-based indices of the removed volumes, ascending.
    kept : numpy.ndarray
        bool (T,), True for the volumes averaged into ``cbf``.
    flags : numpy.ndarray
        int8 (T,), the author's index file: :data:`FLAG_KEPT` (0), :data:`FLAG_GM_OUTLIER` (1,
        removed by the mean-GM-CBF pass) or :data:`FLAG_STRUCTURAL` (2, removed by the
        structural-correlation pass).
    thresh : float
        Tissue-probability threshold used for the GM, WM and CSF masks.
    mad_factor : float
        Robust standard deviations beyond which a volume's mean GM CBF is an outlier.
    note : str or None
        Why SCORE was not applied (fewer than :data:`MIN_VOLUMES` volumes), else None.
    """

    cbf: NDArray[np.float32]
    removed: tuple[int, ...]
    kept: NDArray[np.bool_]
    flags: NDArray[np.int8]
    thresh: float
    mad_factor: float
    note: str | None = None


def _prepare(
    cbf_series: ArrayLike, gm: ArrayLike, wm: ArrayLike, csf: ArrayLike, mask: ArrayLike
) -> tuple[NDArray[np.float64], tuple[NDArray[np.float64], ...], NDArray[np.bool_]]:
    """Validate the inputs; return the (X, Y, Z, T) series, tissue maps and analysis mask.

    The analysis mask is the brain mask less the voxels with a non-finite CBF in any volume
    (a NaN would otherwise poison every tissue mean and correlation). Non-finite tissue
    probabilities count as 0.
    """
    data = np.asarray(cbf_series, dtype=np.float64)
    if data.ndim == 3:
        data = data[..., np.newaxis]
    if data.ndim != 4 or data.shape[-1] == 0:
        raise ValueError(f"cbf_series must be (X, Y, Z, T) with T >= 1, got {data.shape}")
    spatial = data.shape[:3]
    maps = []
    for name, values in (("gm", gm), ("wm", wm), ("csf", csf), ("mask", mask)):
        array = np.asarray(values)
        if array.shape != spatial:
            raise ValueError(f"{name} has shape {array.shape}, the CBF series {spatial}")
        maps.append(array)
    *tissues, brain = maps
    tissues = tuple(np.nan_to_num(np.asarray(t, dtype=np.float64), nan=0.0) for t in tissues)
    brain = (brain > 0) & np.all(np.isfinite(data), axis=-1)
    return data, tissues, brain


def score(
    cbf_series: ArrayLike,
    gm: ArrayLike,
    wm: ArrayLike,
    csf: ArrayLike,
    mask: ArrayLike,
    *,
    thresh: float = DEFAULT_THRESH,
    mad_factor: float = DEFAULT_MAD_FACTOR,
) -> ScoreResult:
    """Structural Correlation based Outlier REjection (Dolui et al. 2017).

    1. GM, WM and CSF masks are the brain-mask voxels whose tissue probability exceeds
       ``thresh``. A volume whose mean GM CBF lies more than ``mad_factor`` robust standard
       deviations (MAD / 0.675) from the median of the volumes' mean GM CBF is discarded.
    2. With ``R`` the mean of the remaining volumes and
       ``V = sum_k (N_k - 1) var(R in tissue k)`` (the pooled within-tissue sum of squares,
       k = GM, WM, CSF), the remaining volume most correlated with ``R`` (Pearson, over the
       union of the three masks) is removed if that lowers ``V``; this repeats until a removal
       would not lower ``V`` (that volume is kept) or two volumes remain. An artefact adds
       spatial variance within tissues and, averaged into ``R``, makes the volume carrying it
       the one most correlated with ``R``; once only white noise is left, dropping a volume
       raises the noise of the mean, so ``V`` rises and the loop stops.

    Parameters
    ----------
    cbf_series
        (X, Y, Z, T) CBF of each volume (a 3D map counts as one volume).
    gm, wm, csf
        (X, Y, Z) tissue probability maps on the ASL grid.
    mask
        (X, Y, Z) brain mask (nonzero inside).
    thresh
        Tissue-probability threshold (strict ``>``, as the author's code). The author's
        default is 0.95 (0.75 for smoothed maps); ASLPrep's is 0.7 (``>=``).
    mad_factor
        Outlier threshold of the first pass, in robust standard deviations.

    Returns
    -------
    ScoreResult
        With fewer than :data:`MIN_VOLUMES` volumes, SCORE is not applied: ``cbf`` is the
        plain mean, nothing is removed and ``note`` says so.

    Raises
    ------
    ValueError
        On mismatched shapes, or (with at least :data:`MIN_VOLUMES` volumes) when no voxel of
        the analysis mask has a GM probability above ``thresh``.

    Notes
    -----
    ASLPrep differs: it keeps the volume whose removal raised ``V`` (the author restores the
    previous set, so ASLPrep drops one clean volume too many, even from a clean series);
    older releases also stopped computing correlations at the first volume the first pass
    had discarded (``break`` for ``continue``) and measured the tissue variances on voxels
    whose probability equals 1 rather than on the thresholded masks.

    The structural pass removes the volume *most* correlated with the mean, as the paper and
    the author's code do. It therefore catches artefacts large enough to shape the mean, or
    lying where CBF is high; an artefact confined to low-CBF tissue (CSF) lowers its volume's
    correlation with the structured mean and is kept even when removing it would lower ``V``.
    """
    data, (p_gm, p_wm, p_csf), brain = _prepare(cbf_series, gm, wm, csf, mask)
    n_vol = data.shape[-1]
    kept = np.ones(n_vol, dtype=bool)
    flags = np.zeros(n_vol, dtype=np.int8)

    if n_vol < MIN_VOLUMES:
        note = (
            f"SCORE not applied: {n_vol} volume(s), fewer than {MIN_VOLUMES}; "
            "the plain mean is returned and no volume is removed"
        )
        return _result(data, brain, kept, flags, thresh, mad_factor, note)

    masks = [(p > thresh) & brain for p in (p_gm, p_wm, p_csf)]
    if not masks[0].any():
        raise ValueError(f"no voxel of the mask has a GM probability above {thresh:g}")

    # Pass 1: mean GM CBF of each volume against its median, in robust SDs.
    gm_means = data[masks[0]].mean(axis=0)
    deviation = np.abs(gm_means - np.median(gm_means))
    robust_sd = np.median(deviation) / _MAD_TO_SD
    first_pass = deviation > mad_factor * robust_sd
    kept &= ~first_pass
    flags[first_pass] = FLAG_GM_OUTLIER

    # Pass 2 on Gram matrices. For a weight vector w (1/n on the kept volumes) the mean map is
    # Y w, so for centred columns Yc: the SS of the mean within tissue k is w' Gk w with
    # Gk = Ykc' Ykc, and its covariance with volume t is (G w)_t with G = Yc' Yc.
    def centred_gram(voxels: NDArray[np.bool_]) -> NDArray[np.float64]:
        values = data[voxels]
        values = values - values.mean(axis=0)
        return values.T @ values

    union_gram = centred_gram(masks[0] | masks[1] | masks[2])
    # (N_k - 1) var_k(R) is the within-tissue SS; a tissue of 0 or 1 voxel contributes 0.
    tissue_gram = np.zeros((n_vol, n_vol))
    for tissue in masks:
        if tissue.sum() > 1:
            tissue_gram += centred_gram(tissue)
    vol_norm = np.sqrt(np.diag(union_gram))

    def weights(selection: NDArray[np.bool_]) -> NDArray[np.float64]:
        return selection / selection.sum()

    w = weights(kept)
    pooled = w @ tissue_gram @ w
    # The author's loop undoes a removal that leaves a single volume, so at least 2 remain.
    while kept.sum() > 2:
        covariance = union_gram @ w
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = covariance / (vol_norm * np.sqrt(w @ union_gram @ w))
        corr[~kept | ~np.isfinite(corr)] = -np.inf  # a flat volume has no correlation
        if not np.isfinite(corr).any():
            break
        candidate = int(np.argmax(corr))  # first of ties, as MATLAB's max
        trial = kept.copy()
        trial[candidate] = False
        w_trial = weights(trial)
        pooled_trial = w_trial @ tissue_gram @ w_trial
        if not pooled_trial < pooled - _V_RTOL * abs(pooled):
            break
        kept, w, pooled = trial, w_trial, pooled_trial
        flags[candidate] = FLAG_STRUCTURAL

    return _result(data, brain, kept, flags, thresh, mad_factor, None)


def _result(
    data: NDArray[np.float64],
    brain: NDArray[np.bool_],
    kept: NDArray[np.bool_],
    flags: NDArray[np.int8],
    thresh: float,
    mad_factor: float,
    note: str | None,
) -> ScoreResult:
    """Mean of the kept volumes inside the analysis mask, packed with read-only arrays."""
    cbf = np.zeros(data.shape[:3], dtype=np.float32)
    cbf[brain] = data[brain][:, kept].mean(axis=1)
    for array in (cbf, kept, flags):
        array.setflags(write=False)
    return ScoreResult(
        cbf=cbf,
        removed=tuple(int(i) for i in np.flatnonzero(~kept)),
        kept=kept,
        flags=flags,
        thresh=float(thresh),
        mad_factor=float(mad_factor),
        note=note,
    )


def _noise_variance_law(n_volumes: int) -> tuple[float, float]:
    """Chi-square constants of the sample variance of ``n_volumes`` white-noise values.

    With k = n - 1 degrees of freedom, ``s^2 / sigma^2 ~ chi2_k / k``. Returns its 99.99th
    percentile and its mean-to-median ratio (``k / median(chi2_k)``): the median GM variance
    times the ratio estimates sigma^2 robustly. The author's code reads both from a table
    made by simulation (1e5 draws) for n = 2..100; these are the exact values, for any n
    (ASLPrep differs: it indexes that table, which ends at 100 volumes).
    """
    dof = n_volumes - 1
    percentile = float(chdtri(dof, 1.0 - _NOISE_PERCENTILE)) / dof
    mean_to_median = dof / float(chdtri(dof, 0.5))
    return percentile, mean_to_median


def _prior_weight(variance_ratio: NDArray[np.float64], threshold: float) -> NDArray[np.float64]:
    """SCRUB's prior weight ``mu`` from a voxel's variance over the white-noise variance.

    0 up to the noise percentile ``a``, then ``ratio - a`` (linear) up to ``10 a``, then
    ``ratio^2 / (20 a) + 4 a``, which continues the linear branch in value and slope.
    ASLPrep differs: a misplaced parenthesis adds ``4 a`` to every voxel, so its prior weighs
    on all voxels, noise-like ones included.
    """
    knee = _QUADRATIC_FACTOR * threshold
    return np.where(
        variance_ratio <= threshold,
        0.0,
        np.where(
            variance_ratio < knee,
            variance_ratio - threshold,
            variance_ratio**2 / (2.0 * knee) + (knee / 2.0 - threshold),
        ),
    )


def scrub(
    cbf_series: ArrayLike,
    gm: ArrayLike,
    wm: ArrayLike,
    csf: ArrayLike,
    mask: ArrayLike,
    *,
    wfun: str = "huber",
    thresh: float = DEFAULT_THRESH,
    mad_factor: float = DEFAULT_MAD_FACTOR,
    score_result: ScoreResult | None = None,
    max_iter: int = _MAX_ITER,
) -> NDArray[np.float32]:
    """Structural Correlation with RobUst Bayesian estimation of mean CBF (Dolui et al. 2016).

    Runs on the volumes SCORE kept (``score_result``, or :func:`score` run here with
    ``thresh`` and ``mad_factor``). Each voxel's CBF is the M-estimate

    .. math::

        \\hat\\theta = \\arg\\min_\\theta \\sum_t \\rho\\left(\\frac{(1 - e^{-\\mu/10})\\,
        (CBF_t - \\theta)}{c\\,s}\\right) + \\mu\\,(\\theta - \\theta_{prior})^2 / 2

    solved by iteratively reweighted least squares,
    ``theta = (sum_t w_t CBF_t + mu prior) / (sum_t w_t + mu)``, where

    - ``prior = c_GM pGM + c_WM pWM`` is the structural prior: ``c_GM`` and ``c_WM`` are fitted
      by least squares to the SCORE mean over voxels with GM (or WM) probability above
      ``thresh`` whose temporal variance is noise-like (``mu = 0``), falling back to all such
      voxels if either tissue then has none;
    - ``mu`` (:func:`_prior_weight`) grows with the voxel's temporal variance over the white-
      noise variance (the median GM variance scaled by the chi-square mean-to-median ratio),
      being 0 up to the 99.99th percentile of the sample-variance law: a voxel whose spread
      is explained by noise is left to its data, an artefacted one leans on the prior;
    - the residuals are scaled by ``1 - exp(-mu / 10)`` (the author's "modified robust"
      option), so a noise-like voxel (``mu = 0``) gets unit weights, i.e. the plain mean of
      the kept volumes, and down-weighting acts only where the variance says artefact;
    - ``s`` is the RMS of the leverage-adjusted residuals, ``c`` the tuning constant of
      ``wfun`` (:data:`TUNING_CONSTANTS`), ``w = weight(u)`` its weight function.

    Parameters
    ----------
    cbf_series, gm, wm, csf, mask
        As :func:`score`: the whole series, SCORE's selection is applied here.
    wfun
        Weight function: ``huber`` (default, as the author's and ASLPrep's), ``bisquare``
        (Tukey, the one ASLPrep's documentation names), ``andrews``, ``cauchy``, ``fair``,
        ``logistic``, ``talwar``, ``welsch`` or ``ols``.
    thresh
        Tissue-probability threshold (strict) for the GM reference variance and the prior fit.
    mad_factor
        Passed to :func:`score` when ``score_result`` is not given.
    score_result
        A :func:`score` result for this series, to reuse its kept volumes.
    max_iter
        Iteration cap of the reweighting (the author's is 50).

    Returns
    -------
    numpy.ndarray
        float32 (X, Y, Z) CBF, 0 outside the analysis mask. With fewer than two kept volumes
        there is no temporal variance to weigh: the SCORE mean is returned.

    Notes
    -----
    Where the author's code and ASLPrep's translation differ, the author's is followed:
    sample variances with ``ddof=1`` (the chi-square law assumes them), iterations until every
    voxel has converged (ASLPrep stops at 10, or as soon as any one voxel has), a scale floor
    of ``1e-6`` times the voxel's temporal SD, and the tissue masks combined with logical
    *and* (ASLPrep's ``[a] and [b] and [c]`` keeps only ``c``). One place departs from both:
    the prior is fitted on the noise-like voxels as the author's code intends; a typo in it
    (``sum(gmidx(:)==0)``) always triggers the fallback to all high-probability voxels.
    """
    if wfun not in _WEIGHTS:
        raise ValueError(f"unknown wfun {wfun!r}; choose one of {sorted(_WEIGHTS)}")
    data, (p_gm, p_wm, p_csf), brain = _prepare(cbf_series, gm, wm, csf, mask)
    if score_result is None:
        score_result = score(data, p_gm, p_wm, p_csf, brain, thresh=thresh, mad_factor=mad_factor)
    elif score_result.kept.shape != (data.shape[-1],):
        raise ValueError(
            f"score_result covers {score_result.kept.size} volumes, the series {data.shape[-1]}"
        )
    kept = score_result.kept
    if kept.sum() < 2:
        return np.array(score_result.cbf, dtype=np.float32)

    series = data[brain][:, kept]  # (voxels, kept volumes)
    n = series.shape[1]
    gm_b, wm_b, csf_b = p_gm[brain], p_wm[brain], p_csf[brain]
    mean_cbf = series.mean(axis=1)
    gm_core = gm_b > thresh
    if not gm_core.any():
        raise ValueError(f"no voxel of the mask has a GM probability above {thresh:g}")

    # Prior weight from the temporal variance against the white-noise law.
    variance = series.var(axis=1, ddof=1)
    percentile, mean_to_median = _noise_variance_law(n)
    noise_variance = np.median(variance[gm_core]) * mean_to_median
    if noise_variance > 0:
        mu = _prior_weight(variance / noise_variance, percentile)
    else:  # noise-free GM: no variance scale to judge by, the data stand alone
        mu = np.zeros_like(variance)

    # Structural prior: GM and WM flows fitted to the mean over noise-like, nearly pure voxels
    # (GM voxels whose remainder is WM rather than CSF, and vice versa).
    clean = mu == 0
    fit_gm = (gm_b > thresh) & clean & (wm_b > csf_b)
    fit_wm = (wm_b > thresh) & clean & (gm_b > csf_b)
    if not fit_gm.any() or not fit_wm.any():
        fit_gm, fit_wm = gm_b > thresh, wm_b > thresh
    fit = fit_gm | fit_wm
    design = np.column_stack([gm_b[fit], wm_b[fit]])
    flows = np.linalg.lstsq(design, mean_cbf[fit], rcond=None)[0]
    prior = flows[0] * gm_b + flows[1] * wm_b

    theta = _robust_fit(series, mu, prior, wfun=wfun, max_iter=max_iter)
    out = np.zeros(data.shape[:3], dtype=np.float32)
    out[brain] = theta
    return out


def _robust_fit(
    series: NDArray[np.float64],
    mu: NDArray[np.float64],
    prior: NDArray[np.float64],
    *,
    wfun: str,
    max_iter: int,
) -> NDArray[np.float64]:
    """IRLS M-estimate of each row's location with a Gaussian prior of precision ``mu``."""
    weight, tune = _WEIGHTS[wfun], TUNING_CONSTANTS[wfun]
    n = series.shape[1]
    # Leverage of the intercept-only model is 1/n for every observation.
    adjust = 1.0 / np.sqrt(1.0 - min(_MAX_LEVERAGE, 1.0 / n))
    tiny = _TINY_SCALE * series.std(axis=1, ddof=1)
    tiny[tiny == 0] = 1.0
    residual_scale = 1.0 - np.exp(-mu / _MODROBUST_SCALE)
    tol = np.sqrt(np.finfo(float).eps)

    theta = (series.sum(axis=1) + mu * prior) / (n + mu)
    for _ in range(max_iter):
        residual = (series - theta[:, None]) * adjust
        scale = np.sqrt(np.mean(residual**2, axis=1))
        u = residual * (residual_scale / (np.maximum(scale, tiny) * tune))[:, None]
        w = weight(u)
        updated = ((w * series).sum(axis=1) + mu * prior) / (w.sum(axis=1) + mu)
        converged = np.all(np.abs(updated - theta) <= tol * np.maximum(abs(updated), abs(theta)))
        theta = updated
        if converged:
            break
    return theta


def score_record(result: ScoreResult, *, scrub_wfun: str | None = None) -> dict[str, Any]:
    """Sidecar fields describing a :func:`score` run (and :func:`scrub`, if given its wfun).

    Parameters
    ----------
    result
        The :func:`score` result.
    scrub_wfun
        The ``wfun`` :func:`scrub` ran with, to describe SCRUB too; None if it did not run.

    Returns
    -------
    dict
        JSON-serialisable; volume indices are 0-based.
    """
    flags = np.asarray(result.flags)
    record: dict[str, Any] = {
        "Method": "SCORE",
        "TissueProbabilityThreshold": result.thresh,
        "GMOutlierRule": (f"|mean GM CBF - median| > {result.mad_factor:g} x MAD / {_MAD_TO_SD}"),
        "StructuralRule": (
            "remove the volume most correlated with the mean while that lowers the pooled "
            "within-tissue (GM, WM, CSF) variance of the mean"
        ),
        "NumberOfVolumes": int(flags.size),
        "NumberOfVolumesKept": int(np.count_nonzero(result.kept)),
        "VolumesRemoved": list(result.removed),
        "VolumesRemovedGMOutlier": [int(i) for i in np.flatnonzero(flags == FLAG_GM_OUTLIER)],
        "VolumesRemovedStructural": [int(i) for i in np.flatnonzero(flags == FLAG_STRUCTURAL)],
        "VolumeIndexBase": 0,
        "References": [SCORE_REFERENCE],
    }
    if result.note is not None:
        record["Note"] = result.note
    if scrub_wfun is not None:
        if scrub_wfun not in TUNING_CONSTANTS:
            raise ValueError(f"unknown wfun {scrub_wfun!r}")
        record["Method"] = "SCORE+SCRUB"
        record["SCRUB"] = {
            "WeightFunction": scrub_wfun,
            "TuningConstant": TUNING_CONSTANTS[scrub_wfun],
            "Prior": "c_GM pGM + c_WM pWM fitted to the SCORE mean",
            "PriorWeight": (
                "0 while the voxel's temporal variance is within the 99.99th percentile of "
                "the white-noise chi-square law, growing with the excess beyond it"
            ),
        }
        record["References"].append(SCRUB_REFERENCE)
    return record
