"""Reading BIDS files: JSON sidecars, ``aslcontext.tsv``, NIfTI headers, typed sidecar fields.

Every reader turns a bad file into one :class:`~aslprep_lite.errors.AslprepError` line that
names the file (and the field).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aslprep_lite.errors import AslprepError
from aslprep_lite.quant.deltam import VOLUME_TYPES


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON sidecar, with a one-line error naming the file when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8-sig") as fobj:
            data = json.load(fobj)
    except json.JSONDecodeError as err:
        raise AslprepError(
            f"not valid JSON (line {err.lineno}, column {err.colno}): fix the file", path=str(path)
        ) from None
    except OSError as err:
        raise AslprepError(f"cannot read: {err.strerror}", path=str(path)) from None
    if not isinstance(data, dict):
        raise AslprepError("must hold a JSON object", path=str(path))
    return data


def read_aslcontext(path: str | Path) -> list[str]:
    """Read ``aslcontext.tsv``: its ``volume_type`` column; CRLF and blank last lines are fine."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fobj:
            text = fobj.read()
    except FileNotFoundError:
        raise AslprepError(
            "missing: every ASL run needs its aslcontext.tsv", path=str(path)
        ) from None
    except OSError as err:
        raise AslprepError(f"cannot read: {err.strerror}", path=str(path)) from None
    lines = [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines or lines[0].split("\t")[0] != "volume_type":
        raise AslprepError("first line must be the header 'volume_type'", path=str(path))
    column = [line.split("\t")[0].strip() for line in lines[1:]]
    for row, kind in enumerate(column, start=2):
        if kind not in VOLUME_TYPES:
            raise AslprepError(
                f"line {row}: unknown volume_type {kind!r} (allowed: {', '.join(VOLUME_TYPES)})",
                path=str(path),
            )
    if not column:
        raise AslprepError("lists no volumes", path=str(path))
    return column


def image_shape(path: str | Path) -> tuple[int, ...]:
    """Shape of a NIfTI image from its header, with a one-line error for unreadable files."""
    import nibabel as nb

    try:
        img = nb.load(str(path))
        shape = tuple(int(n) for n in img.shape)
    except Exception as err:  # nibabel raises several types for truncated/corrupt files
        raise AslprepError(
            f"not a readable NIfTI image ({type(err).__name__}): re-export or replace the file",
            path=str(path),
        ) from None
    return shape


def sidecar_of(image: Path) -> Path:
    """The JSON sidecar beside a ``.nii`` or ``.nii.gz`` image."""
    name = image.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
    return image.with_name(stem + ".json")


def asl_prefix(asl_file: Path) -> str:
    """The entities of an ASL file (``sub-01_ses-1_run-1``), shared by all its derivatives."""
    name = asl_file.name
    return name[: name.rindex("_asl.nii")]


class SidecarFields:
    """Typed access to sidecar fields with one-line errors naming the file and the field."""

    def __init__(self, metadata: dict[str, Any], path: Path) -> None:
        self.metadata = metadata
        self.path = str(path)

    @classmethod
    def of_image(cls, image: Path) -> SidecarFields:
        """The fields of the JSON sidecar beside ``image`` (no inheritance)."""
        sidecar = sidecar_of(image)
        return cls(read_json(sidecar), sidecar)

    def error(self, key: str, message: str) -> AslprepError:
        """The one-line error for field ``key`` of this sidecar."""
        return AslprepError(f"field '{key}' {message}", path=self.path)

    def has(self, key: str) -> bool:
        """Whether the sidecar gives ``key``."""
        return key in self.metadata

    def required(self, key: str, why: str = "") -> Any:
        """The value of ``key``; an error saying it is required (``why``) when missing."""
        if key not in self.metadata:
            raise self.error(key, f"is required{why} but missing: add it to the sidecar")
        return self.metadata[key]

    def string(self, key: str, choices: Sequence[str]) -> str:
        """A required string among ``choices``."""
        value = self.required(key)
        if value not in choices:
            raise self.error(key, f"is {value!r}; it must be one of {', '.join(choices)}")
        return value

    def boolean(self, key: str, why: str = "") -> bool:
        """A required JSON boolean."""
        value = self.required(key, why)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def number(self, key: str, value: Any = None, why: str = "") -> float:
        """A finite number: ``value`` if given (an item of the field), else the field."""
        value = self.required(key, why) if value is None else value
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self.error(key, f"must be a number, not {value!r}")
        return float(value)

    def first_number(self, key: str) -> float:
        """A number given alone or as the first item of an array (TR, TE of multi-echo M0s)."""
        raw = self.required(key)
        return self.number(key, raw[0] if isinstance(raw, list) and raw else raw)

    def per_volume(self, key: str, n_volumes: int, why: str = "") -> list[float]:
        """A scalar or an array of one number per aslcontext volume, expanded to a list."""
        value = self.required(key, why)
        if isinstance(value, list):
            if len(value) != n_volumes:
                raise self.error(
                    key,
                    f"has {len(value)} values but the aslcontext lists {n_volumes} volumes: "
                    "give one value per volume or a single number",
                )
            return [self.number(key, v) for v in value]
        return [self.number(key, value)] * n_volumes


def bids_uri(path: str | Path, bids_dir: str | Path) -> str:
    """The ``Sources`` URI of a raw file: ``bids:raw:<path relative to the dataset>``."""
    return "bids:raw:" + os.path.relpath(path, bids_dir)
