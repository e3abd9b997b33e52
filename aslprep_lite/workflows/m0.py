"""M0 calibration workflow."""

from __future__ import annotations

from typing import Any

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from aslprep_lite.interfaces.m0 import PrepareM0

_SOURCES = {
    "Separate": "a separately acquired M0 scan, rigidly aligned to the ASL reference",
    "Included": "the M0 volumes of the ASL series, motion corrected with it",
    "Estimate": "the single M0 value given in the metadata (M0Estimate)",
    "Absent": "the mean control image (acquired without background suppression)",
}


def init_m0_wf(
    plan: dict[str, Any],
    *,
    m0_scale: float,
    fwhm: float,
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
    workflow.__desc__ = (
        f"The calibration M0 was taken from {_SOURCES[plan['m0_type']]}. An M0 acquired with "
        "a repetition time below 5 s was divided by 1 − exp(−TR/T1,tissue) to account for "
        "incomplete recovery (Alsop et al. 2015); it was then multiplied by the M0 scale "
        f"factor ({m0_scale:g}) and smoothed with a Gaussian kernel of {fwhm:g} mm FWHM "
        "normalized within a brain mask (Otsu threshold of the smoothed M0)."
    )
    inputnode = pe.Node(IdentityInterface(fields=["asl_file", "reference"]), name="inputnode")
    outputnode = pe.Node(
        IdentityInterface(fields=["m0_file", "mask_file", "m0_metadata", "reference_mask"]),
        name="outputnode",
    )
    prepare = pe.Node(
        PrepareM0(plan=plan, m0_scale=m0_scale, fwhm=fwhm, seed=seed, n_threads=omp_nthreads),
        name="prepare_m0",
        n_procs=omp_nthreads,
    )
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
