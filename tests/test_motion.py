"""Motion parameters, framewise displacement and RMS deviation (aslprep_lite.quant.motion)."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from aslprep_lite.quant.motion import (
    framewise_displacement,
    image_center,
    matrix_to_parameters,
    parameters_to_matrix,
    rms_deviation,
)

CENTER = np.array([1.5, -12.0, 20.0])


def _rigid(rotvec: np.ndarray, translation: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    out[:3, 3] = translation
    return out


def test_framewise_displacement_hand_computed() -> None:
    params = np.array(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # 1 mm in x
            [1.0, -2.0, 0.0, 0.01, 0.0, 0.0],  # 2 mm in y + 0.01 rad
            [1.0, -2.0, 0.5, 0.01, -0.02, 0.0],  # 0.5 mm in z + 0.02 rad
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # back to start
        ]
    )
    fd = framewise_displacement(params)
    assert np.isnan(fd[0])
    # 1; 2 + 50 * 0.01; 0.5 + 50 * 0.02; 3.5 + 50 * 0.03
    np.testing.assert_allclose(fd[1:], [1.0, 2.5, 1.5, 5.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        framewise_displacement(params, radius=80.0)[1:], [1.0, 2.8, 2.1, 5.9], atol=1e-12
    )
    assert np.isnan(framewise_displacement(params[:1])).all()


def test_parameter_convention_matches_extrinsic_xyz() -> None:
    # R = Rz @ Ry @ Rx is scipy's extrinsic "xyz" sequence; checked independently here.
    angles = np.array([0.1, -0.2, 0.3])
    params = np.r_[0.0, 0.0, 0.0, angles]
    matrix = parameters_to_matrix(params, np.zeros(3))[0]
    expected = Rotation.from_euler("xyz", angles).as_matrix()
    np.testing.assert_allclose(matrix[:3, :3], expected, atol=1e-15)
    # A positive rot_z turns +x towards +y (right-handed about +z).
    rz = parameters_to_matrix([0, 0, 0, 0, 0, np.pi / 2], np.zeros(3))[0]
    np.testing.assert_allclose(rz[:3, :3] @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-15)


def test_translation_is_reported_about_center() -> None:
    rotation = _rigid(np.array([0.0, 0.0, 0.05]), np.zeros(3))
    # A rotation about the origin moves the centre by R c - c...
    params = matrix_to_parameters(rotation[None], CENTER)[0]
    np.testing.assert_allclose(params[:3], rotation[:3, :3] @ CENTER - CENTER, atol=1e-12)
    np.testing.assert_allclose(params[3:], [0.0, 0.0, 0.05], atol=1e-15)
    # ...while the same rotation about the centre reads as zero translation.
    about_center = parameters_to_matrix([0, 0, 0, 0, 0, 0.05], CENTER)[0]
    np.testing.assert_allclose(about_center[:3, :3] @ CENTER + about_center[:3, 3], CENTER)
    # Pure translations are the same whatever the centre.
    shift = _rigid(np.zeros(3), np.array([2.0, 0.0, 0.0]))
    np.testing.assert_allclose(
        matrix_to_parameters(shift[None], CENTER)[0], [2, 0, 0, 0, 0, 0], atol=1e-15
    )


def test_parameters_matrix_round_trip() -> None:
    rng = np.random.default_rng(7)
    params = np.column_stack(
        [rng.uniform(-20, 20, (50, 3)), rng.uniform(-1.2, 1.2, (50, 3))]  # |rot_y| < pi/2
    )
    matrices = parameters_to_matrix(params, CENTER)
    rot = matrices[:, :3, :3]
    np.testing.assert_allclose(
        rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-14
    )
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-14)
    np.testing.assert_allclose(matrices[:, 3], np.tile([0, 0, 0, 1.0], (50, 1)))
    np.testing.assert_allclose(matrix_to_parameters(matrices, CENTER), params, atol=1e-12)
    # And matrix -> parameters -> matrix for arbitrary rigid transforms.
    rigid = np.stack([_rigid(rng.normal(0, 0.3, 3), rng.normal(0, 10, 3)) for _ in range(20)])
    back = parameters_to_matrix(matrix_to_parameters(rigid, CENTER), CENTER)
    np.testing.assert_allclose(back, rigid, atol=1e-12)


def test_rms_deviation_matches_monte_carlo() -> None:
    rng = np.random.default_rng(2024)
    matrices = np.stack(
        [np.eye(4)] + [_rigid(rng.normal(0, 0.03, 3), rng.normal(0, 1.5, 3)) for _ in range(4)]
    )
    radius = 80.0
    rms = rms_deviation(matrices, CENTER, radius=radius)
    assert np.isnan(rms[0])

    # Points uniform in the ball: isotropic direction, radius R * U**(1/3).
    n = 400_000
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    points = CENTER + direction * radius * rng.random((n, 1)) ** (1.0 / 3.0)
    homogeneous = np.c_[points, np.ones(n)]
    for t in range(1, len(matrices)):
        relative = matrices[t] @ np.linalg.inv(matrices[t - 1])
        squared = ((homogeneous @ relative.T)[:, :3] - points) ** 2
        squared = squared.sum(axis=1)
        # The Monte-Carlo mean square carries a standard error std/sqrt(n); 5 of those is a
        # tolerance a correct closed form fails with probability < 1e-6 (and the seed is fixed).
        tolerance = 5.0 * squared.std() / np.sqrt(n)
        assert abs(rms[t] ** 2 - squared.mean()) < tolerance
        assert tolerance < 0.01 * squared.mean()  # the check is not vacuous


def test_rms_deviation_special_cases() -> None:
    shift = _rigid(np.zeros(3), np.array([3.0, 4.0, 0.0]))
    rms = rms_deviation(np.stack([np.eye(4), np.eye(4), shift, shift]), CENTER)
    np.testing.assert_allclose(rms[1:], [0.0, 5.0, 0.0], atol=1e-12)
    # A rotation about the sphere centre moves points by |A r|; mean over the ball is
    # (R^2 / 5) * ||A||_F^2 = (R^2 / 5) * 4 (1 - cos(theta)) for a rotation by theta.
    theta = 0.02
    spin = parameters_to_matrix([0, 0, 0, 0, 0, theta], CENTER)[0]
    rms = rms_deviation(np.stack([np.eye(4), spin]), CENTER, radius=50.0)
    assert rms[1] == pytest.approx(np.sqrt(50.0**2 / 5 * 4 * (1 - np.cos(theta))), rel=1e-12)


def test_image_center() -> None:
    affine = np.array([[-3.5, 0, 0, 100.0], [0, 3.5, 0, -120.0], [0, 0, 5.0, -40.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(
        image_center((40, 40, 20, 7), affine), [100 - 3.5 * 19.5, -120 + 3.5 * 19.5, -40 + 47.5]
    )
