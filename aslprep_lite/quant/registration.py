"""Rigid registration and resampling with SimpleITK (head-motion correction, M0 alignment).

Geometry conventions
--------------------
Arrays are NIfTI-ordered ``(X, Y, Z[, T])`` with a voxel-to-world RAS+ affine. ITK works in LPS,
so images are handed to SimpleITK with ``origin``/``direction`` flipped by ``diag(-1, -1, 1)``
and ITK transforms are turned back into RAS 4x4 matrices with ``F @ M_lps @ F``
(``F = diag(-1, -1, 1, 1)``, its own inverse).

Every matrix returned or accepted here maps a point of the *reference* (fixed) world to the
same anatomical point in the *moving* world, in RAS mm; that is also the direction a resampler
needs (for each output voxel, where to read in the moving image). See
:mod:`aslprep_lite.quant.motion` for the six-parameter view of these matrices.

Settings
--------
Measured on synthetic 80-volume ASL series (64x64x24 at 3.5x3.5x5 mm, known motion):
centred ``Euler3DTransform``; correlation metric (Mattes mutual information, 32 bins, across
contrasts); 20 % REGULAR sampling with a fixed seed; fixed mask = Otsu of the smoothed
(sigma 2 voxels) fixed image dilated by 2 voxels; regular-step gradient descent (learning rate
1, relaxation 0.5) with scales from physical shift; two levels (shrink 2, 1; smoothing 1, 0
voxels); each volume starts from the previous volume's solution. The stopping rule is tighter
than the 1e-3 / 100 iterations first measured (see :func:`_register`): min step 1e-4, 200
iterations, no gradient-magnitude stop. On an 81-volume phantom series that gives 0.09 mm mean
displacement error (max 0.22 mm), 0.3 mm for the cross-contrast M0, in ~8 s on one thread.

Interpolation
-------------
Subtraction turns any interpolation difference between labels and controls into signal:
without background suppression the static tissue is ~100x the perfusion signal, so where
labels and controls are resampled by different sub-voxel shifts, trilinear interpolation's
shift-dependent blurring leaves a systematic residue at tissue edges. On synthetic series
(known CBF, 8 pairs, grey matter at the brain edge) trilinear resampling moved grey-matter
ΔM by -6 % to +25 % (no motion to 1 mm motion, no background suppression); cubic B-spline
resampling kept it within -5 % to +0.7 % (within 1.1 % without motion, 0.5 % with background
suppression), at ~0.1 s more per series. Volumes are therefore resampled with cubic
B-splines; registration itself evaluates its metric with trilinear interpolation.

Determinism
-----------
The metric sampler is seeded. ITK registration results also depend on the thread count (the
metric is summed per thread), and with more than one thread Mattes mutual information differs
run to run (~1e-13 in the matrices, enough to break byte-identical outputs). Registrations
therefore always run on one thread, under a temporary *global* ITK thread count (per-filter
settings do not reach the registration's internal pyramid and metric): byte-identical results
run to run and for any ``n_threads``/core count, at the cost of the ~15 % a second thread saved
on 2 cores. ``n_threads`` only drives resampling, where each output voxel is computed
independently.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from aslprep_lite.config import RANDOM_SEED
from aslprep_lite.quant.motion import MIN_REGISTERED_VOLUMES

__all__ = [
    "MotionEstimate",
    "estimate_motion",
    "register_rigid",
    "resample_series",
    "resample_to",
]

#: Canonical spelling of the BIDS ``aslcontext`` volume types, keyed by lower case.
_VOLUME_TYPES = {
    "control": "control",
    "label": "label",
    "m0scan": "m0scan",
    "deltam": "deltam",
    "cbf": "cbf",
    "norf": "noRF",
    "n/a": "n/a",
}
#: Types with enough anatomy to register; deltam/cbf are subtraction images (mostly noise
#: outside grey matter) and n/a is unknown.
_REGISTERABLE = ("control", "label", "m0scan", "noRF")
#: First present type becomes the global reference.
_REFERENCE_ORDER = ("control", "label", "m0scan", "noRF")
#: Types whose contrast matches control/label closely enough for the correlation metric.
_PERFUSION_PAIR = frozenset({"control", "label"})

_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, its own inverse
_METRICS = ("mi", "correlation")


@dataclass(frozen=True, eq=False)
class MotionEstimate:
    """Result of :func:`estimate_motion`.

    Attributes
    ----------
    matrices : ndarray, shape (T, 4, 4)
        RAS world transforms mapping reference-world points to each volume's world points.
    reference : ndarray, shape (X, Y, Z), float32
        Motion-corrected mean of the reference-type volumes (or the fallback described in
        :func:`estimate_motion` when registration was skipped).
    reference_type : str
        Volume type the reference was built from: ``control``, ``label``, ``m0scan``,
        ``noRF``, or ``all`` (mean of every volume, registration skipped and no M0).
    registered : tuple of bool
        Per volume, whether its transform was estimated. ``False`` for deltam/cbf/n/a volumes
        and skipped series (identity matrix) and for a volume whose registration failed
        (identity within its type; the note lists them).
    note : str
        One-line human-readable summary (what was registered, or why it was skipped).
    """

    matrices: np.ndarray
    reference: np.ndarray
    reference_type: str
    registered: tuple[bool, ...]
    note: str


# --------------------------------------------------------------------------------------------
# numpy <-> SimpleITK geometry
# --------------------------------------------------------------------------------------------
def _grid_geometry(affine: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """Return ITK (LPS) spacing, direction (row-major) and origin for a RAS affine."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"expected a 4x4 affine, got shape {affine.shape}")
    lps = _FLIP @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError("affine has a zero-length voxel axis")
    direction = lps[:3, :3] / spacing
    return spacing.tolist(), direction.ravel().tolist(), lps[:3, 3].tolist()


