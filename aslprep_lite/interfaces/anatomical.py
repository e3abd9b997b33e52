"""Nodes of the anatomy: T1w preprocessing, normalization, coregistration, resampling.

Thin wrappers over :mod:`aslprep_lite.quant.anatomy` and :mod:`aslprep_lite.quant.warps`.
Mappings travel between nodes as files: deformations as 4D NIfTI (``(X, Y, Z, 3)`` world
coordinates) and affines as ``.npy`` 4×4 RAS matrices, reference points to moving points.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from aslprep_lite.bids.derivatives import BY_KEY, RESAMPLED_KEYS
from aslprep_lite.errors import AslprepError
from aslprep_lite.images import load_image, write_nifti
from aslprep_lite.quant import anatomy as anat
from aslprep_lite.quant import pvc as pvc_model
from aslprep_lite.quant import tissue as tissue_model
from aslprep_lite.quant.m0 import brain_mask
from aslprep_lite.quant.warps import Deformation, coarse_grid, resample_many, resample_through

_TISSUE_FILES = ("gm_probseg", "wm_probseg", "csf_probseg")


def _load(path: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 data and the affine (the project's reader: one line for damaged files)."""
    data, img = load_image(path)
    return data, np.asarray(img.affine, float)


def _save(data: np.ndarray, affine: np.ndarray, path: str, dtype=np.float32) -> str:
    """Write through the project's writer: no gzip time stamp, identical bytes run to run."""
    img = nb.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.header.set_xyzt_units("mm")
    write_nifti(img, path)
    return os.path.abspath(path)


def load_template(files: dict[str, str], *, priors: bool = True) -> anat.Template:
    """A :class:`~aslprep_lite.quant.anatomy.Template` from its files by role.

    The registration image comes from the finest files given (``registration_T1w`` and
    ``registration_mask`` when present, else ``T1w`` and ``mask``); tissue priors from ``GM``,
    ``WM`` (and ``CSF``), resampled onto that grid when they are on another one. Without
    ``priors`` (a registration only) they are not read: resampling the res-2 maps onto the res-1
    grid took 2.5 s of a T1w-free registration's 5.7 s.
    """
    t1w_file = files.get("registration_T1w", files["T1w"])
    t1w, affine = _load(t1w_file)
    mask, _ = _load(files.get("registration_mask", files["mask"]))
    if not priors:
        return anat.Template(t1w.astype(np.float32), mask > 0.5, None, np.asarray(affine, float))

    def on_grid(role: str) -> np.ndarray | None:
        if role not in files:
            return None
        data, aff = _load(files[role])
        if data.shape == t1w.shape and np.allclose(aff, affine):
            return data
        return resample_through(data, aff, np.eye(4), t1w.shape, affine)

    gm, wm = on_grid("GM"), on_grid("WM")
    if gm is None or wm is None:  # a template without tissue maps: priors are flat in the mask
        gm = wm = (mask > 0.5).astype(np.float32) / 3
    return anat.make_template(t1w, mask, gm, wm, on_grid("CSF"), affine)


class _SourceInputSpec(BaseInterfaceInputSpec):
    source_file = traits.Str(
        mandatory=True, desc="the participant's BIDS file this node works for (named on failure)"
    )


