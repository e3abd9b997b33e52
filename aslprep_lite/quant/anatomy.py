"""T1w anatomy: bias correction, normalization to a template, brain mask and tissue classes.

Engines (chosen by measurement, ``benchmarks/bench_anatomy.py``; all pip-installable, no model
weights): SimpleITK's N4 bias-field correction (Tustison et al. 2010) and affine registration
(Mattes mutual information), then dipy's symmetric diffeomorphic registration (SyN with a
cross-correlation metric; Avants et al. 2008, Garyfallidis et al. 2014). On a synthetic 1 mm
subject (the template moved by a known affine and a smooth warp of up to 5 mm) this took 33-45 s
and 1.1 GB on two cores, with a mean warp error of 0.4-0.5 mm and a brain-mask Dice of 0.995;
antspyx took 81-132 s and 2 GB and would pin older numpy/scipy, and a SimpleITK B-spline stage
took 122-230 s.

Brain extraction is template based, as ANTs' ``antsBrainExtraction``: the template's brain mask
is brought back to the subject through the normalization. The tissue classes come from a
three-class Gaussian mixture fitted by expectation-maximization on the bias-corrected
intensities inside the brain, with the template's GM, WM and CSF probability maps, brought to
the subject the same way, as spatial priors (Ashburner & Friston 2005, in its simplest form).

Every mapping follows :mod:`aslprep_lite.quant.warps`: reference-space points to moving-space
points, RAS mm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage

from aslprep_lite.quant.registration import _euler_to_ras, _itk_threads, _to_sitk
from aslprep_lite.quant.warps import (
    Deformation,
    coarse_grid,
    grid_points,
    resample_through,
    sample,
)

#: Tissue classes, in the order of the probability maps and of the discrete labels 1, 2, 3
#: (fMRIPrep's ``_dseg`` convention: 1 GM, 2 WM, 3 CSF).
TISSUES = ("GM", "WM", "CSF")

#: Registration runs on the template at this voxel size (mm): the warp of a 2 mm SyN is smooth
#: on a 2 mm grid, and 1 mm costs 8x the time for no measured gain on the synthetic subject.
REGISTRATION_MM = 2.0
#: SyN settings measured in the benchmark: CC radius 2 voxels, sigma_diff 2, levels 8/4/2 mm.
SYN_LEVEL_ITERS = (10, 10, 5)
#: The brain mask used for the affine metric is the template mask dilated by this much (mm):
#: it keeps the brain edge, which carries the registration's signal, and leaves out the scalp.
MASK_DILATION_MM = 4.0
#: EM iterations of the tissue classification (the posteriors change < 1e-3 after ~10).
EM_ITERATIONS = 15

_N4_SHRINK = 4
_N4_ITERATIONS = (50, 50, 50, 50)


@dataclass(frozen=True, eq=False)
class Template:
    """A template's images as arrays (res-1 or finer), with the derived registration image."""

    t1w: NDArray[np.float32]
    mask: NDArray[np.bool_]
    priors: NDArray[np.float32] | None  # (3, X, Y, Z): GM, WM, CSF; None: registration only
    affine: NDArray[np.float64]
    reg_t1w: NDArray[np.float32] = field(init=False)
    reg_mask: NDArray[np.bool_] = field(init=False)
    reg_affine: NDArray[np.float64] = field(init=False)

    def __post_init__(self) -> None:
        brain = np.where(self.mask, self.t1w, 0).astype(np.float32)  # skull-stripped
        reg, reg_affine = downsample(brain, self.affine, REGISTRATION_MM)
        mask, _ = downsample(self.mask.astype(np.float32), self.affine, REGISTRATION_MM)
        zoom = float(np.linalg.norm(reg_affine[:3, 0]))
        dilated = ndimage.binary_dilation(
            mask > 0.5, iterations=max(1, round(MASK_DILATION_MM / zoom))
        )
        object.__setattr__(self, "reg_t1w", reg)
        object.__setattr__(self, "reg_mask", dilated)
        object.__setattr__(self, "reg_affine", reg_affine)


