"""Spatial mappings between spaces, applied once: dense deformations, affines, their ITK files.

Convention
----------
Every mapping here answers the resampler's question: *for a point of the output (reference)
space, where is it in the input (moving) space?* A :class:`Deformation` holds, on a grid of
the reference space, the RAS world coordinates (mm) of each voxel's centre in the moving
space (SPM calls this a deformation field, ``y_*.nii``). An affine is a 4×4 RAS matrix mapping
reference-world points to moving-world points, as :mod:`aslprep_lite.quant.registration`
returns them. A chain ``[d, A]`` maps a point ``p`` to ``A @ d(p)``: CBF in template space is
read from the ASL grid at ``t1w_to_asl @ template_to_t1w(p)``, one interpolation of the CBF
map through the composed mapping, never a chain of resampled images.

ITK files
---------
ITK transforms follow the same direction (a ``from-T1w_to-MNI`` transform maps MNI points to
T1w points, which is what resampling a T1w image into MNI space needs) but in LPS. A
:class:`Deformation` is written as an ITK ``DisplacementFieldTransform`` inside a composite
transform, in an HDF5 ``.h5`` file, as ANTs and fMRIPrep write theirs; any ITK transform file
(affine, displacement field or a composite of them, e.g. fMRIPrep's) is read back into a
:class:`Deformation` on a chosen grid by :meth:`Deformation.from_itk_file`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage

from aslprep_lite.images import write_nifti

_FLIP = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS on coordinates
_SLAB_POINTS = 2_000_000  # points resampled at once
_SNAP = 1e-6  # voxels: a point this close outside a face is on it


def grid_points(shape: Sequence[int], affine: NDArray) -> NDArray[np.float64]:
    """World (RAS mm) coordinates of every voxel centre of a grid, shape ``(*shape, 3)``."""
    ijk = np.indices(tuple(int(n) for n in shape[:3]), dtype=np.float64)
    return np.moveaxis(np.tensordot(affine[:3, :3], ijk, axes=1), 0, -1) + affine[:3, 3]


def apply_affine(matrix: NDArray, points: NDArray) -> NDArray[np.float64]:
    """``matrix @ p`` for every point of ``points`` (``(..., 3)``)."""
    return points @ np.asarray(matrix, float)[:3, :3].T + np.asarray(matrix, float)[:3, 3]


def sample(
    data: NDArray, affine: NDArray, points: NDArray, *, order: int = 1, cval: float = 0.0
) -> NDArray[np.float32]:
    """Values of a 3D image at world points (``(..., 3)``), 0 (``cval``) outside its field.

    ``order`` 1 is trilinear (quantitative maps: no overshoot, so no negative CBF appears at
    the brain edge); 0 is nearest neighbour (labels).
    """
    ijk = apply_affine(np.linalg.inv(affine), points)
    # Round-off of an oblique affine puts points of the grid's own faces at -1e-15 or
    # n - 1 + 1e-15, which map_coordinates would count as outside: snap them onto the faces.
    last = np.asarray(np.shape(data)[:3], float) - 1
    ijk = np.where((ijk < 0) & (ijk > -_SNAP), 0.0, ijk)
    ijk = np.where((ijk > last) & (ijk < last + _SNAP), last, ijk)
    coords = np.moveaxis(ijk, -1, 0).reshape(3, -1)
    values = ndimage.map_coordinates(
        np.asarray(data, np.float32), coords, order=order, mode="constant", cval=cval
    )
    return values.reshape(points.shape[:-1]).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Deformation:
    """Moving-space world coordinates of each voxel centre of a reference grid.

    Attributes
    ----------
    coords : ndarray, shape (X, Y, Z, 3), float32
        RAS world coordinates (mm), in the moving space, of the reference voxel centres.
    affine : ndarray, shape (4, 4)
        The reference grid's voxel-to-world RAS affine.
    """

    coords: NDArray[np.float32]
    affine: NDArray[np.float64]

    def __call__(self, points: NDArray) -> NDArray[np.float64]:
        """The moving-space points of reference-space ``points`` (trilinear interpolation).

        Outside the grid the displacement of the nearest edge voxel is used: the fields are
        smooth, and the grid covers the reference brain with a margin.
        """
        ijk = apply_affine(np.linalg.inv(self.affine), points)
        coords = np.moveaxis(ijk, -1, 0).reshape(3, -1)
        here = grid_points(self.coords.shape[:3], self.affine)
        out = np.empty((coords.shape[1], 3))
        for axis in range(3):  # interpolate the displacement (smooth), not the coordinate
            disp = (self.coords[..., axis] - here[..., axis]).astype(np.float32)
            out[:, axis] = ndimage.map_coordinates(disp, coords, order=1, mode="nearest")
        return points + out.reshape(points.shape)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The reference grid's shape."""
        return tuple(int(n) for n in self.coords.shape[:3])  # type: ignore[return-value]

    def then(self, matrix: NDArray) -> Deformation:
        """This mapping followed by an affine: ``p ↦ matrix @ self(p)``."""
        return Deformation(apply_affine(matrix, self.coords).astype(np.float32), self.affine)

    def to_nifti(self, path: str | Path) -> None:
        """Write as a 4D NIfTI ``(X, Y, Z, 3)`` of world coordinates (a working file)."""
        image = nb.Nifti1Image(self.coords.astype(np.float32), self.affine)
        image.header.set_intent("vector", (), "")
        write_nifti(image, path)  # no gzip time stamp: identical bytes run to run

    @classmethod
    def from_nifti(cls, path: str | Path) -> Deformation:
        """Read a file written by :meth:`to_nifti`."""
        image = nb.load(str(path))
        return cls(np.asarray(image.dataobj, np.float32), np.asarray(image.affine, float))

    @classmethod
    def from_affine(cls, matrix: NDArray, shape: Sequence[int], affine: NDArray) -> Deformation:
        """An affine mapping, sampled on a reference grid."""
        points = grid_points(shape, affine)
        return cls(apply_affine(matrix, points).astype(np.float32), np.asarray(affine, float))

    def to_itk_file(self, path: str | Path) -> None:
        """Write as an ITK composite transform holding one displacement field (``.h5``)."""
        points = grid_points(self.shape, self.affine)
        displacement = (self.coords - points) * _FLIP  # LPS displacement, per voxel
        field = sitk.GetImageFromArray(
            np.ascontiguousarray(np.transpose(displacement, (2, 1, 0, 3)), dtype=np.float64),
            isVector=True,
        )
        spacing, direction, origin = _itk_geometry(self.affine)
        field.SetSpacing(spacing)
        field.SetDirection(direction)
        field.SetOrigin(origin)
        transform = sitk.CompositeTransform([sitk.DisplacementFieldTransform(field)])
        written = Path(str(path) + ".itk.h5")
        sitk.WriteTransform(transform, str(written))
        _without_time_stamps(written, Path(path))
        written.unlink()

    @classmethod
    def from_itk_file(cls, path: str | Path, shape: Sequence[int], affine: NDArray) -> Deformation:
        """Evaluate any ITK transform file (e.g. fMRIPrep's ``_xfm.h5``) on a reference grid."""
        transform = sitk.ReadTransform(str(path))
        spacing, direction, origin = _itk_geometry(affine)
        to_field = sitk.TransformToDisplacementFieldFilter()
        to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
        to_field.SetSize([int(n) for n in shape[:3]])
        to_field.SetOutputSpacing(spacing)
        to_field.SetOutputDirection(direction)
        to_field.SetOutputOrigin(origin)
        displacement = np.transpose(
            sitk.GetArrayFromImage(to_field.Execute(transform)), (2, 1, 0, 3)
        )
        points = grid_points(shape, affine)
        coords = points + displacement * _FLIP
        return cls(coords.astype(np.float32), np.asarray(affine, float))