class _NamedFailures(SimpleInterface):
    """A node whose failures name the participant's BIDS file, never a work-directory file.

    nipype's crash file keeps the traceback; the user gets one line naming ``source_file``
    (the T1w for the anatomy, the ASL or M0 file for a run), the step and the reason.
    Subclasses implement ``_run`` and set ``_step``.
    """

    _step = "processing"

    def _source(self) -> str:
        return self.inputs.source_file

    def _run_interface(self, runtime):
        try:
            return self._run(runtime)
        except AslprepError as err:
            if err.path is None or err.path == self._source():
                raise
            # a work-directory file (the M0 on the ASL grid, a tissue map): name the input
            reason = str(err)[len(f"{err.path}: ") :]
            raise AslprepError(reason, path=self._source()) from err
        except Exception as err:  # SimpleITK, dipy, numpy: a one-line reason, the input named
            detail = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            raise AslprepError(
                f"{self._step} failed ({detail}): check that the image holds a whole head at a "
                "usual resolution (details in the crash file of the working directory)",
                path=self._source(),
            ) from err

    def _run(self, runtime):  # pragma: no cover - every subclass defines it
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# T1w preprocessing and normalization
# --------------------------------------------------------------------------------------------
class _T1wFilesOutputSpec(TraitedSpec):
    t1w_preproc = File(exists=True)
    mask = File(exists=True)
    dseg = File(exists=True)
    gm_probseg = File(exists=True)
    wm_probseg = File(exists=True)
    csf_probseg = File(exists=True)
    record = traits.Dict(desc="sidecar fields of the anatomy")


class _AnatomyOutputSpec(_T1wFilesOutputSpec):
    to_template = File(exists=True, desc="deformation: T1w points -> template points")
    to_t1w = File(exists=True, desc="deformation: template points -> T1w points")
    normalization = traits.Dict(desc="the normalization's record (its transforms' sidecars)")


class _PreprocessInputSpec(BaseInterfaceInputSpec):
    t1w_file = File(exists=True, mandatory=True)
    template = traits.Str(mandatory=True, desc="TemplateFlow id of the template")
    template_files = traits.Dict(mandatory=True, desc="the template's files by role")
    seed = traits.Int(mandatory=True)


class PreprocessT1w(_NamedFailures):
    """N4, normalization, template-based brain mask, tissue classes of one T1w."""

    input_spec = _PreprocessInputSpec
    output_spec = _AnatomyOutputSpec
    _step = "T1w preprocessing (N4, normalization, segmentation)"

    def _source(self) -> str:
        return self.inputs.t1w_file  # the BIDS T1w itself

    def _run(self, runtime):
        data, affine = _load(self.inputs.t1w_file)
        data = data[..., 0] if data.ndim == 4 else data
        template = load_template(self.inputs.template_files)
        result = anat.preprocess_t1w(data, affine, template, seed=self.inputs.seed)
        cwd = runtime.cwd
        out = self._results
        out["t1w_preproc"] = _save(result.t1w, affine, os.path.join(cwd, "t1w_preproc.nii.gz"))
        out["mask"] = _save(result.mask, affine, os.path.join(cwd, "mask.nii.gz"), np.uint8)
        out["dseg"] = _save(result.dseg, affine, os.path.join(cwd, "dseg.nii.gz"), np.uint8)
        for name, prob in zip(_TISSUE_FILES, result.probseg, strict=True):
            out[name] = _save(prob, affine, os.path.join(cwd, f"{name}.nii.gz"))
        _save_normalization(result.normalization, cwd, out)
        normalization = _normalization_record(
            self.inputs.template,
            result.metrics["NormalizationCorrelation"],
            self.inputs.t1w_file,
        )
        out["normalization"] = normalization
        out["record"] = {
            "SkullStripped": False,
            "BiasFieldCorrection": "N4 (SimpleITK; Tustison et al. 2010)",
            "BrainExtraction": f"template brain mask of {self.inputs.template} brought to the "
            "T1w through the normalization",
            "Segmentation": "three-class Gaussian mixture (EM) with template tissue priors",
            "BrainVolume": round(result.metrics["BrainVolume"], 1),
            "Normalization": normalization,
        }
        return runtime


def _save_normalization(norm: anat.Normalization, cwd: str, out: dict) -> None:
    norm.to_template.to_nifti(os.path.join(cwd, "to_template.nii.gz"))
    norm.to_subject.to_nifti(os.path.join(cwd, "to_t1w.nii.gz"))
    out["to_template"] = os.path.join(cwd, "to_template.nii.gz")
    out["to_t1w"] = os.path.join(cwd, "to_t1w.nii.gz")


