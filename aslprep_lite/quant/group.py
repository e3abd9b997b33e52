"""Group statistics of the per-run QC metrics: robust z-scores and outlier flags.

Robust (modified) z-score (Iglewicz & Hoaglin 1993)::

    z_i = 0.6745 (x_i - median(x)) / MAD,   MAD = median(|x_i - median(x)|)

0.6745 is the 0.75 quantile of the standard normal, so ``MAD / 0.6745`` estimates the standard
deviation of normal data and ``z`` is on the scale of an ordinary z-score, but neither the
median nor the MAD is moved by the outliers it is meant to find. A run is flagged when
``|z| > 3.5``, the authors' recommended cut-off.

Rules
-----
Undefined values (None, NaN: ``n/a`` in the QC table)
    Left out of the median and the MAD; their z is undefined and never flagged.
MAD = 0 (more than half the values identical)
    The MAD cannot scale the deviations: any value off the median would get an infinite z.
    By a common convention for the modified z-score (not from Iglewicz & Hoaglin), the mean
    absolute deviation from the median takes its place, scaled to the standard deviation of
    normal data (``sqrt(pi / 2) = 1.2533``): ``z_i = (x_i - median) / (1.2533 * MeanAD)``.
    Dropping the flags instead would hide a run that differs from a majority of identical
    values, the clearest outlier there is. If MeanAD is 0 too (every value equal) every z is
    0: nothing stands out.
Small groups
    The z-scores are computed whatever the size, but with fewer than :data:`MIN_RELIABLE`
    defined values the median and the MAD are too unstable for a flag to mean much: callers
    report the flags as unreliable (:func:`robust_z` returns the count).

Reference
---------
Iglewicz B, Hoaglin DC (1993). How to Detect and Handle Outliers. ASQC Basic References in
Quality Control: Statistical Techniques, vol. 16. Milwaukee: ASQC Quality Press. (Chapter 3:
the modified z-score and the 3.5 cut-off.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "IGLEWICZ_HOAGLIN_1993",
    "MAD_CONSTANT",
    "MEANAD_CONSTANT",
    "MIN_RELIABLE",
    "Z_THRESHOLD",
    "RobustZ",
    "robust_z",
]

#: 0.6745: the 0.75 quantile of the standard normal (MAD of normal data = 0.6745 SD).
MAD_CONSTANT = 0.6745
#: sqrt(pi / 2): the SD of normal data is 1.2533 times its mean absolute deviation.
MEANAD_CONSTANT = math.sqrt(math.pi / 2.0)
#: |z| above which a value is an outlier (Iglewicz & Hoaglin 1993).
Z_THRESHOLD = 3.5
#: Fewer defined values than this: the flags are reported as unreliable.
MIN_RELIABLE = 5

IGLEWICZ_HOAGLIN_1993 = (
    "Iglewicz B, Hoaglin DC (1993). How to Detect and Handle Outliers. ASQC Basic References "
    "in Quality Control: Statistical Techniques, vol. 16. Milwaukee: ASQC Quality Press"
)


@dataclass(frozen=True)
class RobustZ:
    """Robust z-scores of one metric over a group.

    Attributes
    ----------
    z : ndarray
        One z per value, NaN where the value is undefined.
    flags : ndarray of bool
        ``|z| > threshold`` (False where z is NaN).
    median, scale : float
        The median of the defined values and the divisor of the deviations (``MAD / 0.6745``,
        or ``1.2533 * MeanAD`` when the MAD is 0); NaN without a defined value.
    scale_estimator : str
        ``"MAD"``, ``"MeanAD"`` (MAD = 0) or ``"none"`` (every deviation 0, or no value).
    n : int
        The number of defined values.
    """

    z: NDArray[np.float64]
    flags: NDArray[np.bool_]
    median: float
    scale: float
    scale_estimator: str
    n: int

    @property
    def reliable(self) -> bool:
        """Whether the group is large enough for the flags to mean something."""
        return self.n >= MIN_RELIABLE


def robust_z(values: Sequence[float | None] | NDArray, threshold: float = Z_THRESHOLD) -> RobustZ:
    """Modified z-scores ``0.6745 (x - median) / MAD`` and outlier flags (Iglewicz & Hoaglin).

    Parameters
    ----------
    values
        One value per run; None or NaN for undefined (left out, never flagged).
    threshold
        Flag ``|z| > threshold``.

    Returns
    -------
    RobustZ
        z-scores, flags, and the centre and scale used (see the module docstring for the
        MAD = 0 rule).
    """
    x = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    defined = np.isfinite(x)
    n = int(np.count_nonzero(defined))
    z = np.full(x.shape, np.nan)
    if n == 0:
        return RobustZ(z, np.zeros(x.shape, bool), math.nan, math.nan, "none", 0)
    median = float(np.median(x[defined]))
    deviation = np.abs(x[defined] - median)
    mad = float(np.median(deviation))
    if mad > 0:
        scale, estimator = mad / MAD_CONSTANT, "MAD"
    else:
        mean_ad = float(np.mean(deviation))
        scale, estimator = (MEANAD_CONSTANT * mean_ad, "MeanAD") if mean_ad > 0 else (0.0, "none")
    z[defined] = (x[defined] - median) / scale if scale > 0 else 0.0
    flags = np.zeros(x.shape, dtype=bool)
    flags[defined] = np.abs(z[defined]) > threshold
    return RobustZ(z, flags, median, scale, estimator, n)
