"""Image I/O shared by the interfaces: NIfTI read with clear errors, files written atomically."""

from __future__ import annotations

import gzip
import os
import tempfile
from pathlib import Path

import nibabel as nb
import numpy as np
from numpy.typing import NDArray

from aslprep_lite.errors import AslprepError


def load_image(
    path: str | Path, *, what: str = "image"
) -> tuple[NDArray[np.float32], nb.Nifti1Image]:
    """Load a NIfTI image's data as float32, with a one-line error for damaged files."""
    try:
        img = nb.load(str(path))
        data = np.asanyarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # EOFError, zlib.error, ImageFileError, ... for damaged files
        raise AslprepError(
            f"cannot read the {what} data ({type(err).__name__}: {err}); the file is "
            "truncated or corrupt: re-export it",
            path=str(path),
        ) from None
    return data, img


def save_image(
    data: NDArray,
    reference: nb.Nifti1Image,
    path: str | Path,
    *,
    dtype: type = np.float32,
) -> str:
    """Write ``data`` with the reference's affine and a clean header (mm/s units, no scaling)."""
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_xyzt_units("mm", "sec")
    img = nb.Nifti1Image(np.asarray(data, dtype=dtype), reference.affine, header)
    img.header.set_slope_inter(1, 0)
    img.set_qform(reference.affine, code=int(reference.header["qform_code"]) or 1)
    img.set_sform(reference.affine, code=int(reference.header["sform_code"]) or 1)
    write_nifti(img, path)
    return str(Path(path).resolve())


def write_nifti(img: nb.Nifti1Image, path: str | Path) -> None:
    """Write a NIfTI image; ``.nii.gz`` without a time stamp (identical data, identical bytes).

    nibabel stamps the gzip header with the current time, which would make two runs on the same
    input differ byte for byte.
    """
    path = Path(path)
    if path.name.endswith(".gz"):
        with (
            path.open("wb") as handle,
            gzip.GzipFile(
                filename="", mode="wb", fileobj=handle, mtime=0, compresslevel=1
            ) as stream,
        ):
            stream.write(img.to_bytes())
    else:
        img.to_filename(str(path))


def write_atomic_text(path: str | Path, text: str) -> None:
    """Write a text file under a temporary name in the same directory, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fobj:
            fobj.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_signal(data: np.ndarray, path: str, what: str) -> None:
    """An image to calibrate or register with needs finite values and some positive signal."""
    if not np.isfinite(data).all():
        raise AslprepError(f"{what} contains NaN or infinite values: re-export it", path=path)
    if not float(data.max()) > 0:
        raise AslprepError(
            f"{what} has no positive signal (all zeros?): check the file", path=path
        )


def load_volume(path: str, what: str) -> tuple[np.ndarray, nb.Nifti1Image]:
    """A 3D image (of a 4D one, the mean of its volumes), checked by :func:`check_signal`."""
    data, img = load_image(path, what=what)
    if data.ndim == 4:
        data = data.mean(axis=3)
    check_signal(data, path, what)
    return data, img
