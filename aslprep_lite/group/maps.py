"""Group mean and standard deviation of the CBF maps in a template space, streamed.

The maps are read one at a time and folded into per-voxel running statistics in float64
(Welford's update: a mean and a sum of squared deviations, which do not lose precision as
``sum(x**2) - n mean**2`` can), so 50 runs need three volumes of memory, not 50.

A voxel's statistics use the runs that cover it: whose brain mask in the template space
(``<prefix>_space-<tpl>…_desc-brain_mask.nii.gz``) includes it and whose CBF there is finite.
The participant maps are 0 outside their mask; counting those zeros would pull the mean
towards 0 and inflate the SD at the edge of the brain, where the runs' masks differ. A run
without a mask covers its finite nonzero voxels instead. The SD (``n - 1``) needs two runs.
Every run weighs the same (a participant with several runs counts several times).

Welford BP (1962). Note on a method for calculating corrected sums of squares and products.
Technometrics 4(3):419-420. doi:10.1080/00401706.1962.10490022
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np
from numpy.typing import NDArray

from aslprep_lite.errors import AslprepError
from aslprep_lite.images import load_image

__all__ = ["GroupMap", "group_map"]


@dataclass
class GroupMap:
    """Mean and SD of a set of maps on one grid."""

    mean: NDArray[np.float64]
    sd: NDArray[np.float64]
    count: NDArray[np.int32]
    affine: NDArray[np.float64]
    reference: nb.Nifti1Image
    sources: list[Path]
    #: The maps read without a brain mask (their finite nonzero voxels counted).
    unmasked: list[Path]


def group_map(paths: Sequence[Path], masks: Sequence[Path | None] | None = None) -> GroupMap:
    """Voxelwise mean and SD (``n - 1``) of 3D maps on the same grid, read one by one.

    Parameters
    ----------
    paths
        The CBF maps.
    masks
        Each map's brain mask on the same grid (nonzero: inside), or None for a map without
        one, whose finite nonzero voxels are counted instead. Without ``masks``, none has one.

    Returns
    -------
    GroupMap
        Where no run covers a voxel the mean is 0, where fewer than two do the SD is 0 (the
        convention of the participant maps: 0 where undefined); ``count`` is the number of
        runs covering each voxel.

    Raises
    ------
    AslprepError
        A map or mask that cannot be read, a map that is not 3D, a map not on the first map's
        grid, or a mask not on its map's grid.
    """
    if not paths:
        raise ValueError("group_map: no maps")
    masks = list(masks) if masks is not None else [None] * len(paths)
    if len(masks) != len(paths):
        raise ValueError("group_map: one mask (or None) per map")
    mean = m2 = count = None
    reference = None
    unmasked = []
    for path, mask_path in zip(paths, masks, strict=True):
        data, img = load_image(path, what="CBF map")
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if reference is None:
            if data.ndim != 3:
                raise AslprepError(f"expected a 3D CBF map, got shape {data.shape}", str(path))
            reference = img
            mean = np.zeros(data.shape, dtype=np.float64)
            m2 = np.zeros(data.shape, dtype=np.float64)
            count = np.zeros(data.shape, dtype=np.int32)
        elif data.shape != mean.shape or not np.allclose(img.affine, reference.affine, atol=1e-4):
            raise AslprepError(
                f"not on the grid of {paths[0]} (shape {data.shape} vs {mean.shape}, or "
                "another affine): the maps of one template and resolution must share a grid; "
                "run the participant level again with the same --output-spaces",
                str(path),
            )
        x = data.astype(np.float64)
        covered = np.isfinite(x)
        if mask_path is None:
            unmasked.append(path)
            covered &= x != 0
        else:
            mask, mask_img = load_image(mask_path, what="brain mask")
            if mask.ndim == 4 and mask.shape[3] == 1:
                mask = mask[..., 0]
            if mask.shape != x.shape or not np.allclose(mask_img.affine, img.affine, atol=1e-4):
                raise AslprepError(
                    f"brain mask not on the grid of its CBF map {path} (shape {mask.shape} vs "
                    f"{x.shape}, or another affine): run the participant level again for this "
                    "participant",
                    str(mask_path),
                )
            covered &= mask > 0
        count += covered
        x[~covered] = 0.0  # NaN/inf outside: no invalid-value arithmetic below
        delta = np.where(covered, x - mean, 0.0)
        mean += np.divide(delta, count, out=np.zeros_like(delta), where=covered)
        m2 += np.where(covered, delta * (x - mean), 0.0)
    sd = np.sqrt(np.divide(m2, count - 1, out=np.zeros_like(m2), where=count > 1))
    return GroupMap(
        mean=mean,
        sd=sd,
        count=count,
        affine=np.asarray(reference.affine, dtype=np.float64),
        reference=reference,
        sources=list(paths),
        unmasked=unmasked,
    )
