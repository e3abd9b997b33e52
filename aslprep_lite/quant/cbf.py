"""Single-compartment CBF quantification (the ASL consensus model).

Alsop DC et al. (2015) Magn Reson Med 73:102-116, equations [1] (PCASL/CASL) and [2] (PASL);
Wong et al. (1998) for QUIPSS and QUIPSS II; Luh et al. (1999) for Q2TIPS.

All functions broadcast: ``deltam`` may be (X, Y, Z) or (X, Y, Z, T), ``m0`` (X, Y, Z), and the
timing arguments scalars, per-slice arrays shaped to broadcast along the slice axis (see
:func:`slice_delays`) or per-volume arrays on the last axis.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from aslprep_lite.quant import constants

#: mL/g/s -> mL/100 g/min
UNIT_CONVERSION = 6000.0


def _safe_ratio(numerator: NDArray, denominator: NDArray) -> NDArray:
    """``numerator / denominator`` with 0 where the denominator is 0 or not finite.

    Voxels without M0 (outside the head) would otherwise give inf/NaN; they carry no CBF.
    """
    numerator, denominator = np.broadcast_arrays(numerator, denominator)
    out = np.zeros(numerator.shape, dtype=np.float64)
    valid = np.isfinite(denominator) & (denominator != 0) & np.isfinite(numerator)
    with np.errstate(over="ignore"):
        np.divide(numerator, denominator, out=out, where=valid)
    out[~np.isfinite(out)] = 0.0  # overflow: no finite CBF exists for such inputs
    return out


def pcasl_cbf(
    deltam: ArrayLike,
    m0: ArrayLike,
    *,
    pld: ArrayLike,
    labeling_duration: ArrayLike,
    t1_blood: float,
    labeling_efficiency: float,
    partition_coefficient: float = 0.9,
) -> NDArray[np.float64]:
    """CBF (mL/100 g/min) for PCASL or CASL, Alsop et al. 2015 eq. [1].

    .. math::

        CBF = \\frac{6000\\,\\lambda\\,\\Delta M\\,e^{PLD/T_{1b}}}
                    {2\\,\\alpha\\,T_{1b}\\,M_0\\,(1 - e^{-\\tau/T_{1b}})}

    Parameters
    ----------
    deltam
        Control minus label, same units as ``m0``.
    m0
        Equilibrium magnetization of tissue (voxelwise), already corrected for incomplete
        recovery and scaled.
    pld
        Post-labeling delay (s): scalar, per slice or per volume.
    labeling_duration
        Labeling duration τ (s).
    t1_blood
        Arterial blood T1 (s).
    labeling_efficiency
        Total labeling efficiency α, background-suppression losses included.
    partition_coefficient
        Brain/blood partition coefficient λ (mL/g).
    """
    deltam = np.asarray(deltam, dtype=np.float64)
    m0 = np.asarray(m0, dtype=np.float64)
    pld = np.asarray(pld, dtype=np.float64)
    tau = np.asarray(labeling_duration, dtype=np.float64)
    if m0.ndim < deltam.ndim:
        m0 = m0[..., np.newaxis]
    numerator = UNIT_CONVERSION * partition_coefficient * deltam * np.exp(pld / t1_blood)
    denominator = 2.0 * labeling_efficiency * t1_blood * m0 * (1.0 - np.exp(-tau / t1_blood))
    return _safe_ratio(numerator, denominator)


def consensus_cbf(
    deltam: ArrayLike,
    m0: ArrayLike,
    *,
    asl_type: str,
    delay: ArrayLike,
    duration: ArrayLike,
    t1_blood: float,
    labeling_efficiency: float,
    partition_coefficient: float = 0.9,
) -> NDArray[np.float64]:
    """The single-delay consensus CBF for the labeling type (Alsop et al. 2015).

    ``delay`` is the PLD for PCASL/CASL (eq. 1) or TI for PASL (eq. 2); ``duration`` is the
    labeling duration τ, or the PASL bolus duration from :func:`pasl_bolus_duration`.
    """
    common = {
        "t1_blood": t1_blood,
        "labeling_efficiency": labeling_efficiency,
        "partition_coefficient": partition_coefficient,
    }
    if asl_type == "PASL":
        return pasl_cbf(deltam, m0, inversion_time=delay, bolus_duration=duration, **common)
    return pcasl_cbf(deltam, m0, pld=delay, labeling_duration=duration, **common)


def pasl_bolus_duration(
    technique: str, inversion_time: ArrayLike, bolus_cutoff_delay: ArrayLike
) -> NDArray[np.float64]:
    """Temporal width of the labeled bolus for PASL with a bolus cut-off (s).

    - ``QUIPSSII`` (Wong et al. 1998): the bolus is cut at TI1 = ``BolusCutOffDelayTime``.
    - ``Q2TIPS`` (Luh et al. 1999): periodic saturation from TI1 to TI1s;
      ``BolusCutOffDelayTime`` is ``[TI1, TI1s]`` and the bolus width is TI1.
    - ``QUIPSS`` (Wong et al. 1998): saturation of the imaging slab at ``BolusCutOffDelayTime``;
      the blood measured is what arrived after it, so the width is TI − delay.
    """
    delay = np.atleast_1d(np.asarray(bolus_cutoff_delay, dtype=np.float64))
    inversion_time = np.asarray(inversion_time, dtype=np.float64)
    if technique in ("QUIPSSII", "Q2TIPS"):
        return np.asarray(delay[0])
    if technique == "QUIPSS":
        return inversion_time - delay[0]
    raise ValueError(f"unknown BolusCutOffTechnique {technique!r}")


def pasl_cbf(
    deltam: ArrayLike,
    m0: ArrayLike,
    *,
    inversion_time: ArrayLike,
    bolus_duration: ArrayLike,
    t1_blood: float,
    labeling_efficiency: float,
    partition_coefficient: float = 0.9,
) -> NDArray[np.float64]:
    """CBF (mL/100 g/min) for PASL with a bolus cut-off, Alsop et al. 2015 eq. [2].

    .. math::

        CBF = \\frac{6000\\,\\lambda\\,\\Delta M\\,e^{TI/T_{1b}}}{2\\,\\alpha\\,TI_1\\,M_0}

    ``inversion_time`` is TI (BIDS ``PostLabelingDelay`` for PASL); ``bolus_duration`` is TI1
    (QUIPSS II, Q2TIPS) or TI − delay (QUIPSS), see :func:`pasl_bolus_duration`.
    """
    deltam = np.asarray(deltam, dtype=np.float64)
    m0 = np.asarray(m0, dtype=np.float64)
    ti = np.asarray(inversion_time, dtype=np.float64)
    bolus = np.asarray(bolus_duration, dtype=np.float64)
    if m0.ndim < deltam.ndim:
        m0 = m0[..., np.newaxis]
    numerator = UNIT_CONVERSION * partition_coefficient * deltam * np.exp(ti / t1_blood)
    denominator = 2.0 * labeling_efficiency * bolus * m0
    return _safe_ratio(numerator, denominator)


def bolus_durations(
    asl_type: str,
    delay: ArrayLike,
    labeling_duration: ArrayLike | None,
    bolus_cutoff_technique: str | None = None,
    bolus_cutoff_delay: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """Temporal width of the labeled bolus (s) at each ``delay``.

    PCASL/CASL: the labeling duration τ. PASL: :func:`pasl_bolus_duration` of the bolus
    cut-off, broadcast against ``delay`` (per volume, or per slice and volume for 2D).
    """
    delay = np.asarray(delay, dtype=np.float64)
    if asl_type == "PASL":
        width = pasl_bolus_duration(bolus_cutoff_technique, delay, bolus_cutoff_delay)
        return np.array(np.broadcast_to(width, delay.shape))
    return np.asarray(labeling_duration, dtype=np.float64)


def finite_or_zero(values: ArrayLike) -> NDArray:
    """``values`` (dtype kept) with NaN and ±inf set to 0: undefined values never reach outputs."""
    return np.nan_to_num(np.asarray(values), nan=0.0, posinf=0.0, neginf=0.0)


def plausibility_warnings(cbf: ArrayLike, mask: ArrayLike) -> list[str]:
    """The quality warnings of a CBF map: its median in the mask against the plausible range.

    The range is ``plausible_cbf`` of the constants table (see :func:`implausible_cbf`).
    """
    bounds = constants.table()["plausible_cbf"]["values"]
    warning = implausible_cbf(cbf, mask, bounds["low"], bounds["high"])
    return [warning] if warning else []


def implausible_cbf(cbf: ArrayLike, mask: ArrayLike, low: float, high: float) -> str | None:
    """A warning when the median CBF within the brain mask is outside [low, high].

    Grey-matter CBF in adults is ~40-100 mL/100 g/min; a median of thousands (or ~0) almost
    always means ΔM and M0 are on different scales (e.g. GE product sequences, which store ΔM
    and M0 with vendor scaling) or the wrong M0 was used. Returns None when plausible.
    """
    values = np.asarray(cbf)[np.asarray(mask, dtype=bool)]
    if values.size == 0:
        return "the brain mask is empty: CBF could not be checked"
    median = float(np.median(values))
    if low <= median <= high:
        return None
    return (
        f"median CBF in the brain mask is {median:.4g} mL/100 g/min, outside the plausible "
        f"{low:g}-{high:g}: check the M0 scaling (--m0-scale; GE product sequences scale ΔM and "
        "M0 differently) and that the right M0 scan was used"
    )


def slice_delays(
    delay: ArrayLike, slice_timing: ArrayLike, *, ndim: int = 3, slice_axis: int = 2
) -> NDArray[np.float64]:
    """Per-slice delay for 2D readouts: delay + SliceTiming[k] − min(SliceTiming).

    In a 2D multi-slice readout each slice is acquired later than the first, so its blood has
    decayed for longer (Alsop et al. 2015). ``delay`` may be a scalar or a per-volume vector
    (T,); the result broadcasts against (X, Y, Z) or (X, Y, Z, T) arrays.
    """
    timing = np.asarray(slice_timing, dtype=np.float64)
    offsets = timing - timing.min()
    shape = [1] * ndim
    shape[slice_axis] = offsets.size
    offsets = offsets.reshape(shape)
    delay = np.asarray(delay, dtype=np.float64)
    if delay.ndim == 1 and ndim == 4:
        delay = delay.reshape(1, 1, 1, -1)
    return delay + offsets