#: Quality gate of a normalization, on the correlation of the normalized T1w with the template
#: (:func:`~aslprep_lite.quant.anatomy.normalization_correlation`). Measured with
#: ``preprocess_t1w`` on 2 mm T1w images of :mod:`aslprep_lite.synthetic_anatomy`: good
#: normalizations 0.90, 0.90, 0.89 (seeds 0, 7, 3; the last session measured about 0.9 on the
#: synthetic participants and the example); uniform noise 0.02 (0.16 for the noise T1w of the
#: last session's report);
#: the seed-0 T1w drowned in Gaussian noise (sigma 30 % of its maximum) 0.62, blurred by a
#: 3-voxel Gaussian 0.56, replaced by smoothed noise inside its head 0.52. So: below 0.5 the
#: image is not a T1w head scan the template can be matched to, and the participant fails
#: rather than write misplaced outputs; from 0.5 to 0.8, a degraded image whose normalization
#: may be off (a warning); good normalizations keep a margin of 0.09 above 0.8.
NORMALIZATION_FAILED_CORRELATION = 0.5
NORMALIZATION_CORRELATION = 0.8


def _normalization_record(template: str, correlation: float, t1w_file: str) -> dict:
    """The record of one normalization, gated on its correlation with the template."""
    if correlation < NORMALIZATION_FAILED_CORRELATION:
        raise AslprepError(
            f"normalization of the T1w to {template} failed (correlation of the normalized "
            f"T1w with the template {correlation:.2f} < {NORMALIZATION_FAILED_CORRELATION}): "
            "check that the image is a T1w head scan, or leave it out with "
            '--bids-filter-file (e.g. {"t1w": {"acquisition": "none"}})',
            path=t1w_file,
        )
    record = {
        "Template": template,
        "Method": "affine (SimpleITK, Mattes mutual information) then symmetric "
        "diffeomorphic registration (dipy SyN, cross-correlation; Avants et al. 2008)",
        "Correlation": round(correlation, 4),
        "CorrelationThreshold": NORMALIZATION_CORRELATION,
    }
    if correlation < NORMALIZATION_CORRELATION:
        record["Warning"] = (
            f"normalization of the T1w to {template} may have failed (correlation with the "
            f"template {correlation:.2f} < {NORMALIZATION_CORRELATION}): check the outputs in "
            "template space"
        )
    return record


class _NormalizeInputSpec(_SourceInputSpec):
    t1w_preproc = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)
    template = traits.Str(mandatory=True)
    template_files = traits.Dict(mandatory=True)
    seed = traits.Int(mandatory=True)


class _NormalizeOutputSpec(TraitedSpec):
    to_template = File(exists=True)
    to_t1w = File(exists=True)
    record = traits.Dict()


class NormalizeT1w(_NamedFailures):
    """Normalization of the skull-stripped T1w to one more template."""

    input_spec = _NormalizeInputSpec
    output_spec = _NormalizeOutputSpec
    _step = "T1w normalization"

    def _run(self, runtime):
        t1w, affine = _load(self.inputs.t1w_preproc)
        mask = _load(self.inputs.mask)[0] > 0.5
        template = load_template(self.inputs.template_files, priors=False)
        norm = anat.normalize(t1w, affine, template, seed=self.inputs.seed, subject_mask=mask)
        _save_normalization(norm, runtime.cwd, self._results)
        correlation = anat.normalization_correlation(t1w * mask, affine, norm, template)
        self._results["record"] = _normalization_record(
            self.inputs.template, correlation, self.inputs.source_file
        )
        return runtime


class _PrecomputedInputSpec(BaseInterfaceInputSpec):
    t1w = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)
    dseg = File(exists=True, mandatory=True)
    probseg = traits.Dict(mandatory=True, desc="GM, WM, CSF probability maps")
    source = traits.Str(mandatory=True, desc="the derivatives folder")


