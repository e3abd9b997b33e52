"""Benchmark of T1w anatomy: N4, brain mask, segmentation, normalization.

Times the package's own anatomy (engine ``pipeline``, the default) and the candidate engines
it was chosen from. Builds a deterministic synthetic subject with known truth from the
MNI152NLin2009aSym template (res-1) with :func:`aslprep_lite.synthetic_anatomy.make_anatomy`
(1 mm T1w) and times each pipeline on it, one engine at a time, each in a fresh child process
(so that the peak RSS is the engine's own). That module documents the subject; in short:

* **truth**: a template point ``y`` is assigned to every subject point ``x`` by
  ``y = M x + b + d(x)``, with ``M`` a random affine (per-axis scaling 5-10 %, rotations of
  3-6°) plus a shift of a few mm, and ``d`` a smooth random displacement field (cubic
  upsampling of a coarse Gaussian grid, at most ``--max-disp`` mm). The subject's T1w, GM, WM,
  CSF (template mask - GM - WM) and brain mask are the template's sampled at ``y``; the
  discrete truth is the argmax of the CSF/GM/WM probabilities inside the brain mask;
* **head**: a dark skull band (0-7 mm from the brain) and a bright scalp band (next 5 mm),
  edges modulated ±1.5 mm, air outside;
* **acquisition**: a multiplicative smooth bias field (±20 %), Rician noise (σ = 2 % of the
  WM intensity), on a 176 × 256 × 256 grid of 1 mm voxels laid out like a sagittal MPRAGE
  (axis codes R, P, I) with a 5° oblique tilt.

Pipelines (each engine maps the template into subject space; the brain mask is the template
mask warped back, the segmentation uses the warped GM/WM/CSF maps as priors):

* ``pipeline`` (default): ``aslprep_lite.quant.anatomy.preprocess_t1w`` itself, on the T1w
  and template read as the ``PreprocessT1w`` node reads them (``load_template`` of the res-1
  T1w, mask, GM and WM). Its parts are timed by wrapping the functions it calls, so the code
  that runs is the package's, unchanged: N4 (``bias_correct``), ``normalize`` (``affine`` =
  ``register_affine``, the dilated-mask resample, ``SyN (dipy)``, the ``deformation readout``
  of dipy's map onto the two 2 mm grids), the ``resample_through`` warps of the template mask
  and priors, the largest component of the mask, ``segmentation (EM)`` and the QC
  correlation. Its labels (1 GM, 2 WM, 3 CSF) are mapped to the truth's (1 CSF, 2 GM, 3 WM);
  the EPE is that of ``Normalization.to_template`` evaluated at the true brain voxels, the
  template GM Dice that of the GM prior handed to the EM. Registration is at the package's
  ``REGISTRATION_MM`` (``--reg-res`` does not apply) with the command line's seed
  (``aslprep_lite.config.RANDOM_SEED``), so that runs are byte-identical;
* ``sitk``: SimpleITK N4 (shrink 4, Otsu head mask); rigid then affine registration
  (Mattes MI, fixed mask = template brain mask dilated 4 mm); B-spline refinement (gradient
  descent with line search, Mattes MI, mesh 6³ then 12³, subject as fixed image at shrink 4
  and 2, masked by the affine-warped dilated mask); 3-class EM (Gaussian mixture in numpy)
  with the warped priors;
* ``ants``: antspyx ``n4_bias_field_correction`` (shrink 4, Otsu head mask);
  ``registration`` with ``--ants-transform`` (default ``antsRegistrationSyNQuick[s]``; any
  ANTsPy ``type_of_transform``, or ``SyNCC-tuned``: SyN with CC radius 2 and iterations
  (40, 20, 10)) and the dilated template mask; ``apply_transforms`` of the inverse;
  ``atropos`` with the warped priors;
* ``dipy``: SimpleITK N4 and affine as in ``sitk``, then dipy's
  ``SymmetricDiffeomorphicRegistration`` (CC metric) on the affine pre-alignment; the same
  EM segmentation.

Registration uses the template at ``--reg-res`` (default 2 mm; the priors and mask warped
back are res-1). Accuracy: Dice of the brain mask against the truth; GM and WM Dice of the
discrete segmentation against the discrete truth; normalization as the Dice of the template
GM map (> 0.5) warped to the subject against the true GM map (> 0.5) and the mean endpoint
error (mm) of the subject → template mapping over true brain voxels (the engine's warp is
read out by resampling images of the template's world coordinates; ``pipeline``'s
deformation is evaluated at the points directly). Peak RSS is the child's ``VmHWM`` (else
``ru_maxrss``) after each step (cumulative; it includes the interpreter, the imports and the
inputs read). Each step also has its CPU time (``time.process_time``, user + system of the
child): for the single-threaded steps it is what the wall time would be on an idle machine,
so compare it with the wall time when the load average (printed before and after each
engine) is high.

Nothing is downloaded: the template comes from :func:`aslprep_lite.templates.layout_embedded_home`
when ``aslprep_lite`` is importable, otherwise from ``--template-dir``. Building the subject
imports ``aslprep_lite.synthetic_anatomy`` (numpy, scipy and nibabel only), from the source
tree beside this script when the package is not installed in the running environment; the
child processes of ``sitk``, ``ants`` and ``dipy`` read the cached subject and do not import
``aslprep_lite``.

Usage (engines that cannot be imported are skipped with a line)::

    # the package's own pipeline (the default engine)
    .venv/bin/python benchmarks/bench_anatomy.py
    .venv/bin/python benchmarks/bench_anatomy.py --engines pipeline,sitk,dipy
    # sitk (the project's own environment; also lays out the template, see below)
    .venv/bin/python benchmarks/bench_anatomy.py --engines sitk
    .venv/bin/python -c "import aslprep_lite.templates as t; t.layout_embedded_home('/tmp/tf')"
    # ants (a separate venv: pip install antspyx nibabel; antspyx pins numpy/scipy)
    /tmp/venv_ants/bin/python benchmarks/bench_anatomy.py --engines ants \\
        --template-dir /tmp/tf/tpl-MNI152NLin2009aSym
    # dipy (a venv with SimpleITK, dipy, nibabel)
    /tmp/venv_sd/bin/python benchmarks/bench_anatomy.py --engines dipy \\
        --template-dir /tmp/tf/tpl-MNI152NLin2009aSym

Options: ``--workdir`` (cache of the synthetic subject, reused across runs and venvs),
``--threads 2``, ``--seed 0``, ``--reg-res 2``, ``--max-disp 5``,
``--ants-transform antsRegistrationSyNQuick[s]``.

Targets (from the issue): anatomy plus normalization ≤ 180 s wall and ≤ 3 GB peak RSS on two
cores. This is a measurement script, so the exit status is 0 unless a child process fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

TPL = "tpl-MNI152NLin2009aSym_res-{res}_{suffix}.nii.gz"
#: Recorded in truth.json: a cached subject made by another generator is made again.
GENERATOR = "aslprep_lite.synthetic_anatomy 1"
ENGINES = {
    "pipeline": ("aslprep_lite", "SimpleITK", "dipy"),
    "sitk": ("SimpleITK",),
    "ants": ("ants",),
    "dipy": ("SimpleITK", "dipy"),
}
TARGET_WALL_S = 180.0
TARGET_RSS_MB = 3072.0


def _set_threads(threads: int) -> None:
    """Limit BLAS, OpenMP and ITK threads and the CPU affinity (before imports)."""
    for name in (
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
    ):
        os.environ[name] = str(threads)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def _rss_mb() -> float:
    """Peak resident set size of this process so far, in MB.

    ``VmHWM`` where available: Linux carries ``ru_maxrss`` over ``fork``/``exec``, so a child
    started after the parent built the subject would inherit the parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Recorder:
    """Wall time and cumulative peak RSS per pipeline step."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    @contextmanager
    def step(self, name: str):
        """Time the enclosed block as step ``name``."""
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.steps.append(
            {
                "step": name,
                "wall_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - c0,
                "rss_mb": _rss_mb(),
            }
        )
        print(f"  {name}: {self.steps[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Synthetic subject
# --------------------------------------------------------------------------------------------


def template_files(template_dir: Path, res: int) -> dict[str, Path]:
    """Paths of the template's T1w, brain mask, GM and WM maps at ``res``."""
    names = {
        "t1w": "T1w",
        "mask": "desc-brain_mask",
        "gm": "label-GM_probseg",
        "wm": "label-WM_probseg",
    }
    return {k: template_dir / TPL.format(res=res, suffix=v) for k, v in names.items()}


