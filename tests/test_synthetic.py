"""Tests of the synthetic dataset writer: the written data must match the closed-form truth."""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bids import BIDSLayout
from scipy import ndimage

from aslprep_lite import synthetic
from aslprep_lite.synthetic import SyntheticSpec, SyntheticTruth, write_dataset

# Hand-written constants (Alsop et al. 2015) so that the test does not reuse the module's.
LAMBDA = 0.9
T1B_3T = 1.65


def _series(truth: SyntheticTruth) -> tuple[np.ndarray, list[str]]:
    data = np.asarray(nib.load(truth.asl_file).dataobj, dtype=np.float64)
    context_file = Path(str(truth.asl_file).replace("_asl.nii.gz", "_aslcontext.tsv"))
    lines = context_file.read_text().splitlines()
    assert lines[0] == "volume_type"
    return data, lines[1:]


def _delta_m(truth: SyntheticTruth) -> np.ndarray:
    """Mean control - label of a written series."""
    data, types = _series(truth)
    kinds = np.array(types)
    return data[..., kinds == "control"].mean(-1) - data[..., kinds == "label"].mean(-1)


def _gm_voxel(truth: SyntheticTruth) -> tuple[int, int, int]:
    return tuple(int(i) for i in np.argwhere(truth.gm_mask)[0])


def test_pcasl_delta_m_matches_closed_form(tmp_path: Path) -> None:
    (truth,) = write_dataset(tmp_path, [SyntheticSpec(noise=0.0)])
    voxel = _gm_voxel(truth)
    cbf, m0 = truth.cbf[voxel], truth.m0[voxel]
    alpha, tau, pld = 0.85, 1.8, 1.8
    expected = (
        cbf * 2 * alpha * T1B_3T * m0 * (1 - np.exp(-tau / T1B_3T)) * np.exp(-pld / T1B_3T)
    ) / (6000 * LAMBDA)
    assert truth.gm_mask.sum() > 20
    assert cbf > 50
    assert _delta_m(truth)[voxel] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    ("technique", "bolus", "delay_time"),
    [
        ("QUIPSSII", 0.7, 0.7),  # bolus width TI1
        ("Q2TIPS", 0.7, [0.7, 1.3]),  # TI1 = first saturation pulse
        ("QUIPSS", 1.8 - 0.7, 0.7),  # bolus width TI - TI1
    ],
)
def test_pasl_delta_m_matches_closed_form(
    tmp_path: Path, technique: str, bolus: float, delay_time: float | list[float]
) -> None:
    spec = SyntheticSpec(
        asl_type="PASL",
        pld=1.8,
        bolus_cutoff_delay=0.7,
        bolus_cutoff_technique=technique,
        noise=0.0,
    )
    (truth,) = write_dataset(tmp_path, [spec])
    voxel = _gm_voxel(truth)
    cbf, m0 = truth.cbf[voxel], truth.m0[voxel]
    alpha, ti = 0.98, 1.8
    expected = cbf * 2 * alpha * bolus * m0 * np.exp(-ti / T1B_3T) / (6000 * LAMBDA)
    assert _delta_m(truth)[voxel] == pytest.approx(expected, rel=1e-4)

    meta = json.loads(truth.asl_file.with_name("sub-01_asl.json").read_text())
    assert meta["BolusCutOffFlag"] is True
    assert meta["BolusCutOffDelayTime"] == delay_time
    assert meta["BolusCutOffTechnique"] == technique
    assert meta["PostLabelingDelay"] == 1.8
    assert "LabelingDuration" not in meta


def test_background_suppression_scales_alpha(tmp_path: Path) -> None:
    plain, suppressed = write_dataset(
        tmp_path,
        [
            SyntheticSpec(noise=0.0),
            SyntheticSpec(subject="02", noise=0.0, background_suppression=True, bs_pulses=4),
        ],
    )
    mask = plain.brain_mask & (plain.cbf > 1)
    ratio = _delta_m(suppressed)[mask] / _delta_m(plain)[mask]
    np.testing.assert_allclose(ratio, 0.95**4, rtol=1e-3)
    meta = json.loads(suppressed.asl_file.with_name("sub-02_asl.json").read_text())
    assert meta["BackgroundSuppression"] is True
    assert meta["BackgroundSuppressionNumberPulses"] == 4


