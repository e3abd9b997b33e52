"""Writing a run's derivatives: all or nothing, never a mix of old and new files."""

from __future__ import annotations

import json
import os
import re
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
from aslprep_lite.bids.derivatives import (
    ANAT_BY_KEY,
    ANAT_DERIVATIVES,
    ASL_DERIVATIVES,
    BY_KEY,
    compose_sidecar,
    coregistration_transform,
    in_space,
    template_transforms,
)
from aslprep_lite.images import save_image
from aslprep_lite.spaces import parse_space

STAGING = ".aslprep_lite-staging"
#: Entities of raw file names that no derivative name starts with after a run's prefix.
_RAW_ENTITY = re.compile(r"(ses|task|acq|ce|rec|dir|run|echo|part|trc|inv|mt|flip)-")


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
    tissue_metadata = traits.Dict(desc="tissue CBF means, merged into the CBF sidecars")
    pvc_metadata = traits.Dict(desc="the partial-volume correction's record")
    coregistration_metadata = traits.Dict(desc="the registration's record")
    resampled = traits.List(traits.Dict, desc="maps in other spaces (ResampleToSpaces)")
    xfm_targets = traits.List(traits.Str, desc="what the ASL reference was registered to")
    xfm_files = traits.List(File(exists=True), desc="the ITK transforms, in that order")
    qc_metadata = traits.Dict(desc="the quality-control table's sidecar")
    score_metadata = traits.Dict(desc="the SCORE/SCRUB maps' sidecar fields")
    xfm_records = traits.List(
        traits.Dict, desc="T1w-free: each target's registration record, in that order"
    )


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

        def optional(name: str) -> dict:
            value = getattr(inputs, name)
            return value if isdefined(value) else {}

        records = {
            "quantification": {**inputs.cbf_metadata, **optional("tissue_metadata")},
            "pvc": optional("pvc_metadata"),
            "coregistration": optional("coregistration_metadata"),
            "qc": optional("qc_metadata"),
            "score": optional("score_metadata"),
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
            (BY_KEY[key], getattr(inputs, key), records)
            for key in inputs.keys
            if isdefined(getattr(inputs, key))
        ]
        for item in inputs.resampled if isdefined(inputs.resampled) else []:
            derivative = in_space(BY_KEY[item["key"]], parse_space(item["space"]))
            own = {**records, "space": item["record"]}
            if "coregistration" in item:  # T1w-free: that template's own registration
                own["coregistration"] = item["coregistration"]
            files.append((derivative, item["file"], own))
        targets = inputs.xfm_targets if isdefined(inputs.xfm_targets) else []
        paths = inputs.xfm_files if isdefined(inputs.xfm_files) else []
        xfm_records = inputs.xfm_records if isdefined(inputs.xfm_records) else []
        for index, (target, path) in enumerate(zip(targets, paths, strict=True)):
            own = {**records, "coregistration": xfm_records[index]} if xfm_records else records
            files.append((coregistration_transform(target), path, own))

        written = stage_and_move(root, inputs.out_dir, prefix, files, provenance)
        self._results["out_files"] = [str(Path(inputs.out_dir) / name) for name in sorted(written)]
        return runtime


def stage_and_move(
    root: Path, out_dir: str, prefix: str, files: list[tuple], provenance: dict
) -> list[str]:
    """Write ``files`` (derivative, source, sidecar records) staged, then move them in place.

    Returns the names written (images and sidecars). Files of ``prefix`` in the folder that
    are not among them (written by an older version or other options) are removed.
    """
    target = root / out_dir
    root.mkdir(parents=True, exist_ok=True)
    staging_root = root / STAGING
    for attempt in range(10):
        # another writer may remove the (empty) staging root between mkdir and mkdtemp
        staging_root.mkdir(exist_ok=True)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=staging_root))
            break
        except FileNotFoundError:
            if attempt == 9:
                raise
    written = []
    try:
        for derivative, src, sidecar_records in files:
            name = derivative.filename(prefix)
            if derivative.dtype is None:
                shutil.copyfile(src, staging / name)
            else:
                img = nb.load(src)
                data = np.asanyarray(img.dataobj)
                save_image(data, img, staging / name, dtype=np.dtype(derivative.dtype).type)
            json_name = derivative.sidecar_name(prefix)
            sidecar = compose_sidecar(derivative, sidecar_records, provenance)
            (staging / json_name).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
            written += [name, json_name]
        target.mkdir(parents=True, exist_ok=True)
        for old in target.glob(f"{prefix}_*"):
            # another run of the folder (sub-01 vs sub-01_acq-b) continues with a raw entity
            other_run = _RAW_ENTITY.match(old.name[len(prefix) + 1 :])
            if old.name not in written and old.is_file() and not other_run:
                old.unlink()
        for name in sorted(written):
            os.replace(staging / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging_root.rmdir()
        except OSError:
            pass  # another run is still staging
    return written


class _WriteAnatomyInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True, desc="root of the derivatives dataset")
    out_dir = traits.Str(mandatory=True, desc="the participant's anat folder, relative")
    prefix = traits.Str(mandatory=True, desc="sub-<label>")
    sources = traits.List(traits.Str, mandatory=True, desc="BIDS URIs of the raw T1w")
    record = traits.Dict(mandatory=True, desc="the anatomy's record (every sidecar)")
    templates = traits.List(traits.Str, desc="templates the T1w was normalized to")
    forward_xfms = traits.List(File(exists=True), desc="from-T1w_to-<template>, in order")
    inverse_xfms = traits.List(File(exists=True), desc="from-<template>_to-T1w, in order")
    normalizations = traits.List(traits.Dict, desc="each normalization's record, in order")


for _derivative in ANAT_DERIVATIVES:
    _WriteAnatomyInputSpec.add_class_trait(_derivative.key, File(exists=True, mandatory=True))


class WriteAnatomy(SimpleInterface):
    """A participant's anatomical derivatives, staged then moved into place."""

    input_spec = _WriteAnatomyInputSpec
    output_spec = _WriteOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        records = {"anatomy": inputs.record}
        files = [(ANAT_BY_KEY[d.key], getattr(inputs, d.key), records) for d in ANAT_DERIVATIVES]
        templates = inputs.templates if isdefined(inputs.templates) else []
        normalizations = inputs.normalizations if isdefined(inputs.normalizations) else []
        for index, (template, forward, inverse) in enumerate(
            zip(templates, inputs.forward_xfms or [], inputs.inverse_xfms or [], strict=True)
        ):
            to_template, from_template = template_transforms(template)
            # every normalization's record (the second template's too) beside its transforms
            own = {"anatomy": {"Normalization": normalizations[index]}} if normalizations else {}
            files += [(to_template, forward, own), (from_template, inverse, own)]
        provenance = {
            "Sources": list(inputs.sources),
            "ProcessingParameters": {
                "SoftwareName": "aslprep_lite",
                "SoftwareVersion": __version__,
            },
        }
        written = stage_and_move(
            Path(inputs.output_dir), inputs.out_dir, inputs.prefix, files, provenance
        )
        self._results["out_files"] = [str(Path(inputs.out_dir) / name) for name in sorted(written)]
        return runtime
