"""Label-control subtraction and single-delay CBF nodes over :mod:`aslprep_lite.quant`."""

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

from aslprep_lite.images import load_image, save_image
from aslprep_lite.quant.cbf import (
    bolus_durations,
    consensus_cbf,
    finite_or_zero,
    plausibility_warnings,
    slice_delays,
)
from aslprep_lite.quant.deltam import plan_subtraction, subtract
from aslprep_lite.quant.robust import PAIR_AVERAGE_METHODS, average_record, pair_average


class _DeltaMInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="motion-corrected ASL series")
    context = traits.List(traits.Str, mandatory=True, desc="volume type of each volume")
    average = traits.Enum(
        *PAIR_AVERAGE_METHODS, usedefault=True, desc="how the mean ΔM averages the volumes"
    )


class _DeltaMOutputSpec(TraitedSpec):
    out_file = File(desc="ΔM series (control − label and passed-through deltam volumes)")
    mean_file = File(desc="mean ΔM")


class ComputeDeltaM(SimpleInterface):
    """ΔM = control − label for every pair; deltam volumes passed through."""

    input_spec = _DeltaMInputSpec
    output_spec = _DeltaMOutputSpec

    def _run_interface(self, runtime):
        series, img = load_image(self.inputs.in_file)
        subtraction = plan_subtraction(self.inputs.context)
        if subtraction.n_volumes:
            deltam = subtract(series, subtraction)
            self._results["out_file"] = save_image(
                deltam, img, os.path.join(runtime.cwd, "deltam.nii")
            )
            self._results["mean_file"] = save_image(
                pair_average(deltam, self.inputs.average, axis=3),
                img,
                os.path.join(runtime.cwd, "deltam_mean.nii"),
            )
        return runtime


class _CBFInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="motion-corrected ASL series")
    deltam_file = File(desc="ΔM series (absent for cbf-only series)")
    m0_file = File(exists=True, mandatory=True, desc="calibration M0")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    context = traits.List(traits.Str, mandatory=True, desc="volume type of each volume")
    asl_type = traits.Enum("PCASL", "CASL", "PASL", mandatory=True)
    post_labeling_delay = traits.List(
        traits.Float, mandatory=True, desc="PLD (TI for PASL) of each volume, s"
    )
    labeling_duration = traits.List(traits.Float, desc="(P)CASL: τ of each volume, s")
    bolus_cutoff_technique = traits.Enum(None, "QUIPSS", "QUIPSSII", "Q2TIPS", desc="PASL")
    bolus_cutoff_delay = traits.List(traits.Float, desc="PASL: BolusCutOffDelayTime, s")
    slice_timing = traits.List(traits.Float, desc="2D readouts: time of each slice, s")
    slice_axis = traits.Int(2, usedefault=True, desc="array axis of the slices")
    quantification = traits.Dict(
        mandatory=True, desc="constants with sources (quant.constants.quantification_record)"
    )
    metadata = traits.Dict(
        usedefault=True, desc="fixed sidecar fields: model and timing as acquired"
    )
    average = traits.Enum(
        *PAIR_AVERAGE_METHODS, usedefault=True, desc="how the CBF volumes are averaged"
    )


class _CBFOutputSpec(TraitedSpec):
    timeseries_file = File(exists=True, desc="CBF of every ΔM (and cbf) volume")
    mean_file = File(exists=True, desc="mean CBF")
    metadata = traits.Dict(desc="quantification parameters with their sources")


class ComputeCBF(SimpleInterface):
    """CBF (mL/100 g/min) of every ΔM volume and their mean, Alsop et al. 2015."""

    input_spec = _CBFInputSpec
    output_spec = _CBFOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        series, img = load_image(inputs.in_file)
        m0, _ = load_image(inputs.m0_file)
        mask = load_image(inputs.mask_file)[0] > 0
        context = inputs.context
        constants = inputs.quantification
        meta = dict(inputs.metadata)

        volumes = []
        subtraction = plan_subtraction(context)
        if subtraction.n_volumes:
            deltam, _ = load_image(inputs.deltam_file)
            source = list(subtraction.source)
            delay = np.asarray(inputs.post_labeling_delay)[source]
            if inputs.slice_timing:
                delay = slice_delays(
                    delay, inputs.slice_timing, ndim=4, slice_axis=inputs.slice_axis
                )
                meta["PerSliceDelay"] = "PLD + SliceTiming − min(SliceTiming) per slice"
            labeling = (
                np.asarray(inputs.labeling_duration)[source] if inputs.labeling_duration else None
            )
            duration = bolus_durations(
                inputs.asl_type,
                delay,
                labeling,
                inputs.bolus_cutoff_technique,
                inputs.bolus_cutoff_delay or None,
            )
            cbf = consensus_cbf(
                deltam,
                m0,
                asl_type=inputs.asl_type,
                delay=delay,
                duration=duration,
                t1_blood=constants["BloodT1"]["Value"],
                labeling_efficiency=constants["LabelingEfficiency"]["Value"],
                partition_coefficient=constants["PartitionCoefficient"]["Value"],
            )
            volumes.append((list(subtraction.control), cbf))
        cbf_idx = [i for i, kind in enumerate(context) if kind == "cbf"]
        if cbf_idx:
            volumes.append((cbf_idx, series[..., cbf_idx]))
            meta["PassedThroughCBFVolumes"] = len(cbf_idx)
        order = np.argsort(np.concatenate([np.asarray(idx) for idx, _ in volumes]), kind="stable")
        timeseries = np.concatenate([vol for _, vol in volumes], axis=3)[..., order]
        # Outside the brain there is no perfusion to report.
        timeseries = finite_or_zero(np.where(mask[..., np.newaxis], timeseries, 0.0))
        mean = pair_average(timeseries, inputs.average, axis=3)
        meta["NumberOfVolumesAveraged"] = int(timeseries.shape[3])
        meta["PairAverage"] = average_record(inputs.average)
        meta["QualityWarnings"] = [
            *meta.get("QualityWarnings", []),
            *plausibility_warnings(mean, mask),
        ]
        meta["Quantification"] = constants

        self._results["timeseries_file"] = save_image(
            timeseries, img, os.path.join(runtime.cwd, "cbf_timeseries.nii")
        )
        self._results["mean_file"] = save_image(mean, img, os.path.join(runtime.cwd, "cbf.nii"))
        self._results["metadata"] = meta
        return runtime