@pytest.mark.parametrize(
    ("order", "first"), [("control-first", "control"), ("label-first", "label")]
)
def test_order_in_aslcontext(tmp_path: Path, order: str, first: str) -> None:
    (truth,) = write_dataset(tmp_path, [SyntheticSpec(order=order, noise=0.0, n_pairs=3)])
    data, types = _series(truth)
    other = {"control": "label", "label": "control"}[first]
    assert types == [first, other] * 3
    assert data.shape[-1] == 6
    # Whatever the order, control - label is positive in GM.
    assert _delta_m(truth)[_gm_voxel(truth)] > 0


def test_included_m0_and_deltam_only(tmp_path: Path) -> None:
    spec = SyntheticSpec(m0_type="Included", deltam_only=True, n_pairs=4, noise=0.0)
    (truth,) = write_dataset(tmp_path, [spec])
    data, types = _series(truth)
    assert types == ["m0scan"] + ["deltam"] * 4
    voxel = _gm_voxel(truth)
    # m0_tr 6 s >= 5 s: the included M0 is written fully relaxed.
    assert data[voxel][0] == pytest.approx(truth.m0[voxel], rel=1e-6)
    meta = json.loads(truth.asl_file.with_name("sub-01_asl.json").read_text())
    assert meta["RepetitionTimePreparation"] == [6.0] + [4.0] * 4
    assert not list(truth.asl_file.parent.glob("*m0scan*"))


def test_short_tr_m0_is_not_fully_relaxed(tmp_path: Path) -> None:
    (truth,) = write_dataset(tmp_path, [SyntheticSpec(m0_tr=4.0, noise=0.0)])
    m0 = nib.load(truth.asl_file.with_name("sub-01_m0scan.nii.gz")).get_fdata()
    voxel = _gm_voxel(truth)
    assert m0[voxel] == pytest.approx(truth.m0[voxel] * (1 - np.exp(-4.0 / 1.607)), rel=1e-6)


def test_slice_timing_scales_delta_m_per_slice(tmp_path: Path) -> None:
    flat, timed = write_dataset(
        tmp_path,
        [SyntheticSpec(noise=0.0), SyntheticSpec(subject="02", noise=0.0, slice_timing=True)],
    )
    meta = json.loads(timed.asl_file.with_name("sub-02_asl.json").read_text())
    assert meta["MRAcquisitionType"] == "2D"
    slice_timing = np.array(meta["SliceTiming"])
    assert slice_timing[0] == 0
    np.testing.assert_allclose(np.diff(slice_timing), 0.045)
    ratio = _delta_m(timed) / np.where(flat.cbf > 1, _delta_m(flat), np.nan)
    per_slice = np.nanmean(ratio, axis=(0, 1))
    spread = np.nanstd(ratio, axis=(0, 1))
    valid = ~np.isnan(per_slice)
    assert valid.sum() >= 6
    np.testing.assert_allclose(per_slice[valid], np.exp(-slice_timing[valid] / T1B_3T), rtol=1e-4)
    assert np.all(spread[valid] < 1e-4)


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    specs = [
        SyntheticSpec(motion_mm=1.0, m0_type="Included"),
        SyntheticSpec(subject="02", session="A", run=1),
    ]
    write_dataset(tmp_path / "a", specs)
    write_dataset(tmp_path / "b", specs)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.*"))
    assert files_a == files_b
    assert len(files_a) >= 9
    for relative in files_a:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes()

    (truth,) = write_dataset(tmp_path / "c", [SyntheticSpec(seed=1)])
    other = truth.asl_file.read_bytes()
    assert other != (tmp_path / "a" / "sub-01/perf/sub-01_asl.nii.gz").read_bytes()


