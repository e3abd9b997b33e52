"""Bad input, through the real command line: each case is one mutation of a valid dataset.

Every case must end with a non-zero exit, one error line that names the file and the field or
condition, no traceback, no derivative files for the failed run, and the input untouched.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from helpers import edit_sidecar

from aslprep_lite.synthetic import SyntheticSpec, write_dataset

PERF = Path("sub-01") / "perf"
ASL_JSON = PERF / "sub-01_asl.json"
ASL_NII = PERF / "sub-01_asl.nii.gz"
CONTEXT = PERF / "sub-01_aslcontext.tsv"
M0_NII = PERF / "sub-01_m0scan.nii.gz"
M0_JSON = PERF / "sub-01_m0scan.json"


def edit_json(relative: Path, **changes) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        edit_sidecar(root / relative, **changes)

    return mutate


def write_text(relative: Path, text: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        (root / relative).write_text(text)

    return mutate


def remove(relative: Path) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        (root / relative).unlink()

    return mutate


def replace_image(relative: Path, change: Callable[[np.ndarray], np.ndarray], affine=None):
    def mutate(root: Path) -> None:
        path = root / relative
        img = nb.load(path)
        data = change(np.asarray(img.dataobj, dtype=np.float32))
        new = nb.Nifti1Image(data, img.affine if affine is None else affine)
        path.write_bytes(gzip.compress(new.to_bytes(), mtime=0))

    return mutate


def truncate(relative: Path) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / relative
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])

    return mutate


def garbage(relative: Path) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        (root / relative).write_bytes(b"\x1f\x8b" + bytes(range(256)) * 4)

    return mutate


def make_directory(relative: Path) -> Callable[[Path], None]:
    """An unreadable file: root reads any file whatever its mode, so use a directory."""

    def mutate(root: Path) -> None:
        path = root / relative
        path.unlink()
        path.mkdir()

    return mutate


def both(*mutations: Callable[[Path], None]) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        for mutation in mutations:
            mutation(root)

    return mutate


def duplicate_run(root: Path) -> None:
    img = nb.load(root / ASL_NII)
    nb.save(img, root / PERF / "sub-01_asl.nii")


def no_asl_runs(root: Path) -> None:
    for path in (root / PERF).glob("sub-01_asl*"):
        path.unlink()


def far_away_m0(affine: np.ndarray) -> np.ndarray:
    moved = affine.copy()
    moved[:3, 3] += 5000.0  # no overlap with the ASL field of view at all
    return moved


#: (case id, spec overrides, mutation, words the one error line must contain)
CASES = [
    ("not-bids", {}, remove(Path("dataset_description.json")), ["not a BIDS dataset"]),
    ("no-asl-runs", {}, no_asl_runs, ["no ASL runs"]),
    ("missing-sidecar", {}, remove(ASL_JSON), ["sub-01_asl.json", "missing"]),
    ("missing-aslcontext", {}, remove(CONTEXT), ["sub-01_aslcontext.tsv", "missing"]),
    ("unreadable-sidecar", {}, make_directory(ASL_JSON), ["sub-01_asl.json", "cannot read"]),
    (
        "unreadable-aslcontext",
        {},
        make_directory(CONTEXT),
        ["sub-01_aslcontext.tsv", "cannot read"],
    ),
    ("malformed-json", {}, write_text(ASL_JSON, '{"M0Type": "Separate",'), ["not valid JSON"]),
    ("json-not-object", {}, write_text(ASL_JSON, "[1, 2]"), ["JSON object"]),
    ("truncated-nifti", {}, truncate(ASL_NII), ["sub-01_asl.nii.gz"]),
    ("corrupt-nifti", {}, garbage(ASL_NII), ["sub-01_asl.nii.gz", "NIfTI"]),
    ("3d-asl", {}, replace_image(ASL_NII, lambda d: d[..., 0]), ["3D image"]),
    (
        "context-length",
        {},
        write_text(CONTEXT, "volume_type\n" + "control\nlabel\n" * 3),
        ["has 8 volumes", "lists 6"],
    ),
    (
        "unknown-volume-type",
        {},
        write_text(CONTEXT, "volume_type\n" + "control\nlabel\n" * 3 + "control\nbanana\n"),
        ["'banana'"],
    ),
    (
        "no-pairs-no-deltam",
        {},
        write_text(CONTEXT, "volume_type\n" + "m0scan\nnoRF\n" * 4),
        ["nothing to quantify"],
    ),
    (
        "controls-only",
        {},
        write_text(CONTEXT, "volume_type\n" + "control\n" * 8),
        ["no control/label pairs", "nothing to quantify"],
    ),
    (
        "q2tips-decreasing",
        {"asl_type": "PASL", "bolus_cutoff_technique": "Q2TIPS"},
        edit_json(ASL_JSON, BolusCutOffDelayTime=[0.7, 0.6]),
        ["'BolusCutOffDelayTime'", "TI1s after TI1"],
    ),
    *[
        (f"missing-{field}", {}, edit_json(ASL_JSON, **{field: None}), [f"'{field}'", "missing"])
        for field in (
            "MagneticFieldStrength",
            "ArterialSpinLabelingType",
            "PostLabelingDelay",
            "BackgroundSuppression",
            "M0Type",
            "RepetitionTimePreparation",
            "LabelingDuration",
        )
    ],
    *[
        (
            f"pasl-missing-{field}",
            {"asl_type": "PASL"},
            edit_json(ASL_JSON, **{field: None}),
            [f"'{field}'", "missing"],
        )
        for field in ("BolusCutOffFlag", "BolusCutOffTechnique", "BolusCutOffDelayTime")
    ],
    (
        "2d-without-slicetiming",
        {"slice_timing": True},
        edit_json(ASL_JSON, SliceTiming=None),
        ["'SliceTiming'", "missing"],
    ),
    ("string-pld", {}, edit_json(ASL_JSON, PostLabelingDelay="1.8"), ["'PostLabelingDelay'"]),
    (
        "list-field-strength",
        {},
        edit_json(ASL_JSON, MagneticFieldStrength=[3]),
        ["'MagneticFieldStrength'", "number"],
    ),
    (
        "bool-number",
        {},
        edit_json(ASL_JSON, LabelingDuration=True),
        ["'LabelingDuration'", "number"],
    ),
    (
        "wrong-length-array",
        {},
        edit_json(ASL_JSON, PostLabelingDelay=[1.8] * 5),
        ["'PostLabelingDelay'", "5 values"],
    ),
    ("tr-zero", {}, edit_json(ASL_JSON, RepetitionTimePreparation=0), ["> 0"]),
    ("tr-negative", {}, edit_json(ASL_JSON, RepetitionTimePreparation=-4.0), ["> 0"]),
    ("pld-milliseconds", {}, edit_json(ASL_JSON, PostLabelingDelay=1800), ["1.8 s"]),
    ("pld-negative", {}, edit_json(ASL_JSON, PostLabelingDelay=-1.8), ["negative"]),
    (
        "labeling-duration-zero",
        {},
        edit_json(ASL_JSON, LabelingDuration=0),
        ["'LabelingDuration'"],
    ),
    (
        "pasl-no-bolus-cutoff",
        {"asl_type": "PASL"},
        edit_json(ASL_JSON, BolusCutOffFlag=False),
        ["'BolusCutOffFlag'", "bolus"],
    ),
    ("separate-without-m0", {}, both(remove(M0_NII), remove(M0_JSON)), ["'M0Type'", "Separate"]),
    (
        "estimate-without-value",
        {},
        edit_json(ASL_JSON, M0Type="Estimate"),
        ["'M0Estimate'", "missing"],
    ),
    (
        "absent-with-bs",
        {"background_suppression": True, "bs_pulses": 2},
        edit_json(ASL_JSON, M0Type="Absent"),
        ["'M0Type'", "Absent"],
    ),
    (
        "m0-cannot-align",
        {},
        replace_image(M0_NII, lambda d: d, affine=far_away_m0(np.diag([3.5, 3.5, 5.0, 1.0]))),
        ["sub-01_m0scan.nii.gz", "align"],
    ),
    ("m0-all-zeros", {}, replace_image(M0_NII, np.zeros_like), ["sub-01_m0scan.nii.gz", "zeros"]),
    (
        "m0-nan",
        {},
        replace_image(M0_NII, lambda d: np.where(d > d.mean(), np.nan, d)),
        ["sub-01_m0scan.nii.gz", "NaN"],
    ),
    (
        "asl-all-nan",
        {},
        replace_image(ASL_NII, lambda d: np.full_like(d, np.nan)),
        ["sub-01_asl.nii.gz", "no finite values"],
    ),
    (
        "asl-constant",
        {},
        replace_image(ASL_NII, lambda d: np.full_like(d, 7.0)),
        ["sub-01_asl.nii.gz", "constant"],
    ),
    ("two-runs-same-entities", {}, duplicate_run, ["share the entities"]),
    (
        "m0-missing-tr",
        {},
        edit_json(M0_JSON, RepetitionTimePreparation=None),
        ["sub-01_m0scan.json", "'RepetitionTimePreparation'"],
    ),
    (
        "unknown-field-strength",
        {},
        edit_json(ASL_JSON, MagneticFieldStrength=9.4),
        ["'MagneticFieldStrength'", "9.4 T"],
    ),
    (
        "efficiency-out-of-range",
        {},
        edit_json(ASL_JSON, LabelingEfficiency=0),
        ["'LabelingEfficiency'"],
    ),
]


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NIPYPE_NO_ET": "1"}
    return subprocess.run(
        [sys.executable, "-m", "aslprep_lite", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_corpus_is_large_enough():
    assert len(CASES) >= 30
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("overrides", "mutate", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input(tmp_path, overrides, mutate, words):
    bids = tmp_path / "bids"
    write_dataset(bids, [SyntheticSpec(n_pairs=4, shape=(24, 24, 8), **overrides)])
    mutate(bids)
    before = digest(bids)
    out = tmp_path / "out"
    result = run_cli(str(bids), str(out), "participant", "-w", str(tmp_path / "work"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("aslprep-lite:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert not (out / "sub-01").exists()
    assert digest(bids) == before


def test_output_not_writable(tmp_path):
    bids = tmp_path / "bids"
    write_dataset(bids, [SyntheticSpec(n_pairs=2, shape=(16, 16, 6))])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_cli(str(bids), str(blocker / "out"), "participant")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "a_file/out" in line and "not writable" in line


def test_traceback_only_with_verbose(tmp_path):
    bids = tmp_path / "bids"
    write_dataset(bids, [SyntheticSpec(n_pairs=2, shape=(16, 16, 6))])
    edit_json(ASL_JSON, RepetitionTimePreparation=0)(bids)
    quiet = run_cli(str(bids), str(tmp_path / "o1"), "participant", "-w", str(tmp_path / "w1"))
    assert "Traceback" not in quiet.stderr
    # a dataset-level error with -v shows where it came from
    loud = run_cli(str(tmp_path / "nope"), str(tmp_path / "o2"), "participant", "-v")
    assert loud.returncode != 0
    assert "Traceback" in loud.stderr


def test_work_directory_full(tmp_path):
    """A full disk, simulated by a file-size limit (writes fail as they would with ENOSPC)."""
    import resource
    import signal

    bids = tmp_path / "bids"
    write_dataset(bids, [SyntheticSpec(n_pairs=4, shape=(24, 24, 8))])
    before = digest(bids)

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    work, out = tmp_path / "work", tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "aslprep_lite",
            str(bids),
            str(out),
            "participant",
            "-w",
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_disk,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("aslprep-lite:")]
    assert str(work) in line and "cannot write" in line and "free space" in line
    assert not (out / "sub-01").exists()
    assert digest(bids) == before


def test_unknown_participant_label(tmp_path):
    bids = tmp_path / "bids"
    write_dataset(bids, [SyntheticSpec(n_pairs=2, shape=(16, 16, 6))])
    before = digest(bids)
    result = run_cli(str(bids), str(tmp_path / "out"), "participant", "--participant-label", "02")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "participant label(s) 02 not found (the dataset has: 01)" in line
    assert not (tmp_path / "out").exists()
    assert digest(bids) == before