class LoadPrecomputedAnatomy(SimpleInterface):
    """An sMRIPrep/fMRIPrep anatomy's T1w-space files, as :class:`PreprocessT1w` gives them."""

    input_spec = _PrecomputedInputSpec
    output_spec = _T1wFilesOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        out = self._results
        out["t1w_preproc"] = os.path.abspath(inputs.t1w)
        out["mask"] = os.path.abspath(inputs.mask)
        out["dseg"] = os.path.abspath(inputs.dseg)
        for name, tissue in zip(_TISSUE_FILES, anat.TISSUES, strict=True):
            out[name] = os.path.abspath(inputs.probseg[tissue])
        mask, affine = _load(inputs.mask)
        volume = float((mask > 0.5).sum() * abs(np.linalg.det(affine[:3, :3]))) / 1e3
        out["record"] = {"PrecomputedAnatomy": inputs.source, "BrainVolume": round(volume, 1)}
        return runtime


class _PrecomputedXfmInputSpec(BaseInterfaceInputSpec):
    t1w_preproc = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)
    to_template_xfm = File(exists=True, mandatory=True, desc="from-T1w_to-<tpl> (.h5)")
    from_template_xfm = File(exists=True, mandatory=True, desc="from-<tpl>_to-T1w (.h5)")
    template = traits.Str(mandatory=True)
    template_files = traits.Dict(mandatory=True)


class LoadPrecomputedTransforms(SimpleInterface):
    """A precomputed T1w ↔ template normalization, as :class:`NormalizeT1w` gives it."""

    input_spec = _PrecomputedXfmInputSpec
    output_spec = _NormalizeOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        t1w, affine = _load(inputs.t1w_preproc)
        template = load_template(inputs.template_files, priors=False)
        # ITK's from-T1w_to-<tpl> maps template points to T1w points, and the inverse file
        # T1w points to template points: evaluated on the grids the pipeline uses.
        try:
            to_t1w = Deformation.from_itk_file(
                inputs.to_template_xfm, template.reg_t1w.shape, template.reg_affine
            )
            shape, coarse = coarse_grid(t1w.shape, affine, anat.REGISTRATION_MM)
            to_template = Deformation.from_itk_file(inputs.from_template_xfm, shape, coarse)
        except RuntimeError as err:
            reason = " ".join(str(err).split())[-160:]
            raise AslprepError(
                f"cannot apply the transforms of {inputs.template} with SimpleITK: {reason}",
                path=inputs.to_template_xfm,
            ) from None
        norm = anat.Normalization(to_t1w, to_template, np.eye(4))
        _save_normalization(norm, runtime.cwd, self._results)
        mask = _load(inputs.mask)[0] > 0.5
        self._results["record"] = {
            "Template": inputs.template,
            "Method": "precomputed (read from --anat-derivatives)",
            "Correlation": round(
                anat.normalization_correlation(t1w * mask, affine, norm, template), 4
            ),
        }
        return runtime


class _WriteXfmInputSpec(_SourceInputSpec):
    to_template = File(exists=True, mandatory=True)
    to_t1w = File(exists=True, mandatory=True)


class _WriteXfmOutputSpec(TraitedSpec):
    to_template_xfm = File(exists=True, desc="from-T1w_to-<tpl>: template points -> T1w")
    from_template_xfm = File(exists=True, desc="from-<tpl>_to-T1w: T1w points -> template")


class DeformationsToItk(_NamedFailures):
    """The two deformations of a normalization as ITK ``.h5`` files, as fMRIPrep writes them."""

    input_spec = _WriteXfmInputSpec
    output_spec = _WriteXfmOutputSpec
    _step = "writing the T1w normalization as ITK transforms"

    def _run(self, runtime):
        forward = os.path.join(runtime.cwd, "from-T1w_to-template_xfm.h5")
        inverse = os.path.join(runtime.cwd, "from-template_to-T1w_xfm.h5")
        Deformation.from_nifti(self.inputs.to_t1w).to_itk_file(forward)
        Deformation.from_nifti(self.inputs.to_template).to_itk_file(inverse)
        self._results["to_template_xfm"] = forward
        self._results["from_template_xfm"] = inverse
        return runtime