def _synthetic_anatomy():
    """``aslprep_lite.synthetic_anatomy``, from the source tree when it is not installed."""
    if importlib.util.find_spec("aslprep_lite") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import aslprep_lite.synthetic_anatomy as module

    return module


def make_subject(template_dir: Path, workdir: Path, seed: int, max_disp: float) -> None:
    """Write the synthetic subject, its truth and the template helper images to ``workdir``."""
    import nibabel as nb
    import numpy as np
    from nibabel.affines import apply_affine
    from scipy import ndimage

    synthetic_anatomy = _synthetic_anatomy()
    spec = synthetic_anatomy.AnatomySpec(
        seed=seed, t1w_zooms=(1.0, 1.0, 1.0), max_disp_mm=max_disp, template_res=1
    )
    anatomy = synthetic_anatomy.make_anatomy(spec, template_dir=template_dir)
    subj_aff = anatomy.affine
    brain = anatomy.brain_mask

    workdir.mkdir(parents=True, exist_ok=True)
    nb.Nifti1Image(np.asarray(anatomy.t1w.dataobj), subj_aff).to_filename(workdir / "sub_T1w.nii")
    nb.Nifti1Image(brain.astype(np.uint8), subj_aff).to_filename(workdir / "truth_mask.nii.gz")
    nb.Nifti1Image(anatomy.dseg, subj_aff).to_filename(workdir / "truth_dseg.nii.gz")
    nb.Nifti1Image(anatomy.gm, subj_aff).to_filename(workdir / "truth_GM.nii.gz")
    # True template coordinates of the brain voxels, (3, n) in C order of the voxels.
    y_brain = anatomy.subject_to_template(apply_affine(subj_aff, np.argwhere(brain)))
    np.save(workdir / "truth_y_brain.npy", y_brain.T.astype(np.float32))
    del y_brain

    # Template helpers: CSF prior (res-1); dilated mask and world-coordinate images (res-reg).
    _, tpl_affine = anatomy.template_grid(1)
    nb.Nifti1Image(anatomy.template_map("csf", 1), tpl_affine).to_filename(
        workdir / "tpl_res-1_CSF.nii.gz"
    )
    for res in (1, 2):
        f = template_files(template_dir, res)
        img = nb.load(f["mask"])
        dil = ndimage.binary_dilation(
            np.asarray(img.dataobj) > 0, iterations=max(1, round(4 / res))
        )
        nb.Nifti1Image(dil.astype(np.uint8), img.affine).to_filename(
            workdir / f"tpl_res-{res}_dilmask.nii.gz"
        )
        ijk_t = np.indices(img.shape, dtype=np.float32).reshape(3, -1)
        xyz = img.affine[:3, :3] @ ijk_t + img.affine[:3, 3:4]
        for axis in range(3):
            nb.Nifti1Image(
                xyz[axis].reshape(img.shape).astype(np.float32), img.affine
            ).to_filename(workdir / f"tpl_res-{res}_coord{axis}.nii.gz")
    meta = {
        "generator": GENERATOR,
        "seed": seed,
        "scales": anatomy.scales.tolist(),
        "angles_deg": anatomy.angles_deg.tolist(),
        "shift_mm": anatomy.shift.tolist(),
        "max_disp_mm": max_disp,
        "shape": list(anatomy.shape),
        "axcodes": "".join(nb.aff2axcodes(subj_aff)),
        "brain_voxels": int(brain.sum()),
    }
    (workdir / "truth.json").write_text(json.dumps(meta, indent=1))