def _to_sitk(volume: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """Wrap a 3D ``(X, Y, Z)`` array as a float32 SimpleITK image with the affine's geometry."""
    # SimpleITK's numpy order is (z, y, x); the transpose makes that match NIfTI (x, y, z).
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume).T, dtype=np.float32))
    spacing, direction, origin = _grid_geometry(affine)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    return image


def _from_sitk(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).T


def _ras_to_itk(matrix: np.ndarray) -> sitk.AffineTransform:
    """ITK transform (LPS) equivalent to a RAS reference->moving world matrix."""
    lps = _FLIP @ np.asarray(matrix, dtype=float) @ _FLIP
    return sitk.AffineTransform(lps[:3, :3].ravel().tolist(), lps[:3, 3].tolist())


def _euler_to_ras(transform: sitk.Euler3DTransform) -> np.ndarray:
    """RAS 4x4 matrix of a centred ITK Euler transform (``y = R (x - c) + c + t`` in LPS)."""
    rot = np.asarray(transform.GetMatrix(), dtype=float).reshape(3, 3)
    center = np.asarray(transform.GetCenter(), dtype=float)
    lps = np.eye(4)
    lps[:3, :3] = rot
    lps[:3, 3] = np.asarray(transform.GetTranslation(), dtype=float) + center - rot @ center
    return _FLIP @ lps @ _FLIP


def _centred_euler(image: sitk.Image) -> sitk.Euler3DTransform:
    """Identity Euler transform rotating about the middle of ``image``'s grid.

    Rotating about the head rather than the scanner origin decouples rotation from
    translation, which keeps the optimiser's steps well conditioned.
    """
    middle = [(n - 1) / 2.0 for n in image.GetSize()]
    transform = sitk.Euler3DTransform()
    transform.SetCenter(image.TransformContinuousIndexToPhysicalPoint(middle))
    return transform


def _resampler(shape: Sequence[int], affine: np.ndarray) -> sitk.ResampleImageFilter:
    """Cubic B-spline resampler onto a grid (nearest-pixel extrapolation beyond edge padding)."""
    spacing, direction, origin = _grid_geometry(affine)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in shape[:3]])
    resampler.SetOutputSpacing(spacing)
    resampler.SetOutputDirection(direction)
    resampler.SetOutputOrigin(origin)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampler.SetInterpolator(sitk.sitkBSpline)
    resampler.SetUseNearestNeighborExtrapolator(True)
    return resampler


