"""Partial-volume correction of a CBF map by local linear regression.

Asllani I, Borogovac A, Brown TR (2008). Regression algorithm correcting for partial volume
effects in arterial spin labeling MRI. Magn Reson Med 60:1362-1371, doi:10.1002/mrm.21670.

Model (Asllani et al. 2008): the signal of a voxel is the sum of the pure-tissue
signals weighted by the tissue fractions, CSF contributing no perfusion signal::

    CBF(x) = pGM(x) fGM(x) + pWM(x) fWM(x)

With one equation and two unknowns per voxel, ``fGM`` and ``fWM`` are assumed constant within
a kernel centred on the voxel and estimated by least squares over the kernel's voxels. The
regression is applied here to the CBF map, as ExploreASL does (``xASL_im_PVCkernel``), rather
than to ΔM as in the paper: the two are equivalent when the quantification is the same linear
scaling for both tissues (the single-compartment model with blood T1); a voxelwise M0, itself a
partial-volume mixture of tissue M0s, breaks that equivalence slightly at tissue boundaries.

The least-squares problem of every voxel is solved at once: its 2x2 normal equations are made
of box-filter sums over the kernel, and Cramer's rule gives the solution (no loop over voxels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from aslprep_lite.quant.tissue import tissue_arrays

__all__ = [
    "MIN_INFORMATION",
    "MIN_OUTPUT_PV",
    "MIN_OUTPUT_TISSUE",
    "PVC_KERNEL",
    "PvcResult",
    "pvc_linear_regression",
    "pvc_record",
]

#: Regression kernel (voxels, x y z). Asllani et al. regress over an n x n in-plane window of
#: 2D multi-slice data; ExploreASL's default flat kernel is [5 5 1] (``xASL_im_PVCkernel``,
#: ``xASL_wrp_PVC``; ASLPrep has no regression PVC, it runs BASIL's spatial-prior PVC). One
#: slice thick because ASL slices are usually thicker than the in-plane voxel and 2D readouts
#: differ in timing from slice to slice; 5 x 5 in-plane balances the conditioning of the 2x2
#: system (enough voxels with varying pGM/pWM) against the smoothing that the constant-flow
#: assumption imposes on the corrected maps (a larger kernel is better conditioned, blurrier).
PVC_KERNEL: tuple[int, int, int] = (5, 5, 1)

#: Minimum information, in pure-tissue voxel equivalents, for an estimate to be output.
#: The variance of the least-squares fGM is sigma^2 / I_GM with I_GM = det / sum(pWM^2), the sum
#: of squares of the part of pGM that pWM cannot explain (likewise I_WM = det / sum(pGM^2));
#: the single-tissue fit has I = sum(p^2). I >= 1 means the corrected value is no noisier than
#: the uncorrected CBF of a single voxel: the correction never yields an estimate noisier than
#: the data it started from. The rule is scale-free (probabilities are in [0, 1]) and rejects
#: the ill-conditioned kernels: a tissue absent from the kernel, or pGM and pWM proportional.
MIN_INFORMATION = 1.0

# Where the other tissue is absent from the kernel (its probabilities all 0, e.g. deep white
# matter of a segmentation with hard zeros) the two-tissue system is singular but the model
# reduces to one tissue, fitted exactly by fGM = sum(pGM CBF) / sum(pGM^2); it is used when
# it carries MIN_INFORMATION. A mere trace of the other tissue gets no such fallback: the
# single-tissue fit would then be biased by fWM sum(pGM pWM) / sum(pGM^2), so it is left to the
# two-tissue rule (usually solvable, since a trace varies far more than the main tissue).

#: A tissue's corrected CBF is output only where that tissue's probability exceeds 0.1 and
#: GM + WM exceed 0.3 (as ExploreASL ``xASL_wrp_PVC``): elsewhere the voxel holds too little of
#: the tissue for its corrected value to describe it.
MIN_OUTPUT_PV = 0.1
MIN_OUTPUT_TISSUE = 0.3

_REFERENCE = (
    "Asllani I, Borogovac A, Brown TR. Regression algorithm correcting for partial volume "
    "effects in arterial spin labeling MRI. Magn Reson Med 2008;60:1362-1371. "
    "doi:10.1002/mrm.21670"
)


@dataclass(frozen=True, eq=False)  # eq=False: array fields make a generated __eq__ ambiguous
class PvcResult:
    """Partial-volume corrected CBF of each tissue.

    Attributes
    ----------
    gm_cbf, wm_cbf : numpy.ndarray
        float32, (X, Y, Z) GM and WM CBF (mL/100 g/min, the units of the input), 0 where not
        defined.
    gm_defined, wm_defined : numpy.ndarray
        bool, (X, Y, Z) voxels where ``gm_cbf`` / ``wm_cbf`` hold an estimate.
    """

    gm_cbf: NDArray[np.float32]
    wm_cbf: NDArray[np.float32]
    gm_defined: NDArray[np.bool_]
    wm_defined: NDArray[np.bool_]


def _check_kernel(kernel: Sequence[int], ndim: int) -> tuple[int, ...]:
    """Validate the kernel: one positive odd size per axis (odd, so it is centred on a voxel)."""
    sizes = tuple(int(k) for k in kernel)
    if len(sizes) != ndim or any(k != s for k, s in zip(kernel, sizes, strict=True)):
        raise ValueError(f"kernel must hold {ndim} integer sizes, got {kernel!r}")
    if any(k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"kernel sizes must be positive and odd, got {kernel!r}")
    return sizes


def _box_sum(values: NDArray[np.float64], kernel: tuple[int, ...]) -> NDArray[np.float64]:
    """Sum of ``values`` over the kernel centred on each voxel (zero outside the volume).

    Separable, one 1D correlation with a vector of ones per axis. ``correlate1d`` sums the
    kernel's values directly at every voxel, whereas ``uniform_filter`` (like a cumulative
    sum) keeps a running sum, whose absolute rounding error, ~1e-16 of the largest value
    passed along the line, can exceed a true sum of tiny probabilities (a GM tail in white
    matter), make it negative, or leave a residue where the true sum is exactly 0; the
    definedness tests below depend on those sums (a tissue absent from the kernel must sum to
    exactly 0).
    """
    out = values
    for axis, size in enumerate(kernel):
        if size > 1:
            out = ndimage.correlate1d(
                out, np.ones(size), axis=axis, mode="constant", cval=0.0, output=np.float64
            )
    return out


def _ratio(numerator: NDArray, denominator: NDArray, where: NDArray) -> NDArray[np.float64]:
    """``numerator / denominator`` where ``where``, else 0 (no warnings)."""
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=where)
    return out


def pvc_linear_regression(
    cbf: ArrayLike,
    pgm: ArrayLike,
    pwm: ArrayLike,
    mask: ArrayLike,
    *,
    kernel: Sequence[int] = PVC_KERNEL,
) -> PvcResult:
    """GM and WM CBF by local linear regression, Asllani et al. 2008.

    In each voxel ``x`` the model of Asllani et al. (2008)

    .. math::

        CBF(y) = p_{GM}(y)\\,f_{GM} + p_{WM}(y)\\,f_{WM}, \\qquad y \\in K(x)

    is fitted by least squares over the voxels ``y`` of the kernel ``K(x)`` that are inside the
    brain mask with finite CBF and tissue probabilities. With box sums over those voxels
    ``a = Σ pGM²``, ``b = Σ pGM pWM``, ``c = Σ pWM²``, ``d = Σ pGM CBF``, ``e = Σ pWM CBF``,
    the normal equations ``[[a, b], [b, c]] [fGM, fWM] = [d, e]`` of the kernel's
    least-squares problem (Asllani et al. 2008) give by Cramer's rule

    .. math::

        f_{GM} = \\frac{c\\,d - b\\,e}{a\\,c - b^2}, \\qquad
        f_{WM} = \\frac{a\\,e - b\\,d}{a\\,c - b^2}

    Ill-conditioned voxels (see the module constants): the two-tissue estimate of a tissue is
    kept where its information ``(ac - b²)/c`` (GM) or ``(ac - b²)/a`` (WM) is at least
    :data:`MIN_INFORMATION`; where the other tissue is absent from the kernel (``c = 0``, resp.
    ``a = 0``) the single-tissue fit ``fGM = d / a`` (``fWM = e / c``), exact there, is used if
    ``a`` (``c``) is at least :data:`MIN_INFORMATION`; otherwise the tissue is undefined. Every
    defined value is thus an unbiased estimate under the model.
    An estimate is output only inside the mask, where the voxel's own CBF is finite and its
    tissue probability exceeds :data:`MIN_OUTPUT_PV` with GM + WM above
    :data:`MIN_OUTPUT_TISSUE` (ExploreASL ``xASL_wrp_PVC``). Estimates are not clipped at 0
    (ExploreASL clips negative ones and refits): clipping would bias tissue means upwards.

    Parameters
    ----------
    cbf
        (X, Y, Z) CBF map (mL/100 g/min); non-finite voxels are left out of every fit.
    pgm, pwm
        (X, Y, Z) GM and WM partial-volume (probability) maps on the CBF grid, clipped to
        [0, 1] (interpolation can overshoot).
    mask
        (X, Y, Z) brain mask (nonzero = brain).
    kernel
        Kernel size in voxels per axis, odd numbers (:data:`PVC_KERNEL`).

    Returns
    -------
    PvcResult
        float32 GM and WM CBF maps, 0 where undefined, and the boolean maps of where each is
        defined.

    Raises
    ------
    ValueError
        If the arrays differ in shape or the kernel is not one odd size per axis.
    """
    cbf, pgm, pwm, inside = tissue_arrays(cbf, pgm, pwm, mask)
    sizes = _check_kernel(kernel, cbf.ndim)

    fit = inside & np.isfinite(cbf) & np.isfinite(pgm) & np.isfinite(pwm)
    gm = np.where(fit, np.clip(pgm, 0.0, 1.0), 0.0)
    wm = np.where(fit, np.clip(pwm, 0.0, 1.0), 0.0)
    flow = np.where(fit, cbf, 0.0)

    # Normal equations of every kernel (voxels outside the fit contribute 0 to every sum)
    a = _box_sum(gm * gm, sizes)
    b = _box_sum(gm * wm, sizes)
    c = _box_sum(wm * wm, sizes)
    d = _box_sum(gm * flow, sizes)
    e = _box_sum(wm * flow, sizes)
    det = a * c - b * b  # >= 0 by Cauchy-Schwarz; rounding can make a degenerate one < 0

    solvable = det > 0
    gm_info = _ratio(det, c, solvable)  # information on fGM left once fWM is fitted
    wm_info = _ratio(det, a, solvable)
    gm_two = solvable & (gm_info >= MIN_INFORMATION)
    wm_two = solvable & (wm_info >= MIN_INFORMATION)
    # Exact zeros: the sums of a tissue absent from the kernel add only zeros (see _box_sum)
    gm_one = (c == 0) & (a >= MIN_INFORMATION)
    wm_one = (a == 0) & (c >= MIN_INFORMATION)

    gm_value = np.where(gm_two, _ratio(c * d - b * e, det, gm_two), _ratio(d, a, gm_one))
    wm_value = np.where(wm_two, _ratio(a * e - b * d, det, wm_two), _ratio(e, c, wm_one))

    tissue = fit & (gm + wm > MIN_OUTPUT_TISSUE)
    gm_defined = tissue & (gm > MIN_OUTPUT_PV) & (gm_two | gm_one)
    wm_defined = tissue & (wm > MIN_OUTPUT_PV) & (wm_two | wm_one)
    # Overflow (absurd inputs) must not leak inf into a written float32 map
    with np.errstate(over="ignore", invalid="ignore"):
        gm_defined &= np.isfinite(gm_value.astype(np.float32))
        wm_defined &= np.isfinite(wm_value.astype(np.float32))

    return PvcResult(
        gm_cbf=np.where(gm_defined, gm_value, 0.0).astype(np.float32),
        wm_cbf=np.where(wm_defined, wm_value, 0.0).astype(np.float32),
        gm_defined=gm_defined,
        wm_defined=wm_defined,
    )


def pvc_record(kernel: Sequence[int] = PVC_KERNEL) -> dict[str, dict[str, object]]:
    """Sidecar fields describing :func:`pvc_linear_regression` run with ``kernel``.

    Parameters
    ----------
    kernel
        Kernel size in voxels per axis, as passed to :func:`pvc_linear_regression`.

    Returns
    -------
    dict
        ``{"PartialVolumeCorrection": {...}}``, JSON-serialisable.
    """
    return {
        "PartialVolumeCorrection": {
            "Method": "linear regression",
            "Model": (
                "CBF = pGM*fGM + pWM*fWM (CSF without perfusion), fGM and fWM constant within "
                "the kernel, least squares over the kernel's brain-mask voxels with finite CBF"
            ),
            "Kernel": [int(k) for k in kernel],
            "KernelUnits": "voxels",
            "KernelWeights": "flat",
            "IllConditioned": (
                "a tissue's two-tissue estimate is kept where its information (determinant of "
                "the normal equations over the other tissue's sum of squared probabilities) is "
                f">= {MIN_INFORMATION:g} pure-tissue voxel; where the other tissue is absent "
                "from the kernel, a single-tissue fit if that tissue's sum of squared "
                f"probabilities is >= {MIN_INFORMATION:g}; otherwise undefined (0)"
            ),
            "OutputMask": (
                f"tissue probability > {MIN_OUTPUT_PV:g} and GM + WM > {MIN_OUTPUT_TISSUE:g} "
                "within the brain mask; 0 elsewhere"
            ),
            "Reference": _REFERENCE,
        }
    }
