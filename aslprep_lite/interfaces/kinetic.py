"""Multi-delay quantification node: the general kinetic model fitted over the brain mask."""

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
from aslprep_lite.interfaces.cbf import quantification_parameters
from aslprep_lite.quant import constants as quant_constants
from aslprep_lite.quant import kinetic
from aslprep_lite.quant.cbf import consensus_cbf, implausible_cbf, slice_delays
from aslprep_lite.quant.deltam import plan_subtraction

#: Fit settings written to the sidecar (the defaults of :func:`kinetic.fit_multidelay`).
FIT_SETTINGS = {
    "CBFBounds": [-100.0, 500.0],
    "ABVBounds": [0.0, 0.1],
    "ABATBounds": [0.0, 3.0],
    "ATTGridStep": 0.05,
    "MaxIterations": 100,
    "ArterialDispersion": 0.1,
    "Optimizer": "ATT grid with closed-form CBF, then Levenberg-Marquardt on all voxels at once",
}
FAILURE_CODES = {
    str(kinetic.FAIL_INPUT): "non-finite ΔM or M0",
    str(kinetic.FAIL_NOT_CONVERGED): "not converged",
    str(kinetic.FAIL_AT_BOUNDS): "a parameter ended on a bound",
    str(kinetic.FAIL_SINGULAR): "parameters not separately determined (singular JᵀJ)",
    str(kinetic.FAIL_NONFINITE): "non-finite result",
}


class _FitInputSpec(BaseInterfaceInputSpec):
    plan = traits.Dict(mandatory=True, desc="RunPlan.as_dict() of the run")
    deltam_file = File(exists=True, mandatory=True, desc="ΔM series")
    m0_file = File(exists=True, mandatory=True, desc="calibration M0")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")


class _FitOutputSpec(TraitedSpec):
    mean_file = File(exists=True, desc="fitted CBF")
    metadata = traits.Dict(desc="model, fit settings, constants, with sources")
    maps = traits.Dict(desc="{derivative suffix: file} of the other parameter maps")
    maps_metadata = traits.Dict(desc="{derivative suffix: sidecar}")


