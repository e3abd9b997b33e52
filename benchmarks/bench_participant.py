"""End-to-end benchmark of ``aslprep-lite BIDS OUT participant`` on synthetic data.

Writes a synthetic PCASL dataset with a known CBF (:mod:`aslprep_lite.synthetic`), runs the
real command line as a subprocess and prints, for each run:

* the wall time of the command (data generation is timed separately and not included);
* the peak resident memory of the largest single process of the command's process tree
  (``ru_maxrss`` of the child and its waited-for descendants, from ``wait4``; the maximum
  over all runs is cross-checked against ``getrusage(RUSAGE_CHILDREN)``). nipype's MultiProc
  workers are separate processes, so the total of the tree at a given moment can be higher;
* the grey-matter CBF: the mean of ``sub-01/perf/sub-01_cbf.nii.gz`` over the true GM mask,
  against the mean of the true CBF over the same mask, and the relative error.

Cases: ``standard`` (80 volumes = 40 pairs, 64x64x24 at 3.5x3.5x5 mm, separate M0,
background suppression with 4 pulses, 1 mm/1 degree motion, seed 0) and ``small``
(32x32x12, 8 pairs, otherwise the same). ``--shape`` and ``--pairs`` override the size.

Usage::

    python benchmarks/bench_participant.py [--case small] [--nprocs 2] [--repeats 3]
                                           [--keep DIR] [--shape X Y Z] [--pairs N]

Exit status 0 on success, 1 when the command line fails (its stderr is printed).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from aslprep_lite.synthetic import SyntheticSpec, SyntheticTruth, write_dataset

CASES: dict[str, dict] = {
    "standard": {"shape": (64, 64, 24), "n_pairs": 40},
    "small": {"shape": (32, 32, 12), "n_pairs": 8},
}
TARGET_WALL_S = 30.0
TARGET_MEM_GB = 2.0


@dataclass
class RunResult:
    """Figures of one run of the command line."""

    wall_s: float
    peak_rss_mb: float
    gm_cbf: float
    returncode: int
    stderr: str


def make_spec(shape: tuple[int, int, int], n_pairs: int) -> SyntheticSpec:
    """The benchmark series: PCASL, separate M0, background suppression, 1 mm motion."""
    return SyntheticSpec(
        subject="01",
        asl_type="PCASL",
        m0_type="Separate",
        n_pairs=n_pairs,
        shape=shape,
        zooms=(3.5, 3.5, 5.0),
        background_suppression=True,
        bs_pulses=4,
        motion_mm=1.0,
        seed=0,
    )


def cli_executable() -> str:
    """The ``aslprep-lite`` script of the running interpreter's environment."""
    candidate = Path(sys.executable).parent / "aslprep-lite"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("aslprep-lite")
    if found is None:
        sys.exit("bench_participant: cannot find the aslprep-lite command")
    return found


def run_cli(bids: Path, out: Path, work: Path, nprocs: int) -> tuple[float, float, int, str]:
    """Run the CLI once; return (wall s, peak RSS MB of the largest process, rc, stderr)."""
    cmd = [cli_executable(), str(bids), str(out), "participant", "-w", str(work)]
    cmd += ["--nprocs", str(nprocs)]
    err_path = work.parent / f"{work.name}.stderr"
    work.parent.mkdir(parents=True, exist_ok=True)
    with open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        # wait4 reports ru_maxrss of this child including its waited-for descendants, so each
        # repeat gets its own figure (RUSAGE_CHILDREN only ever grows across repeats).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: tell Popen
    return wall, usage.ru_maxrss / 1024.0, proc.returncode, err_path.read_text(errors="replace")


def gm_cbf(out: Path, truth: SyntheticTruth) -> float:
    """Mean output CBF over the true grey-matter mask."""
    image = nib.load(out / "sub-01" / "perf" / "sub-01_cbf.nii.gz")
    data = np.asarray(image.dataobj, dtype=np.float64)
    if data.shape != truth.gm_mask.shape:
        raise ValueError(f"output CBF shape {data.shape} != truth {truth.gm_mask.shape}")
    return float(data[truth.gm_mask].mean())