def _without_time_stamps(source: Path, target: Path) -> None:
    """Copy an HDF5 file without its object modification times (byte-identical reruns).

    ITK's HDF5 writer stamps every group and dataset with the time it was written; the content
    (groups and datasets, in ITK's order) is copied unchanged, which ITK reads back the same.
    """
    import h5py

    def copy(group_in, group_out) -> None:
        for key in group_in:
            item = group_in[key]
            if isinstance(item, h5py.Group):
                properties = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
                properties.set_obj_track_times(False)
                created = h5py.h5g.create(group_out.id, key.encode(), gcpl=properties)
                copy(item, h5py.Group(created))
            else:
                group_out.create_dataset(key, data=item[()], track_times=False)

    with h5py.File(source, "r") as fin, h5py.File(target, "w", libver="earliest") as fout:
        copy(fin, fout)


def _itk_geometry(affine: NDArray) -> tuple[list[float], list[float], list[float]]:
    """ITK (LPS) spacing, row-major direction and origin of a RAS voxel-to-world affine."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return spacing.tolist(), direction.ravel().tolist(), lps[:3, 3].tolist()


def coarse_grid(
    shape: Sequence[int], affine: NDArray, spacing: float = 2.0
) -> tuple[tuple[int, int, int], NDArray[np.float64]]:
    """The grid covering the same field of view with voxels of about ``spacing`` mm.

    Displacement fields of a registration run at 2 mm are smooth on that scale, so storing
    them on a 2 mm grid loses nothing and keeps the files 8× smaller than at 1 mm.
    """
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    factors = np.maximum(1.0, np.round(spacing / zooms))
    new_shape = tuple(int(np.ceil(n / f)) for n, f in zip(shape[:3], factors, strict=True))
    new_affine = np.array(affine, float)
    new_affine[:3, :3] = affine[:3, :3] * factors
    # keep the field of view centred on the same point
    old_centre = affine[:3, :3] @ ((np.asarray(shape[:3]) - 1) / 2) + affine[:3, 3]
    new_affine[:3, 3] = old_centre - new_affine[:3, :3] @ ((np.asarray(new_shape) - 1) / 2)
    return new_shape, new_affine  # type: ignore[return-value]


def resample_through(
    data: NDArray,
    affine: NDArray,
    mapping: Deformation | NDArray,
    shape: Sequence[int],
    ref_affine: NDArray,
    *,
    order: int = 1,
) -> NDArray[np.float32]:
    """Resample ``data`` onto a reference grid through ``mapping`` (one interpolation).

    ``mapping`` is a :class:`Deformation` (reference → moving world points) or a 4×4 matrix.
    """
    return resample_many([data], affine, mapping, shape, ref_affine, order=order)[0]


def resample_many(
    arrays: Sequence[NDArray],
    affine: NDArray,
    mapping: Deformation | NDArray,
    shape: Sequence[int],
    ref_affine: NDArray,
    *,
    order: int = 1,
) -> list[NDArray[np.float32]]:
    """:func:`resample_through` of several images on one grid (``affine``) through one mapping.

    The mapped points (for a deformation, three interpolations of its field per point) are
    computed once per slab for all the images; each image gives exactly the values
    :func:`resample_through` gives it alone.
    """
    shape = tuple(int(n) for n in shape[:3])
    outs = [np.empty(shape, np.float32) for _ in arrays]
    arrays = [np.asarray(data, np.float32) for data in arrays]
    # Slabs of the first axis bound the memory of the coordinate arrays (a 1 mm grid holds
    # 11 M points, 280 MB per copy of their coordinates).
    step = max(1, _SLAB_POINTS // (shape[1] * shape[2]))
    for start in range(0, shape[0], step):
        stop = min(shape[0], start + step)
        slab = np.array(ref_affine, float)
        slab[:3, 3] += slab[:3, 0] * start
        points = grid_points((stop - start, *shape[1:]), slab)
        moved = (
            apply_affine(mapping, points) if isinstance(mapping, np.ndarray) else mapping(points)
        )
        for data, out in zip(arrays, outs, strict=True):
            out[start:stop] = sample(data, affine, moved, order=order)
    return outs
