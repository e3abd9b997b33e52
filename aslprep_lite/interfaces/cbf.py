"""Label-control subtraction and CBF quantification nodes over :mod:`aslprep_lite.quant`."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from aslprep_lite.bids import RunPlan
from aslprep_lite.images import load_image, save_image
from aslprep_lite.quant import constants
from aslprep_lite.quant.cbf import (
    consensus_cbf,
    implausible_cbf,
    pasl_bolus_duration,
    slice_delays,
)
from aslprep_lite.quant.deltam import plan_subtraction, subtract


class _DeltaMInputSpec(BaseInterfaceInputSpec):
    plan = traits.Dict(mandatory=True, desc="RunPlan.as_dict() of the run")
    in_file = File(exists=True, mandatory=True, desc="motion-corrected ASL series")


class _DeltaMOutputSpec(TraitedSpec):
    out_file = File(desc="ΔM series (control − label and passed-through deltam volumes)")
    mean_file = File(desc="mean ΔM")


class ComputeDeltaM(SimpleInterface):
    """ΔM = control − label for every pair; deltam volumes passed through."""

    input_spec = _DeltaMInputSpec
    output_spec = _DeltaMOutputSpec

    def _run_interface(self, runtime):
        series, img = load_image(self.inputs.in_file)
        subtraction = plan_subtraction(self.inputs.plan["context"])
        if subtraction.n_volumes:
            deltam = subtract(series, subtraction)
            self._results["out_file"] = save_image(
                deltam, img, os.path.join(runtime.cwd, "deltam.nii")
            )
            self._results["mean_file"] = save_image(
                deltam.mean(axis=3), img, os.path.join(runtime.cwd, "deltam_mean.nii")
            )
        return runtime


class _CBFInputSpec(BaseInterfaceInputSpec):
    plan = traits.Dict(mandatory=True, desc="RunPlan.as_dict() of the run")
    in_file = File(exists=True, mandatory=True, desc="motion-corrected ASL series")
    deltam_file = File(desc="ΔM series (absent for cbf-only series)")
    m0_file = File(exists=True, mandatory=True, desc="calibration M0")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")


class _CBFOutputSpec(TraitedSpec):
    timeseries_file = File(exists=True, desc="CBF of every ΔM (and cbf) volume")
    mean_file = File(exists=True, desc="mean CBF")
    metadata = traits.Dict(desc="quantification parameters with their sources")


def quantification_parameters(plan: dict[str, Any]) -> dict[str, Any]:
    """The constants and timing a run is quantified with, each with its source."""
    t1b = constants.blood_t1(plan["field_strength"])
    alpha = constants.labeling_efficiency(
        plan["asl_type"],
        given=plan["labeling_efficiency"],
        background_suppression=plan["background_suppression"],
        bs_pulses=plan["bs_pulses"],
    )
    params = {
        "PartitionCoefficient": constants.scalar("partition_coefficient").as_json(),
        "BloodT1": t1b.as_json(),
        "LabelingEfficiency": alpha.as_json(),
        "UnitConversion": constants.scalar("unit_conversion").as_json(),
    }
    cited = " ".join(entry["Source"] for entry in params.values()) + " Alsop2015"
    params["References"] = {
        key: text for key, text in sorted(constants.table()["references"].items()) if key in cited
    }
    return params


class ComputeCBF(SimpleInterface):
    """CBF (mL/100 g/min) of every ΔM volume and their mean, Alsop et al. 2015."""

    input_spec = _CBFInputSpec
    output_spec = _CBFOutputSpec

    def _run_interface(self, runtime):
        plan = self.inputs.plan
        series, img = load_image(self.inputs.in_file)
        m0, _ = load_image(self.inputs.m0_file)
        mask, _ = load_image(self.inputs.mask_file)
        mask = mask > 0
        context = plan["context"]
        params = quantification_parameters(plan)

        volumes = []
        run = RunPlan(**plan)
        meta: dict[str, Any] = {"Model": run.model}
        subtraction = plan_subtraction(context)
        if subtraction.n_volumes:
            deltam, _ = load_image(self.inputs.deltam_file)
            source = list(subtraction.source)
            delay = np.asarray(plan["post_labeling_delay"])[source]
            if plan["slice_timing"]:
                delay = slice_delays(
                    delay, plan["slice_timing"], ndim=4, slice_axis=plan["slice_axis"]
                )
                meta["PerSliceDelay"] = "PLD + SliceTiming − min(SliceTiming) per slice"
            if plan["asl_type"] == "PASL":
                duration = pasl_bolus_duration(
                    plan["bolus_cutoff_technique"], delay, plan["bolus_cutoff_delay"]
                )
                meta["InversionTime"] = run.labeled_value("post_labeling_delay")
                meta["BolusCutOffTechnique"] = plan["bolus_cutoff_technique"]
                meta["BolusCutOffDelayTime"] = plan["bolus_cutoff_delay"]
            else:
                duration = np.asarray(plan["labeling_duration"])[source]
                meta["PostLabelingDelay"] = run.labeled_value("post_labeling_delay")
                meta["LabelingDuration"] = run.labeled_value("labeling_duration")
            cbf = consensus_cbf(
                deltam,
                m0,
                asl_type=plan["asl_type"],
                delay=delay,
                duration=duration,
                t1_blood=params["BloodT1"]["Value"],
                labeling_efficiency=params["LabelingEfficiency"]["Value"],
                partition_coefficient=params["PartitionCoefficient"]["Value"],
            )
            volumes.append((list(subtraction.control), cbf))
        cbf_idx = [i for i, kind in enumerate(context) if kind == "cbf"]
        if cbf_idx:
            volumes.append((cbf_idx, series[..., cbf_idx]))
            meta["PassedThroughCBFVolumes"] = len(cbf_idx)
        order = np.argsort(np.concatenate([np.asarray(idx) for idx, _ in volumes]), kind="stable")
        timeseries = np.concatenate([vol for _, vol in volumes], axis=3)[..., order]
        # Outside the brain there is no perfusion to report; NaN/inf never reach an output.
        timeseries = np.where(mask[..., np.newaxis], timeseries, 0.0)
        timeseries = np.nan_to_num(timeseries, nan=0.0, posinf=0.0, neginf=0.0)
        mean = timeseries.mean(axis=3)
        meta["NumberOfVolumesAveraged"] = int(timeseries.shape[3])
        bounds = constants.table()["plausible_cbf"]["values"]
        warning = implausible_cbf(mean, mask, bounds["low"], bounds["high"])
        meta["QualityWarnings"] = [warning] if warning else []
        meta["Quantification"] = params

        self._results["timeseries_file"] = save_image(
            timeseries, img, os.path.join(runtime.cwd, "cbf_timeseries.nii")
        )
        self._results["mean_file"] = save_image(mean, img, os.path.join(runtime.cwd, "cbf.nii"))
        self._results["metadata"] = meta
        return runtime
