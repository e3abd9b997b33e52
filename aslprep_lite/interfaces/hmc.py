"""Head-motion correction nodes over :mod:`aslprep_lite.quant.registration`."""

from __future__ import annotations

import os

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from aslprep_lite.images import load_image, save_image
from aslprep_lite.quant.registration import estimate_motion, resample_series


class _EstimateInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="ASL series")
    context = traits.List(traits.Str, mandatory=True, desc="volume type of each volume")
    seed = traits.Int(mandatory=True, desc="sampling seed of the registration metric")
    n_threads = traits.Int(1, usedefault=True, desc="ITK threads")


class _EstimateOutputSpec(TraitedSpec):
    transforms_file = File(exists=True, desc="(T, 4, 4) RAS reference-to-volume matrices, .npy")
    reference_file = File(exists=True, desc="motion-corrected reference image")
    hmc_summary = traits.Str(desc="what was registered, or why not")
    hmc_skipped = traits.Bool(desc="no volume was registered")


class EstimateHeadMotion(SimpleInterface):
    """Rigid motion per volume, estimated separately for each volume type."""

    input_spec = _EstimateInputSpec
    output_spec = _EstimateOutputSpec

    def _run_interface(self, runtime):
        data, img = load_image(self.inputs.in_file)
        estimate = estimate_motion(
            data,
            img.affine,
            self.inputs.context,
            seed=self.inputs.seed,
            n_threads=self.inputs.n_threads,
        )
        transforms = os.path.join(runtime.cwd, "transforms.npy")
        np.save(transforms, estimate.matrices)
        self._results["transforms_file"] = transforms
        self._results["reference_file"] = save_image(
            estimate.reference, img, os.path.join(runtime.cwd, "reference.nii")
        )
        self._results["hmc_summary"] = estimate.note
        self._results["hmc_skipped"] = not any(estimate.registered)
        return runtime


class _ApplyInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="ASL series")
    transforms_file = File(exists=True, mandatory=True, desc="matrices from EstimateHeadMotion")
    n_threads = traits.Int(1, usedefault=True, desc="ITK threads")


class _ApplyOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="motion-corrected series (one resampling)")


class ApplyHeadMotion(SimpleInterface):
    """Resample every volume once onto the reference grid."""

    input_spec = _ApplyInputSpec
    output_spec = _ApplyOutputSpec

    def _run_interface(self, runtime):
        data, img = load_image(self.inputs.in_file)
        matrices = np.load(self.inputs.transforms_file)
        corrected = resample_series(data, img.affine, matrices, n_threads=self.inputs.n_threads)
        self._results["out_file"] = save_image(
            corrected, img, os.path.join(runtime.cwd, "asl_hmc.nii")
        )
        return runtime
