"""Motion confounds table: six parameters, framewise displacement and RMS deviation."""

from __future__ import annotations

import os

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from aslprep_lite.quant.motion import (
    PARAMETER_NAMES,
    framewise_displacement,
    image_center,
    matrix_to_parameters,
    rms_deviation,
)

COLUMNS = (*PARAMETER_NAMES, "framewise_displacement", "rmsd")
COLUMN_DESCRIPTIONS = {
    "trans_x": ("Translation along x (RAS) of the volume relative to the reference", "mm"),
    "trans_y": ("Translation along y (RAS) of the volume relative to the reference", "mm"),
    "trans_z": ("Translation along z (RAS) of the volume relative to the reference", "mm"),
    "rot_x": ("Rotation about x (RAS) relative to the reference, about its centre", "rad"),
    "rot_y": ("Rotation about y (RAS) relative to the reference, about its centre", "rad"),
    "rot_z": ("Rotation about z (RAS) relative to the reference, about its centre", "rad"),
    "framewise_displacement": (
        "Framewise displacement (Power et al. 2012), rotations on a 50 mm sphere",
        "mm",
    ),
    "rmsd": (
        "Root-mean-square displacement relative to the previous volume over an 80 mm "
        "sphere (Jenkinson et al. 2002)",
        "mm",
    ),
}


def format_table(values: np.ndarray) -> str:
    """Tab-separated text with a header, fixed precision, ``n/a`` for NaN."""
    lines = ["\t".join(COLUMNS)]
    for row in values:
        lines.append("\t".join("n/a" if np.isnan(v) else f"{v:.6f}" for v in row))
    return "\n".join(lines) + "\n"


class _ConfoundsInputSpec(BaseInterfaceInputSpec):
    transforms_file = File(exists=True, mandatory=True)
    reference_file = File(exists=True, mandatory=True)
    hmc_summary = traits.Str(mandatory=True, desc="head-motion correction summary")
    hmc_skipped = traits.Bool(mandatory=True, desc="no volume was registered")


class _ConfoundsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="confounds TSV")
    metadata = traits.Dict(desc="sidecar of the TSV")


class MotionConfounds(SimpleInterface):
    """Write the motion confounds of a run; all ``n/a`` when registration was skipped."""

    input_spec = _ConfoundsInputSpec
    output_spec = _ConfoundsOutputSpec

    def _run_interface(self, runtime):
        matrices = np.load(self.inputs.transforms_file)
        reference = nb.load(self.inputs.reference_file)
        if self.inputs.hmc_skipped:
            values = np.full((matrices.shape[0], len(COLUMNS)), np.nan)
        else:
            center = image_center(reference.shape, reference.affine)
            params = matrix_to_parameters(matrices, center)
            values = np.column_stack(
                [params, framewise_displacement(params), rms_deviation(matrices, center)]
            )
        out_file = os.path.join(runtime.cwd, "confounds.tsv")
        with open(out_file, "w") as fobj:
            fobj.write(format_table(values))
        self._results["out_file"] = out_file
        metadata = {
            name: {"Description": desc, "Units": units}
            for name, (desc, units) in COLUMN_DESCRIPTIONS.items()
        }
        metadata["HeadMotionCorrection"] = self.inputs.hmc_summary
        self._results["metadata"] = metadata
        return runtime
