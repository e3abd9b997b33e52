"""Tests of ``aslprep_lite.quant.warps``: grids, sampling, deformations, ITK files, resampling.

Every mapping maps reference-world points to moving-world points (RAS mm); ITK files hold the
same mapping in LPS. The grids are small (a few thousand voxels) so the module runs in ~2 s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from aslprep_lite.quant import warps
from aslprep_lite.quant.warps import (
    Deformation,
    apply_affine,
    coarse_grid,
    grid_points,
    resample_many,
    resample_through,
    sample,
)

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS


def _rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    """``Rz Ry Rx`` of three angles in degrees."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _matrix(linear: np.ndarray, translation: tuple[float, float, float]) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = translation
    return out


#: An oblique grid with a left-handed (LAS-like) voxel axis order: 3 mm voxels.
GRID_SHAPE = (16, 18, 14)
GRID_AFFINE = _matrix(
    _rotation((5.0, 0.0, 10.0)) @ np.diag([-3.0, 3.0, 3.0]), (20.0, -30.0, -18.0)
)
#: A reference -> moving affine: a few degrees, a few percent, a few mm.
MAPPING = _matrix(_rotation((3.0, -2.0, 4.0)) @ np.diag([1.04, 0.97, 1.02]), (2.5, -4.0, 1.5))