# --------------------------------------------------------------------------------------------
# Shared helpers of the engines
# --------------------------------------------------------------------------------------------


def dice(a, b) -> float:
    """Dice coefficient of two boolean arrays."""
    import numpy as np

    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def em_segment(intensity, mask, priors, iterations: int = 15, prior_weight: float = 1.0):
    """Three-class Gaussian-mixture EM inside ``mask`` with spatial priors (CSF, GM, WM).

    Parameters
    ----------
    intensity : ndarray
        Bias-corrected T1w, shape (X, Y, Z).
    mask : ndarray of bool
        Brain mask, same shape.
    priors : sequence of ndarray
        CSF, GM and WM prior probabilities, same shape.
    iterations : int
        EM iterations.
    prior_weight : float
        Exponent of the priors in the posterior.

    Returns
    -------
    ndarray of uint8
        Labels: 0 outside the mask, 1 CSF, 2 GM, 3 WM.
    """
    import numpy as np

    x = intensity[mask].astype(np.float64)
    x /= np.median(x)
    p = np.stack([np.asarray(pr[mask], np.float64) for pr in priors], axis=1) + 1e-3
    p /= p.sum(axis=1, keepdims=True)
    prior = p**prior_weight
    post = p
    for _ in range(iterations):
        w = post.sum(axis=0)
        mu = (post * x[:, None]).sum(axis=0) / w
        var = (post * (x[:, None] - mu) ** 2).sum(axis=0) / w + 1e-6
        frac = w / w.sum()
        lik = frac * np.exp(-0.5 * (x[:, None] - mu) ** 2 / var) / np.sqrt(var)
        post = lik * prior
        post /= post.sum(axis=1, keepdims=True) + 1e-300
    labels = np.zeros(mask.shape, np.uint8)
    labels[mask] = 1 + np.argmax(post, axis=1).astype(np.uint8)
    return labels


def _map_brain_points(workdir: Path, truth_mask, mapping):
    """``mapping`` applied to the world points of the true brain voxels: (3, n), C order."""
    import nibabel as nb
    import numpy as np

    affine = nb.load(workdir / "truth_mask.nii.gz").affine
    ijk = np.argwhere(truth_mask)  # C order, as truth_y_brain.npy
    out = np.empty((3, len(ijk)), np.float32)
    for start in range(0, len(ijk), 1 << 20):  # chunks bound the memory
        part = ijk[start : start + (1 << 20)].astype(np.float64)
        points = part @ affine[:3, :3].T + affine[:3, 3]
        out[:, start : start + len(part)] = np.asarray(mapping(points)).T
    return out


