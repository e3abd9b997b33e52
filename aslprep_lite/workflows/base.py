"""Top-level workflow: participants → ASL runs, and the methods boilerplate of the graph."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from nipype.pipeline import engine as pe

from aslprep_lite.bids.asl_run import AslRun
from aslprep_lite.bids.files import bids_uri
from aslprep_lite.config import Settings
from aslprep_lite.templates import EMBEDDED_TEMPLATE
from aslprep_lite.workflows.anatomical import ANAT_FIELDS, deformation_field, init_anat_wf
from aslprep_lite.workflows.asl.base import STAGES, init_asl_wf


@dataclass(frozen=True)
class SpaceResources:
    """What the spaces need, found before the graph is built (so failures come first).

    Attributes
    ----------
    spaces
        The output spaces.
    template_files
        ``{space label: {role: file}}`` of the template spaces (:func:`check_templates`).
    space_records
        ``{space label: sidecar block}``: the template and where its files came from.
    anatomy_template_files
        The files of the template driving brain extraction and segmentation (None: no
        participant's T1w is preprocessed here).
    precomputed
        ``{subject: PrecomputedAnatomy}`` from ``--anat-derivatives``.
    """

    spaces: tuple = ()
    template_files: dict = field(default_factory=dict)
    space_records: dict = field(default_factory=dict)
    anatomy_template_files: dict | None = None
    precomputed: dict = field(default_factory=dict)


def init_aslprep_lite_wf(
    settings: Settings, runs: Sequence[AslRun], resources: SpaceResources | None = None
):
    """The whole graph: one sub-workflow per participant, one per ASL run inside it."""
    resources = resources or SpaceResources()
    workflow = pe.Workflow(name="aslprep_lite_wf", base_dir=str(settings.execution.work_dir))
    for subject in sorted({r.subject for r in runs}):
        workflow.add_nodes(
            [
                init_single_subject_wf(
                    subject, [r for r in runs if r.subject == subject], settings, resources
                )
            ]
        )
    return workflow


def subject_workflow_name(subject: str) -> str:
    """A valid nipype name for a participant's workflow."""
    return "sub_" + re.sub(r"\W", "_", subject) + "_wf"


def init_single_subject_wf(
    subject: str, runs: Sequence[AslRun], settings: Settings, resources: SpaceResources
):
    """All ASL runs of one participant, and its anatomy when it has a T1w."""
    workflow = pe.Workflow(name=subject_workflow_name(subject))
    t1w_file = runs[0].t1w_file
    precomputed = resources.precomputed.get(subject)
    templates = _files_by_template(resources)
    anat_wf = None
    if t1w_file is not None:
        anat_wf = init_anat_wf(
            subject=subject,
            t1w_file=t1w_file,
            t1w_source=bids_uri(t1w_file, settings.execution.bids_dir),
            anatomy_template=EMBEDDED_TEMPLATE,
            anatomy_template_files={
                k: str(v) for k, v in (resources.anatomy_template_files or {}).items()
            },
            template_files=templates,
            precomputed=precomputed,
            output_dir=str(settings.outputs.output_dir),
            seed=settings.quantification.seed,
        )
        workflow.add_nodes([anat_wf])
    t1w_grid = str(precomputed.t1w) if precomputed is not None else t1w_file
    for run in runs:
        asl_wf = init_asl_wf(
            run,
            settings.quantification,
            output_dir=str(settings.outputs.output_dir),
            omp_nthreads=settings.execution.omp_nthreads,
            spaces=resources.spaces,
            template_files=resources.template_files,
            space_records=_space_records(resources, run, precomputed),
            t1w_grid=t1w_grid,
            anat_derivatives=_reused_files(precomputed, templates),
        )
        workflow.add_nodes([asl_wf])
        if anat_wf is not None:
            fields = ANAT_FIELDS + [deformation_field(t) for t in sorted(templates)]
            workflow.connect([
                (anat_wf, asl_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in fields]
                 + [("outputnode.record", "inputnode.anat_record")]),
            ])  # fmt: skip
    return workflow


def _files_by_template(resources: SpaceResources) -> dict[str, dict[str, str]]:
    """The files of each template and cohort (:attr:`~aslprep_lite.spaces.Space.template_key`:
    one normalization each, whatever its resolutions)."""
    by_key: dict[str, dict[str, str]] = {}
    for space in resources.spaces:
        if space.is_template and space.template_key not in by_key:
            by_key[space.template_key] = {
                k: str(v) for k, v in resources.template_files[space.label].items()
            }
    return by_key


def _reused_files(precomputed, templates) -> dict | None:
    """``AnatDerivatives`` of a run's sidecars: the folder reused and its files used."""
    if precomputed is None:
        return None
    folder = precomputed.source
    files = [
        precomputed.t1w, precomputed.mask, precomputed.dseg,
        *(precomputed.probseg[t] for t in sorted(precomputed.probseg)),
        *(precomputed.to_template[t] for t in sorted(templates)),
        *(precomputed.from_template[t] for t in sorted(templates)),
    ]  # fmt: skip
    return {"Folder": str(folder), "Files": [str(p.relative_to(folder)) for p in files]}


def _space_records(resources: SpaceResources, run: AslRun, precomputed) -> dict:
    """Each space's sidecar block for ``run``: the template, its source, the transforms
    (with ``--anat-derivatives``, the reused files' paths)."""
    anat = f"sub-{run.subject}/anat/sub-{run.subject}"
    perf = f"{run.out_dir}/{run.prefix}"

    def transforms(template: str) -> list[str]:
        if run.t1w_file is None:  # T1w-free: the run's own affine to the template
            return [f"{perf}_from-aslref_to-{template}_mode-image_xfm.txt"]
        to_template = (
            str(precomputed.to_template[template])
            if precomputed is not None
            else f"{anat}_from-T1w_to-{template}_mode-image_xfm.h5"
        )
        return [f"{perf}_from-aslref_to-T1w_mode-image_xfm.txt", to_template]

    keys = {s.label: s.template_key for s in resources.spaces if s.is_template}
    records = {
        label: {**record, "Transforms": transforms(keys.get(label, record["Template"]))}
        for label, record in resources.space_records.items()
    }
    records["T1w"] = {
        "Space": "T1w",
        "Reference": str(precomputed.t1w)
        if precomputed is not None
        else f"{anat}_desc-preproc_T1w.nii.gz",
        "Transforms": [f"{perf}_from-aslref_to-T1w_mode-image_xfm.txt"],
    }
    return records


def collect_boilerplate(workflow: pe.Workflow) -> list[str]:
    """The ``__desc__`` methods paragraphs of the runs' stages, in processing order.

    A stage described the same way for every run gives one paragraph; where runs differ (an
    M0 scan for one, M0Estimate for another), each text is given once, after the runs it is
    true for. Uses nipype's public ``list_node_names`` and ``get_node`` only.
    """
    names = workflow.list_node_names()  # "sub_<label>_wf.asl_<prefix>.<stage>.<node>"
    runs = sorted({".".join(name.split(".")[:2]) for name in names if ".asl_" in name})
    paragraphs: list[str] = []
    # the participants' anatomy first: one paragraph per distinct text
    for subject in sorted({name.split(".")[0] for name in names if ".anat_wf." in name}):
        desc = getattr(workflow.get_node(f"{subject}.anat_wf"), "__desc__", None)
        if desc and desc not in paragraphs:
            paragraphs.append(desc)
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
