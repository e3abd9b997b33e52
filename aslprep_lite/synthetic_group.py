"""Synthetic participant-level outputs for the group level's tests and benchmark.

Writes, for each run, what the participant level leaves in ``OUT/sub-<label>/perf``: the QC
table (:func:`aslprep_lite.quant.qc.write_qc_tsv`, one row), its sidecar, and optionally a CBF
map in ``MNI152NLin2009aSym`` at 2 mm (the template's grid: 97 x 115 x 97) with its brain mask
there (``…_desc-brain_mask.nii.gz``, the same ellipsoid for every run), plus the raw
dataset's ASL file names (empty files: the group level only globs them). Deterministic: the
values come from ``numpy.random.default_rng(seed)``, the gzip headers carry no time stamp.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nb
import numpy as np

from aslprep_lite.images import write_nifti
from aslprep_lite.quant.qc import COLUMNS, Value, qc_sidecar, write_qc_tsv

__all__ = ["TEMPLATE_AFFINE", "TEMPLATE_SHAPE", "qc_values", "write_group_derivatives"]

#: The MNI152NLin2009aSym res-2 grid.
TEMPLATE_SHAPE = (97, 115, 97)
TEMPLATE_AFFINE = np.array(
    [[2.0, 0, 0, -96.0], [0, 2.0, 0, -132.0], [0, 0, 2.0, -78.0], [0, 0, 0, 1.0]]
)


def qc_values(rng: np.random.Generator) -> dict[str, Value]:
    """A plausible QC row of a healthy run (every column of ``COLUMNS``)."""
    gm = float(rng.normal(60.0, 4.0))
    wm = float(rng.normal(22.0, 1.5))
    row: dict[str, Value] = {
        "mean_fd": float(rng.uniform(0.05, 0.25)),
        "max_fd": float(rng.uniform(0.3, 0.8)),
        "mean_rmsd": float(rng.uniform(0.03, 0.15)),
        "pairs_used": 8,
        "pairs_removed": 0,
        "gm_cbf": gm,
        "wm_cbf": wm,
        "gm_wm_ratio": gm / wm,
        "gm_negative_percent": float(rng.uniform(0.0, 2.0)),
        "gm_spatial_cov": float(rng.normal(0.40, 0.03)),
        "qei": float(rng.normal(0.80, 0.03)),
        "coregistration_dice": float(rng.uniform(0.85, 0.95)),
        "normalization_correlation": None,
        "median_att": None,
        "fit_failed_percent": None,
    }
    return {name: row[name] for name in COLUMNS}


def _brain(shape: Sequence[int]) -> np.ndarray:
    """An ellipsoidal 'brain' filling about half the grid, 1 inside."""
    grid = np.indices(shape, dtype=np.float64)
    centre = [(n - 1) / 2.0 for n in shape]
    radii = [0.4 * n for n in shape]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0
    return inside.astype(np.float64)


def write_group_derivatives(
    bids_dir: Path,
    output_dir: Path,
    n_runs: int,
    *,
    seed: int = 1,
    overrides: Mapping[int, Mapping[str, Value]] | None = None,
    template_maps: bool = True,
    shape: Sequence[int] = TEMPLATE_SHAPE,
    affine: np.ndarray = TEMPLATE_AFFINE,
    masks: bool = True,
) -> list[str]:
    """Write ``n_runs`` participants' QC tables (and template CBF maps).

    Parameters
    ----------
    bids_dir, output_dir
        The raw dataset (ASL file names only) and the derivatives.
    n_runs
        One run per participant, labels ``01``, ``02``, ...
    seed
        Seed of the QC values and map noise.
    overrides
        Run index -> QC values replacing the generated ones (e.g. a planted outlier); its
        template map is scaled by ``gm_cbf`` / the generated value.
    template_maps
        Also write ``space-MNI152NLin2009aSym_res-2_cbf.nii.gz`` maps.
    shape, affine
        The template grid (the real res-2 grid by default).
    masks
        With ``template_maps``, also write each map's ``…_desc-brain_mask.nii.gz``.

    Returns
    -------
    list of str
        The participant labels.
    """
    rng = np.random.default_rng(seed)
    overrides = overrides or {}
    bids_dir.mkdir(parents=True, exist_ok=True)
    (bids_dir / "dataset_description.json").write_text(
        json.dumps({"Name": "group synthetic", "BIDSVersion": "1.9.0"})
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "dataset_description.json").write_text(
        json.dumps({"Name": "aslprep_lite", "BIDSVersion": "1.9.0", "DatasetType": "derivative"})
    )
    brain = _brain(shape) if template_maps else None
    sidecar = json.dumps(qc_sidecar("synthetic"), indent=2) + "\n"
    labels = []
    for index in range(n_runs):
        label = f"{index + 1:02d}"
        labels.append(label)
        raw = bids_dir / f"sub-{label}" / "perf"
        raw.mkdir(parents=True, exist_ok=True)
        (raw / f"sub-{label}_asl.nii.gz").touch()
        perf = output_dir / f"sub-{label}" / "perf"
        perf.mkdir(parents=True, exist_ok=True)
        row = qc_values(rng)
        generated_gm = float(row["gm_cbf"])  # type: ignore[arg-type]
        row.update(overrides.get(index, {}))
        write_qc_tsv([row], perf / f"sub-{label}_desc-qualitycontrol_cbf.tsv")
        (perf / f"sub-{label}_desc-qualitycontrol_cbf.json").write_text(sidecar)
        if brain is not None:
            scale = float(row["gm_cbf"] or generated_gm) / 60.0  # type: ignore[arg-type]
            data = brain * 60.0 * scale + rng.normal(0.0, 5.0, size=brain.shape) * brain
            image = nb.Nifti1Image(data.astype(np.float32), affine)
            image.set_qform(affine, code=4)
            image.set_sform(affine, code=4)
            write_nifti(image, perf / f"sub-{label}_space-MNI152NLin2009aSym_res-2_cbf.nii.gz")
            if masks:
                mask = nb.Nifti1Image(brain.astype(np.uint8), affine)
                mask.set_qform(affine, code=4)
                mask.set_sform(affine, code=4)
                name = f"sub-{label}_space-MNI152NLin2009aSym_res-2_desc-brain_mask.nii.gz"
                write_nifti(mask, perf / name)
    return labels