def evaluate(workdir: Path, result: dict) -> dict:
    """Accuracy of an engine's outputs vs the truth.

    ``result`` holds ``mask``, ``dseg`` (labels 1 CSF, 2 GM, 3 WM, as the truth), ``gm`` (the
    template GM prior on the subject grid) and either ``coords`` (three images of the template
    world coordinates on the subject grid) or ``mapping`` (a callable taking subject world
    points (n, 3) to template points); optionally ``coords_affine`` or ``mapping_affine``
    for the affine stage alone.
    """
    import nibabel as nb
    import numpy as np

    truth_mask = np.asarray(nb.load(workdir / "truth_mask.nii.gz").dataobj) > 0
    truth_dseg = np.asarray(nb.load(workdir / "truth_dseg.nii.gz").dataobj)
    truth_gm = np.asarray(nb.load(workdir / "truth_GM.nii.gz").dataobj) > 0.5
    y_true = np.load(workdir / "truth_y_brain.npy")
    if "mapping" in result:  # a callable: subject world points (n, 3) -> template points
        y_est = _map_brain_points(workdir, truth_mask, result["mapping"])
    else:
        y_est = np.stack([c[truth_mask] for c in result["coords"]])
    epe = np.linalg.norm(y_est - y_true, axis=0)
    extra = {}
    if "mapping_affine" in result:  # the affine stage alone, for reference
        y_aff = _map_brain_points(workdir, truth_mask, result["mapping_affine"])
        extra["epe_affine_mm"] = float(np.linalg.norm(y_aff - y_true, axis=0).mean())
    elif "coords_affine" in result:
        y_aff = np.stack([c[truth_mask] for c in result["coords_affine"]])
        extra["epe_affine_mm"] = float(np.linalg.norm(y_aff - y_true, axis=0).mean())
    return extra | {
        "dice_brain": dice(result["mask"], truth_mask),
        "dice_gm": dice(result["dseg"] == 2, truth_dseg == 2),
        "dice_wm": dice(result["dseg"] == 3, truth_dseg == 3),
        "dice_tpl_gm": dice(result["gm"] > 0.5, truth_gm),
        "epe_mean_mm": float(epe.mean()),
        "epe_p95_mm": float(np.percentile(epe, 95)),
    }


# --------------------------------------------------------------------------------------------
# SimpleITK pieces (engines sitk and dipy)
# --------------------------------------------------------------------------------------------


def _sitk_to_array(img):
    """SimpleITK image -> numpy array in NIfTI (i, j, k) order."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def sitk_n4(img, shrink: int = 4):
    """N4 on a shrunk copy (head mask by Otsu), bias field evaluated at full resolution."""
    import SimpleITK as sitk

    head = sitk.OtsuThreshold(img, 0, 1, 200)
    small = sitk.Shrink(img, [shrink] * 3)
    small_mask = sitk.Shrink(head, [shrink] * 3)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([50, 50, 50, 50])
    n4.Execute(small, small_mask)
    log_bias = n4.GetLogBiasFieldAsImage(img)
    return sitk.Cast(img / sitk.Exp(log_bias), sitk.sitkFloat32)


def sitk_affine(fixed, moving, fixed_mask):
    """Rigid then affine (Mattes MI) of ``moving`` (subject) to ``fixed`` (template).

    Returns the affine mapping template points to subject points.
    """
    import SimpleITK as sitk

    def method(iterations):
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.2, 0)
        reg.SetMetricFixedMask(fixed_mask)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=2.0, minStep=1e-3, numberOfIterations=iterations
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2, 1, 0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        return reg

    rigid = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    reg = method(100)
    reg.SetInitialTransform(rigid, inPlace=True)
    reg.Execute(fixed, moving)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    reg = method(100)
    reg.SetInitialTransform(affine, inPlace=True)
    reg.Execute(fixed, moving)
    return affine


def sitk_bspline(subject, template, affine, subject_mask):
    """B-spline refinement with the subject as fixed image; returns subject -> template."""
    import SimpleITK as sitk

    inverse = affine.GetInverse()
    mesh = [6, 6, 6]
    bspline = sitk.BSplineTransformInitializer(subject, mesh, 3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, 0)
    reg.SetMetricFixedMask(subject_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsGradientDescentLineSearch(
        5.0, 50, convergenceMinimumValue=1e-4, convergenceWindowSize=5
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetMovingInitialTransform(inverse)
    reg.SetInitialTransformAsBSpline(bspline, inPlace=True, scaleFactors=[1, 2])
    reg.SetShrinkFactorsPerLevel([4, 2])
    reg.SetSmoothingSigmasPerLevel([2, 1])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.Execute(subject, template)
    return sitk.CompositeTransform([inverse, bspline])


def _read_tpl(workdir: Path, template_dir: Path, res: int):
    """Template images for SimpleITK: T1w at ``res``, res-1 mask/GM/WM/CSF, helpers."""
    import SimpleITK as sitk

    f1 = template_files(template_dir, 1)
    fr = template_files(template_dir, res)
    rd = sitk.ReadImage
    return {
        "t1w": rd(str(fr["t1w"]), sitk.sitkFloat32),
        "dilmask": rd(str(workdir / f"tpl_res-{res}_dilmask.nii.gz"), sitk.sitkUInt8),
        "mask": rd(str(f1["mask"]), sitk.sitkFloat32),
        "gm": rd(str(f1["gm"]), sitk.sitkFloat32),
        "wm": rd(str(f1["wm"]), sitk.sitkFloat32),
        "csf": rd(str(workdir / "tpl_res-1_CSF.nii.gz"), sitk.sitkFloat32),
        "coords": [
            rd(str(workdir / f"tpl_res-{res}_coord{a}.nii.gz"), sitk.sitkFloat32) for a in range(3)
        ],
    }


def _sitk_finish(rec, n4, tpl, transform) -> dict:
    """Warp template mask and priors with ``transform`` (subject -> template), EM, coords."""
    import SimpleITK as sitk

    def warp(img):
        return _sitk_to_array(sitk.Resample(img, n4, transform, sitk.sitkLinear, 0.0))

    with rec.step("warp mask+priors"):
        mask = warp(tpl["mask"]) > 0.5
        priors = [warp(tpl[k]) for k in ("csf", "gm", "wm")]
    with rec.step("segmentation (EM)"):
        dseg = em_segment(_sitk_to_array(n4), mask, priors)
    coords = [warp(c) for c in tpl["coords"]]  # untimed: evaluation only
    return {"mask": mask, "dseg": dseg, "gm": priors[1], "coords": coords}


def run_sitk(workdir: Path, template_dir: Path, opts, rec: Recorder) -> dict:
    """Pipeline A: SimpleITK N4, rigid/affine, B-spline, EM."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(opts.threads)
    img = sitk.ReadImage(str(workdir / "sub_T1w.nii"), sitk.sitkFloat32)
    tpl = _read_tpl(workdir, template_dir, opts.reg_res)
    with rec.step("N4"):
        n4 = sitk_n4(img)
    with rec.step("affine"):
        affine = sitk_affine(tpl["t1w"], n4, tpl["dilmask"])
    with rec.step("B-spline"):
        subj_mask = sitk.Resample(
            tpl["dilmask"], n4, affine.GetInverse(), sitk.sitkNearestNeighbor, 0
        )
        transform = sitk_bspline(n4, tpl["t1w"], affine, subj_mask)
    out = _sitk_finish(rec, n4, tpl, transform)
    out["coords_affine"] = [
        _sitk_to_array(sitk.Resample(c, n4, affine.GetInverse(), sitk.sitkLinear, 0.0))
        for c in tpl["coords"]
    ]
    return out