def make_template(
    t1w: NDArray, mask: NDArray, gm: NDArray, wm: NDArray, csf: NDArray | None, affine: NDArray
) -> Template:
    """A :class:`Template` from its images; without a CSF map, CSF = mask − GM − WM."""
    inside = np.asarray(mask) > 0.5
    gm = np.clip(np.asarray(gm, np.float32), 0, 1)
    wm = np.clip(np.asarray(wm, np.float32), 0, 1)
    if csf is None:
        csf = np.clip(inside - gm - wm, 0, 1)
    priors = np.stack([gm, wm, np.clip(np.asarray(csf, np.float32), 0, 1)])
    return Template(np.asarray(t1w, np.float32), inside, priors, np.asarray(affine, float))


def downsample(
    data: NDArray, affine: NDArray, spacing: float
) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Block-average to voxels of about ``spacing`` mm (integer factors), with its affine."""
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    factors = np.maximum(1, np.round(spacing / zooms)).astype(int)
    if np.all(factors == 1):
        return np.asarray(data, np.float32), np.asarray(affine, float)
    crop = tuple(slice(0, (n // f) * f) for n, f in zip(data.shape, factors, strict=True))
    shape = [n // f for n, f in zip(data.shape, factors, strict=True)]
    blocks = np.asarray(data, np.float32)[crop].reshape(
        shape[0], factors[0], shape[1], factors[1], shape[2], factors[2]
    )
    new_affine = np.array(affine, float)
    new_affine[:3, :3] = affine[:3, :3] * factors
    # the new voxel (0, 0, 0) is centred on the old block's centre
    new_affine[:3, 3] = affine[:3, :3] @ ((factors - 1) / 2.0) + affine[:3, 3]
    return blocks.mean(axis=(1, 3, 5)), new_affine


def bias_correct(data: NDArray, affine: NDArray) -> NDArray[np.float32]:
    """N4 bias-field correction (Tustison et al. 2010) of a T1w.

    Fitted on a copy shrunk 4× inside an Otsu head mask, then the log bias field is evaluated
    on the full grid and divided out, as ANTs' ``N4BiasFieldCorrection -s 4`` does.
    """
    image = _to_sitk(np.clip(np.nan_to_num(data), 0, None), affine)
    with _itk_threads(1):  # ITK reductions depend on the thread count: byte-identical runs
        head = sitk.OtsuThreshold(image, 0, 1, 200)
        n4 = sitk.N4BiasFieldCorrectionImageFilter()
        n4.SetMaximumNumberOfIterations(list(_N4_ITERATIONS))
        n4.Execute(sitk.Shrink(image, [_N4_SHRINK] * 3), sitk.Shrink(head, [_N4_SHRINK] * 3))
        log_bias = n4.GetLogBiasFieldAsImage(image)
    bias = np.exp(sitk.GetArrayFromImage(log_bias).T)
    return (np.clip(np.nan_to_num(data), 0, None) / bias).astype(np.float32)


def register_affine(
    fixed: NDArray,
    fixed_affine: NDArray,
    fixed_mask: NDArray,
    moving: NDArray,
    moving_affine: NDArray,
    *,
    seed: int,
    dof: int = 12,
    search: bool = False,
) -> NDArray[np.float64]:
    """Rigid, then (``dof`` 12) affine registration, Mattes mutual information.

    Starts by aligning the images' centres of mass (moments), so no header agreement between
    the spaces is assumed; with ``search``, the rotation is first chosen among a grid of
    ±20° about each axis (every 10°: 125 evaluations at 8 mm), as FLIRT's coarse search does,
    so that large rotations do not stop in a wrong optimum. Returns the RAS matrix mapping
    fixed-world to moving-world points.
    """
    if seed == 0:  # SimpleITK reads 0 as "seed from the clock": never reproducible
        raise ValueError("seed must not be 0 (SimpleITK's wall-clock seed)")
    fixed_img = _to_sitk(fixed, fixed_affine)
    moving_img = _to_sitk(np.clip(np.nan_to_num(moving), 0, None), moving_affine)
    mask_img = sitk.Cast(
        _to_sitk(np.asarray(fixed_mask, np.float32), fixed_affine), sitk.sitkUInt8
    )

    def method() -> sitk.ImageRegistrationMethod:
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(32)
        reg.SetMetricSamplingStrategy(reg.REGULAR)
        reg.SetMetricSamplingPercentage(0.25, seed)
        reg.SetMetricFixedMask(mask_img)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=2.0, minStep=1e-3, numberOfIterations=100, relaxationFactor=0.5
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2, 1, 0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        return reg

    with _itk_threads(1):  # see registration.py: one thread keeps runs byte-identical
        rigid = sitk.CenteredTransformInitializer(
            fixed_img,
            moving_img,
            sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS,
        )
        if search:
            coarse = method()
            coarse.SetOptimizerAsExhaustive(
                numberOfSteps=[_SEARCH_STEPS] * 3 + [0] * 3, stepLength=_SEARCH_STEP
            )
            coarse.SetOptimizerScales([1.0] * 6)
            coarse.SetShrinkFactorsPerLevel([4])
            coarse.SetSmoothingSigmasPerLevel([2])
            coarse.SetInitialTransform(rigid, inPlace=True)
            coarse.Execute(fixed_img, moving_img)
        reg = method()
        reg.SetInitialTransform(rigid, inPlace=True)
        reg.Execute(fixed_img, moving_img)
        if dof == 6:
            return _euler_to_ras(rigid)
        affine = sitk.AffineTransform(3)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        reg = method()
        reg.SetInitialTransform(affine, inPlace=True)
        reg.Execute(fixed_img, moving_img)
    return _affine_to_ras(affine)


#: The coarse rotation search of :func:`register_affine`: ±2 steps of 10° about each axis.
_SEARCH_STEPS = 2
_SEARCH_STEP = float(np.deg2rad(10.0))


def _affine_to_ras(transform: sitk.AffineTransform) -> NDArray[np.float64]:
    """RAS 4×4 matrix of a centred ITK affine transform (fixed → moving points)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    matrix = np.asarray(transform.GetMatrix(), float).reshape(3, 3)
    centre = np.asarray(transform.GetCenter(), float)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = np.asarray(transform.GetTranslation(), float) + centre - matrix @ centre
    return flip @ lps @ flip


