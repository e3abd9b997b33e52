"""Loading the ASL series: integrity checks and dummy-scan removal."""

from __future__ import annotations

import logging
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
from aslprep_lite.images import load_image, save_image

LOGGER = logging.getLogger("aslprep_lite")


class _LoadAslSeriesInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the raw ASL series (read, never written)")
    n_volumes = traits.Int(mandatory=True, desc="volumes the aslcontext lists")
    dummy_scans = traits.Int(0, usedefault=True, desc="volumes dropped from the start")


class _LoadAslSeriesOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="float32 series without dummy scans")


class LoadAslSeries(SimpleInterface):
    """Read the ASL series once, check it, drop the dummy scans."""

    input_spec = _LoadAslSeriesInputSpec
    output_spec = _LoadAslSeriesOutputSpec

    def _run_interface(self, runtime):
        path = self.inputs.in_file
        data, img = load_image(path, what="ASL series")
        if data.ndim != 4 or data.shape[3] != self.inputs.n_volumes:
            raise AslprepError(
                f"has shape {data.shape}; expected {self.inputs.n_volumes} volumes", path=path
            )
        data = data[..., self.inputs.dummy_scans :]
        finite = np.isfinite(data)
        if not finite.any():
            raise AslprepError("contains no finite values (all NaN/inf)", path=path)
        if not finite.all():
            LOGGER.warning("%s: %d non-finite voxel values set to 0", path, int((~finite).sum()))
            data = np.where(finite, data, 0.0).astype(np.float32)
        if float(data.max()) == float(data.min()):
            raise AslprepError("is constant: it holds no image", path=path)
        self._results["out_file"] = save_image(
            data, img, os.path.join(runtime.cwd, "asl_series.nii")
        )
        return runtime