def run_dipy(workdir: Path, template_dir: Path, opts, rec: Recorder) -> dict:
    """Pipeline C: SimpleITK N4 and affine, dipy SyN (CC), EM."""
    import nibabel as nb
    import numpy as np
    import SimpleITK as sitk
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(opts.threads)
    img = sitk.ReadImage(str(workdir / "sub_T1w.nii"), sitk.sitkFloat32)
    tpl = _read_tpl(workdir, template_dir, opts.reg_res)
    subj_aff = nb.load(workdir / "sub_T1w.nii").affine
    with rec.step("N4"):
        n4 = sitk_n4(img)
    with rec.step("affine"):
        affine = sitk_affine(tpl["t1w"], n4, tpl["dilmask"])
    with rec.step("dipy SyN"):
        subj_mask = sitk.Resample(
            tpl["dilmask"], n4, affine.GetInverse(), sitk.sitkNearestNeighbor, 0
        )
        moving = _sitk_to_array(n4 * sitk.Cast(subj_mask, sitk.sitkFloat32)).astype(np.float64)
        fr = template_files(template_dir, opts.reg_res)
        static_img = nb.load(fr["t1w"])
        static = np.asarray(static_img.dataobj, np.float64)
        lps = np.diag([-1.0, -1.0, 1.0, 1.0])
        pre = np.eye(4)
        pre[:3, :3] = np.asarray(affine.GetMatrix()).reshape(3, 3)
        centre = np.asarray(affine.GetCenter())
        pre[:3, 3] = np.asarray(affine.GetTranslation()) + centre - pre[:3, :3] @ centre
        prealign = lps @ pre @ lps  # template RAS -> subject RAS
        sdr = SymmetricDiffeomorphicRegistration(
            CCMetric(3, sigma_diff=2.0, radius=2), level_iters=[10, 10, 5]
        )
        mapping = sdr.optimize(static, moving, static_img.affine, subj_aff, prealign=prealign)

    shape = tuple(int(s) for s in _sitk_to_array(n4).shape)

    def warp(path_or_img):
        im = nb.load(path_or_img)
        return mapping.transform_inverse(
            np.asarray(im.dataobj, np.float64),
            interpolation="linear",
            image_world2grid=np.linalg.inv(im.affine),
            out_shape=shape,
            out_grid2world=subj_aff,
        )

    f1 = template_files(template_dir, 1)
    with rec.step("warp mask+priors"):
        mask = warp(f1["mask"]) > 0.5
        priors = [warp(workdir / "tpl_res-1_CSF.nii.gz"), warp(f1["gm"]), warp(f1["wm"])]
    with rec.step("segmentation (EM)"):
        dseg = em_segment(_sitk_to_array(n4), mask, priors)
    coords = [warp(workdir / f"tpl_res-{opts.reg_res}_coord{a}.nii.gz") for a in range(3)]
    return {"mask": mask, "dseg": dseg, "gm": priors[1], "coords": coords}


