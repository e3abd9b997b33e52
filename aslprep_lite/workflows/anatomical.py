"""A participant's anatomy: the T1w preprocessed and normalized to each template once.

Every ASL run of the participant is coregistered to this one anatomical reference and
resampled through its normalizations (:mod:`aslprep_lite.workflows.asl.spaces`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from nipype.interfaces.utility import IdentityInterface, Merge
from nipype.pipeline import engine as pe

from aslprep_lite.bids.anat_derivatives import PrecomputedAnatomy
from aslprep_lite.bids.derivatives import anatomy_prefix
from aslprep_lite.interfaces.anatomical import (
    DeformationsToItk,
    LoadPrecomputedAnatomy,
    LoadPrecomputedTransforms,
    NormalizeT1w,
    PreprocessT1w,
)
from aslprep_lite.interfaces.outputs import WriteAnatomy

#: Files of the anatomy that the runs use.
ANAT_FIELDS = ["t1w_preproc", "mask", "dseg", "gm_probseg", "wm_probseg", "csf_probseg"]


def deformation_field(template: str) -> str:
    """The outputnode field holding the template → T1w deformation of ``template``."""
    return "to_t1w_" + re.sub(r"\W", "_", template)


def anat_methods(template: str, templates: Sequence[str], precomputed: bool) -> str:
    """The methods paragraph of the anatomy."""
    if precomputed:
        return (
            "The preprocessed T1w, its brain mask, tissue segmentation and its spatial "
            "normalization to " + ", ".join(templates or ["no template"]) + " were taken from "
            "a previous sMRIPrep/fMRIPrep run (--anat-derivatives)."
        )
    others = [t for t in templates if t != template]
    text = (
        "The T1w image was corrected for intensity non-uniformity with N4 (Tustison et al. "
        "2010; SimpleITK, Lowekamp et al. 2013). It was normalized to the "
        f"{template} template (Fonov et al. 2009) through TemplateFlow (Ciric et al. 2022): "
        "an affine registration maximizing Mattes mutual information (Mattes et al. 2003), "
        "then a symmetric diffeomorphic registration with a cross-correlation metric (SyN, "
        "Avants et al. 2008, as implemented in dipy, Garyfallidis et al. 2014) at 2 mm. The "
        "template's brain mask, brought back through the normalization, gave the brain mask "
        "(template-based brain extraction), and grey matter, white matter and CSF were "
        "classified by a Gaussian mixture fitted by expectation-maximization with the "
        "template's tissue probability maps as spatial priors (Ashburner & Friston 2005)."
    )
    if others:
        text += " The skull-stripped T1w was normalized the same way to " + ", ".join(others) + "."
    return text


def init_anat_wf(
    *,
    subject: str,
    t1w_file: str,
    t1w_source: str,
    anatomy_template: str,
    anatomy_template_files: Mapping[str, str],
    template_files: Mapping[str, Mapping[str, str]],
    precomputed: PrecomputedAnatomy | None,
    output_dir: str,
    seed: int,
    name: str = "anat_wf",
):
    """Preprocess the participant's T1w (or load a precomputed anatomy) and write it.

    Parameters
    ----------
    subject
        Participant label.
    t1w_file, t1w_source
        The anatomical reference and its BIDS URI.
    anatomy_template, anatomy_template_files
        The template whose brain mask and tissue priors drive brain extraction and
        segmentation (res-1 files by role).
    template_files
        Every template the outputs are written in: ``{template key: {role: file}}``, keyed by
        :attr:`~aslprep_lite.spaces.Space.template_key` (``X`` or ``X+N`` with a cohort: one
        normalization per template and cohort).
    precomputed
        An sMRIPrep/fMRIPrep anatomy to reuse (``--anat-derivatives``), or None.

    Outputs
    -------
    t1w_preproc, mask, dseg, gm_probseg, wm_probseg, csf_probseg
        The T1w-space anatomy.
    to_t1w_<template>
        For each template, its points' T1w points (deformation NIfTI).
    record
        The anatomy's sidecar record.
    """
    templates = sorted(template_files)
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = anat_methods(anatomy_template, templates, precomputed is not None)
    fields = ANAT_FIELDS + ["record"] + [deformation_field(t) for t in templates]
    outputnode = pe.Node(IdentityInterface(fields=fields), name="outputnode")

    if precomputed is not None:
        source = pe.Node(
            LoadPrecomputedAnatomy(
                t1w=str(precomputed.t1w),
                mask=str(precomputed.mask),
                dseg=str(precomputed.dseg),
                probseg={k: str(v) for k, v in precomputed.probseg.items()},
                source=str(precomputed.source),
            ),
            name="load_anatomy",
        )
    else:
        source = pe.Node(
            PreprocessT1w(
                t1w_file=t1w_file,
                template=anatomy_template,
                template_files=dict(anatomy_template_files),
                seed=seed,
            ),
            name="preprocess_t1w",
            mem_gb=2.0,
        )
    workflow.connect([(source, outputnode, [(f, f) for f in [*ANAT_FIELDS, "record"]])])

    transforms = []
    for template in templates:
        field = deformation_field(template)
        safe = field[len("to_t1w_") :]
        if precomputed is not None:
            norm = pe.Node(
                LoadPrecomputedTransforms(
                    to_template_xfm=str(precomputed.to_template[template]),
                    from_template_xfm=str(precomputed.from_template[template]),
                    template=template,
                    template_files=dict(template_files[template]),
                ),
                name=f"load_xfm_{safe}",
            )
        elif template == anatomy_template:
            workflow.connect([(source, outputnode, [("to_t1w", field)])])
            norm = source
            norm_record = (source, "normalization")
        else:
            norm = pe.Node(
                NormalizeT1w(
                    template=template,
                    template_files=dict(template_files[template]),
                    seed=seed,
                    source_file=t1w_file,
                ),
                name=f"normalize_{safe}",
                mem_gb=2.0,
            )
            norm_record = (norm, "record")
        if norm is not source:
            workflow.connect([
                (source, norm, [("t1w_preproc", "t1w_preproc"), ("mask", "mask")]),
                (norm, outputnode, [("to_t1w", field)]),
            ])  # fmt: skip
        if precomputed is None:
            itk = pe.Node(DeformationsToItk(source_file=t1w_file), name=f"itk_{safe}")
            workflow.connect([
                (norm, itk, [("to_template", "to_template"), ("to_t1w", "to_t1w")]),
            ])  # fmt: skip
            transforms.append((template, itk, norm_record))

    if precomputed is None:  # a reused anatomy stays where it is: nothing to write
        write = pe.Node(
            WriteAnatomy(
                output_dir=output_dir,
                out_dir=anatomy_prefix(subject).rsplit("/", 1)[0],
                prefix=f"sub-{subject}",
                sources=[t1w_source],
            ),
            name="write_anatomy",
        )
        workflow.connect([
            (source, write, [("mask", "t1w_mask"), ("record", "record")]
             + [(f, f) for f in ANAT_FIELDS if f != "mask"]),
        ])  # fmt: skip
        if transforms:
            write.inputs.templates = [t for t, _, _ in transforms]
            forward = pe.Node(Merge(len(transforms)), name="merge_forward_xfms")
            inverse = pe.Node(Merge(len(transforms)), name="merge_inverse_xfms")
            # each normalization's record goes into the sidecars of its transforms
            records = pe.Node(Merge(len(transforms)), name="merge_normalizations")
            for index, (_, itk, (node, field)) in enumerate(transforms, start=1):
                workflow.connect([
                    (itk, forward, [("to_template_xfm", f"in{index}")]),
                    (itk, inverse, [("from_template_xfm", f"in{index}")]),
                    (node, records, [(field, f"in{index}")]),
                ])  # fmt: skip
            workflow.connect([
                (forward, write, [("out", "forward_xfms")]),
                (inverse, write, [("out", "inverse_xfms")]),
                (records, write, [("out", "normalizations")]),
            ])  # fmt: skip
    return workflow
