"""Per-run QC metrics (aslprep_lite.quant.qc) against values worked out by hand."""

from __future__ import annotations

import json
import math
from itertools import pairwise

import numpy as np
import pytest

from aslprep_lite.quant.qc import (
    COLUMNS,
    motion_summary,
    negative_fraction,
    qc_row,
    qc_sidecar,
    qei,
    qei_components,
    qei_index,
    read_qc_tsv,
    spatial_cov,
    write_qc_tsv,
)
from aslprep_lite.quant.tissue import tissue_cbf

ZOOMS = (3.0, 3.0, 3.0)


def _phantom(shape=(40, 40, 32), voxel=3.0):
    """Concentric tissue shells (mm): ventricle CSF < 12, WM 12-38, GM 38-52, CSF 52-58.

    Probabilities change over a logistic edge of 1.5 mm, so there are pure voxels of every
    tissue (pGM, pWM, pCSF > 0.9) and partial-volume voxels between; the brain mask is r < 56.
    """
    idx = np.indices(shape, dtype=float)
    centre = (np.array(shape, dtype=float) - 1) / 2
    r = np.sqrt((((idx - centre[:, None, None, None]) * voxel) ** 2).sum(axis=0))

    def inside(edge):
        return 1 / (1 + np.exp(-(r - edge) / 1.5))

    pwm = inside(12) * (1 - inside(38))
    pgm = inside(38) * (1 - inside(52))
    pcsf = (1 - inside(12)) + inside(52) * (1 - inside(58))
    return pgm, pwm, pcsf, r < 56


@pytest.fixture(scope="module")
def phantom():
    pgm, pwm, pcsf, mask = _phantom()
    perfect = np.where(mask, 24.0 * (2.5 * pgm + pwm), 0.0)  # GM 60, WM 24 mL/100 g/min
    noise = np.random.default_rng(20240).standard_normal(mask.shape)
    return pgm, pwm, pcsf, mask, perfect, noise


# --- spatial CoV and negative fraction ------------------------------------------------------


def test_spatial_cov_by_hand():
    # GM values 10, 20, 30, 40 (+ a NaN and a voxel outside the GM mask, both left out):
    # mean 25, SD (n - 1) = sqrt((15^2 + 5^2 + 5^2 + 15^2) / 3) = 12.90994 -> 0.5163978
    cbf = np.array([10.0, 20.0, 30.0, 40.0, np.nan, 1000.0])
    gm = np.array([1, 1, 1, 1, 1, 0])
    assert spatial_cov(cbf, gm) == pytest.approx(0.5163978, abs=1e-7)


def test_spatial_cov_undefined():
    assert spatial_cov([5.0, 7.0], [1, 0]) is None  # one voxel
    assert spatial_cov([-5.0, 3.0], [1, 1]) is None  # mean -1: no perfusion image
    assert spatial_cov([0.0, 0.0], [1, 1]) is None
    with pytest.raises(ValueError, match="shape"):
        spatial_cov([1.0, 2.0], [1, 1, 1])


def test_negative_fraction_by_hand():
    # GM: -5, 0, 10, -1, 20 (0 is not negative) -> 2/5; the -7 is outside GM, NaN left out
    cbf = np.array([-5.0, 0.0, 10.0, -1.0, 20.0, -7.0, np.nan])
    gm = np.array([1, 1, 1, 1, 1, 0, 1])
    assert negative_fraction(cbf, gm) == 0.4
    assert negative_fraction(cbf, np.zeros(7)) is None


# --- QEI -------------------------------------------------------------------------------------


def test_qei_index_by_hand():
    # rho 1, D 0, N 0: cbrt(1 - exp(-3.0126)) = cbrt(1 - 0.0491637) = 0.9833360
    assert qei_index(1.0, 0.0, 0.0) == pytest.approx(0.9833360, abs=1e-7)
    # rho 0.5: 1 - exp(-3.0126 * 0.5^2.4419) = 0.4256075
    # D 4:     exp(-0.0544 * 4^0.9272)       = 0.8214279
    # N 0.04:  exp(-2.8478 * 0.04^0.5196)    = 0.5858236   -> cbrt(product) = 0.5894521
    assert qei_index(0.5, 4.0, 0.04) == pytest.approx(0.5894521, abs=1e-7)
    assert qei_index(-0.3, 0.0, 0.0) == 0.0  # negative correlation counts as 0
    assert qei_index(1.0, math.inf, 0.0) == 0.0


