"""Building and running the nipype graph of a participant-level run.

nipype's configuration, the choice of its execution plugin, the methods boilerplate, the
quality warnings the runs wrote and the check that every run left all its outputs. nipype and
the workflows are imported only when a graph is run, so that ``--help`` and ``--dry-run`` stay
fast; the command line (:mod:`aslprep_lite.cli.run`) sets ``NIPYPE_NO_ET`` before that.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from aslprep_lite import __version__
from aslprep_lite.cli.crashes import crash_messages
from aslprep_lite.config import Settings

if TYPE_CHECKING:
    from aslprep_lite.bids.asl_run import AslRun

LOGGER = logging.getLogger("aslprep_lite")


def _configure_nipype(settings: Settings, crash_dir: Path) -> None:
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    nipype_level = "INFO" if settings.execution.verbosity >= 2 else "CRITICAL"
    nipype_config.update_config(
        {
            "execution": {
                "crashdump_dir": str(crash_dir),
                "crashfile_format": "txt",
                "stop_on_first_crash": settings.execution.stop_on_first_crash,
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


def run_participants(settings: Settings, runs: Sequence[AslRun]) -> list[tuple[str, str]]:
    """Build and run the nipype graph; return ``(asl_file, reason)`` for each failed run.

    Parameters
    ----------
    settings : Settings
        The run's settings (output and work directories, plugin, processes, memory, ...).
    runs : Sequence[AslRun]
        The validated runs to process, one workflow each in one graph.

    Returns
    -------
    list[tuple[str, str]]
        For each run that failed or did not write all its outputs, its ASL file and the
        one-line reason (from the crash files, or ``"processing stopped before outputs"``).
    """
    from aslprep_lite.workflows.asl.base import run_workflow_name
    from aslprep_lite.workflows.base import (
        collect_boilerplate,
        init_aslprep_lite_wf,
        subject_workflow_name,
    )

    resources, failures = prepare_spaces(settings, runs)
    runs = [run for run in runs if run.asl_file not in {f for f, _ in failures}]
    if not runs:
        return failures
    crash_dir = settings.execution.work_dir / "crashes"
    shutil.rmtree(crash_dir, ignore_errors=True)
    crash_dir.mkdir(parents=True, exist_ok=True)
    _configure_nipype(settings, crash_dir)
    workflow = init_aslprep_lite_wf(settings, runs, resources)
    _forget_unwritten_outputs(settings, runs)
    _write_boilerplate(settings, collect_boilerplate(workflow))

    execution = settings.execution
    if execution.plugin:
        plugin, plugin_args = execution.plugin, dict(execution.plugin_args)
    else:
        plugin = "Linear" if execution.nprocs == 1 else "MultiProc"
        plugin_args = {"n_procs": execution.nprocs, "raise_insufficient": False}
        if execution.mem_gb:
            plugin_args["memory_gb"] = execution.mem_gb
    if "graph" not in plugin.lower():  # graph plugins submit everything at once: no callback
        plugin_args["status_callback"] = _progress(workflow, runs)
    # nipype's MultiProc runs gc.collect() on every poll: freezing the graph built so far
    # keeps each of those cheap (the scheduler used 85 s of CPU in a 110 s participant)
    gc.freeze()
    try:
        workflow.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as err:
        if "did not execute cleanly" not in str(err) and not list(crash_dir.glob("crash-*")):
            raise
    messages = crash_messages(crash_dir)
    output_dir = settings.outputs.output_dir
    for subject in sorted({run.subject for run in runs}):
        anat = f".{subject_workflow_name(subject)}.anat_wf."
        if any(anat in f".{node}." for node in messages):
            if settings.execution.anat_derivatives is None:  # else nothing is written there
                _remove_anatomy(settings, subject)  # no anat/ left of a failed anatomy
        else:
            _report_anatomy_warnings(output_dir, subject)
    for run in runs:
        _report_quality_warnings(output_dir, run)
        name = run_workflow_name(run)
        anat = f".{subject_workflow_name(run.subject)}.anat_wf."  # its participant's anatomy
        reasons = [
            msg
            for node, msg in messages.items()
            if f".{name}." in f".{node}." or anat in f".{node}."
        ]
        if reasons or _missing_outputs(settings, run):
            failures.append(
                (run.asl_file, reasons[0] if reasons else "processing stopped before outputs")
            )
    return failures


def _progress(workflow, runs: Sequence[AslRun]):
    """The nipype status callback that logs a line per stage and run (:mod:`.progress`)."""
    from aslprep_lite.cli.progress import Progress
    from aslprep_lite.workflows.asl.base import run_workflow_name
    from aslprep_lite.workflows.base import subject_workflow_name

    labels = {run_workflow_name(run): run.prefix for run in runs}
    labels |= {subject_workflow_name(run.subject): f"sub-{run.subject}" for run in runs}
    from nipype.interfaces.utility import IdentityInterface

    # nipype drops identity nodes (inputnode, outputnode) from the graph it runs
    names = [
        f"{workflow.name}.{name}"
        for name in workflow.list_node_names()
        if not isinstance(workflow.get_node(name).interface, IdentityInterface)
    ]
    return Progress(names, labels)


def _forget_unwritten_outputs(settings: Settings, runs: Sequence[AslRun]) -> None:
    """Make the writer run again for a run whose derivatives are missing from the output.

    nipype reruns a node only when its inputs change; derivatives deleted (or an output
    directory emptied) since a run in the same work directory would otherwise stay missing.
    """
    from aslprep_lite.workflows.asl.base import run_workflow_name
    from aslprep_lite.workflows.base import subject_workflow_name

    root = settings.execution.work_dir / "aslprep_lite_wf"
    for run in runs:
        subject = root / subject_workflow_name(run.subject)
        if _missing_outputs(settings, run, anatomy=False):
            shutil.rmtree(
                subject / run_workflow_name(run) / "outputs_wf" / "write_derivatives",
                ignore_errors=True,
            )
        if _missing_anatomy(settings, run):
            shutil.rmtree(subject / "anat_wf" / "write_anatomy", ignore_errors=True)


def _missing_outputs(settings: Settings, run: AslRun, *, anatomy: bool = True) -> list[str]:
    """The derivatives of ``run`` (output spec), and with ``anatomy`` of its participant's
    anatomy, that are not in the output directory."""
    from aslprep_lite.bids.derivatives import planned_paths

    output_dir = settings.outputs.output_dir
    planned = planned_paths(run, settings.quantification, settings.outputs.output_spaces)
    missing = [path for path in planned if not (output_dir / path).exists()]
    return missing + (_missing_anatomy(settings, run) if anatomy else [])


def _missing_anatomy(settings: Settings, run: AslRun) -> list[str]:
    """The anatomical derivatives of the run's participant that are not written (none are
    written for a participant without a T1w or with ``--anat-derivatives``)."""
    from aslprep_lite.bids.derivatives import planned_anatomy_paths

    if run.t1w_file is None or settings.execution.anat_derivatives is not None:
        return []
    output_dir = settings.outputs.output_dir
    planned = planned_anatomy_paths(run.subject, settings.outputs.output_spaces)
    return [path for path in planned if not (output_dir / path).exists()]


def prepare_spaces(settings: Settings, runs: Sequence[AslRun]):
    """The template files and records of the output spaces, and each participant's anatomy.

    Returns the :class:`~aslprep_lite.workflows.base.SpaceResources` and the runs that cannot
    go on, ``(asl_file, reason)``, as :func:`decide_anatomy` decides them.
    """
    from aslprep_lite.spaces import anatomy_template_files, check_templates
    from aslprep_lite.templates import template_provenance
    from aslprep_lite.workflows.base import SpaceResources

    spaces = settings.outputs.output_spaces
    template_files = check_templates(spaces)
    records = {
        space.label: {
            **template_provenance(space.name),
            "Resolution": space.resolution,
            **({"Cohort": space.cohort} if space.cohort else {}),
        }
        for space in spaces
        if space.is_template
    }
    precomputed, failures = decide_anatomy(settings, runs)
    preprocess = settings.execution.anat_derivatives is None and any(r.t1w_file for r in runs)
    resources = SpaceResources(
        spaces=tuple(spaces),
        template_files={k: {r: str(p) for r, p in v.items()} for k, v in template_files.items()},
        space_records=records,
        anatomy_template_files=(
            {k: str(v) for k, v in anatomy_template_files().items()} if preprocess else None
        ),
        precomputed=precomputed,
    )
    return resources, failures


def decide_anatomy(settings: Settings, runs: Sequence[AslRun], *, check_files: bool = True):
    """Each participant's anatomical reference, and the runs that cannot go on.

    The one place these decisions are made, for a run and for ``--dry-run`` alike:

    * ``--anat-derivatives``: the participant's reused anatomy becomes its runs' T1w
      (``run.t1w_file`` is set to it); a participant whose folder lacks a file fails with one
      line, the others go on; one without a T1w in the raw data either is processed T1w-free,
      with a warning.
    * ``--m0-calibration csf|wm`` without ``--m0-reference-mask`` needs a T1w to segment: a
      run without one is refused.

    Parameters
    ----------
    settings
        The run's settings.
    runs
        The validated runs (their ``t1w_file`` is updated in place).
    check_files
        Read the reused images and transforms in full; ``--dry-run`` passes False (files are
        found by name only, nothing heavy is read).

    Returns
    -------
    tuple
        ``{subject: PrecomputedAnatomy}`` and ``[(asl_file, reason)]`` of the refused runs.
    """
    from aslprep_lite.bids.anat_derivatives import find_precomputed_anatomy
    from aslprep_lite.errors import AslprepError

    spaces = settings.outputs.output_spaces
    precomputed, failures = {}, []
    anat_dir = settings.execution.anat_derivatives
    for subject in sorted({run.subject for run in runs}):
        if anat_dir is None:
            break
        # sMRIPrep names a cohort's transforms <template>+<cohort>: ask with the cohort,
        # keep them by template and cohort (one normalization each)
        asked = {
            s.template_key: f"{s.name}:cohort-{s.cohort}" if s.cohort else s.name
            for s in spaces
            if s.is_template
        }
        try:
            found = find_precomputed_anatomy(
                anat_dir, subject, sorted(asked.values()), check_files=check_files
            )
            precomputed[subject] = replace(
                found,
                to_template={name: found.to_template[key] for name, key in asked.items()},
                from_template={name: found.from_template[key] for name, key in asked.items()},
            )
        except AslprepError as err:
            if not any(run.t1w_file for run in runs if run.subject == subject):
                # no T1w to fall back on either way: the T1w-free mode, said out loud
                LOGGER.warning("%s; sub-%s has no T1w: processed without one", err, subject)
                continue
            failures += [(run.asl_file, str(err)) for run in runs if run.subject == subject]
            continue
        for run in runs:  # the reused anatomy is the participant's anatomical reference
            if run.subject == subject:
                run.t1w_file = str(precomputed[subject].t1w)
    options = settings.quantification
    failed = {f for f, _ in failures}
    for run in runs:
        if (
            run.asl_file not in failed
            and run.has_deltam
            and options.m0_calibration != "voxel"
            and not options.m0_reference_mask
            and run.t1w_file is None
        ):
            failures.append((run.asl_file, reference_region_problem(run, options.m0_calibration)))
    return precomputed, failures


def _remove_anatomy(settings: Settings, subject: str) -> None:
    """Remove a participant's anatomical derivatives after its anatomy failed.

    The anatomy is written in one move, after every step succeeded, so a failure leaves none
    of this run's files; but the files of an earlier run in the same output folder would
    stay, and no longer match what the participant's runs used. Only the files aslprep_lite
    writes there are removed (and the folder, if nothing else is left in it).
    """
    from aslprep_lite.bids.derivatives import planned_anatomy_paths

    output_dir = settings.outputs.output_dir
    for path in planned_anatomy_paths(subject, settings.outputs.output_spaces):
        for name in (path, path.rsplit(".nii.gz", 1)[0].rsplit(".h5", 1)[0] + ".json"):
            (output_dir / name).unlink(missing_ok=True)
    folder = output_dir / f"sub-{subject}" / "anat"
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _report_anatomy_warnings(output_dir: Path, subject: str) -> None:
    """Print the warnings of a participant's normalizations (sidecars of its anat/ files)."""
    from aslprep_lite.bids.derivatives import anatomy_prefix

    prefix = output_dir / anatomy_prefix(subject)
    sidecars = [Path(f"{prefix}_desc-preproc_T1w.json")]
    sidecars += sorted(prefix.parent.glob(f"{prefix.name}_from-T1w_to-*_xfm.json"))
    seen = set()
    for sidecar in sidecars:
        if sidecar.is_file():
            warning = json.loads(sidecar.read_text()).get("Normalization", {}).get("Warning")
            if warning and warning not in seen:
                seen.add(warning)
                LOGGER.warning("%s: %s", sidecar, warning)


