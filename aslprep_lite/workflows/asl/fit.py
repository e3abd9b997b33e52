"""The fit stage of an ASL run: head motion, the ASL reference, the calibration M0, the mask.

What is estimated here is what later stages (CBF, and next the ASL→T1w registration and the
template spaces) resample or calibrate with.
"""

from __future__ import annotations

from collections.abc import Sequence

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from aslprep_lite.interfaces.anatomical import REFERENCE_REGION_FRACTION
from aslprep_lite.interfaces.hmc import ApplyHeadMotion, EstimateHeadMotion
from aslprep_lite.interfaces.m0 import PrepareM0
from aslprep_lite.interfaces.registration import RigidRegistration
from aslprep_lite.quant import constants
from aslprep_lite.quant.motion import estimates_motion

_REGISTERED_TYPES = ("control", "label")


def hmc_methods(context: Sequence[str]) -> str:
    """The methods paragraph of head-motion correction for a series of these volume types."""
    if not estimates_motion(context):
        return (
            "Head-motion correction was skipped: the series has fewer than two control/label "
            "volumes to register (motion confounds are n/a)."
        )
    m0 = "m0scan" in context
    return (
        "Head motion was estimated with a rigid-body registration of every volume "
        "(SimpleITK; Lowekamp et al. 2013), separately for each volume type since "
        + ("control, label and M0 images differ" if m0 else "control and label images differ")
        + " in contrast: each volume was registered to the mean of its type (normalized "
        "correlation), and each type's mean to the reference, the mean control image"
        + (" (mutual information for M0 volumes; Mattes et al. 2003)" if m0 else "")
        + ". The series was resampled once, with cubic B-spline interpolation, applying each "
        "volume's transform."
    )


def init_hmc_wf(
    *, context: Sequence[str], omp_nthreads: int, seed: int, mem_gb: float, name: str = "hmc_wf"
):
    """Estimate rigid head motion per volume type and resample the series once.

    Parameters
    ----------
    context
        Volume type of each volume (aslcontext), after the dummy scans.

    Inputs
    ------
    asl_file
        ASL series (dummy scans removed).

    Outputs
    -------
    asl_file
        Motion-corrected series.
    reference
        Motion-corrected mean of the reference volume type.
    transforms
        ``.npy`` of (T, 4, 4) RAS reference-to-volume matrices.
    hmc_summary
        What was registered, or why registration was skipped.
    hmc_skipped
        True when no volume was registered.
    """
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = hmc_methods(context)
    inputnode = pe.Node(IdentityInterface(fields=["asl_file", "context"]), name="inputnode")
    inputnode.inputs.context = list(context)
    outputnode = pe.Node(
        IdentityInterface(
            fields=["asl_file", "reference", "transforms", "hmc_summary", "hmc_skipped"]
        ),
        name="outputnode",
    )
    estimate = pe.Node(
        EstimateHeadMotion(seed=seed, n_threads=omp_nthreads),
        name="estimate",
        n_procs=omp_nthreads,
        mem_gb=mem_gb,
    )
    apply = pe.Node(
        ApplyHeadMotion(n_threads=omp_nthreads), name="apply", n_procs=omp_nthreads, mem_gb=mem_gb
    )
    workflow.connect([
        (inputnode, estimate, [("asl_file", "in_file"), ("context", "context")]),
        (inputnode, apply, [("asl_file", "in_file")]),
        (estimate, apply, [("transforms_file", "transforms_file")]),
        (apply, outputnode, [("out_file", "asl_file")]),
        (estimate, outputnode, [
            ("reference_file", "reference"),
            ("transforms_file", "transforms"),
            ("hmc_summary", "hmc_summary"),
            ("hmc_skipped", "hmc_skipped"),
        ]),
    ])  # fmt: skip
    return workflow


def m0_methods(
    *,
    m0_type: str,
    m0_repetition_time: float | None,
    registered: bool,
    has_control: bool,
    m0_scale: float,
    fwhm: float,
    calibration: str,
    reference_mask: str | None = None,
) -> str:
    """The methods paragraph of the M0 step, true for this M0Type and these options."""
    source = {
        "Separate": "a separately acquired M0 scan, "
        + (
            "rigidly aligned to the ASL reference (SimpleITK, Mattes mutual information; "
            "Mattes et al. 2003) and resampled once onto the ASL grid with cubic B-splines"
            if registered
            else "resampled onto the ASL grid through the image headers (the series has no "
            "control/label images to register it to)"
        ),
        "Included": "the M0 volumes of the ASL series, motion corrected with it (volumes "
        "acquired at different repetition times were first brought to the saturation of the "
        "longest)",
        "Estimate": "the single M0 value given in the metadata (M0Estimate), uniform over the "
        "brain",
        "Absent": "the mean control image, acquired without background suppression",
    }[m0_type]
    sentences = [f"The calibration M0 was taken from {source}."]
    # the reference region corrects for its own T1 (below), not the tissue's
    if m0_type != "Estimate" and calibration == "voxel" and m0_repetition_time is not None:
        threshold = constants.scalar("m0_tr_threshold").value
        if m0_repetition_time < threshold:
            sentences.append(
                f"Acquired with a repetition time of {m0_repetition_time:g} s (below "
                f"{threshold:g} s), it was divided by 1 − exp(−TR/T1,tissue) to account for "
                "incomplete recovery (Alsop et al. 2015)."
            )
        else:
            sentences.append(
                f"Its repetition time ({m0_repetition_time:g} s) allowed full recovery, so no "
                "saturation correction was applied (Alsop et al. 2015)."
            )
    if m0_scale != 1:
        sentences.append(f"It was multiplied by the M0 scale factor {m0_scale:g}.")
    if calibration != "voxel":
        tissue = {"csf": "cerebrospinal fluid", "wm": "white matter"}[calibration]
        region_source = (
            "given as a mask"
            if reference_mask
            else "the ASL voxels that the T1w segmentation fills with more than 90 % of it"
        )
        sentences.append(
            "CBF was calibrated with one arterial-blood M0 (M0a) from a reference region of "
            f"{tissue} ({region_source}), as asl_calib of oxford_asl does, from the M0 as "
            "acquired: M0a = S_ref / "
            "(1 − exp(−TR/T1_ref)) · exp(TE/T2_ref) / λ_ref · exp(−TE/T2_blood), with T2* for "
            "gradient-echo and T2 for spin-echo readouts; reference T1, T2 and λ are listed "
            "in the M0 sidecar."
        )
    elif m0_type != "Estimate":
        sentences.append(
            f"It was smoothed with a Gaussian kernel of {fwhm:g} mm FWHM normalized within the "
            "brain mask, to keep its noise out of CBF."
            if fwhm > 0
            else "It was not smoothed."
        )
    mask_source = {
        "Absent": "mean control image",
        "Estimate": "mean control image" if has_control else "ASL reference image",
    }.get(m0_type, "M0")
    sentences.append(
        f"The brain mask was an Otsu threshold (Otsu 1979) of the {mask_source} smoothed at "
        "3 mm FWHM, its largest component with holes filled."
    )
    return " ".join(sentences)