def _inside_points(shape: tuple[int, ...], affine: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` random world points strictly inside the hull of a grid's voxel centres."""
    rng = np.random.default_rng(seed)
    ijk = rng.uniform(0.01, np.asarray(shape) - 1.01, size=(n, 3))
    return apply_affine(affine, ijk)


def _bump_deformation() -> Deformation:
    """:data:`MAPPING` plus a smooth Gaussian bump of up to 3 mm, on :data:`GRID_AFFINE`."""
    points = grid_points(GRID_SHAPE, GRID_AFFINE)
    centre = points.reshape(-1, 3).mean(axis=0)
    bump = np.exp(-((points - centre) ** 2).sum(axis=-1) / (2 * 9.0**2))[..., None]
    coords = apply_affine(MAPPING, points) + bump * np.array([3.0, -2.0, 1.5])
    return Deformation(coords.astype(np.float32), GRID_AFFINE)


# ----------------------------------------------------------------------------- grid basics
def test_grid_points_hand_values() -> None:
    """grid_points gives ``affine @ (i, j, k, 1)`` for every voxel, with axes permuted."""
    affine = np.array(
        [[0.0, 0.0, 2.0, 10.0], [3.0, 0.0, 0.0, -5.0], [0.0, -1.0, 0.0, 7.0], [0, 0, 0, 1]]
    )
    points = grid_points((4, 4, 4), affine)
    assert points.shape == (4, 4, 4, 3)
    np.testing.assert_array_equal(points[0, 0, 0], [10.0, -5.0, 7.0])
    np.testing.assert_array_equal(points[1, 2, 3], [16.0, -2.0, 5.0])
    np.testing.assert_array_equal(points[3, 0, 1], [12.0, 4.0, 7.0])
    ijk = np.stack(np.indices((4, 4, 4)), axis=-1).reshape(-1, 3)
    expected = np.c_[ijk, np.ones(len(ijk))] @ affine.T
    np.testing.assert_allclose(points.reshape(-1, 3), expected[:, :3])


def test_apply_affine_hand_values() -> None:
    """apply_affine maps ``(..., 3)`` arrays point by point and keeps their shape."""
    matrix = _matrix(np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]), (1, 2, 3))
    points = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]])  # shape (1, 2, 3)
    out = apply_affine(matrix, points)
    assert out.shape == (1, 2, 3)
    np.testing.assert_array_equal(out, [[[1.0, 3.0, 3.0], [0.0, 2.0, 5.0]]])
    assert apply_affine(np.eye(4), np.zeros(3)).shape == (3,)


def test_sample_linear_image_exact_inside_zero_outside() -> None:
    """Trilinear sampling of a linear image is exact inside the grid; outside gives cval."""
    affine = _matrix(_rotation((0.0, 0.0, 30.0)) @ np.diag([2.0, 2.5, 3.0]), (-4.0, 1.0, 6.0))
    slope, offset = np.array([0.7, -1.3, 2.1]), 5.0
    data = grid_points((4, 4, 4), affine) @ slope + offset
    points = _inside_points((4, 4, 4), affine, 200, seed=1)
    np.testing.assert_allclose(sample(data, affine, points), points @ slope + offset, atol=1e-4)
    # On voxel centres nearest-neighbour and trilinear agree.
    centres = grid_points((4, 4, 4), affine)[1:3, 0:2, 2]
    np.testing.assert_allclose(sample(data, affine, centres, order=0), data[1:3, 0:2, 2], 1e-6)
    # Beyond the outermost voxel centres (even by a fraction of a voxel): cval.
    outside = apply_affine(affine, np.array([[-0.3, 1, 1], [1, 3.2, 1], [1, 1, -2.0], [9, 9, 9]]))
    np.testing.assert_array_equal(sample(data, affine, outside), 0.0)
    np.testing.assert_array_equal(sample(data, affine, outside, cval=-1.0), -1.0)


# ------------------------------------------------------------------------------ Deformation
def test_from_affine_interpolates_the_affine_exactly() -> None:
    """A sampled affine, evaluated at off-grid points inside the grid, is the affine itself."""
    deformation = Deformation.from_affine(MAPPING, GRID_SHAPE, GRID_AFFINE)
    assert deformation.shape == GRID_SHAPE
    assert deformation.coords.dtype == np.float32
    np.testing.assert_allclose(
        deformation.coords, apply_affine(MAPPING, grid_points(GRID_SHAPE, GRID_AFFINE)), atol=1e-4
    )
    points = _inside_points(GRID_SHAPE, GRID_AFFINE, 500, seed=2)
    np.testing.assert_allclose(deformation(points), apply_affine(MAPPING, points), atol=1e-4)
    # Points of any shape (..., 3).
    assert deformation(points.reshape(5, 100, 3)).shape == (5, 100, 3)


def test_outside_the_grid_the_edge_displacement_is_used() -> None:
    """Beyond the grid the displacement of the nearest edge voxel is extrapolated as constant.

    That is exact for a translation (constant displacement) and, for any other affine, off
    by ``(A - I)`` times the distance to the grid: documented behaviour, not a bug.
    """
    rng = np.random.default_rng(3)
    ijk = rng.uniform(-6.0, np.asarray(GRID_SHAPE) + 5.0, size=(400, 3))  # ~half outside
    points = apply_affine(GRID_AFFINE, ijk)
    assert np.any((ijk < 0) | (ijk > np.asarray(GRID_SHAPE) - 1))

    translation = _matrix(np.eye(3), (4.0, -7.5, 2.25))
    moved = Deformation.from_affine(translation, GRID_SHAPE, GRID_AFFINE)(points)
    np.testing.assert_allclose(moved, apply_affine(translation, points), atol=1e-4)

    general = Deformation.from_affine(MAPPING, GRID_SHAPE, GRID_AFFINE)(points)
    edge = apply_affine(GRID_AFFINE, np.clip(ijk, 0, np.asarray(GRID_SHAPE) - 1))
    expected = points + apply_affine(MAPPING, edge) - edge  # p + displacement at the edge
    np.testing.assert_allclose(general, expected, atol=1e-4)
    outside = np.any((ijk < 0) | (ijk > np.asarray(GRID_SHAPE) - 1), axis=1)
    assert np.abs(general - apply_affine(MAPPING, points))[outside].max() > 0.1


def test_then_applies_the_matrix_after_the_deformation() -> None:
    """``d.then(M)`` maps ``p`` to ``M @ d(p)`` (not ``d(M @ p)``), at off-grid points too."""
    deformation = _bump_deformation()
    matrix = _matrix(_rotation((-4.0, 6.0, 2.0)), (-3.0, 5.0, 8.0))
    chained = deformation.then(matrix)
    np.testing.assert_allclose(
        chained.coords, apply_affine(matrix, deformation.coords), rtol=1e-6, atol=1e-4
    )
    np.testing.assert_array_equal(chained.affine, deformation.affine)
    points = _inside_points(GRID_SHAPE, GRID_AFFINE, 300, seed=4)
    expected = apply_affine(matrix, deformation(points))
    np.testing.assert_allclose(chained(points), expected, atol=1e-3)
    wrong_order = deformation(apply_affine(matrix, points))
    assert np.abs(chained(points) - wrong_order).max() > 1.0


def test_nifti_round_trip(tmp_path: Path) -> None:
    """to_nifti / from_nifti keep the coordinates bit for bit and the grid affine."""
    deformation = _bump_deformation()
    deformation.to_nifti(tmp_path / "y.nii.gz")
    back = Deformation.from_nifti(tmp_path / "y.nii.gz")
    np.testing.assert_array_equal(back.coords, deformation.coords)
    np.testing.assert_allclose(back.affine, deformation.affine, atol=1e-5)


# ---------------------------------------------------------------------------------- ITK files
def test_itk_round_trip_same_grid(tmp_path: Path) -> None:
    """A deformation written as an ITK displacement field reads back within 1e-4 mm."""
    deformation = _bump_deformation()
    path = tmp_path / "from-A_to-B_mode-image_xfm.h5"
    deformation.to_itk_file(path)
    transform = sitk.ReadTransform(str(path))
    assert transform.GetName() == "CompositeTransform"
    back = Deformation.from_itk_file(path, GRID_SHAPE, GRID_AFFINE)
    assert np.abs(back.coords - deformation.coords).max() < 1e-4
    # ITK itself, in LPS, gives the same moving point for a voxel centre.
    voxel = (5, 7, 3)
    point_lps = FLIP[:3, :3] @ grid_points(GRID_SHAPE, GRID_AFFINE)[voxel]
    moved_ras = FLIP[:3, :3] @ np.asarray(transform.TransformPoint(point_lps.tolist()))
    np.testing.assert_allclose(moved_ras, deformation.coords[voxel], atol=1e-4)


def test_itk_read_on_a_finer_shifted_grid(tmp_path: Path) -> None:
    """Read on a finer, shifted grid inside the field, the file matches ``__call__``."""
    deformation = _bump_deformation()
    path = tmp_path / "xfm.h5"
    deformation.to_itk_file(path)
    # Half the voxel size, origin moved off the coarse voxel centres, inside the coarse hull.
    start = np.array([2.2, 3.1, 1.7])
    fine_affine = GRID_AFFINE @ _matrix(np.diag([0.5, 0.5, 0.5]), tuple(start))
    fine_shape = tuple(int(n) for n in np.floor((np.asarray(GRID_SHAPE) - 1 - start) * 2) - 1)
    fine = Deformation.from_itk_file(path, fine_shape, fine_affine)
    expected = deformation(grid_points(fine_shape, fine_affine))
    error = np.abs(fine.coords - expected).max()
    assert error < 1e-3, error


@pytest.mark.parametrize("suffix", [".txt", ".h5"])
def test_itk_affine_file_is_read_as_the_ras_matrix(tmp_path: Path, suffix: str) -> None:
    """An ITK (LPS) affine file reads as ``F @ M_lps @ F`` in RAS, F = diag(-1, -1, 1, 1)."""
    linear = _rotation((6.0, -3.0, 9.0)) @ np.diag([1.05, 0.95, 1.1])
    centre, translation = np.array([10.0, -20.0, 15.0]), np.array([3.0, -6.0, 4.5])
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(linear.ravel().tolist())
    transform.SetCenter(centre.tolist())
    transform.SetTranslation(translation.tolist())
    path = tmp_path / f"affine{suffix}"
    sitk.WriteTransform(transform, str(path))
    m_lps = _matrix(linear, tuple(translation + centre - linear @ centre))
    ras = FLIP @ m_lps @ FLIP
    read = Deformation.from_itk_file(path, GRID_SHAPE, GRID_AFFINE)
    expected = apply_affine(ras, grid_points(GRID_SHAPE, GRID_AFFINE))
    np.testing.assert_allclose(read.coords, expected, atol=1e-4)


def test_itk_composite_order_matches_then(tmp_path: Path) -> None:
    """An ITK composite [affine, field] (the last one applied first) reads as ``d.then(M)``."""
    deformation = _bump_deformation()
    deformation.to_itk_file(tmp_path / "field.h5")
    field = sitk.CompositeTransform(sitk.ReadTransform(str(tmp_path / "field.h5")))
    matrix = _matrix(_rotation((-4.0, 6.0, 2.0)), (-3.0, 5.0, 8.0))
    lps = FLIP @ matrix @ FLIP
    composite = sitk.CompositeTransform(
        [sitk.AffineTransform(lps[:3, :3].ravel().tolist(), lps[:3, 3].tolist())]
    )
    composite.AddTransform(field.GetNthTransform(0))  # the displacement field, applied first
    sitk.WriteTransform(composite, str(tmp_path / "chain.h5"))
    read = Deformation.from_itk_file(tmp_path / "chain.h5", GRID_SHAPE, GRID_AFFINE)
    assert np.abs(read.coords - deformation.then(matrix).coords).max() < 1e-4


# ------------------------------------------------------------------------------- resampling
def _smooth_image(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) * 100 + 50).astype(np.float32)


def test_resample_through_matrix_equals_scipy_affine_transform() -> None:
    """Through a 4x4 matrix, resample_through is scipy's affine_transform of the voxel map."""
    data = _smooth_image((20, 22, 18), seed=5)
    data_affine = _matrix(_rotation((0.0, 8.0, 0.0)) @ np.diag([2.0, 2.0, 2.5]), (-20, -22, -20))
    ref_shape = (17, 19, 16)
    ref_affine = _matrix(_rotation((-5.0, 0.0, 12.0)) @ np.diag([2.5, 2.2, 2.4]), (-18, -20, -17))
    mapping = _matrix(_rotation((0.0, 0.0, 7.0)), (3.0, -2.0, 1.5))
    out = resample_through(data, data_affine, mapping, ref_shape, ref_affine)
    voxel_map = np.linalg.inv(data_affine) @ mapping @ ref_affine
    expected = ndimage.affine_transform(
        data, voxel_map[:3, :3], voxel_map[:3, 3], ref_shape, order=1, mode="constant", cval=0.0
    )
    assert out.dtype == np.float32 and out.shape == ref_shape
    assert np.count_nonzero(expected) > 0.5 * expected.size
    np.testing.assert_allclose(out, expected, atol=1e-3)


def test_resample_through_slabs_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slabbing the first axis (one plane per slab here) changes nothing, matrix or field."""
    data = _smooth_image(GRID_SHAPE, seed=6)
    ref_shape = (15, 17, 12)
    ref_affine = GRID_AFFINE @ _matrix(np.eye(3), (0.4, 0.3, 0.9))
    deformation = _bump_deformation()
    whole_matrix = resample_through(data, GRID_AFFINE, MAPPING, ref_shape, ref_affine)
    field = Deformation(deformation.coords, GRID_AFFINE)
    whole_field = resample_through(data, GRID_AFFINE, field, ref_shape, ref_affine)
    monkeypatch.setattr(warps, "_SLAB_POINTS", 50)  # < one plane: 15 slabs
    slab_matrix = resample_through(data, GRID_AFFINE, MAPPING, ref_shape, ref_affine)
    slab_field = resample_through(data, GRID_AFFINE, field, ref_shape, ref_affine)
    np.testing.assert_allclose(slab_matrix, whole_matrix, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(slab_field, whole_field, rtol=1e-6, atol=1e-5)
    assert np.count_nonzero(whole_field) > 0.5 * whole_field.size


def test_translation_by_one_voxel_shifts_the_image() -> None:
    """A translation by one voxel along the first axis reads the next voxel, 0 past the edge."""
    data = _smooth_image(GRID_SHAPE, seed=7)
    shift = _matrix(np.eye(3), tuple(GRID_AFFINE[:3, 0]))  # one voxel along i, in mm
    out = resample_through(data, GRID_AFFINE, shift, GRID_SHAPE, GRID_AFFINE)
    # Voxels read from the grid's faces are left out: see test_identity_keeps_the_grid_faces.
    inner = (slice(1, -1), slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(out[:-2, 1:-1, 1:-1], data[inner], atol=1e-3)
    np.testing.assert_array_equal(out[-1], 0.0)
    # The same through a Deformation, and nearest-neighbour gives the same voxels.
    field = Deformation.from_affine(shift, GRID_SHAPE, GRID_AFFINE)
    out_field = resample_through(data, GRID_AFFINE, field, GRID_SHAPE, GRID_AFFINE, order=0)
    np.testing.assert_allclose(out_field[:-2, 1:-1, 1:-1], data[inner], atol=1e-3)


def test_identity_keeps_the_grid_faces() -> None:
    """Resampling onto the image's own oblique grid through the identity returns the image.

    Fails today: about 7 % of these voxels (1 % of the 2 mm synthetic T1w grid, all on its
    faces) come back as 0, because ``inv(affine) @ affine @ ijk`` is ``-1e-15`` or
    ``n - 1 + 1e-15`` there and ``mode="constant"`` drops anything past the edge centres.
    """
    data = _smooth_image(GRID_SHAPE, seed=7)
    out = resample_through(data, GRID_AFFINE, np.eye(4), GRID_SHAPE, GRID_AFFINE)
    np.testing.assert_allclose(out, data, atol=1e-3)


# ----------------------------------------------------------------------------- coarse grid
@pytest.mark.parametrize(
    ("zooms", "expected_zooms"),
    [
        ((1.0, 1.0, 1.0), (2.0, 2.0, 2.0)),
        ((0.9, 0.9, 1.2), (1.8, 1.8, 2.4)),
        ((3.0,) * 3, (3.0,) * 3),
    ],
)
def test_coarse_grid_keeps_the_centre(
    zooms: tuple[float, ...], expected_zooms: tuple[float, ...]
) -> None:
    """The coarse grid has ~2 mm voxels (integer factors), the same axes and the same centre."""
    shape = (91, 110, 95)
    affine = _matrix(_rotation((5.0, 0.0, 0.0)) @ np.diag([1.0, -1.0, -1.0]) @ np.diag(zooms),
                     (-40.0, 60.0, 70.0))  # fmt: skip
    new_shape, new_affine = coarse_grid(shape, affine)
    new_zooms = np.linalg.norm(new_affine[:3, :3], axis=0)
    np.testing.assert_allclose(new_zooms, expected_zooms)
    factors = np.asarray(expected_zooms) / np.asarray(zooms)
    assert new_shape == tuple(int(np.ceil(n / f)) for n, f in zip(shape, factors, strict=True))
    # Same directions.
    np.testing.assert_allclose(new_affine[:3, :3] / new_zooms, affine[:3, :3] / zooms)
    centre = apply_affine(affine, (np.asarray(shape) - 1) / 2)
    new_centre = apply_affine(new_affine, (np.asarray(new_shape) - 1) / 2)
    np.testing.assert_allclose(new_centre, centre, atol=1e-9)
    # The field of view is covered to within one coarse voxel on each side.
    fov = np.asarray(shape) * zooms
    new_fov = np.asarray(new_shape) * new_zooms
    assert np.all(new_fov >= fov - 1e-9) and np.all(new_fov - fov < new_zooms)


def test_resample_many_maps_the_points_once_with_the_same_values() -> None:
    """Several images through one deformation: each exactly as sampled at the mapped points
    one by one, and the deformation evaluated once per slab, not once per image."""
    images = [_smooth_image(GRID_SHAPE, seed=s) for s in (6, 7, 8)]
    ref_shape = (15, 17, 12)
    ref_affine = GRID_AFFINE @ _matrix(np.eye(3), (0.4, 0.3, 0.9))
    field = _bump_deformation()
    calls = []

    class Counted(Deformation):
        def __call__(self, points):
            calls.append(points.shape)
            return super().__call__(points)

    counted = Counted(field.coords, field.affine)
    together = resample_many(images, GRID_AFFINE, counted, ref_shape, ref_affine)
    assert len(calls) == 1  # one slab here, for the three images
    moved = field(grid_points(ref_shape, ref_affine))
    for image, out in zip(images, together, strict=True):
        np.testing.assert_array_equal(out, sample(image, GRID_AFFINE, moved))
        np.testing.assert_array_equal(
            out, resample_through(image, GRID_AFFINE, field, ref_shape, ref_affine)
        )