# --------------------------------------------------------------------------------------------
# ASL run: coregistration, tissue on the ASL grid, resampling to the output spaces
# --------------------------------------------------------------------------------------------
class _CoregInputSpec(_SourceInputSpec):
    reference_file = File(exists=True, mandatory=True, desc="ASL reference (M0 or mean control)")
    asl_mask_file = File(exists=True, desc="its brain mask (default: Otsu of the reference)")
    t1w_file = File(exists=True, mandatory=True, desc="preprocessed T1w")
    t1w_mask_file = File(exists=True, mandatory=True)
    reference_name = traits.Str(mandatory=True, desc="what the reference is, for the record")
    seed = traits.Int(mandatory=True)


class _CoregOutputSpec(TraitedSpec):
    matrix_file = File(exists=True, desc="4x4 RAS: T1w points -> ASL points (.npy)")
    xfm_file = File(exists=True, desc="the same, ITK text transform (from-aslref_to-T1w)")
    record = traits.Dict()


#: Below this Dice the coregistration is not a misalignment but a failure (another field of
#: view, another subject's T1w): the run stops rather than write misplaced maps.
COREGISTRATION_FAILED_DICE = 0.5


class CoregisterAsl(_NamedFailures):
    """Rigid ASL → T1w coregistration, with its Dice quality figure and fallback."""

    input_spec = _CoregInputSpec
    output_spec = _CoregOutputSpec
    _step = "ASL to T1w coregistration"

    def _run(self, runtime):
        reference, ref_affine = _load(self.inputs.reference_file)
        if isdefined(self.inputs.asl_mask_file):
            asl_mask = _load(self.inputs.asl_mask_file)[0] > 0.5
        else:  # the mask of the M0 step, made the same way from this reference
            asl_mask = brain_mask(reference, np.linalg.norm(ref_affine[:3, :3], axis=0))
        t1w, t1w_affine = _load(self.inputs.t1w_file)
        t1w_mask = _load(self.inputs.t1w_mask_file)[0] > 0.5
        brain = np.where(t1w_mask, t1w, 0).astype(np.float32)
        matrix, record = anat.register_asl_to_anatomy(
            reference, ref_affine, asl_mask, brain, t1w_affine, t1w_mask, seed=self.inputs.seed
        )
        record["Reference"] = self.inputs.reference_name
        if record["Dice"] < COREGISTRATION_FAILED_DICE:
            raise AslprepError(
                f"ASL to T1w coregistration failed (Dice of the brain masks {record['Dice']} < "
                f"{COREGISTRATION_FAILED_DICE}, paths tried: {', '.join(record['Candidates'])}):"
                " check that the T1w is this participant's and covers the brain, or leave it "
                'out with --bids-filter-file (e.g. {"t1w": {"acquisition": "none"}})',
                path=self.inputs.source_file,
            )
        if record["Candidates"]["scanner geometry"] < COREGISTRATION_FAILED_DICE:
            record["Warning"] = (
                "the ASL and T1w images do not overlap in scanner coordinates (Dice "
                f"{record['Candidates']['scanner geometry']} from the headers): they were "
                "aligned by the centres of the brains; check that the T1w is this "
                "participant's"
            )
        elif record["Dice"] < anat.COREGISTRATION_DICE:
            record["Warning"] = (
                f"ASL to T1w coregistration may have failed (Dice {record['Dice']} < "
                f"{anat.COREGISTRATION_DICE}): check the outputs in T1w and template space"
            )
        self._results["matrix_file"] = _save_matrix(matrix, runtime.cwd, "t1w_to_asl")
        self._results["xfm_file"] = write_itk_affine(
            matrix, os.path.join(runtime.cwd, "from-aslref_to-T1w_mode-image_xfm.txt")
        )
        self._results["record"] = {"Coregistration": record}
        return runtime


