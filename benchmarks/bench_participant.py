"""End-to-end benchmark of ``aslprep-lite BIDS OUT participant`` on synthetic data.

Writes a synthetic PCASL dataset with a known CBF (:mod:`aslprep_lite.synthetic`), runs the
real command line as a subprocess and prints, for each run:

* the wall time of the command (data generation is timed separately and not included);
* the peak resident memory of the largest single process of the command's process tree
  (``ru_maxrss`` of the child and its waited-for descendants, from ``wait4``; the maximum
  over all runs is cross-checked against ``getrusage(RUSAGE_CHILDREN)``). nipype's MultiProc
  workers are separate processes, so the total of the tree at a given moment can be higher:
  ``/proc`` is also sampled every 0.2 s for the largest sum of ``VmRSS`` over the tree and
  each process's own peak (``VmHWM``);
* the load average (``os.getloadavg()``) before and after each run, since the machine may be
  shared, and the slowest nipype nodes of the last run (``runtime.duration`` of the work
  directory's ``result_*.pklz``);
* the grey-matter CBF: the mean of ``sub-01/perf/sub-01_cbf.nii.gz`` over the true GM mask,
  against the mean of the true CBF over the same mask, and the relative error.

Cases: ``standard`` (80 volumes = 40 pairs, 64x64x24 at 3.5x3.5x5 mm, separate M0,
background suppression with 4 pulses, 1 mm/1 degree motion, seed 0; no T1w, so the default
output spaces run the T1w-free mode to the default template), ``small`` (32x32x12, 8 pairs,
otherwise the same) and ``anatomy`` (the same series on the ASL grid a synthetic subject with
a 1 mm T1w gives, 56x64x50 at 3.5x3.5x4 mm, plus its 176x256x256 T1w, run with
``--output-spaces asl T1w MNI152NLin2009aSym:res-2 MNI152NLin2009aSym:res-1``). ``--shape``
and ``--pairs`` override the size; ``--output-spaces`` is passed to the command line (default:
the case's, i.e. the command's own default except for ``anatomy``).

Usage::

    python benchmarks/bench_participant.py [--case {standard,small,anatomy}] [--nprocs 2]
                                           [--repeats 3] [--keep DIR] [--shape X Y Z]
                                           [--pairs N] [--output-spaces SPACE ...]

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
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from aslprep_lite.synthetic import AnatomySpec, SyntheticSpec, SyntheticTruth, write_dataset

#: Two template spaces (one normalization, two grids) plus the T1w: the issue's "whole
#: participant with a T1w and two output spaces".
ANATOMY_SPACES = ("asl", "T1w", "MNI152NLin2009aSym:res-2", "MNI152NLin2009aSym:res-1")
CASES: dict[str, dict] = {
    "standard": {"shape": (64, 64, 24), "n_pairs": 40},
    "small": {"shape": (32, 32, 12), "n_pairs": 8},
    # shape None: the grid SyntheticSpec gives a subject with an anatomy (56x64x50 @ 3.5x3.5x4)
    "anatomy": {"shape": None, "n_pairs": 40, "anatomy": True, "output_spaces": ANATOMY_SPACES},
}
#: Targets by case: (wall s, largest process GB). ``standard``: 2 cores, the issue before the
#: anatomy; ``anatomy``: the issue's whole participant (4 min, 3 GB).
TARGETS = {"standard": (30.0, 2.0), "anatomy": (240.0, 3.0)}
#: Before the anatomy (2026-11-26) the standard case took 15.5 s (median) and 306 MB.
BASELINE_STANDARD = (15.5, 306.0)
_SAMPLE_S = 0.2


@dataclass
class RunResult:
    """Figures of one run of the command line."""

    wall_s: float
    peak_rss_mb: float
    gm_cbf: float
    returncode: int
    stderr: str
    tree: TreeMemory | None = None
    load: tuple[tuple[float, ...], tuple[float, ...]] = ((), ())
    cpu_s: float = float("nan")  # user + system CPU time of the tree (wait4)


@dataclass
class TreeMemory:
    """Memory of a process tree sampled from ``/proc``."""

    max_sum_mb: float = 0.0  # largest sum of VmRSS over the tree at one sample
    processes: int = 0  # processes alive at that sample
    hwm_mb: dict[int, tuple[str, float]] | None = None  # pid -> (name, last VmHWM seen)
    cpu_s: dict[int, float] | None = None  # pid -> user + system CPU s, last seen
    root: int = 0  # the command's own process (nipype's scheduler)


def _proc_tree(root: int) -> list[int]:
    """``root`` and its descendants (from ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _cpu_s(pid: int) -> float | None:
    """User + system CPU time (s) of a process so far, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_mb(pid: int) -> tuple[str, float, float] | None:
    """(name, VmRSS MB, VmHWM MB) of a process, None when it is gone."""
    values = {"Name": "", "VmRSS": 0.0, "VmHWM": 0.0}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key == "Name":
                    values[key] = rest.strip()
                elif key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) / 1024.0
    except OSError:
        return None
    return values["Name"], values["VmRSS"], values["VmHWM"]


class TreeSampler(threading.Thread):
    """Sample the memory of a process tree every ``_SAMPLE_S`` s until stopped."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.result = TreeMemory(hwm_mb={}, cpu_s={}, root=root)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            total, alive = 0.0, 0
            for pid in _proc_tree(self.root):
                status = _status_mb(pid)
                if status is None:
                    continue
                name, rss, hwm = status
                total += rss
                alive += 1
                seen = self.result.hwm_mb.get(pid, ("", 0.0))[1]
                self.result.hwm_mb[pid] = (name, max(hwm, seen))
                cpu = _cpu_s(pid)
                if cpu is not None:
                    self.result.cpu_s[pid] = cpu
            if total > self.result.max_sum_mb:
                self.result.max_sum_mb, self.result.processes = total, alive
            self._halt.wait(_SAMPLE_S)

    def stop(self) -> TreeMemory:
        self._halt.set()
        self.join()
        return self.result


def make_spec(
    shape: tuple[int, int, int] | None, n_pairs: int, anatomy: bool = False
) -> SyntheticSpec:
    """The benchmark series: PCASL, separate M0, background suppression, 1 mm motion.

    With ``anatomy``, the subject has a 1 mm T1w and, when ``shape`` is None, the ASL grid is
    the one :class:`SyntheticSpec` gives a subject with an anatomy (its default shape and
    zooms left alone).
    """
    grid = {} if shape is None else {"shape": shape, "zooms": (3.5, 3.5, 5.0)}
    if anatomy and shape is not None:
        grid["zooms"] = (3.5, 3.5, 4.0)
    return SyntheticSpec(
        subject="01",
        asl_type="PCASL",
        m0_type="Separate",
        n_pairs=n_pairs,
        background_suppression=True,
        bs_pulses=4,
        motion_mm=1.0,
        seed=0,
        anatomy=AnatomySpec(t1w_zooms=(1.0, 1.0, 1.0)) if anatomy else None,
        **grid,
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


def run_cli(
    bids: Path, out: Path, work: Path, nprocs: int, spaces: Sequence[str] | None = None
) -> tuple[float, float, int, str, TreeMemory, float]:
    """Run the CLI once.

    Returns (wall s, peak RSS MB of the largest process, rc, stderr, sampled tree memory,
    CPU s of the tree).
    """
    cmd = [cli_executable(), str(bids), str(out), "participant", "-w", str(work)]
    cmd += ["--nprocs", str(nprocs)]
    if spaces:
        cmd += ["--output-spaces", *spaces]
    err_path = work.parent / f"{work.name}.stderr"
    work.parent.mkdir(parents=True, exist_ok=True)
    with open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        # wait4 reports ru_maxrss of this child including its waited-for descendants, so each
        # repeat gets its own figure (RUSAGE_CHILDREN only ever grows across repeats).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        tree = sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: tell Popen
    stderr = err_path.read_text(errors="replace")
    cpu = usage.ru_utime + usage.ru_stime
    return wall, usage.ru_maxrss / 1024.0, proc.returncode, stderr, tree, cpu


def node_durations(work: Path) -> list[tuple[float, str]]:
    """(duration s, node) of every node nipype ran under ``work``, slowest first."""
    from nipype.utils.filemanip import loadpkl

    found = []
    for path in work.rglob("result_*.pklz"):
        try:
            duration = float(loadpkl(path).runtime.duration)
        except Exception:  # a result without a runtime: skip it
            continue
        found.append((duration, str(path.parent.relative_to(work))))
    return sorted(found, reverse=True)


def gm_cbf(out: Path, truth: SyntheticTruth) -> float:
    """Mean output CBF over the true grey-matter mask."""
    image = nib.load(out / "sub-01" / "perf" / "sub-01_cbf.nii.gz")
    data = np.asarray(image.dataobj, dtype=np.float64)
    if data.shape != truth.gm_mask.shape:
        raise ValueError(f"output CBF shape {data.shape} != truth {truth.gm_mask.shape}")
    return float(data[truth.gm_mask].mean())


def benchmark(
    root: Path,
    spec: SyntheticSpec,
    nprocs: int,
    repeats: int,
    spaces: Sequence[str] | None = None,
) -> tuple[float, float, list[RunResult], list[tuple[float, str]]]:
    """Generate the data under ``root`` and run the CLI ``repeats`` times.

    Returns the generation time, the true GM CBF, each run's figures and the node durations
    of the last run.
    """
    start = time.perf_counter()
    (truth,) = write_dataset(root / "bids", [spec])
    generation_s = time.perf_counter() - start
    true_gm = float(truth.cbf[truth.gm_mask].mean())

    results = []
    nodes: list[tuple[float, str]] = []
    for k in range(1, repeats + 1):
        out, work = root / f"run-{k}" / "out", root / f"run-{k}" / "work"
        for path in (out, work):  # a fresh work dir for every run
            shutil.rmtree(path, ignore_errors=True)
        load_before = os.getloadavg()
        wall, peak, rc, stderr, tree, cpu = run_cli(root / "bids", out, work, nprocs, spaces)
        load_after = os.getloadavg()
        cbf = float("nan")
        if rc == 0:
            try:
                cbf = gm_cbf(out, truth)
            except (OSError, ValueError) as err:  # exit 0 but no usable CBF: a failure too
                rc, stderr = 1, f"{stderr}\nbench_participant: {err}"
        results.append(
            RunResult(wall, peak, cbf, rc, stderr, tree, (load_before, load_after), cpu)
        )
        print(
            f"run {k}: {wall:.1f} s (CPU {cpu:.1f} s), largest process {peak:.0f} MB, tree sum "
            f"{tree.max_sum_mb:.0f} MB, load {load_before[0]:.2f} -> {load_after[0]:.2f}",
            file=sys.stderr,
            flush=True,
        )
        if rc != 0:
            break
        nodes = node_durations(work)
    return generation_s, true_gm, results, nodes


def report(
    case: str,
    spec: SyntheticSpec,
    nprocs: int,
    spaces: Sequence[str] | None,
    generation_s: float,
    true_gm: float,
    results: Sequence[RunResult],
    nodes: Sequence[tuple[float, str]] = (),
) -> None:
    """Print the aligned table of figures."""
    shape_text = "x".join(map(str, spec.shape))
    zooms_text = "x".join(f"{z:g}" for z in spec.zooms)
    t1w = " + 1 mm T1w (176x256x256)" if spec.anatomy is not None else ", no T1w"
    print(
        f"case {case}: {2 * spec.n_pairs} volumes ({spec.n_pairs} pairs) {shape_text} @ "
        f"{zooms_text} mm{t1w}, PCASL, separate M0, BS 4 pulses, motion 1 mm, seed 0; "
        f"--nprocs {nprocs}; --output-spaces {' '.join(spaces) if spaces else '(default)'}"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}"
    )
    print(f"data generation (not in wall time): {generation_s:.2f} s")
    print(
        "peak RSS = largest single process of the CLI's tree (ru_maxrss); tree sum = largest "
        f"sum of VmRSS over the tree, sampled every {_SAMPLE_S} s\n"
    )

    header = (
        f"{'run':>6}  {'wall (s)':>9}  {'CPU (s)':>8}  {'peak RSS (MB)':>13}  "
        f"{'tree sum (MB)':>13}  {'GM CBF':>8}  {'err %':>7}  {'load before/after':>17}"
    )
    print(header)
    print("-" * len(header))

    def row(
        label: str, wall: float, cpu: float, peak: float, tree: float, cbf: float, load: str
    ) -> None:
        err = 100.0 * (cbf - true_gm) / true_gm
        print(
            f"{label:>6}  {wall:9.2f}  {cpu:8.1f}  {peak:13.0f}  {tree:13.0f}  {cbf:8.2f}  "
            f"{err:+7.2f}  {load:>17}"
        )

    for k, r in enumerate(results, start=1):
        load = f"{r.load[0][0]:.2f} / {r.load[1][0]:.2f}" if r.load[0] else ""
        tree = r.tree.max_sum_mb if r.tree else 0
        row(str(k), r.wall_s, r.cpu_s, r.peak_rss_mb, tree, r.gm_cbf, load)
    if len(results) > 1:
        print("-" * len(header))
        row(
            "median",
            statistics.median(r.wall_s for r in results),
            statistics.median(r.cpu_s for r in results),
            statistics.median(r.peak_rss_mb for r in results),
            statistics.median(r.tree.max_sum_mb if r.tree else 0 for r in results),
            statistics.median(r.gm_cbf for r in results),
            "",
        )
    print(f"{'truth':>6}  {'':>9}  {'':>8}  {'':>13}  {'':>13}  {true_gm:8.2f}")

    last = results[-1].tree
    if last is not None and last.hwm_mb:
        peaks = sorted(last.hwm_mb.items(), key=lambda item: -item[1][1])
        text = ", ".join(
            f"{name}{' (main)' if pid == last.root else ''} {hwm:.0f} MB / "
            f"{last.cpu_s.get(pid, float('nan')):.0f} s CPU"
            for pid, (name, hwm) in peaks[:6]
        )
        print(
            f"\nlast run: per-process peak (VmHWM) and CPU time of the {len(peaks)} processes "
            f"seen: {text}; largest tree sum {last.max_sum_mb:.0f} MB over {last.processes} "
            "processes"
        )
    if nodes:
        print("slowest nipype nodes of the last run (s): ")
        for duration, node in nodes[:12]:
            print(f"  {duration:7.1f}  {node}")
        print(f"  {sum(d for d, _ in nodes):7.1f}  sum over {len(nodes)} nodes")

    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    print(f"\nRUSAGE_CHILDREN max RSS over all runs: {children_mb:.0f} MB")
    if case in TARGETS:
        target_wall, target_gb = TARGETS[case]
        wall = statistics.median(r.wall_s for r in results)
        peak = max(r.peak_rss_mb for r in results) / 1024.0
        print(
            f"targets ({case} case, 2 cores): wall <= {target_wall:.0f} s "
            f"[{'ok' if wall <= target_wall else 'MISSED'}], "
            f"largest process <= {target_gb:.0f} GB [{'ok' if peak <= target_gb else 'MISSED'}]"
        )
    if case == "standard":
        base_wall, base_mb = BASELINE_STANDARD
        wall = statistics.median(r.wall_s for r in results)
        print(
            f"before the anatomy: {base_wall} s median, {base_mb:.0f} MB; now {wall:.1f} s "
            f"({100 * (wall / base_wall - 1):+.0f} %), "
            f"{max(r.peak_rss_mb for r in results):.0f} MB"
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
    parser.add_argument(
        "--output-spaces",
        nargs="+",
        metavar="SPACE",
        help="passed to aslprep-lite (default: the case's; the command's own default for "
        f"standard and small, {' '.join(ANATOMY_SPACES)} for anatomy)",
    )
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
    spec = make_spec(shape, n_pairs, anatomy=case.get("anatomy", False))
    spaces = options.output_spaces or case.get("output_spaces")
    label = options.case if (options.shape, options.pairs) == (None, None) else "custom"

    if options.keep:
        root = Path(options.keep).resolve()
        root.mkdir(parents=True, exist_ok=True)
        generation_s, true_gm, results, nodes = benchmark(
            root, spec, options.nprocs, options.repeats, spaces
        )
    else:
        with tempfile.TemporaryDirectory(prefix="aslprep_bench_") as tmp:
            generation_s, true_gm, results, nodes = benchmark(
                Path(tmp), spec, options.nprocs, options.repeats, spaces
            )

    failed = [r for r in results if r.returncode != 0]
    if failed:
        print(f"aslprep-lite failed (exit {failed[0].returncode}); its stderr:", file=sys.stderr)
        print(failed[0].stderr, file=sys.stderr)
        return 1
    report(label, spec, options.nprocs, spaces, generation_s, true_gm, results, nodes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
