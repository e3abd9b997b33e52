"""A run in anatomical and standard space: coregistration, tissue, PVC, resampling.

With a T1w, the ASL reference is rigidly registered to it, the T1w segmentation gives the
tissue fractions on the ASL grid (tissue means, partial-volume correction), and each map is
read once through the composition of that registration and the T1w's normalization. Without
one (T1w-free mode), the ASL reference is registered straight to each template (affine), and
the template's tissue priors stand in for a segmentation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from nipype.interfaces.utility import IdentityInterface, Merge
from nipype.pipeline import engine as pe

from aslprep_lite.bids.derivatives import RESAMPLED_KEYS
from aslprep_lite.interfaces.anatomical import (
    AlignAslToTemplate,
    CoregisterAsl,
    ResampleToSpaces,
    TissueCbf,
    TissueOnAsl,
)
from aslprep_lite.spaces import Space
from aslprep_lite.workflows.anatomical import ANAT_FIELDS, deformation_field

#: The participant's anatomy as inputs (its brain mask renamed: ``mask`` is the run's).
ANAT_INPUTS = [f if f != "mask" else "t1w_mask" for f in ANAT_FIELDS]
#: Probability maps of a template by tissue role, in the order of TissueOnAsl's inputs.
_PRIOR_ROLES = ("GM", "WM", "CSF")


def coreg_methods(reference: str, *, own_mask: bool) -> str:
    """The methods paragraph of the ASL → T1w coregistration."""
    mask = "the Otsu brain mask of the reference" if own_mask else "the ASL brain mask"
    return (
        f"The ASL reference ({reference}) was rigidly registered to the skull-stripped T1w "
        "(SimpleITK, Mattes mutual information; Mattes et al. 2003), starting from the "
        f"scanner geometry; the Dice coefficient of {mask} and the T1w brain mask on the ASL "
        f"grid measured its quality; a second registration, initialized at the brains' centres of "
        "mass after a coarse search of rotations (±20°), was always run too and the one with "
        "the higher Dice kept (the first unless the second was better by more than 0.01). The "
        "T1w tissue probability maps were brought to the ASL grid through it, each averaged "
        "over the ASL voxel's extent."
    )


def spaces_methods(
    *,
    anatomy: bool,
    templates: Sequence[str],
    reference: str,
    pvc: bool,
    tissue: bool,
    t1w_space: bool = True,
) -> str:
    """The methods paragraph of the run's tissue measures, PVC and resampling."""
    if anatomy:
        targets = (["the T1w"] if t1w_space else []) + list(templates)
        text = (
            (
                "CBF maps were resampled to " + " and ".join(targets)
                + " in one step through the composition of the coregistration"
                + (" and the normalization" if templates else "")
                + ", with trilinear interpolation (masks: the interpolated mask above one "
                "half). "
            )
            if targets
            else ""
        )  # fmt: skip
        tissue_text = "the T1w segmentation on the ASL grid"
    else:
        text = (
            f"No T1w image was available: the ASL reference ({reference}) was registered to "
            + ", ".join(templates)
            + " with a 12-parameter affine transform (SimpleITK, Mattes mutual information), "
            "and the maps were resampled through it with trilinear interpolation; these "
            "template-space outputs are of lower quality than through a T1w (no nonlinear "
            "warp). "
        )
        tissue_text = "the template's tissue probability maps brought to the ASL grid"
    if tissue:
        text += (
            "Mean grey- and white-matter CBF (probability above 0.7 and 0.9) came from "
            + tissue_text
            + "."
        )
        if pvc:
            text += (
                " Partial-volume corrected grey- and white-matter CBF maps were computed by "
                "linear regression over a 5×5×1-voxel kernel (Asllani et al. 2008)."
            )
    return text.strip()