def _report_quality_warnings(output_dir: Path, run: AslRun) -> None:
    """Print the quality warnings a run wrote into its CBF sidecar (they must not go unseen)."""
    sidecar = output_dir / run.out_dir / f"{run.prefix}_cbf.json"
    if sidecar.is_file():
        content = json.loads(sidecar.read_text())
        warnings = list(content.get("QualityWarnings", []))
        coregistration = content.get("Coregistration", {})
        if "Path" in coregistration:  # which of the two registrations was kept, said out loud
            LOGGER.info(
                "%s: ASL to T1w coregistration from the %s (Dice %s; candidates %s)",
                sidecar,
                coregistration["Path"],
                coregistration["Dice"],
                coregistration["Candidates"],
            )
        if coregistration.get("Warning"):  # not to be found only on disk
            warnings.append(coregistration["Warning"])
        # T1w-free with several templates: each registration has its own record (transforms)
        for xfm in sorted(sidecar.parent.glob(f"{run.prefix}_from-aslref_to-*_xfm.json")):
            warning = json.loads(xfm.read_text()).get("Coregistration", {}).get("Warning")
            if warning and warning not in warnings:
                warnings.append(warning)
        for warning in warnings:
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
    write_atomic_text(settings.outputs.output_dir / "logs" / "CITATION.md", text)


def reference_region_problem(run: AslRun, calibration: str) -> str:
    """Why a run cannot be calibrated with a reference region: no mask and no T1w."""
    from aslprep_lite.errors import AslprepError

    return str(
        AslprepError(
            f"--m0-calibration {calibration} needs --m0-reference-mask FILE (a "
            f"{calibration.upper()} mask on the ASL grid) or a T1w image of the participant to "
            "segment",
            path=run.asl_file,
        )
    )
