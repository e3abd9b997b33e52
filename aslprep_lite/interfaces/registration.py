"""One generic rigid-registration node over :mod:`aslprep_lite.quant.registration`.

It aligns any 3D image (the mean of a 4D one) to another: the M0 scan to the ASL reference
today, the ASL reference to the T1w next. Head-motion correction runs the same engine
(:func:`~aslprep_lite.quant.registration.estimate_motion`) over a whole series.
"""

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

from aslprep_lite.errors import AslprepError
from aslprep_lite.images import load_image, load_volume
from aslprep_lite.quant.registration import register_rigid


class _RigidInputSpec(BaseInterfaceInputSpec):
    fixed_file = File(exists=True, mandatory=True, desc="reference image (3D)")
    moving_file = File(exists=True, mandatory=True, desc="image to align (3D, or 4D: its mean)")
    moving_name = traits.Str("image", usedefault=True, desc="what the moving image is, for errors")
    fixed_name = traits.Str("reference", usedefault=True, desc="what the fixed image is")
    metric = traits.Enum("mi", "correlation", usedefault=True, desc="similarity metric")
    seed = traits.Int(mandatory=True, desc="sampling seed of the metric")
    n_threads = traits.Int(1, usedefault=True, desc="ITK threads")


class _RigidOutputSpec(TraitedSpec):
    matrix_file = File(exists=True, desc="4x4 RAS matrix, fixed world to moving world (.npy)")


class RigidRegistration(SimpleInterface):
    """Rigidly register a moving image to a fixed one (SimpleITK, scanner-geometry start)."""

    input_spec = _RigidInputSpec
    output_spec = _RigidOutputSpec

    def _run_interface(self, runtime):
        fixed, fixed_img = load_image(self.inputs.fixed_file)
        moving, moving_img = load_volume(self.inputs.moving_file, self.inputs.moving_name)
        try:
            matrix = register_rigid(
                fixed,
                fixed_img.affine,
                moving,
                moving_img.affine,
                metric=self.inputs.metric,
                seed=self.inputs.seed,
                n_threads=self.inputs.n_threads,
            )
        except RuntimeError:  # ITK: no overlap, or no usable metric samples
            raise AslprepError(
                f"cannot be aligned to the {self.inputs.fixed_name} (the images do not overlap "
                f"in space): check that the {self.inputs.moving_name} and the "
                f"{self.inputs.fixed_name} share a field of view and that their NIfTI affines "
                "are right",
                path=self.inputs.moving_file,
            ) from None
        self._results["matrix_file"] = os.path.join(runtime.cwd, "matrix.npy")
        np.save(self._results["matrix_file"], matrix)
        return runtime