def _edge_padding(
    shape: Sequence[int],
    affine: np.ndarray,
    ref_shape: Sequence[int],
    ref_affine: np.ndarray,
    matrices: np.ndarray,
) -> np.ndarray:
    """Voxels of edge replication each side of ``shape`` so every sample lands in the array.

    Out-of-field samples take the nearest edge value, in the sense of ``scipy.ndimage``'s
    ``mode="nearest"``: the coordinate is clamped along the axes where it is outside, and the
    other axes are still interpolated. A constant (zero) fill would blank the first and last
    slices after any through-plane motion, corrupting their CBF; ITK's own nearest-neighbour
    extrapolator would drop the in-plane interpolation on those slices. Replicating the edge
    before resampling gives the clamped behaviour (the spline of a constant run is that
    constant). The map is affine, so the
    grid corners bound the sampled region. Padding is capped at one array length per side
    (beyond that, gross misregistration, ITK's nearest-pixel extrapolation takes over).

    Returns
    -------
    ndarray, shape (3, 2), int
        ``(before, after)`` padding per axis.
    """
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in ref_shape[:3]], indexing="ij"))
    corners = corners.reshape(3, -1).T.astype(float)
    world = corners @ ref_affine[:3, :3].T + ref_affine[:3, 3]
    to_voxels = np.linalg.inv(np.asarray(affine, dtype=float)) @ matrices
    ijk = np.einsum("tij,cj->tci", to_voxels[:, :3, :3], world) + to_voxels[:, None, :3, 3]
    last = np.asarray(shape[:3], dtype=float) - 1.0
    before = np.ceil(np.clip(-ijk.min(axis=(0, 1)), 0.0, last + 1.0))
    after = np.ceil(np.clip(ijk.max(axis=(0, 1)) - last, 0.0, last + 1.0))
    return np.stack([before, after], axis=1).astype(int)


def _to_sitk_padded(volume: np.ndarray, affine: np.ndarray, padding: np.ndarray) -> sitk.Image:
    """:func:`_to_sitk` of the edge-replicated volume, on the correspondingly grown grid."""
    if not padding.any():
        return _to_sitk(volume, affine)
    grown = np.array(affine, dtype=float)
    grown[:3, 3] -= grown[:3, :3] @ padding[:, 0]  # index 0 moves ``before`` voxels outwards
    return _to_sitk(np.pad(volume, [tuple(p) for p in padding], mode="edge"), grown)


# --------------------------------------------------------------------------------------------
# registration core
# --------------------------------------------------------------------------------------------
def _foreground_mask(image: sitk.Image) -> sitk.Image | None:
    """Otsu foreground of the smoothed image, dilated 2 voxels; ``None`` if degenerate.

    Restricting the metric to the head stops the (motionless) background noise from pulling
    the estimate towards identity; the dilation keeps the skull edge, which carries most of
    the signal gradient.
    """
    smooth = sitk.DiscreteGaussianImageFilter()
    smooth.SetVariance(4.0)  # sigma 2 voxels
    smooth.SetUseImageSpacing(False)
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetInsideValue(0)  # ITK's "inside" is below the threshold: make that background
    otsu.SetOutsideValue(1)
    dilate = sitk.BinaryDilateImageFilter()
    dilate.SetKernelRadius(2)
    dilate.SetForegroundValue(1)
    try:
        mask = dilate.Execute(otsu.Execute(smooth.Execute(image)))
    except RuntimeError:  # e.g. a constant image has no Otsu threshold
        return None
    # Too small a mask leaves too few samples for a stable metric; fall back to the full image.
    if int(sitk.GetArrayViewFromImage(mask).sum()) < 64:
        return None
    return mask


def _register(
    fixed: sitk.Image,
    moving: sitk.Image,
    mask: sitk.Image | None,
    metric: str,
    initial: sitk.Euler3DTransform,
    seed: int,
) -> sitk.Euler3DTransform:
    """Rigidly register ``moving`` to ``fixed``; returns a new Euler transform (fixed->moving)."""
    method = sitk.ImageRegistrationMethod()
    if metric == "mi":
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    else:
        method.SetMetricAsCorrelation()
    # REGULAR sampling still jitters each sample inside its grid cell; the fixed seed makes
    # that jitter, and therefore the result, reproducible.
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(0.2, seed)
    if mask is not None:
        method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    # Convergence is decided by the step length alone. ITK's default gradient-magnitude
    # tolerance (1e-4) is meaningless for the correlation metric, whose gradient is tiny when
    # images already nearly match: it stopped runs after ~10 iterations while the optimiser
    # was still oscillating. Min step 1e-4 (not 1e-3) and 200 iterations let the step halve
    # enough times to settle in weakly constrained directions (in-plane rotation of a round
    # head): on a smooth phantom the mean error fell from 0.23 to 0.05 mm, for ~1.5x the time.
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0,
        minStep=1e-4,
        numberOfIterations=200,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-12,
    )
    # Puts one radian and one millimetre on the same footing (the shift each causes in voxels).
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    transform = sitk.Euler3DTransform(initial)  # copy: the caller keeps its starting point
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    return transform


