"""The per-run summary that ``--dry-run`` prints as JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aslprep_lite.bids.asl_run import AslRun
from aslprep_lite.bids.derivatives import planned_anatomy_paths, planned_paths, run_spaces
from aslprep_lite.config import QuantificationOptions
from aslprep_lite.spaces import Space

if TYPE_CHECKING:
    from aslprep_lite.bids.anat_derivatives import PrecomputedAnatomy


def _anatomy(
    run: AslRun, spaces: Sequence[Space], precomputed: PrecomputedAnatomy | None
) -> dict[str, Any]:
    """How the run reaches anatomical and template space."""
    targets = [s.label for s in run_spaces(run, spaces)]
    skipped = [s.label for s in spaces if s.name == "T1w" and run.t1w_file is None]
    reused = {"anat_derivatives": str(precomputed.source)} if precomputed is not None else {}
    return {
        "t1w": run.t1w_file,
        **reused,
        "other_t1w": run.other_t1w,
        "mode": "T1w" if run.t1w_file else ("T1w-free" if targets else "native only"),
        "output_spaces": (["asl"] if any(s.name == "asl" for s in spaces) else []) + targets,
        "skipped_spaces": [f"{label} (no T1w)" for label in skipped],
    }


def run_summary(
    run: AslRun,
    options: QuantificationOptions,
    spaces: Sequence[Space] = (),
    precomputed: PrecomputedAnatomy | None = None,
) -> dict[str, Any]:
    """What aslprep-lite will do with ``run`` under ``options``, for a person to read.

    ``precomputed`` is the participant's anatomy reused from ``--anat-derivatives``
    (``run.t1w_file`` is then its T1w): nothing is planned in ``anat/``.
    """
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
        "anatomy": _anatomy(run, spaces, precomputed),
        "outputs": planned_paths(run, options, spaces)
        + (
            planned_anatomy_paths(run.subject, spaces)
            if run.t1w_file and precomputed is None
            else []
        ),
        "warnings": run.warnings + run.quality_warnings,
        "assumed_metadata": run.assumed_metadata,
    }
