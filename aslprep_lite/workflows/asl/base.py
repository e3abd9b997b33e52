"""One ASL run: load → fit (head motion, M0, mask) → confounds → CBF → derivatives."""

from __future__ import annotations

import re

import numpy as np
from nipype.pipeline import engine as pe

from aslprep_lite.bids.asl_run import AslRun
from aslprep_lite.bids.derivatives import planned_derivatives
from aslprep_lite.config import QuantificationOptions
from aslprep_lite.interfaces.series import LoadAslSeries
from aslprep_lite.quant import constants
from aslprep_lite.workflows.asl.cbf import FIT_MAPS, init_cbf_wf
from aslprep_lite.workflows.asl.confounds import init_confounds_wf
from aslprep_lite.workflows.asl.fit import init_hmc_wf, init_m0_wf
from aslprep_lite.workflows.asl.outputs import init_outputs_wf

#: The stages of a run, in processing order (the methods text follows it).
STAGES = ("hmc_wf", "m0_wf", "cbf_wf", "confounds_wf", "outputs_wf")


def run_workflow_name(run: AslRun) -> str:
    """A valid, unique nipype name for a run's workflow (its BIDS prefix)."""
    return "asl_" + re.sub(r"\W", "_", run.prefix)


def _series_gb(run: AslRun) -> float:
    """Rough size (GB) of one float32 copy of the series, for nipype's memory scheduling."""
    try:
        import nibabel as nb

        shape = nb.load(run.asl_file).shape
    except Exception:
        return 0.5
    return float(np.prod(shape, dtype=np.float64)) * 4 / 1e9


def init_asl_wf(
    run: AslRun,
    options: QuantificationOptions,
    *,
    output_dir: str,
    omp_nthreads: int,
):
    """One ASL run, from the raw series to its derivatives.

    The workflow has no open inputs: the run's files and facts are fixed by ``run``, and each
    stage gets only the values it uses.

    Outputs
    -------
    outputs_wf.outputnode.out_files
        Files written, relative to ``output_dir``.
    """
    mem_gb = max(0.2, 4 * _series_gb(run))
    workflow = pe.Workflow(name=run_workflow_name(run))
    workflow.methods_label = run.prefix  # names the run where its methods differ from others
    load = pe.Node(
        LoadAslSeries(
            in_file=run.asl_file, n_volumes=run.n_source_volumes, dummy_scans=run.dummy_scans
        ),
        name="load_series",
        mem_gb=mem_gb,
    )
    hmc_wf = init_hmc_wf(
        context=run.context, omp_nthreads=omp_nthreads, seed=options.seed, mem_gb=mem_gb
    )
    confounds_wf = init_confounds_wf()
    m0_wf = init_m0_wf(
        m0_type=run.m0_type,
        m0_file=run.m0_file,
        m0_source=run.source_files[-1] if run.m0_file else None,
        m0_repetition_time=run.m0_repetition_time,
        m0_estimate=run.m0_estimate,
        context=run.context,
        repetition_time=run.repetition_time,
        constants=constants.m0_record(run.field_strength),
        has_deltam=run.has_deltam,
        m0_scale=options.m0_scale,
        fwhm=options.smooth_kernel,
        calibration=options.m0_calibration,
        reference_mask=options.m0_reference_mask,
        echo_time=run.echo_time,
        spin_echo=run.spin_echo,
        asl_file=run.asl_file,
        seed=options.seed,
        omp_nthreads=omp_nthreads,
    )
    cbf_wf = init_cbf_wf(run, options, mem_gb=mem_gb)
    outputs_wf = init_outputs_wf(
        output_dir=output_dir,
        out_dir=run.out_dir,
        prefix=run.prefix,
        keys=[d.key for d in planned_derivatives(run, options)],
        sources=run.source_files,
        parameters=options.sidecar_record(multidelay=run.is_multidelay),
    )
    workflow.connect([
        (load, hmc_wf, [("out_file", "inputnode.asl_file")]),
        (hmc_wf, confounds_wf, [
            ("outputnode.transforms", "inputnode.transforms"),
            ("outputnode.reference", "inputnode.reference"),
            ("outputnode.hmc_summary", "inputnode.hmc_summary"),
            ("outputnode.hmc_skipped", "inputnode.hmc_skipped"),
        ]),
        (hmc_wf, m0_wf, [
            ("outputnode.asl_file", "inputnode.asl_file"),
            ("outputnode.reference", "inputnode.reference"),
        ]),
        (hmc_wf, cbf_wf, [("outputnode.asl_file", "inputnode.asl_file")]),
        (m0_wf, cbf_wf, [
            ("outputnode.m0_file", "inputnode.m0_file"),
            ("outputnode.mask_file", "inputnode.mask_file"),
        ]),
        (cbf_wf, outputs_wf, [
            ("outputnode.cbf", "inputnode.cbf"),
            ("outputnode.cbf_timeseries", "inputnode.cbf_timeseries"),
            ("outputnode.mean_deltam", "inputnode.mean_deltam"),
            ("outputnode.cbf_metadata", "inputnode.cbf_metadata"),
            ("outputnode.maps_metadata", "inputnode.maps_metadata"),
        ] + [(f"outputnode.{key}", f"inputnode.{key}") for key in FIT_MAPS]),
        (m0_wf, outputs_wf, [
            ("outputnode.m0_file", "inputnode.m0"),
            ("outputnode.mask_file", "inputnode.mask"),
            ("outputnode.m0_metadata", "inputnode.m0_metadata"),
            ("outputnode.reference_mask", "inputnode.m0_reference_mask"),
        ]),
        (confounds_wf, outputs_wf, [
            ("outputnode.confounds_file", "inputnode.confounds"),
            ("outputnode.confounds_metadata", "inputnode.confounds_metadata"),
        ]),
    ])  # fmt: skip
    return workflow
