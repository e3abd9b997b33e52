"""Quality control end to end: the QC table, SCORE/SCRUB and --pair-average, through the CLI.

One synthetic dataset with known CBF: a motion-free run, a moving run, a run with a T1w and
one planted artefact (a control volume 5 % too bright, so its pair's ΔM is several times the
true one), and a multi-delay run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from aslprep_lite.interfaces.cbf import ComputeCBF
from aslprep_lite.interfaces.qc import OUTLIER_COLUMN, ScoreConfounds, outlier_index
from aslprep_lite.quant.deltam import timeseries_sources
from aslprep_lite.quant.qc import COLUMNS, read_qc_tsv
from aslprep_lite.quant.robust import pair_average
from aslprep_lite.quant.tissue import tissue_classes
from aslprep_lite.synthetic import SyntheticSpec, write_dataset
from aslprep_lite.synthetic_anatomy import AnatomySpec

#: The control volume made 5 % too bright in sub-art (pair 3: volumes 6 and 7).
ARTEFACT_VOLUME = 6

SPECS = [
    SyntheticSpec(subject="still"),
    SyntheticSpec(subject="moving", motion_mm=1.0),
    SyntheticSpec(subject="art", anatomy=AnatomySpec(t1w_zooms=(2.0, 2.0, 2.0))),
    SyntheticSpec(
        subject="multi", plds=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5), labeling_duration=1.4, n_pairs=3
    ),
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aslprep_lite", *args], capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    base = tmp_path_factory.mktemp("qc")
    truths = {t.spec.subject: t for t in write_dataset(base / "bids", SPECS)}
    art = truths["art"].asl_file
    img = nb.load(art)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[..., ARTEFACT_VOLUME] *= 1.05
    nb.Nifti1Image(data, img.affine, img.header).to_filename(art)
    args = [str(base / "bids"), str(base / "out"), "participant", "-w", str(base / "work")]
    result = run_cli(*args, "--nprocs", "2")
    return {"base": base, "args": args, "result": result, "truth": truths}


def _perf(processed, subject: str) -> Path:
    return processed["base"] / "out" / f"sub-{subject}" / "perf" / f"sub-{subject}_"


def _qc(processed, subject: str) -> dict:
    (row,) = read_qc_tsv(f"{_perf(processed, subject)}desc-qualitycontrol_cbf.tsv")
    return row


def _confounds(processed, subject: str) -> tuple[list[str], list[list[str]]]:
    lines = Path(f"{_perf(processed, subject)}desc-confounds_timeseries.tsv").read_text()
    header, *rows = [line.split("\t") for line in lines.splitlines()]
    return header, rows


def test_run_succeeds(processed):
    assert processed["result"].returncode == 0, processed["result"].stderr


def test_qc_table_and_sidecar(processed):
    for spec in SPECS:
        prefix = _perf(processed, spec.subject)
        header = Path(f"{prefix}desc-qualitycontrol_cbf.tsv").read_text().splitlines()[0]
        assert header.split("\t") == list(COLUMNS)
        sidecar = json.loads(Path(f"{prefix}desc-qualitycontrol_cbf.json").read_text())
        for column in COLUMNS:
            assert {"Description", "Units"} <= set(sidecar[column])
        row = _qc(processed, spec.subject)
        # the main CBF averages every pair
        n_pairs = spec.n_pairs * (len(spec.plds) if spec.plds else 1)
        assert (row["pairs_used"], row["pairs_removed"]) == (n_pairs, 0)
        # the tissue means are those of the CBF sidecar, to its 2 decimals
        tissue = json.loads(Path(f"{prefix}cbf.json").read_text())["TissueCBF"]
        assert round(row["gm_cbf"], 2) == tissue["MeanCBFGM"]
        assert round(row["wm_cbf"], 2) == tissue["MeanCBFWM"]
        assert sidecar["TissueSource"] == tissue["TissueSource"]
    assert json.loads(Path(f"{_perf(processed, 'art')}desc-qualitycontrol_cbf.json").read_text())[
        "TissueSource"
    ] == ("T1w segmentation")


def test_qc_records_registration_and_fit(processed):
    art = _qc(processed, "art")
    sidecar = json.loads(Path(f"{_perf(processed, 'art')}cbf.json").read_text())
    assert art["coregistration_dice"] == pytest.approx(sidecar["Coregistration"]["Dice"])
    assert 0.8 < art["normalization_correlation"] <= 1
    assert art["qei"] > 0.8  # a clean map on the T1w's tissue (0.94 when measured)
    still = _qc(processed, "still")
    assert still["normalization_correlation"] is None  # no T1w
    assert still["median_att"] is None and still["fit_failed_percent"] is None
    multi = _qc(processed, "multi")
    truth = processed["truth"]["multi"]
    assert multi["median_att"] == pytest.approx(np.nanmedian(truth.att[truth.gm_mask]), abs=0.3)
    assert 0 <= multi["fit_failed_percent"] < 5


def test_framewise_displacement_follows_motion(processed):
    still, moving = _qc(processed, "still"), _qc(processed, "moving")
    # motion-free: only the registration's noise (0.16 mm measured); 1 mm motion: ~0.9 mm
    assert still["mean_fd"] < 0.25
    assert moving["mean_fd"] > 3 * still["mean_fd"]
    assert moving["max_fd"] > 1.0


def test_score_flags_the_planted_pair(processed):
    header, rows = _confounds(processed, "art")
    assert header[-1] == OUTLIER_COLUMN
    flags = [int(row[-1]) for row in rows]
    assert flags == [1 if i in (ARTEFACT_VOLUME, ARTEFACT_VOLUME + 1) else 0 for i in range(16)]
    sidecar = json.loads(
        Path(f"{_perf(processed, 'art')}desc-confounds_timeseries.json").read_text()
    )
    assert "Description" in sidecar[OUTLIER_COLUMN]
    score = json.loads(Path(f"{_perf(processed, 'art')}desc-score_cbf.json").read_text())["SCORE"]
    assert score["VolumesRemoved"] == [ARTEFACT_VOLUME // 2]
    assert score["TissueProbabilityThreshold"] == 0.9 and score["Method"] == "SCORE+SCRUB"


def test_score_and_scrub_closer_to_truth(processed):
    truth = processed["truth"]["art"]
    gm = truth.gm_mask
    prefix = _perf(processed, "art")

    def error(name: str) -> float:
        cbf = nb.load(f"{prefix}{name}.nii.gz").get_fdata()
        return float(abs(cbf[gm].mean() - truth.cbf[gm].mean()) / truth.cbf[gm].mean())

    # the artefact pair raises the plain mean by ~90 %; SCORE removes it (1 % measured)
    assert error("cbf") > 0.5
    assert error("desc-score_cbf") < 0.05
    assert error("desc-scrub_cbf") < 0.05


def test_score_not_for_multidelay(processed):
    prefix = _perf(processed, "multi")
    assert not Path(f"{prefix}desc-score_cbf.nii.gz").exists()
    assert not Path(f"{prefix}desc-scrub_cbf.nii.gz").exists()
    header, _ = _confounds(processed, "multi")
    assert OUTLIER_COLUMN not in header
    sidecar = json.loads(Path(f"{prefix}desc-qualitycontrol_cbf.json").read_text())
    assert sidecar["SCORE"]["Applied"] is False
    # a clean single-delay run: the column is there, every pair kept or not, maps written
    header, rows = _confounds(processed, "still")
    assert header[-1] == OUTLIER_COLUMN and {row[-1] for row in rows} <= {"0", "1"}
    assert Path(f"{_perf(processed, 'still')}desc-score_cbf.nii.gz").is_file()


def test_plan_and_completeness_check(processed, tmp_path):
    result = run_cli(*processed["args"][:3], "--dry-run")
    assert result.returncode == 0, result.stderr
    plans = {r["subject"]: r["outputs"] for r in json.loads(result.stdout)["runs"]}
    names = {s: {Path(p).name for p in paths} for s, paths in plans.items()}
    for name in ("desc-qualitycontrol_cbf.tsv", "desc-score_cbf.nii.gz", "desc-scrub_cbf.nii.gz"):
        assert f"sub-still_{name}" in names["still"]
        assert (f"sub-multi_{name}" in names["multi"]) == (name.endswith(".tsv"))
    # the completeness check reads the same plan: a deleted QC file is written again
    out = processed["base"] / "out"
    for subject, paths in plans.items():
        assert all((out / p).exists() for p in paths), subject
    qc_file = Path(f"{_perf(processed, 'still')}desc-qualitycontrol_cbf.tsv")
    score_file = Path(f"{_perf(processed, 'still')}desc-score_cbf.nii.gz")
    before = qc_file.read_bytes(), score_file.read_bytes()
    qc_file.unlink()
    score_file.unlink()
    rerun = run_cli(*processed["args"], "--participant-label", "still")
    assert rerun.returncode == 0, rerun.stderr
    assert (qc_file.read_bytes(), score_file.read_bytes()) == before


def test_asl_space_only_without_t1w(processed, tmp_path):
    """No T1w, no template space: the QC registers the embedded template's priors itself."""
    base = processed["base"]
    result = run_cli(
        str(base / "bids"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"),
        "--participant-label", "still", "--output-spaces", "asl", "--pair-average", "huber",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    perf = tmp_path / "out" / "sub-still" / "perf"
    sidecar = json.loads((perf / "sub-still_desc-qualitycontrol_cbf.json").read_text())
    assert "no template output space" in sidecar["TissueSource"]
    # the Dice of this run is that of the QC's own registration: the sidecar says so
    assert sidecar["TissueSource"] == (
        "MNI152NLin2009aSym tissue priors (no T1w and no template output space: brought to the "
        "ASL grid by an affine registration of the ASL reference to the template, made for the "
        "quality control only; coregistration_dice is the Dice of the ASL and template brain "
        "masks after this registration)"
    )
    (row,) = read_qc_tsv(perf / "sub-still_desc-qualitycontrol_cbf.tsv")
    assert row["gm_cbf"] is not None and row["coregistration_dice"] is not None
    assert (perf / "sub-still_desc-score_cbf.nii.gz").is_file()
    # --pair-average huber: recorded, and a different CBF map than the mean's
    cbf_sidecar = json.loads((perf / "sub-still_cbf.json").read_text())
    assert cbf_sidecar["PairAverage"]["Method"].startswith("Huber")
    assert cbf_sidecar["PairAverage"]["TuningConstant"] == 1.345
    assert cbf_sidecar["ProcessingParameters"]["PairAverage"] == "huber"
    huber = nb.load(perf / "sub-still_cbf.nii.gz").get_fdata()
    mean = nb.load(f"{_perf(processed, 'still')}cbf.nii.gz").get_fdata()
    assert not np.array_equal(huber, mean)
    assert np.abs(huber - mean).max() > 0.1


def test_outlier_index_maps_pairs_to_volumes():
    context = ["m0scan", "label", "control", "label", "control", "deltam", "cbf"]
    # CBF series: pair (2, 1), pair (4, 3), deltam 5, cbf 6, by control index
    assert timeseries_sources(context) == [(2, 1), (4, 3), (5,), (6,)]
    kept = np.array([True, False, True, False])
    assert outlier_index(kept, context) == [0, 0, 0, 1, 1, 0, 1]


def test_pair_average_mean_is_unchanged_and_huber_differs(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(50, 5, (4, 4, 3, 8)).astype(np.float64)
    values[..., 2] += 200  # one outlying pair
    assert pair_average(values, "mean", axis=3).tobytes() == values.mean(axis=3).tobytes()
    huber = pair_average(values, "huber", axis=3)
    assert np.all(np.abs(huber - 50) < np.abs(values.mean(axis=3) - 50))

    # the node: unset and "mean" give the same bytes, "huber" another map
    affine = np.eye(4)
    series = np.concatenate([np.full((4, 4, 3, 1), 1000.0), 1000.0 - values / 100], axis=3)
    context = ["m0scan"] + ["deltam"] * 8
    files = {}
    for name, data in (("asl", series), ("deltam", values / 100), ("m0", np.full((4, 4, 3), 1e3))):
        files[name] = str(tmp_path / f"{name}.nii")
        nb.Nifti1Image(data.astype(np.float32), affine).to_filename(files[name])
    mask = str(tmp_path / "mask.nii")
    nb.Nifti1Image(np.ones((4, 4, 3), np.uint8), affine).to_filename(mask)
    outputs = {}
    for average in (None, "mean", "huber"):
        cwd = tmp_path / str(average)
        cwd.mkdir()
        node = ComputeCBF(
            in_file=files["asl"], deltam_file=files["deltam"], m0_file=files["m0"],
            mask_file=mask, context=context, asl_type="PCASL", post_labeling_delay=[1.8] * 9,
            labeling_duration=[1.8] * 9,
            quantification={"BloodT1": {"Value": 1.65}, "LabelingEfficiency": {"Value": 0.85},
                            "PartitionCoefficient": {"Value": 0.9}},
        )  # fmt: skip
        if average is not None:
            node.inputs.average = average
        result = node.run(cwd=str(cwd))
        outputs[average] = Path(result.outputs.mean_file).read_bytes()
    assert outputs[None] == outputs["mean"]
    assert outputs["huber"] != outputs["mean"]


def test_tissue_classes_without_csf():
    gm = np.array([0.6, 0.2, 0.0, 0.7]).reshape(1, 1, 4)
    wm = np.array([0.3, 0.3, 0.0, 0.5]).reshape(1, 1, 4)
    _, _, csf = tissue_classes(np.stack([gm, wm], axis=-1))
    # CSF is what GM and WM leave, clipped at 0 where they overlap past 1
    np.testing.assert_allclose(csf.ravel(), [0.1, 0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="2 or 3"):
        tissue_classes(gm[..., np.newaxis])


def test_score_column_refuses_a_table_of_another_length(tmp_path):
    table = tmp_path / "confounds.tsv"
    table.write_text("trans_x\n0.0\n0.1\n")
    node = ScoreConfounds(
        confounds_file=str(table), confounds_metadata={"trans_x": {}}, outliers=[0, 1, 0]
    )
    with pytest.raises(ValueError, match="2 rows for 3 volumes"):
        node.run(cwd=str(tmp_path))
    node.inputs.outliers = [0, 1]
    result = node.run(cwd=str(tmp_path))
    assert Path(result.outputs.out_file).read_text() == (
        f"trans_x\t{OUTLIER_COLUMN}\n0.0\t0\n0.1\t1\n"
    )
    assert result.outputs.metadata[OUTLIER_COLUMN]["Levels"] == {
        "0": "kept",
        "1": "removed by SCORE",
    }
