"""The BIDS-App command line: ``aslprep-lite BIDS_DIR OUTPUT_DIR {participant,group}``."""

from __future__ import annotations

import argparse

from aslprep_lite import __version__
from aslprep_lite.config import PAIR_AVERAGES, QuantificationOptions
from aslprep_lite.spaces import DEFAULT_OUTPUT_SPACES

#: The defaults of every processing option, defined once in the config.
_DEFAULTS = QuantificationOptions()


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (its ``--help`` is the usage reference)."""
    parser = argparse.ArgumentParser(
        prog="aslprep-lite",
        description=(
            "aslprep_lite: arterial spin labeling MRI to calibrated cerebral blood flow "
            "(mL/100 g/min). Reads a BIDS dataset (never writes to it) and writes a "
            "BIDS-Derivatives dataset."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("bids_dir", help="the root of the input BIDS dataset (read only)")
    parser.add_argument("output_dir", help="where the derivatives are written")
    parser.add_argument(
        "analysis_level",
        choices=["participant", "group"],
        help="'participant' processes each participant; 'group' (after it) flags outlier "
        "runs from their QC tables, averages the template-space CBF maps and writes "
        "group.html",
    )
    parser.add_argument("--version", action="version", version=f"aslprep-lite {__version__}")

    sel = parser.add_argument_group("selecting data")
    sel.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        metavar="LABEL",
        help="participants to process, with or without 'sub-' (default: all)",
    )
    sel.add_argument(
        "--session-label",
        nargs="+",
        metavar="LABEL",
        help="sessions to process, with or without 'ses-' (default: all)",
    )
    sel.add_argument(
        "--bids-filter-file",
        metavar="FILE",
        help='JSON of pybids entity filters for the ASL files, e.g. {"asl": {"run": 1}}',
    )

    proc = parser.add_argument_group("processing")
    proc.add_argument(
        "--m0-scale",
        type=float,
        default=_DEFAULTS.m0_scale,
        metavar="FACTOR",
        help="multiply the M0 by this factor before calibration (vendor scaling)",
    )
    proc.add_argument(
        "--smooth-kernel",
        type=float,
        default=_DEFAULTS.smooth_kernel,
        metavar="FWHM_MM",
        help="FWHM (mm) of the Gaussian smoothing of M0 within the brain mask; 0 disables",
    )
    proc.add_argument(
        "--dummy-scans",
        type=int,
        default=_DEFAULTS.dummy_scans,
        metavar="N",
        help="discard the first N volumes of each ASL series (non-steady state)",
    )
    proc.add_argument(
        "--m0-calibration",
        choices=["voxel", "csf", "wm"],
        default=_DEFAULTS.m0_calibration,
        help="calibrate voxel by voxel with the M0 image, or with one arterial-blood M0 from a "
        "reference region (CSF or white matter), as oxford_asl's asl_calib",
    )
    proc.add_argument(
        "--m0-reference-mask",
        metavar="FILE",
        help="NIfTI mask of the reference region on the ASL grid for --m0-calibration csf|wm "
        "(without it, the region comes from the T1w segmentation)",
    )
    proc.add_argument(
        "--att-method",
        choices=["fit", "weighted-delay"],
        default=_DEFAULTS.att_method,
        help="multi-delay runs: arterial transit time by the kinetic-model fit, or by the "
        "weighted delay (Dai et al. 2012) with CBF then fitted at that ATT",
    )
    proc.add_argument(
        "--att-prior",
        choices=["local", "none"],
        default=_DEFAULTS.att_prior,
        help="multi-delay runs fitted with --att-method fit: shrink each voxel's ATT toward "
        "the ATTs around it by an empirical-Bayes Gaussian prior estimated from a first "
        "least-squares fit (local), or plain least squares (none)",
    )
    proc.add_argument(
        "--arterial-component",
        action="store_true",
        help="multi-delay runs: also fit a macrovascular (arterial) component, giving arterial "
        "blood volume (aBV) and its arrival time (aBAT)",
    )
    proc.add_argument(
        "--pair-average",
        choices=list(PAIR_AVERAGES),
        default=_DEFAULTS.pair_average,
        help="single-delay runs: average the per-pair ΔM (CBF) volumes by their mean, or by "
        "the Huber M-estimate (k = 1.345, MAD scale; Huber 1964), which caps the pull of "
        "outlying pairs (measured no better than the mean on our simulations)",
    )
    proc.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the data and print the per-run plan as JSON; process nothing",
    )

    anat = parser.add_argument_group("anatomy and output spaces")
    # Left out of the namespace unless given (argparse.SUPPRESS): build_settings applies the
    # defaults of the config, and --help does not print a misleading "(default: None/True)".
    anat.add_argument(
        "--output-spaces",
        nargs="+",
        metavar="SPACE",
        default=argparse.SUPPRESS,
        help="spaces to write the derivatives in, separated by blanks: 'asl' (the run's own "
        "grid; files without a space- entity), 'T1w' (the participant's T1w grid) or a "
        "TemplateFlow template TEMPLATE[:cohort-N][:res-N], modifiers in any order "
        "(e.g. MNIPediatricAsym:cohort-2:res-1); a template without res- is written at res-2. "
        "Templates other than MNI152NLin2009aSym (embedded, works offline) need "
        "TEMPLATEFLOW_HOME set to a pre-fetched TemplateFlow folder (default: "
        f"{' '.join(DEFAULT_OUTPUT_SPACES)})",
    )
    anat.add_argument(
        "--anat-derivatives",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="reuse the anatomy of a finished sMRIPrep/fMRIPrep run: preprocessed T1w, brain "
        "mask, segmentation and T1w<->template transforms",
    )
    anat.add_argument(
        "--no-pvc",
        dest="pvc",
        action="store_false",
        default=argparse.SUPPRESS,
        help="do not write partial-volume corrected GM and WM CBF maps (written by default "
        "when a T1w exists)",
    )

    perf = parser.add_argument_group("performance and execution")
    perf.add_argument(
        "-w",
        "--work-dir",
        metavar="DIR",
        help="nipype working directory; reuse it to resume (default: OUTPUT_DIR_work)",
    )
    perf.add_argument(
        "--nprocs",
        "--n-cpus",
        type=int,
        metavar="N",
        help="processes nipype may run at once (default: all CPUs)",
    )
    perf.add_argument(
        "--omp-nthreads",
        type=int,
        metavar="N",
        help="threads a single process may use (default: --nprocs)",
    )
    perf.add_argument(
        "--mem-gb",
        type=float,
        metavar="GB",
        help="memory nipype may schedule against (default: all available)",
    )
    perf.add_argument(
        "--use-plugin",
        metavar="FILE",
        help="nipype execution plugin settings, YAML such as 'plugin: SLURM' and "
        "'plugin_args: {sbatch_args: \"--mem=4G\"}' (default: MultiProc with --nprocs)",
    )
    perf.add_argument(
        "--stop-on-first-crash",
        action="store_true",
        help="stop at the first failing step instead of finishing the other runs",
    )

    log = parser.add_argument_group("messages")
    log.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more messages; with -v errors also show their traceback",
    )
    log.add_argument("-q", "--quiet", action="count", default=0, help="fewer messages")
    return parser
