"""Provenance of the derivatives: software versions and ``dataset_description.json``."""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from aslprep_lite import __version__

#: The scientific dependencies whose versions are recorded with the derivatives.
DEPENDENCIES = ("nipype", "pybids", "nibabel", "numpy", "scipy", "SimpleITK")


def software_versions() -> dict[str, str]:
    """Versions of aslprep_lite's scientific dependencies.

    Returns
    -------
    dict[str, str]
        ``python`` and each name of :data:`DEPENDENCIES` mapped to its installed version
        (``"unknown"`` for a package that is not installed).
    """
    versions = {"python": platform.python_version()}
    for name in DEPENDENCIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def write_dataset_description(bids_dir: Path, output_dir: Path) -> None:
    """BIDS-Derivatives ``dataset_description.json`` (no time stamp: reruns are identical).

    Parameters
    ----------
    bids_dir
        The raw dataset, whose description is read.
    output_dir
        The derivatives dataset, where the description is written atomically.
    """
    from aslprep_lite.bids.files import read_json
    from aslprep_lite.images import write_atomic_text

    raw = read_json(bids_dir / "dataset_description.json")
    source = {"URL": bids_dir.as_uri()}
    if raw.get("DatasetDOI"):
        source["DOI"] = raw["DatasetDOI"]
    description = {
        "Name": "aslprep_lite derivatives" + (f" of {raw['Name']}" if raw.get("Name") else ""),
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "aslprep_lite",
                "Version": __version__,
                "Description": "Dependencies: "
                + ", ".join(f"{k} {v}" for k, v in software_versions().items()),
            }
        ],
        "SourceDatasets": [source],
        "DatasetLinks": {"raw": bids_dir.as_uri()},
    }
    write_atomic_text(
        output_dir / "dataset_description.json",
        json.dumps(description, indent=2, sort_keys=True) + "\n",
    )
