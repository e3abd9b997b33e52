"""One ASL run: load → fit (head motion, M0, mask) → confounds → CBF → derivatives."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from aslprep_lite.bids.asl_run import AslRun
from aslprep_lite.bids.derivatives import RESAMPLED_KEYS, planned_derivatives, run_spaces
from aslprep_lite.config import QuantificationOptions
from aslprep_lite.interfaces.anatomical import ReferenceRegionFromTissue
from aslprep_lite.interfaces.series import LoadAslSeries
from aslprep_lite.quant import constants
from aslprep_lite.workflows.anatomical import ANAT_FIELDS, deformation_field
from aslprep_lite.workflows.asl.cbf import FIT_MAPS, init_cbf_wf
from aslprep_lite.workflows.asl.confounds import init_confounds_wf
from aslprep_lite.workflows.asl.fit import init_hmc_wf, init_m0_wf
from aslprep_lite.workflows.asl.outputs import init_outputs_wf
from aslprep_lite.workflows.asl.qc import init_qc_wf, prior_template_source
from aslprep_lite.workflows.asl.spaces import ANAT_INPUTS, init_asl_spaces_wf, init_coreg_wf

#: The stages of a run, in processing order (the methods text follows it).
STAGES = (
    "hmc_wf", "coreg_wf", "m0_wf", "cbf_wf", "confounds_wf", "spaces_wf", "qc_wf", "outputs_wf",
)  # fmt: skip


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


def reference_name(run: AslRun) -> str:
    """The ASL image registered to the T1w or a template: the M0 when the run has an M0 image
    (proton-density contrast, no background suppression), else the mean control."""
    if run.has_deltam and run.m0_type in ("Separate", "Included"):
        return "M0"
    return "mean control image" if "control" in run.context else "ASL reference image"


def init_asl_wf(
    run: AslRun,
    options: QuantificationOptions,
    *,
    output_dir: str,
    omp_nthreads: int,
    spaces: Sequence = (),
    template_files: Mapping[str, Mapping[str, str]] | None = None,
    space_records: Mapping[str, dict] | None = None,
    t1w_grid: str | None = None,
    anat_derivatives: Mapping[str, Any] | None = None,
):
    """One ASL run, from the raw series to its derivatives.

    The run's files and facts are fixed by ``run``, and each stage gets only the values it
    uses. A run with a T1w (``run.t1w_file``) or written in a template space also gets the
    spaces stage (:func:`~aslprep_lite.workflows.asl.spaces.init_asl_spaces_wf`).

    Parameters
    ----------
    spaces
        The output spaces (:class:`~aslprep_lite.spaces.Space`).
    template_files, space_records
        Files and sidecar blocks of the template spaces, by label.
    t1w_grid
        A file on the participant's T1w grid.
    anat_derivatives
        With ``--anat-derivatives``: ``{"Folder", "Files"}``, the folder and the files of it
        the run uses, recorded in ``ProcessingParameters.AnatDerivatives`` of every sidecar.

    Inputs
    ------
    inputnode.<field>
        The participant's anatomy (:data:`~aslprep_lite.workflows.anatomical.ANAT_FIELDS` and
        ``to_t1w_<template>``), when the run has a T1w.

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
        parameters={
            **options.sidecar_record(
                multidelay=run.is_multidelay, anatomy=run.t1w_file is not None and run.has_deltam
            ),
            **({"AnatDerivatives": dict(anat_derivatives)} if anat_derivatives else {}),
        },
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
    ])  # fmt: skip
    stages = {
        "hmc": hmc_wf, "m0": m0_wf, "cbf": cbf_wf, "confounds": confounds_wf,
        "outputs": outputs_wf,
    }  # fmt: skip
    targets = run_spaces(run, spaces)
    routes: dict = {}
    if run.t1w_file is not None or targets:
        routes = _connect_spaces(
            workflow,
            run,
            options,
            targets,
            template_files or {},
            space_records or {},
            t1w_grid,
            stages=stages,
        )
    _connect_qc(workflow, run, options, routes, stages)
    return workflow


