"""The real command line, end to end, on synthetic BIDS datasets with known CBF.

One dataset holds one participant per scenario, so a single ``aslprep-lite`` invocation
processes them all through nipype's MultiProc plugin.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from aslprep_lite import __version__
from aslprep_lite.synthetic import SyntheticSpec, write_dataset

#: Mean grey-matter CBF must be within this fraction of the truth. The synthetic data carry
#: realistic noise (0.2 % of M0 per image, 8 pairs) and the pipeline smooths M0 at 5 mm, which
#: together account for about 2 %; 5 % leaves room for the registration of moved volumes.
GM_TOLERANCE = 0.05

SCENARIOS = {
    # PCASL, separate M0, control first, background suppression, 1 mm / 1 degree motion
    "pcasl": SyntheticSpec(
        subject="pcasl", background_suppression=True, bs_pulses=4, motion_mm=1.0
    ),
    # PASL QUIPSS II with the M0 included in the series, label first
    "pasl": SyntheticSpec(
        subject="pasl", asl_type="PASL", m0_type="Included", order="label-first"
    ),
    # PASL Q2TIPS, 2D readout (per-slice inversion time)
    "pasl2d": SyntheticSpec(
        subject="pasl2d",
        asl_type="PASL",
        bolus_cutoff_technique="Q2TIPS",
        m0_type="Included",
        slice_timing=True,
    ),
    # CASL, label first, 2D, separate M0 with TR 4 s (saturation-recovery correction)
    "casl2d": SyntheticSpec(
        subject="casl2d", asl_type="CASL", order="label-first", slice_timing=True, m0_tr=4.0
    ),
    # GE product style: deltam volumes only, M0 included, nothing to register
    "deltam": SyntheticSpec(
        subject="deltam",
        deltam_only=True,
        m0_type="Included",
        background_suppression=True,
        bs_pulses=4,
    ),
    "estimate": SyntheticSpec(subject="estimate", m0_type="Estimate"),
    "absent": SyntheticSpec(subject="absent", m0_type="Absent"),
    # multi-delay PCASL (asl004-like: 6 PLDs, τ 1.4 s), background suppression, motion
    "multipld": SyntheticSpec(
        subject="multipld",
        plds=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5),
        labeling_duration=1.4,
        n_pairs=3,
        background_suppression=True,
        bs_pulses=2,
        motion_mm=0.5,
    ),
    # multi-TI PASL with Q2TIPS and the M0 in the series, label first
    "multiti": SyntheticSpec(
        subject="multiti",
        asl_type="PASL",
        bolus_cutoff_technique="Q2TIPS",
        bolus_cutoff_delay=0.7,
        plds=(0.8, 1.1, 1.4, 1.7, 2.0, 2.3, 2.6),
        n_pairs=3,
        m0_type="Included",
        order="label-first",
    ),
}
MULTI_DELAY = ("multipld", "multiti")
#: Mean grey-matter ATT must be within this many seconds of the truth.
ATT_TOLERANCE = 0.1

OUTPUTS = (
    "cbf.nii.gz",
    "cbf.json",
    "desc-mean_deltam.nii.gz",
    "desc-preproc_m0scan.nii.gz",
    "desc-brain_mask.nii.gz",
    "desc-confounds_timeseries.tsv",
    "desc-confounds_timeseries.json",
    "desc-qualitycontrol_cbf.tsv",
    "desc-qualitycontrol_cbf.json",
)
SINGLE_DELAY_OUTPUTS = (
    "desc-timeseries_cbf.nii.gz",
    "desc-timeseries_cbf.json",
    "desc-score_cbf.nii.gz",
    "desc-scrub_cbf.nii.gz",
)
MULTI_DELAY_OUTPUTS = (
    "att.nii.gz",
    "att.json",
    "desc-stderr_cbf.nii.gz",
    "desc-stderr_att.nii.gz",
    "desc-fitrsquared_cbf.nii.gz",
    "desc-fitfailed_mask.nii.gz",
    "desc-longestdelay_cbf.nii.gz",
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aslprep_lite", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    truths = write_dataset(base / "bids", list(SCENARIOS.values()))
    before = tree_digest(base / "bids")
    result = run_cli(
        str(base / "bids"), str(base / "out"), "participant", "-w", str(base / "work"),
        "--nprocs", "2",
    )  # fmt: skip
    return {
        "base": base,
        "result": result,
        "truth": {t.spec.subject: t for t in truths},
        "input_digest": before,
    }


def _outputs(processed, subject: str) -> Path:
    return processed["base"] / "out" / f"sub-{subject}" / "perf"


def test_exit_code_and_files(processed):
    result = processed["result"]
    assert result.returncode == 0, result.stderr
    for subject in SCENARIOS:
        perf = _outputs(processed, subject)
        extra = MULTI_DELAY_OUTPUTS if subject in MULTI_DELAY else SINGLE_DELAY_OUTPUTS
        for suffix in OUTPUTS + extra:
            assert (perf / f"sub-{subject}_{suffix}").is_file(), (subject, suffix)
    assert not list((processed["base"] / "out").rglob("*.tmp"))
    assert not (processed["base"] / "out" / ".aslprep_lite-staging").exists()


@pytest.mark.parametrize("subject", list(SCENARIOS))
def test_grey_matter_cbf_recovered(processed, subject):
    truth = processed["truth"][subject]
    cbf = nb.load(_outputs(processed, subject) / f"sub-{subject}_cbf.nii.gz").get_fdata()
    assert np.isfinite(cbf).all()
    gm = truth.gm_mask
    assert gm.sum() > 50
    estimate, expected = cbf[gm].mean(), truth.cbf[gm].mean()
    assert estimate == pytest.approx(expected, rel=GM_TOLERANCE), (subject, estimate, expected)


@pytest.mark.parametrize("subject", MULTI_DELAY)
def test_multidelay_fit(processed, subject):
    truth = processed["truth"][subject]
    perf = _outputs(processed, subject)
    gm = truth.gm_mask
    att = nb.load(perf / f"sub-{subject}_att.nii.gz").get_fdata()
    assert np.isfinite(att).all()
    assert att[gm].mean() == pytest.approx(np.nanmean(truth.att[gm]), abs=ATT_TOLERANCE)
    failed = nb.load(perf / f"sub-{subject}_desc-fitfailed_mask.nii.gz").get_fdata() > 0
    assert failed[gm].mean() < 0.05
    stderr = nb.load(perf / f"sub-{subject}_desc-stderr_cbf.nii.gz").get_fdata()
    assert 0 < np.median(stderr[gm]) < 0.5 * truth.cbf[gm].mean()
    meta = json.loads((perf / f"sub-{subject}_cbf.json").read_text())
    assert meta["Model"].startswith("multi-")
    assert len(meta["DeltaMVolumesPerDelay"]) in (6, 7)
    assert set(meta["DeltaMVolumesPerDelay"].values()) == {3}  # 3 pairs at every delay
    assert meta["QualityWarnings"] == []
    assert meta["ATTMethod"] == "fit"
    assert meta["FitSettings"]["ATTPrior"]["NeighbourhoodFWHM"] == 8.0  # the default
    assert "with a local ATT prior" in meta["Model"]
    assert json.loads((perf / f"sub-{subject}_att.json").read_text())["Units"] == "s"
    assert not (perf / f"sub-{subject}_desc-timeseries_cbf.nii.gz").exists()


def test_dry_run_bids_examples(bids_examples, tmp_path):
    result = run_cli(
        str(bids_examples / "asl004"), str(tmp_path / "out"), "participant", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    (run,) = json.loads(result.stdout)["runs"]
    assert run["model"].startswith("multi-delay PCASL: general kinetic model")
    assert run["volumes_per_delay"] == {f"{d:g}": 16 for d in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)}
    # PASL FAIR with Q2TIPS, 10 inversion times 0.3-3.0 s, label first
    result = run_cli(
        str(bids_examples / "asl003"), str(tmp_path / "out3"), "participant", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    (run,) = json.loads(result.stdout)["runs"]
    assert run["model"] == (
        "multi-TI PASL: general kinetic model (Buxton et al. 1998) fitted for CBF and arterial "
        "transit time with a local ATT prior over 10 delays"
    )
    assert len(run["volumes_per_delay"]) == 10


def test_dry_run_hcp_aging_like_design(tmp_path):
    """5 PLDs with unequal repeats, noRF and m0scan volumes at the end of the series, per-volume
    LabelingDuration and TR, 2D multiband slice timing (HCP-Aging's protocol; metadata written
    here, so the test does not need ../shared)."""
    plds = np.repeat([0.2, 0.7, 1.2, 1.7, 2.2], [12, 12, 12, 20, 30])  # label/control volumes
    context = ["label", "control"] * 43 + ["noRF", "noRF", "m0scan", "m0scan"]
    n_pairs = plds.size // 2
    perf = tmp_path / "bids" / "sub-01" / "perf"
    perf.mkdir(parents=True)
    (tmp_path / "bids" / "dataset_description.json").write_text(
        json.dumps({"Name": "hcp-aging-like", "BIDSVersion": "1.9.0"})
    )
    (perf / "sub-01_aslcontext.tsv").write_text("volume_type\n" + "\n".join(context) + "\n")
    (perf / "sub-01_asl.nii.gz").write_bytes(b"")  # --dry-run reads no image
    sidecar = {
        "MagneticFieldStrength": 3,
        "MRAcquisitionType": "2D",
        "EchoTime": 0.019,
        "RepetitionTimePreparation": [3.58] * 88 + [8.0, 8.0],
        "ArterialSpinLabelingType": "PCASL",
        "PostLabelingDelay": [*plds.tolist(), 0.0, 0.0, 0.0, 0.0],
        "LabelingDuration": [1.5] * 86 + [0.0] * 4,
        "BackgroundSuppression": False,
        "M0Type": "Included",
        "TotalAcquiredPairs": n_pairs,
        "SliceTiming": [round(0.06 * k, 4) for k in range(10)] * 6,
    }
    (perf / "sub-01_asl.json").write_text(json.dumps(sidecar))
    result = run_cli(str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--dry-run")
    assert result.returncode == 0, result.stderr
    (run,) = json.loads(result.stdout)["runs"]
    assert run["model"] == (
        "multi-delay PCASL: general kinetic model (Buxton et al. 1998) fitted for CBF and "
        "arterial transit time with a local ATT prior over 5 delays"
    )
    assert run["volumes_per_delay"] == {"0.2": 12, "0.7": 12, "1.2": 12, "1.7": 20, "2.2": 30}
    assert run["volumes"] == {"label": 43, "control": 43, "noRF": 2, "m0scan": 2}
    assert not (tmp_path / "out").exists()


def test_input_dataset_untouched(processed):
    assert tree_digest(processed["base"] / "bids") == processed["input_digest"]


def test_sidecar_records_every_constant(processed):
    meta = json.loads((_outputs(processed, "pcasl") / "sub-pcasl_cbf.json").read_text())
    quant = meta["Quantification"]
    assert meta["Units"] == "mL/100 g/min"
    assert quant["PartitionCoefficient"]["Value"] == 0.9
    assert quant["BloodT1"]["Value"] == 1.65
    # 0.85 * 0.95^4 with four background-suppression pulses
    assert quant["LabelingEfficiency"]["Value"] == pytest.approx(0.6923303, rel=1e-6)
    assert "Garcia2005" in quant["LabelingEfficiency"]["Source"]
    assert meta["PostLabelingDelay"] == 1.8 and meta["LabelingDuration"] == 1.8
    assert meta["M0"]["M0Type"] == "Separate"
    assert meta["Sources"][0] == "bids:raw:sub-pcasl/perf/sub-pcasl_asl.nii.gz"
    casl = json.loads((_outputs(processed, "casl2d") / "sub-casl2d_cbf.json").read_text())
    # 1 / (1 - exp(-4 / 1.607)) = 1.0905
    assert casl["M0"]["TRCorrectionFactor"] == pytest.approx(1.09050, rel=1e-4)
    assert casl["M0"]["TissueT1"]["Value"] == 1.607
    assert casl["Quantification"]["LabelingEfficiency"]["Value"] == 0.68
    assert "PerSliceDelay" in casl
    pasl = json.loads((_outputs(processed, "pasl") / "sub-pasl_cbf.json").read_text())
    assert pasl["BolusCutOffTechnique"] == "QUIPSSII"
    assert pasl["Quantification"]["LabelingEfficiency"]["Value"] == 0.98


def test_confounds_table(processed):
    table = _outputs(processed, "pcasl") / "sub-pcasl_desc-confounds_timeseries.tsv"
    lines = table.read_text().splitlines()
    assert lines[0].split("\t") == [
        "trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z",
        "framewise_displacement", "rmsd", "score_outlier_index",  # the last: single-delay runs
    ]  # fmt: skip
    assert len(lines) == 1 + 16
    values = np.array([[float(v) for v in row.split("\t")[:6]] for row in lines[1:]])
    truth = processed["truth"]["pcasl"].motion
    # the estimated translations follow the true ones up to the reference's own offset
    true_t = truth[:, :3, 3] - truth[:, :3, 3].mean(axis=0)
    est_t = values[:, :3] - values[:, :3].mean(axis=0)
    assert np.abs(true_t - est_t).max() < 0.35
    skipped = _outputs(processed, "deltam") / "sub-deltam_desc-confounds_timeseries.tsv"
    assert set(skipped.read_text().splitlines()[1].split("\t")[:8]) == {"n/a"}
    note = json.loads(skipped.with_suffix(".json").read_text())["HeadMotionCorrection"]
    assert "skipped" in note


def test_dataset_description_and_citation(processed):
    out = processed["base"] / "out"
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "aslprep_lite"
    assert desc["GeneratedBy"][0]["Version"] == __version__
    assert "nipype" in desc["GeneratedBy"][0]["Description"]
    assert desc["SourceDatasets"][0]["URL"].startswith("file://")
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "Alsop" in citation and "Power" in citation


def test_rerun_is_byte_identical(processed, tmp_path):
    base = processed["base"]
    result = run_cli(
        str(base / "bids"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"),
        "--participant-label", "pcasl", "sub-pasl", "--nprocs", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for subject in ("pcasl", "pasl"):
        first = tree_digest(_outputs(processed, subject))
        second = tree_digest(tmp_path / "out" / f"sub-{subject}" / "perf")
        assert first == second


def test_version_and_help():
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"aslprep-lite {__version__}"
    helptext = run_cli("--help")
    assert helptext.returncode == 0
    for option in ("--participant-label", "--dry-run", "--m0-scale", "--smooth-kernel"):
        assert option in helptext.stdout


def test_dry_run_plans_without_processing(processed, tmp_path):
    result = run_cli(
        str(processed["base"] / "bids"), str(tmp_path / "out"), "participant", "--dry-run",
        "--participant-label", "pasl", "casl2d",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    runs = {r["subject"]: r for r in plan["runs"]}
    assert set(runs) == {"pasl", "casl2d"}
    assert runs["pasl"]["model"].startswith("single-delay PASL with QUIPSSII")
    assert runs["pasl"]["volumes"] == {"m0scan": 1, "label": 8, "control": 8}
    assert runs["casl2d"]["readout"].startswith("2D")
    assert runs["casl2d"]["m0"]["repetition_time"] == 4.0
    assert not (tmp_path / "out").exists()


def test_bad_runs_fail_alone_with_one_line_each(tmp_path):
    """One participant fails validation, one fails inside the graph: the third completes."""
    bids = tmp_path / "bids"
    write_dataset(
        bids,
        [SyntheticSpec(subject=s, n_pairs=2) for s in ("good", "badmeta", "badm0")],
    )
    sidecar = bids / "sub-badmeta" / "perf" / "sub-badmeta_asl.json"
    meta = json.loads(sidecar.read_text())
    meta["RepetitionTimePreparation"] = 0
    sidecar.write_text(json.dumps(meta))
    m0_file = bids / "sub-badm0" / "perf" / "sub-badm0_m0scan.nii.gz"
    m0 = nb.load(m0_file)
    nb.Nifti1Image(np.zeros(m0.shape, np.float32), m0.affine).to_filename(m0_file)
    result = run_cli(
        str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
        "--nprocs", "2",
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [
        line for line in result.stderr.splitlines() if line.startswith("aslprep-lite: error")
    ]
    assert len(errors) == 2, result.stderr
    assert any("sub-badmeta_asl.json" in e and "'RepetitionTimePreparation'" in e for e in errors)
    assert any("sub-badm0_m0scan.nii.gz" in e and "no positive signal" in e for e in errors)
    assert "1 run(s) processed, 2 failed" in result.stderr
    assert (tmp_path / "out" / "sub-good" / "perf" / "sub-good_cbf.nii.gz").is_file()
    assert not (tmp_path / "out" / "sub-badmeta").exists()
    assert not (tmp_path / "out" / "sub-badm0").exists()


def test_truncated_image_is_one_line(tmp_path):
    bids = tmp_path / "bids"
    write_dataset(bids, [SyntheticSpec(n_pairs=2)])
    asl = bids / "sub-01" / "perf" / "sub-01_asl.nii.gz"
    asl.write_bytes(asl.read_bytes()[:200])
    result = run_cli(str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "sub-01_asl.nii.gz" in result.stderr
    assert not (tmp_path / "out" / "sub-01").exists()


def test_output_inside_input_refused(tmp_path):
    bids = tmp_path / "bids"
    write_dataset(bids, [SyntheticSpec(n_pairs=2)])
    result = run_cli(str(bids), str(bids / "derivatives" / "x"), "participant")
    assert result.returncode == 1
    assert "inside the input dataset" in result.stderr
    assert not (bids / "derivatives").exists()


def test_plugin_file(tmp_path):
    bids = tmp_path / "bids"
    write_dataset(bids, [SyntheticSpec(n_pairs=2)])
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: Linear\nplugin_args: {}\n")
    result = run_cli(str(bids), str(tmp_path / "out"), "participant", "--use-plugin", str(plugin))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "sub-01" / "perf" / "sub-01_cbf.nii.gz").is_file()
    plugin.write_text("plugin: [\n")
    result = run_cli(str(bids), str(tmp_path / "o2"), "participant", "--use-plugin", str(plugin))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "plugin.yml: cannot read the plugin file" in line


def test_implausible_cbf_is_loud(tmp_path):
    bids = tmp_path / "bids"
    write_dataset(bids, [SyntheticSpec(n_pairs=2)])
    # an M0 100x too small: CBF in the thousands, as with vendor-scaled GE data
    result = run_cli(
        str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
        "--m0-scale", "0.01",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "outside the plausible 5-200" in result.stderr
    sidecar = json.loads((tmp_path / "out" / "sub-01" / "perf" / "sub-01_cbf.json").read_text())
    assert "M0 scaling" in sidecar["QualityWarnings"][0]


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (dead, waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_interrupted_run_resumes_identically(processed, tmp_path, signum):
    """Kill a run midway, rerun with the same work directory: same bytes as a clean run."""
    from aslprep_lite.cli.run import _descendants

    base = processed["base"]
    args = [
        str(base / "bids"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"),
        "--participant-label", "pcasl", "pasl", "--nprocs", "2",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "aslprep_lite", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # wait until nipype has started working, then interrupt
    deadline = time.monotonic() + 60
    while not list((tmp_path / "work").rglob("_node.pklz")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    workers = _descendants(proc.pid)
    proc.send_signal(signum)
    proc.wait(timeout=60)
    assert proc.returncode == -signum if signum == signal.SIGKILL else 128 + signum
    if signum == signal.SIGTERM:
        time.sleep(0.5)
        assert not [pid for pid in workers if _alive(pid)]
    else:  # SIGKILL cannot be caught: clean up the orphaned workers ourselves
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    for subject in ("pcasl", "pasl"):
        assert tree_digest(tmp_path / "out" / f"sub-{subject}" / "perf") == tree_digest(
            _outputs(processed, subject)
        )


def test_rerun_replaces_stale_outputs(processed, tmp_path):
    """A rerun into an existing output directory leaves no file of an earlier run behind."""
    out = tmp_path / "out"
    perf = out / "sub-pasl" / "perf"
    perf.mkdir(parents=True)
    stale = perf / "sub-pasl_desc-old_cbf.nii.gz"
    stale.write_bytes(b"from an earlier version")
    (perf / "sub-pasl_cbf.nii.gz").write_bytes(b"old")
    result = run_cli(
        str(processed["base"] / "bids"), str(out), "participant", "-w", str(tmp_path / "w"),
        "--participant-label", "pasl",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert tree_digest(perf) == tree_digest(_outputs(processed, "pasl"))


def test_reference_region_calibration(processed, tmp_path):
    """--m0-calibration wm: M0a and CBF follow the closed form (asl_calib's equation)."""
    truth = processed["truth"]["pcasl"]
    # the white-matter-dominated part of the phantom (no voxel is pure after partial volume)
    reference = (truth.brain_mask & (truth.cbf > 15.0) & (truth.cbf < 30.0)).astype(np.uint8)
    assert reference.sum() >= 20
    mask_file = tmp_path / "wm_mask.nii.gz"
    nb.Nifti1Image(reference, truth.affine).to_filename(mask_file)
    result = run_cli(
        str(processed["base"] / "bids"), str(tmp_path / "out"), "participant",
        "-w", str(tmp_path / "w"), "--participant-label", "pcasl",
        "--m0-calibration", "wm", "--m0-reference-mask", str(mask_file),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    perf = tmp_path / "out" / "sub-pcasl" / "perf"
    region = json.loads((perf / "sub-pcasl_cbf.json").read_text())["M0"]["ReferenceRegion"]
    assert region["Source"] == str(mask_file)
    te, tr = region["EchoTime"], region["RepetitionTime"]
    signal = truth.m0[reference > 0].mean()  # the M0 was written fully relaxed (TR 6 s)
    assert region["MeanSignal"] == pytest.approx(signal, rel=0.01)
    # WM: T1 1.0 s, T2* 60 ms, partition coefficient 0.82; blood T2* 50 ms (gradient echo)
    m0a = signal / (1 - np.exp(-tr / 1.0)) * np.exp(te / 0.06) / 0.82 * np.exp(-te / 0.05)
    assert region["M0a"] == pytest.approx(m0a, rel=0.01)
    # voxelwise, ΔM is divided by M0(v) / λ; here by M0a: CBF scales by (M0(v) / 0.9) / M0a
    cbf = nb.load(perf / "sub-pcasl_cbf.nii.gz").get_fdata()
    gm = truth.gm_mask
    expected = (truth.cbf[gm] * truth.m0[gm] / 0.9).mean() / m0a
    assert cbf[gm].mean() == pytest.approx(expected, rel=GM_TOLERANCE)
    assert (perf / "sub-pcasl_desc-m0reference_mask.nii.gz").is_file()
    missing = run_cli(
        str(processed["base"] / "bids"), str(tmp_path / "o2"), "participant",
        "--m0-calibration", "csf",
    )  # fmt: skip
    assert missing.returncode == 1
    assert "needs --m0-reference-mask" in missing.stderr


def test_default_work_dir_falls_back_when_not_writable(tmp_path, monkeypatch):
    """Beside the outputs when writable; else a stable per-user folder in $TMPDIR."""
    from aslprep_lite.config import default_work_dir

    out = tmp_path / "derivatives" / "aslprep_lite"
    assert default_work_dir(out) == tmp_path / "derivatives" / "aslprep_lite_work"
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a read-only image
    fallback = default_work_dir(out)
    assert fallback.parent == Path(tempfile.gettempdir())
    assert fallback.name.startswith(f"aslprep_lite_work-{os.getuid()}-")
    assert default_work_dir(out) == fallback  # stable: a rerun resumes from it
    assert default_work_dir(tmp_path / "other") != fallback


def test_cbf_only_series(tmp_path):
    """GE-style series of cbf volumes: passed through, averaged, no M0 needed."""
    (truth,) = write_dataset(
        tmp_path / "bids", [SyntheticSpec(n_pairs=2, deltam_only=True, m0_type="Included")]
    )
    perf = tmp_path / "bids" / "sub-01" / "perf"
    noise = np.random.default_rng(0).normal(0.0, 2.0, (*truth.cbf.shape, 3))
    series = (truth.cbf[..., np.newaxis] + noise).astype(np.float32)
    nb.Nifti1Image(series, truth.affine).to_filename(perf / "sub-01_asl.nii.gz")
    (perf / "sub-01_aslcontext.tsv").write_text("volume_type\ncbf\ncbf\ncbf\n")
    meta = json.loads((perf / "sub-01_asl.json").read_text())
    meta.update(M0Type="Absent", BackgroundSuppression=True, RepetitionTimePreparation=4.0)
    (perf / "sub-01_asl.json").write_text(json.dumps(meta))
    result = run_cli(
        str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w")
    )
    assert result.returncode == 0, result.stderr
    assert "cbf volumes only" in result.stderr
    out = tmp_path / "out" / "sub-01" / "perf"
    cbf = nb.load(out / "sub-01_cbf.nii.gz").get_fdata()
    gm = truth.gm_mask
    # the mean of three noisy copies of the truth: within 3 standard errors of it
    assert cbf[gm].mean() == pytest.approx(
        truth.cbf[gm].mean(), abs=3 * 2.0 / np.sqrt(3 * gm.sum())
    )
    assert json.loads((out / "sub-01_cbf.json").read_text())["PassedThroughCBFVolumes"] == 3
    assert not (out / "sub-01_desc-preproc_m0scan.nii.gz").exists()
    assert not (out / "sub-01_desc-mean_deltam.nii.gz").exists()


def test_unbalanced_series_quantified_without_the_unpaired_volume(tmp_path):
    """A Siemens-3D-PCASL-like series: M0, control, then (label, control) pairs. The control
    beside the M0 has no partner: it is left out, said so, and the CBF is still right."""
    spec = SyntheticSpec(m0_type="Included", order="label-first", n_pairs=5)
    (truth,) = write_dataset(tmp_path / "bids", [spec])
    perf = tmp_path / "bids" / "sub-01" / "perf"
    context = (perf / "sub-01_aslcontext.tsv").read_text().split()[1:]
    assert context[:3] == ["m0scan", "label", "control"]
    del context[1]  # the M0 took the first label slot
    image = nb.load(perf / "sub-01_asl.nii.gz")
    data = np.delete(np.asarray(image.dataobj), 1, axis=3)
    nb.Nifti1Image(data, image.affine, image.header).to_filename(perf / "sub-01_asl.nii.gz")
    (perf / "sub-01_aslcontext.tsv").write_text("volume_type\n" + "\n".join(context) + "\n")
    meta = json.loads((perf / "sub-01_asl.json").read_text())
    for key, value in meta.items():  # per-volume arrays lose that volume too
        if isinstance(value, list) and len(value) == len(context) + 1:
            meta[key] = value[:1] + value[2:]
    (perf / "sub-01_asl.json").write_text(json.dumps(meta))
    result = run_cli(
        str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w")
    )
    assert result.returncode == 0, result.stderr
    assert "volume(s) 1 (control) left out, unpaired: 5 control and 4 label" in result.stderr
    out = tmp_path / "out" / "sub-01" / "perf"
    sidecar = json.loads((out / "sub-01_cbf.json").read_text())
    assert sidecar["VolumesLeftOut"]["Volumes"] == [1]
    assert sidecar["NumberOfVolumesAveraged"] == 4
    cbf = nb.load(out / "sub-01_cbf.nii.gz").get_fdata()
    gm = truth.gm_mask
    assert cbf[gm].mean() == pytest.approx(truth.cbf[gm].mean(), rel=GM_TOLERANCE)


def _anat_placeholders(folder: Path, subject: str, skip: str | None = None) -> None:
    """An sMRIPrep-like anat/ folder of empty files (a dry run opens none of them)."""
    names = [
        "desc-preproc_T1w.nii.gz", "desc-brain_mask.nii.gz", "dseg.nii.gz",
        *(f"label-{t}_probseg.nii.gz" for t in ("GM", "WM", "CSF")),
        "from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.h5",
        "from-MNI152NLin2009aSym_to-T1w_mode-image_xfm.h5",
    ]  # fmt: skip
    anat = folder / f"sub-{subject}" / "anat"
    anat.mkdir(parents=True)
    for name in names:
        if skip is None or skip not in name:
            (anat / f"sub-{subject}_{name}").write_bytes(b"")


def test_dry_run_applies_the_anatomy_decisions(tmp_path):
    """--dry-run decides as a run does before its graph: the reused T1w of --anat-derivatives
    (nothing planned in anat/), a participant whose folder lacks a file fails, and so does
    reference-region calibration without a mask or a T1w. No image is opened."""
    bids = tmp_path / "bids"
    write_dataset(bids, [SyntheticSpec(subject=s, n_pairs=2) for s in ("reuse", "nogm", "free")])
    for subject in ("reuse", "nogm"):  # raw T1w files: the dry run does not read them
        (bids / f"sub-{subject}" / "anat").mkdir()
        (bids / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz").write_bytes(b"")
    deriv = tmp_path / "smriprep"
    deriv.mkdir()
    (deriv / "dataset_description.json").write_text(
        json.dumps({"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "derivative"})
    )
    _anat_placeholders(deriv, "reuse")
    _anat_placeholders(deriv, "nogm", skip="label-GM")
    out = tmp_path / "out"
    result = run_cli(
        str(bids), str(out), "participant", "--dry-run", "--anat-derivatives", str(deriv),
        "--m0-calibration", "csf",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert not out.exists()
    plan = json.loads(result.stdout)
    runs = {run["subject"]: run for run in plan["runs"]}
    assert set(runs) == {"reuse"}
    anatomy = runs["reuse"]["anatomy"]
    reused_t1w = deriv / "sub-reuse" / "anat" / "sub-reuse_desc-preproc_T1w.nii.gz"
    assert anatomy["t1w"] == str(reused_t1w.resolve())
    assert anatomy["anat_derivatives"] == str(deriv.resolve())
    assert not [p for p in runs["reuse"]["outputs"] if "/anat/" in p]
    failures = {Path(f["asl_file"]).name: f["error"] for f in plan["failures"]}
    assert set(failures) == {"sub-nogm_asl.nii.gz", "sub-free_asl.nii.gz"}
    assert failures["sub-nogm_asl.nii.gz"].startswith(
        f"{deriv.resolve() / 'sub-nogm' / 'anat'}: no sub-nogm_label-GM_probseg.nii[.gz] "
        "(GM probability map)"
    )
    assert failures["sub-free_asl.nii.gz"] == (
        f"{bids / 'sub-free' / 'perf' / 'sub-free_asl.nii.gz'}: --m0-calibration csf needs "
        "--m0-reference-mask FILE (a CSF mask on the ASL grid) or a T1w image of the "
        "participant to segment"
    )
