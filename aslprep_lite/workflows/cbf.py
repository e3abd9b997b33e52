"""Label-control subtraction and CBF quantification workflow."""

from __future__ import annotations

from typing import Any

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from aslprep_lite.interfaces.cbf import ComputeCBF, ComputeDeltaM


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
        IdentityInterface(fields=["mean_deltam", "cbf", "cbf_timeseries", "cbf_metadata"]),
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