@dataclass(frozen=True, eq=False)
class Normalization:
    """A subject ↔ template mapping, both directions.

    Attributes
    ----------
    to_subject : Deformation
        On the template's registration grid: the subject point of each template point (the
        ITK ``from-<subject>_to-<template>`` transform).
    to_template : Deformation
        On a 2 mm grid over the subject's field of view: the template point of each subject
        point (``from-<template>_to-<subject>``).
    affine : ndarray
        The affine stage alone (template → subject points).
    """

    to_subject: Deformation
    to_template: Deformation
    affine: NDArray[np.float64]


def normalize(
    subject: NDArray,
    subject_affine: NDArray,
    template: Template,
    *,
    seed: int,
    subject_mask: NDArray | None = None,
) -> Normalization:
    """Affine (SimpleITK) then SyN (dipy) registration of a T1w to a template.

    Parameters
    ----------
    subject : ndarray
        Bias-corrected T1w, with or without skull.
    subject_affine : ndarray
        Its voxel-to-world affine.
    template : Template
        The target.
    seed : int
        Seed of the affine metric's sampler.
    subject_mask : ndarray, optional
        The subject's brain mask, when known (a precomputed or a first-pass mask): the SyN
        stage then sees the skull-stripped subject. Without it, the template's dilated mask
        brought back by the affine stage strips the skull.
    """
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric

    moving = np.asarray(subject, np.float32)
    if subject_mask is not None:
        moving = np.where(subject_mask, moving, 0).astype(np.float32)
    # The affine stage runs on the subject block-averaged to the registration grid (the
    # template's is REGISTRATION_MM already): a 1 mm T1w took 17 s, at 2 mm 3 s; its Mattes
    # samples are the template's points, so the finer subject added time, not information.
    coarse_moving, coarse_affine = downsample(moving, subject_affine, REGISTRATION_MM)
    affine = register_affine(
        template.reg_t1w, template.reg_affine, template.reg_mask, coarse_moving, coarse_affine,
        seed=seed,
    )  # fmt: skip
    if subject_mask is None:
        # The affine's inverse brings the dilated template mask to the subject.
        mask = resample_through(
            template.reg_mask.astype(np.float32),
            template.reg_affine,
            np.linalg.inv(affine),
            moving.shape,
            subject_affine,
        )
        moving = np.where(mask > 0.5, moving, 0).astype(np.float32)
    syn = SymmetricDiffeomorphicRegistration(
        CCMetric(3, sigma_diff=2.0, radius=2), level_iters=list(SYN_LEVEL_ITERS)
    )
    mapping = syn.optimize(
        template.reg_t1w.astype(np.float64),
        moving.astype(np.float64),
        static_grid2world=template.reg_affine,
        moving_grid2world=subject_affine,
        prealign=affine,
    )
    # Checked against a known warp: dipy's transform_points takes static (template) points to
    # moving (subject) points, transform_points_inverse the other way.
    tpl_points = grid_points(template.reg_t1w.shape, template.reg_affine)
    to_subject = mapping.transform_points(tpl_points.reshape(-1, 3)).reshape(tpl_points.shape)
    shape, coarse = coarse_grid(moving.shape, subject_affine, REGISTRATION_MM)
    sub_points = grid_points(shape, coarse)
    to_template = mapping.transform_points_inverse(sub_points.reshape(-1, 3)).reshape(
        sub_points.shape
    )
    return Normalization(
        Deformation(to_subject.astype(np.float32), template.reg_affine),
        Deformation(to_template.astype(np.float32), coarse),
        affine,
    )