def test_qei_perfect_map_near_one(phantom):
    pgm, pwm, pcsf, mask, perfect, _ = phantom
    parts = qei_components(perfect, pgm, pwm, pcsf, mask, zooms=ZOOMS)
    # Reported: rho 0.9959, D 0.064, N 0, QEI 0.9814 (the ceiling, rho = 1, D = 0, is 0.9833).
    assert parts["similarity"] > 0.99
    assert parts["negative"] == 0.0
    assert 0.975 < parts["qei"] < 0.98334
    # The correlation and the negative fraction do not depend on the CBF scale.
    scaled = qei_components(2 * perfect, pgm, pwm, pcsf, mask, zooms=ZOOMS)
    assert scaled["similarity"] == pytest.approx(parts["similarity"])
    assert scaled["negative"] == parts["negative"]


def test_qei_noise_near_zero(phantom):
    pgm, pwm, pcsf, mask, _, noise = phantom
    # Zero-mean noise (SD 20): rho 0.024, D 144, N 0.49 -> QEI 0.0058.
    assert qei(20 * noise, pgm, pwm, pcsf, mask, zooms=ZOOMS) < 0.01
    # Flat 10 + noise: no tissue contrast, rho 0.13 -> QEI 0.23, below the 0.5 cut-off. (Over
    # ASLPrep's domain, the non-zero smoothed CBF, rho would be 0.63 and the QEI 0.71.)
    assert qei(10 + 20 * noise, pgm, pwm, pcsf, mask, zooms=ZOOMS) < 0.3


def test_qei_decreases_with_noise(phantom):
    pgm, pwm, pcsf, mask, perfect, noise = phantom
    sds = [0, 10, 20, 40, 80, 160]
    values = [qei(perfect + sd * noise, pgm, pwm, pcsf, mask, zooms=ZOOMS) for sd in sds]
    # Reported: 0.981, 0.978, 0.966, 0.920, 0.720, 0.316.
    assert all(a > b for a, b in pairwise(values)), values
    assert values[0] > 0.975 and values[-1] < 0.5


def test_qei_undefined_and_bad_input(phantom):
    pgm, pwm, pcsf, mask, perfect, _ = phantom
    no_gm = np.minimum(pgm, 0.5)  # no voxel above the 0.9 GM threshold
    assert qei(perfect, no_gm, pwm, pcsf, mask, zooms=ZOOMS) is None
    with pytest.raises(ValueError, match="zooms"):
        qei(perfect, pgm, pwm, pcsf, mask, zooms=(3.0, 3.0))
    with pytest.raises(ValueError, match="same shape"):
        qei(perfect[:-1], pgm, pwm, pcsf, mask, zooms=ZOOMS)


# --- motion ----------------------------------------------------------------------------------


def test_motion_summary_first_row_na():
    fd = [np.nan, 0.1, 0.3, 0.2]  # mean 0.2, max 0.3 over the three defined rows
    rmsd = [np.nan, 0.05, 0.15, 0.1]  # mean 0.1
    summary = motion_summary(fd, rmsd)
    assert summary["mean_fd"] == pytest.approx(0.2)
    assert summary["max_fd"] == pytest.approx(0.3)
    assert summary["mean_rmsd"] == pytest.approx(0.1)


def test_motion_summary_not_estimated():
    all_na = motion_summary([np.nan] * 5, [np.nan] * 5)  # registration skipped
    assert all_na == {"mean_fd": None, "max_fd": None, "mean_rmsd": None}
    assert motion_summary(None, None) == all_na
    assert motion_summary([np.nan], [np.nan]) == all_na  # a single volume


# --- the row, the TSV and the sidecar --------------------------------------------------------


def test_qc_row_single_delay(phantom):
    pgm, pwm, pcsf, mask, perfect, _ = phantom
    row = qc_row(
        perfect, mask, pgm, pwm, pcsf, zooms=ZOOMS,
        fd=[np.nan, 0.2, 0.4], rmsd=[np.nan, 0.1, 0.1], pairs_used=8, pairs_removed=0,
        coregistration={"Dice": 0.9712, "Path": "scanner geometry"},
    )  # fmt: skip
    assert list(row) == list(COLUMNS)
    record = tissue_cbf(perfect, pgm, pwm, mask)
    assert row["gm_cbf"] == record["MeanCBFGM"]
    assert row["wm_cbf"] == record["MeanCBFWM"]
    assert row["gm_wm_ratio"] == record["GMWMRatio"]
    assert row["mean_fd"] == pytest.approx(0.3) and row["max_fd"] == pytest.approx(0.4)
    assert row["pairs_used"] == 8 and row["pairs_removed"] == 0
    assert row["gm_negative_percent"] == 0.0
    assert 0 < row["gm_spatial_cov"] < 0.2  # GM voxels of pGM 0.7-1: CBF 49-60
    assert row["qei"] > 0.97
    assert row["coregistration_dice"] == 0.9712
    for name in ("normalization_correlation", "median_att", "fit_failed_percent"):
        assert row[name] is None


