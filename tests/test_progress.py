"""Progress lines: one per stage and run, a time-left estimate once a run is complete."""

from __future__ import annotations

import logging
import subprocess
import sys
from types import SimpleNamespace

from aslprep_lite.cli.progress import Progress, stage_of
from aslprep_lite.synthetic import SyntheticSpec, write_dataset

LABELS = {"asl_sub_01_run_1": "sub-01_run-1", "asl_sub_02": "sub-02", "sub_01_wf": "sub-01"}
TOP = "aslprep_lite_wf"
NODES = [
    f"{TOP}.sub_01_wf.asl_sub_01_run_1.load_series",
    f"{TOP}.sub_01_wf.asl_sub_01_run_1.cbf_wf.deltam",
    f"{TOP}.sub_01_wf.asl_sub_01_run_1.cbf_wf.cbf",
    f"{TOP}.sub_01_wf.anat_wf.preprocess",
    f"{TOP}.sub_02_wf.asl_sub_02.cbf_wf.cbf",
]


def test_stage_of() -> None:
    assert stage_of(NODES[0], LABELS) == ("sub-01_run-1", "load")
    assert stage_of(NODES[2], LABELS) == ("sub-01_run-1", "cbf_wf")
    assert stage_of(NODES[3], LABELS) == ("sub-01", "anat_wf")
    assert stage_of(f"{TOP}.elsewhere.node", LABELS) is None


def test_lines(caplog) -> None:
    now = [100.0]
    progress = Progress(NODES, LABELS, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="aslprep_lite")

    def report(index: int, status: str, at: float) -> None:
        now[0] = at
        progress(SimpleNamespace(fullname=NODES[index]), status)

    report(0, "start", 100.0)
    report(0, "end", 101.0)
    report(1, "end", 105.0)  # the CBF stage still has a node to run: no line
    report(3, "end", 130.0)  # the anatomy: a complete item, two to go
    report(2, "end", 140.0)  # the run: complete, one to go
    report(4, "exception", 150.0)
    assert [r.getMessage() for r in caplog.records] == [
        "[1 s] sub-01_run-1: load done",
        "[30 s] sub-01: anatomy done; 2 to go, about 1 min 00 s left",
        "[40 s] sub-01_run-1: CBF done; 1 to go, about 20 s left",
        "[50 s] sub-02: CBF failed",
    ]


def test_cli_lines_and_quiet(tmp_path) -> None:
    """The real CLI prints a line per stage; ``-q`` silences them."""
    write_dataset(tmp_path / "bids", [SyntheticSpec(subject="01", seed=3)])
    command = [sys.executable, "-m", "aslprep_lite", str(tmp_path / "bids")]
    common = ["participant", "-w", str(tmp_path / "work"), "--output-spaces", "asl"]
    loud = subprocess.run(
        [*command, str(tmp_path / "out"), *common], capture_output=True, text=True, check=True
    )
    stages = [line for line in loud.stderr.splitlines() if "] sub-01: " in line]
    # independent stages may finish in either order under MultiProc
    assert sorted(line.split(": ", 2)[2] for line in stages) == [
        "CBF done",
        "M0 done",
        "confounds done",
        "derivatives done",
        "head motion done",
        "load done",
        "quality control done",
    ]
    assert stages[-1].endswith("derivatives done")
    quiet = subprocess.run(
        [*command, str(tmp_path / "out2"), *common, "-q"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert quiet.stderr == ""
