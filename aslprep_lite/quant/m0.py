"""M0 calibration image: saturation-recovery correction, brain mask and masked smoothing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nibabel.processing import fwhm2sigma
from numpy.typing import NDArray
from scipy import ndimage


def voxel_sigma(fwhm_mm: float, zooms: Sequence[float]) -> NDArray[np.float64]:
    """Gaussian sigma in voxels along each axis for a kernel of ``fwhm_mm`` FWHM."""
    return fwhm2sigma(fwhm_mm) / np.asarray(zooms, dtype=np.float64)


def tr_correction_factor(
    repetition_time: float, t1_tissue: float, threshold: float = 5.0
) -> float:
    """Factor that scales an M0 acquired at a short TR to full relaxation.

    Alsop et al. 2015: when the M0 image's TR is shorter than ~5 s, tissue magnetization has
    not fully recovered; M0 = M0_measured / (1 − exp(−TR/T1_tissue)). Returns 1 when
    ``repetition_time >= threshold``.

    Raises
    ------
    ValueError
        A non-positive repetition time (no physical M0 can be corrected from it).
    """
    if not repetition_time > 0:
        raise ValueError(f"repetition time must be > 0 s, got {repetition_time}")
    if repetition_time >= threshold:
        return 1.0
    return float(1.0 / (1.0 - np.exp(-repetition_time / t1_tissue)))


def otsu_threshold(values: NDArray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D array of intensities (maximises between-class variance)."""
    values = values[np.isfinite(values)]
    hist, edges = np.histogram(values, bins=bins)
    centers = 0.5 * (edges[:-1] + edges[1:])
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centers)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centers[int(np.argmax(between))])


def brain_mask(image: NDArray, zooms: Sequence[float]) -> NDArray[np.bool_]:
    """A head/brain mask from an M0 or mean control image.

    Otsu threshold of the image smoothed with a 3 mm FWHM Gaussian, then the largest connected
    component, closed with one iteration and with its holes filled. ASL images have little
    extracerebral signal at the PLD used (and none with background suppression), so this is a
    brain mask in practice; anatomy-based masks come with the anatomical workflow.
    """
    image = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    sigma = voxel_sigma(3.0, zooms)
    smooth = ndimage.gaussian_filter(image, sigma, mode="nearest")
    if not np.ptp(smooth) > 0:
        return np.zeros(image.shape, dtype=bool)
    mask = smooth > otsu_threshold(smooth.ravel())
    labels, n_labels = ndimage.label(mask)
    if n_labels > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    mask = ndimage.binary_closing(mask, iterations=1, border_value=0) | mask
    return ndimage.binary_fill_holes(mask)


def smooth_within_mask(
    image: NDArray,
    mask: NDArray,
    zooms: Sequence[float],
    fwhm_mm: float,
    min_fraction: float = 0.0,
) -> NDArray[np.float64]:
    """Gaussian smoothing restricted to a mask (normalized convolution).

    smooth(image·w) / smooth(w) inside the mask, 0 outside: smoothing the M0 reduces the
    noise it passes into CBF, and normalizing by the smoothed weights stops the zero background
    from pulling M0 down (and CBF up) at the brain edge. The weights w are the mask voxels whose
    own value is at least ``min_fraction`` of a first normalized-convolution pass over the whole
    mask: a voxel far below its neighbourhood (partial volume with bone or air at the mask edge,
    a susceptibility void, M0 <= 0) still gets a smoothed value from the voxels around it, but
    no longer pulls its neighbours' M0 down (and their CBF up). ``min_fraction`` 0 (the
    default, for images that may hold true zeros) weights every mask voxel; PrepareM0 uses 0.5
    for the M0. ``fwhm_mm`` 0 returns the masked image.
    """
    image = np.asarray(image, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if fwhm_mm <= 0:
        return np.where(mask, image, 0.0)
    sigma = voxel_sigma(fwhm_mm, zooms)
    out = np.zeros_like(image)
    sources = mask
    for _ in range(2 if min_fraction > 0 else 1):
        weights = ndimage.gaussian_filter(sources.astype(np.float64), sigma, mode="constant")
        smoothed = ndimage.gaussian_filter(np.where(sources, image, 0.0), sigma, mode="constant")
        # second pass: a voxel with no source near it keeps the first pass's value
        np.divide(smoothed, weights, out=out, where=mask & (weights > 1e-6))
        sources = mask & (image >= min_fraction * out)
    return out


def reference_region_m0(
    mean_signal: float,
    *,
    repetition_time: float,
    echo_time: float,
    t1_reference: float,
    t2_reference: float,
    partition_coefficient: float,
    t2_blood: float,
) -> float:
    """Equilibrium magnetization of arterial blood, M0a, from a reference tissue.

    As asl_calib in oxford_asl (Chappell et al. 2009): the mean M0 signal of the reference
    tissue is corrected to full relaxation and to zero echo time, divided by the tissue's
    water partition coefficient (mL/g, relative to blood), and brought back to the echo time
    with blood's T2 (or T2*), so that it matches the ASL signal's own T2 decay::

        M0a = S_ref / (1 − e^(−TR/T1_ref)) · e^(TE/T2_ref) / pc_ref · e^(−TE/T2_blood)

    CBF then follows from the voxelwise formula with M0 replaced by λ·M0a everywhere.
    """
    if not repetition_time > 0:
        raise ValueError(f"repetition time must be > 0 s, got {repetition_time}")
    relaxed = mean_signal / (1.0 - np.exp(-repetition_time / t1_reference))
    at_zero_echo = relaxed * np.exp(echo_time / t2_reference)
    return float(at_zero_echo / partition_coefficient * np.exp(-echo_time / t2_blood))