def init_m0_wf(
    *,
    m0_type: str,
    m0_file: str | None,
    m0_source: str | None,
    m0_repetition_time: float | None,
    m0_estimate: float | None,
    context: Sequence[str],
    repetition_time: Sequence[float],
    constants: dict,
    has_deltam: bool,
    m0_scale: float,
    fwhm: float,
    calibration: str,
    reference_mask: str | None,
    echo_time: float,
    spin_echo: bool,
    asl_file: str,
    seed: int,
    omp_nthreads: int,
    name: str = "m0_wf",
):
    """Prepare the calibration M0 and the brain mask on the ASL grid.

    Inputs
    ------
    asl_file
        Motion-corrected ASL series.
    reference
        ASL reference image (M0 alignment target).

    Outputs
    -------
    m0_file
        Calibration M0 (TR-corrected, scaled, smoothed within the mask).
    mask_file
        Brain mask.
    m0_metadata
        How the M0 was made (source, TR correction, scale, smoothing or reference region).
    reference_mask
        Reference-region mask (``--m0-calibration csf|wm`` only).
    """
    workflow = pe.Workflow(name=name)
    registered = m0_type == "Separate" and any(k in _REGISTERED_TYPES for k in context)
    if has_deltam:
        workflow.__desc__ = m0_methods(
            m0_type=m0_type,
            m0_repetition_time=m0_repetition_time,
            registered=registered,
            has_control="control" in context,
            m0_scale=m0_scale,
            fwhm=fwhm,
            calibration=calibration,
            reference_mask=reference_mask,
        )
    inputnode = pe.Node(
        IdentityInterface(fields=["asl_file", "reference", "reference_mask"]), name="inputnode"
    )
    outputnode = pe.Node(
        IdentityInterface(fields=["m0_file", "mask_file", "m0_metadata", "reference_mask"]),
        name="outputnode",
    )
    prepare = pe.Node(
        PrepareM0(
            context=list(context),
            m0_type=m0_type,
            constants=constants,
            has_deltam=has_deltam,
            m0_scale=m0_scale,
            calibration=calibration,
            echo_time=echo_time,
            spin_echo=spin_echo,
            asl_file=asl_file,
        ),
        name="prepare_m0",
    )
    if calibration == "voxel":  # the smoothing acts only on a voxelwise M0
        prepare.inputs.fwhm = fwhm
    if m0_type == "Included":
        prepare.inputs.repetition_time = list(repetition_time)
    if m0_repetition_time is not None:
        prepare.inputs.m0_repetition_time = m0_repetition_time
    if m0_estimate is not None:
        prepare.inputs.m0_estimate = m0_estimate
    if reference_mask:
        prepare.inputs.reference_mask = reference_mask
        prepare.inputs.reference_source = reference_mask
    elif calibration != "voxel" and has_deltam:  # from the T1w segmentation (coreg_wf)
        workflow.connect([(inputnode, prepare, [("reference_mask", "reference_mask")])])
        prepare.inputs.reference_source = (
            f"T1w segmentation (p{calibration.upper()} > {REFERENCE_REGION_FRACTION:g} on the "
            "ASL grid)"
        )
    if m0_type == "Separate" and m0_file:
        prepare.inputs.m0_file = m0_file
        prepare.inputs.m0_source = m0_source
    if registered:
        align = pe.Node(
            RigidRegistration(
                moving_file=m0_file,
                moving_name="M0",
                fixed_name="ASL reference",
                metric="mi",
                seed=seed,
                n_threads=omp_nthreads,
            ),
            name="align_m0",
            n_procs=omp_nthreads,
        )
        workflow.connect([
            (inputnode, align, [("reference", "fixed_file")]),
            (align, prepare, [("matrix_file", "m0_matrix_file")]),
        ])  # fmt: skip
    workflow.connect([
        (inputnode, prepare, [("asl_file", "in_file"), ("reference", "reference_file")]),
        (prepare, outputnode, [
            ("out_file", "m0_file"),
            ("mask_file", "mask_file"),
            ("metadata", "m0_metadata"),
            ("reference_mask_file", "reference_mask"),
        ]),
    ])  # fmt: skip
    return workflow