def segment(
    intensity: NDArray, mask: NDArray, priors: NDArray, *, iterations: int = EM_ITERATIONS
) -> NDArray[np.float32]:
    """Posterior GM, WM and CSF probabilities: a Gaussian mixture with spatial priors.

    In each voxel of ``mask``, ``p(k | x) ∝ π_k(x) · N(x; μ_k, σ_k²)``, with the prior ``π_k``
    the template's probability map and ``μ_k``, ``σ_k`` fitted by expectation-maximization
    (Ashburner & Friston 2005, without its bias or warp updates: those come from N4 and SyN).

    Parameters
    ----------
    intensity : ndarray
        Bias-corrected T1w.
    mask : ndarray of bool
        Brain mask.
    priors : ndarray, shape (3, X, Y, Z)
        GM, WM and CSF prior probabilities on the same grid.

    Returns
    -------
    ndarray, shape (3, X, Y, Z), float32
        GM, WM and CSF posterior probabilities, 0 outside the mask.
    """
    mask = np.asarray(mask, bool)
    x = np.asarray(intensity, np.float64)[mask]
    x = x / max(float(np.median(x)), 1e-6)
    prior = np.stack([np.asarray(p, np.float64)[mask] for p in priors], axis=1) + 1e-3
    prior /= prior.sum(axis=1, keepdims=True)

    def expectation(mean: NDArray, var: NDArray) -> NDArray:
        likelihood = np.exp(-0.5 * (x[:, None] - mean) ** 2 / var) / np.sqrt(var)
        post = likelihood * prior
        return post / (post.sum(axis=1, keepdims=True) + 1e-300)

    post = prior
    start = (prior * x[:, None]).sum(axis=0) / prior.sum(axis=0)
    if np.ptp(start) < 0.05 * x.std():
        # Priors that do not tell the classes apart (a template without tissue maps) would
        # leave every class with the same mean: start from the T1w intensity order instead
        # (CSF < GM < WM), with a pooled variance.
        post = expectation(np.percentile(x, [50.0, 85.0, 10.0]), np.full(3, x.var() / 9))
    for _ in range(iterations):
        weight = post.sum(axis=0)
        mean = (post * x[:, None]).sum(axis=0) / weight
        var = (post * (x[:, None] - mean) ** 2).sum(axis=0) / weight + 1e-6
        post = expectation(mean, var)
    out = np.zeros((3, *mask.shape), np.float32)
    out[:, mask] = post.T
    return out


