"""Tests of the synthetic anatomy: true transforms, partial volume and the T1w in the dataset.

The subject uses a 2 mm T1w (sampled from the res-2 template) to keep the module fast; the
1 mm subject is the same code on a finer grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from aslprep_lite import synthetic
from aslprep_lite.synthetic import (
    ANATOMY_ASL_SHAPE,
    ANATOMY_ASL_ZOOMS,
    SyntheticSpec,
    SyntheticTruth,
    write_dataset,
)
from aslprep_lite.synthetic_anatomy import (
    AnatomySpec,
    SyntheticAnatomy,
    make_anatomy,
    rigid_matrix,
)
from aslprep_lite.templates import get_template

ANATOMY = AnatomySpec(seed=3, t1w_zooms=(2.0, 2.0, 2.0))
SPEC = SyntheticSpec(subject="01", anatomy=ANATOMY)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticTruth]:
    root = tmp_path_factory.mktemp("anatomy")
    (truth,) = write_dataset(root, [SPEC])
    return root, truth


@pytest.fixture(scope="module")
def truth(written: tuple[Path, SyntheticTruth]) -> SyntheticTruth:
    return written[1]


@pytest.fixture(scope="module")
def anatomy(truth: SyntheticTruth) -> SyntheticAnatomy:
    assert truth.anatomy is not None
    return truth.anatomy


@pytest.fixture(scope="module")
def fractions(anatomy: SyntheticAnatomy, truth: SyntheticTruth) -> dict[str, np.ndarray]:
    return anatomy.fractions_on(truth.spec.shape, truth.affine, anatomy.asl_to_t1w)


def _world(affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(affine, np.argwhere(mask))


def test_inverse_round_trips(anatomy: SyntheticAnatomy) -> None:
    # Subject -> template -> subject over the true brain (every third 2 mm voxel).
    x = _world(anatomy.affine, anatomy.brain_mask)[::3]
    y = anatomy.subject_to_template(x)
    assert np.abs(anatomy.template_to_subject(y) - x).max() < 0.01
    # Template -> subject -> template over the template's brain.
    _, affine = anatomy.template_grid(2)
    y = _world(affine, anatomy.template_map("mask", 2) > 0)[::3]
    assert np.abs(anatomy.subject_to_template(anatomy.template_to_subject(y)) - y).max() < 0.01
    assert anatomy.inverse_residual_mm < 1e-3
    # The warp is not trivial: the nonlinear part reaches most of max_disp_mm.
    nonlinear = y - (anatomy.template_to_subject(y) @ anatomy.matrix.T + anatomy.shift)
    assert 0.5 * ANATOMY.max_disp_mm < np.abs(nonlinear).max() <= ANATOMY.max_disp_mm + 1e-6


def test_same_seed_same_mapping_at_any_resolution(anatomy: SyntheticAnatomy) -> None:
    coarse = make_anatomy(AnatomySpec(seed=ANATOMY.seed, t1w_zooms=(4.0, 4.0, 4.0)))
    points = _world(anatomy.affine, anatomy.brain_mask)[::50]
    assert coarse.shape == (44, 64, 64)
    np.testing.assert_allclose(
        coarse.subject_to_template(points), anatomy.subject_to_template(points), atol=1e-9
    )


def test_t1w_grid_and_contrast(anatomy: SyntheticAnatomy) -> None:
    assert anatomy.shape == (88, 128, 128)  # the 176 x 256 x 256 mm field of view at 2 mm
    assert nib.aff2axcodes(anatomy.affine) == ("R", "P", "I")
    t1w = np.asarray(anatomy.t1w.dataobj)
    dseg = anatomy.dseg
    csf, gm, wm = (float(np.median(t1w[dseg == label])) for label in (1, 2, 3))
    assert csf < gm < wm
    assert float(np.median(t1w[anatomy.scalp > 0])) > gm  # bright scalp
    # The brain is the template's (1.89 L) scaled by the affine's 1 / det(M) (the warp's
    # Jacobian averages to about 1 over the brain).
    template_volume = (anatomy.template_map("mask", 1) > 0).sum() * 1.0
    expected = template_volume / abs(np.linalg.det(anatomy.matrix))
    assert anatomy.brain_mask.sum() * 8.0 == pytest.approx(expected, rel=0.02)


def test_fractions_on_asl_grid(
    anatomy: SyntheticAnatomy, truth: SyntheticTruth, fractions: dict[str, np.ndarray]
) -> None:
    spec = truth.spec
    assert spec.shape == ANATOMY_ASL_SHAPE and spec.zooms == ANATOMY_ASL_ZOOMS
    total = sum(fractions.values())
    assert min(value.min() for value in fractions.values()) >= 0.0
    assert total.max() <= 1.0 + 1e-6
    # Partial volume keeps the tissue volumes of the T1w grid (both sample the same maps).
    asl_voxel, t1w_voxel = float(np.prod(spec.zooms)), float(np.prod(ANATOMY.t1w_zooms))
    for name in ("gm", "wm", "csf"):
        on_t1w = getattr(anatomy, name).sum(dtype=np.float64) * t1w_voxel
        assert fractions[name].sum() * asl_voxel == pytest.approx(on_t1w, rel=0.01)
    # The whole brain lies inside the ASL field of view.
    brain = fractions["gm"] + fractions["wm"] + fractions["csf"]
    for axis in range(3):
        assert np.take(brain, [0, -1], axis=axis).max() == 0.0
    # The truth of the series is made from these fractions.
    np.testing.assert_allclose(truth.cbf, 60.0 * fractions["gm"] + 20.0 * fractions["wm"])


def test_asl_to_t1w_direction(
    anatomy: SyntheticAnatomy, truth: SyntheticTruth, fractions: dict[str, np.ndarray]
) -> None:
    np.testing.assert_allclose(truth.asl_to_t1w, rigid_matrix(ANATOMY.asl_rigid))
    # Same rotation convention as the motion of the ASL simulator.
    np.testing.assert_allclose(
        rigid_matrix(ANATOMY.asl_rigid), synthetic._rigid_matrix(np.array([ANATOMY.asl_rigid]))[0]
    )
    # The T1w-grid GM map brought to the ASL grid with asl_to_t1w lines up with the ASL truth;
    # the inverse matrix (the wrong direction) or no motion at all does not.

    def correlation(asl_to_t1w: np.ndarray) -> float:
        vox = np.linalg.inv(anatomy.affine) @ asl_to_t1w @ truth.affine
        gm = ndimage.affine_transform(
            anatomy.gm, vox[:3, :3], vox[:3, 3], output_shape=truth.spec.shape, order=1
        )
        mask = truth.brain_mask
        return float(np.corrcoef(gm[mask], fractions["gm"][mask])[0, 1])

    assert correlation(truth.asl_to_t1w) > 0.99
    assert correlation(np.linalg.inv(truth.asl_to_t1w)) < 0.6
    assert correlation(np.eye(4)) < 0.8


def test_in_template_transports_coordinates_exactly(
    anatomy: SyntheticAnatomy, truth: SyntheticTruth
) -> None:
    # A map linear in the T1w world coordinate is reproduced exactly by trilinear
    # interpolation, so in_template must return that coordinate at x = inverse(y).
    ijk = np.indices(truth.spec.shape).reshape(3, -1).T
    asl_world = nib.affines.apply_affine(truth.affine, ijk)
    t1w_world = nib.affines.apply_affine(truth.asl_to_t1w, asl_world)
    shape, affine = anatomy.template_grid(2)
    inside = anatomy.template_map("mask", 2) > 0
    inside[1::2] = False  # every other sagittal plane of the brain is plenty
    x = anatomy.template_to_subject(_world(affine, inside))
    for axis in range(3):
        asl_map = t1w_world[:, axis].reshape(truth.spec.shape)
        in_template = truth.in_template(asl_map, res=2)
        assert in_template.shape == shape
        assert np.abs(in_template[inside] - x[:, axis]).max() < 1e-3


def test_in_template_cbf_matches_template_truth(
    anatomy: SyntheticAnatomy, truth: SyntheticTruth
) -> None:
    cbf = truth.in_template(truth.cbf, res=2)
    gm, wm = truth.template_gm(2), anatomy.template_map("wm", 2)
    expected = truth.template_cbf(2)
    np.testing.assert_array_equal(expected, 60.0 * gm.astype(float) + 20.0 * wm.astype(float))
    gm_file = get_template("MNI152NLin2009aSym", resolution=2, label="GM", suffix="probseg")
    np.testing.assert_array_equal(gm, nib.load(gm_file).get_fdata(dtype=np.float32))
    mask = anatomy.template_map("mask", 2) > 0

    # 1. Averaging over ASL voxels and trilinear interpolation both conserve integrals, and
    #    the warp's Jacobian cancels between the two resamplings: the total CBF is kept.
    assert cbf.sum() == pytest.approx(expected.sum(), rel=0.005)
    # 2. Voxel by voxel the ASL truth is the template truth seen through the ASL point spread:
    #    a box of the voxel size w (variance w^2 / 12) then trilinear interpolation back
    #    (a tent of half-width w, variance w^2 / 6), i.e. a Gaussian of sigma ~ w / 2
    #    (1.75, 1.75, 2.0 mm = 0.875, 0.875, 1.0 template voxels).
    sigma = np.asarray(truth.spec.zooms) / 2.0 / 2.0
    blurred = ndimage.gaussian_filter(expected, sigma)
    assert np.abs(cbf - blurred)[mask].mean() < 1.5  # mL/100 g/min; unblurred it is ~5.6
    assert np.corrcoef(cbf[mask], blurred[mask])[0, 1] > 0.98
    # 3. Far from any tissue boundary (6 mm inside WM > 95 %) there is no partial volume.
    deep_wm = ndimage.binary_erosion(wm > 0.95, iterations=3)
    assert deep_wm.sum() > 500
    assert cbf[deep_wm].mean() == pytest.approx(expected[deep_wm].mean(), abs=0.5)
    assert np.abs(cbf[deep_wm] - 20.0).max() < 1.5


def test_dataset_has_the_t1w(written: tuple[Path, SyntheticTruth], anatomy: SyntheticAnatomy):
    root, _ = written
    t1w_file = root / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    image = nib.load(t1w_file)
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(anatomy.t1w.dataobj))
    np.testing.assert_allclose(image.affine, anatomy.affine, atol=1e-5)
    sidecar = json.loads(t1w_file.with_name("sub-01_T1w.json").read_text())
    assert sidecar["MRAcquisitionType"] == "3D"
    assert sidecar["MagneticFieldStrength"] == 3.0


def test_rewrite_is_byte_identical(written: tuple[Path, SyntheticTruth], tmp_path: Path) -> None:
    root, _ = written
    write_dataset(tmp_path, [SPEC])
    first, second = _files(root), _files(tmp_path)
    assert "sub-01/anat/sub-01_T1w.nii.gz" in first
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_datasets_without_anatomy_are_unchanged(tmp_path: Path) -> None:
    spec = SyntheticSpec()
    assert spec.anatomy is None and spec.shape == (32, 32, 12) and spec.zooms == (3.5, 3.5, 5.0)
    (truth,) = write_dataset(tmp_path, [spec])
    assert not (tmp_path / "sub-01" / "anat").exists()
    assert truth.anatomy is None
    phantom = synthetic._phantom(spec.shape)
    np.testing.assert_array_equal(truth.affine, synthetic._affine(spec.shape, spec.zooms))
    np.testing.assert_array_equal(truth.cbf, 60.0 * phantom["gm"] + 20.0 * phantom["wm"])
    with pytest.raises(ValueError, match="no anatomy"):
        truth.in_template(truth.cbf)


def test_asl_grid_defaults_and_checks() -> None:
    assert SyntheticSpec(anatomy=ANATOMY).shape == ANATOMY_ASL_SHAPE
    explicit = SyntheticSpec(anatomy=ANATOMY, shape=(40, 48, 30), zooms=(4.0, 4.5, 5.0))
    assert (explicit.shape, explicit.zooms) == ((40, 48, 30), (4.0, 4.5, 5.0))
    assert AnatomySpec().template_res == 1 and ANATOMY.template_res == 2
    with pytest.raises(ValueError, match="different anatomies"):
        write_dataset(
            Path("/nonexistent"),
            [SyntheticSpec(run=1, anatomy=ANATOMY), SyntheticSpec(run=2, anatomy=AnatomySpec())],
        )
    with pytest.raises(ValueError, match="anatomy must be"):
        SyntheticSpec(anatomy="yes")  # type: ignore[arg-type]