def run_ants(workdir: Path, template_dir: Path, opts, rec: Recorder) -> dict:
    """Pipeline B: antspyx N4, registration (``--ants-transform``), Atropos."""
    import ants
    import numpy as np

    img = ants.image_read(str(workdir / "sub_T1w.nii"))
    f1 = template_files(template_dir, 1)
    fr = template_files(template_dir, opts.reg_res)
    tpl = ants.image_read(str(fr["t1w"]))
    dilmask = ants.image_read(str(workdir / f"tpl_res-{opts.reg_res}_dilmask.nii.gz"))
    with rec.step("N4"):
        head = ants.threshold_image(img, "Otsu", 1)
        n4 = ants.n4_bias_field_correction(img, mask=head, shrink_factor=4)
    with rec.step(f"registration {opts.ants_transform}"):
        kwargs = {"type_of_transform": opts.ants_transform}
        if opts.ants_transform == "SyNCC-tuned":  # SyN, CC radius 2, 2 mm level iterated too
            kwargs = {
                "type_of_transform": "SyN",
                "syn_metric": "CC",
                "syn_sampling": 2,
                "reg_iterations": (40, 20, 10),
            }
        reg = ants.registration(fixed=tpl, moving=n4, mask=dilmask, **kwargs)

    def warp(path):
        return ants.apply_transforms(
            fixed=n4,
            moving=ants.image_read(str(path)),
            transformlist=reg["invtransforms"],
            whichtoinvert=[True, False][: len(reg["invtransforms"])],
            interpolator="linear",
        )

    with rec.step("warp mask+priors"):
        mask_img = warp(f1["mask"])
        mask = mask_img.numpy() > 0.5
        priors = [warp(workdir / "tpl_res-1_CSF.nii.gz"), warp(f1["gm"]), warp(f1["wm"])]
    with rec.step("segmentation (Atropos)"):
        seg = ants.atropos(
            a=n4,
            x=ants.from_numpy(
                mask.astype(np.float32),
                origin=n4.origin,
                spacing=n4.spacing,
                direction=n4.direction,
            ),
            i=priors,
            m="[0.2,1x1x1]",
            c="[5,0]",
            priorweight=0.25,
        )
        dseg = seg["segmentation"].numpy().astype(np.uint8)
    coords = [warp(workdir / f"tpl_res-{opts.reg_res}_coord{a}.nii.gz").numpy() for a in range(3)]
    return {"mask": mask, "dseg": dseg, "gm": priors[1].numpy(), "coords": coords}


# --------------------------------------------------------------------------------------------
# The package's own pipeline (engine pipeline)
# --------------------------------------------------------------------------------------------

#: Package labels (1 GM, 2 WM, 3 CSF: fMRIPrep's dseg) -> the truth's (1 CSF, 2 GM, 3 WM).
PACKAGE_TO_TRUTH_LABELS = (0, 2, 3, 1)


class _Timed:
    """Wrap functions so that each call's wall time is added to a named step of a Recorder.

    Steps nest: a call made inside another wrapped call is recorded as ``outer / inner`` (so
    ``normalize / affine`` is part of ``normalize``). Calls of the same step are summed, in the
    order first seen; the RSS is the cumulative peak after the step's last call.
    """

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.stack: list[str] = []
        self.index: dict[str, dict] = {}
        self.undo: list[tuple[object, str, object]] = []

    def wrap(self, owner, attr: str, label: str, hook=None) -> None:
        """Replace ``owner.attr`` by a timed wrapper (``hook(args, kwargs)`` sees the call)."""
        original = getattr(owner, attr)
        timed = self

        def wrapper(*args, **kwargs):
            if hook is not None:
                hook(args, kwargs)
            timed.stack.append(label)
            name = " / ".join(timed.stack)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                timed.stack.pop()
                timed._add(name, wall, cpu)

        self.undo.append((owner, attr, original))
        setattr(owner, attr, wrapper)

    def _add(self, name: str, wall: float, cpu: float) -> None:
        entry = self.index.get(name)
        if entry is None:
            entry = {"step": name, "wall_s": 0.0, "cpu_s": 0.0, "rss_mb": 0.0, "calls": 0}
            self.index[name] = entry
            self.rec.steps.append(entry)
        entry["wall_s"] += wall
        entry["cpu_s"] += cpu
        entry["calls"] += 1
        entry["rss_mb"] = _rss_mb()
        print(f"  {name}: {wall:.1f} s", file=sys.stderr, flush=True)

    def restore(self) -> None:
        """Put the original functions back."""
        for owner, attr, original in reversed(self.undo):
            setattr(owner, attr, original)
        self.undo.clear()


