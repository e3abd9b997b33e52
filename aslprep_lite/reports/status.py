"""The status record of a participant's runs: ``OUT/logs/sub-<label>_runs.json``.

One JSON file per participant processed, written by the command line at the end of a
participant-level run, listing every ASL run of the participant that the run considered:
those processed, those that failed (in processing, in the preparation of the spaces, or at
discovery, before any processing), each with its one-line error. The group level reads it to
list failed participants. No time stamp: the same inputs give the same bytes.

It is under ``logs/`` and not under ``sub-<label>/`` because a participant whose runs all
failed leaves no ``sub-<label>/`` folder (no partial outputs).

Schema (version 1)::

    {
      "Participant": "01",
      "Report": "sub-01.html",
      "Runs": [
        {"AslFile": "sub-01/ses-a/perf/sub-01_ses-a_asl.nii.gz",
         "Prefix": "sub-01_ses-a", "Session": "a",
         "Status": "ok", "Error": null},
        ...
      ],
      "SchemaVersion": 1,
      "Status": "ok"
    }

``AslFile`` is relative to the input dataset (symbolic links kept: a DataLad/git-annex file
is named by its BIDS path, not its annex object); ``Status`` of a run is ``ok`` or ``failed``
(then ``Error`` is its one line, as printed); the participant's ``Status`` is ``ok`` when
every run is, else ``failed``. Runs are in the order of their file names. Runs of an earlier
invocation that this one did not consider stay listed (:func:`with_earlier_runs`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Version of the record's layout (bumped when a field changes meaning).
SCHEMA_VERSION = 1
#: The status of a run that wrote all its outputs, and of one that did not.
OK, FAILED = "ok", "failed"


@dataclass(frozen=True)
class RunStatus:
    """What happened to one ASL run."""

    asl_file: str
    prefix: str
    subject: str
    session: str | None
    status: str
    error: str | None = None


def status_path(output_dir: Path, subject: str) -> Path:
    """``OUT/logs/sub-<label>_runs.json``."""
    return Path(output_dir) / "logs" / f"sub-{subject}_runs.json"


def report_name(subject: str) -> str:
    """The report's file name, relative to the output folder: ``sub-<label>.html``."""
    return f"sub-{subject}.html"


def _entities(asl_file: str) -> tuple[str, str | None, str]:
    """Subject, session and prefix (the name before ``_asl``) of an ASL file's name."""
    name = Path(asl_file).name
    subject = re.search(r"(?:^|_)sub-([A-Za-z0-9]+)", name)
    session = re.search(r"_ses-([A-Za-z0-9]+)", name)
    prefix = re.sub(r"_asl(\.nii(\.gz)?)?$", "", name)
    return (
        subject.group(1) if subject else "unknown",
        session.group(1) if session else None,
        prefix,
    )


def _relative(path: str, bids_dir: Path) -> str:
    """``path`` relative to the dataset, symbolic links kept.

    A DataLad/git-annex file is a link into ``.git/annex/objects``: resolving it would give
    the object's path, whose name has no BIDS entities. Only when the file is not under the
    dataset as given (e.g. one of them reached through a link to a folder) are the folders
    resolved, never the file itself; a file not in the dataset at all (should not happen) is
    kept whole.
    """
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(bids_dir))
    if relative != os.pardir and not relative.startswith(os.pardir + os.sep):
        return Path(relative).as_posix()
    absolute = Path(os.path.abspath(path))
    try:
        real = absolute.parent.resolve() / absolute.name
        return real.relative_to(Path(bids_dir).resolve()).as_posix()
    except ValueError:
        return str(path)


def collect_statuses(
    bids_dir: Path,
    processed: Iterable[str],
    failures: Sequence[tuple[str, str]],
) -> dict[str, list[RunStatus]]:
    """Every run's status, by participant label.

    Parameters
    ----------
    bids_dir : Path
        The input dataset (ASL files are recorded relative to it).
    processed : iterable of str
        ASL files of the runs that were validated and handed to processing.
    failures : sequence of (str, str)
        ``(asl_file, one-line error)`` of every failed run: at discovery, in the preparation
        of the spaces or in processing (the first line of a run wins).

    Returns
    -------
    dict
        ``{subject: [RunStatus, ...]}``, runs sorted by file name, subjects sorted.
    """
    errors: dict[str, str] = {}
    for asl_file, message in failures:
        errors.setdefault(asl_file, message)
    by_subject: dict[str, list[RunStatus]] = {}
    for asl_file in sorted(set(processed) | set(errors)):
        subject, session, prefix = _entities(asl_file)
        error = errors.get(asl_file)
        by_subject.setdefault(subject, []).append(
            RunStatus(
                asl_file=_relative(asl_file, bids_dir),
                prefix=prefix,
                subject=subject,
                session=session,
                status=FAILED if error else OK,
                error=error,
            )
        )
    return {subject: by_subject[subject] for subject in sorted(by_subject)}


def with_earlier_runs(
    output_dir: Path, bids_dir: Path, subject: str, runs: Sequence[RunStatus]
) -> list[RunStatus]:
    """``runs`` and the runs of the participant's previous record that this invocation did
    not consider (e.g. another ``--session-label``), sorted by file name.

    An earlier run is kept only while its ASL file is still in the dataset and, if it was
    ``ok``, its CBF map is still in the output: the record describes what is on disk.
    """
    try:
        previous = json.loads(status_path(output_dir, subject).read_text(encoding="utf-8"))
        earlier = previous["Runs"] if previous.get("SchemaVersion") == SCHEMA_VERSION else []
    except (OSError, ValueError, KeyError, AttributeError):
        return list(runs)
    current = {run.asl_file for run in runs}
    kept = list(runs)
    for entry in earlier:
        try:
            asl_file, status = str(entry["AslFile"]), str(entry["Status"])
            prefix, session, error = str(entry["Prefix"]), entry["Session"], entry["Error"]
        except (KeyError, TypeError):
            continue
        if asl_file in current or not (Path(bids_dir) / asl_file).is_file():
            continue
        folder = Path(output_dir) / f"sub-{subject}" / (f"ses-{session}" if session else "")
        if status == OK and not (folder / "perf" / f"{prefix}_cbf.nii.gz").is_file():
            continue
        kept.append(RunStatus(asl_file, prefix, subject, session, status, error))
    return sorted(kept, key=lambda run: run.asl_file)


def status_record(subject: str, runs: Sequence[RunStatus]) -> dict:
    """The JSON content of a participant's status record (see the module docstring)."""
    return {
        "Participant": subject,
        "Report": report_name(subject),
        "Runs": [
            {
                "AslFile": run.asl_file,
                "Error": run.error,
                "Prefix": run.prefix,
                "Session": run.session,
                "Status": run.status,
            }
            for run in runs
        ],
        "SchemaVersion": SCHEMA_VERSION,
        "Status": OK if all(run.status == OK for run in runs) else FAILED,
    }


def write_status(output_dir: Path, subject: str, runs: Sequence[RunStatus]) -> Path:
    """Write ``logs/sub-<label>_runs.json`` (atomically); return its path."""
    from aslprep_lite.images import write_atomic_text

    path = status_path(output_dir, subject)
    text = json.dumps(status_record(subject, runs), indent=2, sort_keys=True) + "\n"
    write_atomic_text(path, text)
    return path