def test_pybids_finds_run_and_m0(tmp_path: Path) -> None:
    specs = [
        SyntheticSpec(),
        SyntheticSpec(subject="02", session="pre", run=2),
        SyntheticSpec(subject="03", m0_type="Estimate", m0_estimate=900.0),
    ]
    truths = write_dataset(tmp_path, specs)
    description = json.loads((tmp_path / "dataset_description.json").read_text())
    assert description["BIDSVersion"] == "1.9.0"
    assert description["DatasetType"] == "raw"
    participants = (tmp_path / "participants.tsv").read_text().splitlines()
    assert participants == ["participant_id", "sub-01", "sub-02", "sub-03"]

    layout = BIDSLayout(tmp_path, validate=False)
    asl = layout.get(suffix="asl", extension=".nii.gz")
    assert sorted(Path(f.path) for f in asl) == sorted(t.asl_file for t in truths)
    (run2,) = layout.get(subject="02", session="pre", run=2, suffix="asl", extension=".nii.gz")
    assert run2.get_metadata()["ArterialSpinLabelingType"] == "PCASL"

    m0scans = layout.get(suffix="m0scan", extension=".nii.gz")
    assert len(m0scans) == 2
    for m0scan in m0scans:
        meta = m0scan.get_metadata()
        assert meta["RepetitionTimePreparation"] == 6.0
        (intended,) = meta["IntendedFor"]
        target = tmp_path / f"sub-{m0scan.entities['subject']}" / intended
        assert target.is_file()
        assert target.name == Path(m0scan.path).name.replace("_m0scan", "_asl")

    estimate = layout.get(subject="03", suffix="asl", extension=".nii.gz")[0].get_metadata()
    assert estimate["M0Type"] == "Estimate"
    assert estimate["M0Estimate"] == 900.0


def test_nifti_header_and_sidecar(tmp_path: Path) -> None:
    (truth,) = write_dataset(tmp_path, [SyntheticSpec(n_pairs=2)])
    image = nib.load(truth.asl_file)
    assert image.get_data_dtype() == np.float32
    assert image.shape == (32, 32, 12, 4)
    assert int(image.header["qform_code"]) == 1
    assert int(image.header["sform_code"]) == 1
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    np.testing.assert_allclose(image.header.get_zooms()[:3], (3.5, 3.5, 5.0))
    np.testing.assert_allclose(image.affine, truth.affine)
    centre = image.affine @ np.r_[(np.array(image.shape[:3]) - 1) / 2, 1]
    np.testing.assert_allclose(centre[:3], 0, atol=1e-9)

    meta = json.loads(truth.asl_file.with_name("sub-01_asl.json").read_text())
    for key in (
        "MagneticFieldStrength",
        "ArterialSpinLabelingType",
        "PostLabelingDelay",
        "BackgroundSuppression",
        "M0Type",
        "RepetitionTimePreparation",
        "LabelingDuration",
        "MRAcquisitionType",
        "TotalAcquiredPairs",
    ):
        assert key in meta
    assert "Manufacturer" not in meta
    assert meta["MRAcquisitionType"] == "3D"
    assert "SliceTiming" not in meta
    assert meta["TotalAcquiredPairs"] == 2


def test_motion_convention(tmp_path: Path) -> None:
    moving, still = write_dataset(
        tmp_path,
        [
            SyntheticSpec(motion_mm=2.0, noise=0.0, n_pairs=4),
            SyntheticSpec(subject="02", noise=0.0, n_pairs=4),
        ],
    )
    data, _ = _series(moving)
    reference, _ = _series(still)
    assert moving.motion.shape == (8, 4, 4)
    np.testing.assert_allclose(moving.motion[0], np.eye(4))
    np.testing.assert_allclose(still.motion, np.tile(np.eye(4), (8, 1, 1)))
    np.testing.assert_allclose(data[..., 0], reference[..., 0], rtol=1e-6)
    assert np.abs(moving.motion[:, :3, 3]).max() <= 2.0 + 1e-9
    moved = int(np.argmax(np.abs(moving.motion[:, :3, 3]).max(axis=1)))
    assert moved > 0
    # Undo the recorded motion: reference voxel o shows the moved volume at A^-1 T A o.
    vox = np.linalg.inv(moving.affine) @ moving.motion[moved] @ moving.affine
    realigned = ndimage.affine_transform(
        data[..., moved], vox[:3, :3], offset=vox[:3, 3], order=3, mode="nearest"
    )
    inner = ndimage.binary_erosion(moving.brain_mask, iterations=1)
    before = np.abs(data[..., moved] - reference[..., moved])[inner].mean()
    after = np.abs(realigned - reference[..., moved])[inner].mean()
    assert after < 0.25 * before


