"""``aslprep-lite``: the BIDS-App entry point."""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# nipype checks online for updates at import time unless told not to; compute nodes are
# offline and the check must never delay or break a run.
os.environ.setdefault("NIPYPE_NO_ET", "1")

from aslprep_lite import __version__
from aslprep_lite.cli.parser import build_parser
from aslprep_lite.config import Settings, build_settings, check_writable
from aslprep_lite.errors import AslprepError

LOGGER = logging.getLogger("aslprep_lite")
#: Write errors that mean the disk (or the user's quota, or a file-size limit) is full.
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # errno values are ints
#: The process that installed the signal handlers (nipype's forked workers inherit them).
_MAIN_PID = os.getpid()
DEPENDENCIES = ("nipype", "pybids", "nibabel", "numpy", "scipy", "SimpleITK")


def _setup_logging(verbosity: int) -> None:
    level = {-2: logging.ERROR, -1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        verbosity, logging.DEBUG if verbosity > 1 else logging.ERROR
    )
    logging.basicConfig(format="%(levelname)s: %(message)s", level=level, force=True)
    LOGGER.setLevel(logging.INFO if verbosity >= 0 else logging.ERROR)


def software_versions() -> dict[str, str]:
    """Versions of aslprep_lite's scientific dependencies."""
    versions = {"python": platform.python_version()}
    for name in DEPENDENCIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def write_dataset_description(settings: Settings) -> None:
    """BIDS-Derivatives ``dataset_description.json`` (no time stamp: reruns are identical)."""
    from aslprep_lite.bids import read_json
    from aslprep_lite.images import write_atomic_text

    raw = read_json(settings.bids_dir / "dataset_description.json")
    source = {"URL": settings.bids_dir.as_uri()}
    if raw.get("DatasetDOI"):
        source["DOI"] = raw["DatasetDOI"]
    description = {
        "Name": "aslprep_lite derivatives" + (f" of {raw['Name']}" if raw.get("Name") else ""),
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "aslprep_lite",
                "Version": __version__,
                "Description": "Dependencies: "
                + ", ".join(f"{k} {v}" for k, v in software_versions().items()),
            }
        ],
        "SourceDatasets": [source],
        "DatasetLinks": {"raw": settings.bids_dir.as_uri()},
    }
    write_atomic_text(
        settings.output_dir / "dataset_description.json",
        json.dumps(description, indent=2, sort_keys=True) + "\n",
    )


def _configure_nipype(settings: Settings, crash_dir: Path) -> None:
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    nipype_level = "INFO" if settings.verbosity >= 2 else "CRITICAL"
    nipype_config.update_config(
        {
            "execution": {
                "crashdump_dir": str(crash_dir),
                "crashfile_format": "txt",
                "stop_on_first_crash": settings.stop_on_first_crash,
                "hash_method": "content",
                "remove_unnecessary_outputs": False,
                "check_version": False,
                "create_report": False,
                "parameterize_dirs": False,
                # nipype polls for finished jobs every 2 s by default: most of a small run.
                "poll_sleep_duration": 0.05,
            },
            "logging": {
                "workflow_level": nipype_level,
                "interface_level": nipype_level,
                "utils_level": nipype_level,
            },
            "monitoring": {"enabled": False},
        }
    )
    nipype_logging.update_logging(nipype_config)


def crash_messages(crash_dir: Path) -> dict[str, str]:
    """Map nipype node paths to the one-line reason they failed, from the crash files."""
    messages = {}
    for crash in sorted(crash_dir.glob("crash-*.txt")):
        text = crash.read_text(errors="replace")
        header = dict(line.split(":", 1) for line in text.splitlines()[:3] if line.count(":") >= 1)
        node = header.get("Node", "").strip()
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        reason = next(
            (line for line in reversed(lines) if "Error" in line.split(":", 1)[0]), lines[-1]
        )
        prefix = "aslprep_lite.errors.AslprepError:"
        full_disk = next((e for e in DISK_FULL if f"[Errno {e}]" in reason), None)
        if reason.startswith(prefix):
            reason = reason[len(prefix) :].strip()
        elif full_disk is not None:
            where = header.get("Working directory", "").strip() or str(crash.parent)
            reason = (
                f"{where}: cannot write ({os.strerror(full_disk)}): free space on that "
                "disk, or give -w (and OUTPUT_DIR) on one with room"
            )
        else:
            reason = f"{reason} (details: {crash})"
        messages[node] = reason
    return messages


