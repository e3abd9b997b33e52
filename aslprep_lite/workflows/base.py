"""Top-level workflow: participants → ASL runs, and the methods boilerplate of the graph."""

from __future__ import annotations

import re
from collections.abc import Sequence

from nipype.pipeline import engine as pe

from aslprep_lite.bids.asl_run import AslRun
from aslprep_lite.config import Settings
from aslprep_lite.workflows.asl.base import STAGES, init_asl_wf


def init_aslprep_lite_wf(settings: Settings, runs: Sequence[AslRun]):
    """The whole graph: one sub-workflow per participant, one per ASL run inside it."""
    workflow = pe.Workflow(name="aslprep_lite_wf", base_dir=str(settings.execution.work_dir))
    for subject in sorted({r.subject for r in runs}):
        workflow.add_nodes(
            [init_single_subject_wf(subject, [r for r in runs if r.subject == subject], settings)]
        )
    return workflow


def subject_workflow_name(subject: str) -> str:
    """A valid nipype name for a participant's workflow."""
    return "sub_" + re.sub(r"\W", "_", subject) + "_wf"


def init_single_subject_wf(subject: str, runs: Sequence[AslRun], settings: Settings):
    """All ASL runs of one participant."""
    workflow = pe.Workflow(name=subject_workflow_name(subject))
    workflow.add_nodes(
        [
            init_asl_wf(
                run,
                settings.quantification,
                output_dir=str(settings.outputs.output_dir),
                omp_nthreads=settings.execution.omp_nthreads,
            )
            for run in runs
        ]
    )
    return workflow


def collect_boilerplate(workflow: pe.Workflow) -> list[str]:
    """The ``__desc__`` methods paragraphs of the runs' stages, in processing order.

    A stage described the same way for every run gives one paragraph; where runs differ (an
    M0 scan for one, M0Estimate for another), each text is given once, after the runs it is
    true for. Uses nipype's public ``list_node_names`` and ``get_node`` only.
    """
    names = workflow.list_node_names()  # "sub_<label>_wf.asl_<prefix>.<stage>.<node>"
    runs = sorted({".".join(name.split(".")[:2]) for name in names})
    paragraphs: list[str] = []
    for stage in STAGES:
        texts: dict[str, list[str]] = {}
        for run in runs:
            desc = getattr(workflow.get_node(f"{run}.{stage}"), "__desc__", None)
            if desc:
                texts.setdefault(desc, []).append(workflow.get_node(run).methods_label)
        if len(texts) == 1:
            paragraphs += list(texts)
        else:
            paragraphs += [f"For {', '.join(labels)}: {text}" for text, labels in texts.items()]
    return paragraphs
