"""The per-run summary that ``--dry-run`` prints as JSON."""

from __future__ import annotations

from typing import Any

from aslprep_lite.bids.asl_run import AslRun
from aslprep_lite.bids.derivatives import planned_paths
from aslprep_lite.config import QuantificationOptions


def run_summary(run: AslRun, options: QuantificationOptions) -> dict[str, Any]:
    """What aslprep-lite will do with ``run`` under ``options``, for a person to read."""
    return {
        "asl_file": run.asl_file,
        "subject": run.subject,
        "session": run.session,
        "volumes": run.volume_counts,
        "dummy_scans": run.dummy_scans,
        "labeling": run.asl_type,
        "model": run.model(options),
        "post_labeling_delay": run.labeled_value("post_labeling_delay"),
        "volumes_per_delay": run.volumes_per_delay,
        "labeling_duration": run.labeled_value("labeling_duration"),
        "bolus_cutoff": (
            {"technique": run.bolus_cutoff_technique, "delay": run.bolus_cutoff_delay}
            if run.asl_type == "PASL"
            else None
        ),
        "readout": (
            "2D (per-slice delay from SliceTiming)"
            if run.slice_timing
            else run.mr_acquisition_type
        ),
        "m0": {
            "type": run.m0_type,
            "file": run.m0_file,
            "repetition_time": run.m0_repetition_time,
            "estimate": run.m0_estimate,
        },
        "head_motion_correction": run.hmc_summary,
        "background_suppression": {
            "enabled": run.background_suppression,
            "pulses": run.bs_pulses,
        },
        "labeling_efficiency": run.labeling_efficiency,
        "outputs": planned_paths(run, options),
        "warnings": run.warnings + run.quality_warnings,
        "assumed_metadata": run.assumed_metadata,
    }
