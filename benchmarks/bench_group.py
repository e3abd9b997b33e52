"""Wall time and peak memory of the group level on ``--runs`` synthetic runs.

:func:`aslprep_lite.synthetic_group.write_group_derivatives` writes what the participant level
leaves for the group level: per run, the QC table and its sidecar and a CBF map in
``MNI152NLin2009aSym`` at 2 mm (the template's 97 x 115 x 97 grid) with its brain mask there,
plus, to make pybids' indexing realistic, ``--clutter`` other small files per run (anatomy,
figures, logs, perf sidecars). One run has a planted fault (GM CBF ten times too low). The
real command line ``aslprep-lite BIDS OUT group`` is then run ``--repeats`` times as a
subprocess (a fresh interpreter each time, imports included) under ``/usr/bin/time -v`` when
available, and the script checks that exactly the planted run is flagged.

Target: 50 runs in at most 10 s.

Usage::

    python benchmarks/bench_group.py [--runs 50] [--repeats 3] [--clutter 60] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aslprep_lite.synthetic_group import write_group_derivatives


def _clutter(out: Path, per_run: int) -> None:
    for subject in sorted(out.glob("sub-*")):
        for i in range(per_run):
            folder = subject / ("anat", "figures", "log", "perf")[i % 4]
            folder.mkdir(exist_ok=True)
            (folder / f"{subject.name}_desc-clutter{i}_T1w.json").write_text("{}\n")


def _run(bids: Path, out: Path) -> tuple[float, float | None, str]:
    command = [sys.executable, "-m", "aslprep_lite", str(bids), str(out), "group"]
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    if timer:
        command = [timer, "-v", *command]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"group level failed:\n{result.stderr}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    rss = int(match.group(1)) / 1024 if match else None
    if rss is None:  # without GNU time: the largest child so far
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return elapsed, rss, result.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clutter", type=int, default=60, help="other files per run")
    parser.add_argument("--keep", type=Path, help="write under this folder and keep it")
    options = parser.parse_args()

    root = options.keep or Path(tempfile.mkdtemp(prefix="bench_group-"))
    bids, out = root / "bids", root / "out"
    faulty = 3
    start = time.perf_counter()
    labels = write_group_derivatives(bids, out, options.runs, overrides={faulty: {"gm_cbf": 6.0}})
    _clutter(out, options.clutter)
    print(f"wrote {options.runs} runs in {time.perf_counter() - start:.1f} s under {root}")

    times, peaks = [], []
    for k in range(options.repeats):
        elapsed, rss, stderr = _run(bids, out)
        times.append(elapsed)
        peaks.append(rss)
        print(f"run {k + 1}: {elapsed:.2f} s, peak RSS {rss:.0f} MB")
    flagged = re.findall(r"WARNING: (sub-\w+): outlier on", stderr)
    expected = [f"sub-{labels[faulty]}"]
    print(f"flagged: {', '.join(flagged) or 'none'} (planted: {expected[0]})")
    print(
        f"group level, {options.runs} runs: median {statistics.median(times):.2f} s, "
        f"peak RSS {max(peaks):.0f} MB; {os.cpu_count()} CPUs"
    )
    if not options.keep:
        shutil.rmtree(root)
    return 0 if flagged == expected else 1


if __name__ == "__main__":
    sys.exit(main())
