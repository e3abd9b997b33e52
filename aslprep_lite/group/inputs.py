"""What the group level reads: per-run QC rows, template-space CBF maps, failures.

The derivatives are indexed by pybids, restricted to the ``perf`` folders (the work of the
participant level writes thousands of other files there: anatomy, figures, logs), without
metadata, so 50 runs index in about a second. The raw dataset is only globbed for its ASL
series, to list the participants that have no outputs, and the participant level's status
records (``OUT/logs/sub-<label>_runs.json``) are read for the failed runs and their errors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aslprep_lite.errors import AslprepError
from aslprep_lite.quant.qc import COLUMNS, Value, read_qc_tsv
from aslprep_lite.spaces import NONSTANDARD

__all__ = [
    "GroupInputs",
    "QcRun",
    "TemplateMap",
    "collect_inputs",
    "status_records",
]

QC_SUFFIX = "_desc-qualitycontrol_cbf.tsv"
#: ``<prefix>_space-<tpl>[_cohort-<c>][_res-<r>]_cbf.nii.gz`` (the resampled CBF, no desc).
#: ``space-T1w`` matches too: :func:`collect_inputs` leaves it out (each participant's own grid).
_TEMPLATE_CBF = re.compile(
    r"^(?P<prefix>sub-[A-Za-z0-9]+(?:_[a-z]+-[A-Za-z0-9]+)*?)"
    r"_space-(?P<space>[A-Za-z0-9]+)(?:_cohort-(?P<cohort>[A-Za-z0-9]+))?"
    r"(?:_res-(?P<res>[A-Za-z0-9]+))?_cbf\.nii\.gz$"
)
#: The run's brain mask in the same space, written beside its CBF map.
MASK_SUFFIX = "_desc-brain_mask.nii.gz"
#: Folders of the output directory that never hold the files read here.
_IGNORED = re.compile(r"/(anat|figures|log|logs|func|dwi|fmap)(/|$)")


@dataclass(frozen=True)
class QcRun:
    """One run's QC row and where it came from."""

    prefix: str
    subject: str
    session: str | None
    run: str | None
    path: Path
    row: dict[str, Value]


@dataclass(frozen=True)
class TemplateMap:
    """A run's CBF map in a template space, and its brain mask there (None when missing)."""

    prefix: str
    space: str
    cohort: str | None
    res: str | None
    path: Path
    mask: Path | None = None

    @property
    def key(self) -> tuple[str, str | None, str | None]:
        """The (template, cohort, resolution) the group map is made for."""
        return (self.space, self.cohort, self.res)


@dataclass
class GroupInputs:
    """Everything the group level reads, selected by participant and session."""

    runs: list[QcRun]
    maps: list[TemplateMap]
    bids_participants: list[str]
    #: participant label -> failed runs ``[(prefix, error line)]``, from the status records
    failures: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def without_outputs(self) -> list[str]:
        """Participants of the dataset with ASL data but no QC file."""
        done = {run.subject for run in self.runs}
        return [label for label in self.bids_participants if label not in done]


def _entity(prefix: str, name: str) -> str | None:
    match = re.search(rf"(?:^|_){name}-([A-Za-z0-9]+)", prefix)
    return match.group(1) if match else None


def bids_participants(bids_dir: Path, sessions: Sequence[str] = ()) -> list[str]:
    """Labels of the participants with an ASL series (``perf/*_asl.nii[.gz]``)."""
    found = set()
    for pattern in ("sub-*/perf/*_asl.nii*", "sub-*/ses-*/perf/*_asl.nii*"):
        for path in bids_dir.glob(pattern):
            session = _entity(path.name, "ses")
            if sessions and session not in sessions:
                continue
            found.add(path.parts[len(bids_dir.parts)].removeprefix("sub-"))
    return sorted(found)


def _index(output_dir: Path):
    """pybids layout of the output directory's ``perf`` files only."""
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    indexer = BIDSLayoutIndexer(validate=False, index_metadata=False, ignore=[_IGNORED])
    try:
        return BIDSLayout(
            str(output_dir),
            validate=False,
            is_derivative=True,
            config=["bids", "derivatives"],
            indexer=indexer,
        )
    except Exception as err:
        raise AslprepError(
            f"pybids cannot index the derivatives: {err}", path=str(output_dir)
        ) from None


