"""The one declarative specification of a run's derivatives, and their names.

Every file a run writes is one :class:`Derivative`: its BIDS entities (``space``, ``res``,
``desc``), suffix and extension, its data type, the sidecar fields it carries, and when it is
written. The ``--dry-run`` plan, the writer node and the completeness check after a run all
read :data:`ASL_DERIVATIVES` through :func:`planned_derivatives`, so they cannot disagree.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from aslprep_lite.bids.asl_run import AslRun
from aslprep_lite.config import QuantificationOptions
from aslprep_lite.spaces import ANATOMICAL, Space

#: When a derivative is written (evaluated by :func:`applies`).
CONDITIONS = (
    "always",  # every run
    "deltam",  # runs with ΔM (not cbf-only series)
    "single-delay",
    "multi-delay",
    "fitted",  # multi-delay with --att-method fit
    "arterial",  # multi-delay fit with --arterial-component
    "reference-calibration",  # --m0-calibration csf|wm
    "pvc",  # a T1w segmentation exists and --no-pvc is not given (runs with ΔM)
    "anatomy",  # the participant has a T1w
    "resampled",  # the run writes outputs in a space other than its own grid
)

#: Blocks of node metadata a sidecar can carry (see :func:`compose_sidecar`).
SIDECAR_BLOCKS = (
    "quantification",  # the CBF node's record: model, constants, warnings (merged)
    "m0",  # the M0 node's record (merged)
    "m0-nested",  # the M0 node's record under "M0"
    "map",  # the fit node's record for this map (merged)
    "confounds",  # the confounds table's column descriptions (merged)
    "brain-mask",  # Type Brain, how the mask was made
    "reference-region",  # Type (CSF or WM) of the calibration's reference region
    "pvc",  # the partial-volume correction's record (merged)
    "coregistration",  # the ASL -> T1w (or template) registration's record (merged)
    "space",  # the space's record: template, its source, the transforms used (merged)
    "anatomy",  # the T1w preprocessing record (merged)
    "qc",  # the quality-control table's columns, tissue source and SCORE record (merged)
    "score",  # the SCORE/SCRUB record (merged, under "SCORE")
)


@dataclass(frozen=True)
class Derivative:
    """One derivative file of an ASL run.

    ``key`` names the workflow output (and the writer's input) the file is written from.
    """

    key: str
    suffix: str
    desc: str | None = None
    space: str | None = None
    res: str | None = None
    cohort: str | None = None
    entities: tuple[tuple[str, str], ...] = ()  # label-, from-, to-, mode- (in this order)
    extension: str = ".nii.gz"
    dtype: str | None = "float32"  # None: the file is copied as it is (a TSV)
    units: str | None = None
    description: str | None = None
    blocks: tuple[str, ...] = ()
    when: str = "always"

    def __post_init__(self) -> None:
        unknown = {self.when} - set(CONDITIONS) | set(self.blocks) - set(SIDECAR_BLOCKS)
        if unknown:
            raise ValueError(f"derivative {self.key!r}: unknown condition or block {unknown}")

    def filename(self, prefix: str) -> str:
        """``<prefix>[_space-X][_cohort-C][_res-Y][_label-L...][_desc-Z]_<suffix><ext>``."""
        entities = [
            ("space", self.space),
            ("cohort", self.cohort),
            ("res", self.res),
            *self.entities,
            ("desc", self.desc),
        ]
        parts = [prefix, *(f"{k}-{v}" for k, v in entities if v), self.suffix]
        return "_".join(parts) + self.extension

    def sidecar_name(self, prefix: str) -> str:
        """The JSON sidecar's file name."""
        return self.filename(prefix)[: -len(self.extension)] + ".json"


_CBF_UNITS = "mL/100 g/min"

#: Every derivative of an ASL run, in the order the plan lists them.
ASL_DERIVATIVES: tuple[Derivative, ...] = (
    Derivative(
        "cbf", "cbf", units=_CBF_UNITS, description="Mean cerebral blood flow",
        blocks=("quantification", "m0-nested", "coregistration"),
    ),
    Derivative(
        "mean_deltam", "deltam", desc="mean", units="arbitrary",
        description="Mean control − label difference (ΔM), motion corrected", when="deltam",
    ),
    Derivative(
        "m0", "m0scan", desc="preproc", units="arbitrary",
        description="Calibration M0 as used for CBF (corrected, scaled, smoothed)",
        blocks=("m0",), when="deltam",
    ),
    Derivative("mask", "mask", desc="brain", dtype="uint8", blocks=("brain-mask",)),
    Derivative(
        "confounds", "timeseries", desc="confounds", extension=".tsv", dtype=None,
        blocks=("confounds",),
    ),
    Derivative(
        "cbf_timeseries", "cbf", desc="timeseries", units=_CBF_UNITS,
        description="Cerebral blood flow of each ΔM volume",
        blocks=("quantification", "m0-nested"), when="single-delay",
    ),
    Derivative(
        "qc", "cbf", desc="qualitycontrol", extension=".tsv", dtype=None, blocks=("qc",),
    ),
    Derivative(
        "cbf_score", "cbf", desc="score", units=_CBF_UNITS,
        description="Mean CBF of the volumes of desc-timeseries_cbf that SCORE kept "
        "(structural correlation based outlier rejection, Dolui et al. 2017); the volumes "
        "removed are listed under SCORE and flagged in the confounds' score_outlier_index",
        blocks=("score",), when="single-delay",
    ),
    Derivative(
        "cbf_scrub", "cbf", desc="scrub", units=_CBF_UNITS,
        description="CBF of the volumes SCORE kept by SCRUB's robust Bayesian estimate "
        "(Dolui et al. 2016): a voxel whose temporal variance exceeds white noise leans on a "
        "structural prior",
        blocks=("score",), when="single-delay",
    ),
    Derivative(
        "att", "att", units="s", description="Arterial transit time", blocks=("map",),
        when="multi-delay",
    ),
    Derivative(
        "cbf_stderr", "cbf", desc="stderr", units=_CBF_UNITS,
        description="Standard error of CBF", blocks=("map",), when="multi-delay",
    ),
    Derivative(
        "att_stderr", "att", desc="stderr", units="s",
        description="Standard error of the arterial transit time", blocks=("map",),
        when="fitted",
    ),
    Derivative(
        "fit_rsquared", "cbf", desc="fitrsquared", units="1",
        description="Goodness of fit: R² of the kinetic curve against the per-delay mean ΔM",
        blocks=("map",), when="fitted",
    ),
    Derivative(
        "fit_failed", "mask", desc="fitfailed", dtype="uint8", units="1",
        description="Voxels where the fit failed (reasons in FitFailures of the CBF sidecar); "
        "their values in the other maps are unreliable (0 where undefined)",
        blocks=("map",), when="multi-delay",
    ),
    Derivative(
        "cbf_longestdelay", "cbf", desc="longestdelay", units=_CBF_UNITS, blocks=("map",),
        when="multi-delay",
    ),
    Derivative(
        "abv", "abv", units="mL/mL",
        description="Arterial (macrovascular) blood volume fraction", blocks=("map",),
        when="arterial",
    ),
    Derivative(
        "abat", "abat", units="s", description="Arterial bolus arrival time", blocks=("map",),
        when="arterial",
    ),
    Derivative(
        "cbf_pvgm", "cbf", desc="pvGM", units=_CBF_UNITS,
        description="Grey-matter CBF corrected for partial volume (linear regression, "
        "Asllani et al. 2008); 0 where undefined", blocks=("pvc",), when="pvc",
    ),
    Derivative(
        "cbf_pvwm", "cbf", desc="pvWM", units=_CBF_UNITS,
        description="White-matter CBF corrected for partial volume (linear regression, "
        "Asllani et al. 2008); 0 where undefined", blocks=("pvc",), when="pvc",
    ),
    Derivative(
        "m0_reference_mask", "mask", desc="m0reference", dtype="uint8",
        description="Reference region of the M0 calibration", blocks=("reference-region",),
        when="reference-calibration",
    ),
)  # fmt: skip

#: Derivatives by key.
BY_KEY = {d.key: d for d in ASL_DERIVATIVES}

#: The maps written in every requested space besides the run's own grid. ``pvc``/``cbf_pvgm``
#: are not: the partial-volume corrected maps are meaningful on the grid they were solved on.
RESAMPLED_KEYS = (
    "cbf", "mask", "att", "cbf_stderr", "att_stderr", "fit_rsquared", "abv", "abat",
)  # fmt: skip


def in_space(derivative: Derivative, space: Space) -> Derivative:
    """``derivative`` written in ``space`` (``space-``, ``cohort-``, ``res-`` entities), its
    sidecar carrying the space's record; a mask stays a mask (nearest neighbour)."""
    entities = space.entities
    return replace(
        derivative,
        space=entities.get("space"),
        cohort=entities.get("cohort"),
        res=entities.get("res"),
        blocks=(*derivative.blocks, "coregistration", "space"),
    )


def coregistration_transform(target: str) -> Derivative:
    """The ASL reference → ``target`` (``T1w`` or a template) transform of a run (ITK text).

    As fMRIPrep names its ``from-boldref_to-T1w_mode-image_xfm.txt``: ITK's direction, so it
    maps ``target`` points to ASL points, which resamples an ASL image into ``target``.
    """
    return Derivative(
        f"xfm_{target}", "xfm", extension=".txt", dtype=None,
        entities=(("from", "aslref"), ("to", target), ("mode", "image")),
        blocks=("coregistration",),
    )  # fmt: skip


#: The participant's anatomical derivatives (``sub-<label>/anat``), named as fMRIPrep names
#: them. Labels of the discrete segmentation: 1 GM, 2 WM, 3 CSF.
ANAT_DERIVATIVES: tuple[Derivative, ...] = (
    Derivative("t1w_preproc", "T1w", desc="preproc", units="arbitrary",
               description="T1w, N4 bias-field corrected", blocks=("anatomy",)),
    Derivative("t1w_mask", "mask", desc="brain", dtype="uint8", blocks=("anatomy",)),
    Derivative("dseg", "dseg", dtype="uint8", blocks=("anatomy",),
               description="Discrete tissue segmentation: 1 GM, 2 WM, 3 CSF"),
    *(
        Derivative(f"{tissue.lower()}_probseg", "probseg", entities=(("label", tissue),),
                   units="1", blocks=("anatomy",),
                   description=f"{tissue} posterior probability")
        for tissue in ("GM", "WM", "CSF")
    ),
)  # fmt: skip
ANAT_BY_KEY = {d.key: d for d in ANAT_DERIVATIVES}


def template_transforms(template: str) -> tuple[Derivative, Derivative]:
    """The T1w → template transform and its inverse (ITK ``.h5``), as fMRIPrep names them.

    ``template`` is :attr:`~aslprep_lite.spaces.Space.template_key`: ``X``, or ``X+N`` for a
    cohort (``from-T1w_to-MNIPediatricAsym+2_mode-image_xfm.h5``, as sMRIPrep names it).
    """
    return tuple(  # type: ignore[return-value]
        Derivative(
            f"xfm_{source}_{target}",
            "xfm",
            extension=".h5",
            dtype=None,
            entities=(("from", source), ("to", target), ("mode", "image")),
            blocks=("anatomy",),
        )
        for source, target in ((ANATOMICAL, template), (template, ANATOMICAL))
    )


def applies(
    derivative: Derivative,
    run: AslRun,
    options: QuantificationOptions,
    spaces: Sequence[Space] = (),
) -> bool:
    """Whether ``run`` processed with ``options`` (and ``spaces``) writes ``derivative``."""
    fitted = run.is_multidelay and options.att_method == "fit"
    return {
        "pvc": run.has_deltam and run.t1w_file is not None and options.pvc,
        "anatomy": run.t1w_file is not None,
        "resampled": bool(run_spaces(run, spaces)),
        "always": True,
        "deltam": run.has_deltam,
        "single-delay": not run.is_multidelay,
        "multi-delay": run.is_multidelay,
        "fitted": fitted,
        "arterial": fitted and options.arterial_component,
        "reference-calibration": run.has_deltam and options.m0_calibration != "voxel",
    }[derivative.when]


def run_spaces(run: AslRun, spaces: Sequence[Space]) -> list[Space]:
    """The spaces besides its own grid that ``run`` is written in: ``T1w`` needs a T1w;
    templates are reached through the T1w, or without one by the T1w-free mode."""
    return [
        s for s in spaces if s.is_template or (s.name == ANATOMICAL and run.t1w_file is not None)
    ]


def transform_targets(run: AslRun, spaces: Sequence[Space]) -> list[str]:
    """Where the run's ASL reference is registered to: the T1w (always, with one: the tissue
    measures need it), or each template (T1w-free)."""
    if run.t1w_file is not None:
        return [ANATOMICAL]
    if not run_spaces(run, spaces):
        return []
    return sorted({s.template_key for s in run_spaces(run, spaces)})


def planned_derivatives(
    run: AslRun, options: QuantificationOptions, spaces: Sequence[Space] = ()
) -> list[Derivative]:
    """The derivatives ``run`` writes under ``options``, in plan order.

    Without ``spaces``, the files on the run's own grid (the native writer's inputs); with
    them, also each resampled map in each space and the coregistration transforms.
    """
    native = [d for d in ASL_DERIVATIVES if applies(d, run, options)]
    resampled = [
        in_space(d, space)
        for space in run_spaces(run, spaces)
        for d in native
        if d.key in RESAMPLED_KEYS
    ]
    transforms = [coregistration_transform(t) for t in transform_targets(run, spaces) if spaces]
    return native + resampled + transforms


def planned_paths(
    run: AslRun, options: QuantificationOptions, spaces: Sequence[Space] = ()
) -> list[str]:
    """Their paths relative to the output directory (the plan's ``outputs``)."""
    base = os.path.join(run.out_dir, run.prefix)
    return [d.filename(base) for d in planned_derivatives(run, options, spaces)]


def anatomy_prefix(subject: str) -> str:
    """The participant's anatomical folder and entities (one reference per participant)."""
    return os.path.join(f"sub-{subject}", "anat", f"sub-{subject}")


def planned_anatomy(spaces: Sequence[Space]) -> list[Derivative]:
    """The participant's anatomical derivatives: T1w, mask, segmentation, template transforms
    (one pair per template and cohort)."""
    templates = sorted({s.template_key for s in spaces if s.is_template})
    return [*ANAT_DERIVATIVES, *(d for t in templates for d in template_transforms(t))]


def planned_anatomy_paths(subject: str, spaces: Sequence[Space]) -> list[str]:
    """Their paths relative to the output directory."""
    return [d.filename(anatomy_prefix(subject)) for d in planned_anatomy(spaces)]


def compose_sidecar(
    derivative: Derivative, records: dict[str, dict], provenance: dict
) -> dict[str, object]:
    """A derivative's sidecar: its units and description, the blocks it carries, provenance.

    Parameters
    ----------
    derivative
        The file's specification.
    records
        Node metadata by name: ``quantification``, ``m0``, ``confounds`` and ``maps``
        (``{key: record}`` of the kinetic fit).
    provenance
        ``Sources`` and ``ProcessingParameters``, added to every sidecar.
    """
    sidecar: dict[str, object] = {}
    if derivative.units is not None:
        sidecar["Units"] = derivative.units
    if derivative.description is not None:
        sidecar["Description"] = derivative.description
    m0 = records.get("m0", {})
    for block in derivative.blocks:
        if block == "quantification":
            sidecar.update(
                records["quantification"]
            )  # a multi-delay fit brings its own Description
        elif block == "m0":
            sidecar.update(m0)
        elif block == "m0-nested":
            sidecar["M0"] = m0
        elif block == "map":
            sidecar.update(records.get("maps", {}).get(derivative.key, {}))
        elif block == "confounds":
            sidecar.update(records["confounds"])
        elif block == "brain-mask":
            sidecar.update({"Type": "Brain", "Description": m0.get("BrainMask", "")})
        elif block == "reference-region":
            sidecar["Type"] = m0["ReferenceRegion"]["Tissue"].upper()
        elif block == "space":  # nested: the template's own Description must not win
            sidecar["SpatialReference"] = records.get("space", {})
        elif block in ("pvc", "coregistration", "anatomy", "qc", "score"):
            sidecar.update(records.get(block, {}))
    return {**sidecar, **provenance}
