"""A synthetic subject whose anatomy is the MNI152NLin2009aSym template moved by a known warp.

The anatomy pipeline (T1w preprocessing, normalization to the template, ASL -> T1w
coregistration, outputs in template space) needs a subject whose mapping to the template is
known exactly. :func:`make_anatomy` builds one from the template files that
:func:`aslprep_lite.templates.get_template` serves (the embedded home by default):

* **true mapping** (subject T1w world -> template world, RAS mm)::

      y = M x + b + d(x)

  ``M`` is a random affine (rotations of 3-6 degrees about each axis, per-axis scaling by
  0.90-0.95 or its inverse), ``b`` a shift of up to 5 mm per axis and ``d`` a smooth random
  displacement field of at most ``max_disp_mm``: Gaussian noise on a coarse 5 x 6 x 6 lattice,
  upsampled by cubic splines to a lattice of about 4 mm spacing, and *defined* everywhere as
  the trilinear interpolation of that lattice, so that ``d`` is a function of the world point
  only and the same seed gives the same anatomy at every T1w resolution;
* **tissue truth**: the subject's GM, WM, CSF and brain-mask maps are the template's sampled at
  ``y(x)`` (trilinear), with ``CSF = clip(mask - GM - WM, 0, 1)`` on the template grid; GM, WM
  and CSF are therefore fractions that sum to at most 1;
* **T1w**: the template T1w inside its brain mask (the embedded template is skull-stripped),
  plus a dark skull band (0-7 mm from the brain) and a bright scalp band (the next 5 mm), both
  edges modulated by +-1.5 mm, air outside; smoothed by a Gaussian of 0.6 mm, multiplied by a
  smooth bias field (+-20 %) and given Rician noise (sigma = 2 % of the median WM intensity).
  The grid covers the field of view of a 176 x 256 x 256 sagittal MPRAGE at 1 mm (axis codes
  R, P, I, tilted 5 degrees about x) at any ``t1w_zooms``;
* **ASL frame**: the head moves between the T1w and the ASL scans by the rigid transform
  ``asl_rigid``. The ASL world point ``p`` is the T1w world point ``asl_to_t1w @ p`` with::

      asl_to_t1w = [[R, t], [0, 1]]      R = Rz(rz) Ry(ry) Rx(rx), t = (tx, ty, tz)

  (rotations about the world origin, the same convention as the motion of
  :mod:`aslprep_lite.synthetic`). ``asl_to_t1w`` is what ASL -> T1w coregistration must find
  when it reports a map of ASL world coordinates to T1w world coordinates; ITK-style
  registration with the T1w as fixed image reports its inverse (T1w point -> ASL point).

The inverse mapping (template -> subject) has no closed form; :meth:`SyntheticAnatomy.\
template_to_subject` solves ``y = M x + b + d(x)`` by the fixed-point iteration
``x <- M^-1 (y - b - d(x))``: a contraction because ``d`` is small and smooth (each step
shrinks the error about 7-fold with the default 5 mm warp), iterated to 1e-5 mm and checked.

:mod:`aslprep_lite.synthetic` uses this module when a :class:`~aslprep_lite.synthetic.\
SyntheticSpec` has an ``anatomy``: the ASL tissue fractions then come from
:meth:`SyntheticAnatomy.fractions_on` and the dataset gets the subject's T1w.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

__all__ = [
    "REFERENCE_SHAPE",
    "TEMPLATE",
    "AnatomySpec",
    "SyntheticAnatomy",
    "make_anatomy",
    "rigid_matrix",
    "t1w_grid",
]

#: The template the subject is made from.
TEMPLATE = "MNI152NLin2009aSym"
#: The T1w matrix at 1 mm; its field of view (mm) is kept at every ``t1w_zooms``.
REFERENCE_SHAPE = (176, 256, 256)

_TEMPLATE_QUERIES = {
    "t1w": {"suffix": "T1w"},
    "mask": {"desc": "brain", "suffix": "mask"},
    "gm": {"label": "GM", "suffix": "probseg"},
    "wm": {"label": "WM", "suffix": "probseg"},
}
_TEMPLATE_NAMES = {
    "t1w": "T1w",
    "mask": "desc-brain_mask",
    "gm": "label-GM_probseg",
    "wm": "label-WM_probseg",
}
_FOV_CENTRE = np.array([0.0, -15.0, 5.0])  # mm: the head extends below the brain
_OBLIQUE_DEG = 5.0  # tilt of the sagittal slab about x
# Centre of the bounding box of the res-1 template brain mask (MNI mm). A constant, so that
# the ASL grid does not depend on the template resolution that was sampled.
_BRAIN_CENTRE_TEMPLATE = np.array([0.0, -17.0, 5.0])
_DISP_COARSE = (5, 6, 6)
_WOBBLE_COARSE = (4, 5, 5)
_BIAS_COARSE = (3, 4, 4)
_WOBBLE_MM = 1.5
_BIAS_AMPLITUDE = 0.2
_SKULL_MM = 7.0  # outer edge of the skull band, from the brain
_SCALP_MM = 12.0  # outer edge of the scalp band
_SKULL_LEVEL = 0.05  # x median WM intensity
_SCALP_LEVEL = 0.8
_HEAD_SIGMA_MM = 0.6
_NOISE_FRACTION = 0.02  # Rician sigma / median WM intensity
_CHUNK = 1 << 20  # points per vectorised block (bounds the memory of 1 mm grids)
_INVERSE_TOL_MM = 1e-5
_INVERSE_MAX_ITER = 60
_INVERSE_CHECK_MM = 1e-3  # residual |fwd(inv(y)) - y| above which the inverse is refused


@dataclass(frozen=True)
class AnatomySpec:
    """Parameters of one synthetic anatomy (hashable, like :class:`SyntheticSpec`).

    Attributes
    ----------
    seed : int
        Seed of the random generator (affine, warp, head bands, bias field, noise). Two
        subjects with the same spec have the same anatomy: give them different seeds.
    t1w_zooms : tuple of float
        T1w voxel size (mm). The matrix covers the 176 x 256 x 256 mm field of view of the
        1 mm reference (``round(fov / zoom)`` voxels per axis).
    max_disp_mm : float
        Largest displacement of the nonlinear part ``d`` (mm, per component).
    asl_rigid : tuple of float
        Head motion between the T1w and the ASL scans: (tx, ty, tz) in mm and (rx, ry, rz) in
        degrees of ``asl_to_t1w`` (see the module docstring).
    template_res : int or None
        Resolution (1 or 2 mm) of the template maps the subject is sampled from. None (the
        default) picks 1 for a T1w finer than 1.5 mm, else 2: point samples of the 2 mm maps
        (the means of 2 x 2 x 2 blocks of the 1 mm maps) suit a 2 mm T1w and load faster.
    """

    seed: int = 0
    t1w_zooms: tuple[float, float, float] = (1.0, 1.0, 1.0)
    max_disp_mm: float = 5.0
    asl_rigid: tuple[float, float, float, float, float, float] = (2.0, -3.0, 1.5, 2.0, -1.5, 3.0)
    template_res: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "t1w_zooms", tuple(float(z) for z in self.t1w_zooms))
        object.__setattr__(self, "asl_rigid", tuple(float(v) for v in self.asl_rigid))
        if self.template_res is None and len(self.t1w_zooms) == 3:
            object.__setattr__(self, "template_res", 1 if min(self.t1w_zooms) < 1.5 else 2)
        checks = [
            (len(self.t1w_zooms) == 3 and min(self.t1w_zooms) > 0, "t1w_zooms: 3 sizes > 0"),
            (max(self.t1w_zooms) <= 4.0, "t1w_zooms must be <= 4 mm"),
            (self.max_disp_mm >= 0, "max_disp_mm must be >= 0"),
            (len(self.asl_rigid) == 6, "asl_rigid must be (tx, ty, tz, rx, ry, rz)"),
            (self.template_res in (1, 2), "template_res must be 1 or 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"AnatomySpec: {message}")

    @property
    def asl_to_t1w(self) -> NDArray[np.float64]:
        """(4, 4) RAS matrix mapping ASL world coordinates to T1w world coordinates."""
        return rigid_matrix(self.asl_rigid)


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
def _rotation(angles_deg: Sequence[float]) -> NDArray[np.float64]:
    """Rotation matrix ``Rz Ry Rx`` from three angles (degrees) about x, y and z."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid_matrix(params: Sequence[float]) -> NDArray[np.float64]:
    """(4, 4) RAS matrix ``p -> R p + t`` of ``(tx, ty, tz [mm], rx, ry, rz [deg])``.

    ``R = Rz Ry Rx`` (rotations about the world origin), as in :mod:`aslprep_lite.synthetic`.
    """
    matrix = np.eye(4)
    matrix[:3, :3] = _rotation(params[3:6])
    matrix[:3, 3] = params[:3]
    return matrix