@contextmanager
def _itk_threads(n_threads: int) -> Iterator[None]:
    """Run ITK with ``n_threads`` threads, restoring the global default afterwards.

    Setting the count on each filter is not enough: the registration's internal pyramid and
    metric use the *global* default, and results depend on it (and, for Mattes mutual
    information, vary run to run when it is above 1). Not safe if other Python threads use
    SimpleITK at the same time.
    """
    if int(n_threads) < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n_threads))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _check_metric(metric: str) -> str:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    return metric


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def register_rigid(
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    *,
    metric: str = "mi",
    seed: int = RANDOM_SEED,
    n_threads: int = 1,
) -> np.ndarray:
    """Rigidly register one 3D image to another (grids may differ).

    Starts from the scanner geometry (identity in world space), which is already close for
    images of one session, and rotates about the centre of the fixed grid.

    Parameters
    ----------
    fixed, moving : ndarray, shape (X, Y, Z)
        Fixed (reference) and moving images.
    fixed_affine, moving_affine : ndarray, shape (4, 4)
        Their voxel-to-world RAS+ affines.
    metric : {"mi", "correlation"}, optional
        Mattes mutual information (32 bins; use across contrasts, e.g. M0 vs control) or
        normalised correlation (same contrast).
    seed : int, optional
        Seed of the metric sampler (fixed for reproducible results).
    n_threads : int, optional
        Accepted for a uniform API; registration always runs on one thread (see the module
        notes on determinism), so the result does not depend on it.

    Returns
    -------
    ndarray, shape (4, 4)
        RAS world matrix mapping fixed-world points to moving-world points; pass it to
        :func:`resample_to` to bring ``moving`` onto the fixed grid.
    """
    metric = _check_metric(metric)
    fixed_img = _to_sitk(np.nan_to_num(np.asarray(fixed, dtype=np.float32)), fixed_affine)
    moving_img = _to_sitk(np.nan_to_num(np.asarray(moving, dtype=np.float32)), moving_affine)
    # n_threads is unused: registration is single-threaded by design (module notes).
    with _itk_threads(1):
        mask = _foreground_mask(fixed_img)
        transform = _register(fixed_img, moving_img, mask, metric, _centred_euler(fixed_img), seed)
    return _euler_to_ras(transform)


def resample_to(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    matrix: np.ndarray,
    ref_shape: Sequence[int],
    ref_affine: np.ndarray,
) -> np.ndarray:
    """Resample a 3D image onto a reference grid through a world transform.

    Parameters
    ----------
    moving : ndarray, shape (X, Y, Z)
        Image to resample.
    moving_affine : ndarray, shape (4, 4)
        Its voxel-to-world RAS+ affine.
    matrix : ndarray, shape (4, 4)
        RAS matrix mapping reference-world points to moving-world points (as returned by
        :func:`register_rigid`); use the identity to resample through the scanner geometry.
    ref_shape : sequence of int
        Output grid shape (first three entries used).
    ref_affine : ndarray, shape (4, 4)
        Output grid voxel-to-world affine.

    Returns
    -------
    ndarray, shape ref_shape[:3], float32
        Cubic B-spline interpolation; points outside ``moving``'s field take the nearest edge value
        (no zero-filled border, so no division by zero when the result is an M0).
    """
    moving = np.asarray(moving, dtype=np.float32)
    matrix = np.asarray(matrix, dtype=float)
    padding = _edge_padding(moving.shape, moving_affine, ref_shape, ref_affine, matrix[None])
    resampler = _resampler(ref_shape, ref_affine)
    resampler.SetTransform(_ras_to_itk(matrix))
    with _itk_threads(1):  # a single volume: a second thread would not pay for itself
        return _from_sitk(resampler.Execute(_to_sitk_padded(moving, moving_affine, padding)))


