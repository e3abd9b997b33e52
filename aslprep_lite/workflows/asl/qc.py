"""Quality control of a run: the QC table, and SCORE/SCRUB for single-delay runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from aslprep_lite.interfaces.anatomical import AlignAslToTemplate, TissueOnAsl
from aslprep_lite.interfaces.qc import QualityControl, ScoreConfounds, ScoreScrub
from aslprep_lite.quant.score import DEFAULT_MAD_FACTOR, DEFAULT_THRESH

INPUTS = [
    "cbf", "cbf_timeseries", "mask", "reference", "tissue_file", "confounds_file",
    "confounds_metadata", "coregistration_metadata", "anat_record", "att", "fit_failed",
]  # fmt: skip
OUTPUTS = [
    "qc_file", "qc_metadata", "cbf_score", "cbf_scrub", "score_metadata", "confounds_file",
    "confounds_metadata",
]  # fmt: skip

#: The QC sidecar's SCORE block of a multi-delay run.
SCORE_NOT_APPLICABLE = {
    "Applied": False,
    "Note": "SCORE and SCRUB are not applicable to multi-delay runs: they judge volumes of "
    "one delay against each other (the CBF of each volume), whereas a multi-delay run's CBF "
    "comes from the kinetic fit of all delays together; no desc-score or desc-scrub map and "
    "no score_outlier_index column are written",
}


def prior_template_source(template: str) -> str:
    """The tissue source of the QC fallback: template priors, no T1w, no template space.

    It also says what the row's ``coregistration_dice`` then measures: that registration.
    """
    return (
        f"{template} tissue priors (no T1w and no template output space: brought to the ASL "
        "grid by an affine registration of the ASL reference to the template, made for the "
        "quality control only; coregistration_dice is the Dice of the ASL and template brain "
        "masks after this registration)"
    )


def qc_methods(*, multidelay: bool, tissue_source: str) -> str:
    """The methods paragraph of the quality control, true for the run's branch."""
    text = (
        "Quality-control measures were computed for each run (desc-qualitycontrol_cbf.tsv): "
        "mean and largest framewise displacement (Power et al. 2012) and mean RMS "
        "displacement (Jenkinson et al. 2002), mean grey- and white-matter CBF, the "
        "percentage of grey-matter voxels with negative CBF, the spatial coefficient of "
        "variation of grey-matter CBF (Mutsaerts et al. 2017) and the quality evaluation "
        f"index (QEI; Dolui et al. 2024), with tissue from the {tissue_source}."
    )
    if multidelay:
        return text + (
            " For this multi-delay run the median arterial transit time and the percentage of "
            "brain voxels where the fit failed were added; SCORE and SCRUB do not apply."
        )
    return text + (
        " CBF volumes were also screened by structural correlation based outlier rejection "
        f"(SCORE; Dolui et al. 2017; tissue probability > {DEFAULT_THRESH:g}, mean GM CBF "
        f"beyond {DEFAULT_MAD_FACTOR:g} robust SDs, then removals that lower the pooled "
        "within-tissue variance of the mean), and the kept volumes averaged again by SCRUB's "
        "robust Bayesian estimate with a structural prior (Dolui et al. 2016; Huber weights); "
        "both maps are written beside the mean CBF map, which averages every volume."
    )


