"""The calibration M0: source by M0Type, alignment, TR correction, scaling, mask, smoothing."""

from __future__ import annotations

import os

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from aslprep_lite.errors import AslprepError
from aslprep_lite.images import check_signal, load_image, load_volume, save_image
from aslprep_lite.quant.m0 import (
    brain_mask,
    reference_region_m0,
    smooth_within_mask,
    tr_correction_factor,
)
from aslprep_lite.quant.registration import resample_to


class _PrepareM0InputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="motion-corrected ASL series")
    reference_file = File(exists=True, mandatory=True, desc="ASL reference image")
    context = traits.List(traits.Str, mandatory=True, desc="volume type of each volume")
    repetition_time = traits.List(traits.Float, desc="Included: TR of each volume, s")
    m0_type = traits.Enum("Separate", "Included", "Estimate", "Absent", mandatory=True)
    m0_file = File(exists=True, desc="Separate: the M0 scan")
    m0_source = traits.Str(desc="Separate: the M0 scan as a BIDS URI, for the sidecar")
    m0_matrix_file = File(
        exists=True, desc="Separate: ASL-reference-to-M0 RAS matrix (.npy); none: headers only"
    )
    m0_repetition_time = traits.Float(desc="TR of the M0 (Separate, Included, Absent), s")
    m0_estimate = traits.Float(desc="Estimate: M0Estimate")
    constants = traits.Dict(mandatory=True, desc="quant.constants.m0_record of the run")
    has_deltam = traits.Bool(True, usedefault=True, desc="false: cbf-only series, no M0")
    m0_scale = traits.Float(1.0, usedefault=True, desc="multiplies the M0")
    fwhm = traits.Float(desc="voxelwise calibration: smoothing FWHM (mm)")
    calibration = traits.Enum("voxel", "csf", "wm", usedefault=True)
    reference_mask = File(exists=True, desc="csf|wm: the reference region on the ASL grid")
    reference_source = traits.Str(
        desc="csf|wm: where the region came from (the mask given, or the T1w segmentation)"
    )
    echo_time = traits.Float(0.0, usedefault=True, desc="csf|wm: TE of the M0, s")
    spin_echo = traits.Bool(False, usedefault=True, desc="csf|wm: T2 (true) or T2* decay")
    asl_file = traits.Str(mandatory=True, desc="the raw ASL series, named in errors")


class _PrepareM0OutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="calibration M0 on the ASL grid")
    mask_file = File(exists=True, desc="brain mask on the ASL grid")
    reference_mask_file = File(desc="reference-region mask (--m0-calibration csf|wm)")
    metadata = traits.Dict(desc="how the M0 was made, for the sidecars")


def _mean_of_type(series: np.ndarray, context: list[str], kind: str) -> np.ndarray:
    idx = [i for i, k in enumerate(context) if k == kind]
    return series[..., idx].mean(axis=3)


