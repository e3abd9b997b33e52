"""BIDS discovery (pybids): a subject's ASL runs, their M0 scans and T1w images.

:func:`collect_data` finds the files of one subject; :func:`discover` validates every ASL run
of the selected subjects into :class:`~aslprep_lite.bids.asl_run.AslRun` objects and keeps
per-run failures apart, so one bad run never stops the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from aslprep_lite.bids.anatomy import check_t1w, choose_t1w
from aslprep_lite.bids.asl_run import AslRun
from aslprep_lite.bids.files import asl_prefix, read_json, sidecar_of
from aslprep_lite.bids.validation import validate_run
from aslprep_lite.errors import AslprepError

_NIFTI = [".nii.gz", ".nii"]


@dataclass
class SubjectData:
    """The files of one subject that aslprep_lite reads (absolute paths, sorted)."""

    asl: list[str] = field(default_factory=list)
    m0scan: list[str] = field(default_factory=list)
    t1w: list[str] = field(default_factory=list)


@dataclass
class Discovery:
    """Validated runs, and per-run failures ``(asl_file, message)``."""

    runs: list[AslRun]
    failures: list[tuple[str, str]]


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


def collect_data(
    layout,
    subject: str,
    *,
    session_label: Sequence[str] = (),
    bids_filters: dict[str, Any] | None = None,
) -> SubjectData:
    """The ASL series, perf M0 scans and T1w images of one subject.

    ``bids_filters`` takes fMRIPrep's form: ``{"asl": {...}, "t1w": {...}}``, pybids entity
    filters per file kind. T1w images of every session are listed (one anatomical reference
    per subject, as fMRIPrep builds by default).
    """
    filters = bids_filters or {}
    sessions = [s.removeprefix("ses-") for s in session_label]
    queries = {
        "asl": {
            "datatype": "perf",
            "suffix": "asl",
            **({"session": sessions} if sessions else {}),
        },
        "m0scan": {"datatype": "perf", "suffix": "m0scan"},
        "t1w": {"datatype": "anat", "suffix": "T1w"},
    }
    found = {}
    for kind, query in queries.items():
        # the filter file's entities override the defaults, as in fMRIPrep
        query = {"subject": subject, "extension": _NIFTI, **query, **filters.get(kind, {})}
        try:
            found[kind] = sorted(layout.get(return_type="filename", **query))
        except Exception as err:
            raise AslprepError(
                f"invalid BIDS filter for {kind!r}: {err}", path=str(layout.root)
            ) from None
    asl, m0scan, t1w = found["asl"], found["m0scan"], found["t1w"]
    return SubjectData(asl=asl, m0scan=m0scan, t1w=t1w)


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


def find_m0(asl_file: Path, *, m0scans: Iterable[str], subject_dir: Path, bids_dir: Path):
    """The M0 of an ASL run: the perf m0scan whose IntendedFor names it, else same entities.

    An m0scan under fmap/ is for distortion correction and is never returned.
    """
    target = asl_file.resolve()
    for candidate in sorted(m0scans):
        meta = read_json(sidecar_of(Path(candidate)))
        if target in _intended_for(meta, subject_dir, bids_dir):
            return Path(candidate)
    for ext in _NIFTI:
        same = Path(
            str(asl_file).replace("_asl.nii.gz", "").replace("_asl.nii", "") + "_m0scan" + ext
        )
        if same.is_file():
            return same
    return None


def _duplicate_runs(asl_files: Iterable[str]) -> list[list[str]]:
    """Groups of ASL files with the same entities (e.g. both .nii and .nii.gz)."""
    seen: dict[tuple[str, str], list[str]] = {}
    for path in asl_files:
        key = (str(Path(path).parent), asl_prefix(Path(path)))
        seen.setdefault(key, []).append(path)
    return [sorted(paths) for paths in seen.values() if len(paths) > 1]


def discover(
    bids_dir: Path,
    *,
    participant_label: Sequence[str] = (),
    session_label: Sequence[str] = (),
    bids_filters: dict[str, Any] | None = None,
    dummy_scans: int = 0,
    check_images: bool = True,
    m0_calibration: str = "voxel",
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
    wanted = [label.removeprefix("sub-") for label in participant_label]
    unknown = sorted(set(wanted) - set(subjects))
    if unknown:
        raise AslprepError(
            f"participant label(s) {', '.join(unknown)} not found "
            f"(the dataset has: {', '.join(subjects) or 'none'})",
            path=str(bids_dir),
        )
    collected = {
        subject: collect_data(
            layout, subject, session_label=session_label, bids_filters=bids_filters
        )
        for subject in (wanted or subjects)
    }
    asl_files = sorted(f for data in collected.values() for f in data.asl)
    if not asl_files:
        raise AslprepError(
            "no ASL runs (perf/*_asl.nii[.gz]) found for the selected participants",
            path=str(bids_dir),
        )
    duplicates = _duplicate_runs(asl_files)
    runs: list[AslRun] = []
    failures: list[tuple[str, str]] = [
        (
            group[0],
            f"{group[0]}: {len(group)} ASL files share the entities "
            f"{asl_prefix(Path(group[0]))}: keep one (.nii or .nii.gz)",
        )
        for group in duplicates
    ]
    anatomy: dict[str, tuple[str | None, str | None]] = {}  # subject -> (T1w, its problem)
    for subject, data in collected.items():
        t1w = choose_t1w(data.t1w)
        try:
            if t1w and check_images:  # a dry run plans from the metadata alone
                check_t1w(t1w)
            anatomy[subject] = (t1w, None)
        except AslprepError as err:
            anatomy[subject] = (t1w, str(err))
    for asl_file in asl_files:
        if any(asl_file in group for group in duplicates):
            continue
        subject = str(layout.parse_file_entities(asl_file)["subject"])
        try:
            runs.append(
                validate_run(
                    layout,
                    Path(asl_file),
                    bids_dir,
                    dummy_scans=dummy_scans,
                    check_images=check_images,
                    m0_calibration=m0_calibration,
                    find_m0=partial(
                        find_m0,
                        m0scans=collected[subject].m0scan,
                        subject_dir=bids_dir / f"sub-{subject}",
                        bids_dir=bids_dir,
                    ),
                )
            )
        except AslprepError as err:
            failures.append((asl_file, str(err)))
            continue
        t1w, problem = anatomy[subject]
        if problem:  # the participant's anatomy is unusable: its runs fail, others go on
            failures.append((asl_file, problem))
            runs.pop()
            continue
        runs[-1].t1w_file = t1w
        runs[-1].other_t1w = [f for f in collected[subject].t1w if f != t1w]
    return Discovery(runs=runs, failures=failures)
