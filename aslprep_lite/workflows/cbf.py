"""Label-control subtraction and CBF quantification workflow."""

from __future__ import annotations

from typing import Any

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from aslprep_lite.bids import RunPlan
from aslprep_lite.interfaces.cbf import ComputeCBF, ComputeDeltaM
from aslprep_lite.interfaces.kinetic import FitKineticModel
from aslprep_lite.quant.kinetic import ATT_PRIOR_FWHM

OUTPUTS = ["mean_deltam", "cbf", "cbf_timeseries", "cbf_metadata", "maps", "maps_metadata"]


def init_cbf_wf(plan: dict[str, Any], *, mem_gb: float, name: str = "cbf_wf"):
    """Subtract label from control and quantify CBF (Alsop et al. 2015).

    Inputs
    ------
    asl_file
        Motion-corrected ASL series.
    m0_file
        Calibration M0.
    mask_file
        Brain mask.

    Outputs
    -------
    mean_deltam
        Mean ΔM (undefined for cbf-only series).
    cbf
        Mean CBF (mL/100 g/min).
    cbf_timeseries
        CBF of every ΔM volume.
    cbf_metadata
        Model, timing and every constant used, with sources.
    maps, maps_metadata
        Multi-delay runs: {suffix: file} and {suffix: sidecar} of ATT, standard errors,
        goodness of fit, fit-failure mask, longest-delay CBF (and aBV, aBAT); else empty.
    """
    workflow = pe.Workflow(name=name)
    if plan["asl_type"] == "PASL":
        equation = (
            "CBF = 6000·λ·ΔM·exp(TI/T1b) / (2·α·TI1·M0) for PASL with "
            f"{plan['bolus_cutoff_technique']} bolus cut-off (Wong et al. 1998; Luh et al. 1999)"
        )
    else:
        equation = (
            f"CBF = 6000·λ·ΔM·exp(PLD/T1b) / (2·α·T1b·M0·(1 − exp(−τ/T1b))) for {plan['asl_type']}"
        )
    if RunPlan(**plan).is_multidelay:
        return _init_multidelay_wf(plan, mem_gb=mem_gb, name=name)
    workflow.__desc__ = (
        "Perfusion-weighted images were computed as ΔM = control − label for each pair of "
        "volumes. Cerebral blood flow was quantified with the single-compartment model "
        f"recommended by the ASL consensus (Alsop et al. 2015): {equation}, with λ = 0.9 mL/g, "
        "blood T1 for the field strength and labeling efficiency α as listed in the CBF "
        "sidecar."
        + (
            " For the 2D readout the delay of each slice included its acquisition time."
            if plan["slice_timing"]
            else ""
        )
    )
    inputnode = pe.Node(
        IdentityInterface(fields=["asl_file", "m0_file", "mask_file"]), name="inputnode"
    )
    outputnode = pe.Node(
        IdentityInterface(fields=OUTPUTS),
        name="outputnode",
    )
    deltam = pe.Node(ComputeDeltaM(plan=plan), name="deltam", mem_gb=mem_gb)
    cbf = pe.Node(ComputeCBF(plan=plan), name="cbf", mem_gb=mem_gb)
    workflow.connect([
        (inputnode, deltam, [("asl_file", "in_file")]),
        (inputnode, cbf, [
            ("asl_file", "in_file"),
            ("m0_file", "m0_file"),
            ("mask_file", "mask_file"),
        ]),
        (deltam, cbf, [("out_file", "deltam_file")]),
        (deltam, outputnode, [("mean_file", "mean_deltam")]),
        (cbf, outputnode, [
            ("mean_file", "cbf"),
            ("timeseries_file", "cbf_timeseries"),
            ("metadata", "cbf_metadata"),
        ]),
    ])  # fmt: skip
    return workflow


def _init_multidelay_wf(plan: dict[str, Any], *, mem_gb: float, name: str):
    """Multi-delay: fit the general kinetic model for CBF and ATT (same inputs and outputs)."""
    workflow = pe.Workflow(name=name)
    att = (
        "the arterial transit time (ATT) read off the signal-weighted mean delay (Dai et al. "
        "2012), CBF then fitted at that ATT"
        if plan["att_method"] == "weighted-delay"
        else "CBF and the arterial transit time (ATT) fitted together by least squares (a grid "
        "search over ATT with CBF solved in closed form, then Levenberg-Marquardt, vectorized "
        "over voxels)"
        + (
            ", ATT regularized by a Gaussian prior per voxel whose mean and SD were those of "
            "the least-squares ATTs of a first fit in its neighbourhood "
            f"({ATT_PRIOR_FWHM:g} mm FWHM; empirical Bayes, Efron & Morris 1975), i.e. maximum "
            "a posteriori estimates with the voxel's own noise variance"
            if plan["att_prior"] == "local"
            else ""
        )
    )
    workflow.__desc__ = (
        "Perfusion-weighted images were computed as ΔM = control − label for each pair of "
        "volumes. For this multi-delay acquisition the general kinetic model (Buxton et al. "
        "1998), a single well-mixed compartment whose label relaxes with the blood T1 as in "
        "the consensus model (Alsop et al. 2015; Woods et al. 2024), was fitted to ΔM at every "
        f"voxel of the brain mask, with {att}"
        + (
            ", and a macrovascular component (arterial blood volume and arrival time; "
            "Chappell et al. 2010)"
            if plan["arterial_component"]
            else ""
        )
        + ". Standard errors came from the Jacobian at the solution"
        + (" (posterior SDs under the prior)" if plan["att_prior"] == "local" else "")
        + "; voxels where the fit "
        "failed are flagged in a mask. For comparison, CBF was also computed with the "
        "single-delay consensus formula from the volumes at the longest delay."
    )
    inputnode = pe.Node(
        IdentityInterface(fields=["asl_file", "m0_file", "mask_file"]), name="inputnode"
    )
    outputnode = pe.Node(IdentityInterface(fields=OUTPUTS), name="outputnode")
    deltam = pe.Node(ComputeDeltaM(plan=plan), name="deltam", mem_gb=mem_gb)
    fit = pe.Node(FitKineticModel(plan=plan), name="kinetic_fit", mem_gb=mem_gb)
    workflow.connect([
        (inputnode, deltam, [("asl_file", "in_file")]),
        (inputnode, fit, [("m0_file", "m0_file"), ("mask_file", "mask_file")]),
        (deltam, fit, [("out_file", "deltam_file")]),
        (deltam, outputnode, [("mean_file", "mean_deltam")]),
        (fit, outputnode, [
            ("mean_file", "cbf"),
            ("metadata", "cbf_metadata"),
            ("maps", "maps"),
            ("maps_metadata", "maps_metadata"),
        ]),
    ])  # fmt: skip
    return workflow