def run_pipeline(workdir: Path, template_dir: Path, opts, rec: Recorder) -> dict:
    """The package itself: ``aslprep_lite.quant.anatomy.preprocess_t1w``, as the node runs it.

    The T1w and the template are read as ``PreprocessT1w`` reads them (``_load`` and
    ``load_template`` with the res-1 T1w, mask, GM and WM, i.e. CSF = mask - GM - WM), then
    ``preprocess_t1w`` runs unchanged; its parts (N4, affine, SyN, readout of the
    deformations, warps of the mask and priors, EM, the QC correlation) are timed by wrapping
    the functions it calls. ``--reg-res`` does not apply: the package registers at
    ``REGISTRATION_MM``.
    """
    import numpy as np
    from dipy.align.imwarp import DiffeomorphicMap, SymmetricDiffeomorphicRegistration

    from aslprep_lite.config import RANDOM_SEED
    from aslprep_lite.interfaces import anatomical as nodes
    from aslprep_lite.quant import anatomy as anat
    from aslprep_lite.quant.warps import apply_affine

    f1 = template_files(template_dir, 1)
    files = {"T1w": f1["t1w"], "mask": f1["mask"], "GM": f1["gm"], "WM": f1["wm"]}
    captured: dict = {}
    timed = _Timed(rec)
    timed.wrap(anat, "bias_correct", "N4")
    timed.wrap(anat, "normalize", "normalize")
    timed.wrap(anat, "register_affine", "affine")
    timed.wrap(SymmetricDiffeomorphicRegistration, "optimize", "SyN (dipy)")
    timed.wrap(DiffeomorphicMap, "transform_points", "deformation readout")
    timed.wrap(DiffeomorphicMap, "transform_points_inverse", "deformation readout")
    timed.wrap(anat, "resample_through", "resample_through (warps)")
    timed.wrap(anat, "_largest_component", "mask: largest component")
    timed.wrap(anat, "segment", "segmentation (EM)", hook=lambda a, k: captured.update(gm=a[2][0]))
    timed.wrap(anat, "discrete_segmentation", "segmentation (EM)")
    timed.wrap(anat, "normalization_correlation", "QC correlation")
    try:
        with rec.step("read T1w + template"):
            data, affine = nodes._load(str(workdir / "sub_T1w.nii"))
            template = nodes.load_template({k: str(v) for k, v in files.items()})
        with rec.step("preprocess_t1w (whole)"):
            # The command line's seed (--seed makes the subject): a seed of 0 would be
            # SimpleITK's sitkWallClock, i.e. a different metric sampling at every run.
            result = anat.preprocess_t1w(data, affine, template, seed=RANDOM_SEED)
    finally:
        timed.restore()
    del template
    norm = result.normalization
    labels = np.asarray(PACKAGE_TO_TRUTH_LABELS, np.uint8)[result.dseg]
    template_to_subject = np.asarray(norm.affine, float)  # the affine stage alone
    subject_to_template = np.linalg.inv(template_to_subject)
    return {
        "mask": result.mask,
        "dseg": labels,
        "gm": captured["gm"],
        "mapping": norm.to_template,
        "mapping_affine": lambda points: apply_affine(subject_to_template, points),
        "metrics": result.metrics,
    }


RUNNERS = {"pipeline": run_pipeline, "sitk": run_sitk, "ants": run_ants, "dipy": run_dipy}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _worker(opts) -> None:
    """Run one engine in this (child) process and print its JSON record on stdout."""
    workdir = Path(opts.workdir)
    rec = Recorder()
    load_before = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    out = RUNNERS[opts.worker](workdir, Path(opts.template_dir), opts, rec)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _rss_mb()
    load_after = os.getloadavg()
    acc = evaluate(workdir, out)
    record = {
        "engine": opts.worker,
        "steps": rec.steps,
        "total_wall_s": total,
        "total_cpu_s": total_cpu,
        "peak_rss_mb": peak,
        "accuracy": acc,
        "load_before": load_before,
        "load": load_after,
    }
    if "metrics" in out:
        record["metrics"] = out["metrics"]
    if opts.worker == "ants":
        record["engine"] = f"ants {opts.ants_transform}"
    print("RESULT " + json.dumps(record), flush=True)


def _template_dir(opts) -> Path:
    """The template directory: ``--template-dir`` or aslprep_lite's embedded layout."""
    if opts.template_dir:
        return Path(opts.template_dir)
    from aslprep_lite.templates import layout_embedded_home

    home = Path(layout_embedded_home(str(Path(opts.workdir) / "templateflow")))
    return home / "tpl-MNI152NLin2009aSym"


