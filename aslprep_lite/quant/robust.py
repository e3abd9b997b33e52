"""Robust average of a series per voxel: the Huber M-estimate of location.

The CBF of a single-delay run is the average of its per-pair ΔM (or per-pair CBF) volumes. The
plain mean lets one bad pair (a motion spike, a subtraction across a misregistered edge) move
the average by its full error divided by the number of pairs; the Huber M-estimate (Huber
1964) weighs every value as the mean does while it lies within ``k`` robust standard
deviations of the estimate and caps the pull of the values beyond.

Estimator
---------
For the values ``x_1..x_n`` of one voxel, the estimate ``mu`` solves::

    sum_i psi((x_i - mu) / s) = 0,      psi(r) = max(-k, min(k, r))   (Huber's psi)

with the scale ``s`` fixed beforehand from the same values::

    s = 1.4826 median_i |x_i - median_j x_j|          (MAD, consistent for a Gaussian SD)

``k = 1.345`` gives 95 % of the efficiency of the mean on Gaussian data (asymptotically), and
every value more than ``k s`` from ``mu`` counts as if it were exactly ``k s`` away.

Why a fixed MAD scale rather than Huber's joint "Proposal 2" estimate of location and scale:
the MAD has the highest possible breakdown point (50 %), whereas the joint scale is itself an
M-estimate whose breakdown point is lower and is pulled up by the outliers it should
down-weight; with a fixed scale the equation above has a unique root (psi is monotone) that
iteratively reweighted least squares reaches from the median without safeguards; and the
location estimate's asymptotic efficiency at the Gaussian does not depend on how the scale was
estimated (location and scale are asymptotically independent for symmetric distributions).
This is the M-estimate of location with a previously computed dispersion that Maronna, Martin
and Yohai recommend (Robust Statistics: Theory and Methods, Wiley 2006, chapter 2).

Algorithm
---------
Iteratively reweighted least squares from the median, for all voxels at once::

    w_i = min(1, k s / |x_i - mu|)          mu <- sum_i w_i x_i / sum_i w_i

The weighted mean of each step lowers Huber's objective, so the iteration converges to the
root. A voxel stops when its step is below ``tol * s``; the loop runs over iterations only and
ends when every voxel has stopped (or after ``max_iter`` iterations), working on the voxels
still moving. A last exact step then solves the equation, which is linear in ``mu`` once it is
known which values lie within ``k s`` of it, and keeps that solution where it leaves the split
unchanged (nearly everywhere): the result is the root to rounding error rather than to ``tol``,
and checked against a bisection in the tests.

Non-finite values are left out of their voxel; a voxel with no finite value gives NaN, and a
voxel whose MAD is 0 (e.g. more than half its values equal, such as the zeros outside a brain
mask) gives the plain mean of its finite values, where the scale and therefore the weights are
undefined.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "HUBER_K",
    "MAD_TO_SD",
    "PAIR_AVERAGE_METHODS",
    "ROBUST_REFERENCE",
    "average_record",
    "huber_mean",
    "pair_average",
]

#: How the per-pair volumes of a single-delay run can be averaged (``--pair-average``).
PAIR_AVERAGE_METHODS = ("mean", "huber")

#: Huber's tuning constant: 95 % asymptotic efficiency relative to the mean for Gaussian data.
HUBER_K = 1.345

#: 1 / Phi^-1(3/4): the MAD times this is a consistent estimate of a Gaussian's SD.
MAD_TO_SD = 1.4826

#: Citation for sidecars and documentation.
ROBUST_REFERENCE = (
    "Huber PJ. Robust estimation of a location parameter. Ann Math Stat 1964;35:73-101. "
    "doi:10.1214/aoms/1177703732"
)


def _nanmedian_last(values: NDArray[np.float64], n_finite: NDArray[np.intp]) -> NDArray:
    """Median of the finite values along the last axis (NaN where there are none).

    Sorting puts NaN last, so the median of the ``n`` finite values of a row sits at positions
    ``(n - 1) // 2`` and ``n // 2``. Faster than :func:`numpy.nanmedian` for many short rows and
    silent on all-NaN rows.
    """
    ordered = np.sort(values, axis=-1)
    low = np.maximum((n_finite - 1) // 2, 0)[:, np.newaxis]
    high = np.maximum(n_finite // 2, 0)[:, np.newaxis]
    median = (
        0.5
        * (np.take_along_axis(ordered, low, axis=-1) + np.take_along_axis(ordered, high, axis=-1))[
            :, 0
        ]
    )
    median[n_finite == 0] = np.nan
    return median


def huber_mean(
    values: ArrayLike,
    axis: int = -1,
    *,
    k: float = HUBER_K,
    max_iter: int = 20,
    tol: float = 1e-6,
) -> NDArray[np.float64]:
    """Huber M-estimate of location along one axis, for every voxel at once.

    Parameters
    ----------
    values
        Array of any shape, e.g. (X, Y, Z, N) per-pair ΔM or CBF volumes.
    axis
        The axis to average over (the series).
    k
        Huber's tuning constant, in units of the robust SD (:data:`HUBER_K`, 95 % Gaussian
        efficiency). Larger is closer to the mean; ``k -> 0`` tends to the median.
    max_iter
        Most reweighting iterations; the current estimate is returned for voxels still moving
        after them.
    tol
        A voxel has converged when its estimate moves by less than ``tol`` times its scale
        (the MAD-based SD) in one iteration.

    Returns
    -------
    numpy.ndarray
        float64 array of ``values``' shape without ``axis``: the estimate of each voxel; the
        mean of its finite values where their MAD is 0; NaN where it has no finite value.

    Raises
    ------
    ValueError
        If ``k`` or ``tol`` is not positive or ``max_iter`` is negative.

    Notes
    -----
    The scale is ``1.4826 * MAD`` of each voxel's finite values, fixed before the iterations
    (see the module docstring for why); the start is their median. Reference: Huber 1964
    (:data:`ROBUST_REFERENCE`).
    """
    if not k > 0 or not tol > 0:
        raise ValueError(f"huber_mean: k and tol must be positive, got k={k}, tol={tol}")
    if max_iter < 0:
        raise ValueError(f"huber_mean: max_iter must be >= 0, got {max_iter}")
    array = np.moveaxis(np.asarray(values, dtype=np.float64), axis, -1)
    out_shape = array.shape[:-1]
    data = array.reshape(-1, array.shape[-1])
    finite = np.isfinite(data)
    data = np.where(finite, data, np.nan)  # +-inf counts as missing too
    n_finite = finite.sum(axis=-1)

    median = _nanmedian_last(data, n_finite)
    scale = MAD_TO_SD * _nanmedian_last(np.abs(data - median[:, np.newaxis]), n_finite)
    zeros = np.where(finite, data, 0.0)
    mean = np.full(median.shape, np.nan)
    np.divide(zeros.sum(axis=-1), n_finite, out=mean, where=n_finite > 0)

    estimate = np.where(scale > 0, median, mean)  # NaN scale (no data) keeps NaN
    robust = np.flatnonzero(scale > 0)
    active = robust
    x = zeros[active]
    weight_mask = finite[active]
    mu = estimate[active]
    cap = k * scale[active]
    step_tol = tol * scale[active]
    for _ in range(max_iter):
        if active.size == 0:
            break
        distance = np.abs(x - mu[:, np.newaxis])
        # w = min(1, k s / |r|), written so that r = 0 needs no division.
        weights = cap[:, np.newaxis] / np.maximum(distance, cap[:, np.newaxis])
        weights *= weight_mask
        new = (weights * x).sum(axis=-1) / weights.sum(axis=-1)
        moving = np.abs(new - mu) >= step_tol
        estimate[active] = new
        active, x, weight_mask = active[moving], x[moving], weight_mask[moving]
        mu, cap, step_tol = new[moving], cap[moving], step_tol[moving]
    estimate[robust] = _exact_step(
        zeros[robust], finite[robust], estimate[robust], k * scale[robust]
    )
    return estimate.reshape(out_shape)


def _exact_step(
    x: NDArray[np.float64], finite: NDArray[np.bool_], mu: NDArray[np.float64], cap: NDArray
) -> NDArray[np.float64]:
    """Polish converged IRLS estimates to the exact root of Huber's equation.

    With the values split into those within ``cap = k s`` of ``mu`` (set I) and those above
    (A) or below (B), Huber's equation is linear in the estimate, whose root is::

        mu* = (sum_I x_i + cap (|A| - |B|)) / |I|

    ``mu*`` is taken where it leaves the split unchanged (then it solves the equation
    exactly, and the root is unique); elsewhere the IRLS estimate is kept. This removes the
    residual error of the stopping rule (up to about ``tol`` times the scale).
    """
    cap = cap[:, np.newaxis]

    def split(centre: NDArray[np.float64]) -> tuple[NDArray, NDArray, NDArray]:
        residual = x - centre[:, np.newaxis]
        above = finite & (residual > cap)
        below = finite & (residual < -cap)
        return finite & ~above & ~below, above, below

    inside, above, below = split(mu)
    n_inside = inside.sum(axis=-1)
    shifted = np.where(inside, x, 0.0).sum(axis=-1) + cap[:, 0] * (
        above.sum(axis=-1) - below.sum(axis=-1)
    )
    candidate = mu.copy()
    np.divide(shifted, n_inside, out=candidate, where=n_inside > 0)
    new_inside, new_above, new_below = split(candidate)
    consistent = (
        (n_inside > 0)
        & np.all(new_inside == inside, axis=-1)
        & np.all(new_above == above, axis=-1)
        & np.all(new_below == below, axis=-1)
    )
    return np.where(consistent, candidate, mu)


def pair_average(values: ArrayLike, method: str, axis: int = -1) -> NDArray:
    """Average of the per-pair volumes along ``axis``: the mean or :func:`huber_mean`.

    Parameters
    ----------
    values
        E.g. (X, Y, Z, N) per-pair ΔM or CBF volumes.
    method
        ``mean`` (``numpy.mean``, the dtype of ``values`` kept as before this option existed)
        or ``huber`` (:func:`huber_mean` with its defaults, cast to the dtype of ``values``).

    Returns
    -------
    numpy.ndarray
        The average, ``values``' shape without ``axis``.

    Notes
    -----
    The consensus CBF of one delay is linear in ΔM with a factor that is the same for every
    volume of a voxel, and the Huber estimate (with its MAD scale) is equivariant under such
    scaling, so the Huber average of per-pair CBF volumes is the CBF of the Huber average of
    the ΔM pairs.
    """
    values = np.asarray(values)
    if method == "mean":
        return values.mean(axis=axis)
    if method == "huber":
        return huber_mean(values, axis=axis).astype(values.dtype, copy=False)
    raise ValueError(f"pair average must be one of {PAIR_AVERAGE_METHODS}, got {method!r}")


def average_record(method: str) -> dict[str, object]:
    """The CBF sidecar's ``PairAverage`` block: how the per-pair volumes were averaged."""
    if method == "mean":
        return {"Method": "mean"}
    if method == "huber":
        return {
            "Method": "Huber M-estimate of location per voxel",
            "TuningConstant": HUBER_K,
            "Scale": f"{MAD_TO_SD} x median absolute deviation of the voxel's values, fixed",
            "Reference": ROBUST_REFERENCE,
        }
    raise ValueError(f"pair average must be one of {PAIR_AVERAGE_METHODS}, got {method!r}")