def _read_row(path: Path) -> dict[str, Value]:
    """The one row of a run's QC table, or a one-line error naming the file."""
    try:
        rows = read_qc_tsv(path)
    except (OSError, UnicodeDecodeError, ValueError, IndexError) as err:
        raise AslprepError(
            f"cannot read the quality-control table ({type(err).__name__}: {err}): run the "
            "participant level again for this participant",
            path=str(path),
        ) from None
    if len(rows) != 1 or set(rows[0]) != set(COLUMNS):
        raise AslprepError(
            f"not a quality-control table of this version (expected one row with the columns "
            f"{', '.join(COLUMNS)}): run the participant level again for this participant",
            path=str(path),
        )
    return {name: rows[0][name] for name in COLUMNS}


def collect_inputs(
    bids_dir: Path,
    output_dir: Path,
    *,
    participant_label: Sequence[str] = (),
    session_label: Sequence[str] = (),
) -> GroupInputs:
    """Find and read the QC rows and template maps of the selected participants.

    Template maps are the ``space-<tpl>…_cbf.nii.gz`` of template spaces only (not
    ``space-T1w``, which is on each participant's own grid), each with its
    ``…_desc-brain_mask.nii.gz`` when that exists.

    Raises
    ------
    AslprepError
        Unknown participant labels, no QC file at all, or a damaged QC table.
    """
    sessions = [s.removeprefix("ses-") for s in session_label]
    participants = bids_participants(bids_dir, sessions)
    wanted = [label.removeprefix("sub-") for label in participant_label]
    unknown = sorted(set(wanted) - set(participants))
    if unknown:
        raise AslprepError(
            f"participant label(s) {', '.join(unknown)} have no ASL series in the input "
            f"dataset (it has: {', '.join(participants) or 'none'})",
            path=str(bids_dir),
        )
    selected = wanted or participants
    if not output_dir.is_dir():
        raise AslprepError(
            "output directory does not exist: run the participant level first",
            path=str(output_dir),
        )
    layout = _index(output_dir)
    query = {"subject": selected, "datatype": "perf", "return_type": "filename"}
    if sessions:
        query["session"] = sessions
    qc_files = sorted(
        Path(f)
        for f in layout.get(suffix="cbf", desc="qualitycontrol", extension=".tsv", **query)
        if f.endswith(QC_SUFFIX)
    )
    if not qc_files:
        raise AslprepError(
            "no quality-control files (sub-*/[ses-*/]perf/*_desc-qualitycontrol_cbf.tsv) for "
            "the selected participants: run the participant level first",
            path=str(output_dir),
        )
    runs = []
    for path in qc_files:
        prefix = path.name[: -len(QC_SUFFIX)]
        runs.append(
            QcRun(
                prefix=prefix,
                subject=_entity(prefix, "sub") or "",
                session=_entity(prefix, "ses"),
                run=_entity(prefix, "run"),
                path=path,
                row=_read_row(path),
            )
        )
    maps = []
    for name in layout.get(suffix="cbf", extension=".nii.gz", desc=None, **query):
        path = Path(name)
        match = _TEMPLATE_CBF.match(path.name)
        # space-T1w maps are each on their participant's own T1w grid: not a common space
        if match and match["space"] not in NONSTANDARD:
            mask = path.with_name(path.name[: -len("_cbf.nii.gz")] + MASK_SUFFIX)
            maps.append(
                TemplateMap(path=path, mask=mask if mask.is_file() else None, **match.groupdict())
            )
    maps.sort(key=lambda m: (m.key[0], m.key[1] or "", m.key[2] or "", m.prefix))
    return GroupInputs(
        runs=runs,
        maps=maps,
        bids_participants=selected,
        failures={label: status_records(output_dir, label, sessions) for label in selected},
    )


def status_records(
    output_dir: Path, label: str, sessions: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """Failed runs of a participant, from its status record ``OUT/logs/sub-<label>_runs.json``.

    The participant level writes the record (schema version 1: a ``Runs`` list of objects with
    ``Prefix``, ``Session``, ``Status`` ``"ok"`` or ``"failed"`` and ``Error``, the run's one
    line). Read tolerantly: a missing, unreadable or differently shaped record gives nothing
    (the participant is then still listed as without outputs when it has no QC table).

    Returns
    -------
    list of (str, str)
        ``(prefix, error line)`` of each failed run, in the record's order; with ``sessions``,
        only runs of those sessions.
    """
    path = output_dir / "logs" / f"sub-{label}_runs.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    runs = record.get("Runs") if isinstance(record, dict) else None
    found = []
    for run in runs if isinstance(runs, list) else []:
        if not isinstance(run, dict) or run.get("Status") != "failed":
            continue
        if sessions and run.get("Session") not in sessions:
            continue
        name = run.get("Prefix") or run.get("AslFile") or f"sub-{label}"
        found.append((str(name), str(run.get("Error") or "failed")))
    return found