def resample_series(
    data: np.ndarray, affine: np.ndarray, matrices: np.ndarray, n_threads: int = 1
) -> np.ndarray:
    """Apply one rigid transform per volume, resampling each volume once onto its own grid.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, T)
        Series to correct.
    affine : ndarray, shape (4, 4)
        Voxel-to-world RAS+ affine of ``data``.
    matrices : ndarray, shape (T, 4, 4)
        Reference-world to volume-world RAS matrices (:attr:`MotionEstimate.matrices`).
    n_threads : int, optional
        ITK threads for the resampler. Each output voxel is computed independently, so the
        result is the same for any value.

    Returns
    -------
    ndarray, shape (X, Y, Z, T), float32
        Cubic B-spline interpolation. Volumes whose matrix is exactly the identity are copied, so
        they are bit-for-bit the input (as float32). Points that fall outside the field of view
        take the nearest edge value, which keeps the first and last slices intact.
    """
    data = np.asarray(data)
    matrices = np.asarray(matrices, dtype=float)
    if data.ndim != 4:
        raise ValueError(f"expected a 4D (X, Y, Z, T) series, got shape {data.shape}")
    if matrices.shape != (data.shape[3], 4, 4):
        raise ValueError(
            f"expected matrices of shape ({data.shape[3]}, 4, 4), got {matrices.shape}"
        )
    # Exact identities are copied, so uncorrected volumes stay bit-for-bit the input.
    moved = [t for t in range(data.shape[3]) if not np.array_equal(matrices[t], np.eye(4))]
    out = data.astype(np.float32, copy=True)
    if not moved:
        return out
    padding = _edge_padding(data.shape, affine, data.shape, affine, matrices[moved])
    resampler = _resampler(data.shape, affine)
    with _itk_threads(n_threads):
        for index in moved:
            resampler.SetTransform(_ras_to_itk(matrices[index]))
            image = _to_sitk_padded(data[..., index], affine, padding)
            out[..., index] = _from_sitk(resampler.Execute(image))
    return out


def _normalise_context(context: Sequence[str], n_volumes: int) -> list[str]:
    if isinstance(context, str):
        raise TypeError("context must be a sequence of volume types, not a single string")
    if len(context) != n_volumes:
        raise ValueError(f"aslcontext lists {len(context)} volumes but the series has {n_volumes}")
    out = []
    for value in context:
        canonical = _VOLUME_TYPES.get(str(value).strip().lower())
        if canonical is None:
            allowed = ", ".join(_VOLUME_TYPES.values())
            raise ValueError(f"unknown aslcontext volume type {value!r} (allowed: {allowed})")
        out.append(canonical)
    return out


def estimate_motion(
    data: np.ndarray,
    affine: np.ndarray,
    context: Sequence[str],
    *,
    seed: int = RANDOM_SEED,
    n_threads: int = 1,
) -> MotionEstimate:
    """Estimate rigid head motion of an ASL series, one volume type at a time.

    Label, control and M0 images differ in contrast, so (as ASLPrep does) each type is handled
    on its own: every volume of type ``t`` is registered to the temporal mean of type ``t``
    (correlation metric, each volume starting from the previous one's solution), then that mean
    is registered to the global reference, the mean of the reference type (``control`` if
    present, else ``label``, ``m0scan``, ``noRF``): correlation between control and label,
    Mattes mutual information for ``m0scan``/``noRF``. The two transforms are composed.
    ``deltam``, ``cbf`` and ``n/a`` volumes are never registered (too little anatomy) and get
    the identity.

    With fewer than two control+label volumes (e.g. GE deltam-only data) nothing is registered:
    all matrices are identity and ``reference`` is the mean of the m0scan volumes if any,
    otherwise of all volumes.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, T)
        ASL series. NaNs are treated as 0.
    affine : ndarray, shape (4, 4)
        Voxel-to-world RAS+ affine.
    context : sequence of str
        BIDS aslcontext volume type per volume (``control``, ``label``, ``m0scan``, ``deltam``,
        ``cbf``, ``noRF``, ``n/a``; case-insensitive).
    seed : int, optional
        Metric sampling seed; a fixed seed gives identical results run to run.
    n_threads : int, optional
        ITK threads for the final resampling of the reference only; the registrations always
        run on one thread, so the result does not depend on it (module notes).

    Returns
    -------
    MotionEstimate
        ``matrices`` map reference-world to volume-world points (RAS mm); ``reference`` is the
        mean of the reference-type volumes after correction.
    """
    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"expected a 4D (X, Y, Z, T) series, got shape {data.shape}")
    n_volumes = data.shape[3]
    types = _normalise_context(context, n_volumes)
    data = np.nan_to_num(data.astype(np.float32, copy=False))
    indices = {
        kind: [i for i, t in enumerate(types) if t == kind] for kind in _VOLUME_TYPES.values()
    }
    n_perfusion = len(indices["control"]) + len(indices["label"])
    if n_perfusion < MIN_REGISTERED_VOLUMES:
        if indices["m0scan"]:
            ref_type, ref_idx = "m0scan", indices["m0scan"]
        else:
            ref_type, ref_idx = "all", list(range(n_volumes))
        return MotionEstimate(
            matrices=np.tile(np.eye(4), (n_volumes, 1, 1)),
            reference=data[..., ref_idx].mean(axis=3, dtype=np.float64).astype(np.float32),
            reference_type=ref_type,
            registered=(False,) * n_volumes,
            note=(
                f"head-motion correction skipped: {n_perfusion} control/label volume(s), "
                "at least 2 needed (e.g. deltam-only data); transforms are identity"
            ),
        )

    ref_type = next(kind for kind in _REFERENCE_ORDER if indices[kind])
    # Reference type first: its mean is the fixed image every other type's mean aligns to.
    kinds = sorted((k for k in _REGISTERABLE if indices[k]), key=lambda k: k != ref_type)
    with _itk_threads(1):  # thread-count independent, reproducible results (module notes)
        matrices, registered, between = _register_by_type(
            data, affine, [(kind, indices[kind]) for kind in kinds], seed
        )
    ref_idx = indices[ref_type]
    corrected = resample_series(data[..., ref_idx], affine, matrices[ref_idx], n_threads)

    counts = ", ".join(f"{len(indices[k])} {k}" for k in kinds)
    note = f"rigid motion estimated per volume type ({counts}) against the {ref_type} mean"
    if between:
        note += "; " + "; ".join(between)
    skipped = [f"{len(indices[k])} {k}" for k in ("deltam", "cbf", "n/a") if indices[k]]
    if skipped:
        note += "; not registered (identity): " + ", ".join(skipped)
    failed = [i for kind in kinds for i in indices[kind] if not registered[i]]
    if failed:
        note += f"; registration failed for volume(s) {failed}"
    return MotionEstimate(
        matrices=matrices,
        reference=corrected.mean(axis=3, dtype=np.float64).astype(np.float32),
        reference_type=ref_type,
        registered=tuple(registered),
        note=note,
    )