def _save_matrix(matrix: np.ndarray, cwd: str, name: str) -> str:
    path = os.path.join(cwd, f"{name}.npy")
    np.save(path, np.asarray(matrix, float))
    return path


def write_itk_affine(matrix: np.ndarray, path: str) -> str:
    """A RAS reference → moving matrix as an ITK (LPS) affine text transform."""
    import SimpleITK as sitk

    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ np.asarray(matrix, float) @ flip
    sitk.WriteTransform(
        sitk.AffineTransform(lps[:3, :3].ravel().tolist(), lps[:3, 3].tolist()), path
    )
    return path


class _AlignTemplateInputSpec(_SourceInputSpec):
    reference_file = File(exists=True, mandatory=True)
    asl_mask_file = File(exists=True, mandatory=True)
    reference_name = traits.Str(mandatory=True)
    template = traits.Str(mandatory=True)
    template_files = traits.Dict(mandatory=True)
    seed = traits.Int(mandatory=True)


class AlignAslToTemplate(_NamedFailures):
    """T1w-free mode: the ASL reference registered straight to a template (affine)."""

    input_spec = _AlignTemplateInputSpec
    output_spec = _CoregOutputSpec
    _step = "ASL to template registration"

    def _run(self, runtime):
        reference, ref_affine = _load(self.inputs.reference_file)
        asl_mask = _load(self.inputs.asl_mask_file)[0] > 0.5
        template = load_template(self.inputs.template_files, priors=False)
        matrix = anat.register_affine(
            template.reg_t1w, template.reg_affine, template.reg_mask,
            np.where(asl_mask, reference, 0), ref_affine, seed=self.inputs.seed,
        )  # fmt: skip
        warped = resample_through(
            template.mask.astype(np.float32), template.affine, np.linalg.inv(matrix),
            reference.shape, ref_affine,
        )  # fmt: skip
        score = anat.dice(warped > 0.5, asl_mask)
        record = {
            "Method": "affine (12 parameters), Mattes mutual information (SimpleITK), ASL "
            f"reference straight to the {self.inputs.template} template: no T1w",
            "Reference": self.inputs.reference_name,
            "Dice": round(score, 4),
            "Quality": "lower than through a T1w: no nonlinear warp, tissue from template priors",
        }
        if score < anat.COREGISTRATION_DICE:
            record["Warning"] = (
                f"ASL to {self.inputs.template} registration may have failed (Dice {score:.3f}"
                f" < {anat.COREGISTRATION_DICE})"
            )
        self._results["matrix_file"] = _save_matrix(matrix, runtime.cwd, "template_to_asl")
        self._results["xfm_file"] = write_itk_affine(
            matrix, os.path.join(runtime.cwd, "from-aslref_to-template_mode-image_xfm.txt")
        )
        self._results["record"] = {"Coregistration": record}
        return runtime


class _TissueInputSpec(_SourceInputSpec):
    probseg = traits.List(File(exists=True), mandatory=True, desc="GM, WM, CSF maps")
    matrix_file = File(exists=True, mandatory=True, desc="source points -> ASL points (.npy)")
    reference_file = File(exists=True, mandatory=True, desc="a file on the ASL grid")


class _TissueOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="(X, Y, Z, 3) GM, WM, CSF fractions on the ASL grid")


