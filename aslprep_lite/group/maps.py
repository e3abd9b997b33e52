"""Group mean and standard deviation of the CBF maps in a template space, streamed.

The maps are read one at a time and folded into per-voxel running statistics in float64
(Welford's update: a mean and a sum of squared deviations, which do not lose precision as
``sum(x**2) - n mean**2`` can), so 50 runs need three volumes of memory, not 50. A voxel's
statistics use the runs with a finite value there; the SD (``n - 1``) needs two.

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


def group_map(paths: Sequence[Path]) -> GroupMap:
    """Voxelwise mean and SD (``n - 1``) of 3D maps on the same grid, read one by one.

    Where no run has a finite value the mean is 0, where fewer than two do the SD is 0 (the
    convention of the participant maps: 0 where undefined).

    Raises
    ------
    AslprepError
        A map that cannot be read, is not 3D, or is not on the first map's grid.
    """
    if not paths:
        raise ValueError("group_map: no maps")
    mean = m2 = count = None
    reference = None
    for path in paths:
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
        finite = np.isfinite(x)
        if finite.all():  # the usual case (0 outside the brain): fewer passes over the grid
            count += 1
            delta = x - mean
            mean += delta / count
            x -= mean
            delta *= x
            m2 += delta
        else:
            count += finite
            delta = np.where(finite, x - mean, 0.0)
            mean += np.divide(delta, count, out=np.zeros_like(delta), where=count > 0)
            m2 += np.where(finite, delta * (x - mean), 0.0)
    sd = np.sqrt(np.divide(m2, count - 1, out=np.zeros_like(m2), where=count > 1))
    return GroupMap(
        mean=mean,
        sd=sd,
        count=count,
        affine=np.asarray(reference.affine, dtype=np.float64),
        reference=reference,
        sources=list(paths),
    )