def init_qc_wf(
    *,
    context: Sequence[str],
    multidelay: bool,
    tissue_source: str,
    prior_template: str | None = None,
    prior_files: Mapping[str, str] | None = None,
    reference_name: str = "",
    seed: int = 0,
    source_file: str | None = None,
    name: str = "qc_wf",
):
    """The quality-control table of a run and, for single-delay runs, SCORE and SCRUB.

    Parameters
    ----------
    context
        Volume type of each volume of the series.
    multidelay
        The run has several delays (ATT and fit failures in the table; no SCORE/SCRUB).
    tissue_source
        Where the tissue maps on the ASL grid come from (named in the sidecar).
    prior_template, prior_files
        Without a T1w and without a template output space: the template whose priors this
        stage registers to the ASL grid itself (its files by role: T1w, mask, GM, WM).
    reference_name, seed
        The ASL reference and the random seed of that registration.
    source_file
        With ``prior_files``: the BIDS file the reference comes from (the M0 or the ASL
        file), named when that registration fails.

    Inputs
    ------
    cbf, cbf_timeseries, mask
        Mean CBF, CBF of each volume (single-delay) and brain mask, on the ASL grid.
    reference
        The ASL reference (with ``prior_files`` only).
    tissue_file
        GM, WM (CSF) fractions on the ASL grid (without ``prior_files``).
    confounds_file, confounds_metadata
        The confounds table and its sidecar.
    coregistration_metadata, anat_record
        Records holding ``Coregistration`` (Dice) and the T1w's ``Normalization``.
    att, fit_failed
        Multi-delay runs: the ATT map and the fit-failure mask.

    Outputs
    -------
    qc_file, qc_metadata
        ``desc-qualitycontrol_cbf.tsv`` and its sidecar.
    cbf_score, cbf_scrub, score_metadata
        Single-delay runs: the SCORE and SCRUB CBF maps and their sidecar fields.
    confounds_file, confounds_metadata
        The confounds table (single-delay: with ``score_outlier_index``) and its sidecar.
    """
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = qc_methods(multidelay=multidelay, tissue_source=tissue_source)
    inputnode = pe.Node(IdentityInterface(fields=INPUTS), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=OUTPUTS), name="outputnode")
    qc = pe.Node(QualityControl(context=list(context), tissue_source=tissue_source), name="qc")
    workflow.connect([
        (inputnode, qc, [("cbf", "cbf_file"), ("mask", "mask_file"),
                         ("confounds_file", "confounds_file"), ("anat_record", "anatomy")]),
        (qc, outputnode, [("out_file", "qc_file"), ("metadata", "qc_metadata")]),
    ])  # fmt: skip
    if prior_files is not None:
        if not source_file:
            raise ValueError("init_qc_wf: prior_files needs the source_file they are aligned for")
        align = pe.Node(
            AlignAslToTemplate(
                reference_name=reference_name,
                template=prior_template,
                template_files=dict(prior_files),
                seed=seed,
                source_file=source_file,
            ),
            name="align_priors",
        )
        to_asl = pe.Node(
            TissueOnAsl(probseg=[prior_files["GM"], prior_files["WM"]], source_file=source_file),
            name="priors_on_asl",
        )
        tissue = (to_asl, "out_file")
        workflow.connect([
            (inputnode, align, [("reference", "reference_file"), ("mask", "asl_mask_file")]),
            (align, to_asl, [("matrix_file", "matrix_file")]),
            (inputnode, to_asl, [("reference", "reference_file")]),
            (align, qc, [("record", "coregistration")]),
        ])  # fmt: skip
    else:
        tissue = (inputnode, "tissue_file")
        workflow.connect([(inputnode, qc, [("coregistration_metadata", "coregistration")])])
    workflow.connect([(tissue[0], qc, [(tissue[1], "tissue_file")])])

    if multidelay:
        qc.inputs.score_metadata = {"SCORE": SCORE_NOT_APPLICABLE}
        workflow.connect([
            (inputnode, qc, [("att", "att_file"), ("fit_failed", "fit_failed_file")]),
            (inputnode, outputnode, [("confounds_file", "confounds_file"),
                                     ("confounds_metadata", "confounds_metadata")]),
        ])  # fmt: skip
        return workflow

    score = pe.Node(ScoreScrub(context=list(context)), name="score_scrub")
    confounds = pe.Node(ScoreConfounds(), name="score_confounds")
    workflow.connect([
        (inputnode, score, [("cbf_timeseries", "timeseries_file"), ("mask", "mask_file")]),
        (tissue[0], score, [(tissue[1], "tissue_file")]),
        (inputnode, confounds, [("confounds_file", "confounds_file"),
                                ("confounds_metadata", "confounds_metadata")]),
        (score, confounds, [("outliers", "outliers")]),
        (score, qc, [("metadata", "score_metadata")]),
        (score, outputnode, [("score_file", "cbf_score"), ("scrub_file", "cbf_scrub"),
                             ("metadata", "score_metadata")]),
        (confounds, outputnode, [("out_file", "confounds_file"),
                                 ("metadata", "confounds_metadata")]),
    ])  # fmt: skip
    return workflow
