"""Head-motion summaries from rigid world-space transforms (pure numpy).

Conventions shared by every function here:

* A transform is a 4x4 matrix ``M`` in NIfTI RAS+ world millimetres that maps a point of the
  *reference* image to the same anatomical point in volume ``t``: ``x_t = M @ x_ref``. A head
  that moved 2 mm towards the subject's right (+x in RAS) therefore gives ``M[0, 3] = +2``.
* Six motion parameters per volume are ``trans_x, trans_y, trans_z`` (mm) and
  ``rot_x, rot_y, rot_z`` (radians), all about RAS axes. The rotation part is
  ``R = Rz(rot_z) @ Ry(rot_y) @ Rx(rot_x)`` (rotate about x first, then y, then z, in the fixed
  world frame). Translations are reported about ``center`` (the reference image centre), so a
  pure rotation of the head about its own middle reads as zero translation instead of the
  large lever-arm shift that a rotation about the scanner origin would imply.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Head motion is estimated only with at least this many control/label volumes: the
#: registration targets are their means.
MIN_REGISTERED_VOLUMES = 2


def estimates_motion(context: Sequence[str]) -> bool:
    """Whether head-motion correction registers a series of these volume types."""
    return sum(kind in ("control", "label") for kind in context) >= MIN_REGISTERED_VOLUMES


__all__ = [
    "PARAMETER_NAMES",
    "framewise_displacement",
    "image_center",
    "matrix_to_parameters",
    "parameters_to_matrix",
    "rms_deviation",
]

#: Column names of :func:`matrix_to_parameters` (BIDS/fMRIPrep confounds spelling).
PARAMETER_NAMES = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")


def image_center(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """Return the world (RAS mm) coordinate of the centre of an image grid.

    Parameters
    ----------
    shape : tuple of int
        Image shape; only the first three entries are used.
    affine : ndarray, shape (4, 4)
        Voxel-to-world (RAS+) affine.

    Returns
    -------
    ndarray, shape (3,)
        ``affine @ ((shape - 1) / 2)``, the middle of the voxel-centre grid.
    """
    ijk = (np.asarray(shape[:3], dtype=float) - 1.0) / 2.0
    affine = np.asarray(affine, dtype=float)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def _check_matrices(matrices: np.ndarray) -> np.ndarray:
    matrices = np.asarray(matrices, dtype=float)
    if matrices.ndim != 3 or matrices.shape[1:] != (4, 4):
        raise ValueError(f"expected matrices of shape (T, 4, 4), got {matrices.shape}")
    return matrices


def matrix_to_parameters(matrices: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Convert rigid RAS world transforms to six motion parameters.

    Parameters
    ----------
    matrices : ndarray, shape (T, 4, 4)
        Reference-world to volume-world transforms (RAS+ mm). The 3x3 block must be a rotation.
    center : ndarray, shape (3,)
        Point (RAS mm, usually the reference image centre) about which translations are
        reported.

    Returns
    -------
    ndarray, shape (T, 6)
        Columns ``trans_x, trans_y, trans_z`` (mm) and ``rot_x, rot_y, rot_z`` (rad), with
        ``R = Rz @ Ry @ Rx`` and ``t = R @ c + M[:3, 3] - c`` (the displacement of ``center``).
        ``rot_y`` lies in [-pi/2, pi/2]; head motion is far from that gimbal-lock limit.
    """
    matrices = _check_matrices(matrices)
    c = np.asarray(center, dtype=float).reshape(3)
    rot = matrices[:, :3, :3]
    trans = rot @ c + matrices[:, :3, 3] - c
    # R = Rz(g) Ry(b) Rx(a):  R[2,0] = -sin b, R[2,1] = cos b sin a, R[2,2] = cos b cos a,
    # R[1,0] = sin g cos b, R[0,0] = cos g cos b.  atan2 with hypot keeps b accurate near 0,
    # where arcsin would lose precision.
    rot_x = np.arctan2(rot[:, 2, 1], rot[:, 2, 2])
    rot_y = np.arctan2(-rot[:, 2, 0], np.hypot(rot[:, 2, 1], rot[:, 2, 2]))
    rot_z = np.arctan2(rot[:, 1, 0], rot[:, 0, 0])
    return np.column_stack([trans, rot_x, rot_y, rot_z])