class FitKineticModel(SimpleInterface):
    """CBF and arterial transit time from multi-delay ΔM (Buxton et al. 1998)."""

    input_spec = _FitInputSpec
    output_spec = _FitOutputSpec

    def _run_interface(self, runtime):
        plan = RunPlan(**self.inputs.plan)
        deltam, img = load_image(self.inputs.deltam_file)
        m0, _ = load_image(self.inputs.m0_file)
        mask = load_image(self.inputs.mask_file)[0] > 0
        params = quantification_parameters(self.inputs.plan)
        constants = {
            "asl_type": plan.asl_type,
            "t1_blood": params["BloodT1"]["Value"],
            "labeling_efficiency": params["LabelingEfficiency"]["Value"],
            "partition_coefficient": params["PartitionCoefficient"]["Value"],
        }
        source = list(plan_subtraction(plan.context).source)
        delays = np.asarray(plan.post_labeling_delay, dtype=np.float64)[source]
        if plan.asl_type == "PASL":  # QUIPSS II / Q2TIPS: the bolus is cut at TI1
            durations = np.full(delays.shape, plan.bolus_cutoff_delay[0])
        else:
            durations = np.asarray(plan.labeling_duration, dtype=np.float64)[source]
        offsets = None
        if plan.slice_timing:
            per_slice = slice_delays(0.0, plan.slice_timing, ndim=3, slice_axis=plan.slice_axis)
            offsets = np.broadcast_to(per_slice, mask.shape)[mask]
        signal, m0_vox = deltam[mask].astype(np.float64), m0[mask].astype(np.float64)

        maps: dict[str, np.ndarray] = {}
        arterial_voxels = None
        att_bounds = (0.0, kinetic.att_upper_bound(delays, plan.asl_type))
        prior_record: dict[str, Any] | None = None
        if plan.att_method == "fit":
            options = {
                "att_bounds": att_bounds,
                "delay_offset": offsets,
                "att_prior": None,
                **constants,
            }
            if plan.att_prior == "local":
                zooms = img.header.get_zooms()[:3]
                options["att_prior"] = lambda fit: kinetic.local_att_prior(fit.att, mask, zooms)
            args = (signal, m0_vox, delays, durations)
            if plan.arterial_component:
                fit, kept = kinetic.fit_with_arterial_selection(*args, **options)
                arterial_voxels = int(kept.sum())
            else:
                fit = kinetic.fit_multidelay(*args, **options)
            if plan.att_prior == "local":
                prior_record = _prior_record(fit.att_prior)
            cbf, failed = fit.cbf, fit.failed
            maps["att.nii.gz"] = fit.att
            maps["desc-stderr_att.nii.gz"] = fit.att_se
            maps["desc-fitrsquared_cbf.nii.gz"] = fit.r2
            maps["desc-stderr_cbf.nii.gz"] = fit.cbf_se
            if plan.arterial_component:
                maps["abv.nii.gz"] = fit.abv
                maps["abat.nii.gz"] = fit.abat
            codes, counts = np.unique(fit.reason[fit.failed], return_counts=True)
            failures = {str(int(c)): int(n) for c, n in zip(codes, counts, strict=True)}
        else:
            att, in_range = self._weighted_delay(signal, delays, durations, offsets, constants)
            cbf, cbf_se = kinetic.cbf_at_fixed_att(
                signal, m0_vox, att, delays, durations, delay_offset=offsets, **constants
            )
            failed = ~in_range | ~np.isfinite(cbf)
            maps["att.nii.gz"] = att
            maps["desc-stderr_cbf.nii.gz"] = cbf_se
            failures = {"weighted delay out of range or undefined": int(failed.sum())}
        maps["desc-longestdelay_cbf.nii.gz"] = self._longest_delay_cbf(
            signal, m0_vox, delays, durations, offsets, constants
        )
        maps["desc-fitfailed_mask.nii.gz"] = failed

        # NaN/inf never reach an output: undefined values are 0 and flagged in the mask.
        def to_volume(values: np.ndarray) -> np.ndarray:
            volume = np.zeros(mask.shape, dtype=np.float64)
            volume[mask] = np.nan_to_num(
                values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0
            )
            return volume

        files, sidecars = {}, {}
        for suffix, values in maps.items():
            is_mask = suffix.endswith("_mask.nii.gz")
            files[suffix] = save_image(
                to_volume(values),
                img,
                os.path.join(runtime.cwd, suffix.replace(".nii.gz", ".nii")),
                dtype=np.uint8 if is_mask else np.float32,
            )
            sidecars[suffix] = _map_sidecar(suffix, plan)
        cbf_volume = to_volume(cbf)
        self._results["mean_file"] = save_image(
            cbf_volume, img, os.path.join(runtime.cwd, "cbf.nii")
        )
        bounds = quant_constants.table()["plausible_cbf"]["values"]
        warning = implausible_cbf(cbf_volume, mask, bounds["low"], bounds["high"])
        self._results["maps"] = files
        self._results["maps_metadata"] = sidecars
        volumes_per_delay = {f"{d:g}": int((delays == d).sum()) for d in np.unique(delays)}
        self._results["metadata"] = {
            "Description": "Cerebral blood flow from the kinetic-model fit over all delays",
            "QualityWarnings": [warning] if warning else [],
            "Model": plan.model,
            "PostLabelingDelay" if plan.asl_type != "PASL" else "InversionTime": plan.delays,
            "DeltaMVolumesPerDelay": volumes_per_delay,
            "ATTMethod": plan.att_method,
            "ArterialComponent": (
                {
                    "Selection": "per voxel, extra-sum-of-squares F-test against the tissue-only "
                    "model, p < 0.05",
                    "VoxelsWithArterialComponent": arterial_voxels,
                }
                if plan.arterial_component
                else False
            ),
            "FitSettings": {
                **FIT_SETTINGS,
                "ATTBounds": list(att_bounds),
                "ATTBoundsRule": "0 to the longest delay + 0.5 s (kinetic.att_upper_bound)",
                **({"ATTPrior": prior_record or "none"} if plan.att_method == "fit" else {}),
            },
            "FitFailures": failures,
            "FitFailureCodes": FAILURE_CODES,
            "NumberOfVoxelsFitted": int(mask.sum()),
            "Quantification": params,
            **(
                {"PerSliceDelay": "delay + SliceTiming − min(SliceTiming)"}
                if offsets is not None
                else {}
            ),
        }
        return runtime

    @staticmethod
    def _weighted_delay(signal, delays, durations, offsets, constants):
        """Weighted-delay ATT (Dai et al. 2012), one call per slice timing when 2D."""
        att = np.full(signal.shape[0], np.nan)
        in_range = np.zeros(signal.shape[0], dtype=bool)
        groups = np.zeros(signal.shape[0]) if offsets is None else offsets
        for offset in np.unique(groups):
            rows = groups == offset
            result = kinetic.weighted_delay_att(
                signal[rows],
                delays + offset,
                durations,
                asl_type=constants["asl_type"],
                t1_blood=constants["t1_blood"],
            )
            att[rows], in_range[rows] = result.att, result.in_range
        return att, in_range

    @staticmethod
    def _longest_delay_cbf(signal, m0, delays, durations, offsets, constants):
        """The consensus single-delay formula on the longest delay's volumes, for comparison."""
        longest = delays == delays.max()
        mean = signal[:, longest].mean(axis=1)
        delay = delays.max() + (0.0 if offsets is None else offsets)
        return consensus_cbf(mean, m0, delay=delay, duration=durations[longest][0], **constants)