def test_qc_row_multi_delay():
    shape = (4, 1, 1)
    mask = np.array([1, 1, 1, 0]).reshape(shape)
    pgm = np.full(shape, 0.95)
    att = np.array([1.0, 1.4, 9.0, 2.0]).reshape(shape)  # 9.0 failed, 2.0 outside the brain
    failed = np.array([0, 0, 1, 0]).reshape(shape)
    cbf = np.array([50.0, -10.0, 60.0, 0.0]).reshape(shape)
    row = qc_row(
        cbf, mask, pgm, 1 - pgm, np.zeros(shape), zooms=ZOOMS, att=att, fit_failed=failed,
        normalization={"Correlation": 0.91},
    )  # fmt: skip
    assert row["median_att"] == pytest.approx(1.2)  # median of 1.0 and 1.4
    assert row["fit_failed_percent"] == pytest.approx(100 / 3)  # 1 of 3 brain voxels
    assert row["gm_negative_percent"] == pytest.approx(100 / 3)  # -10 of 50, -10, 60
    assert row["normalization_correlation"] == 0.91
    assert row["mean_fd"] is None and row["pairs_used"] is None
    with pytest.raises(ValueError, match="pairs_used"):
        qc_row(cbf, mask, pgm, 1 - pgm, np.zeros(shape), zooms=ZOOMS, pairs_used=-1)


def test_tsv_round_trip_with_na(tmp_path, phantom):
    pgm, pwm, pcsf, mask, perfect, _ = phantom
    row = qc_row(perfect, mask, pgm, pwm, pcsf, zooms=ZOOMS, fd=[np.nan, 0.25], pairs_used=8)
    row["pairs_removed"] = 2
    path = tmp_path / "sub-01_desc-qualitycontrol_cbf.tsv"
    write_qc_tsv([row], path)
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == list(COLUMNS)
    fields = dict(zip(COLUMNS, lines[1].split("\t"), strict=True))
    assert fields["mean_fd"] == "0.250000"
    assert fields["pairs_used"] == "8" and fields["pairs_removed"] == "2"
    assert fields["mean_rmsd"] == "n/a" and fields["median_att"] == "n/a"

    (back,) = read_qc_tsv(path)
    assert list(back) == list(COLUMNS)
    for name, value in row.items():
        if value is None:
            assert back[name] is None, name
        elif name in ("pairs_used", "pairs_removed"):
            assert back[name] == value and isinstance(back[name], int)
        else:
            assert back[name] == pytest.approx(value, abs=5e-7), name


def test_tsv_rejects_incomplete_rows(tmp_path):
    row = dict.fromkeys(COLUMNS)
    write_qc_tsv([row], tmp_path / "ok.tsv")
    assert read_qc_tsv(tmp_path / "ok.tsv") == [row]  # all n/a
    with pytest.raises(ValueError, match="missing"):
        write_qc_tsv([{k: v for k, v in row.items() if k != "qei"}], tmp_path / "a.tsv")
    with pytest.raises(ValueError, match="unknown"):
        write_qc_tsv([{**row, "sub": "01"}], tmp_path / "b.tsv")


def test_every_column_documented():
    sidecar = qc_sidecar("T1w segmentation")
    json.dumps(sidecar)  # serializable as is
    assert sidecar["TissueSource"] == "T1w segmentation"
    assert sidecar["QEIParameters"]["SmoothingFWHM"] == {"Value": 5.0, "Units": "mm"}
    for name in COLUMNS:
        entry = sidecar[name]
        assert entry["Description"].strip(), name
        assert entry["Units"].strip(), name
        assert set(entry) <= {"Description", "Units", "Reference"}, name
        if "Reference" in entry:
            assert "doi:10." in entry["Reference"], name
    for name in ("mean_fd", "max_fd", "mean_rmsd"):
        assert sidecar[name]["Units"] == "mm"
    assert sidecar["gm_cbf"]["Units"] == sidecar["wm_cbf"]["Units"] == "mL/100 g/min"
    assert "10.1002/jmri.29308" in sidecar["qei"]["Reference"]
    assert "10.1177/0271678X16683690" in sidecar["gm_spatial_cov"]["Reference"]
    # The sidecar is a copy: editing it leaves COLUMNS alone.
    sidecar["qei"]["Units"] = "changed"
    assert COLUMNS["qei"]["Units"] == "1"
    assert qc_sidecar("MNI152NLin2009aSym tissue priors (no T1w)")["TissueSource"].startswith(
        "MNI152NLin2009aSym"
    )