class PrepareM0(SimpleInterface):
    """Build the M0 image CBF is calibrated with (Alsop et al. 2015).

    The acquired M0 comes from its source (by M0Type), is corrected for a short TR and scaled,
    then either smoothed within the brain mask (voxelwise calibration) or replaced by the
    reference region's arterial-blood M0 (``--m0-calibration csf|wm``).
    """

    input_spec = _PrepareM0InputSpec
    output_spec = _PrepareM0OutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        series, img = load_image(inputs.in_file)
        reference, _ = load_image(inputs.reference_file)
        zooms = img.header.get_zooms()[:3]

        if not inputs.has_deltam:  # cbf volumes only: the M0 step gives the mask
            mask = brain_mask(reference, zooms)
            meta = {
                "Source": "none: a series of cbf volumes needs no calibration",
                "BrainMask": "Otsu threshold of the mean cbf volume, largest component",
            }
            self._save(runtime, img, np.zeros(mask.shape), mask, meta)
            return runtime

        meta: dict = {"M0Type": inputs.m0_type}
        acquired, mask_source = self._acquired_m0(series, img, reference, meta)
        if acquired is not None:
            mask = brain_mask(acquired, zooms)
            # the reference region applies its own T1 to the acquired M0
            m0 = acquired * (self._tr_correction(meta) if inputs.calibration == "voxel" else 1.0)
        else:  # M0Estimate: one value; the mask comes from the images there are
            if "control" in inputs.context:
                mask_source = "mean control"
                base = _mean_of_type(series, inputs.context, "control")
            else:
                mask_source, base = "ASL reference", reference
            mask = brain_mask(base, zooms)
            m0 = np.full(series.shape[:3], inputs.m0_estimate, dtype=np.float64)
            meta["M0Estimate"] = inputs.m0_estimate
        if not mask.any():
            raise AslprepError(
                "no brain found in the M0/reference image (empty mask)", path=inputs.asl_file
            )
        m0 = m0 * inputs.m0_scale
        meta["M0Scale"] = inputs.m0_scale
        if inputs.calibration == "voxel":
            m0 = smooth_within_mask(m0, mask, zooms, inputs.fwhm, min_fraction=0.5)
            meta["SmoothingFWHM"] = {"Value": inputs.fwhm, "Units": "mm"}
            meta["SmoothingMethod"] = (
                "Gaussian, normalized within the brain mask; voxels below half of their "
                "neighbourhood's M0 are smoothed but not used to smooth others"
            )
        else:
            # (validation refuses M0Estimate here, so an acquired M0 image exists)
            m0 = self._calibrate_by_reference(runtime, img, acquired, mask, meta)
        meta["BrainMask"] = (
            f"Otsu threshold of the {mask_source} smoothed at 3 mm FWHM, largest component, "
            "holes filled"
        )
        self._save(runtime, img, m0, mask, meta)
        return runtime

    def _acquired_m0(self, series, img, reference, meta) -> tuple[np.ndarray | None, str]:
        """The M0 image as acquired, on the ASL grid (None for M0Estimate), and its name."""
        inputs = self.inputs
        if inputs.m0_type == "Separate":
            m0_raw, m0_img = load_volume(inputs.m0_file, "M0")
            if isdefined(inputs.m0_matrix_file):
                matrix = np.load(inputs.m0_matrix_file)
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
            meta["Source"] = inputs.m0_source
            return resample_to(m0_raw, m0_img.affine, matrix, img.shape[:3], img.affine), "M0"
        if inputs.m0_type == "Included":
            m0, trs = included_m0(
                series,
                inputs.context,
                inputs.repetition_time,
                t1_tissue=inputs.constants["TissueT1"]["Value"],
                threshold=inputs.constants["M0TRThreshold"]["Value"],
            )
            check_signal(m0, inputs.asl_file, "M0")
            meta["Source"] = "m0scan volumes of the motion-corrected ASL series"
            if len(set(trs)) > 1:
                meta["M0VolumeRepetitionTimes"] = trs
            return m0, "M0"
        if inputs.m0_type == "Absent":
            meta["Source"] = "mean control image (no background suppression)"
            return _mean_of_type(series, inputs.context, "control"), "mean control"
        meta["Source"] = "M0Estimate (sidecar)"
        return None, ""

    def _tr_correction(self, meta: dict) -> float:
        """Saturation-recovery factor of the M0's TR, recorded in ``meta``."""
        tissue_t1 = self.inputs.constants["TissueT1"]
        factor = tr_correction_factor(
            self.inputs.m0_repetition_time,
            tissue_t1["Value"],
            self.inputs.constants["M0TRThreshold"]["Value"],
        )
        meta["RepetitionTimePreparation"] = self.inputs.m0_repetition_time
        meta["TRCorrectionFactor"] = factor
        if factor != 1.0:
            meta["TissueT1"] = tissue_t1
        return factor

    def _calibrate_by_reference(self, runtime, img, acquired, mask, meta) -> np.ndarray:
        """A uniform M0 from the reference region's arterial-blood M0 (asl_calib)."""
        inputs = self.inputs
        # the reference region applies its own T1: the M0 before the TR correction
        signal = acquired * inputs.m0_scale
        region = _reference_region(inputs.reference_mask, signal.shape)
        m0a, meta["ReferenceRegion"] = _reference_calibration(
            inputs.calibration,
            signal,
            region,
            inputs.constants,
            repetition_time=inputs.m0_repetition_time,
            echo_time=inputs.echo_time,
            spin_echo=inputs.spin_echo,
        )
        if isdefined(inputs.reference_source):
            meta["ReferenceRegion"]["Source"] = inputs.reference_source
        lam = inputs.constants["PartitionCoefficient"]["Value"]
        self._results["reference_mask_file"] = save_image(
            region, img, os.path.join(runtime.cwd, "reference_mask.nii"), dtype=np.uint8
        )
        # CBF's voxelwise formula divides by M0/λ; a uniform λ·M0a makes that M0a.
        return np.where(mask, lam * m0a, 0.0)

    def _save(self, runtime, img, m0, mask, meta) -> None:
        self._results["out_file"] = save_image(
            m0, img, os.path.join(runtime.cwd, "m0.nii"), dtype=np.float32
        )
        self._results["mask_file"] = save_image(
            mask, img, os.path.join(runtime.cwd, "mask.nii"), dtype=np.uint8
        )
        self._results["metadata"] = meta