def benchmark(
    root: Path, shape: tuple[int, int, int], n_pairs: int, nprocs: int, repeats: int
) -> tuple[float, float, list[RunResult]]:
    """Generate the data under ``root`` and run the CLI ``repeats`` times."""
    start = time.perf_counter()
    (truth,) = write_dataset(root / "bids", [make_spec(shape, n_pairs)])
    generation_s = time.perf_counter() - start
    true_gm = float(truth.cbf[truth.gm_mask].mean())

    results = []
    for k in range(1, repeats + 1):
        out, work = root / f"run-{k}" / "out", root / f"run-{k}" / "work"
        for path in (out, work):  # a fresh work dir for every run
            shutil.rmtree(path, ignore_errors=True)
        wall, peak, rc, stderr = run_cli(root / "bids", out, work, nprocs)
        cbf = float("nan")
        if rc == 0:
            try:
                cbf = gm_cbf(out, truth)
            except (OSError, ValueError) as err:  # exit 0 but no usable CBF: a failure too
                rc, stderr = 1, f"{stderr}\nbench_participant: {err}"
        results.append(RunResult(wall, peak, cbf, rc, stderr))
        if rc != 0:
            break
    return generation_s, true_gm, results


def report(
    case: str,
    shape: tuple[int, int, int],
    n_pairs: int,
    nprocs: int,
    generation_s: float,
    true_gm: float,
    results: Sequence[RunResult],
) -> None:
    """Print the aligned table of figures."""
    shape_text = "x".join(map(str, shape))
    print(
        f"case {case}: {2 * n_pairs} volumes ({n_pairs} pairs) {shape_text} @ 3.5x3.5x5 mm, "
        f"PCASL, separate M0, BS 4 pulses, motion 1 mm, seed 0; --nprocs {nprocs}"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}"
    )
    print(f"data generation (not in wall time): {generation_s:.2f} s")
    print("peak RSS = largest single process of the CLI's tree (ru_maxrss), not the sum\n")

    header = f"{'run':>6}  {'wall (s)':>9}  {'peak RSS (MB)':>13}  {'GM CBF':>8}  {'err %':>7}"
    print(header)
    print("-" * len(header))

    def row(label: str, wall: float, peak: float, cbf: float) -> None:
        err = 100.0 * (cbf - true_gm) / true_gm
        print(f"{label:>6}  {wall:9.2f}  {peak:13.0f}  {cbf:8.2f}  {err:+7.2f}")

    for k, r in enumerate(results, start=1):
        row(str(k), r.wall_s, r.peak_rss_mb, r.gm_cbf)
    if len(results) > 1:
        print("-" * len(header))
        row(
            "median",
            statistics.median(r.wall_s for r in results),
            statistics.median(r.peak_rss_mb for r in results),
            statistics.median(r.gm_cbf for r in results),
        )
    print(f"{'truth':>6}  {'':>9}  {'':>13}  {true_gm:8.2f}")

    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    print(f"\nRUSAGE_CHILDREN max RSS over all runs: {children_mb:.0f} MB")
    if case == "standard":
        wall = statistics.median(r.wall_s for r in results)
        peak = max(r.peak_rss_mb for r in results) / 1024.0
        print(
            f"targets (standard case, 2 cores): wall <= {TARGET_WALL_S:.0f} s "
            f"[{'ok' if wall <= TARGET_WALL_S else 'MISSED'}], "
            f"memory <= {TARGET_MEM_GB:.0f} GB [{'ok' if peak <= TARGET_MEM_GB else 'MISSED'}]"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="standard")
    parser.add_argument("--nprocs", type=int, default=2, help="passed to aslprep-lite")
    parser.add_argument("--repeats", type=int, default=1, help="runs, each with a fresh work dir")
    parser.add_argument("--keep", metavar="DIR", help="write and keep all files under DIR")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"))
    parser.add_argument("--pairs", type=int, metavar="N", help="control/label pairs")
    options = parser.parse_args(argv)
    if options.repeats < 1 or options.nprocs < 1:
        parser.error("--repeats and --nprocs must be >= 1")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    options = parse_args(argv)
    case = CASES[options.case]
    shape = tuple(options.shape) if options.shape else case["shape"]
    n_pairs = options.pairs if options.pairs else case["n_pairs"]
    label = options.case if (options.shape, options.pairs) == (None, None) else "custom"

    if options.keep:
        root = Path(options.keep).resolve()
        root.mkdir(parents=True, exist_ok=True)
        generation_s, true_gm, results = benchmark(
            root, shape, n_pairs, options.nprocs, options.repeats
        )
    else:
        with tempfile.TemporaryDirectory(prefix="aslprep_bench_") as tmp:
            generation_s, true_gm, results = benchmark(
                Path(tmp), shape, n_pairs, options.nprocs, options.repeats
            )

    failed = [r for r in results if r.returncode != 0]
    if failed:
        print(f"aslprep-lite failed (exit {failed[0].returncode}); its stderr:", file=sys.stderr)
        print(failed[0].stderr, file=sys.stderr)
        return 1
    report(label, shape, n_pairs, options.nprocs, generation_s, true_gm, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