def _prior_record(prior: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """The sidecar's account of the local ATT prior: how it was made and its typical values."""
    mean, sd = (values[np.isfinite(values)] for values in prior)
    return {
        "Type": "Gaussian per voxel, empirical Bayes from this run's least-squares ATTs "
        "(kinetic.local_att_prior): mean and SD of the least-squares ATTs around the voxel",
        "NeighbourhoodFWHM": kinetic.ATT_PRIOR_FWHM,
        "MinimumSD": kinetic.ATT_PRIOR_MIN_SD,
        **(
            {
                "MedianMean": round(float(np.median(mean)), 6),
                "MedianSD": round(float(np.median(sd)), 6),
            }
            if mean.size
            else {}
        ),
    }


def _map_sidecar(suffix: str, plan: RunPlan) -> dict[str, Any]:
    """Units and description of each parameter map."""
    descriptions = {
        "att.nii.gz": ("s", "Arterial transit time"),
        "desc-stderr_att.nii.gz": ("s", "Standard error of the arterial transit time"),
        "desc-stderr_cbf.nii.gz": ("mL/100 g/min", "Standard error of CBF"),
        "desc-fitrsquared_cbf.nii.gz": (
            "1",
            "Goodness of fit: R² of the kinetic curve against the per-delay mean ΔM",
        ),
        "abv.nii.gz": ("mL/mL", "Arterial (macrovascular) blood volume fraction"),
        "abat.nii.gz": ("s", "Arterial bolus arrival time"),
        "desc-longestdelay_cbf.nii.gz": (
            "mL/100 g/min",
            f"CBF from the single-delay consensus formula on the longest delay "
            f"({max(plan.delays):g} s) only, for comparison with the fit",
        ),
        "desc-fitfailed_mask.nii.gz": (
            "1",
            "Voxels where the fit failed (reasons in FitFailures of the CBF sidecar); their "
            "values in the other maps are unreliable (0 where undefined)",
        ),
    }
    units, description = descriptions[suffix]
    if suffix.startswith("desc-stderr") and plan.att_method == "fit" and plan.att_prior == "local":
        description += " (posterior SD under the local ATT prior)"
    return {"Units": units, "Description": description}
