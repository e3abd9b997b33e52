"""Derivatives workflow: one node that writes a run's outputs all at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from aslprep_lite.bids.derivatives import ASL_DERIVATIVES
from aslprep_lite.interfaces.outputs import WriteDerivatives

#: Sidecar content coming from the other stages.
METADATA = [
    "cbf_metadata", "m0_metadata", "confounds_metadata", "maps_metadata", "tissue_metadata",
    "pvc_metadata", "coregistration_metadata", "resampled", "xfm_targets", "xfm_files",
    "qc_metadata", "score_metadata", "xfm_records",
]  # fmt: skip
#: One input per derivative of the output specification, named by its key.
FIELDS = [d.key for d in ASL_DERIVATIVES] + METADATA


def init_outputs_wf(
    *,
    output_dir: str,
    out_dir: str,
    prefix: str,
    keys: Sequence[str],
    sources: Sequence[str],
    parameters: dict[str, Any],
    name: str = "outputs_wf",
):
    """Write the BIDS derivatives of one run (staged, then moved into place).

    Parameters
    ----------
    output_dir, out_dir, prefix
        Derivatives root, the run's folder in it, the run's entities.
    keys
        Derivatives to write (:func:`aslprep_lite.bids.derivatives.planned_derivatives`).
    sources, parameters
        ``Sources`` and ``ProcessingParameters`` of every sidecar.

    Inputs
    ------
    <key> for each derivative of the output specification
        Work-directory file of that derivative (unset: not written).
    cbf_metadata, m0_metadata, confounds_metadata, maps_metadata, qc_metadata, score_metadata
        Sidecar content from the stages.

    Outputs
    -------
    out_files
        Files written, relative to the output directory.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=FIELDS), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=["out_files"]), name="outputnode")
    write = pe.Node(
        WriteDerivatives(
            output_dir=output_dir,
            out_dir=out_dir,
            prefix=prefix,
            keys=list(keys),
            sources=list(sources),
            parameters=parameters,
        ),
        name="write_derivatives",
    )
    workflow.connect([
        (inputnode, write, [(f, f) for f in FIELDS]),
        (write, outputnode, [("out_files", "out_files")]),
    ])  # fmt: skip
    return workflow
