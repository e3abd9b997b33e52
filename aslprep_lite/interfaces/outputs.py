"""Writing a run's derivatives: all or nothing, never a mix of old and new files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from aslprep_lite import __version__
from aslprep_lite.bids.derivatives import ASL_DERIVATIVES, BY_KEY, compose_sidecar
from aslprep_lite.images import save_image

STAGING = ".aslprep_lite-staging"


class _WriteInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True, desc="root of the derivatives dataset")
    out_dir = traits.Str(mandatory=True, desc="the run's folder, relative to output_dir")
    prefix = traits.Str(mandatory=True, desc="the run's entities, e.g. sub-01_ses-1")
    keys = traits.List(traits.Str, mandatory=True, desc="derivatives to write (output spec)")
    sources = traits.List(traits.Str, mandatory=True, desc="BIDS URIs of the raw inputs")
    parameters = traits.Dict(mandatory=True, desc="ProcessingParameters of every sidecar")
    cbf_metadata = traits.Dict(mandatory=True)
    m0_metadata = traits.Dict(mandatory=True)
    confounds_metadata = traits.Dict(mandatory=True)
    maps_metadata = traits.Dict(desc="{key: sidecar fields} of the multi-delay maps")


for _derivative in ASL_DERIVATIVES:  # one file input per derivative of the output spec
    _WriteInputSpec.add_class_trait(_derivative.key, File(exists=True))


class _WriteOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str, desc="files written, relative to output_dir")


class WriteDerivatives(SimpleInterface):
    """Stage every file of a run in a private folder, then move them into place.

    What is written, under which name, with which data type and sidecar, is the output
    specification's (:mod:`aslprep_lite.bids.derivatives`). A crash before the move leaves
    the derivatives untouched; the move replaces the run's previous outputs and removes those
    of its files that this version no longer writes.
    """

    input_spec = _WriteInputSpec
    output_spec = _WriteOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        root = Path(inputs.output_dir)
        target = root / inputs.out_dir
        prefix = inputs.prefix
        records = {
            "quantification": inputs.cbf_metadata,
            "m0": inputs.m0_metadata,
            "confounds": inputs.confounds_metadata,
            "maps": inputs.maps_metadata if isdefined(inputs.maps_metadata) else {},
        }
        provenance = {
            "Sources": list(inputs.sources),
            "ProcessingParameters": {
                "SoftwareName": "aslprep_lite",
                "SoftwareVersion": __version__,
                **inputs.parameters,
            },
        }
        files = [
            (BY_KEY[key], getattr(inputs, key))
            for key in inputs.keys
            if isdefined(getattr(inputs, key))
        ]

        root.mkdir(parents=True, exist_ok=True)
        staging_root = root / STAGING
        staging_root.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=staging_root))
        written = []
        try:
            for derivative, src in files:
                name = derivative.filename(prefix)
                if derivative.dtype is None:
                    shutil.copyfile(src, staging / name)
                else:
                    img = nb.load(src)
                    data = np.asanyarray(img.dataobj)
                    save_image(data, img, staging / name, dtype=np.dtype(derivative.dtype).type)
                json_name = derivative.sidecar_name(prefix)
                sidecar = compose_sidecar(derivative, records, provenance)
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
        self._results["out_files"] = [str(Path(inputs.out_dir) / name) for name in sorted(written)]
        return runtime