def _connect_qc(workflow, run: AslRun, options: QuantificationOptions, routes: dict,
                stages: dict) -> None:  # fmt: skip
    """Add the quality-control stage: the QC table, SCORE/SCRUB, the confounds it extends.

    Tissue comes from where the tissue means come from (``routes``: the T1w segmentation, or
    the priors of a template output space); with neither, the stage registers the embedded
    template's priors to the ASL grid itself.
    """
    from aslprep_lite.spaces import embedded_space_files
    from aslprep_lite.templates import EMBEDDED_TEMPLATE

    tissue = routes.get("tissue")
    own_priors = tissue is None
    name = reference_name(run)
    qc_wf = init_qc_wf(
        context=run.context,
        multidelay=run.is_multidelay,
        tissue_source=prior_template_source(EMBEDDED_TEMPLATE) if own_priors else routes["source"],
        prior_template=EMBEDDED_TEMPLATE if own_priors else None,
        prior_files=(
            {k: str(v) for k, v in embedded_space_files().items()} if own_priors else None
        ),
        reference_name=name,
        seed=options.seed,
        # failures name the BIDS file the reference comes from, as in _connect_spaces
        source_file=run.m0_file if name == "M0" and run.m0_file else run.asl_file,
    )
    cbf_wf, m0_wf, outputs_wf = stages["cbf"], stages["m0"], stages["outputs"]
    maps = ["att", "fit_failed"] if run.is_multidelay else ["cbf_timeseries"]
    workflow.connect([
        (cbf_wf, qc_wf, [("outputnode.cbf", "inputnode.cbf")]
         + [(f"outputnode.{k}", f"inputnode.{k}") for k in maps]),
        (m0_wf, qc_wf, [("outputnode.mask_file", "inputnode.mask")]),
        (stages["confounds"], qc_wf, [
            ("outputnode.confounds_file", "inputnode.confounds_file"),
            ("outputnode.confounds_metadata", "inputnode.confounds_metadata"),
        ]),
        (qc_wf, outputs_wf, [
            ("outputnode.qc_file", "inputnode.qc"),
            ("outputnode.qc_metadata", "inputnode.qc_metadata"),
            ("outputnode.confounds_file", "inputnode.confounds"),
            ("outputnode.confounds_metadata", "inputnode.confounds_metadata"),
        ] + ([] if run.is_multidelay else [
            ("outputnode.cbf_score", "inputnode.cbf_score"),
            ("outputnode.cbf_scrub", "inputnode.cbf_scrub"),
            ("outputnode.score_metadata", "inputnode.score_metadata"),
        ])),
    ])  # fmt: skip
    if own_priors:
        reference = (
            (m0_wf, "outputnode.m0_file")
            if name == "M0"
            else (stages["hmc"], "outputnode.reference")
        )
        workflow.connect([(reference[0], qc_wf, [(reference[1], "inputnode.reference")])])
    else:
        workflow.connect([
            (tissue[0], qc_wf, [(tissue[1], "inputnode.tissue_file")]),
            (routes["spaces"], qc_wf, [("outputnode.coregistration_metadata",
                                        "inputnode.coregistration_metadata")]),
        ])  # fmt: skip
    if routes.get("anatomy") is not None:
        workflow.connect([(routes["anatomy"], qc_wf, [("anat_record", "inputnode.anat_record")])])