class TissueOnAsl(_NamedFailures):
    """Tissue fractions on the ASL grid, from the T1w segmentation or template priors."""

    input_spec = _TissueInputSpec
    output_spec = _TissueOutputSpec
    _step = "tissue maps on the ASL grid"

    def _run(self, runtime):
        ref = nb.load(self.inputs.reference_file)
        to_source = np.linalg.inv(np.load(self.inputs.matrix_file))  # ASL -> source points
        maps = [_load(p) for p in self.inputs.probseg]
        fractions = anat.tissue_to_grid(
            np.stack([m[0] for m in maps]), maps[0][1], to_source, ref.shape[:3], ref.affine
        )
        path = os.path.join(runtime.cwd, "tissue_asl.nii.gz")
        self._results["out_file"] = _save(np.moveaxis(fractions, 0, -1), ref.affine, path)
        return runtime


class _RegionInputSpec(_SourceInputSpec):
    tissue_file = File(exists=True, mandatory=True, desc="GM, WM, CSF fractions, ASL grid")
    tissue = traits.Enum("csf", "wm", mandatory=True)


class _RegionOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the reference region on the ASL grid")


#: A voxel is in the calibration's reference region when the tissue fills this much of it:
#: pure CSF (the ventricles) or pure WM, so partial volume does not bias the reference M0.
REFERENCE_REGION_FRACTION = 0.9
#: Fewer voxels than this cannot give a stable reference M0.
REFERENCE_REGION_MIN_VOXELS = 10


class ReferenceRegionFromTissue(_NamedFailures):
    """The M0 calibration's reference region (CSF or WM) from the T1w segmentation."""

    input_spec = _RegionInputSpec
    output_spec = _RegionOutputSpec
    _step = "the M0 reference region from the T1w segmentation"

    def _run(self, runtime):
        tissue, affine = _load(self.inputs.tissue_file)
        index = {"wm": 1, "csf": 2}[self.inputs.tissue]
        region = tissue[..., index] > REFERENCE_REGION_FRACTION
        if region.sum() < REFERENCE_REGION_MIN_VOXELS:
            raise AslprepError(
                f"only {int(region.sum())} voxels of the ASL grid are pure "
                f"{self.inputs.tissue.upper()} (fraction > {REFERENCE_REGION_FRACTION}) in the "
                "T1w segmentation: too few for --m0-calibration; give --m0-reference-mask "
                "or use --m0-calibration voxel",
                path=self.inputs.source_file,
            )
        path = os.path.join(runtime.cwd, "reference_region.nii.gz")
        self._results["out_file"] = _save(region, affine, path, np.uint8)
        return runtime


class _TissueCbfInputSpec(_SourceInputSpec):
    cbf_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)
    tissue_file = File(exists=True, mandatory=True)
    tissue_source = traits.Str(mandatory=True, desc="where the tissue maps come from")
    pvc = traits.Bool(mandatory=True)


class _TissueCbfOutputSpec(TraitedSpec):
    record = traits.Dict(desc="CBF sidecar fields: tissue means")
    pvc_record = traits.Dict()
    cbf_pvgm = File()
    cbf_pvwm = File()


class TissueCbf(_NamedFailures):
    """Mean GM and WM CBF for the sidecar, and the partial-volume corrected maps."""

    input_spec = _TissueCbfInputSpec
    output_spec = _TissueCbfOutputSpec
    _step = "tissue CBF and partial-volume correction"

    def _run(self, runtime):
        cbf, affine = _load(self.inputs.cbf_file)
        mask = _load(self.inputs.mask_file)[0] > 0.5
        tissue = _load(self.inputs.tissue_file)[0]
        pgm, pwm = tissue[..., 0], tissue[..., 1]
        record = tissue_model.tissue_cbf(cbf, pgm, pwm, mask)
        self._results["record"] = {
            "TissueCBF": {**record, "TissueSource": self.inputs.tissue_source}
        }
        self._results["pvc_record"] = {}
        if self.inputs.pvc:
            result = pvc_model.pvc_linear_regression(cbf, pgm, pwm, mask)
            cwd = runtime.cwd
            self._results["cbf_pvgm"] = _save(result.gm_cbf, affine, f"{cwd}/cbf_pvgm.nii.gz")
            self._results["cbf_pvwm"] = _save(result.wm_cbf, affine, f"{cwd}/cbf_pvwm.nii.gz")
            self._results["pvc_record"] = pvc_model.pvc_record()
        return runtime


