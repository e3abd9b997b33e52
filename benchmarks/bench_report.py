"""Benchmark of the per-participant HTML report (``aslprep_lite.reports``).

Writes a synthetic dataset (one participant with a T1w, two sessions: ``ses-a`` single-delay
PCASL, 80 volumes, ``ses-b`` multi-delay PCASL with 4 delays), processes it once with the real
command line (not timed: it writes the derivatives the report reads), then builds the report
from the disk ``--repeats`` times in this process and prints, for each build, the wall and CPU
time of the participant's page (the report is single-threaded: its CPU time is its wall time
on an idle machine), the load average, the time of each figure of the last build, and the peak
memory.

The imports of matplotlib and nibabel are timed apart; the figures'
times are measured by wrapping :meth:`aslprep_lite.reports.participant.Page.figure`, so the
code that runs is the package's. Peak memory is ``ru_maxrss`` of this process (the CLI runs
in a child and is not counted).

Usage::

    python benchmarks/bench_report.py                    # 1 mm T1w, 3 builds
    python benchmarks/bench_report.py --t1w-mm 2 --keep /tmp/bench_report
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_PER_RUN_S = 5.0


def _dataset(root: Path, t1w_mm: float) -> Path:
    from aslprep_lite.synthetic import SyntheticSpec, write_dataset
    from aslprep_lite.synthetic_anatomy import AnatomySpec

    anatomy = AnatomySpec(t1w_zooms=(t1w_mm,) * 3)
    bids = root / "bids"
    write_dataset(
        bids,
        [
            SyntheticSpec(subject="01", session="a", n_pairs=40, anatomy=anatomy,
                          background_suppression=True, bs_pulses=4, motion_mm=1.0),
            SyntheticSpec(subject="01", session="b", plds=(0.5, 1.0, 1.5, 2.0),
                          labeling_duration=1.4, n_pairs=3, anatomy=anatomy),
        ],
    )  # fmt: skip
    return bids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t1w-mm", type=float, default=1.0, help="T1w voxel size (mm)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nprocs", type=int, default=2, help="passed to aslprep-lite")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it")
    options = parser.parse_args(argv)
    root = options.keep or Path(tempfile.mkdtemp(prefix="bench_report."))
    root.mkdir(parents=True, exist_ok=True)
    out, work = root / "out", root / "work"
    bids = root / "bids"
    if not (out / "sub-01.html").is_file():
        bids = _dataset(root, options.t1w_mm)
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "aslprep_lite", str(bids), str(out), "participant",
             "-w", str(work), "--nprocs", str(options.nprocs)],
            capture_output=True, text=True, env={**os.environ, "NIPYPE_NO_ET": "1"},
        )  # fmt: skip
        print(f"aslprep-lite (not timed below): {time.perf_counter() - start:.1f} s, "
              f"exit {result.returncode}")  # fmt: skip
        if result.returncode:
            print(result.stderr, file=sys.stderr)
            return 1

    start = time.perf_counter()
    import matplotlib  # noqa: F401
    import nibabel  # noqa: F401

    from aslprep_lite.reports import participant
    from aslprep_lite.reports.status import collect_statuses

    print(f"imports: {time.perf_counter() - start:.2f} s")
    timings: list[tuple[str, float]] = []
    original = participant.Page.figure

    def timed(self, name, title, caption, draw):
        begin = time.perf_counter()
        html = original(self, name, title, caption, draw)
        timings.append((name, time.perf_counter() - begin))
        return html

    participant.Page.figure = timed
    processed = [str(p) for p in sorted(bids.resolve().glob("sub-01/ses-*/perf/*_asl.nii.gz"))]
    runs = collect_statuses(bids.resolve(), processed, [])["01"]
    totals = []
    for repeat in range(options.repeats):
        timings.clear()
        begin, cpu = time.perf_counter(), time.process_time()
        participant.build_report(out, bids.resolve(), "01", runs)
        total, cpu = time.perf_counter() - begin, time.process_time() - cpu
        totals.append(total)
        print(f"build {repeat + 1}: {total:.2f} s for {len(runs)} runs "
              f"({total / len(runs):.2f} s per run; CPU {cpu:.2f} s), {len(timings)} figures, "
              f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    for name, seconds in sorted(timings, key=lambda t: -t[1]):
        print(f"  {seconds:6.3f} s  {name}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    median = sorted(totals)[len(totals) // 2]
    print(f"median {median:.2f} s per participant, {median / len(runs):.2f} s per run "
          f"(target {TARGET_PER_RUN_S:.0f} s per run); peak RSS {peak:.0f} MB")  # fmt: skip
    print(f"report: {out / 'sub-01.html'}")
    return 0 if median / len(runs) <= TARGET_PER_RUN_S else 1


if __name__ == "__main__":
    sys.exit(main())