def _connect_spaces(workflow, run, options, targets, template_files, space_records, t1w_grid,
                    stages) -> dict:  # fmt: skip
    """Add the coregistration and spaces stages to a run's workflow.

    Returns where the quality control finds its tissue maps and records: ``tissue`` (node,
    field) and ``source``, or no ``tissue`` when there are none; ``spaces`` (the stage with
    the coregistration record); ``anatomy`` (the node with the T1w record), with a T1w.
    """
    anatomy = run.t1w_file is not None
    templates = sorted({s.template_key for s in targets if s.is_template})
    # reference-region calibration from the segmentation: the M0 step waits for the tissue
    # maps, so the coregistration cannot use the M0 step's outputs (mean control instead)
    from_segmentation = (
        anatomy and run.has_deltam and options.m0_calibration != "voxel"
        and not options.m0_reference_mask
    )  # fmt: skip
    name = "mean control image" if from_segmentation else reference_name(run)
    # failures name the BIDS file the reference comes from, not its copy in the work dir
    source_file = run.m0_file if name == "M0" and run.m0_file else run.asl_file
    spaces_wf = init_asl_spaces_wf(
        spaces=targets,
        anatomy=anatomy,
        t1w_grid=t1w_grid,
        template_files={s.label: template_files[s.label] for s in targets if s.is_template},
        space_records=space_records,
        reference_name=name,
        pvc=options.pvc and run.has_deltam,
        seed=options.seed,
        source_file=source_file,
    )
    reference = (
        (stages["m0"], "outputnode.m0_file")
        if name == "M0"
        else (stages["hmc"], "outputnode.reference")
    )
    m0_wf, cbf_wf, outputs_wf = stages["m0"], stages["cbf"], stages["outputs"]
    workflow.connect([
        (reference[0], spaces_wf, [(reference[1], "inputnode.reference")]),
        (m0_wf, spaces_wf, [("outputnode.mask_file", "inputnode.asl_mask"),
                            ("outputnode.mask_file", "inputnode.mask")]),
        (cbf_wf, spaces_wf, [(f"outputnode.{k}", f"inputnode.{k}") for k in RESAMPLED_KEYS
                             if k == "cbf" or k in FIT_MAPS]),
        (spaces_wf, outputs_wf, [
            ("outputnode.resampled", "inputnode.resampled"),
            ("outputnode.tissue_metadata", "inputnode.tissue_metadata"),
            ("outputnode.pvc_metadata", "inputnode.pvc_metadata"),
            ("outputnode.coregistration_metadata", "inputnode.coregistration_metadata"),
            ("outputnode.cbf_pvgm", "inputnode.cbf_pvgm"),
            ("outputnode.cbf_pvwm", "inputnode.cbf_pvwm"),
            ("outputnode.xfm_targets", "inputnode.xfm_targets"),
            ("outputnode.xfm_files", "inputnode.xfm_files"),
            ("outputnode.xfm_records", "inputnode.xfm_records"),
        ]),
    ])  # fmt: skip
    if not anatomy:
        # the tissue means' priors: those of the first template space that has GM and WM maps
        prior = next(
            (s for s in targets if s.is_template
             and all(r in template_files[s.label] for r in ("GM", "WM"))),
            None,
        )  # fmt: skip
        if prior is None:
            return {"spaces": spaces_wf}
        return {
            "tissue": (spaces_wf, "outputnode.tissue_file"),
            "source": f"{prior.name} tissue priors (no T1w)",
            "spaces": spaces_wf,
        }
    coreg_wf = init_coreg_wf(
        reference_name=name, own_mask=from_segmentation, seed=options.seed, source_file=source_file
    )
    fields = ANAT_FIELDS + [deformation_field(t) for t in templates]
    inputnode = pe.Node(IdentityInterface(fields=[*fields, "anat_record"]), name="inputnode")
    renamed = dict(zip(ANAT_FIELDS, ANAT_INPUTS, strict=True))
    workflow.connect([
        (reference[0], coreg_wf, [(reference[1], "inputnode.reference")]),
        (inputnode, coreg_wf, [(f, f"inputnode.{renamed[f]}") for f in ANAT_FIELDS
                               if f != "dseg"]),
        (inputnode, spaces_wf, [(f, f"inputnode.{f}") for f in fields if f not in ANAT_FIELDS]),
        (coreg_wf, spaces_wf, [("outputnode.matrix_file", "inputnode.t1w_to_asl"),
                               ("outputnode.xfm_file", "inputnode.xfm_file"),
                               ("outputnode.record", "inputnode.coregistration_metadata"),
                               ("outputnode.tissue_file", "inputnode.tissue_file")]),
    ])  # fmt: skip
    if from_segmentation:
        region = pe.Node(
            ReferenceRegionFromTissue(tissue=options.m0_calibration, source_file=run.asl_file),
            name="reference_region",
        )
        workflow.connect([
            (coreg_wf, region, [("outputnode.tissue_file", "tissue_file")]),
            (region, m0_wf, [("out_file", "inputnode.reference_mask")]),
        ])  # fmt: skip
    else:
        workflow.connect([(m0_wf, coreg_wf, [("outputnode.mask_file", "inputnode.asl_mask")])])
    return {
        "tissue": (coreg_wf, "outputnode.tissue_file"),
        "source": "T1w segmentation",
        "spaces": spaces_wf,
        "anatomy": inputnode,
    }