class _ResampleInputSpec(_SourceInputSpec):
    spaces = traits.List(traits.Dict, mandatory=True, desc="label, grid, template, record")
    templates = traits.List(traits.Str, desc="order of deformations / template_to_asl")
    t1w_to_asl = File(exists=True, desc="T1w points -> ASL points (.npy)")
    deformations = traits.List(File(exists=True), desc="template points -> T1w points")
    template_to_asl = traits.List(File(exists=True), desc="T1w-free: template -> ASL (.npy)")
    coregistrations = traits.List(
        traits.Dict, desc="T1w-free: each template's registration record (order of templates)"
    )


for _key in RESAMPLED_KEYS:  # one optional file input per map written in other spaces
    _ResampleInputSpec.add_class_trait(_key, File(exists=True))


class _ResampleOutputSpec(TraitedSpec):
    resampled = traits.List(traits.Dict, desc="{key, space, file, record} per file")


class ResampleToSpaces(_NamedFailures):
    """Each map of a run in each output space, read once through the composed mapping.

    A space (``label``, ``grid``: a file on its grid, ``template`` or None for T1w,
    ``record``: its sidecar block) is reached from the ASL grid by ``t1w_to_asl`` (T1w), the
    template's deformation then ``t1w_to_asl`` (a template, through the T1w) or the template's
    own affine (``template_to_asl``, T1w-free mode).
    """

    input_spec = _ResampleInputSpec
    output_spec = _ResampleOutputSpec
    _step = "resampling to the output spaces"

    def _mapping(self, space: dict) -> Deformation | np.ndarray:
        inputs = self.inputs
        if space["template"] is None:
            return np.load(inputs.t1w_to_asl)
        index = inputs.templates.index(space["template"])
        if isdefined(inputs.t1w_to_asl):
            deformation = Deformation.from_nifti(inputs.deformations[index])
            return deformation.then(np.load(inputs.t1w_to_asl))
        return np.load(inputs.template_to_asl[index])

    def _run(self, runtime):
        maps = {
            key: getattr(self.inputs, key)
            for key in RESAMPLED_KEYS
            if isdefined(getattr(self.inputs, key))
        }
        out = []
        for space in self.inputs.spaces:
            grid = nb.load(space["grid"])
            mapping = self._mapping(space)
            folder = Path(runtime.cwd) / space["label"].replace(":", "_")
            folder.mkdir(exist_ok=True)
            # the maps of a run share its grid: the mapped points are computed once per space
            loaded = {key: _load(path) for key, path in sorted(maps.items())}
            groups: dict[bytes, list[str]] = {}
            for key, (_, affine) in loaded.items():
                groups.setdefault(affine.tobytes(), []).append(key)
            resampled = {}
            for keys in groups.values():
                values = resample_many(
                    [loaded[k][0] for k in keys], loaded[keys[0]][1], mapping,
                    grid.shape[:3], grid.affine,
                )  # fmt: skip
                resampled.update(zip(keys, values, strict=True))
            for key in sorted(maps):
                values = resampled[key]
                if BY_KEY[key].dtype == "uint8":  # masks: the interpolated fraction > 1/2
                    values = (values > 0.5).astype(np.uint8)
                target = str(folder / f"{key}.nii.gz")
                _save(values, grid.affine, target, values.dtype)
                item = {"key": key, "space": space["label"], "file": target,
                        "record": space.get("record", {})}  # fmt: skip
                if space["template"] is not None and isdefined(self.inputs.coregistrations):
                    index = self.inputs.templates.index(space["template"])
                    item["coregistration"] = self.inputs.coregistrations[index]
                out.append(item)
        self._results["resampled"] = out
        return runtime
