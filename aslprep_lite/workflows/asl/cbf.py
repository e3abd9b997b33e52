"""Label-control subtraction and CBF quantification: one factory, single- or multi-delay."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from aslprep_lite.bids.asl_run import AslRun
from aslprep_lite.bids.derivatives import ASL_DERIVATIVES
from aslprep_lite.config import QuantificationOptions
from aslprep_lite.interfaces.cbf import ComputeCBF, ComputeDeltaM
from aslprep_lite.interfaces.kinetic import FitKineticModel
from aslprep_lite.quant import constants
from aslprep_lite.quant.kinetic import ATT_PRIOR_FWHM
from aslprep_lite.quant.robust import HUBER_K, MAD_TO_SD

#: The maps of a multi-delay fit: the derivatives whose sidecars carry the fit's "map" block.
FIT_MAPS = [d.key for d in ASL_DERIVATIVES if "map" in d.blocks]
#: Outputs of :func:`init_cbf_wf`; the maps are named by their key in the output spec.
OUTPUTS = ["mean_deltam", "cbf", "cbf_timeseries", "cbf_metadata", *FIT_MAPS, "maps_metadata"]

#: The PASL consensus equation by bolus cut-off technique (Alsop et al. 2015, eq. 2).
_PASL_EQUATION = {
    "QUIPSS": ("(TI − TI1)", "QUIPSS (Wong et al. 1998)"),
    "QUIPSSII": ("TI1", "QUIPSS II (Wong et al. 1998)"),
    "Q2TIPS": ("TI1", "Q2TIPS (Luh et al. 1999)"),
}


def _deltam_methods(context: Sequence[str]) -> str:
    """Where ΔM came from: pairs subtracted here, or ΔM volumes computed on the scanner."""
    pairs = "control" in context and "label" in context
    scanner = "deltam" in context
    text = []
    if pairs:
        text.append(
            "Perfusion-weighted images were computed as ΔM = control − label for each pair "
            "of volumes."
        )
    if scanner:
        text.append(
            ("ΔM volumes" if pairs else "The ΔM volumes")
            + " computed on the scanner (deltam) were used as acquired."
        )
    return " ".join(text)


_SLICE_TIMING = " For the 2D readout the delay of each slice included its acquisition time."


def quantification_of(run: AslRun) -> dict[str, Any]:
    """The constants ``run`` is quantified with (:func:`constants.quantification_record`)."""
    return constants.quantification_record(
        field_strength=run.field_strength,
        asl_type=run.asl_type,
        labeling_efficiency_given=run.labeling_efficiency,
        background_suppression=run.background_suppression,
        bs_pulses=run.bs_pulses,
    )


def init_cbf_wf(run: AslRun, options: QuantificationOptions, *, mem_gb: float, name="cbf_wf"):
    """Subtract label from control and quantify CBF.

    Single-delay runs use the consensus model (Alsop et al. 2015); multi-delay runs fit the
    general kinetic model (Buxton et al. 1998). Nodes get only the timing, constants and
    options they use, read here from ``run`` and ``options``.

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
        Single-delay runs: CBF of every ΔM volume.
    cbf_metadata
        Model, timing and every constant used, with sources.
    att, cbf_stderr, att_stderr, fit_rsquared, fit_failed, cbf_longestdelay, abv, abat
        Multi-delay runs: the maps of the fit (see :mod:`aslprep_lite.bids.derivatives`).
    maps_metadata
        Multi-delay runs: sidecar fields of those maps that depend on the run.
    """
    quantification = quantification_of(run)
    timing = {
        "context": run.context,
        "asl_type": run.asl_type,
        "post_labeling_delay": run.post_labeling_delay,
        "labeling_duration": run.labeling_duration or [],
        "bolus_cutoff_technique": run.bolus_cutoff_technique,
        "bolus_cutoff_delay": run.bolus_cutoff_delay or [],
        "slice_timing": run.slice_timing or [],
        "slice_axis": run.slice_axis,
        "quantification": quantification,
    }
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = cbf_methods(run, options, quantification)
    # What validation found, for the CBF sidecars: filled-in values, left-out volumes and
    # warnings known before processing (the nodes add their own).
    found: dict[str, Any] = {}
    if run.assumed_metadata:
        found["AssumedMetadata"] = run.assumed_metadata
    if run.unpaired_volumes:
        found["VolumesLeftOut"] = {
            "Volumes": run.unpaired_volumes,
            "Reason": "unpaired: no label (or control) left to pair with; the other volumes "
            "were paired in acquisition order",
        }
    if run.quality_warnings:
        found["QualityWarnings"] = run.quality_warnings
    inputnode = pe.Node(
        IdentityInterface(fields=["asl_file", "m0_file", "mask_file"]), name="inputnode"
    )
    outputnode = pe.Node(IdentityInterface(fields=OUTPUTS), name="outputnode")
    deltam = pe.Node(ComputeDeltaM(context=run.context), name="deltam", mem_gb=mem_gb)
    if options.applies("pair_average", multidelay=run.is_multidelay):
        deltam.inputs.average = options.pair_average
    workflow.connect([
        (inputnode, deltam, [("asl_file", "in_file")]),
        (deltam, outputnode, [("mean_file", "mean_deltam")]),
    ])  # fmt: skip
    if run.is_multidelay:
        _connect_kinetic_fit(workflow, run, options, timing, found, mem_gb)
    else:
        _connect_consensus(workflow, run, options, timing, found, mem_gb)
    return workflow


def _connect_consensus(
    workflow, run: AslRun, options, timing: dict[str, Any], found: dict, mem_gb: float
):
    """Single delay: the consensus formula on every ΔM volume, then their mean."""
    metadata: dict[str, Any] = {"Model": run.model(options), **found}
    if run.has_deltam and run.asl_type == "PASL":
        metadata["InversionTime"] = run.labeled_value("post_labeling_delay")
        metadata["BolusCutOffTechnique"] = run.bolus_cutoff_technique
        metadata["BolusCutOffDelayTime"] = run.bolus_cutoff_delay
    elif run.has_deltam:
        metadata["PostLabelingDelay"] = run.labeled_value("post_labeling_delay")
        metadata["LabelingDuration"] = run.labeled_value("labeling_duration")
    cbf = pe.Node(
        ComputeCBF(**timing, metadata=metadata, average=options.pair_average),
        name="cbf",
        mem_gb=mem_gb,
    )
    inputnode, outputnode = workflow.get_node("inputnode"), workflow.get_node("outputnode")
    workflow.connect([
        (inputnode, cbf, [
            ("asl_file", "in_file"),
            ("m0_file", "m0_file"),
            ("mask_file", "mask_file"),
        ]),
        (workflow.get_node("deltam"), cbf, [("out_file", "deltam_file")]),
        (cbf, outputnode, [
            ("mean_file", "cbf"),
            ("timeseries_file", "cbf_timeseries"),
            ("metadata", "cbf_metadata"),
        ]),
    ])  # fmt: skip


def _connect_kinetic_fit(
    workflow, run: AslRun, options, timing: dict[str, Any], found: dict, mem_gb: float
):
    """Multi-delay: the general kinetic model fitted at every voxel of the mask."""
    metadata = {
        **found,
        "Model": run.model(options),
        "PostLabelingDelay" if run.asl_type != "PASL" else "InversionTime": run.delays,
    }
    fit = pe.Node(
        FitKineticModel(**timing, att_method=options.att_method, metadata=metadata),
        name="kinetic_fit",
        mem_gb=mem_gb,
    )
    for name in ("att_prior", "arterial_component"):  # only where they act (--att-method fit)
        if options.applies(name, multidelay=True):
            setattr(fit.inputs, name, getattr(options, name))
    inputnode, outputnode = workflow.get_node("inputnode"), workflow.get_node("outputnode")
    workflow.connect([
        (inputnode, fit, [("m0_file", "m0_file"), ("mask_file", "mask_file")]),
        (workflow.get_node("deltam"), fit, [("out_file", "deltam_file")]),
        (fit, outputnode, [
            ("mean_file", "cbf"),
            ("metadata", "cbf_metadata"),
            ("maps_metadata", "maps_metadata"),
        ] + [(key, key) for key in FIT_MAPS]),
    ])  # fmt: skip


def cbf_methods(run: AslRun, options: QuantificationOptions, quantification: dict) -> str:
    """The methods paragraph of the quantification, true for this run and these options."""
    alpha = quantification["LabelingEfficiency"]["Value"]
    if run.background_suppression and run.bs_pulses and run.labeling_efficiency is None:
        efficiency = (
            f"labeling efficiency α = {alpha:.3g}, including the loss of {run.bs_pulses} "
            "background-suppression inversion pulses (Garcia et al. 2005)"
        )
    else:
        efficiency = f"labeling efficiency α = {alpha:.3g}"
    lam = quantification["PartitionCoefficient"]["Value"]
    constants_text = (
        f"λ = {lam:g} mL/g, blood T1 = {quantification['BloodT1']['Value']:g} s at "
        f"{run.field_strength:g} T and {efficiency} (values and sources in the CBF sidecar)"
    )
    slices = _SLICE_TIMING if run.slice_timing else ""
    if not run.has_deltam:
        average = (
            f" by the Huber M-estimate of location (Huber 1964; k = {HUBER_K})"
            if options.pair_average == "huber"
            else ""
        )
        return (
            "The series held CBF volumes computed on the scanner; they were passed through "
            f"and averaged{average}, without calibration."
        )
    if run.is_multidelay:
        return _multidelay_methods(run, options) + f" Constants: {constants_text}." + slices
    if run.asl_type == "PASL":
        width, technique = _PASL_EQUATION[run.bolus_cutoff_technique]
        equation = (
            f"CBF = 6000·λ·ΔM·exp(TI/T1b) / (2·α·{width}·M0) for PASL with {technique} "
            "bolus cut-off"
        )
    else:
        equation = (
            f"CBF = 6000·λ·ΔM·exp(PLD/T1b) / (2·α·T1b·M0·(1 − exp(−τ/T1b))) for {run.asl_type}"
        )
    return (
        f"{_deltam_methods(run.context)} Cerebral blood flow was quantified with the "
        "single-compartment model recommended by the ASL consensus (Alsop et al. 2015): "
        f"{equation}, with {constants_text}.{slices}{_average_methods(options)}"
    )


def _average_methods(options: QuantificationOptions) -> str:
    """How the per-pair CBF volumes were averaged (nothing to add for the plain mean)."""
    if options.pair_average != "huber":
        return ""
    return (
        " The CBF volumes of the pairs were averaged at each voxel by the Huber M-estimate of "
        f"location (Huber 1964; k = {HUBER_K} robust SDs, scale {MAD_TO_SD} times the median "
        "absolute deviation), which limits the pull of outlying pairs; as CBF is proportional "
        "to ΔM at a voxel, this is the CBF of the Huber average of the ΔM pairs."
    )


def _multidelay_methods(run: AslRun, options: QuantificationOptions) -> str:
    local = options.att_method == "fit" and options.att_prior == "local"
    att = (
        "the arterial transit time (ATT) read off the signal-weighted mean delay (Dai et al. "
        "2012), CBF then fitted at that ATT"
        if options.att_method == "weighted-delay"
        else "CBF and the arterial transit time (ATT) fitted together by least squares (a grid "
        "search over ATT with CBF solved in closed form, then Levenberg-Marquardt, vectorized "
        "over voxels)"
        + (
            ", ATT regularized by a Gaussian prior per voxel whose mean and SD were those of "
            "the least-squares ATTs of a first fit in its neighbourhood "
            f"({ATT_PRIOR_FWHM:g} mm FWHM; empirical Bayes, Efron & Morris 1975), i.e. maximum "
            "a posteriori estimates with the voxel's own noise variance"
            if local
            else ""
        )
    )
    arterial = options.att_method == "fit" and options.arterial_component
    return (
        f"{_deltam_methods(run.context)} For this multi-delay acquisition "
        f"({len(run.delays)} delays) the general kinetic model (Buxton et al. 1998), a single "
        "well-mixed compartment whose label relaxes with the blood T1 as in the consensus "
        "model (Alsop et al. 2015; Woods et al. 2024), was fitted to ΔM at every voxel of the "
        f"brain mask, with {att}"
        + (
            ", and a macrovascular component (arterial blood volume and arrival time; "
            "Chappell et al. 2010), kept where an F-test supported it"
            if arterial
            else ""
        )
        + ". Standard errors came from the Jacobian at the solution"
        + (" (posterior SDs under the prior)" if local else "")
        + "; voxels where the fit failed are flagged in a mask. For comparison, CBF was also "
        "computed with the single-delay consensus formula from the volumes at the longest delay."
    )