def parameters_to_matrix(params: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Build rigid RAS world transforms from six motion parameters (inverse of
    :func:`matrix_to_parameters`).

    Parameters
    ----------
    params : ndarray, shape (T, 6) or (6,)
        ``trans_x, trans_y, trans_z`` (mm, about ``center``), ``rot_x, rot_y, rot_z`` (rad).
    center : ndarray, shape (3,)
        Point (RAS mm) about which the translations are expressed.

    Returns
    -------
    ndarray, shape (T, 4, 4)
        Matrices with ``R = Rz @ Ry @ Rx`` and ``M[:3, 3] = t + c - R @ c``.
    """
    params = np.atleast_2d(np.asarray(params, dtype=float))
    if params.shape[1] != 6:
        raise ValueError(f"expected parameters of shape (T, 6), got {params.shape}")
    c = np.asarray(center, dtype=float).reshape(3)
    ca, cb, cg = np.cos(params[:, 3:]).T
    sa, sb, sg = np.sin(params[:, 3:]).T
    rot = np.empty((params.shape[0], 3, 3))
    # Closed-form product Rz(g) @ Ry(b) @ Rx(a), written out to stay vectorised over T.
    rot[:, 0, 0] = cg * cb
    rot[:, 0, 1] = cg * sb * sa - sg * ca
    rot[:, 0, 2] = cg * sb * ca + sg * sa
    rot[:, 1, 0] = sg * cb
    rot[:, 1, 1] = sg * sb * sa + cg * ca
    rot[:, 1, 2] = sg * sb * ca - cg * sa
    rot[:, 2, 0] = -sb
    rot[:, 2, 1] = cb * sa
    rot[:, 2, 2] = cb * ca
    out = np.zeros((params.shape[0], 4, 4))
    out[:, :3, :3] = rot
    out[:, :3, 3] = params[:, :3] + c - rot @ c
    out[:, 3, 3] = 1.0
    return out


def framewise_displacement(params: np.ndarray, radius: float = 50.0) -> np.ndarray:
    """Framewise displacement of Power et al. (2012).

    ``FD_t = |dx| + |dy| + |dz| + radius * (|da| + |db| + |dg|)`` where ``d`` is the change
    from volume ``t-1`` to ``t``; rotations are turned into arc length on a sphere of
    ``radius`` mm (50 mm approximates the distance from the cortex to the centre of the head).

    Parameters
    ----------
    params : ndarray, shape (T, 6)
        Motion parameters as returned by :func:`matrix_to_parameters` (mm, rad).
    radius : float, optional
        Head radius in mm, default 50.

    Returns
    -------
    ndarray, shape (T,)
        FD in mm; the first value is NaN (no previous volume).

    References
    ----------
    Power JD, Barnes KA, Snyder AZ, Schlaggar BL, Petersen SE (2012). Spurious but systematic
    correlations in functional connectivity MRI networks arise from subject motion.
    NeuroImage 59(3):2142-2154. doi:10.1016/j.neuroimage.2011.10.018
    """
    params = np.asarray(params, dtype=float)
    if params.ndim != 2 or params.shape[1] != 6:
        raise ValueError(f"expected parameters of shape (T, 6), got {params.shape}")
    fd = np.full(params.shape[0], np.nan)
    if params.shape[0] > 1:
        delta = np.abs(np.diff(params, axis=0))
        fd[1:] = delta[:, :3].sum(axis=1) + radius * delta[:, 3:].sum(axis=1)
    return fd


def rms_deviation(matrices: np.ndarray, center: np.ndarray, radius: float = 80.0) -> np.ndarray:
    """Relative RMS displacement between consecutive volumes (Jenkinson 2002).

    For the relative transform ``M = M_t @ inv(M_{t-1}) = [[A + I, t], [0, 1]]`` the mean
    squared displacement of the points of a solid sphere of radius ``R`` centred at ``c`` is,
    in closed form, ``(R**2 / 5) * trace(A.T @ A) + (t + A @ c).T @ (t + A @ c)`` (the
    ``R**2 / 5`` is the second moment of a uniform ball). This is the ``rel`` RMS reported by
    FSL MCFLIRT.

    Parameters
    ----------
    matrices : ndarray, shape (T, 4, 4)
        Reference-world to volume-world transforms (RAS+ mm).
    center : ndarray, shape (3,)
        Centre of the sphere (RAS mm), usually the reference image centre.
    radius : float, optional
        Sphere radius in mm, default 80 (MCFLIRT's default).

    Returns
    -------
    ndarray, shape (T,)
        RMS displacement in mm; the first value is NaN.

    References
    ----------
    Jenkinson M (1999, rev. 2002). Measuring transformation error by RMS deviation.
    FMRIB Technical Report TR99MJ1, University of Oxford.
    Jenkinson M, Bannister P, Brady M, Smith S (2002). Improved optimization for the robust and
    accurate linear registration and motion correction of brain images. NeuroImage
    17(2):825-841. doi:10.1006/nimg.2002.1132
    """
    matrices = _check_matrices(matrices)
    c = np.asarray(center, dtype=float).reshape(3)
    rms = np.full(matrices.shape[0], np.nan)
    if matrices.shape[0] > 1:
        rel = matrices[1:] @ np.linalg.inv(matrices[:-1])
        a = rel[:, :3, :3] - np.eye(3)
        shift = rel[:, :3, 3] + a @ c
        msd = (radius**2 / 5.0) * np.einsum("tij,tij->t", a, a) + np.einsum(
            "ti,ti->t", shift, shift
        )
        # Clip guards against -0.0/round-off before the square root.
        rms[1:] = np.sqrt(np.clip(msd, 0.0, None))
    return rms
