"""Robust (Huber) against plain mean of the per-pair CBF volumes, on the pipeline's own output.

Two scenarios, each a synthetic BIDS dataset (:mod:`aslprep_lite.synthetic`) with one subject
per seed, PCASL 3 T, PLD 1.8 s, a separate M0 scan, a 3D readout, 64x64x24 voxels of
3.5x3.5x4 mm, ``--pairs`` control/label pairs and Gaussian noise of ``--noise`` times the mean
brain M0 per image:

* ``motion``: no background suppression, rigid head motion up to ``--motion`` mm / degrees
  (smooth drift plus one or two single-volume spikes);
* ``bs``: background suppression (4 pulses), no motion.

With ``--anatomy`` the tissue comes from synthetic subjects made from the MNI template
(:mod:`aslprep_lite.synthetic_anatomy`, a 2 mm T1w each; 56x64x50 voxels of 3.5x3.5x4 mm), whose
edges are sharper than the smoothed phantom's, instead of the ellipsoidal phantom.

The real command line ``aslprep-lite BIDS OUT participant --output-spaces asl --nprocs 1`` is
run once per scenario (the two scenarios run side by side with ``--jobs 2``). It writes the
motion-corrected per-pair CBF series ``sub-XX_desc-timeseries_cbf.nii.gz``; its plain mean
over volumes is the pipeline's ``sub-XX_cbf.nii.gz`` (checked), and the script compares it
with :func:`aslprep_lite.quant.robust.huber_mean` (and, for reference, the median) of the
same series. Huber's estimate is scale-equivariant, so averaging the CBF volumes is the same
as averaging the ΔM volumes and quantifying once.

Per subject, over the true grey-matter mask (voxels >= 90 % GM): the median and the 90th
percentile of the absolute relative error against ``truth.cbf``, the mean relative error
(bias) and the relative RMS error, in %. Reported as the mean and SD over seeds, with the
paired difference Huber - mean and the number of seeds where Huber is lower.

What a robust estimator costs on clean data: a Monte Carlo in numpy (``--mc-voxels`` series
of ``--pairs`` Gaussian values) gives the variance of the mean over that of each estimator
(relative efficiency), and the same with one pair of each series shifted by 5 or 10 SD (an
uncorrected spike), for scale.

Usage::

    python benchmarks/bench_robust.py [--seeds 10] [--pairs 30] [--noise 0.004]
                                      [--motion 1.0] [--jobs 2] [--anatomy] [--keep DIR]
                                      [--json bench_robust.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from aslprep_lite.quant.robust import HUBER_K, ROBUST_REFERENCE, huber_mean
from aslprep_lite.synthetic import AnatomySpec, SyntheticSpec, SyntheticTruth, write_dataset

SHAPE = (64, 64, 24)
ZOOMS = (3.5, 3.5, 4.0)
#: T1w voxel size of ``--anatomy`` subjects: 2 mm samples the 2 mm template maps (faster).
ANATOMY_T1W_ZOOMS = (2.0, 2.0, 2.0)
BS_PULSES = 4
ESTIMATORS = ("mean", "huber", "median")
METRICS = ("median_abs", "p90_abs", "bias", "rmse")
METRIC_LABELS = {
    "median_abs": "median |err| %",
    "p90_abs": "P90 |err| %",
    "bias": "bias %",
    "rmse": "RMS err %",
}


def _command() -> list[str]:
    """The ``aslprep-lite`` script of the running interpreter's environment."""
    candidate = Path(sys.executable).parent / "aslprep-lite"
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which("aslprep-lite")
    if found is None:
        sys.exit("bench_robust: cannot find the aslprep-lite command")
    return [found]


def _specs(scenario: str, args: argparse.Namespace) -> list[SyntheticSpec]:
    common: dict = {"n_pairs": args.pairs, "noise": args.noise, "m0_type": "Separate"}
    if not args.anatomy:
        common |= {"shape": SHAPE, "zooms": ZOOMS}
    if scenario == "motion":
        common |= {"motion_mm": args.motion, "background_suppression": False}
    else:
        common |= {"motion_mm": 0.0, "background_suppression": True, "bs_pulses": BS_PULSES}
    return [
        SyntheticSpec(
            subject=f"{seed:02d}",
            seed=seed,
            anatomy=AnatomySpec(seed=seed, t1w_zooms=ANATOMY_T1W_ZOOMS) if args.anatomy else None,
            **common,
        )
        for seed in args.seed_list
    ]


