"""``crash_messages``: the one-line reason of a failed step, read from nipype's crash files.

The fake crash files follow nipype's text format (``crash2txt``): ``Node:`` and ``Working
directory:`` lines, a blank line, the node's inputs, then the traceback, whose last error line
is the reason.
"""

from __future__ import annotations

from pathlib import Path

from aslprep_lite.cli.crashes import crash_messages

NODE = "aslprep_lite_wf.run_sub_01_asl_wf.compute_cbf"
WORKDIR = "/scratch/work/aslprep_lite_wf/run_sub_01_asl_wf/compute_cbf"


def _write_crash(crash_dir: Path, error_line: str, name: str = "compute_cbf") -> Path:
    """Write a nipype-like text crash file whose traceback ends in ``error_line``."""
    crash = crash_dir / f"crash-20240101-120000-user-{name}-0000.txt"
    crash.write_text(
        f"Node: {NODE}\n"
        f"Working directory: {WORKDIR}\n"
        "\n"
        "Node inputs:\n"
        "\n"
        "in_file = /data/sub-01/perf/sub-01_asl.nii.gz\n"
        "m0_scale = 1.0\n"
        "\n"
        "Traceback (most recent call last):\n"
        '  File "/venv/nipype/pipeline/plugins/multiproc.py", line 67, in run_node\n'
        '    result["result"] = node.run(updatehash=updatehash)\n'
        '  File "/venv/aslprep_lite/interfaces/cbf.py", line 120, in _run_interface\n'
        "    cbf = compute(data)\n"
        f"{error_line}\n"
    )
    return crash


def test_aslprep_error_gives_its_message(tmp_path: Path) -> None:
    _write_crash(
        tmp_path,
        "aslprep_lite.errors.AslprepError: the M0 image is zero everywhere in the brain mask",
    )
    assert crash_messages(tmp_path) == {NODE: "the M0 image is zero everywhere in the brain mask"}


def test_full_disk_names_the_working_directory(tmp_path: Path) -> None:
    _write_crash(tmp_path, f"OSError: [Errno 28] No space left on device: '{WORKDIR}/cbf.nii.gz'")
    assert crash_messages(tmp_path) == {
        NODE: f"{WORKDIR}: cannot write (No space left on device): free space on that disk, "
        "or give -w (and OUTPUT_DIR) on one with room"
    }


def test_other_error_points_to_the_crash_file(tmp_path: Path) -> None:
    crash = _write_crash(
        tmp_path, "ValueError: operands could not be broadcast together with shapes (4,) (5,)"
    )
    assert crash_messages(tmp_path) == {
        NODE: "ValueError: operands could not be broadcast together with shapes (4,) (5,) "
        f"(details: {crash})"
    }


def test_no_crash_files_no_messages(tmp_path: Path) -> None:
    (tmp_path / "report.txt").write_text("Node: not a crash file\n")
    assert crash_messages(tmp_path) == {}
