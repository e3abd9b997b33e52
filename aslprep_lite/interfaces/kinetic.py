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
    isdefined,
    traits,
)

from aslprep_lite.bids.derivatives import BY_KEY
from aslprep_lite.images import load_image, save_image
from aslprep_lite.quant import kinetic
from aslprep_lite.quant.cbf import (
    bolus_durations,
    consensus_cbf,
    finite_or_zero,
    plausibility_warnings,
    slice_delays,
)
from aslprep_lite.quant.deltam import plan_subtraction

#: Fit settings written to the sidecar: the defaults of :func:`kinetic.fit_multidelay`.
FIT_SETTINGS = {
    "CBFBounds": list(kinetic.CBF_BOUNDS),
    "ABVBounds": list(kinetic.ABV_BOUNDS),
    "ABATBounds": list(kinetic.ABAT_BOUNDS),
    "ATTGridStep": kinetic.ATT_STEP,
    "MaxIterations": kinetic.MAX_ITER,
    "ArterialDispersion": kinetic.ARTERIAL_DISPERSION,
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
    deltam_file = File(exists=True, mandatory=True, desc="ΔM series")
    m0_file = File(exists=True, mandatory=True, desc="calibration M0")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    context = traits.List(traits.Str, mandatory=True, desc="volume type of each volume")
    asl_type = traits.Enum("PCASL", "CASL", "PASL", mandatory=True)
    post_labeling_delay = traits.List(
        traits.Float, mandatory=True, desc="PLD (TI for PASL) of each volume, s"
    )
    labeling_duration = traits.List(traits.Float, desc="(P)CASL: τ of each volume, s")
    bolus_cutoff_technique = traits.Enum(None, "QUIPSSII", "Q2TIPS", desc="PASL")
    bolus_cutoff_delay = traits.List(traits.Float, desc="PASL: BolusCutOffDelayTime, s")
    slice_timing = traits.List(traits.Float, desc="2D readouts: time of each slice, s")
    slice_axis = traits.Int(2, usedefault=True, desc="array axis of the slices")
    quantification = traits.Dict(
        mandatory=True, desc="constants with sources (quant.constants.quantification_record)"
    )
    att_method = traits.Enum("fit", "weighted-delay", mandatory=True)
    att_prior = traits.Enum("local", "none", desc="--att-method fit only")
    arterial_component = traits.Bool(desc="--att-method fit only")
    metadata = traits.Dict(
        usedefault=True, desc="fixed sidecar fields of the CBF map (model, delays)"
    )


class _FitOutputSpec(TraitedSpec):
    mean_file = File(exists=True, desc="fitted CBF")
    metadata = traits.Dict(desc="model, fit settings, constants, with sources")
    att = File(exists=True, desc="arterial transit time (s)")
    cbf_stderr = File(exists=True, desc="standard error of CBF")
    att_stderr = File(desc="standard error of ATT (fitted ATT only)")
    fit_rsquared = File(desc="R² of the fit (fitted ATT only)")
    fit_failed = File(exists=True, desc="voxels where the fit failed")
    cbf_longestdelay = File(exists=True, desc="consensus CBF of the longest delay alone")
    abv = File(desc="arterial blood volume (--arterial-component)")
    abat = File(desc="arterial bolus arrival time (--arterial-component)")
    maps_metadata = traits.Dict(desc="{derivative key: sidecar fields set by this run}")


class FitKineticModel(SimpleInterface):
    """CBF and arterial transit time from multi-delay ΔM (Buxton et al. 1998)."""

    input_spec = _FitInputSpec
    output_spec = _FitOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        deltam, img = load_image(inputs.deltam_file)
        m0, _ = load_image(inputs.m0_file)
        mask = load_image(inputs.mask_file)[0] > 0
        params = inputs.quantification
        constants = {
            "asl_type": inputs.asl_type,
            "t1_blood": params["BloodT1"]["Value"],
            "labeling_efficiency": params["LabelingEfficiency"]["Value"],
            "partition_coefficient": params["PartitionCoefficient"]["Value"],
        }
        source = list(plan_subtraction(inputs.context).source)
        delays = np.asarray(inputs.post_labeling_delay, dtype=np.float64)[source]
        labeling = inputs.labeling_duration or None
        durations = bolus_durations(
            inputs.asl_type,
            delays,
            np.asarray(labeling, dtype=np.float64)[source] if labeling else None,
            inputs.bolus_cutoff_technique,
            inputs.bolus_cutoff_delay or None,
        )
        offsets = None
        if inputs.slice_timing:
            per_slice = slice_delays(
                0.0, inputs.slice_timing, ndim=3, slice_axis=inputs.slice_axis
            )
            offsets = np.broadcast_to(per_slice, mask.shape)[mask]
        signal, m0_vox = deltam[mask].astype(np.float64), m0[mask].astype(np.float64)

        maps: dict[str, np.ndarray] = {}
        arterial_voxels = None
        att_bounds = (0.0, kinetic.att_upper_bound(delays, inputs.asl_type))
        prior_record: dict[str, Any] | None = None
        fitted = inputs.att_method == "fit"
        arterial = fitted and isdefined(inputs.arterial_component) and inputs.arterial_component
        if fitted:
            options = {
                "att_bounds": att_bounds,
                "delay_offset": offsets,
                "att_prior": None,
                **constants,
            }
            if inputs.att_prior == "local":
                zooms = img.header.get_zooms()[:3]
                options["att_prior"] = lambda fit: kinetic.local_att_prior(fit.att, mask, zooms)
            args = (signal, m0_vox, delays, durations)
            if arterial:
                fit, kept = kinetic.fit_with_arterial_selection(*args, **options)
                arterial_voxels = int(kept.sum())
            else:
                fit = kinetic.fit_multidelay(*args, **options)
            if inputs.att_prior == "local":
                prior_record = _prior_record(fit.att_prior)
            cbf, failed = fit.cbf, fit.failed
            maps["att"] = fit.att
            maps["att_stderr"] = fit.att_se
            maps["fit_rsquared"] = fit.r2
            maps["cbf_stderr"] = fit.cbf_se
            if arterial:
                maps["abv"] = fit.abv
                maps["abat"] = fit.abat
            codes, counts = np.unique(fit.reason[fit.failed], return_counts=True)
            failures = {str(int(c)): int(n) for c, n in zip(codes, counts, strict=True)}
        else:
            att, in_range = self._weighted_delay(signal, delays, durations, offsets, constants)
            cbf, cbf_se = kinetic.cbf_at_fixed_att(
                signal, m0_vox, att, delays, durations, delay_offset=offsets, **constants
            )
            failed = ~in_range | ~np.isfinite(cbf)
            maps["att"] = att
            maps["cbf_stderr"] = cbf_se
            failures = {"weighted delay out of range or undefined": int(failed.sum())}
        maps["cbf_longestdelay"] = self._longest_delay_cbf(
            signal, m0_vox, delays, durations, offsets, constants
        )
        maps["fit_failed"] = failed

        def to_volume(values: np.ndarray) -> np.ndarray:
            volume = np.zeros(mask.shape, dtype=np.float64)
            volume[mask] = finite_or_zero(values)  # undefined values are 0, flagged in the mask
            return volume

        for key, values in maps.items():
            self._results[key] = save_image(
                to_volume(values),
                img,
                os.path.join(runtime.cwd, f"{key}.nii"),
                dtype=np.uint8 if key == "fit_failed" else np.float32,
            )
        posterior = fitted and inputs.att_prior == "local"
        self._results["maps_metadata"] = _maps_metadata(float(delays.max()), posterior)
        cbf_volume = to_volume(cbf)
        self._results["mean_file"] = save_image(
            cbf_volume, img, os.path.join(runtime.cwd, "cbf.nii")
        )
        volumes_per_delay = {f"{d:g}": int((delays == d).sum()) for d in np.unique(delays)}
        self._results["metadata"] = {
            **inputs.metadata,
            "Description": "Cerebral blood flow from the kinetic-model fit over all delays",
            "QualityWarnings": [
                *inputs.metadata.get("QualityWarnings", []),
                *plausibility_warnings(cbf_volume, mask),
            ],
            "DeltaMVolumesPerDelay": volumes_per_delay,
            "ATTMethod": inputs.att_method,
            "ArterialComponent": (
                {
                    "Selection": "per voxel, extra-sum-of-squares F-test against the tissue-only "
                    "model, p < 0.05",
                    "VoxelsWithArterialComponent": arterial_voxels,
                }
                if arterial
                else False
            ),
            "FitSettings": {
                **FIT_SETTINGS,
                "ATTBounds": list(att_bounds),
                "ATTBoundsRule": "0 to the longest delay + 0.5 s (kinetic.att_upper_bound)",
                **({"ATTPrior": prior_record or "none"} if fitted else {}),
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


def _maps_metadata(longest_delay: float, posterior: bool) -> dict[str, dict[str, str]]:
    """The parts of the maps' sidecars that depend on the run (the rest is in the spec)."""
    metadata = {
        "cbf_longestdelay": {
            "Description": "CBF from the single-delay consensus formula on the longest delay "
            f"({longest_delay:g} s) only, for comparison with the fit"
        }
    }
    if posterior:  # the standard errors are posterior SDs under the prior
        for key in ("cbf_stderr", "att_stderr"):
            description = BY_KEY[key].description
            metadata[key] = {
                "Description": f"{description} (posterior SD under the local ATT prior)"
            }
    return metadata
