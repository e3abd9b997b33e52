"""Derivatives workflow: one node that writes a run's outputs all at once."""

from __future__ import annotations

from typing import Any

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from aslprep_lite.interfaces.outputs import WriteDerivatives

FIELDS = [
    "cbf",
    "cbf_timeseries",
    "mean_deltam",
    "m0",
    "mask",
    "confounds",
    "cbf_metadata",
    "m0_metadata",
    "confounds_metadata",
    "maps",
    "maps_metadata",
    "m0_reference_mask",
]


def init_outputs_wf(
    plan: dict[str, Any], *, output_dir: str, parameters: dict[str, Any], name: str = "outputs_wf"
):
    """Write the BIDS derivatives of one run (staged, then moved into place).

    Inputs
    ------
    cbf, cbf_timeseries, mean_deltam, m0, mask, confounds
        Work-directory files of the run.
    cbf_metadata, m0_metadata, confounds_metadata
        Sidecar content.

    Outputs
    -------
    out_files
        Files written, relative to the output directory.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=FIELDS), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=["out_files"]), name="outputnode")
    write = pe.Node(
        WriteDerivatives(plan=plan, output_dir=output_dir, settings=parameters),
        name="write_derivatives",
    )
    workflow.connect([
        (inputnode, write, [(f, f) for f in FIELDS]),
        (write, outputnode, [("out_files", "out_files")]),
    ])  # fmt: skip
    return workflow