def t1w_grid(
    zooms: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[tuple[int, int, int], NDArray[np.float64]]:
    """Shape and affine of the sagittal MPRAGE-like T1w grid at ``zooms`` (mm).

    Axis codes R, P, I tilted 5 degrees about x, centred at (0, -15, 5) mm; the field of view
    is that of :data:`REFERENCE_SHAPE` at 1 mm.
    """
    zooms_arr = np.asarray(zooms, dtype=float)
    shape = tuple(max(1, round(n / z)) for n, z in zip(REFERENCE_SHAPE, zooms_arr, strict=True))
    linear = _rotation((_OBLIQUE_DEG, 0.0, 0.0)) @ np.diag([1.0, -1.0, -1.0]) @ np.diag(zooms_arr)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = _FOV_CENTRE - linear @ ((np.asarray(shape) - 1) / 2.0)
    return (int(shape[0]), int(shape[1]), int(shape[2])), affine


_, _REFERENCE_AFFINE = t1w_grid()
_REFERENCE_INVERSE = np.linalg.inv(_REFERENCE_AFFINE)


def _apply(matrix: NDArray, points: NDArray) -> NDArray[np.float64]:
    """``matrix`` (4, 4) applied to (3, N) points."""
    return matrix[:3, :3] @ points + matrix[:3, 3:4]


def _grid_points(affine: NDArray, axes: Sequence[NDArray]) -> NDArray[np.float64]:
    """(3, N) world points of the tensor grid of voxel coordinates ``axes`` (C order)."""
    ijk = np.meshgrid(*axes, indexing="ij")
    return _apply(affine, np.stack([a.ravel() for a in ijk]).astype(np.float64))


def _slabs(n: int, per_row: int, step: int = 1) -> Iterator[slice]:
    """Slices of ``range(n)`` of about ``_CHUNK / per_row`` rows (multiples of ``step``)."""
    rows = max(step, (_CHUNK // max(1, per_row)) // step * step)
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


class _SmoothField:
    """Smooth random fields of world position, resolution-independent.

    Gaussian noise on a coarse lattice is upsampled by cubic splines (``ndimage.zoom``) to a
    lattice of about 4 mm spacing spanning the reference field of view; the field at a world
    point is the trilinear interpolation of that lattice at the point's position (constant
    beyond the field of view). Scaled so that the largest lattice value of all components is
    ``amplitude``; trilinear interpolation never exceeds it.
    """

    def __init__(
        self, rng: np.random.Generator, coarse: tuple[int, ...], n: int, amplitude: float
    ) -> None:
        mid = tuple(max(c, s // 4) for c, s in zip(coarse, REFERENCE_SHAPE, strict=True))
        lattices = []
        for _ in range(n):
            small = rng.standard_normal(coarse)
            factors = [m / c for m, c in zip(mid, coarse, strict=True)]
            lattices.append(ndimage.zoom(small, factors, order=3).astype(np.float32))
        peak = max(float(np.abs(lattice).max()) for lattice in lattices)
        scale = amplitude / peak if peak > 0 else 0.0
        self.lattices = [lattice.astype(np.float64) * scale for lattice in lattices]
        # Reference voxel -> lattice index (corners on corners, as ndimage.zoom maps them).
        self.index_scale = (np.asarray(mid) - 1.0) / (np.asarray(REFERENCE_SHAPE) - 1.0)
        spacing = 1.0 / self.index_scale  # mm between lattice nodes along the voxel axes
        # Largest difference between neighbouring nodes / spacing: the Lipschitz constant of
        # the trilinear field (per component, up to sqrt(3) over the axes).
        self.lipschitz = max(
            float(np.abs(np.diff(lat, axis=a)).max() / spacing[a])
            for lat in self.lattices
            for a in range(3)
        ) * np.sqrt(3.0)

    def __call__(self, world: NDArray) -> NDArray[np.float64]:
        """(n, N) field values at (3, N) world points."""
        coords = _apply(_REFERENCE_INVERSE, world) * self.index_scale[:, None]
        return np.stack(
            [
                ndimage.map_coordinates(lat, coords, order=1, mode="nearest")
                for lat in self.lattices
            ]
        )


@dataclass(frozen=True)
class _Template:
    """Template maps at one resolution: t1w, mask, gm, wm, csf (float32) and the affine."""

    maps: dict[str, NDArray[np.float32]]
    affine: NDArray[np.float64]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.maps["mask"].shape  # type: ignore[return-value]

    def sample(self, keys: Sequence[str], points: NDArray) -> dict[str, NDArray[np.float32]]:
        """Trilinear samples of ``keys`` at (3, N) template world points (0 outside)."""
        vox = _apply(np.linalg.inv(self.affine), points)
        return {
            key: ndimage.map_coordinates(self.maps[key], vox, order=1, cval=0.0) for key in keys
        }


def _load_template(res: int, template_dir: Path | None) -> _Template:
    """The template at ``res``: through TemplateFlow, or from ``template_dir`` when given."""
    if template_dir is None:
        # Imported here: the benchmark's other environments pass template_dir and need not
        # import templateflow.
        from aslprep_lite.templates import get_template

        files = {
            k: get_template(TEMPLATE, resolution=res, **q) for k, q in _TEMPLATE_QUERIES.items()
        }
    else:
        files = {
            k: Path(template_dir) / f"tpl-{TEMPLATE}_res-{res}_{name}.nii.gz"
            for k, name in _TEMPLATE_NAMES.items()
        }
    images = {k: nib.load(path) for k, path in files.items()}
    maps = {k: np.asarray(img.dataobj, dtype=np.float32) for k, img in images.items()}
    maps["mask"] = (maps["mask"] > 0.5).astype(np.float32)
    maps["csf"] = np.clip(maps["mask"] - maps["gm"] - maps["wm"], 0.0, 1.0)
    for value in maps.values():
        value.flags.writeable = False
    return _Template(maps=maps, affine=images["mask"].affine.astype(np.float64))


# --------------------------------------------------------------------------------------------
# The subject
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)  # eq=False: array fields make a generated __eq__ ambiguous
class SyntheticAnatomy:
    """A synthetic subject and its truth (arrays are read-only; see the module docstring).

    Attributes
    ----------
    spec : AnatomySpec
        The spec it was made from.
    t1w : nibabel.Nifti1Image
        The T1w image (float32) on the grid of :func:`t1w_grid`.
    gm, wm, csf : numpy.ndarray
        True tissue fractions on the T1w grid (float32; GM + WM + CSF <= 1).
    scalp : numpy.ndarray
        The bright scalp band on the T1w grid (float32, 0 or 1).
    brain_mask : numpy.ndarray
        True brain mask on the T1w grid (the template mask sampled at ``y(x)``, > 0.5).
    matrix, shift : numpy.ndarray
        ``M`` (3, 3) and ``b`` (3,) of the true mapping ``y = M x + b + d(x)``.
    scales, angles_deg : numpy.ndarray
        The draws that make ``M = Rz Ry Rx(angles_deg) diag(scales)``.
    asl_to_t1w : numpy.ndarray
        (4, 4) RAS matrix mapping ASL world coordinates to T1w world coordinates: the ASL
        world point ``p`` shows the head at the T1w world point ``asl_to_t1w @ p``.
    """

    spec: AnatomySpec
    t1w: nib.Nifti1Image = field(repr=False)
    gm: NDArray[np.float32] = field(repr=False)
    wm: NDArray[np.float32] = field(repr=False)
    csf: NDArray[np.float32] = field(repr=False)
    scalp: NDArray[np.float32] = field(repr=False)
    brain_mask: NDArray[np.bool_] = field(repr=False)
    matrix: NDArray[np.float64] = field(repr=False)
    shift: NDArray[np.float64] = field(repr=False)
    scales: NDArray[np.float64] = field(repr=False)
    angles_deg: NDArray[np.float64] = field(repr=False)
    asl_to_t1w: NDArray[np.float64] = field(repr=False)
    _disp: _SmoothField = field(repr=False)
    _template_dir: Path | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------------------- grids
    @property
    def affine(self) -> NDArray[np.float64]:
        """(4, 4) voxel -> RAS affine of the T1w grid."""
        return self.t1w.affine

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the T1w grid."""
        return self.t1w.shape  # type: ignore[return-value]

    @property
    def dseg(self) -> NDArray[np.uint8]:
        """Discrete truth on the T1w grid: 0 outside the brain mask, 1 CSF, 2 GM, 3 WM.

        The most probable of CSF, GM and WM inside :attr:`brain_mask` (ties: the first).
        """
        labels = np.zeros(self.shape, np.uint8)
        probs = np.stack([tissue[self.brain_mask] for tissue in (self.csf, self.gm, self.wm)])
        labels[self.brain_mask] = 1 + np.argmax(probs, axis=0).astype(np.uint8)
        return labels

    def _template(self, res: int) -> _Template:
        """The template maps at ``res`` (loaded once)."""
        key = ("template", res)
        if key not in self._cache:
            self._cache[key] = _load_template(res, self._template_dir)
        return self._cache[key]

    def template_grid(self, res: int = 2) -> tuple[tuple[int, int, int], NDArray[np.float64]]:
        """Shape and affine of the template grid at ``res`` (1 or 2 mm)."""
        tpl = self._template(res)
        return tpl.shape, tpl.affine.copy()

    def template_map(self, name: str, res: int = 2) -> NDArray[np.float32]:
        """The template's ``gm``, ``wm``, ``csf``, ``mask`` or ``t1w`` map at ``res``.

        The template's GM map is the true GM probability in template space.
        """
        return self._template(res).maps[name]

    # -------------------------------------------------------------------------- mappings
    def subject_to_template(self, points: NDArray) -> NDArray[np.float64]:
        """The true mapping ``y = M x + b + d(x)`` of T1w world points (..., 3), RAS mm."""
        points = np.asarray(points, dtype=np.float64)
        flat = points.reshape(-1, 3).T
        out = np.empty_like(flat)
        for part in _slabs(flat.shape[1], 1):
            out[:, part] = self._forward(flat[:, part])
        return out.T.reshape(points.shape)

    def _forward(self, x: NDArray) -> NDArray[np.float64]:
        """``M x + b + d(x)`` of (3, N) points."""
        return self.matrix @ x + self.shift[:, None] + self._disp(x)

    def _inverse(self, y: NDArray) -> NDArray[np.float64]:
        """Fixed-point solution of ``y = M x + b + d(x)`` for (3, N) template points."""
        inverse_matrix = np.linalg.inv(self.matrix)
        target = y - self.shift[:, None]
        x = inverse_matrix @ target
        # Iterate only the points that still move: the contraction varies with the local
        # gradient of d, and most points converge a few iterations before the slowest.
        active = np.arange(x.shape[1])
        for _ in range(_INVERSE_MAX_ITER):
            if active.size == 0:
                break
            updated = inverse_matrix @ (target[:, active] - self._disp(x[:, active]))
            moving = np.abs(updated - x[:, active]).max(axis=0) >= _INVERSE_TOL_MM
            x[:, active] = updated
            active = active[moving]
        residual = float(np.abs(self._forward(x) - y).max()) if x.size else 0.0
        if residual > _INVERSE_CHECK_MM:
            raise RuntimeError(f"template_to_subject did not converge (residual {residual} mm)")
        self._cache["inverse_residual_mm"] = max(
            residual, self._cache.get("inverse_residual_mm", 0.0)
        )
        return x

    def template_to_subject(self, points: NDArray) -> NDArray[np.float64]:
        """The inverse of :meth:`subject_to_template` for template world points (..., 3).

        Solved numerically (fixed-point iteration to 1e-5 mm); raises ``RuntimeError`` when
        ``|subject_to_template(x) - y|`` exceeds 1e-3 mm anywhere.
        """
        points = np.asarray(points, dtype=np.float64)
        flat = points.reshape(-1, 3).T
        out = np.empty_like(flat)
        for part in _slabs(flat.shape[1], 1):
            out[:, part] = self._inverse(flat[:, part])
        return out.T.reshape(points.shape)

    @property
    def inverse_residual_mm(self) -> float:
        """Largest ``|subject_to_template(x) - y|`` (mm) of the inverses computed so far."""
        return float(self._cache.get("inverse_residual_mm", 0.0))

    def _template_grid_in_subject(self, res: int) -> NDArray[np.float32]:
        """(3, N) T1w world points of the template grid voxels at ``res`` (cached)."""
        key = ("grid_in_subject", res)
        if key not in self._cache:
            shape, affine = self.template_grid(res)
            out = np.empty((3, int(np.prod(shape))), dtype=np.float32)
            per_row = shape[1] * shape[2]
            for rows in _slabs(shape[0], per_row):
                axes = [np.arange(rows.start, rows.stop), np.arange(shape[1]), np.arange(shape[2])]
                part = slice(rows.start * per_row, rows.stop * per_row)
                out[:, part] = self._inverse(_grid_points(affine, axes))
            out.flags.writeable = False
            self._cache[key] = out
        return self._cache[key]

    # ---------------------------------------------------------------------------- sampling
    def asl_affine(self, shape: Sequence[int], zooms: Sequence[float]) -> NDArray[np.float64]:
        """RAS affine (ASL world) of an axis-aligned grid centred on the subject's brain.

        The centre is the template's brain centre (0, -17, 5) mm taken back through the
        inverse of the true mapping and then into the ASL frame.
        """
        centre_t1w = self.template_to_subject(_BRAIN_CENTRE_TEMPLATE)
        centre = _apply(np.linalg.inv(self.asl_to_t1w), centre_t1w[:, None])[:, 0]
        zooms_arr = np.asarray(zooms, dtype=float)
        affine = np.diag([*zooms_arr, 1.0])
        affine[:3, 3] = centre - zooms_arr * (np.asarray(shape, dtype=float) - 1) / 2.0
        return affine

    def _lipschitz(self) -> float:
        """Upper bound of ``|y(p) - y(q)| / |p - q|`` of the true mapping."""
        return float(np.linalg.norm(self.matrix, 2)) + np.sqrt(3.0) * self._disp.lipschitz

    def _dilated(
        self, name: str, data: NDArray, affine: NDArray, radius_mm: float
    ) -> tuple[NDArray[np.uint8], NDArray[np.float64]]:
        """``data > 0`` grown by at least ``radius_mm`` (padded), and its affine (cached)."""
        zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
        half = tuple(int(np.ceil(radius_mm / z)) + 1 for z in zooms)
        key = ("dilated", name, half)
        if key not in self._cache:
            padded = np.pad((np.asarray(data) > 0).astype(np.uint8), [(h, h) for h in half])
            # A box of half-width h voxels contains the ball of radius h * zoom.
            grown = ndimage.maximum_filter(padded, size=[2 * h + 1 for h in half])
            shifted = np.asarray(affine, dtype=float).copy()
            shifted[:3, 3] -= shifted[:3, :3] @ np.asarray(half, dtype=float)
            self._cache[key] = (grown, shifted)
        return self._cache[key]

    def fractions_on(
        self,
        shape: Sequence[int],
        affine: NDArray,
        world_to_t1w: NDArray | None = None,
        supersample: int = 3,
    ) -> dict[str, NDArray[np.float64]]:
        """GM, WM, CSF and scalp fractions of the voxels of an arbitrary grid.

        Each voxel is the mean of ``supersample**3`` sub-voxel samples (partial volume): GM,
        WM and CSF are the template's at ``y(x)``, the scalp the T1w grid's scalp band
        (trilinear). The scalp is clipped so that the four fractions sum to at most 1.

        Parameters
        ----------
        shape, affine
            The grid: matrix size and voxel -> world affine.
        world_to_t1w
            (4, 4) map of the grid's world coordinates to T1w world coordinates: None (the
            identity) for a grid in the T1w frame, :attr:`asl_to_t1w` for an ASL grid.
        supersample
            Sub-samples per voxel and axis.

        Returns
        -------
        dict
            ``gm``, ``wm``, ``csf`` and ``scalp`` arrays of ``shape`` (float64, read-only;
            the same grid again returns the same arrays, e.g. for several runs of a subject).
        """
        shape = tuple(int(n) for n in shape)
        s = int(supersample)
        to_t1w = np.eye(4) if world_to_t1w is None else np.asarray(world_to_t1w, dtype=float)
        grid_to_t1w = to_t1w @ np.asarray(affine, dtype=float)
        key = ("fractions", shape, grid_to_t1w.tobytes(), s)
        if key not in self._cache:
            self._cache[key] = self._fractions(shape, grid_to_t1w, s)
        return dict(self._cache[key])

    def _fractions(
        self, shape: tuple[int, ...], grid_to_t1w: NDArray, s: int
    ) -> dict[str, NDArray[np.float64]]:
        """:meth:`fractions_on` of the grid whose voxels map to T1w world by ``grid_to_t1w``."""
        grid_to_scalp = np.linalg.inv(self.affine) @ grid_to_t1w  # grid voxel -> T1w voxel
        res = self.spec.template_res
        tpl = self._template(res)
        # Sub-voxel offsets (grid voxel units) and the farthest a sub-sample lies from its
        # voxel centre in the T1w world.
        steps = (np.arange(s) + 0.5) / s - 0.5
        offsets = np.stack([g.ravel() for g in np.meshgrid(steps, steps, steps, indexing="ij")])
        reach = float(np.linalg.norm(grid_to_t1w[:3, :3] @ offsets, axis=0).max())

        # Only voxels whose centre lies near tissue (resp. scalp) can hold any: sampling the
        # sub-voxels of the others would return zeros. The margins bound how far a sub-sample
        # moves from its centre, plus the reach of trilinear and nearest-voxel sampling.
        tissue = tpl.maps["gm"] + tpl.maps["wm"] + tpl.maps["csf"]
        tissue_radius = self._lipschitz() * reach + 1.5 * np.sqrt(3.0) * res + 0.5
        near_tissue = self._dilated(f"tissue-{res}", tissue, tpl.affine, tissue_radius)
        t1w_zoom = max(self.spec.t1w_zooms)
        scalp_radius = reach + 1.5 * np.sqrt(3.0) * t1w_zoom + 0.5
        near_scalp = self._dilated("scalp", self.scalp, self.affine, scalp_radius)

        centres = np.stack(
            [g.ravel() for g in np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")]
        ).astype(np.float64)
        candidates = {key: np.zeros(centres.shape[1], bool) for key in ("tissue", "scalp")}
        for part in _slabs(centres.shape[1], 1):
            world = _apply(grid_to_t1w, centres[:, part])
            for key, (grown, grown_affine), points in (
                ("tissue", near_tissue, self._forward(world)),
                ("scalp", near_scalp, world),
            ):
                vox = _apply(np.linalg.inv(grown_affine), points)
                candidates[key][part] = ndimage.map_coordinates(grown, vox, order=0, cval=0) > 0

        out = {key: np.zeros(int(np.prod(shape))) for key in ("gm", "wm", "csf", "scalp")}
        n_sub = offsets.shape[1]
        for group, keys in (("tissue", ("gm", "wm", "csf")), ("scalp", ("scalp",))):
            voxels = np.flatnonzero(candidates[group])
            for part in _slabs(voxels.size, n_sub):
                index = voxels[part]
                sub = (centres[:, index, None] + offsets[:, None, :]).reshape(3, -1)
                if group == "tissue":
                    samples = tpl.sample(keys, self._forward(_apply(grid_to_t1w, sub)))
                else:
                    samples = {
                        "scalp": ndimage.map_coordinates(
                            self.scalp, _apply(grid_to_scalp, sub), order=1, cval=0.0
                        )
                    }
                for key in keys:
                    out[key][index] = (
                        samples[key].reshape(index.size, n_sub).mean(axis=1, dtype=np.float64)
                    )
        fractions = {key: value.reshape(shape) for key, value in out.items()}
        total = fractions["gm"] + fractions["wm"] + fractions["csf"]
        fractions["scalp"] = np.minimum(fractions["scalp"], np.clip(1.0 - total, 0.0, None))
        for value in fractions.values():
            value.flags.writeable = False
        return fractions

    def to_template(
        self,
        data: NDArray,
        affine: NDArray,
        res: int = 2,
        world_to_t1w: NDArray | None = None,
        cval: float = 0.0,
    ) -> NDArray[np.float64]:
        """Resample a map to the template grid at ``res`` through the true transforms.

        Template voxel -> template world point ``y`` -> T1w world point ``x`` (numerical
        inverse of the true mapping) -> the map's world point ``world_to_t1w^-1 x`` -> its
        voxel, trilinear interpolation (``cval`` outside the map).

        Parameters
        ----------
        data
            (X, Y, Z) map.
        affine
            Voxel -> world affine of ``data``.
        res
            Template resolution (1 or 2 mm).
        world_to_t1w
            As in :meth:`fractions_on`: None for a map in the T1w frame, :attr:`asl_to_t1w`
            for a map on an ASL grid.
        cval
            Value outside the map's grid.

        Returns
        -------
        numpy.ndarray
            The map on the template grid (float64).
        """
        to_t1w = np.eye(4) if world_to_t1w is None else np.asarray(world_to_t1w, dtype=float)
        t1w_to_vox = np.linalg.inv(to_t1w @ np.asarray(affine, dtype=float))
        points = self._template_grid_in_subject(res)
        values = np.asarray(data, dtype=np.float64)
        out = np.empty(points.shape[1])
        for part in _slabs(points.shape[1], 1):
            vox = _apply(t1w_to_vox, points[:, part].astype(np.float64))
            out[part] = ndimage.map_coordinates(values, vox, order=1, cval=cval)
        return out.reshape(self.template_grid(res)[0])


def _on_grid(
    shape: tuple[int, int, int],
    affine: NDArray,
    evaluate: Callable[[NDArray], dict[str, NDArray]],
    keys: Sequence[str],
) -> dict[str, NDArray[np.float32]]:
    """``evaluate`` (world points -> named values) on every voxel of a grid, in blocks."""
    out = {key: np.empty(shape, dtype=np.float32) for key in keys}
    per_row = shape[1] * shape[2]
    for rows in _slabs(shape[0], per_row):
        axes = [np.arange(rows.start, rows.stop), np.arange(shape[1]), np.arange(shape[2])]
        values = evaluate(_grid_points(affine, axes))
        for key in keys:
            out[key][rows] = values[key].reshape(rows.stop - rows.start, shape[1], shape[2])
    return out


def make_anatomy(
    spec: AnatomySpec | None = None, template_dir: str | Path | None = None
) -> SyntheticAnatomy:
    """Build the synthetic subject of ``spec`` (see the module docstring).

    Parameters
    ----------
    spec
        The anatomy (default: ``AnatomySpec()``).
    template_dir
        A ``tpl-MNI152NLin2009aSym`` folder to read the template from instead of
        :func:`aslprep_lite.templates.get_template` (the benchmark's other environments).

    Returns
    -------
    SyntheticAnatomy
        Deterministic: the same spec and template files give the same arrays.
    """
    spec = AnatomySpec() if spec is None else spec
    rng = np.random.default_rng(spec.seed)
    # The draws are in the order of the original benchmark (benchmarks/bench_anatomy.py), so
    # that a seed keeps its affine there.
    scales = rng.uniform(0.90, 0.95, 3) ** rng.choice([-1, 1], 3)
    angles = rng.uniform(3, 6, 3) * rng.choice([-1, 1], 3)
    matrix = _rotation(angles) @ np.diag(scales)
    shift = rng.uniform(-5, 5, 3)
    disp = _SmoothField(rng, _DISP_COARSE, 3, spec.max_disp_mm)
    wobble = _SmoothField(rng, _WOBBLE_COARSE, 1, _WOBBLE_MM)
    bias = _SmoothField(rng, _BIAS_COARSE, 1, _BIAS_AMPLITUDE)

    tdir = None if template_dir is None else Path(template_dir)
    tpl = _load_template(spec.template_res, tdir)
    shape, affine = t1w_grid(spec.t1w_zooms)
    zooms = np.asarray(spec.t1w_zooms)

    def sample(world: NDArray) -> dict[str, NDArray]:
        y = matrix @ world + shift[:, None] + disp(world)
        values = tpl.sample(("t1w", "mask", "gm", "wm", "csf"), y)
        values["wobble"] = wobble(world)[0]
        values["bias"] = 1.0 + bias(world)[0]
        return values

    maps = _on_grid(shape, affine, sample, ("t1w", "mask", "gm", "wm", "csf", "wobble", "bias"))
    brain = maps["mask"] > 0.5

    # Head: skull (dark) and scalp (bright) bands around the brain, air outside.
    # The bands end within _SCALP_MM + _WOBBLE_MM of the brain, so the distance transform
    # needs only the brain's bounding box grown by that much (half the memory at 1 mm).
    margin = np.ceil((_SCALP_MM + _WOBBLE_MM) / zooms).astype(int) + 1
    box = []
    for axis in range(3):
        present = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        start = max(0, int(present[0]) - margin[axis]) if present.size else 0
        stop = min(shape[axis], int(present[-1]) + 1 + margin[axis]) if present.size else 0
        box.append(slice(start, stop))
    box_t = tuple(box)
    skull = np.zeros(shape, bool)
    scalp = np.zeros(shape, bool)
    if brain.any():
        dist = ndimage.distance_transform_edt(~brain[box_t], sampling=zooms).astype(np.float32)
        wobble_box = maps["wobble"][box_t]
        skull[box_t] = (dist > 0) & (dist <= _SKULL_MM + wobble_box)
        scalp[box_t] = (dist > _SKULL_MM + wobble_box) & (dist <= _SCALP_MM + wobble_box)
        del dist, wobble_box
    del maps["wobble"]
    wm_voxels = brain & (maps["wm"] > maps["gm"]) & (maps["wm"] > maps["csf"])
    wm_level = float(np.median(maps["t1w"][wm_voxels]))
    head = maps.pop("t1w") * maps["mask"]
    head[skull] = _SKULL_LEVEL * wm_level
    head[scalp] = _SCALP_LEVEL * wm_level
    head = ndimage.gaussian_filter(head, _HEAD_SIGMA_MM / zooms)

    # Acquisition: bias field and Rician noise.
    signal = head * maps.pop("bias")
    del head
    sigma = np.float32(_NOISE_FRACTION * wm_level)
    real = signal + sigma * rng.standard_normal(shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(shape, dtype=np.float32)
    t1w = np.sqrt(real**2 + imaginary**2).astype(np.float32)
    del real, imaginary, signal

    image = nib.Nifti1Image(t1w, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    arrays = {
        "gm": maps["gm"],
        "wm": maps["wm"],
        "csf": maps["csf"],
        "scalp": scalp.astype(np.float32),
        "brain_mask": brain,
        "matrix": matrix,
        "shift": shift,
        "scales": scales,
        "angles_deg": angles,
        "asl_to_t1w": spec.asl_to_t1w,
    }
    for value in (*arrays.values(), t1w):
        value.flags.writeable = False
    anatomy = SyntheticAnatomy(spec=spec, t1w=image, _disp=disp, _template_dir=tdir, **arrays)
    anatomy._cache[("template", spec.template_res)] = tpl
    return anatomy