def _errors(estimate: np.ndarray, truth: SyntheticTruth) -> dict[str, float]:
    """Relative error figures (%) of a CBF map over the true GM mask."""
    mask = truth.gm_mask & np.isfinite(estimate)
    true = truth.cbf[mask]
    relative = 100.0 * (estimate[mask] - true) / true
    magnitude = np.abs(relative)
    return {
        "median_abs": float(np.median(magnitude)),
        "p90_abs": float(np.percentile(magnitude, 90)),
        "bias": float(relative.mean()),
        "rmse": float(np.sqrt(np.mean(relative**2))),
        "n_voxels": int(mask.sum()),
    }


def run_scenario(scenario: str, args: argparse.Namespace, root: Path) -> dict:
    """Write the dataset, run the command line and score the estimators for every seed."""
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    truths = write_dataset(root / "bids", _specs(scenario, args), name=f"bench_robust {scenario}")
    generation_s = time.perf_counter() - start

    out, work = root / "out", root / "work"
    command = [
        *_command(),
        str(root / "bids"),
        str(out),
        "participant",
        "--output-spaces",
        "asl",
        "--nprocs",
        "1",
        "-w",
        str(work),
    ]
    start = time.perf_counter()
    process = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "NIPYPE_NO_ET": "1"}
    )
    cli_s = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"aslprep-lite failed for {scenario}:\n{process.stderr[-4000:]}")

    subjects = []
    for truth in truths:
        stem = truth.spec.stem
        perf = out / f"sub-{truth.spec.subject}" / "perf"
        series = np.asarray(nib.load(perf / f"{stem}_desc-timeseries_cbf.nii.gz").dataobj)
        pipeline = np.asarray(nib.load(perf / f"{stem}_cbf.nii.gz").dataobj, dtype=np.float64)
        mean = series.mean(axis=-1, dtype=np.float64)
        if not np.allclose(mean, pipeline, rtol=1e-5, atol=1e-3):
            raise RuntimeError(f"{stem}: the mean of the CBF series is not the pipeline's CBF")
        tick = time.perf_counter()
        huber = huber_mean(series)
        huber_s = time.perf_counter() - tick
        estimates = {"mean": pipeline, "huber": huber, "median": np.median(series, axis=-1)}
        subjects.append(
            {
                "seed": truth.spec.seed,
                "n_volumes": int(series.shape[-1]),
                "huber_s": huber_s,
                **{name: _errors(value, truth) for name, value in estimates.items()},
            }
        )
    if args.keep is None:
        shutil.rmtree(root)
    return {
        "generation_s": generation_s,
        "cli_s": cli_s,
        "shape": list(truths[0].spec.shape),
        "zooms": list(truths[0].spec.zooms),
        "subjects": subjects,
    }


def _summary(subjects: list[dict]) -> dict:
    """Mean and SD over seeds of every figure, and the paired Huber - mean difference."""
    summary: dict = {}
    for estimator in ESTIMATORS:
        summary[estimator] = {}
        for metric in METRICS:
            values = np.array([s[estimator][metric] for s in subjects])
            summary[estimator][metric] = {
                "mean": float(values.mean()),
                "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            }
    summary["huber_minus_mean"] = {}
    for metric in METRICS:
        huber = np.array([s["huber"][metric] for s in subjects])
        mean = np.array([s["mean"][metric] for s in subjects])
        difference = np.abs(huber) - np.abs(mean) if metric == "bias" else huber - mean
        summary["huber_minus_mean"][metric] = {
            "mean": float(difference.mean()),
            "sd": float(difference.std(ddof=1)) if difference.size > 1 else 0.0,
            "huber_lower": int((difference < 0).sum()),
        }
    return summary


def monte_carlo(n_pairs: int, n_voxels: int, seed: int = 0) -> dict:
    """Relative efficiency (variance of the mean / variance of the estimator), Gaussian pairs.

    ``clean``: i.i.d. N(0, 1) values; ``spike 5 SD`` / ``spike 10 SD``: the same with one value
    of every series shifted by +5 or +10 (an uncorrected artefact in one pair); there the
    figure is the mean squared error of the mean over that of the estimator.
    """
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(n_voxels, n_pairs))
    results: dict = {}
    for label, shift in (("clean", 0.0), ("spike 5 SD", 5.0), ("spike 10 SD", 10.0)):
        data = values.copy()
        data[:, 0] += shift
        mse = {
            "mean": float(np.mean(data.mean(axis=-1) ** 2)),
            "huber": float(np.mean(huber_mean(data) ** 2)),
            "median": float(np.mean(np.median(data, axis=-1) ** 2)),
        }
        results[label] = {
            "mse": mse,
            "efficiency_huber": mse["mean"] / mse["huber"],
            "efficiency_median": mse["mean"] / mse["median"],
        }
    return results


