"""Head-motion correction workflow."""

from __future__ import annotations

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from aslprep_lite.interfaces.hmc import ApplyHeadMotion, EstimateHeadMotion


def init_hmc_wf(*, omp_nthreads: int, seed: int, mem_gb: float, name: str = "hmc_wf"):
    """Estimate rigid head motion per volume type and resample the series once.

    Inputs
    ------
    asl_file
        ASL series (dummy scans removed).
    context
        Volume type of each volume (aslcontext).

    Outputs
    -------
    asl_file
        Motion-corrected series.
    reference
        Motion-corrected mean of the reference volume type.
    transforms
        ``.npy`` of (T, 4, 4) RAS reference-to-volume matrices.
    note
        What was registered, or why registration was skipped.
    skipped
        True when no volume was registered.
    """
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = (
        "Head motion was estimated with a rigid-body registration of every volume "
        "(SimpleITK; Lowekamp et al. 2013), separately for each volume type since control, "
        "label and M0 images differ in contrast: each volume was registered to the mean of "
        "its type (normalized correlation), and each type's mean to the reference, the mean "
        "control image (mutual information for M0 volumes; Mattes et al. 2003). The series "
        "was resampled once, with cubic B-spline interpolation, applying each volume's transform."
    )
    inputnode = pe.Node(IdentityInterface(fields=["asl_file", "context"]), name="inputnode")
    outputnode = pe.Node(
        IdentityInterface(fields=["asl_file", "reference", "transforms", "note", "skipped"]),
        name="outputnode",
    )
    estimate = pe.Node(
        EstimateHeadMotion(seed=seed, n_threads=omp_nthreads),
        name="estimate",
        n_procs=omp_nthreads,
        mem_gb=mem_gb,
    )
    apply = pe.Node(
        ApplyHeadMotion(n_threads=omp_nthreads), name="apply", n_procs=omp_nthreads, mem_gb=mem_gb
    )
    workflow.connect([
        (inputnode, estimate, [("asl_file", "in_file"), ("context", "context")]),
        (inputnode, apply, [("asl_file", "in_file")]),
        (estimate, apply, [("transforms_file", "transforms_file")]),
        (apply, outputnode, [("out_file", "asl_file")]),
        (estimate, outputnode, [
            ("reference_file", "reference"),
            ("transforms_file", "transforms"),
            ("note", "note"),
            ("skipped", "skipped"),
        ]),
    ])  # fmt: skip
    return workflow