def test_truth_is_read_only_and_spec_hashable() -> None:
    spec = SyntheticSpec(shape=[16, 16, 8])  # type: ignore[arg-type]
    assert spec.shape == (16, 16, 8)
    assert {spec: 1}[SyntheticSpec(shape=(16, 16, 8))] == 1
    with pytest.raises(ValueError, match="asl_type"):
        SyntheticSpec(asl_type="FAIR")
    with pytest.raises(ValueError, match="field_strength"):
        SyntheticSpec(field_strength=2.0)


def test_duplicate_series_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sub-01"):
        write_dataset(tmp_path, [SyntheticSpec(), SyntheticSpec(seed=3)])


def test_constants_agree_with_pipeline_table() -> None:
    """The forward model keeps its own constants; they must equal the pipeline's table."""
    table = tomllib.loads(
        resources.files("aslprep_lite.data").joinpath("constants.toml").read_text()
    )
    assert synthetic._LAMBDA == table["partition_coefficient"]["value"]
    assert synthetic._UNIT == table["unit_conversion"]["value"]
    assert {float(k): v for k, v in table["blood_t1"]["values"].items()} == synthetic._BLOOD_T1
    assert {float(k): v for k, v in table["tissue_t1"]["values"].items()} == synthetic._GM_T1
    assert table["labeling_efficiency"]["values"] == synthetic._ALPHA
    assert (
        table["background_suppression_pulse_efficiency"]["value"] == synthetic._BS_PULSE_EFFICIENCY
    )
    assert table["m0_tr_threshold"]["value"] == synthetic._M0_TR_THRESHOLD
    assert table["field_strength_tolerance"]["value"] == synthetic._FIELD_TOLERANCE


# --------------------------------------------------------------------------------------------
# Multi-delay series
# --------------------------------------------------------------------------------------------
def _buxton(kind: str, cbf: float, m0: float, att: float, delay: float, bolus: float) -> float:
    """Buxton et al. 1998 with T1' = T1b, written out here independently of quant.kinetic.

    (P)CASL (delay = PLD, t = τ + PLD), α 0.85; PASL (delay = TI = t, bolus TI1), α 0.98.
    """
    alpha = 0.85 if kind == "PCASL" else 0.98
    scale = 2 * alpha * cbf * m0 / (6000 * LAMBDA)
    t = delay + (bolus if kind == "PCASL" else 0.0)
    if t < att:
        return 0.0
    if kind == "PCASL":
        if t < att + bolus:  # rising: the bolus is still arriving
            return scale * T1B_3T * np.exp(-att / T1B_3T) * (1 - np.exp(-(t - att) / T1B_3T))
        return scale * T1B_3T * np.exp(-delay / T1B_3T) * (1 - np.exp(-bolus / T1B_3T))
    return scale * min(t - att, bolus) * np.exp(-t / T1B_3T)


def _delta_m_by_delay(truth: SyntheticTruth) -> tuple[np.ndarray, np.ndarray]:
    """Mean ΔM per distinct delay (X, Y, Z, D) of a written multi-delay series."""
    data, types = _series(truth)
    meta = json.loads(truth.asl_file.with_name(f"{truth.spec.stem}_asl.json").read_text())
    kinds, delays = np.array(types), np.array(meta["PostLabelingDelay"])
    distinct = np.unique(delays[kinds != "m0scan"])
    out = []
    for delay in distinct:
        at = delays == delay
        if "deltam" in types:
            out.append(data[..., at & (kinds == "deltam")].mean(-1))
        else:
            control = data[..., at & (kinds == "control")].mean(-1)
            out.append(control - data[..., at & (kinds == "label")].mean(-1))
    return distinct, np.stack(out, axis=-1)


