"""Confounds workflow: motion parameters, framewise displacement, RMS deviation."""

from __future__ import annotations

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from aslprep_lite.interfaces.confounds import MotionConfounds


def init_confounds_wf(name: str = "confounds_wf"):
    """Tabulate head-motion confounds of a run.

    Inputs
    ------
    transforms
        ``.npy`` of (T, 4, 4) RAS matrices from the head-motion correction.
    reference
        Reference image (its centre is the centre of rotation).
    hmc_summary
        Head-motion correction summary, recorded in the sidecar.
    hmc_skipped
        True when nothing was registered: the table is then all ``n/a``.

    Outputs
    -------
    confounds_file
        ``desc-confounds_timeseries.tsv`` content.
    confounds_metadata
        Its sidecar: column descriptions and units.
    """
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = (
        "Six rigid-body motion parameters (mm, rad) were tabulated per volume together with "
        "framewise displacement (Power et al. 2012) and the root-mean-square deviation between "
        "consecutive volumes (Jenkinson et al. 2002)."
    )
    inputnode = pe.Node(
        IdentityInterface(fields=["transforms", "reference", "hmc_summary", "hmc_skipped"]),
        name="inputnode",
    )
    outputnode = pe.Node(
        IdentityInterface(fields=["confounds_file", "confounds_metadata"]), name="outputnode"
    )
    confounds = pe.Node(MotionConfounds(), name="motion_confounds")
    workflow.connect([
        (inputnode, confounds, [
            ("transforms", "transforms_file"),
            ("reference", "reference_file"),
            ("hmc_summary", "hmc_summary"),
            ("hmc_skipped", "hmc_skipped"),
        ]),
        (confounds, outputnode, [
            ("out_file", "confounds_file"),
            ("metadata", "confounds_metadata"),
        ]),
    ])  # fmt: skip
    return workflow
