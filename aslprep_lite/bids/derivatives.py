"""The one declarative specification of a run's derivatives, and their names.

Every file a run writes is one :class:`Derivative`: its BIDS entities (``space``, ``res``,
``desc``), suffix and extension, its data type, the sidecar fields it carries, and when it is
written. The ``--dry-run`` plan, the writer node and the completeness check after a run all
read :data:`ASL_DERIVATIVES` through :func:`planned_derivatives`, so they cannot disagree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from aslprep_lite.bids.asl_run import AslRun
from aslprep_lite.config import QuantificationOptions

#: When a derivative is written (evaluated by :func:`applies`).
CONDITIONS = (
    "always",  # every run
    "deltam",  # runs with ΔM (not cbf-only series)
    "single-delay",
    "multi-delay",
    "fitted",  # multi-delay with --att-method fit
    "arterial",  # multi-delay fit with --arterial-component
    "reference-calibration",  # --m0-calibration csf|wm
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
        """``<prefix>[_space-X][_res-Y][_desc-Z]_<suffix><extension>``."""
        entities = [("space", self.space), ("res", self.res), ("desc", self.desc)]
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
        blocks=("quantification", "m0-nested"),
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
        "m0_reference_mask", "mask", desc="m0reference", dtype="uint8",
        description="Reference region of the M0 calibration", blocks=("reference-region",),
        when="reference-calibration",
    ),
)  # fmt: skip

#: Derivatives by key.
BY_KEY = {d.key: d for d in ASL_DERIVATIVES}


def applies(derivative: Derivative, run: AslRun, options: QuantificationOptions) -> bool:
    """Whether ``run`` processed with ``options`` writes ``derivative``."""
    fitted = run.is_multidelay and options.att_method == "fit"
    return {
        "always": True,
        "deltam": run.has_deltam,
        "single-delay": not run.is_multidelay,
        "multi-delay": run.is_multidelay,
        "fitted": fitted,
        "arterial": fitted and options.arterial_component,
        "reference-calibration": run.has_deltam and options.m0_calibration != "voxel",
    }[derivative.when]


def planned_derivatives(run: AslRun, options: QuantificationOptions) -> list[Derivative]:
    """The derivatives ``run`` writes under ``options``, in plan order."""
    return [d for d in ASL_DERIVATIVES if applies(d, run, options)]


def planned_paths(run: AslRun, options: QuantificationOptions) -> list[str]:
    """Their paths relative to the output directory (the plan's ``outputs``)."""
    base = os.path.join(run.out_dir, run.prefix)
    return [d.filename(base) for d in planned_derivatives(run, options)]


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
    return {**sidecar, **provenance}