def init_coreg_wf(
    *, reference_name: str, own_mask: bool, seed: int, source_file: str, name: str = "coreg_wf"
):
    """Rigid ASL → T1w coregistration and the T1w tissue maps on the ASL grid.

    Parameters
    ----------
    reference_name
        What the ASL reference is (M0 or mean control).
    source_file
        The BIDS file the reference comes from (M0 or ASL series): failures name it.
    own_mask
        Make the ASL brain mask from the reference (when the M0 step's mask is not available
        yet: its reference-region calibration needs this stage's tissue maps).

    Inputs
    ------
    reference, asl_mask
        The ASL reference and (without ``own_mask``) its brain mask.
    t1w_preproc, t1w_mask, gm_probseg, wm_probseg, csf_probseg
        The participant's anatomy.

    Outputs
    -------
    matrix_file
        T1w points → ASL points (``.npy``).
    xfm_file
        The same as an ITK text transform (``from-aslref_to-T1w``).
    record
        ``Coregistration``: Dice, the path taken, the candidates.
    tissue_file
        GM, WM and CSF fractions on the ASL grid.
    """
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = coreg_methods(reference_name, own_mask=own_mask)
    inputnode = pe.Node(
        IdentityInterface(
            fields=["reference", "asl_mask", "t1w_preproc", "t1w_mask",
                    "gm_probseg", "wm_probseg", "csf_probseg"]
        ),
        name="inputnode",
    )  # fmt: skip
    outputnode = pe.Node(
        IdentityInterface(fields=["matrix_file", "xfm_file", "record", "tissue_file"]),
        name="outputnode",
    )
    coreg = pe.Node(
        CoregisterAsl(reference_name=reference_name, seed=seed, source_file=source_file),
        name="coregister",
    )
    to_asl = pe.Node(TissueOnAsl(source_file=source_file), name="tissue_on_asl")
    probseg = pe.Node(Merge(3), name="probseg")
    workflow.connect([
        (inputnode, coreg, [("reference", "reference_file"), ("t1w_preproc", "t1w_file"),
                            ("t1w_mask", "t1w_mask_file")]),
        (inputnode, probseg, [("gm_probseg", "in1"), ("wm_probseg", "in2"),
                              ("csf_probseg", "in3")]),
        (probseg, to_asl, [("out", "probseg")]),
        (coreg, to_asl, [("matrix_file", "matrix_file")]),
        (inputnode, to_asl, [("reference", "reference_file")]),
        (coreg, outputnode, [("matrix_file", "matrix_file"), ("xfm_file", "xfm_file"),
                             ("record", "record")]),
        (to_asl, outputnode, [("out_file", "tissue_file")]),
    ])  # fmt: skip
    if not own_mask:
        workflow.connect([(inputnode, coreg, [("asl_mask", "asl_mask_file")])])
    return workflow