def discrete_segmentation(probseg: NDArray, mask: NDArray) -> NDArray[np.uint8]:
    """Labels 1 GM, 2 WM, 3 CSF (the most probable class) inside the mask, 0 outside."""
    labels = (1 + np.argmax(probseg, axis=0)).astype(np.uint8)
    return np.where(np.asarray(mask, bool), labels, 0).astype(np.uint8)


@dataclass(frozen=True, eq=False)
class Anatomy:
    """The preprocessed T1w and its normalization (arrays on the T1w grid)."""

    t1w: NDArray[np.float32]
    mask: NDArray[np.bool_]
    probseg: NDArray[np.float32]
    dseg: NDArray[np.uint8]
    normalization: Normalization
    metrics: dict[str, float]


def preprocess_t1w(t1w: NDArray, affine: NDArray, template: Template, *, seed: int) -> Anatomy:
    """N4, normalization to ``template``, template-based brain mask and tissue classes.

    The normalization of the whole head (skull stripped by the affine stage's dilated
    template mask) is kept: the brain mask, the priors and the template-space outputs all go
    through it.
    """
    corrected = bias_correct(t1w, affine)
    norm = normalize(corrected, affine, template, seed=seed)
    warp = norm.to_template  # subject points -> template points
    mask = resample_through(template.mask.astype(np.float32), template.affine, warp,
                            corrected.shape, affine) > 0.5  # fmt: skip
    mask = _largest_component(mask)
    priors = np.stack(
        [resample_through(p, template.affine, warp, corrected.shape, affine)
         for p in template.priors]
    )  # fmt: skip
    probseg = segment(corrected, mask, priors)
    dseg = discrete_segmentation(probseg, mask)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    metrics = {
        "BrainVolume": float(mask.sum() * np.prod(zooms) / 1000.0),  # mL
        "NormalizationCorrelation": normalization_correlation(corrected, affine, norm, template),
    }
    return Anatomy(corrected, mask, probseg, dseg, norm, metrics)