def _print_table(records: list[dict]) -> None:
    """Print the per-step and per-engine tables."""
    print(f"\n{'engine / step':<64}{'wall s':>8}{'CPU s':>8}{'peak RSS MB':>13}")
    for r in records:
        for s in r["steps"]:
            calls = f" ({s['calls']} calls)" if s.get("calls", 1) > 1 else ""
            name = f"{r['engine']} / {s['step']}{calls}"
            cpu = f"{s['cpu_s']:>8.1f}" if "cpu_s" in s else f"{'':>8}"
            print(f"{name:<64}{s['wall_s']:>8.1f}{cpu}{s['rss_mb']:>13.0f}")
        cpu = f"{r['total_cpu_s']:>8.1f}" if "total_cpu_s" in r else f"{'':>8}"
        total = r["engine"] + " / TOTAL"
        print(f"{total:<64}{r['total_wall_s']:>8.1f}{cpu}{r['peak_rss_mb']:>13.0f}")
    head = ("engine", "wall s", "RSS MB", "brain", "GM", "WM", "tplGM", "EPE mm", "p95", "ok")
    print("\n{:<34}{:>8}{:>8}{:>7}{:>7}{:>7}{:>7}{:>8}{:>6}{:>4}".format(*head))
    for r in records:
        a = r["accuracy"]
        ok = r["total_wall_s"] <= TARGET_WALL_S and r["peak_rss_mb"] <= TARGET_RSS_MB
        print(
            f"{r['engine']:<34}{r['total_wall_s']:>8.1f}{r['peak_rss_mb']:>8.0f}"
            f"{a['dice_brain']:>7.3f}{a['dice_gm']:>7.3f}{a['dice_wm']:>7.3f}"
            f"{a['dice_tpl_gm']:>7.3f}{a['epe_mean_mm']:>8.2f}{a['epe_p95_mm']:>6.1f}"
            f"{'yes' if ok else 'no':>4}"
        )
    for r in records:
        before, after = r.get("load_before"), r.get("load")
        if before and after:
            print(
                f"{r['engine']}: load average (1 min) {before[0]:.2f} before, {after[0]:.2f} after"
            )
        if "metrics" in r:
            print(f"{r['engine']}: metrics {r['metrics']}")
        if "epe_affine_mm" in r["accuracy"]:
            epe = r["accuracy"]["epe_affine_mm"]
            print(f"{r['engine']}: mean EPE after the affine stage alone {epe:.2f} mm")
    print(
        "\nDice: brain mask, GM/WM of the discrete segmentation, template GM (>0.5) warped to"
        " the subject; EPE: mean and 95th percentile endpoint error of subject -> template over"
        f" true brain voxels. ok: ≤ {TARGET_WALL_S:.0f} s and ≤ {TARGET_RSS_MB:.0f} MB. CPU s:"
        " user + system time of the engine's process (load-independent for one thread)."
    )


def main(argv: list[str] | None = None) -> int:
    """Build (or reuse) the synthetic subject, run the engines, print the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default="pipeline")
    p.add_argument("--workdir", default="/tmp/bench_anatomy")
    p.add_argument("--template-dir", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reg-res", type=int, default=2, choices=(1, 2))
    p.add_argument("--max-disp", type=float, default=5.0)
    p.add_argument("--ants-transform", default="antsRegistrationSyNQuick[s]")
    p.add_argument("--regenerate", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    _set_threads(opts.threads)
    if opts.worker:
        _worker(opts)
        return 0

    workdir = Path(opts.workdir)
    template_dir = _template_dir(opts)
    meta_file = workdir / "truth.json"
    stale = not meta_file.exists() or tuple(
        json.loads(meta_file.read_text()).get(k) for k in ("generator", "seed", "max_disp_mm")
    ) != (GENERATOR, opts.seed, opts.max_disp)
    if opts.regenerate or stale:
        t0 = time.perf_counter()
        make_subject(template_dir, workdir, opts.seed, opts.max_disp)
        print(f"synthetic subject written to {workdir} in {time.perf_counter() - t0:.1f} s")
    print("truth:", (workdir / "truth.json").read_text().replace("\n", ""))
    records = []
    status = 0
    for engine in opts.engines.split(","):
        if engine not in ENGINES:
            print(f"skip {engine}: unknown engine (choose from {', '.join(ENGINES)})")
            continue
        missing = [m for m in ENGINES[engine] if importlib.util.find_spec(m) is None]
        if missing:
            print(f"skip {engine}: {', '.join(missing)} not importable in {sys.executable}")
            continue
        print(f"running {engine} (load average {os.getloadavg()[0]:.2f}) ...", flush=True)
        cmd = [sys.executable, __file__, "--worker", engine, "--workdir", str(workdir)]
        cmd += ["--template-dir", str(template_dir), "--threads", str(opts.threads)]
        cmd += ["--reg-res", str(opts.reg_res), "--ants-transform", opts.ants_transform]
        cmd += ["--seed", str(opts.seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{engine} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            status = 1
            continue
        records.append(json.loads(lines[-1][len("RESULT ") :]))
        print(f"  load average after: {records[-1]['load']}")
    if records:
        _print_table(records)
        out = workdir / f"results_{'_'.join(r['engine'].split()[0] for r in records)}.json"
        out.write_text(json.dumps(records, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
