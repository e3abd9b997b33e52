"""Writing a run's derivatives: all or nothing, never a mix of old and new files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from aslprep_lite import __version__
from aslprep_lite.bids import RunPlan
from aslprep_lite.images import save_image

STAGING = ".aslprep_lite-staging"


class _WriteInputSpec(BaseInterfaceInputSpec):
    plan = traits.Dict(mandatory=True, desc="RunPlan.as_dict() of the run")
    output_dir = traits.Str(mandatory=True, desc="root of the derivatives dataset")
    cbf = File(exists=True, mandatory=True)
    cbf_timeseries = File(exists=True, desc="single-delay runs only")
    mean_deltam = File(desc="absent for cbf-only series")
    m0 = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)
    confounds = File(exists=True, mandatory=True)
    cbf_metadata = traits.Dict(mandatory=True)
    m0_metadata = traits.Dict(mandatory=True)
    confounds_metadata = traits.Dict(mandatory=True)
    settings = traits.Dict(mandatory=True, desc="processing settings recorded in sidecars")
    maps = traits.Dict(desc="{suffix: file} of further parameter maps (multi-delay fit)")
    maps_metadata = traits.Dict(desc="{suffix: sidecar} of those maps")
    m0_reference_mask = File(desc="reference region of --m0-calibration csf|wm")


class _WriteOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str, desc="files written, relative to output_dir")


class WriteDerivatives(SimpleInterface):
    """Stage every file of a run in a private folder, then move them into place.

    A crash before the move leaves the derivatives untouched; the move replaces the run's
    previous outputs and removes those of its files that this version no longer writes.
    """

    input_spec = _WriteInputSpec
    output_spec = _WriteOutputSpec

    def _run_interface(self, runtime):
        plan = self.inputs.plan
        root = Path(self.inputs.output_dir)
        target = root / plan["out_dir"]
        prefix = plan["prefix"]
        sources = plan["source_files"]
        processing = {
            "SoftwareName": "aslprep_lite",
            "SoftwareVersion": __version__,
            **self.inputs.settings,
        }
        quant = self.inputs.cbf_metadata
        m0_meta = self.inputs.m0_metadata

        files: dict[str, tuple[str, np.dtype | None, dict[str, Any]]] = {
            "cbf.nii.gz": (
                self.inputs.cbf,
                np.float32,
                {
                    "Units": "mL/100 g/min",
                    "Description": "Mean cerebral blood flow",
                    **quant,  # a multi-delay fit brings its own Description
                    "M0": m0_meta,
                },
            ),
            "desc-brain_mask.nii.gz": (
                self.inputs.mask,
                np.uint8,
                {"Type": "Brain", "Description": m0_meta.get("BrainMask", "")},
            ),
            "desc-confounds_timeseries.tsv": (
                self.inputs.confounds,
                None,
                self.inputs.confounds_metadata,
            ),
        }
        if RunPlan(**plan).quantifies:
            files["desc-preproc_m0scan.nii.gz"] = (
                self.inputs.m0,
                np.float32,
                {
                    "Units": "arbitrary",
                    "Description": "Calibration M0 as used for CBF (corrected, scaled, smoothed)",
                    **m0_meta,
                },
            )
        if self.inputs.cbf_timeseries:
            files["desc-timeseries_cbf.nii.gz"] = (
                self.inputs.cbf_timeseries,
                np.float32,
                {
                    "Units": "mL/100 g/min",
                    "Description": "Cerebral blood flow of each ΔM volume",
                    **quant,
                    "M0": m0_meta,
                },
            )
        for suffix, src in (self.inputs.maps or {}).items():
            dtype = np.uint8 if suffix.endswith("_mask.nii.gz") else np.float32
            files[suffix] = (src, dtype, self.inputs.maps_metadata[suffix])
        if self.inputs.m0_reference_mask:
            files["desc-m0reference_mask.nii.gz"] = (
                self.inputs.m0_reference_mask,
                np.uint8,
                {
                    "Type": m0_meta["ReferenceRegion"]["Tissue"].upper(),
                    "Description": "Reference region of the M0 calibration",
                },
            )
        if self.inputs.mean_deltam:
            files["desc-mean_deltam.nii.gz"] = (
                self.inputs.mean_deltam,
                np.float32,
                {
                    "Units": "arbitrary",
                    "Description": "Mean control − label difference (ΔM), motion corrected",
                },
            )

        root.mkdir(parents=True, exist_ok=True)
        staging_root = root / STAGING
        staging_root.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=staging_root))
        written = []
        try:
            for suffix, (src, dtype, sidecar) in files.items():
                name = f"{prefix}_{suffix}"
                if dtype is None:
                    shutil.copyfile(src, staging / name)
                    json_name = name[: -len(".tsv")] + ".json"
                else:
                    img = nb.load(src)
                    save_image(np.asanyarray(img.dataobj), img, staging / name, dtype=dtype)
                    json_name = name[: -len(".nii.gz")] + ".json"
                sidecar = {
                    **sidecar,
                    "Sources": sources,
                    "ProcessingParameters": processing,
                }
                (staging / json_name).write_text(
                    json.dumps(sidecar, indent=2, sort_keys=True) + "\n"
                )
                written += [name, json_name]
            target.mkdir(parents=True, exist_ok=True)
            for old in target.glob(f"{prefix}_*"):
                if old.name not in written and old.is_file():
                    old.unlink()
            for name in sorted(written):
                os.replace(staging / name, target / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            try:
                staging_root.rmdir()
            except OSError:
                pass  # another run is still staging
        self._results["out_files"] = [
            str(Path(plan["out_dir"]) / name) for name in sorted(written)
        ]
        return runtime
