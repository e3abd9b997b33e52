"""The calibration M0: source by M0Type, alignment, TR correction, scaling, mask, smoothing."""

from __future__ import annotations

import os

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from aslprep_lite.bids import RunPlan
from aslprep_lite.errors import AslprepError
from aslprep_lite.images import load_image, save_image
from aslprep_lite.quant import constants
from aslprep_lite.quant.m0 import (
    brain_mask,
    reference_region_m0,
    smooth_within_mask,
    tr_correction_factor,
)
from aslprep_lite.registration import register_rigid, resample_to


class _PrepareM0InputSpec(BaseInterfaceInputSpec):
    plan = traits.Dict(mandatory=True, desc="RunPlan.as_dict() of the run")
    in_file = File(exists=True, mandatory=True, desc="motion-corrected ASL series")
    reference_file = File(exists=True, mandatory=True, desc="ASL reference image")
    m0_scale = traits.Float(1.0, usedefault=True, desc="multiplies the M0")
    fwhm = traits.Float(5.0, usedefault=True, desc="smoothing FWHM (mm)")
    seed = traits.Int(mandatory=True, desc="registration sampling seed")
    n_threads = traits.Int(1, usedefault=True)


class _PrepareM0OutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="calibration M0 on the ASL grid")
    mask_file = File(exists=True, desc="brain mask on the ASL grid")
    reference_mask_file = File(desc="reference-region mask (--m0-calibration csf|wm)")
    metadata = traits.Dict(desc="how the M0 was made, for the sidecars")


def _volumes(series: np.ndarray, context: list[str], kind: str) -> np.ndarray:
    idx = [i for i, k in enumerate(context) if k == kind]
    return series[..., idx].mean(axis=3)


class PrepareM0(SimpleInterface):
    """Build the M0 image CBF is calibrated with (Alsop et al. 2015)."""

    input_spec = _PrepareM0InputSpec
    output_spec = _PrepareM0OutputSpec

    def _run_interface(self, runtime):
        plan = self.inputs.plan
        series, img = load_image(self.inputs.in_file)
        reference, _ = load_image(self.inputs.reference_file)
        zooms = img.header.get_zooms()[:3]
        context = plan["context"]
        m0_type = plan["m0_type"]
        meta: dict = {"M0Type": m0_type}

        if not RunPlan(**plan).quantifies:  # cbf volumes only: the M0 step gives the mask
            mask = brain_mask(reference, zooms)
            meta = {"Source": "none: a series of cbf volumes needs no calibration"}
            meta["BrainMask"] = "Otsu threshold of the mean cbf volume, largest component"
            self._results["out_file"] = save_image(
                np.zeros(mask.shape), img, os.path.join(runtime.cwd, "m0.nii")
            )
            self._results["mask_file"] = save_image(
                mask, img, os.path.join(runtime.cwd, "mask.nii"), dtype=np.uint8
            )
            self._results["metadata"] = meta
            return runtime

        if m0_type == "Separate":
            m0_raw, m0_img = load_image(plan["m0_file"], what="M0")
            if m0_raw.ndim == 4:
                m0_raw = m0_raw.mean(axis=3)
            _check_m0(m0_raw, plan["m0_file"])
            if "control" in context or "label" in context:
                try:
                    matrix = register_rigid(
                        reference,
                        img.affine,
                        m0_raw,
                        m0_img.affine,
                        metric="mi",
                        seed=self.inputs.seed,
                        n_threads=self.inputs.n_threads,
                    )
                except RuntimeError:  # ITK: no overlap, or no usable metric samples
                    raise AslprepError(
                        "cannot be aligned to the ASL reference (the images do not overlap "
                        "in space): check that the M0 and the ASL series share a field of view "
                        "and that their NIfTI affines are right",
                        path=plan["m0_file"],
                    ) from None
                meta["Registration"] = (
                    "rigid to the ASL reference (SimpleITK, Mattes mutual information), "
                    "one cubic B-spline resampling onto the ASL grid"
                )
            else:
                matrix = np.eye(4)
                meta["Registration"] = (
                    "none (no control/label anatomy to register to): resampled onto the "
                    "ASL grid through the image headers"
                )
            m0 = resample_to(m0_raw, m0_img.affine, matrix, img.shape[:3], img.affine)
            meta["Source"] = plan["source_files"][-1]
        elif m0_type == "Included":
            m0, trs = _included_m0(series, plan)
            _check_m0(m0, plan["asl_file"])
            meta["Source"] = "m0scan volumes of the motion-corrected ASL series"
            if len(set(trs)) > 1:
                meta["M0VolumeRepetitionTimes"] = trs
        elif m0_type == "Absent":
            m0 = _volumes(series, context, "control")
            meta["Source"] = "mean control image (no background suppression)"
        else:
            m0 = None
            meta["Source"] = "M0Estimate (sidecar)"

        if m0 is not None:
            mask_source = "M0" if m0_type != "Absent" else "mean control"
            mask = brain_mask(m0, zooms)
            tissue_t1 = constants.tissue_t1(plan["field_strength"])
            threshold = constants.scalar("m0_tr_threshold")
            factor = tr_correction_factor(
                plan["m0_repetition_time"], tissue_t1.value, threshold.value
            )
            meta["RepetitionTimePreparation"] = plan["m0_repetition_time"]
            meta["TRCorrectionFactor"] = factor
            if factor != 1.0:
                meta["TissueT1"] = tissue_t1.as_json()
            acquired = m0  # before the TR correction: the reference region applies its own T1
            m0 = m0 * factor
        else:
            if "control" in context:
                mask_source, base = "mean control", _volumes(series, context, "control")
            else:
                mask_source, base = "ASL reference", reference
            mask = brain_mask(base, zooms)
            m0 = np.full(series.shape[:3], plan["m0_estimate"], dtype=np.float64)
            meta["M0Estimate"] = plan["m0_estimate"]
        if not mask.any():
            raise AslprepError(
                "no brain found in the M0/reference image (empty mask)", path=plan["asl_file"]
            )
        m0 = m0 * self.inputs.m0_scale
        meta["M0Scale"] = self.inputs.m0_scale
        if plan["m0_calibration"] == "voxel":
            m0 = smooth_within_mask(m0, mask, zooms, self.inputs.fwhm)
            meta["SmoothingFWHM"] = {"Value": self.inputs.fwhm, "Units": "mm"}
            meta["SmoothingMethod"] = "Gaussian, normalized within the brain mask"
        else:
            # (validation refuses M0Estimate here, so an acquired M0 image exists)
            signal = acquired * self.inputs.m0_scale
            reference = self._reference_mask(plan, signal, mask)
            m0a, meta["ReferenceRegion"] = _reference_calibration(plan, signal, reference)
            lam = constants.scalar("partition_coefficient").value
            # CBF's voxelwise formula divides by M0/λ; a uniform λ·M0a makes that M0a.
            m0 = np.where(mask, lam * m0a, 0.0)
            self._results["reference_mask_file"] = save_image(
                reference, img, os.path.join(runtime.cwd, "reference_mask.nii"), dtype=np.uint8
            )
        meta["BrainMask"] = (
            f"Otsu threshold of the {mask_source} smoothed at 3 mm FWHM, largest component, "
            "holes filled"
        )

        self._results["out_file"] = save_image(
            m0, img, os.path.join(runtime.cwd, "m0.nii"), dtype=np.float32
        )
        self._results["mask_file"] = save_image(
            mask, img, os.path.join(runtime.cwd, "mask.nii"), dtype=np.uint8
        )
        self._results["metadata"] = meta
        return runtime

    @staticmethod
    def _reference_mask(plan: dict, signal: np.ndarray, brain: np.ndarray) -> np.ndarray:
        """The user's reference-region mask, on the ASL grid."""
        path = plan["m0_reference_mask"]
        given, _ = load_image(path, what="reference mask")
        if given.shape[:3] != signal.shape:
            raise AslprepError(
                f"has shape {given.shape[:3]} but the ASL grid is {signal.shape}: "
                "resample the mask onto the ASL image",
                path=path,
            )
        reference = given.reshape(signal.shape) > 0
        if not reference.any():
            raise AslprepError("the reference-region mask is empty", path=path)
        return reference