def _register_by_type(
    data: np.ndarray,
    affine: np.ndarray,
    groups: list[tuple[str, list[int]]],
    seed: int,
) -> tuple[np.ndarray, list[bool], list[str]]:
    """Two-stage registration; ``groups[0]`` is the reference type.

    Returns the (T, 4, 4) matrices, a per-volume success flag and a description of each
    between-type registration.
    """
    matrices = np.tile(np.eye(4), (data.shape[3], 1, 1))
    registered = [False] * data.shape[3]
    between: list[str] = []
    ref_type = groups[0][0]
    reference_img = reference_mask = None
    for kind, idx in groups:
        mean_img = _to_sitk(data[..., idx].mean(axis=3, dtype=np.float64), affine)
        mean_mask = _foreground_mask(mean_img)
        if kind == ref_type:
            reference_img, reference_mask = mean_img, mean_mask

        # Within type: volume -> temporal mean of its type, warm-started from the previous one.
        # A single volume is its own mean, so its within-type transform is exactly identity.
        within = np.tile(np.eye(4), (len(idx), 1, 1))
        ok = [True] * len(idx)
        if len(idx) > 1:
            previous = _centred_euler(mean_img)
            for j, index in enumerate(idx):
                moving = _to_sitk(data[..., index], affine)
                try:
                    previous = _register(
                        mean_img, moving, mean_mask, "correlation", previous, seed
                    )
                except RuntimeError:  # e.g. a blank volume leaves no valid metric samples
                    ok[j] = False
                    continue
                within[j] = _euler_to_ras(previous)

        # Between types: reference mean -> this type's mean (identity for the reference type).
        to_type = np.eye(4)
        if kind != ref_type:
            metric = "correlation" if {kind, ref_type} <= _PERFUSION_PAIR else "mi"
            between.append(f"{kind} mean to {ref_type} mean by {metric}")
            start = _centred_euler(reference_img)
            try:
                fitted = _register(reference_img, mean_img, reference_mask, metric, start, seed)
                to_type = _euler_to_ras(fitted)
            except RuntimeError:
                ok = [False] * len(idx)

        # Compose: reference world -> type-mean world -> volume world.
        matrices[idx] = within @ to_type
        for j, index in enumerate(idx):
            registered[index] = ok[j]
    return matrices, registered, between
