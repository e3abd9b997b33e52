"""The group level on participant outputs in the exact layout (aslprep_lite.synthetic_group).

The QC tables are written with ``quant.qc.write_qc_tsv`` and the template maps on a small grid;
the group level runs through the real command line (in process).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from aslprep_lite.cli.run import main
from aslprep_lite.group.table import OUTLIER_METRICS
from aslprep_lite.quant.qc import COLUMNS
from aslprep_lite.synthetic_group import write_group_derivatives

SHAPE = (12, 14, 10)
MAP = "space-MNI152NLin2009aSym_res-2_cbf.nii.gz"
GROUP_MEAN = "group_space-MNI152NLin2009aSym_res-2_desc-mean_cbf"
GROUP_SD = "group_space-MNI152NLin2009aSym_res-2_desc-sd_cbf"
GROUP_FILES = (
    "group.html",
    "group_desc-qualitycontrol_cbf.tsv",
    "group_desc-qualitycontrol_cbf.json",
    f"{GROUP_MEAN}.nii.gz",
    f"{GROUP_MEAN}.json",
    f"{GROUP_SD}.nii.gz",
    f"{GROUP_SD}.json",
    "figures/group_desc-qcmetrics_boxplot.png",
    "figures/group_space-MNI152NLin2009aSym_res-2_desc-mosaic_cbf.png",
)


def _dataset(root: Path, n: int = 8, **kwargs) -> tuple[Path, Path]:
    bids, out = root / "bids", root / "out"
    write_group_derivatives(bids, out, n, shape=SHAPE, **kwargs)
    return bids, out


def _read_tsv(path: Path) -> list[dict[str, str]]:
    header, *lines = path.read_text().splitlines()
    names = header.split("\t")
    return [dict(zip(names, line.split("\t"), strict=True)) for line in lines]


def _group(bids: Path, out: Path, *extra: str) -> int:
    return main([str(bids), str(out), "group", *extra])


def _group_outputs(out: Path) -> list[str]:
    found = [p.relative_to(out).as_posix() for p in out.glob("group*")]
    found += [p.relative_to(out).as_posix() for p in out.glob("figures/*")]
    return sorted(found)


def _digest(out: Path) -> dict[str, str]:
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in GROUP_FILES}


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    # run index 3 (sub-04): GM CBF ten times too low, as an M0 scaled by 10 gives
    bids, out = _dataset(root, overrides={3: {"gm_cbf": 6.1}})
    # sub-09 has ASL data but no outputs; its status record names the failed run
    (bids / "sub-09" / "perf").mkdir(parents=True)
    (bids / "sub-09" / "perf" / "sub-09_asl.nii.gz").touch()
    # the participant level's status record (schema version 1)
    logs = out / "logs"
    logs.mkdir()
    run = {"AslFile": "sub-09/perf/sub-09_asl.nii.gz", "Prefix": "sub-09", "Session": None}
    (logs / "sub-09_runs.json").write_text(
        json.dumps(
            {
                "Participant": "09",
                "Report": "sub-09.html",
                "Runs": [{**run, "Status": "failed", "Error": "boom here"}],
                "SchemaVersion": 1,
                "Status": "failed",
            }
        )
    )
    ok = {"AslFile": "sub-01/perf/sub-01_asl.nii.gz", "Prefix": "sub-01", "Session": None}
    (logs / "sub-01_runs.json").write_text(
        json.dumps({"Runs": [{**ok, "Status": "ok", "Error": None}], "Status": "ok"})
    )
    (logs / "sub-02_runs.json").write_text("{damaged")  # ignored
    assert _group(bids, out) == 0
    return {"bids": bids, "out": out, "root": root}


def test_outputs_and_table(group):
    out = group["out"]
    assert _group_outputs(out) == sorted(GROUP_FILES)
    rows = _read_tsv(out / "group_desc-qualitycontrol_cbf.tsv")
    assert [r["participant_id"] for r in rows] == [f"sub-{i:02d}" for i in range(1, 9)]
    assert list(rows[0])[:4] == ["participant_id", "session_id", "run", "prefix"]
    assert [c for c in COLUMNS if c not in rows[0]] == []
    assert rows[0]["session_id"] == "n/a" and rows[0]["run"] == "n/a"
    # the planted fault is flagged on GM CBF, and no other run on anything
    assert rows[3]["gm_cbf"] == "6.100000"
    assert rows[3]["gm_cbf_outlier"] == "1" and rows[3]["outlier"] == "1"
    assert float(rows[3]["gm_cbf_z"]) < -3.5
    others = [r for i, r in enumerate(rows) if i != 3]
    assert all(r["outlier"] == "0" for r in others)
    for metric in OUTLIER_METRICS:
        assert all(r[f"{metric}_outlier"] == "0" for r in others)
    # the z-scores are those of the table's own values
    gm = np.array([float(r["gm_cbf"]) for r in rows])
    median = np.median(gm)
    mad = np.median(np.abs(gm - median))
    np.testing.assert_allclose(
        [float(r["gm_cbf_z"]) for r in rows], 0.6745 * (gm - median) / mad, atol=1e-6
    )


def test_sidecar_describes_every_column(group):
    out = group["out"]
    header = (out / "group_desc-qualitycontrol_cbf.tsv").read_text().splitlines()[0].split("\t")
    sidecar = json.loads((out / "group_desc-qualitycontrol_cbf.json").read_text())
    assert [c for c in header if "Description" not in sidecar.get(c, {})] == []
    assert sidecar["gm_cbf"] == dict(COLUMNS["gm_cbf"])
    detection = sidecar["OutlierDetection"]
    assert detection["Threshold"] == 3.5 and detection["Runs"] == 8 and detection["Reliable"]
    assert "Iglewicz" in detection["Reference"]
    assert sidecar["TissueSources"] == ["synthetic"]


def test_group_maps_leave_the_outlier_out(group):
    out = group["out"]
    maps = [
        nb.load(out / f"sub-{i:02d}" / "perf" / f"sub-{i:02d}_{MAP}").get_fdata()
        for i in range(1, 9)
        if i != 4
    ]
    mean = nb.load(out / f"{GROUP_MEAN}.nii.gz")
    sd = nb.load(out / f"{GROUP_SD}.nii.gz")
    np.testing.assert_allclose(mean.get_fdata(), np.mean(maps, axis=0), atol=1e-4)
    np.testing.assert_allclose(sd.get_fdata(), np.std(maps, axis=0, ddof=1), atol=1e-4)
    reference = nb.load(out / "sub-01" / "perf" / f"sub-01_{MAP}")
    np.testing.assert_array_equal(mean.affine, reference.affine)
    sidecar = json.loads((out / f"{GROUP_MEAN}.json").read_text())
    assert sidecar["RunsIncluded"] == 7 and sidecar["ExcludedRuns"] == ["sub-04"]
    assert sidecar["OutliersExcluded"] is True
    assert sidecar["Sources"][0] == f"bids::sub-01/perf/sub-01_{MAP}"
    assert "sub-04" not in " ".join(sidecar["Sources"])


def test_report_is_offline_and_complete(group):
    out = group["out"]
    html = (out / "group.html").read_text()
    assert not re.search(r"(https?:)?//", html), "external URL in group.html"
    assert "<script" not in html and "<link" not in html and "@import" not in html
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == 2
    assert all((out / src).is_file() for src in sources)
    hrefs = set(re.findall(r'href="([^"]+)"', html))
    assert all(re.fullmatch(r"sub-[A-Za-z0-9]+\.html", h) for h in hrefs)
    # the outlier table links to its participant's report
    outliers = html.split("<h2>Outliers</h2>")[1].split("<h2>")[0]
    assert '<a href="sub-04.html">sub-04</a>' in outliers
    assert "sub-01" not in outliers
    failures = html.split("<h2>Failed runs")[1].split("<h2>")[0]
    assert '<a href="sub-09.html">sub-09</a>' in failures and "boom here" in failures
    assert "sub-01" not in failures and "sub-02" not in failures


def test_byte_identical_rerun(group, tmp_path):
    out = group["out"]
    before = _digest(out)
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for name in GROUP_FILES:
        (copy / name).unlink()
    assert _group(group["bids"], copy) == 0
    assert _digest(copy) == before


def test_participant_label_selects(group, tmp_path, capsys):
    copy = tmp_path / "out"
    shutil.copytree(group["out"], copy)
    assert _group(group["bids"], copy, "--participant-label", "01", "sub-02", "03") == 0
    rows = _read_tsv(copy / "group_desc-qualitycontrol_cbf.tsv")
    assert [r["prefix"] for r in rows] == ["sub-01", "sub-02", "sub-03"]
    # three runs: computed, reported unreliable, nothing left out of the maps
    assert "outlier flags need at least 5 to be reliable" in capsys.readouterr().err
    sidecar = json.loads((copy / f"{GROUP_MEAN}.json").read_text())
    assert sidecar["RunsIncluded"] == 3 and sidecar["OutliersExcluded"] is False
    assert "unreliable" in (copy / "group.html").read_text()
    assert _group(group["bids"], copy, "--participant-label", "77") == 1
    assert "participant label(s) 77 have no ASL series" in capsys.readouterr().err


def test_stale_group_maps_removed(group, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(group["out"], copy)
    for path in copy.glob(f"sub-*/perf/*_{MAP}"):
        path.unlink()  # no run in a template space any more
    kept = copy / "figures" / "other.png"
    kept.write_bytes(b"not ours")
    assert _group(group["bids"], copy) == 0
    assert not list(copy.glob("group_space-*")) and not list(copy.glob("figures/group_space-*"))
    assert kept.is_file()
    assert "No run has a CBF map in a template space" in (copy / "group.html").read_text()


def test_sessions_and_runs(tmp_path):
    bids, out = _dataset(tmp_path, n=6, template_maps=False)
    qc = out / "sub-01" / "perf" / "sub-01_desc-qualitycontrol_cbf.tsv"
    for session in ("1", "2"):
        raw = bids / "sub-01" / f"ses-{session}" / "perf"
        raw.mkdir(parents=True)
        (raw / f"sub-01_ses-{session}_run-1_asl.nii.gz").touch()
        perf = out / "sub-01" / f"ses-{session}" / "perf"
        perf.mkdir(parents=True)
        shutil.copy(qc, perf / f"sub-01_ses-{session}_run-1_desc-qualitycontrol_cbf.tsv")
    assert _group(bids, out, "--session-label", "2") == 0
    rows = _read_tsv(out / "group_desc-qualitycontrol_cbf.tsv")
    assert [(r["participant_id"], r["session_id"], r["run"], r["prefix"]) for r in rows] == [
        ("sub-01", "ses-2", "1", "sub-01_ses-2_run-1")
    ]
    assert "Group CBF maps" in (out / "group.html").read_text()


def _assert_one_line_and_nothing_written(capsys, out: Path, *fragments: str) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("aslprep-lite: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]
    assert _group_outputs(out) == []
    assert not list(out.rglob(".tmp*"))


def test_no_qc_files(tmp_path, capsys):
    bids, out = _dataset(tmp_path, n=3, template_maps=False)
    for path in out.rglob("*_desc-qualitycontrol_cbf.*"):
        path.unlink()
    assert _group(bids, out) == 1
    _assert_one_line_and_nothing_written(
        capsys, out, str(out), "no quality-control files", "run the participant level first"
    )


def test_damaged_qc_table(tmp_path, capsys):
    bids, out = _dataset(tmp_path, n=6, template_maps=False)
    bad = out / "sub-05" / "perf" / "sub-05_desc-qualitycontrol_cbf.tsv"
    bad.write_text(bad.read_text()[:-30])  # a truncated last line
    assert _group(bids, out) == 1
    _assert_one_line_and_nothing_written(capsys, out, str(bad), "quality-control table")
    bad.write_text("gm_cbf\n60\n")  # another version's columns
    assert _group(bids, out) == 1
    _assert_one_line_and_nothing_written(capsys, out, str(bad), "not a quality-control table")


def test_maps_on_different_grids(tmp_path, capsys):
    bids, out = _dataset(tmp_path, n=6)
    odd = out / "sub-06" / "perf" / f"sub-06_{MAP}"
    image = nb.load(odd)
    nb.save(nb.Nifti1Image(np.asarray(image.dataobj)[:-1], image.affine), odd)
    assert _group(bids, out) == 1
    _assert_one_line_and_nothing_written(capsys, out, str(odd), "not on the grid of")


def test_dry_run_writes_nothing(tmp_path, capsys):
    bids, out = _dataset(tmp_path, n=5, template_maps=False)
    assert _group(bids, out, "--dry-run") == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["qc_files"]) == 5 and plan["without_outputs"] == []
    assert _group_outputs(out) == []


def test_undefined_metrics(tmp_path):
    # motion not estimated anywhere (mean_fd n/a), QEI undefined for one run
    overrides = {i: {"mean_fd": None, "max_fd": None, "mean_rmsd": None} for i in range(6)}
    overrides[2]["qei"] = None
    bids, out = _dataset(tmp_path, n=6, template_maps=False, overrides=overrides)
    assert _group(bids, out) == 0
    rows = _read_tsv(out / "group_desc-qualitycontrol_cbf.tsv")
    assert {(r["mean_fd"], r["mean_fd_z"], r["mean_fd_outlier"]) for r in rows} == {
        ("n/a", "n/a", "n/a")
    }
    assert (rows[2]["qei"], rows[2]["qei_z"], rows[2]["qei_outlier"]) == ("n/a", "n/a", "n/a")
    assert all(r["qei_z"] != "n/a" for i, r in enumerate(rows) if i != 2)
    assert all(r["outlier"] == "0" for r in rows)
    sidecar = json.loads((out / "group_desc-qualitycontrol_cbf.json").read_text())
    metrics = sidecar["OutlierDetection"]["Metrics"]
    assert metrics["mean_fd"] == {
        "Median": None,
        "Scale": None,
        "ScaleEstimator": "none",
        "RunsWithValue": 0,
    }
    assert metrics["qei"]["RunsWithValue"] == 5