def _included_m0(series: np.ndarray, plan: dict) -> tuple[np.ndarray, list[float]]:
    """Mean of the m0scan volumes, each first brought to the longest TR's saturation.

    Volumes acquired at different TRs recover to different fractions of M0; averaging them
    as they are and then correcting for one TR would leave M0 too low (CBF 21 % too high for
    one volume at TR 2 s beside one at 8 s). Each volume is scaled by its own saturation
    factor relative to the longest TR's; the correction for that TR then applies to all.
    """
    indices = [i for i, kind in enumerate(plan["context"]) if kind == "m0scan"]
    trs = [float(plan["repetition_time"][i]) for i in indices]
    t1 = constants.tissue_t1(plan["field_strength"]).value
    threshold = constants.scalar("m0_tr_threshold").value
    longest = tr_correction_factor(max(trs), t1, threshold)
    weights = np.array([tr_correction_factor(tr, t1, threshold) / longest for tr in trs])
    return (series[..., indices] * weights).mean(axis=3), trs


def _reference_calibration(plan: dict, signal: np.ndarray, reference: np.ndarray):
    """M0a from the reference region, and the sidecar record of how it was computed."""
    tissue = plan["m0_calibration"]
    table = constants.table()
    values = table["reference_tissue"]["values"][tissue]
    echo = "t2" if plan["spin_echo"] else "t2star"
    mean_signal = float(signal[reference].mean())
    m0a = reference_region_m0(
        mean_signal,
        repetition_time=plan["m0_repetition_time"],
        echo_time=plan["echo_time"],
        t1_reference=values["t1"],
        t2_reference=values[echo],
        partition_coefficient=values["partition_coefficient"],
        t2_blood=table["blood_t2"]["values"][echo],
    )
    record = {
        "Method": f"reference region ({tissue.upper()}), as asl_calib in oxford_asl",
        "Tissue": tissue,
        "Voxels": int(reference.sum()),
        "MeanSignal": mean_signal,
        "RepetitionTime": plan["m0_repetition_time"],
        "EchoTime": plan["echo_time"],
        "ReferenceT1": values["t1"],
        ("ReferenceT2" if echo == "t2" else "ReferenceT2Star"): values[echo],
        "ReferencePartitionCoefficient": values["partition_coefficient"],
        ("BloodT2" if echo == "t2" else "BloodT2Star"): table["blood_t2"]["values"][echo],
        "Sources": [table["reference_tissue"]["source"], table["blood_t2"]["sources"][echo]],
        "M0a": m0a,
        "Equation": (
            "M0a = S_ref / (1 - exp(-TR/T1_ref)) * exp(TE/T2_ref) / pc_ref * exp(-TE/T2_blood)"
        ),
    }
    return m0a, record


def _check_m0(m0: np.ndarray, path: str) -> None:
    """An M0 with no finite positive signal would give infinite or zero CBF."""
    if not np.isfinite(m0).all():
        raise AslprepError("M0 contains NaN or infinite values: re-export it", path=path)
    if not float(m0.max()) > 0:
        raise AslprepError("M0 has no positive signal (all zeros?): check the file", path=path)