def init_asl_spaces_wf(
    *,
    spaces: Sequence[Space],
    anatomy: bool,
    t1w_grid: str | None,
    template_files: Mapping[str, Mapping[str, str]],
    space_records: Mapping[str, dict],
    reference_name: str,
    pvc: bool,
    seed: int,
    source_file: str,
    name: str = "spaces_wf",
):
    """Tissue measures, PVC and resampling of one run (T1w-free: also its registration).

    Parameters
    ----------
    spaces
        The spaces the run is written in besides its own grid (T1w only with ``anatomy``).
    anatomy
        The participant has a T1w (else: T1w-free mode, templates only).
    t1w_grid
        A file on the T1w grid (the T1w space's grid).
    template_files
        ``{space label: {role: file}}`` of each template space (``T1w`` is its grid).
    space_records
        ``{space label: sidecar block}``: the template, its source, the transforms used.
    reference_name
        What the ASL reference is (M0 or mean control), for the methods and sidecars.
    pvc
        Write the partial-volume corrected maps (needs ``anatomy``).
    source_file
        The run's BIDS file that failures name (the ASL series, or its M0 scan).

    Inputs
    ------
    reference, asl_mask, cbf
        The ASL reference, brain mask and CBF map on the ASL grid.
    <key> for each of RESAMPLED_KEYS
        The run's maps to write in the other spaces.
    to_t1w_<template>
        Template points → T1w points (:func:`~aslprep_lite.workflows.anatomical.init_anat_wf`).
    t1w_to_asl, xfm_file, coregistration_metadata, tissue_file
        The coregistration (:func:`init_coreg_wf`), with a T1w.

    Outputs
    -------
    resampled
        ``{key, space, file, record}`` per file written in another space.
    tissue_metadata, pvc_metadata, coregistration_metadata
        Sidecar blocks.
    cbf_pvgm, cbf_pvwm
        Partial-volume corrected maps (with ``pvc``).
    xfm_targets, xfm_files
        The ASL reference's registration transforms (ITK), by target.
    tissue_file
        The tissue fractions on the ASL grid the tissue means used (when there are any).
    xfm_records
        T1w-free: each target's registration record, in that order.
    """
    # one registration per template and cohort (X or X+N), whatever the resolutions
    templates = sorted({s.template_key for s in spaces if s.is_template})
    template_of = {s.label: s.template_key for s in spaces if s.is_template}
    priors = next(
        (files for label, files in template_files.items()
         if all(r in files for r in ("GM", "WM"))),
        None,
    )  # fmt: skip
    tissue = anatomy or priors is not None
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = spaces_methods(
        anatomy=anatomy,
        templates=templates,
        reference=reference_name,
        pvc=pvc and anatomy,
        tissue=tissue,
        t1w_space=any(not s.is_template for s in spaces),
    )
    deformations = [deformation_field(t) for t in templates] if anatomy else []
    inputnode = pe.Node(
        IdentityInterface(
            fields=[
                "reference",
                "asl_mask",
                *RESAMPLED_KEYS,
                *deformations,
                "t1w_to_asl",
                "xfm_file",
                "coregistration_metadata",
                "tissue_file",
            ]
        ),
        name="inputnode",
    )
    outputnode = pe.Node(
        IdentityInterface(
            fields=[
                "resampled", "tissue_metadata", "pvc_metadata", "coregistration_metadata",
                "cbf_pvgm", "cbf_pvwm", "xfm_targets", "xfm_files", "xfm_records", "tissue_file",
            ]
        ),
        name="outputnode",
    )  # fmt: skip
    entries = [
        {
            "label": s.label,
            "grid": t1w_grid if not s.is_template else template_files[s.label]["T1w"],
            "template": s.template_key if s.is_template else None,
            "record": dict(space_records.get(s.label, {})),
        }
        for s in spaces
    ]
    resample = pe.Node(
        ResampleToSpaces(spaces=entries, templates=templates, source_file=source_file),
        name="resample",
        mem_gb=1.0,
    )
    workflow.connect([(inputnode, resample, [(k, k) for k in RESAMPLED_KEYS])])
    xfm_files = pe.Node(Merge(max(1, len(templates)) if not anatomy else 1), name="xfm_files")
    workflow.connect([(xfm_files, outputnode, [("out", "xfm_files")])])

    if anatomy:  # coregistered by coreg_wf: its matrix, record, transform and tissue maps
        tissue_from = (inputnode, "tissue_file")
        workflow.connect([
            (inputnode, resample, [("t1w_to_asl", "t1w_to_asl")]),
            (inputnode, outputnode, [("coregistration_metadata", "coregistration_metadata")]),
            (inputnode, xfm_files, [("xfm_file", "in1")]),
        ])  # fmt: skip
        outputnode.inputs.xfm_targets = ["T1w"]
        if templates:
            merge = pe.Node(Merge(len(templates)), name="deformations")
            workflow.connect([
                (inputnode, merge, [(f, f"in{i}") for i, f in enumerate(deformations, 1)]),
                (merge, resample, [("out", "deformations")]),
            ])  # fmt: skip
        tissue_source = "T1w segmentation"
    else:
        matrices = pe.Node(Merge(len(templates)), name="template_matrices")
        # each template's registration record goes with that template's outputs
        align_records = pe.Node(Merge(len(templates)), name="align_records")
        outputnode.inputs.xfm_targets = list(templates)
        for index, template in enumerate(templates, start=1):
            label = next(lbl for lbl, name in template_of.items() if name == template)
            align = pe.Node(
                AlignAslToTemplate(
                    reference_name=reference_name,
                    template=template,
                    template_files=dict(template_files[label]),
                    seed=seed,
                    source_file=source_file,
                ),
                name="align_" + re.sub(r"\W", "_", template),
            )
            workflow.connect([
                (inputnode, align, [("reference", "reference_file"),
                                    ("asl_mask", "asl_mask_file")]),
                (align, matrices, [("matrix_file", f"in{index}")]),
                (align, xfm_files, [("xfm_file", f"in{index}")]),
                (align, align_records, [("record", f"in{index}")]),
            ])  # fmt: skip
            if index == 1:  # the native maps' sidecars: the first template's registration
                workflow.connect([(align, outputnode, [("record", "coregistration_metadata")])])
        workflow.connect([
            (matrices, resample, [("out", "template_to_asl")]),
            (align_records, resample, [("out", "coregistrations")]),
            (align_records, outputnode, [("out", "xfm_records")]),
        ])  # fmt: skip
        if priors is not None:
            label = next(lbl for lbl, f in template_files.items() if f is priors)
            to_asl = pe.Node(
                TissueOnAsl(
                    probseg=[priors[r] for r in _PRIOR_ROLES if r in priors],
                    source_file=source_file,
                ),
                name="tissue_on_asl",
            )
            index = templates.index(template_of[label])
            workflow.connect([
                (matrices, to_asl, [(("out", _item, index), "matrix_file")]),
                (inputnode, to_asl, [("reference", "reference_file")]),
            ])  # fmt: skip
            tissue_source = f"{template_of[label]} tissue priors (no T1w)"
            tissue_from = (to_asl, "out_file")
    workflow.connect([(resample, outputnode, [("resampled", "resampled")])])

    if tissue:
        measures = pe.Node(
            TissueCbf(tissue_source=tissue_source, pvc=pvc and anatomy, source_file=source_file),
            name="tissue_cbf",
        )
        workflow.connect([
            (inputnode, measures, [("cbf", "cbf_file"), ("asl_mask", "mask_file")]),
            (tissue_from[0], measures, [(tissue_from[1], "tissue_file")]),
            (tissue_from[0], outputnode, [(tissue_from[1], "tissue_file")]),
            (measures, outputnode, [("record", "tissue_metadata"),
                                    ("pvc_record", "pvc_metadata"),
                                    ("cbf_pvgm", "cbf_pvgm"), ("cbf_pvwm", "cbf_pvwm")]),
        ])  # fmt: skip
    return workflow


def _item(values: list, index: int):
    """``values[index]`` (a connection function: runs inside nipype)."""
    return values[index]
