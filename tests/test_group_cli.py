"""End to end: the participant level on six synthetic participants, then the group level.

One participant has a planted fault, its M0 scaled by 10 (CBF ten times too low): the group
level must flag it on GM CBF, flag no other run, leave it out of the group mean map and list
it in group.html. T1w-free (``asl MNI152NLin2009aSym:res-2``) on the small phantom, so the
participant level takes well under a minute per participant on 2 cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import nibabel as nb
import numpy as np
import pytest

from aslprep_lite.images import write_nifti
from aslprep_lite.synthetic import SyntheticSpec, write_dataset

#: Different true GM CBF, motion and noise (seed) per participant, as in a real group.
PARTICIPANTS = {
    "01": {"gm_cbf": 58.0, "seed": 1},
    "02": {"gm_cbf": 62.0, "seed": 2},
    "03": {"gm_cbf": 55.0, "seed": 3},
    "04": {"gm_cbf": 60.0, "seed": 4},
    "05": {"gm_cbf": 65.0, "seed": 5},
    "06": {"gm_cbf": 60.0, "seed": 6},
}
FAULTY = "04"
SPACE = "space-MNI152NLin2009aSym_res-2"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aslprep_lite", *args], capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("group_e2e")
    bids, out, work = base / "bids", base / "out", base / "work"
    specs = [
        SyntheticSpec(subject=label, motion_mm=0.5, **values)
        for label, values in PARTICIPANTS.items()
    ]
    write_dataset(bids, specs)
    m0_file = bids / f"sub-{FAULTY}" / "perf" / f"sub-{FAULTY}_m0scan.nii.gz"
    m0 = nb.load(m0_file)
    write_nifti(nb.Nifti1Image(np.asarray(m0.dataobj) * 10.0, m0.affine, m0.header), m0_file)
    participant = _cli(
        str(bids), str(out), "participant", "-w", str(work), "--nprocs", "2",
        "--output-spaces", "asl", "MNI152NLin2009aSym:res-2",
    )  # fmt: skip
    assert participant.returncode == 0, participant.stderr
    group = _cli(str(bids), str(out), "group")
    return {"out": out, "participant": participant, "group": group}


def test_group_flags_the_faulty_participant_only(group_run):
    group = group_run["group"]
    assert group.returncode == 0, group.stderr
    out = group_run["out"]
    header, *lines = (out / "group_desc-qualitycontrol_cbf.tsv").read_text().splitlines()
    rows = [dict(zip(header.split("\t"), line.split("\t"), strict=True)) for line in lines]
    assert [r["participant_id"] for r in rows] == [f"sub-{label}" for label in PARTICIPANTS]
    flagged = {r["participant_id"]: r for r in rows if r["outlier"] == "1"}
    assert list(flagged) == [f"sub-{FAULTY}"]
    assert flagged[f"sub-{FAULTY}"]["gm_cbf_outlier"] == "1"
    assert float(flagged[f"sub-{FAULTY}"]["gm_cbf_z"]) < -3.5
    assert f"sub-{FAULTY}: outlier on gm_cbf" in group.stderr


def test_group_map_and_report(group_run):
    out = group_run["out"]
    stem = f"group_{SPACE}_desc"
    sidecar = json.loads((out / f"{stem}-mean_cbf.json").read_text())
    assert sidecar["RunsIncluded"] == 5 and sidecar["ExcludedRuns"] == [f"sub-{FAULTY}"]
    mean = nb.load(out / f"{stem}-mean_cbf.nii.gz").get_fdata()
    perf = [out / f"sub-{label}" / "perf" for label in PARTICIPANTS if label != FAULTY]
    maps = np.array([nb.load(p / f"{p.parent.name}_{SPACE}_cbf.nii.gz").get_fdata() for p in perf])
    masks = np.array(
        [
            nb.load(p / f"{p.parent.name}_{SPACE}_desc-brain_mask.nii.gz").get_fdata() > 0
            for p in perf
        ]
    )
    # each voxel averaged over the runs whose template-space brain mask covers it, 0 where none
    count = masks.sum(axis=0)
    expected = np.divide(
        (maps * masks).sum(axis=0), count, out=np.zeros(count.shape), where=count > 0
    )
    np.testing.assert_allclose(mean, expected, atol=1e-3)
    counts = np.asarray(nb.load(out / f"group_{SPACE}_desc-count_mask.nii.gz").dataobj)
    np.testing.assert_array_equal(counts, count)
    # where every mask covers the voxel: the plain mean of the runs
    inside = count == len(perf)
    assert inside.sum() > 1000
    np.testing.assert_allclose(mean[inside], maps.mean(axis=0)[inside], atol=1e-3)
    html = (out / "group.html").read_text()
    assert not re.search(r"(https?:)?//", html)
    assert all((out / src).is_file() for src in re.findall(r'<img src="([^"]+)"', html))
    outliers = html.split("<h2>Outliers</h2>")[1].split("<h2>")[0]
    assert f'<a href="sub-{FAULTY}.html">' in outliers
