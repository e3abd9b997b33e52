"""Top-level workflow: participants → ASL runs → stages."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from aslprep_lite.bids import RunPlan
from aslprep_lite.config import Settings
from aslprep_lite.interfaces.series import LoadAslSeries
from aslprep_lite.workflows.cbf import init_cbf_wf
from aslprep_lite.workflows.confounds import init_confounds_wf
from aslprep_lite.workflows.hmc import init_hmc_wf
from aslprep_lite.workflows.m0 import init_m0_wf
from aslprep_lite.workflows.outputs import init_outputs_wf


def run_workflow_name(plan: RunPlan) -> str:
    """A valid, unique nipype name for a run's workflow (its BIDS prefix)."""
    return "asl_" + re.sub(r"\W", "_", plan.prefix)


def processing_parameters(settings: Settings) -> dict[str, Any]:
    """Settings that change the numbers, recorded in every sidecar."""
    return {
        "M0Scale": settings.m0_scale,
        "M0SmoothingFWHM": settings.smooth_kernel,
        "DummyScans": settings.dummy_scans,
        "ATTMethod": settings.att_method,
        "ATTPrior": settings.att_prior,
        "ArterialComponent": settings.arterial_component,
        "M0Calibration": settings.m0_calibration,
        "RandomSeed": settings.seed,
    }


def init_aslprep_lite_wf(settings: Settings, plans: Sequence[RunPlan]):
    """The whole graph: one sub-workflow per participant, one per ASL run inside it."""
    workflow = pe.Workflow(name="aslprep_lite_wf", base_dir=str(settings.work_dir))
    for subject in sorted({p.subject for p in plans}):
        runs = [p for p in plans if p.subject == subject]
        workflow.add_nodes([init_single_subject_wf(subject, runs, settings)])
    return workflow


def init_single_subject_wf(subject: str, plans: Sequence[RunPlan], settings: Settings):
    """All ASL runs of one participant."""
    workflow = pe.Workflow(name="sub_" + re.sub(r"\W", "_", subject) + "_wf")
    workflow.add_nodes([init_asl_wf(plan, settings) for plan in plans])
    return workflow


def _series_gb(plan: RunPlan) -> float:
    """Rough size (GB) of one float32 copy of the series, for nipype's memory scheduling."""
    try:
        import nibabel as nb

        shape = nb.load(plan.asl_file).shape
    except Exception:
        return 0.5
    return float(np.prod(shape, dtype=np.float64)) * 4 / 1e9


def init_asl_wf(plan: RunPlan, settings: Settings):
    """One ASL run: load → head motion → ΔM → M0 → CBF → derivatives.

    Inputs and outputs are fixed by ``plan``; the workflow has no open inputs.
    """
    record = plan.as_dict()
    mem_gb = max(0.2, 4 * _series_gb(plan))
    workflow = pe.Workflow(name=run_workflow_name(plan))
    inputnode = pe.Node(IdentityInterface(fields=["context"]), name="inputnode")
    inputnode.inputs.context = plan.context
    load = pe.Node(LoadAslSeries(plan=record), name="load_series", mem_gb=mem_gb)
    hmc_wf = init_hmc_wf(omp_nthreads=settings.omp_nthreads, seed=settings.seed, mem_gb=mem_gb)
    confounds_wf = init_confounds_wf()
    m0_wf = init_m0_wf(
        record,
        m0_scale=settings.m0_scale,
        fwhm=settings.smooth_kernel,
        seed=settings.seed,
        omp_nthreads=settings.omp_nthreads,
    )
    cbf_wf = init_cbf_wf(record, mem_gb=mem_gb)
    outputs_wf = init_outputs_wf(
        record,
        output_dir=str(settings.output_dir),
        parameters=processing_parameters(settings),
    )
    workflow.connect([
        (load, hmc_wf, [("out_file", "inputnode.asl_file")]),
        (inputnode, hmc_wf, [("context", "inputnode.context")]),
        (hmc_wf, confounds_wf, [
            ("outputnode.transforms", "inputnode.transforms"),
            ("outputnode.reference", "inputnode.reference"),
            ("outputnode.note", "inputnode.note"),
            ("outputnode.skipped", "inputnode.skipped"),
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
            ("outputnode.maps", "inputnode.maps"),
            ("outputnode.maps_metadata", "inputnode.maps_metadata"),
        ]),
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


def collect_boilerplate(workflow) -> list[str]:
    """The ``__desc__`` methods paragraphs of a workflow and its sub-workflows, in order."""
    paragraphs: list[str] = []
    desc = getattr(workflow, "__desc__", None)
    if desc:
        paragraphs.append(desc)
    for node in workflow._graph.nodes():  # nipype exposes sub-workflows only through _graph
        if isinstance(node, pe.Workflow):
            for text in collect_boilerplate(node):
                if text not in paragraphs:
                    paragraphs.append(text)
    return paragraphs