def _print_table(results: dict, args: argparse.Namespace) -> None:
    n = len(args.seed_list)
    tissue = "synthetic anatomy" if args.anatomy else "ellipsoidal phantom"
    grid = "x".join(str(v) for v in next(iter(results["scenarios"].values()))["zooms"])
    print(
        f"\nGM error against truth.cbf ({tissue}, {grid} mm, {args.pairs} pairs, noise "
        f"{args.noise}, motion {args.motion} mm), mean ± SD over {n} seeds"
    )
    header = f"{'scenario':<8} {'estimator':<10}" + "".join(
        f"{METRIC_LABELS[m]:>18}" for m in METRICS
    )
    print(header)
    print("-" * len(header))
    for scenario, result in results["scenarios"].items():
        summary = result["summary"]
        for estimator in ESTIMATORS:
            cells = "".join(
                f"{summary[estimator][m]['mean']:>10.2f} ± {summary[estimator][m]['sd']:<5.2f}"
                for m in METRICS
            )
            print(f"{scenario:<8} {estimator:<10}{cells}")
        diff = summary["huber_minus_mean"]
        cells = "".join(
            f"{diff[m]['mean']:>+10.2f} ({diff[m]['huber_lower']:>2}/{n})" for m in METRICS
        )
        print(f"{scenario:<8} {'H - mean':<10}{cells}")
    print("(H - mean: paired difference, |bias| for the bias, and seeds where Huber is lower)")

    print(f"\nMonte Carlo, {args.pairs} Gaussian pairs: MSE of the mean / MSE of the estimator")
    for label, row in results["monte_carlo"].items():
        print(
            f"  {label:<12} Huber {row['efficiency_huber']:.3f}   "
            f"median {row['efficiency_median']:.3f}"
        )
    times = [s["huber_s"] for r in results["scenarios"].values() for s in r["subjects"]]
    first = next(iter(results["scenarios"].values()))
    shape = "x".join(str(n) for n in (*first["shape"], args.pairs))
    print(f"\nhuber_mean on {shape}: median {np.median(times):.2f} s (max {max(times):.2f} s)")
    for scenario, result in results["scenarios"].items():
        print(
            f"{scenario}: generation {result['generation_s']:.0f} s, "
            f"aslprep-lite {result['cli_s']:.0f} s for {n} subjects"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="subjects (seeds 0..N-1)")
    parser.add_argument("--pairs", type=int, default=30, help="control/label pairs")
    parser.add_argument("--noise", type=float, default=0.004, help="SD / mean brain M0")
    parser.add_argument("--motion", type=float, default=1.0, help="motion scenario, mm / deg")
    parser.add_argument("--jobs", type=int, default=2, help="scenarios run side by side")
    parser.add_argument("--mc-voxels", type=int, default=200_000, help="Monte Carlo series")
    parser.add_argument(
        "--anatomy",
        action="store_true",
        help="tissue from synthetic subjects made from the MNI template (with a 2 mm T1w) "
        "instead of the ellipsoidal phantom; 56x64x50 voxels of 3.5x3.5x4 mm",
    )
    parser.add_argument("--keep", type=Path, help="keep the datasets and outputs here")
    parser.add_argument("--json", type=Path, default=Path("bench_robust.json"))
    args = parser.parse_args(argv)
    args.seed_list = list(range(args.seeds))

    start = time.perf_counter()
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench_robust_"))
    scenarios = ("motion", "bs")
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        # Not base / name: pybids 0.22 takes a directory called "motion" anywhere above the
        # dataset root for the datatype of every file (bids-standard/pybids#1270).
        futures = {
            name: pool.submit(run_scenario, name, args, base / f"scenario_{name}")
            for name in scenarios
        }
        outcomes = {name: future.result() for name, future in futures.items()}
    if args.keep is None:
        shutil.rmtree(base, ignore_errors=True)

    results = {
        "settings": {
            "seeds": args.seed_list,
            "n_pairs": args.pairs,
            "noise": args.noise,
            "motion_mm": args.motion,
            "bs_pulses": BS_PULSES,
            "anatomy": args.anatomy,
            "huber_k": HUBER_K,
            "reference": ROBUST_REFERENCE,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "scenarios": {
            name: {**outcome, "summary": _summary(outcome["subjects"])}
            for name, outcome in outcomes.items()
        },
        "monte_carlo": monte_carlo(args.pairs, args.mc_voxels),
    }
    results["total_s"] = time.perf_counter() - start
    _print_table(results, args)
    print(f"total {results['total_s']:.0f} s")
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
