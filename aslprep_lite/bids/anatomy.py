"""A participant's anatomical reference: which T1w, and whether it can be read.

fMRIPrep builds one anatomical reference per participant from every T1w (a longitudinal
template when there are several). aslprep_lite takes one T1w as it is: the first in BIDS order
(sorted path: no session before ``ses-1``, then ``acq-``, ``run-``), which with sessions is the
earliest session's, and with repeated runs the first run. The others are listed in the
``--dry-run`` plan (``anatomy.other_t1w``) so that the choice is never silent;
``--bids-filter-file`` with a ``t1w`` entry picks another one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aslprep_lite.errors import AslprepError


def choose_t1w(t1w_files: Sequence[str]) -> str | None:
    """The participant's anatomical reference among its T1w images (None without any)."""
    return sorted(t1w_files)[0] if t1w_files else None


def check_t1w(path: str) -> None:
    """Read the whole T1w once, so a corrupt or truncated file fails before any processing.

    Raises
    ------
    AslprepError
        One line naming the file: unreadable (truncated gzip, bad header), not 3D, a voxel size
        that is not positive and finite, or no finite positive value.
    """
    import nibabel as nb

    try:
        img = nb.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel and zlib raise several types for damaged files
        raise AslprepError(
            f"T1w image is not a readable NIfTI ({type(err).__name__}): re-export or replace "
            "it, or leave it out with a BIDS filter",
            path=path,
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise AslprepError(f"T1w image has shape {data.shape}: a 3D image is expected", path=path)
    zooms = np.asarray(img.header.get_zooms()[:3], float)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0) or np.any(zooms > 3.0):
        raise AslprepError(
            f"T1w image has voxel size {zooms.tolist()} mm: a structural image of at most 3 mm "
            "voxels is expected",
            path=path,
        )
    finite = np.isfinite(data)
    if not finite.any() or not (data[finite] > 0).any():
        raise AslprepError("T1w image holds no positive value (empty image)", path=path)
