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
from aslprep_lite.synthetic_group import TEMPLATE_AFFINE, write_group_derivatives

SHAPE = (12, 14, 10)
MAP = "space-MNI152NLin2009aSym_res-2_cbf.nii.gz"
GROUP_MEAN = "group_space-MNI152NLin2009aSym_res-2_desc-mean_cbf"
GROUP_SD = "group_space-MNI152NLin2009aSym_res-2_desc-sd_cbf"
GROUP_COUNT = "group_space-MNI152NLin2009aSym_res-2_desc-count_mask"
MASK = "space-MNI152NLin2009aSym_res-2_desc-brain_mask.nii.gz"
GROUP_FILES = (
    "group.html",
    "group_desc-qualitycontrol_cbf.tsv",
    "group_desc-qualitycontrol_cbf.json",
    f"{GROUP_MEAN}.nii.gz",
    f"{GROUP_MEAN}.json",
    f"{GROUP_SD}.nii.gz",
    f"{GROUP_SD}.json",
    f"{GROUP_COUNT}.nii.gz",
    f"{GROUP_COUNT}.json",
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
        "Side": "high",
        "Rule": "z > 3.5",
    }
    assert metrics["qei"]["RunsWithValue"] == 5


def _write_map(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    affine = TEMPLATE_AFFINE if affine is None else affine
    dtype = np.uint8 if path.name.endswith("_mask.nii.gz") else np.float32
    nb.save(nb.Nifti1Image(data.astype(dtype), affine), path)


def test_space_t1w_maps_are_not_a_template(tmp_path, capsys):
    # each participant's space-T1w map is on its own T1w grid: not averaged, not an error
    bids, out = _dataset(tmp_path, n=2)
    for label, shape in (("01", (5, 6, 7)), ("02", (6, 7, 8))):
        perf = out / f"sub-{label}" / "perf"
        affine = np.diag([1.1, 1.2, 1.3, 1.0]) if label == "02" else np.eye(4)
        _write_map(perf / f"sub-{label}_space-T1w_cbf.nii.gz", np.full(shape, 60.0), affine)
        _write_map(perf / f"sub-{label}_space-T1w_desc-brain_mask.nii.gz", np.ones(shape), affine)
    assert _group(bids, out, "--dry-run") == 0
    plan = json.loads(capsys.readouterr().out)
    assert [Path(p).name for p in plan["template_maps"]] == [f"sub-01_{MAP}", f"sub-02_{MAP}"]
    assert _group(bids, out) == 0
    assert not list(out.glob("group_space-T1w*"))
    assert not list(out.glob("figures/group_space-T1w*"))
    assert (out / f"{GROUP_MEAN}.nii.gz").is_file() and (out / f"{GROUP_SD}.nii.gz").is_file()
    assert "space-T1w" not in (out / "group.html").read_text()


def _flag_overrides(last: dict[str, float]) -> dict[int, dict[str, float]]:
    """Six runs: hand-set QEI, mean FD and GM spatial CoV; run 5's values from ``last``."""
    qei = [0.80, 0.81, 0.82, 0.83, 0.84]
    fd = [0.10, 0.11, 0.12, 0.13, 0.14]
    scov = [0.38, 0.39, 0.40, 0.41, 0.42]
    overrides = {
        i: {"qei": q, "mean_fd": f, "gm_spatial_cov": c}
        for i, (q, f, c) in enumerate(zip(qei, fd, scov, strict=True))
    }
    overrides[5] = dict(last)
    return overrides


def test_outlier_flags_only_the_side_of_poor_quality(tmp_path):
    # unusually good run: QEI 0.97, FD 0.02 mm, sCoV 0.10; flagged by a two-sided rule, not here
    good = {"qei": 0.97, "mean_fd": 0.02, "gm_spatial_cov": 0.10}
    bids, out = _dataset(tmp_path / "good", n=6, overrides=_flag_overrides(good))
    assert _group(bids, out) == 0
    rows = _read_tsv(out / "group_desc-qualitycontrol_cbf.tsv")
    # QEI: median 0.825, MAD 0.015: z = 0.6745 * 0.145 / 0.015 = 6.5202
    # FD: median 0.115, MAD 0.015: z = -0.6745 * 0.095 / 0.015 = -4.2718
    # sCoV: median 0.395, MAD 0.015: z = -0.6745 * 0.295 / 0.015 = -13.2652
    assert float(rows[5]["qei_z"]) == pytest.approx(6.5202, abs=1e-4)
    assert float(rows[5]["mean_fd_z"]) == pytest.approx(-4.2718, abs=1e-4)
    assert float(rows[5]["gm_spatial_cov_z"]) == pytest.approx(-13.2652, abs=1e-4)
    assert [r["outlier"] for r in rows] == ["0"] * 6
    assert (rows[5]["qei_outlier"], rows[5]["mean_fd_outlier"]) == ("0", "0")
    assert rows[5]["gm_spatial_cov_outlier"] == "0"
    mean = json.loads((out / f"{GROUP_MEAN}.json").read_text())
    assert mean["RunsIncluded"] == 6 and mean["ExcludedRuns"] == []
    assert "qei z < -3.5" in mean["ExclusionRule"]

    # the same run on the side of poor quality is flagged on all three
    bad = {"qei": 0.60, "mean_fd": 0.60, "gm_spatial_cov": 0.70}
    bids, out = _dataset(tmp_path / "bad", n=6, overrides=_flag_overrides(bad))
    assert _group(bids, out) == 0
    rows = _read_tsv(out / "group_desc-qualitycontrol_cbf.tsv")
    # QEI: median 0.815, MAD 0.015: z = -0.6745 * 0.215 / 0.015 = -9.6678
    # FD: median 0.125, MAD 0.015: z = 0.6745 * 0.475 / 0.015 = 21.3592
    # sCoV: median 0.405, MAD 0.015: z = 0.6745 * 0.295 / 0.015 = 13.2652
    assert float(rows[5]["qei_z"]) == pytest.approx(-9.6678, abs=1e-4)
    assert float(rows[5]["mean_fd_z"]) == pytest.approx(21.3592, abs=1e-4)
    assert float(rows[5]["gm_spatial_cov_z"]) == pytest.approx(13.2652, abs=1e-4)
    flags = [rows[5][f"{m}_outlier"] for m in ("qei", "mean_fd", "gm_spatial_cov")]
    assert flags == ["1", "1", "1"] and rows[5]["outlier"] == "1"
    assert [r["outlier"] for r in rows[:5]] == ["0"] * 5
    mean = json.loads((out / f"{GROUP_MEAN}.json").read_text())
    assert mean["RunsIncluded"] == 5 and mean["ExcludedRuns"] == ["sub-06"]

    # each metric's side is recorded in the sidecar and the report
    sidecar = json.loads((out / "group_desc-qualitycontrol_cbf.json").read_text())
    metrics = sidecar["OutlierDetection"]["Metrics"]
    assert {m: (metrics[m]["Side"], metrics[m]["Rule"]) for m in OUTLIER_METRICS} == {
        "gm_cbf": ("both", "|z| > 3.5"),
        "gm_spatial_cov": ("high", "z > 3.5"),
        "mean_fd": ("high", "z > 3.5"),
        "qei": ("low", "z < -3.5"),
    }
    assert sidecar["qei_outlier"]["Description"].startswith("1 when qei_z < -3.5, else 0")
    assert sidecar["gm_cbf_outlier"]["Description"].startswith("1 when |gm_cbf_z| > 3.5")
    html = (out / "group.html").read_text()
    assert "<code>qei</code> z &lt; -3.5" in html
    assert "<code>mean_fd</code> z &gt; 3.5" in html
    assert "<code>gm_spatial_cov</code> z &gt; 3.5" in html
    assert "<code>gm_cbf</code> |z| &gt; 3.5" in html


def test_group_maps_average_over_the_runs_covering_a_voxel(tmp_path, capsys):
    bids, out = _dataset(tmp_path, n=3)
    brain = nb.load(out / "sub-01" / "perf" / f"sub-01_{MASK}").get_fdata() > 0
    centre = tuple(n // 2 for n in SHAPE)
    edge = tuple(int(i) for i in np.argwhere(brain)[0])  # the first brain voxel: at the edge
    assert brain[centre] and brain[edge]
    mask2 = brain.copy()
    mask2[edge] = False
    values = {"01": (50.0, brain), "02": (70.0, mask2), "03": (90.0, mask2)}
    for label, (value, mask) in values.items():
        perf = out / f"sub-{label}" / "perf"
        _write_map(perf / f"sub-{label}_{MAP}", np.where(mask, value, 0.0))
        _write_map(perf / f"sub-{label}_{MASK}", mask)
    (out / "sub-03" / "perf" / f"sub-03_{MASK}").unlink()  # falls back to its nonzero voxels
    assert _group(bids, out) == 0
    assert (
        "WARNING: group_space-MNI152NLin2009aSym_res-2: no brain mask in this space for sub-03: "
        "their finite nonzero voxels are averaged instead"
    ) in capsys.readouterr().err
    mean = nb.load(out / f"{GROUP_MEAN}.nii.gz").get_fdata()
    sd = nb.load(out / f"{GROUP_SD}.nii.gz").get_fdata()
    count = nb.load(out / f"{GROUP_COUNT}.nii.gz")
    # the edge voxel: only sub-01 covers it, its mean is sub-01's 50 (not 50 / 3 = 16.7)
    assert (mean[edge], sd[edge]) == (50.0, 0.0)
    # inside every mask: mean of 50, 70, 90 and SD (n - 1) 20
    assert mean[centre] == pytest.approx(70.0, abs=1e-5)
    assert sd[centre] == pytest.approx(20.0, abs=1e-5)
    # outside every mask: no run, 0
    assert mean[0, 0, 0] == 0.0 and sd[0, 0, 0] == 0.0
    assert count.get_data_dtype() == np.uint16
    counts = np.asarray(count.dataobj)
    assert (counts[edge], counts[centre], counts[0, 0, 0]) == (1, 3, 0)
    np.testing.assert_array_equal(counts, brain.astype(int) + 2 * mask2)
    sidecar = json.loads((out / f"{GROUP_MEAN}.json").read_text())
    assert sidecar["RunsWithoutMask"] == ["sub-03"]
    assert "brain mask" in sidecar["Description"] and "weighs the same" in sidecar["Description"]
    assert "count_mask" in sidecar["Description"]


def test_brain_mask_on_another_grid(tmp_path, capsys):
    bids, out = _dataset(tmp_path, n=2)
    odd = out / "sub-02" / "perf" / f"sub-02_{MASK}"
    _write_map(odd, np.ones((SHAPE[0] - 1, *SHAPE[1:])))
    assert _group(bids, out) == 1
    _assert_one_line_and_nothing_written(
        capsys, out, str(odd), "brain mask not on the grid of its CBF map"
    )