def test_multidelay_pcasl_matches_buxton(tmp_path: Path) -> None:
    spec = SyntheticSpec(
        plds=(0.25, 0.75, 1.25, 2.0),
        labeling_duration=1.4,
        n_pairs=2,
        m0_type="Included",
        noise=0.0,
    )
    (truth,) = write_dataset(tmp_path, [spec])
    _, types = _series(truth)
    assert types == ["m0scan"] + ["control", "label"] * 8
    meta = json.loads(truth.asl_file.with_name("sub-01_asl.json").read_text())
    # The series cycles through the delays one pair at a time; the M0 volume has delay 0.
    cycle = [0.25, 0.25, 0.75, 0.75, 1.25, 1.25, 2.0, 2.0]
    assert meta["PostLabelingDelay"] == [0.0, *cycle, *cycle]
    assert meta["TotalAcquiredPairs"] == 8
    assert meta["LabelingDuration"] == 1.4

    # ATT: flow-weighted GM/WM mean, 1.2 s in pure GM; a >= 90 % GM voxel is within
    # (60*0.9*1.2 + 20*0.1*1.6) / (60*0.9 + 20*0.1) = 1.2143 s.
    gm = truth.gm_mask
    assert truth.att is not None
    assert np.all((truth.att[gm] > 1.2 - 1e-12) & (truth.att[gm] < 1.2143))
    assert np.isnan(truth.att[truth.cbf == 0]).all()
    assert 1.2 - 1e-12 < np.nanmin(truth.att) and np.nanmax(truth.att) < 1.6 + 1e-12

    delays, delta_m = _delta_m_by_delay(truth)
    np.testing.assert_allclose(delays, [0.25, 0.75, 1.25, 2.0])
    for voxel in [tuple(v) for v in np.argwhere(gm)[:5]]:
        cbf, m0, att = truth.cbf[voxel], truth.m0[voxel], truth.att[voxel]
        expected = [_buxton("PCASL", cbf, m0, att, d, 1.4) for d in delays]
        # PLD 0.25, 0.75 are before arrival of the bolus end (rising), 1.25 and 2.0 after it.
        np.testing.assert_allclose(delta_m[voxel], expected, rtol=1e-4)
        assert delta_m[voxel][0] < delta_m[voxel][1] < delta_m[voxel][2]


def test_multidelay_pasl_slice_timing(tmp_path: Path) -> None:
    spec = SyntheticSpec(
        asl_type="PASL",
        plds=(0.6, 1.4, 2.0),
        bolus_cutoff_technique="Q2TIPS",
        bolus_cutoff_delay=0.5,
        gm_att=0.8,
        wm_att=1.0,
        deltam_only=True,
        slice_timing=True,
        n_pairs=2,
        noise=0.0,
    )
    (truth,) = write_dataset(tmp_path, [spec])
    meta = json.loads(truth.asl_file.with_name("sub-01_asl.json").read_text())
    assert meta["PostLabelingDelay"] == [0.6, 1.4, 2.0, 0.6, 1.4, 2.0]
    slice_timing = np.array(meta["SliceTiming"])
    delays, delta_m = _delta_m_by_delay(truth)
    for voxel in [tuple(v) for v in np.argwhere(truth.gm_mask)[::7]]:
        cbf, m0, att = truth.cbf[voxel], truth.m0[voxel], truth.att[voxel]
        # Effective TI of a 2D slice: TI + SliceTiming[z].
        expected = [_buxton("PASL", cbf, m0, att, d + slice_timing[voxel[2]], 0.5) for d in delays]
        np.testing.assert_allclose(delta_m[voxel], expected, rtol=1e-4, atol=1e-9)


def test_single_delay_has_no_att_and_multidelay_validation() -> None:
    spec = SyntheticSpec(plds=[1.0, 2.0])  # type: ignore[arg-type]
    assert spec.plds == (1.0, 2.0) and spec.delays == (1.0, 2.0)
    assert {spec: 1}[SyntheticSpec(plds=(1.0, 2.0))] == 1
    assert SyntheticSpec().delays == (1.8,)
    with pytest.raises(ValueError, match="plds"):
        SyntheticSpec(plds=())
    with pytest.raises(ValueError, match="QUIPSSII or Q2TIPS"):
        SyntheticSpec(asl_type="PASL", plds=(1.0, 2.0), bolus_cutoff_technique="QUIPSS")
    with pytest.raises(ValueError, match="TI1"):
        SyntheticSpec(asl_type="PASL", plds=(0.6, 2.0), bolus_cutoff_delay=0.8)


def test_single_delay_truth_has_no_att(tmp_path: Path) -> None:
    (truth,) = write_dataset(tmp_path, [SyntheticSpec(n_pairs=1)])
    assert truth.att is None