def _reference_region(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """The user's reference-region mask, on the ASL grid."""
    given, _ = load_image(path, what="reference mask")
    if given.shape[:3] != shape:
        raise AslprepError(
            f"has shape {given.shape[:3]} but the ASL grid is {shape}: "
            "resample the mask onto the ASL image",
            path=path,
        )
    region = given.reshape(shape) > 0
    if not region.any():
        raise AslprepError("the reference-region mask is empty", path=path)
    return region


def included_m0(
    series: np.ndarray,
    context: list[str],
    repetition_time: list[float],
    *,
    t1_tissue: float,
    threshold: float,
) -> tuple[np.ndarray, list[float]]:
    """Mean of the m0scan volumes, each first brought to the longest TR's saturation.

    Volumes acquired at different TRs recover to different fractions of M0; averaging them
    as they are and then correcting for one TR would leave M0 too low (CBF 21 % too high for
    one volume at TR 2 s beside one at 8 s). Each volume is scaled by its own saturation
    factor relative to the longest TR's; the correction for that TR then applies to all.
    """
    indices = [i for i, kind in enumerate(context) if kind == "m0scan"]
    trs = [float(repetition_time[i]) for i in indices]
    longest = tr_correction_factor(max(trs), t1_tissue, threshold)
    weights = np.array([tr_correction_factor(tr, t1_tissue, threshold) / longest for tr in trs])
    return (series[..., indices] * weights).mean(axis=3), trs


def _reference_calibration(
    tissue: str,
    signal: np.ndarray,
    reference: np.ndarray,
    table: dict,
    *,
    repetition_time: float,
    echo_time: float,
    spin_echo: bool,
):
    """M0a from the reference region, and the sidecar record of how it was computed.

    ``table`` holds ``ReferenceTissue`` and ``BloodT2`` (:func:`constants.m0_record`).
    """
    values = table["ReferenceTissue"]["values"][tissue]
    echo = "t2" if spin_echo else "t2star"
    mean_signal = float(signal[reference].mean())
    m0a = reference_region_m0(
        mean_signal,
        repetition_time=repetition_time,
        echo_time=echo_time,
        t1_reference=values["t1"],
        t2_reference=values[echo],
        partition_coefficient=values["partition_coefficient"],
        t2_blood=table["BloodT2"]["values"][echo],
    )
    record = {
        "Method": f"reference region ({tissue.upper()}), as asl_calib in oxford_asl",
        "Tissue": tissue,
        "Voxels": int(reference.sum()),
        "MeanSignal": mean_signal,
        "RepetitionTime": repetition_time,
        "EchoTime": echo_time,
        "ReferenceT1": values["t1"],
        ("ReferenceT2" if echo == "t2" else "ReferenceT2Star"): values[echo],
        "ReferencePartitionCoefficient": values["partition_coefficient"],
        ("BloodT2" if echo == "t2" else "BloodT2Star"): table["BloodT2"]["values"][echo],
        "Sources": [table["ReferenceTissue"]["source"], table["BloodT2"]["sources"][echo]],
        "M0a": m0a,
        "Equation": (
            "M0a = S_ref / (1 - exp(-TR/T1_ref)) * exp(TE/T2_ref) / pc_ref * exp(-TE/T2_blood)"
        ),
    }
    return m0a, record