def run_participants(settings: Settings, plans) -> list[tuple[str, str]]:
    """Build and run the nipype graph; return ``(asl_file, reason)`` for each failed run."""
    from aslprep_lite.workflows.base import (
        collect_boilerplate,
        init_aslprep_lite_wf,
        run_workflow_name,
    )

    crash_dir = settings.work_dir / "crashes"
    shutil.rmtree(crash_dir, ignore_errors=True)
    crash_dir.mkdir(parents=True, exist_ok=True)
    _configure_nipype(settings, crash_dir)
    workflow = init_aslprep_lite_wf(settings, plans)
    _write_boilerplate(settings, collect_boilerplate(workflow))

    if settings.plugin:
        plugin, plugin_args = settings.plugin, dict(settings.plugin_args)
    else:
        plugin = "Linear" if settings.nprocs == 1 else "MultiProc"
        plugin_args = {"n_procs": settings.nprocs, "raise_insufficient": False}
        if settings.mem_gb:
            plugin_args["memory_gb"] = settings.mem_gb
    try:
        workflow.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as err:
        if "did not execute cleanly" not in str(err) and not list(crash_dir.glob("crash-*")):
            raise
    messages = crash_messages(crash_dir)
    failures = []
    for plan in plans:
        _report_quality_warnings(settings, plan)
        name = run_workflow_name(plan)
        reasons = [msg for node, msg in messages.items() if f".{name}." in f".{node}."]
        missing = [f for f in plan.outputs() if not (settings.output_dir / f).exists()]
        if reasons or missing:
            failures.append(
                (plan.asl_file, reasons[0] if reasons else "processing stopped before outputs")
            )
    return failures


def _report_quality_warnings(settings: Settings, plan) -> None:
    """Print the quality warnings a run wrote into its CBF sidecar (they must not go unseen)."""
    sidecar = settings.output_dir / plan.out_dir / f"{plan.prefix}_cbf.json"
    if sidecar.is_file():
        for warning in json.loads(sidecar.read_text()).get("QualityWarnings", []):
            LOGGER.warning("%s: %s", sidecar, warning)


def _write_boilerplate(settings: Settings, paragraphs: Sequence[str]) -> None:
    from aslprep_lite.images import write_atomic_text
    from aslprep_lite.quant.constants import table

    references = "\n".join(f"- {text}" for _, text in sorted(table()["references"].items()))
    text = (
        "# Methods\n\nResults included in this manuscript come from preprocessing performed "
        f"using aslprep_lite {__version__}, which is based on nipype.\n\n"
        + "\n\n".join(paragraphs)
        + f"\n\n## References\n\n{references}\n"
    )
    write_atomic_text(settings.output_dir / "logs" / "CITATION.md", text)


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
    """Run aslprep-lite; return the process exit code."""
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
    from aslprep_lite.bids import ProcessingOptions, discover

    settings = build_settings(options)
    start = time.monotonic()
    discovery = discover(
        settings.bids_dir,
        participant_label=settings.participant_label,
        session_label=settings.session_label,
        bids_filters=settings.bids_filters,
        dummy_scans=settings.dummy_scans,
        check_images=not settings.dry_run,
        options=ProcessingOptions(
            att_method=settings.att_method,
            att_prior=settings.att_prior,
            arterial_component=settings.arterial_component,
            m0_calibration=settings.m0_calibration,
            m0_reference_mask=settings.m0_reference_mask,
        ),
    )
    failures = list(discovery.failures)
    if settings.dry_run:
        plan = {
            "runs": [p.summary() for p in discovery.plans],
            "failures": [{"asl_file": f, "error": msg} for f, msg in failures],
        }
        try:
            print(json.dumps(plan, indent=2))
        except BrokenPipeError:  # e.g. piped into `head`: the reader has what it wanted
            sys.stderr.close()
        return 1 if failures else 0
    if settings.analysis_level == "group":
        LOGGER.info("the group level has nothing to do in this version")
        return 0

    check_writable(settings.output_dir)
    check_writable(settings.work_dir)
    write_dataset_description(settings)
    if discovery.plans:
        failures += run_participants(settings, discovery.plans)

    n_ok = len(discovery.plans) + len(discovery.failures) - len(failures)
    for _, message in failures:
        print(f"aslprep-lite: error: {message}", file=sys.stderr)
    LOGGER.info(
        "%d run(s) processed, %d failed in %.1f s; derivatives in %s",
        n_ok,
        len(failures),
        time.monotonic() - start,
        settings.output_dir,
    )
    return 1 if failures else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