def _largest_component(mask: NDArray) -> NDArray[np.bool_]:
    """The largest 6-connected component of a mask, holes filled."""
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def normalization_correlation(
    subject: NDArray, subject_affine: NDArray, norm: Normalization, template: Template
) -> float:
    """Pearson correlation of the normalized subject with the template inside its brain mask.

    A quality figure for the sidecar: ~0.9 for a good normalization of a T1w, well below for
    a failed one (the same intensity pattern, misplaced).
    """
    warped = sample(subject, subject_affine, norm.to_subject.coords)
    inside = ndimage.binary_erosion(template.reg_mask, iterations=2)
    a, b = warped[inside], template.reg_t1w[inside]
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def dice(a: NDArray, b: NDArray) -> float:
    """Dice coefficient of two masks."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 0.0


def register_asl_to_anatomy(
    reference: NDArray,
    reference_affine: NDArray,
    reference_mask: NDArray,
    brain: NDArray,
    brain_affine: NDArray,
    brain_mask: NDArray,
    *,
    seed: int,
) -> tuple[NDArray[np.float64], dict[str, object]]:
    """Rigid ASL → T1w coregistration with a quality figure and a fallback.

    The ASL reference (M0 or mean control) is registered to the skull-stripped T1w with mutual
    information twice: from the scanner geometry (identity: both images come from one
    session) and from the centres of mass of the two brains after a coarse search of
    rotations (±20°). The quality figure is the Dice
    coefficient of the ASL brain mask and the T1w brain mask brought onto the ASL grid; the
    candidate with the higher Dice is kept (within :data:`COREGISTRATION_TIE`: the scanner
    geometry).

    Returns
    -------
    matrix : ndarray
        RAS matrix mapping T1w-world points to ASL-world points.
    record : dict
        ``Method``, ``Path`` (``"scanner geometry"`` or ``"centre-of-mass fallback"``),
        ``Dice``, ``DiceThreshold``, ``Candidates`` (Dice of each path tried).
    """
    from aslprep_lite.quant.registration import register_rigid

    candidates: dict[str, tuple[NDArray, float]] = {}

    def quality(matrix: NDArray) -> float:
        inv = np.linalg.inv(matrix)  # ASL points -> T1w points
        warped = resample_through(
            np.asarray(brain_mask, np.float32), brain_affine, inv, reference.shape,
            reference_affine,
        )  # fmt: skip
        return dice(warped > 0.5, reference_mask)

    matrix = register_rigid(brain, brain_affine, reference, reference_affine, metric="mi",
                            seed=seed)  # fmt: skip
    candidates["scanner geometry"] = (matrix, quality(matrix))
    # Both paths always: a wrong optimum of the first (a large rotation) can still score a
    # Dice of 0.94-0.96, above the warning threshold, where the right answer scores ~0.98-0.99;
    # the second costs ~3 s at ASL resolution.
    moved = register_affine(
        brain, brain_affine, ndimage.binary_dilation(brain_mask, iterations=2),
        reference, reference_affine, seed=seed, dof=6, search=True,
    )  # fmt: skip
    candidates["centre-of-mass fallback"] = (moved, quality(moved))
    # The scanner geometry unless the other path is clearly better: two right answers differ
    # by a few thousandths (which mask edge voxels they include), a wrong optimum by ~0.04.
    path = "scanner geometry"
    if candidates["centre-of-mass fallback"][1] > candidates[path][1] + COREGISTRATION_TIE:
        path = "centre-of-mass fallback"
    matrix, score = candidates[path]
    record: dict[str, object] = {
        "Method": "rigid, Mattes mutual information (SimpleITK), ASL reference to the "
        "skull-stripped T1w",
        "Path": path,
        "Dice": round(score, 4),
        "DiceThreshold": COREGISTRATION_DICE,
        "Candidates": {name: round(value[1], 4) for name, value in candidates.items()},
    }
    return matrix, record


#: Below this Dice of the ASL and T1w brain masks (on the ASL grid) the coregistration may
#: have failed: the sidecar and the console say so. Correct registrations of the
#: synthetic and real data sit well above it (the masks differ mostly by the ASL mask's
#: coarse edge).
COREGISTRATION_DICE = 0.8
#: Dice differences below this between the two coregistration paths are ties.
COREGISTRATION_TIE = 0.01


def tissue_to_grid(
    probseg: NDArray,
    affine: NDArray,
    mapping: Deformation | NDArray,
    shape: Sequence[int],
    grid_affine: NDArray,
) -> NDArray[np.float32]:
    """Tissue probabilities brought to another grid (e.g. ASL) as partial-volume fractions.

    Each target voxel averages the probabilities over its own volume: the maps are smoothed
    by a Gaussian matching the target voxel size (FWHM = voxel size) before sampling, so a
    3.5 mm ASL voxel's GM fraction reflects the 1 mm GM it contains, not one point of it.
    """
    src_zooms = np.linalg.norm(affine[:3, :3], axis=0)
    dst_zooms = np.linalg.norm(grid_affine[:3, :3], axis=0)
    sigma = np.sqrt(np.maximum(dst_zooms.mean() ** 2 - src_zooms**2, 0)) / 2.3548 / src_zooms
    out = []
    for prob in probseg:
        smooth = ndimage.gaussian_filter(np.asarray(prob, np.float32), sigma)
        out.append(resample_through(smooth, affine, mapping, shape, grid_affine))
    return np.clip(np.stack(out), 0, 1)
