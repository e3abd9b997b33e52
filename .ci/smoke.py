"""Host-side half of the container smoke tests (.ci/container.sh, .ci/apptainer.sh).

    python .ci/smoke.py generate DIR        DIR/bids: the example dataset (aslprep-lite-example's
                                            spec), DIR/bad: the same with an invalid sidecar,
                                            DIR/truth.npz: the true CBF and grey-matter mask
    python .ci/smoke.py check OUT DIR       OUT holds every expected derivative and the
                                            grey-matter CBF is within 5 % of the truth
    python .ci/smoke.py check-error FILE    FILE (stderr of the bad run) has exactly one
                                            'aslprep-lite: error:' line naming the file and
                                            the field, and no traceback

Runs with the project's own virtual environment (.venv), never inside the image.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import nibabel as nb
import numpy as np

from aslprep_lite.cli.example import EXAMPLE_SPEC
from aslprep_lite.synthetic import SyntheticSpec, write_dataset

GM_TOLERANCE = 0.05
BAD_FIELD = "RepetitionTimePreparation"
BAD_SIDECAR = "sub-01/perf/sub-01_asl.json"
EXPECTED = [
    "dataset_description.json",
    # the report, its status record and a figure (matplotlib in a read-only image)
    "sub-01.html",
    "logs/sub-01_runs.json",
    "sub-01/figures/sub-01_desc-cbf_asl.png",
    *(
        f"sub-01/perf/sub-01_{name}"
        for name in (
            "cbf.nii.gz",
            "cbf.json",
            "desc-timeseries_cbf.nii.gz",
            "desc-timeseries_cbf.json",
            "desc-mean_deltam.nii.gz",
            "desc-mean_deltam.json",
            "desc-preproc_m0scan.nii.gz",
            "desc-preproc_m0scan.json",
            "desc-brain_mask.nii.gz",
            "desc-brain_mask.json",
            "desc-confounds_timeseries.tsv",
            "desc-confounds_timeseries.json",
            "desc-pvGM_cbf.nii.gz",
            "desc-pvWM_cbf.nii.gz",
            "space-T1w_cbf.nii.gz",
            "space-T1w_desc-brain_mask.nii.gz",
            "space-MNI152NLin2009aSym_res-2_cbf.nii.gz",
            "space-MNI152NLin2009aSym_res-2_cbf.json",
            "space-MNI152NLin2009aSym_res-2_desc-brain_mask.nii.gz",
            "from-aslref_to-T1w_mode-image_xfm.txt",
        )
    ),
    *(
        f"sub-01/anat/sub-01_{name}"
        for name in (
            "desc-preproc_T1w.nii.gz",
            "desc-brain_mask.nii.gz",
            "dseg.nii.gz",
            "label-GM_probseg.nii.gz",
            "from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.h5",
            "from-MNI152NLin2009aSym_to-T1w_mode-image_xfm.h5",
        )
    ),
]


def generate(root: Path) -> int:
    (truth,) = write_dataset(
        root / "bids", [SyntheticSpec(**EXAMPLE_SPEC)], name="aslprep_lite example"
    )
    np.savez_compressed(root / "truth.npz", cbf=truth.cbf, gm_mask=truth.gm_mask)
    shutil.copytree(root / "bids", root / "bad")
    sidecar = root / "bad" / BAD_SIDECAR
    meta = json.loads(sidecar.read_text())
    meta[BAD_FIELD] = 0
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"example dataset in {root / 'bids'}, invalid copy ({BAD_FIELD} 0) in {root / 'bad'}")
    return 0


def check(out: Path, root: Path) -> int:
    missing = [name for name in EXPECTED if not (out / name).is_file()]
    if missing:
        print(f"FAIL: missing outputs in {out}: {missing}")
        return 1
    truth = np.load(root / "truth.npz")
    gm = truth["gm_mask"]
    cbf = np.asarray(nb.load(out / "sub-01/perf/sub-01_cbf.nii.gz").dataobj)
    estimate, expected = float(cbf[gm].mean()), float(truth["cbf"][gm].mean())
    error = estimate / expected - 1
    verdict = "ok" if abs(error) <= GM_TOLERANCE else "FAIL"
    print(
        f"{verdict}: {len(EXPECTED)} outputs; grey-matter CBF {estimate:.2f} mL/100 g/min vs "
        f"{expected:.2f} true ({100 * error:+.2f} %, tolerance {100 * GM_TOLERANCE:.0f} %)"
    )
    return 0 if verdict == "ok" else 1


def check_error(stderr_file: Path) -> int:
    text = stderr_file.read_text()
    errors = [line for line in text.splitlines() if line.startswith("aslprep-lite: error:")]
    problems = []
    if len(errors) != 1:
        problems.append(f"{len(errors)} 'aslprep-lite: error:' lines instead of one")
    elif BAD_SIDECAR not in errors[0] or BAD_FIELD not in errors[0]:
        problems.append(f"the error does not name {BAD_SIDECAR} and {BAD_FIELD}")
    if "Traceback" in text:
        problems.append("a traceback was printed")
    if problems:
        print("FAIL: " + "; ".join(problems) + f"\n--- stderr:\n{text}")
        return 1
    print(f"ok: {errors[0]}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("generate").add_argument("root", type=Path)
    chk = sub.add_parser("check")
    chk.add_argument("out", type=Path)
    chk.add_argument("root", type=Path)
    sub.add_parser("check-error").add_argument("stderr_file", type=Path)
    args = parser.parse_args()
    if args.command == "generate":
        return generate(args.root)
    if args.command == "check":
        return check(args.out, args.root)
    return check_error(args.stderr_file)


if __name__ == "__main__":
    sys.exit(main())
