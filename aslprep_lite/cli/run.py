"""``aslprep-lite``: the BIDS-App entry point.

:func:`main` (the console script) parses the command line, sets up logging, installs the
SIGTERM/SIGINT handlers that also stop nipype's worker processes (found by walking ``/proc``)
and turns errors into one-line messages and exit codes. The work itself is elsewhere:
:mod:`aslprep_lite.cli.workflow` runs the nipype graph, :mod:`aslprep_lite.cli.crashes` reads
its crash files and :mod:`aslprep_lite.cli.provenance` writes ``dataset_description.json``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# nipype checks online for updates at import time unless told not to; compute nodes are
# offline and the check must never delay or break a run.
os.environ.setdefault("NIPYPE_NO_ET", "1")

from aslprep_lite.cli.parser import build_parser
from aslprep_lite.cli.provenance import write_dataset_description
from aslprep_lite.cli.workflow import decide_anatomy, run_participants
from aslprep_lite.config import build_settings, check_writable
from aslprep_lite.errors import AslprepError

LOGGER = logging.getLogger("aslprep_lite")
#: The process that installed the signal handlers (nipype's forked workers inherit them).
_MAIN_PID = os.getpid()


def _setup_logging(verbosity: int) -> None:
    level = {-2: logging.ERROR, -1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        verbosity, logging.DEBUG if verbosity > 1 else logging.ERROR
    )
    logging.basicConfig(format="%(levelname)s: %(message)s", level=level, force=True)
    LOGGER.setLevel(logging.INFO if verbosity >= 0 else logging.ERROR)


def _descendants(pid: int) -> list[int]:
    """Process ids of every descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _terminate(signum: int, _frame) -> None:
    """On SIGTERM/SIGINT stop nipype's worker processes too, then exit (128 + signal).

    Without this, MultiProc workers outlive an interrupted run and could race a rerun in the
    same work directory. Outputs need no cleanup: they are only ever moved into place whole.
    Forked workers inherit this handler; in them the signal takes its default action.
    """
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    for child in _descendants(os.getpid()):
        try:
            os.kill(child, signal.SIGTERM)
        except OSError:
            pass
    print(f"aslprep-lite: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
    os._exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run aslprep-lite; return the process exit code.

    Parameters
    ----------
    argv : Sequence[str] or None
        The command-line arguments without the program name (``None``: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success; 1 if a run failed or an error stopped aslprep-lite (a usage error
        exits with 2 from the argument parser; with -v errors are raised, not returned).
    """
    options = build_parser().parse_args(argv)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    verbosity = options.verbose - options.quiet
    _setup_logging(verbosity)
    try:
        return _main(options)
    except AslprepError as err:
        print(f"aslprep-lite: error: {err}", file=sys.stderr)
        if verbosity > 0:
            raise
        return 1
    except Exception as err:
        if verbosity > 0:
            raise
        print(
            f"aslprep-lite: unexpected error: {type(err).__name__}: {err} "
            "(run again with -v for the traceback)",
            file=sys.stderr,
        )
        return 1


def _main(options) -> int:
    from aslprep_lite.bids.discovery import discover
    from aslprep_lite.bids.summary import run_summary
    from aslprep_lite.spaces import check_templates

    settings = build_settings(options)
    execution, quantification = settings.execution, settings.quantification
    if execution.analysis_level == "group":
        # the group level reads the participant level's outputs only: no templates, no
        # validation of the raw runs
        from aslprep_lite.group import run_group

        return run_group(
            execution.bids_dir,
            settings.outputs.output_dir,
            participant_label=execution.participant_label,
            session_label=execution.session_label,
            dry_run=execution.dry_run,
        )
    # every template file the output spaces need, before any processing (offline)
    check_templates(settings.outputs.output_spaces)
    start = time.monotonic()
    discovery = discover(
        execution.bids_dir,
        participant_label=execution.participant_label,
        session_label=execution.session_label,
        bids_filters=execution.bids_filters,
        dummy_scans=quantification.dummy_scans,
        check_images=not execution.dry_run,
        m0_calibration=quantification.m0_calibration,
    )
    failures = list(discovery.failures)
    if execution.dry_run:
        # the decisions a run makes before its graph (reused anatomy, refusals), no image read
        precomputed, refused = decide_anatomy(settings, discovery.runs, check_files=False)
        failures += refused
        refused_files = {asl_file for asl_file, _ in refused}
        plan = {
            "runs": [
                run_summary(
                    run,
                    quantification,
                    settings.outputs.output_spaces,
                    precomputed=precomputed.get(run.subject),
                )
                for run in discovery.runs
                if run.asl_file not in refused_files
            ],
            "failures": [{"asl_file": f, "error": msg} for f, msg in failures],
        }
        try:
            print(json.dumps(plan, indent=2))
        except BrokenPipeError:  # e.g. piped into `head`: the reader has what it wanted
            sys.stderr.close()
        return 1 if failures else 0
    check_writable(settings.outputs.output_dir)
    check_writable(execution.work_dir)
    write_dataset_description(execution.bids_dir, settings.outputs.output_dir)
    if discovery.runs:
        failures += run_participants(settings, discovery.runs)
    from aslprep_lite.reports.participant import write_reports

    reports = write_reports(
        settings.outputs.output_dir,
        execution.bids_dir,
        [run.asl_file for run in discovery.runs],
        failures,
    )

    n_ok = len(discovery.runs) + len(discovery.failures) - len(failures)
    for _, message in failures:
        print(f"aslprep-lite: error: {message}", file=sys.stderr)
    LOGGER.info(
        "%d run(s) processed, %d failed in %.1f s; derivatives in %s",
        n_ok,
        len(failures),
        time.monotonic() - start,
        settings.outputs.output_dir,
    )
    for report in reports:
        LOGGER.info("report: %s", report)
    return 1 if failures else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
