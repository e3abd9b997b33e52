"""BIDS discovery (pybids) and validation of ASL metadata into per-run plans.

Discovery finds every ``perf/*_asl.nii[.gz]`` with its ``aslcontext.tsv``, its sidecar
metadata (with the BIDS inheritance principle) and its M0. Validation turns the metadata into
a :class:`RunPlan`: checked, per-volume arrays expanded, units sane. Every problem is an
:class:`~aslprep_lite.errors.AslprepError` whose one-line message names the file and the field.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aslprep_lite.errors import AslprepError
from aslprep_lite.quant import constants
from aslprep_lite.quant.deltam import VOLUME_TYPES, plan_subtraction

LOGGER = logging.getLogger("aslprep_lite")

ASL_TYPES = ("PCASL", "CASL", "PASL")
M0_TYPES = ("Separate", "Included", "Estimate", "Absent")
BOLUS_TECHNIQUES = ("QUIPSS", "QUIPSSII", "Q2TIPS")
#: Volume types that carry labeled blood, so their PLD and labeling duration matter.
LABELED_TYPES = frozenset({"control", "label", "deltam", "cbf"})
#: A delay above this many seconds is almost certainly in milliseconds.
MAX_PLAUSIBLE_DELAY_S = 30.0

#: Derivative files every run writes (suffix part after the source entities).
OUTPUT_SUFFIXES = (
    "cbf.nii.gz",
    "desc-mean_deltam.nii.gz",
    "desc-preproc_m0scan.nii.gz",
    "desc-brain_mask.nii.gz",
    "desc-confounds_timeseries.tsv",
)
#: Added for single-delay runs.
SINGLE_DELAY_SUFFIXES = ("desc-timeseries_cbf.nii.gz",)
#: Added for multi-delay runs (kinetic-model fit).
MULTI_DELAY_SUFFIXES = (
    "att.nii.gz",
    "desc-stderr_cbf.nii.gz",
    "desc-stderr_att.nii.gz",
    "desc-fitrsquared_cbf.nii.gz",
    "desc-fitfailed_mask.nii.gz",
    "desc-longestdelay_cbf.nii.gz",
)
#: Written only when ATT is fitted (not with the weighted-delay method).
FITTED_ONLY_SUFFIXES = ("desc-stderr_att.nii.gz", "desc-fitrsquared_cbf.nii.gz")
#: Added for multi-delay runs fitted with the arterial (macrovascular) component.
ARTERIAL_SUFFIXES = ("abv.nii.gz", "abat.nii.gz")


@dataclass(frozen=True)
class ProcessingOptions:
    """Command-line choices that change what a run computes (and so, what it outputs)."""

    att_method: str = "fit"
    att_prior: str = "local"
    arterial_component: bool = False
    m0_calibration: str = "voxel"
    m0_reference_mask: str | None = None


@dataclass
class RunPlan:
    """Everything the workflow needs to process one ASL run, validated.

    Per-volume arrays (``post_labeling_delay``, ``labeling_duration``, ``repetition_time``)
    have one entry per volume kept (after ``dummy_scans``), aligned with ``context``.
    """

    asl_file: str
    aslcontext_file: str
    sidecar_file: str
    prefix: str
    subject: str
    session: str | None
    out_dir: str
    context: list[str]
    n_source_volumes: int
    dummy_scans: int
    asl_type: str
    m0_type: str
    field_strength: float
    background_suppression: bool
    bs_pulses: int
    post_labeling_delay: list[float]
    labeling_duration: list[float] | None
    repetition_time: list[float]
    labeling_efficiency: float | None
    bolus_cutoff_technique: str | None
    bolus_cutoff_delay: list[float] | None
    mr_acquisition_type: str
    slice_timing: list[float] | None
    slice_axis: int
    m0_file: str | None
    m0_repetition_time: float | None
    m0_estimate: float | None
    source_files: list[str]
    warnings: list[str] = field(default_factory=list)
    att_method: str = "fit"
    att_prior: str = "local"
    arterial_component: bool = False
    m0_calibration: str = "voxel"
    m0_reference_mask: str | None = None
    echo_time: float = 0.0
    spin_echo: bool = False

    @property
    def volume_counts(self) -> dict[str, int]:
        """Number of volumes of each type kept for processing."""
        return dict(Counter(self.context))

    @property
    def delays(self) -> list[float]:
        """Distinct post-labeling delays (inversion times for PASL) of the labeled volumes."""
        return sorted(
            {
                d
                for d, kind in zip(self.post_labeling_delay, self.context, strict=True)
                if kind in LABELED_TYPES
            }
        )

    @property
    def quantifies(self) -> bool:
        """The run has ΔM to quantify (pairs or deltam); a cbf-only series needs no M0."""
        return any(kind in ("control", "label", "deltam") for kind in self.context)

    @property
    def is_multidelay(self) -> bool:
        """More than one delay among the labeled volumes: the kinetic model is fitted."""
        return len(self.delays) > 1

    @property
    def model(self) -> str:
        """The quantification model this run uses."""
        if self.is_multidelay:
            kind = "multi-TI PASL" if self.asl_type == "PASL" else f"multi-delay {self.asl_type}"
            fitted = (
                "CBF fitted at the weighted-delay arterial transit time (Dai et al. 2012)"
                if self.att_method == "weighted-delay"
                else "fitted for CBF and arterial transit time"
                + (" with a local ATT prior" if self.att_prior == "local" else "")
            )
            return (
                f"{kind}: general kinetic model (Buxton et al. 1998) {fitted} over "
                f"{len(self.delays)} delays"
            )
        if self.asl_type == "PASL":
            return (
                f"single-delay PASL with {self.bolus_cutoff_technique} bolus cut-off "
                "(Alsop et al. 2015, eq. 2)"
            )
        return f"single-delay {self.asl_type} (Alsop et al. 2015, eq. 1)"

    @property
    def hmc_note(self) -> str:
        """What head-motion correction will do for this run."""
        n_pairs = sum(kind in ("control", "label") for kind in self.context)
        if n_pairs < 2:
            return "skipped: fewer than 2 control/label volumes to register"
        types = sorted({k for k in self.context if k in ("control", "label", "m0scan", "noRF")})
        return "rigid, estimated per volume type (" + ", ".join(types) + ")"

    def outputs(self) -> list[str]:
        """Derivative files this run writes, relative to the output directory."""
        base = os.path.join(self.out_dir, self.prefix)
        suffixes = [
            s for s in OUTPUT_SUFFIXES if self.quantifies or ("deltam" not in s and "m0" not in s)
        ]
        if not self.is_multidelay:
            suffixes += SINGLE_DELAY_SUFFIXES
        else:
            suffixes += MULTI_DELAY_SUFFIXES
            if self.att_method == "weighted-delay":  # ATT is read off, not fitted
                suffixes = [s for s in suffixes if s not in FITTED_ONLY_SUFFIXES]
            elif self.arterial_component:
                suffixes += ARTERIAL_SUFFIXES
        if self.m0_calibration != "voxel":
            suffixes += ["desc-m0reference_mask.nii.gz"]
        return [f"{base}_{suffix}" for suffix in suffixes]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record (the node input and the ``--dry-run`` plan)."""
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The human-readable plan printed by ``--dry-run``."""
        return {
            "asl_file": self.asl_file,
            "subject": self.subject,
            "session": self.session,
            "volumes": self.volume_counts,
            "dummy_scans": self.dummy_scans,
            "labeling": self.asl_type,
            "model": self.model,
            "post_labeling_delay": self.labeled_value("post_labeling_delay"),
            "volumes_per_delay": {
                f"{d:g}": sum(
                    1
                    for v, kind in zip(self.post_labeling_delay, self.context, strict=True)
                    if v == d and kind in LABELED_TYPES
                )
                for d in self.delays
            },
            "labeling_duration": self.labeled_value("labeling_duration"),
            "bolus_cutoff": (
                {"technique": self.bolus_cutoff_technique, "delay": self.bolus_cutoff_delay}
                if self.asl_type == "PASL"
                else None
            ),
            "readout": (
                "2D (per-slice delay from SliceTiming)"
                if self.slice_timing
                else self.mr_acquisition_type
            ),
            "m0": {
                "type": self.m0_type,
                "file": self.m0_file,
                "repetition_time": self.m0_repetition_time,
                "estimate": self.m0_estimate,
            },
            "head_motion_correction": self.hmc_note,
            "background_suppression": {
                "enabled": self.background_suppression,
                "pulses": self.bs_pulses,
            },
            "labeling_efficiency": self.labeling_efficiency,
            "outputs": self.outputs(),
            "warnings": self.warnings,
        }

    def labeled_value(self, name: str) -> float | list[float] | None:
        """The value(s) of a per-volume field over the labeled volumes (one if all agree)."""
        per_volume = getattr(self, name)
        if per_volume is None:
            return None
        values = sorted(
            {v for v, kind in zip(per_volume, self.context, strict=True) if kind in LABELED_TYPES}
        )
        return values[0] if len(values) == 1 else values


@dataclass
class Discovery:
    """Result of discovery: valid plans and per-run failures ``(asl_file, message)``."""

    plans: list[RunPlan]
    failures: list[tuple[str, str]]


# --------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON sidecar, with a one-line error naming the file when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8-sig") as fobj:
            data = json.load(fobj)
    except json.JSONDecodeError as err:
        raise AslprepError(
            f"not valid JSON (line {err.lineno}, column {err.colno}): fix the file", path=str(path)
        ) from None
    except OSError as err:
        raise AslprepError(f"cannot read: {err.strerror}", path=str(path)) from None
    if not isinstance(data, dict):
        raise AslprepError("must hold a JSON object", path=str(path))
    return data


def read_aslcontext(path: str | Path) -> list[str]:
    """Read ``aslcontext.tsv``: its ``volume_type`` column; CRLF and blank last lines are fine."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fobj:
            text = fobj.read()
    except FileNotFoundError:
        raise AslprepError(
            "missing: every ASL run needs its aslcontext.tsv", path=str(path)
        ) from None
    except OSError as err:
        raise AslprepError(f"cannot read: {err.strerror}", path=str(path)) from None
    lines = [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines or lines[0].split("\t")[0] != "volume_type":
        raise AslprepError("first line must be the header 'volume_type'", path=str(path))
    column = [line.split("\t")[0].strip() for line in lines[1:]]
    for row, kind in enumerate(column, start=2):
        if kind not in VOLUME_TYPES:
            raise AslprepError(
                f"line {row}: unknown volume_type {kind!r} (allowed: {', '.join(VOLUME_TYPES)})",
                path=str(path),
            )
    if not column:
        raise AslprepError("lists no volumes", path=str(path))
    return column


def image_shape(path: str | Path) -> tuple[int, ...]:
    """Shape of a NIfTI image from its header, with a one-line error for unreadable files."""
    import nibabel as nb

    try:
        img = nb.load(str(path))
        shape = tuple(int(n) for n in img.shape)
    except Exception as err:  # nibabel raises several types for truncated/corrupt files
        raise AslprepError(
            f"not a readable NIfTI image ({type(err).__name__}): re-export or replace the file",
            path=str(path),
        ) from None
    return shape


# --------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------


def _strip_prefix(label: str, prefix: str) -> str:
    return label[len(prefix) :] if label.startswith(prefix) else label


def load_layout(bids_dir: Path):
    """Index a BIDS dataset with pybids, with a one-line error when it is not one."""
    description = bids_dir / "dataset_description.json"
    if not description.is_file():
        raise AslprepError(
            "not a BIDS dataset: dataset_description.json is missing", path=str(bids_dir)
        )
    read_json(description)
    # Malformed sidecars would otherwise surface as a pybids traceback without the file name.
    for path in sorted(bids_dir.glob("**/*.json")):
        if "derivatives" not in path.relative_to(bids_dir).parts[:1]:
            read_json(path)

    from bids import BIDSLayout

    try:
        return BIDSLayout(str(bids_dir), validate=False, derivatives=False)
    except Exception as err:
        raise AslprepError(f"pybids cannot index the dataset: {err}", path=str(bids_dir)) from None


def _intended_for(m0_meta: dict[str, Any], subject_dir: Path, bids_dir: Path) -> set[Path]:
    """Resolve IntendedFor (string or list; subject-relative path or BIDS URI) to paths."""
    value = m0_meta.get("IntendedFor")
    if value is None:
        return set()
    items = [value] if isinstance(value, str) else list(value)
    resolved = set()
    for item in items:
        if not isinstance(item, str):
            continue
        if item.startswith("bids::"):
            resolved.add((bids_dir / item[len("bids::") :]).resolve())
        elif item.startswith("bids:"):
            continue  # a URI into another dataset cannot name this run
        else:
            resolved.add((subject_dir / item).resolve())
    return resolved


def _find_m0(layout, asl_file: Path, subject: str, bids_dir: Path) -> Path | None:
    """The M0 of an ASL run: the perf m0scan whose IntendedFor names it, else same entities.

    An m0scan under fmap/ is for distortion correction and is never returned.
    """
    subject_dir = bids_dir / f"sub-{subject}"
    candidates = layout.get(
        subject=subject,
        datatype="perf",
        suffix="m0scan",
        extension=[".nii.gz", ".nii"],
        return_type="filename",
    )
    target = asl_file.resolve()
    for candidate in sorted(candidates):
        meta = read_json(_sidecar_of(Path(candidate)))
        if target in _intended_for(meta, subject_dir, bids_dir):
            return Path(candidate)
    for ext in (".nii.gz", ".nii"):
        same = Path(
            str(asl_file).replace("_asl.nii.gz", "").replace("_asl.nii", "") + "_m0scan" + ext
        )
        if same.is_file():
            return same
    return None


def _sidecar_of(image: Path) -> Path:
    name = image.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
    return image.with_name(stem + ".json")


def discover(
    bids_dir: Path,
    *,
    participant_label: Sequence[str] = (),
    session_label: Sequence[str] = (),
    bids_filters: dict[str, Any] | None = None,
    dummy_scans: int = 0,
    check_images: bool = True,
    options: ProcessingOptions = ProcessingOptions(),
) -> Discovery:
    """Find and validate every ASL run of the selected participants.

    Raises
    ------
    AslprepError
        For dataset-level problems (not BIDS, no ASL data, unknown participant). Per-run
        problems are returned in :attr:`Discovery.failures` so other runs go on.
    """
    bids_dir = Path(bids_dir).resolve()
    layout = load_layout(bids_dir)
    subjects = sorted(layout.get_subjects())
    wanted = [_strip_prefix(label, "sub-") for label in participant_label]
    unknown = sorted(set(wanted) - set(subjects))
    if unknown:
        raise AslprepError(
            f"participant label(s) {', '.join(unknown)} not found "
            f"(the dataset has: {', '.join(subjects) or 'none'})",
            path=str(bids_dir),
        )
    query: dict[str, Any] = {
        "datatype": "perf",
        "suffix": "asl",
        "extension": [".nii.gz", ".nii"],
        "return_type": "filename",
    }
    if wanted:
        query["subject"] = wanted
    if session_label:
        query["session"] = [_strip_prefix(s, "ses-") for s in session_label]
    for key, value in (bids_filters or {}).get("asl", {}).items():
        query[key] = value
    try:
        asl_files = sorted(layout.get(**query))
    except Exception as err:
        raise AslprepError(f"invalid BIDS filter: {err}", path=str(bids_dir)) from None
    if not asl_files:
        raise AslprepError(
            "no ASL runs (perf/*_asl.nii[.gz]) found for the selected participants",
            path=str(bids_dir),
        )
    duplicates = _duplicate_runs(asl_files)
    plans: list[RunPlan] = []
    failures: list[tuple[str, str]] = [
        (
            group[0],
            f"{group[0]}: {len(group)} ASL files share the entities "
            f"{_prefix(Path(group[0]))}: keep one (.nii or .nii.gz)",
        )
        for group in duplicates
    ]
    for asl_file in asl_files:
        if any(asl_file in group for group in duplicates):
            continue
        try:
            plans.append(
                plan_run(
                    layout,
                    Path(asl_file),
                    bids_dir,
                    dummy_scans=dummy_scans,
                    check_images=check_images,
                    options=options,
                )
            )
        except AslprepError as err:
            failures.append((asl_file, str(err)))
    return Discovery(plans=plans, failures=failures)


def _prefix(asl_file: Path) -> str:
    name = asl_file.name
    return name[: name.rindex("_asl.nii")]


def _duplicate_runs(asl_files: Iterable[str]) -> list[list[str]]:
    """Groups of ASL files with the same entities (e.g. both .nii and .nii.gz)."""
    seen: dict[tuple[str, str], list[str]] = {}
    for path in asl_files:
        key = (str(Path(path).parent), _prefix(Path(path)))
        seen.setdefault(key, []).append(path)
    return [sorted(paths) for paths in seen.values() if len(paths) > 1]


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


class _Fields:
    """Typed access to sidecar fields with one-line errors naming the file and the field."""

    def __init__(self, metadata: dict[str, Any], path: Path) -> None:
        self.metadata = metadata
        self.path = str(path)

    def error(self, key: str, message: str) -> AslprepError:
        return AslprepError(f"field '{key}' {message}", path=self.path)

    def has(self, key: str) -> bool:
        return key in self.metadata

    def required(self, key: str, why: str = "") -> Any:
        if key not in self.metadata:
            raise self.error(key, f"is required{why} but missing: add it to the sidecar")
        return self.metadata[key]

    def string(self, key: str, choices: Sequence[str]) -> str:
        value = self.required(key)
        if value not in choices:
            raise self.error(key, f"is {value!r}; it must be one of {', '.join(choices)}")
        return value

    def boolean(self, key: str, why: str = "") -> bool:
        value = self.required(key, why)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def number(self, key: str, value: Any = None, why: str = "") -> float:
        value = self.required(key, why) if value is None else value
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self.error(key, f"must be a number, not {value!r}")
        return float(value)

    def per_volume(self, key: str, n_volumes: int, why: str = "") -> list[float]:
        """A scalar or an array of one number per aslcontext volume, expanded to a list."""
        value = self.required(key, why)
        if isinstance(value, list):
            if len(value) != n_volumes:
                raise self.error(
                    key,
                    f"has {len(value)} values but the aslcontext lists {n_volumes} volumes: "
                    "give one value per volume or a single number",
                )
            return [self.number(key, v) for v in value]
        return [self.number(key, value)] * n_volumes


def _check_delays(
    fields: _Fields, key: str, values: Sequence[float], context: Sequence[str]
) -> None:
    """Delays in seconds: never negative, never plausible only as milliseconds."""
    labeled = [v for v, kind in zip(values, context, strict=True) if kind in LABELED_TYPES]
    if any(v < 0 for v in values):
        raise fields.error(key, f"is negative ({min(values):g}): delays are times in seconds")
    if any(v > MAX_PLAUSIBLE_DELAY_S for v in values):
        raise fields.error(
            key,
            f"is {max(values):g}, implausible in seconds: BIDS times are in seconds "
            f"(did you mean {max(values) / 1000:g} s?)",
        )
    if labeled and min(labeled) == 0:
        raise fields.error(key, "is 0 for a labeled volume: no labeled blood can be imaged")


def plan_run(
    layout,
    asl_file: Path,
    bids_dir: Path,
    *,
    dummy_scans: int = 0,
    check_images: bool = True,
    options: ProcessingOptions = ProcessingOptions(),
) -> RunPlan:
    """Validate one ASL run's files and metadata into a :class:`RunPlan`."""
    entities = layout.parse_file_entities(str(asl_file))
    subject = str(entities["subject"])
    session = entities.get("session")
    sidecar = _sidecar_of(asl_file)
    aslcontext_file = Path(str(asl_file)[: str(asl_file).rindex("_asl.nii")] + "_aslcontext.tsv")
    context_all = read_aslcontext(aslcontext_file)
    metadata = dict(layout.get_metadata(str(asl_file)))
    if not metadata:
        raise AslprepError(
            "no sidecar metadata found: every ASL run needs an _asl.json", path=str(sidecar)
        )
    fields = _Fields(metadata, sidecar)
    warnings: list[str] = []

    if check_images:
        shape = image_shape(asl_file)
        if len(shape) != 4:
            raise AslprepError(
                f"is a {len(shape)}D image; an ASL series must be 4D (x, y, z, volumes)",
                path=str(asl_file),
            )
        if shape[3] != len(context_all):
            raise AslprepError(
                f"has {shape[3]} volumes but {aslcontext_file.name} lists {len(context_all)}",
                path=str(asl_file),
            )
    n_all = len(context_all)

    asl_type = fields.string("ArterialSpinLabelingType", ASL_TYPES)
    m0_type = fields.string("M0Type", M0_TYPES)
    field_strength = fields.number("MagneticFieldStrength")
    if field_strength <= 0:
        raise fields.error("MagneticFieldStrength", f"must be > 0 T, not {field_strength:g}")
    try:
        constants.blood_t1(field_strength)
    except ValueError as err:
        raise fields.error("MagneticFieldStrength", str(err)) from None

    pld_all = fields.per_volume("PostLabelingDelay", n_all)
    _check_delays(fields, "PostLabelingDelay", pld_all, context_all)
    tr_all = fields.per_volume("RepetitionTimePreparation", n_all)
    if any(tr <= 0 for tr in tr_all):
        raise fields.error(
            "RepetitionTimePreparation",
            f"is {min(tr_all):g}: it must be > 0 s (a zero TR would quantify to nonsense)",
        )
    if any(tr > 100 for tr in tr_all):
        raise fields.error(
            "RepetitionTimePreparation",
            f"is {max(tr_all):g}, implausible in seconds (milliseconds?)",
        )

    labeling_duration = None
    if asl_type in ("PCASL", "CASL"):
        ld_all = fields.per_volume("LabelingDuration", n_all, why=f" for {asl_type}")
        _check_delays(fields, "LabelingDuration", ld_all, context_all)
        labeling_duration = ld_all

    bolus_technique = None
    bolus_delay = None
    if asl_type == "PASL":
        if not fields.boolean("BolusCutOffFlag", why=" for PASL"):
            raise fields.error(
                "BolusCutOffFlag",
                "is false: PASL without a bolus cut-off (QUIPSS, QUIPSS II, Q2TIPS) has no "
                "known bolus duration and cannot be quantified with the single-compartment model",
            )
        bolus_technique = fields.string("BolusCutOffTechnique", BOLUS_TECHNIQUES)
        raw_delay = fields.required("BolusCutOffDelayTime", " when BolusCutOffFlag is true")
        delays = raw_delay if isinstance(raw_delay, list) else [raw_delay]
        bolus_delay = [fields.number("BolusCutOffDelayTime", v) for v in delays]
        expected = 2 if bolus_technique == "Q2TIPS" else 1
        if len(bolus_delay) != expected:
            raise fields.error(
                "BolusCutOffDelayTime",
                f"has {len(bolus_delay)} value(s); {bolus_technique} needs {expected}"
                + (" ([TI1, TI1s])" if expected == 2 else ""),
            )
        _check_delays(fields, "BolusCutOffDelayTime", bolus_delay, ["label"] * len(bolus_delay))

    background_suppression = fields.boolean("BackgroundSuppression")
    bs_pulses = 0
    efficiency = None
    if fields.has("LabelingEfficiency"):
        efficiency = fields.number("LabelingEfficiency")
        # Consensus values are 0.68-0.98; below 0.3 is a typo, not a labeling scheme.
        if not 0.3 <= efficiency <= 1:
            raise fields.error(
                "LabelingEfficiency", f"is {efficiency:g}; it must be a fraction in [0.3, 1]"
            )
    if background_suppression:
        if fields.has("BackgroundSuppressionNumberPulses"):
            pulses = fields.number("BackgroundSuppressionNumberPulses")
            if pulses < 0 or pulses != int(pulses):
                raise fields.error(
                    "BackgroundSuppressionNumberPulses",
                    f"must be a whole number >= 0, not {pulses:g}",
                )
            bs_pulses = int(pulses)
        elif efficiency is None:
            bs_pulses = 1
            warnings.append(
                "BackgroundSuppressionNumberPulses missing: assuming 1 pulse for the labeling "
                "efficiency; add the field or LabelingEfficiency"
            )

    acquisition = str(metadata.get("MRAcquisitionType", "3D"))
    slice_timing = None
    slice_axis = 2
    if acquisition == "2D":
        timing = fields.required("SliceTiming", " for 2D acquisitions (MRAcquisitionType 2D)")
        if not isinstance(timing, list) or not timing:
            raise fields.error("SliceTiming", "must be an array of one time per slice")
        slice_timing = [fields.number("SliceTiming", v) for v in timing]
        if min(slice_timing) < 0 or max(slice_timing) > max(tr_all):
            raise fields.error("SliceTiming", "values must lie between 0 and the repetition time")
        direction = str(metadata.get("SliceEncodingDirection", "k"))
        if direction.rstrip("-") not in ("i", "j", "k"):
            raise fields.error("SliceEncodingDirection", f"is {direction!r}; use i, j or k")
        slice_axis = "ijk".index(direction.rstrip("-"))
        if direction.endswith("-"):
            # BIDS: with a negative direction the first entry is the slice with the largest
            # index; the plan keeps one entry per array index, in array order.
            slice_timing = slice_timing[::-1]
        if check_images and len(slice_timing) != shape[slice_axis]:
            raise fields.error(
                "SliceTiming",
                f"has {len(slice_timing)} values but the image has {shape[slice_axis]} slices",
            )

    # Drop the non-steady-state volumes before anything is paired or averaged.
    if dummy_scans < 0 or dummy_scans >= n_all:
        raise AslprepError(
            f"--dummy-scans {dummy_scans} leaves no volumes (the series has {n_all})",
            path=str(asl_file),
        )
    keep = slice(dummy_scans, None)
    context = context_all[keep]
    try:
        subtraction = plan_subtraction(context)
    except ValueError as err:
        raise AslprepError(
            f"{err}" + (f" after dropping {dummy_scans} dummy scans" if dummy_scans else ""),
            path=str(aslcontext_file),
        ) from None
    if subtraction.n_volumes == 0 and "cbf" not in context:
        raise AslprepError(
            "no control/label pairs, no deltam and no cbf volumes: nothing to quantify",
            path=str(aslcontext_file),
        )
    pld = pld_all[keep]
    labeling_duration = labeling_duration[keep] if labeling_duration is not None else None
    # A control and its label are one measurement: they must share their timing.
    for key, values in (("PostLabelingDelay", pld), ("LabelingDuration", labeling_duration)):
        if values is None:
            continue
        for c, lab in zip(subtraction.control, subtraction.label, strict=True):
            if lab >= 0 and values[c] != values[lab]:
                raise fields.error(
                    key,
                    f"differs within a control/label pair (volumes {min(c, lab) + dummy_scans} "
                    f"and {max(c, lab) + dummy_scans}: {values[c]:g} vs {values[lab]:g})",
                )
    labeled_plds = {p for p, kind in zip(pld, context, strict=True) if kind in LABELED_TYPES}
    if bolus_technique == "QUIPSS" and len(labeled_plds) > 1:
        raise fields.error(
            "BolusCutOffTechnique",
            "is QUIPSS with several inversion times: its bolus width changes with TI, which the "
            "kinetic model does not describe (QUIPSS II and Q2TIPS are supported)",
        )
    if bolus_technique == "QUIPSS" and bolus_delay and min(labeled_plds) <= bolus_delay[0]:
        raise fields.error(
            "BolusCutOffDelayTime",
            "must be shorter than the inversion time (PostLabelingDelay) for QUIPSS",
        )
    if (
        bolus_technique in ("QUIPSSII", "Q2TIPS")
        and len(labeled_plds) == 1
        and min(labeled_plds) <= bolus_delay[0]
    ):
        raise fields.error(
            "PostLabelingDelay",
            f"(the inversion time, {min(labeled_plds):g} s) must be longer than "
            f"BolusCutOffDelayTime ({bolus_delay[0]:g} s) for single-delay {bolus_technique}",
        )
    repetition_time = tr_all[keep]

    m0_file = m0_tr = m0_estimate = None
    if subtraction.n_volumes:
        m0_file, m0_tr, m0_estimate = _plan_m0(
            layout,
            fields,
            asl_file,
            bids_dir,
            subject,
            m0_type,
            context,
            repetition_time,
            background_suppression,
            check_images,
        )
    else:
        warnings.append("cbf volumes only: they are passed through, no M0 is used")

    echo_time, spin_echo = 0.0, False
    m0_calibration = options.m0_calibration
    if m0_calibration != "voxel" and subtraction.n_volumes:
        if m0_type == "Estimate":
            raise fields.error(
                "M0Type",
                f"is Estimate: --m0-calibration {m0_calibration} needs an M0 image "
                "(Separate, Included or Absent)",
            )
        m0_meta = read_json(_sidecar_of(m0_file)) if m0_file else metadata
        m0_sidecar = _Fields(m0_meta, _sidecar_of(m0_file) if m0_file else sidecar)
        if m0_sidecar.has("EchoTime"):
            raw_te = m0_meta["EchoTime"]
            echo_time = m0_sidecar.number(
                "EchoTime", raw_te[0] if isinstance(raw_te, list) else raw_te
            )
            if not 0 <= echo_time < 1:
                raise m0_sidecar.error(
                    "EchoTime", f"is {echo_time:g}: it must be in seconds, between 0 and 1"
                )
        else:
            warnings.append(
                "EchoTime missing: the reference-region M0 is not corrected for T2 decay"
            )
        sequence = str(metadata.get("PulseSequenceType", "")).lower()
        spin_echo = "grase" in sequence or "spin" in sequence
    sources = [asl_file, aslcontext_file] + ([Path(m0_file)] if m0_file else [])
    out_dir = os.path.relpath(asl_file.parent, bids_dir)
    plan = RunPlan(
        asl_file=str(asl_file),
        aslcontext_file=str(aslcontext_file),
        sidecar_file=str(sidecar),
        prefix=_prefix(asl_file),
        subject=subject,
        session=str(session) if session is not None else None,
        out_dir=out_dir,
        context=context,
        n_source_volumes=n_all,
        dummy_scans=dummy_scans,
        asl_type=asl_type,
        m0_type=m0_type,
        field_strength=field_strength,
        background_suppression=background_suppression,
        bs_pulses=bs_pulses,
        post_labeling_delay=pld,
        labeling_duration=labeling_duration,
        repetition_time=repetition_time,
        labeling_efficiency=efficiency,
        bolus_cutoff_technique=bolus_technique,
        bolus_cutoff_delay=bolus_delay,
        mr_acquisition_type=acquisition,
        slice_timing=slice_timing,
        slice_axis=slice_axis,
        m0_file=str(m0_file) if m0_file else None,
        m0_repetition_time=m0_tr,
        m0_estimate=m0_estimate,
        source_files=["bids:raw:" + os.path.relpath(p, bids_dir) for p in sources],
        warnings=warnings,
        **asdict(options),
        echo_time=echo_time,
        spin_echo=spin_echo,
    )
    for message in warnings:
        LOGGER.warning("%s: %s", sidecar, message)
    return plan


def _plan_m0(
    layout,
    fields: _Fields,
    asl_file: Path,
    bids_dir: Path,
    subject: str,
    m0_type: str,
    context: Sequence[str],
    repetition_time: Sequence[float],
    background_suppression: bool,
    check_images: bool,
) -> tuple[Path | None, float | None, float | None]:
    """Find and check the M0 for the run's M0Type: (file, its TR, M0Estimate)."""
    if m0_type == "Separate":
        m0_file = _find_m0(layout, asl_file, subject, bids_dir)
        if m0_file is None:
            raise fields.error(
                "M0Type",
                "is Separate but no perf/*_m0scan.nii[.gz] has IntendedFor naming this run "
                "or shares its entities: add the M0 or correct M0Type",
            )
        m0_fields = _Fields(read_json(_sidecar_of(m0_file)), _sidecar_of(m0_file))
        key = (
            "RepetitionTimePreparation"
            if m0_fields.has("RepetitionTimePreparation")
            else "RepetitionTime"
        )
        if not m0_fields.has(key):
            raise m0_fields.error(
                "RepetitionTimePreparation", "is required for the M0 scan but missing"
            )
        raw_tr = m0_fields.metadata[key]
        m0_tr = m0_fields.number(key, raw_tr[0] if isinstance(raw_tr, list) and raw_tr else raw_tr)
        if m0_tr <= 0:
            raise m0_fields.error(key, f"is {m0_tr:g}: it must be > 0 s")
        if check_images:
            shape = image_shape(m0_file)
            if len(shape) not in (3, 4):
                raise AslprepError(
                    f"has shape {shape}; an M0 must be 3D (or 4D)", path=str(m0_file)
                )
        return m0_file, m0_tr, None
    if m0_type == "Included":
        indices = [i for i, kind in enumerate(context) if kind == "m0scan"]
        if not indices:
            raise fields.error("M0Type", "is Included but the aslcontext has no m0scan volume")
        trs = {repetition_time[i] for i in indices}
        return None, max(trs), None
    if m0_type == "Estimate":
        estimate = fields.number("M0Estimate", why=" when M0Type is Estimate")
        if estimate <= 0:
            raise fields.error("M0Estimate", f"is {estimate:g}; it must be > 0")
        return None, None, estimate
    # Absent: calibrate with the mean control, only valid without background suppression.
    if background_suppression:
        raise fields.error(
            "M0Type",
            "is Absent with BackgroundSuppression true: suppressed control images cannot "
            "stand in for M0; provide an M0 scan or M0Estimate",
        )
    if "control" not in context:
        raise fields.error("M0Type", "is Absent and there are no control volumes to use as M0")
    controls = [repetition_time[i] for i, kind in enumerate(context) if kind == "control"]
    return None, max(controls), None
