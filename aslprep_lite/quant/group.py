"""Group statistics of the per-run QC metrics: robust z-scores and outlier flags.

Robust (modified) z-score (Iglewicz & Hoaglin 1993)::

    z_i = 0.6745 (x_i - median(x)) / MAD,   MAD = median(|x_i - median(x)|)

0.6745 is the 0.75 quantile of the standard normal, so ``MAD / 0.6745`` estimates the standard
deviation of normal data and ``z`` is on the scale of an ordinary z-score, but neither the
median nor the MAD is moved by the outliers it is meant to find. A run is flagged when its
z is beyond 3.5, the authors' recommended cut-off, on the side where the metric means poor
quality (:data:`OUTLIER_SIDES`): ``z < -3.5`` (``"low"``), ``z > 3.5`` (``"high"``) or
``|z| > 3.5`` (``"both"``). Iglewicz & Hoaglin's rule is two-sided; a one-sided rule for a
metric whose one direction is only ever *better* keeps unusually good runs in the group (a QEI
of 0.97 among 0.80-0.84 has z = 6.5, a mean FD of 0.02 mm among 0.10-0.14 mm z = -4.3: both
would be flagged two-sided).

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

Sides
-----
The side of each metric (:data:`OUTLIER_SIDES`):

``gm_cbf``: both
    An M0 scaled by 10 gives a tenth of the CBF; a wrong labelling efficiency or M0 scale can
    as well give too high a CBF.
``gm_spatial_cov``: high
    A high spatial CoV means vascular artefacts or long transit times, i.e. poor quality; a low
    one does not (Mutsaerts et al. 2017).
``mean_fd``: high
    More head motion is worse; little motion is not a fault.
``qei``: low
    The QEI runs from 0 (poor) to 1 (good) (Dolui et al. 2024).

References
----------
Iglewicz B, Hoaglin DC (1993). How to Detect and Handle Outliers. ASQC Basic References in
Quality Control: Statistical Techniques, vol. 16. Milwaukee: ASQC Quality Press. (Chapter 3:
the modified z-score and the 3.5 cut-off.)

Mutsaerts HJMM et al. (2017). The spatial coefficient of variation in arterial spin labeling
cerebral blood flow images. J Cereb Blood Flow Metab 37(9):3184-3192.
doi:10.1177/0271678X16683690

Dolui S et al. (2024). Automated quality evaluation index for arterial spin labeling derived
cerebral blood flow maps. J Magn Reson Imaging 60(6):2497-2508. doi:10.1002/jmri.29308
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
    "OUTLIER_SIDES",
    "SIDES",
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

#: The flag rule of each side: ``z < -t``, ``z > t``, ``|z| > t``.
SIDES = {"low": "z < -{t:g}", "high": "z > {t:g}", "both": "|z| > {t:g}"}
#: The screened QC metrics and the side of each on which a value is poor quality (see the
#: module docstring): only that side is flagged.
OUTLIER_SIDES = {"gm_cbf": "both", "gm_spatial_cov": "high", "mean_fd": "high", "qei": "low"}

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
        z beyond the threshold on ``side`` (False where z is NaN).
    median, scale : float
        The median of the defined values and the divisor of the deviations (``MAD / 0.6745``,
        or ``1.2533 * MeanAD`` when the MAD is 0); NaN without a defined value.
    scale_estimator : str
        ``"MAD"``, ``"MeanAD"`` (MAD = 0) or ``"none"`` (every deviation 0, or no value).
    n : int
        The number of defined values.
    side : str
        ``"low"``, ``"high"`` or ``"both"``: the side flagged.
    """

    z: NDArray[np.float64]
    flags: NDArray[np.bool_]
    median: float
    scale: float
    scale_estimator: str
    n: int
    side: str = "both"

    @property
    def reliable(self) -> bool:
        """Whether the group is large enough for the flags to mean something."""
        return self.n >= MIN_RELIABLE


def robust_z(
    values: Sequence[float | None] | NDArray,
    threshold: float = Z_THRESHOLD,
    side: str = "both",
) -> RobustZ:
    """Modified z-scores ``0.6745 (x - median) / MAD`` and outlier flags (Iglewicz & Hoaglin).

    Parameters
    ----------
    values
        One value per run; None or NaN for undefined (left out, never flagged).
    threshold
        The cut-off of the flags.
    side
        ``"both"``: flag ``|z| > threshold``; ``"low"``: only ``z < -threshold``; ``"high"``:
        only ``z > threshold``.

    Returns
    -------
    RobustZ
        z-scores, flags, and the centre and scale used (see the module docstring for the
        MAD = 0 rule).

    Raises
    ------
    ValueError
        An unknown ``side``.
    """
    if side not in SIDES:
        raise ValueError(f"robust_z: side must be one of {', '.join(SIDES)}, not {side!r}")
    x = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    defined = np.isfinite(x)
    n = int(np.count_nonzero(defined))
    z = np.full(x.shape, np.nan)
    if n == 0:
        return RobustZ(z, np.zeros(x.shape, bool), math.nan, math.nan, "none", 0, side)
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
    signed = {"low": -z[defined], "high": z[defined], "both": np.abs(z[defined])}[side]
    flags[defined] = signed > threshold
    return RobustZ(z, flags, median, scale, estimator, n, side)
