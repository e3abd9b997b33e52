"""The HTML reports in a real browser: Debian's chromium, headless, through playwright.

The real command line processes a small synthetic dataset: ``sub-01`` with a 2 mm T1w and two
sessions (``ses-a`` single-delay PCASL with background suppression and motion, ``ses-b``
multi-delay), and ``sub-02``, whose sidecar lacks ``PostLabelingDelay`` (refused at discovery).
Each report is opened from the disk (``file://``): no console error, no failed request, every
image decoded, a full-page screenshot that is not blank; the failed run's page shows its
error. Skipped only when ``/usr/bin/chromium`` is absent (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from aslprep_lite.synthetic import SyntheticSpec, write_dataset
from aslprep_lite.synthetic_anatomy import AnatomySpec

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ANATOMY = AnatomySpec(t1w_zooms=(2.0, 2.0, 2.0))
#: Figures of each report: the anatomy, then each run's.
FIGURES = {
    "01": [
        "sub-01_desc-seg_T1w.png",
        "sub-01_desc-MNI152NLin2009aSym_T1w.png",
        "sub-01_ses-a_desc-cbf_asl.png",
        "sub-01_ses-a_desc-deltam_asl.png",
        "sub-01_ses-a_desc-m0_asl.png",
        "sub-01_ses-a_desc-coreg_asl.png",
        "sub-01_ses-a_desc-cbfMNI152NLin2009aSymres2_asl.png",
        "sub-01_ses-a_desc-motion_asl.png",
        "sub-01_ses-a_desc-carpet_asl.png",
        "sub-01_ses-a_desc-cbfseries_asl.png",
        "sub-01_ses-a_desc-score_asl.png",
        "sub-01_ses-a_desc-scrub_asl.png",
        "sub-01_ses-b_desc-cbf_asl.png",
        "sub-01_ses-b_desc-deltam_asl.png",
        "sub-01_ses-b_desc-m0_asl.png",
        "sub-01_ses-b_desc-coreg_asl.png",
        "sub-01_ses-b_desc-cbfMNI152NLin2009aSymres2_asl.png",
        "sub-01_ses-b_desc-att_asl.png",
        "sub-01_ses-b_desc-fitrsquared_asl.png",
        "sub-01_ses-b_desc-motion_asl.png",
        "sub-01_ses-b_desc-carpet_asl.png",
    ],
    "02": [],
}
MISSING_FIELD = "field 'PostLabelingDelay' is required but missing"


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("report")
    bids, out, work = base / "bids", base / "out", base / "work"
    write_dataset(
        bids,
        [
            SyntheticSpec(subject="01", session="a", n_pairs=4, anatomy=ANATOMY,
                          background_suppression=True, bs_pulses=4, motion_mm=1.0),
            SyntheticSpec(subject="01", session="b", plds=(0.5, 1.0, 1.5, 2.0),
                          labeling_duration=1.4, n_pairs=1, anatomy=ANATOMY),
            SyntheticSpec(subject="02", n_pairs=2),
        ],
    )  # fmt: skip
    sidecar = bids / "sub-02" / "perf" / "sub-02_asl.json"
    meta = json.loads(sidecar.read_text())
    del meta["PostLabelingDelay"]
    sidecar.write_text(json.dumps(meta))
    result = subprocess.run(
        [sys.executable, "-m", "aslprep_lite", str(bids), str(out), "participant",
         "-w", str(work), "--nprocs", "2"],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "NIPYPE_NO_ET": "1"},
    )  # fmt: skip
    return SimpleNamespace(bids=bids, out=out, result=result)


def test_cli_writes_reports_and_status(processed):
    out, result = processed.out, processed.result
    assert result.returncode == 1, result.stderr
    assert "2 run(s) processed, 1 failed" in result.stderr
    for subject in ("01", "02"):
        assert f"INFO: report: {out / f'sub-{subject}.html'}" in result.stderr
        figures = out / f"sub-{subject}" / "figures"
        written = sorted(p.name for p in figures.iterdir()) if figures.is_dir() else []
        assert written == sorted(FIGURES[subject])
        page = (out / f"sub-{subject}.html").read_text()
        assert re.findall(r'<img src="([^"]+)"', page) == [
            f"sub-{subject}/figures/{name}" for name in FIGURES[subject]
        ]
    assert not (out / "sub-02").exists()  # refused at discovery: no folder of its own
    ok = json.loads((out / "logs" / "sub-01_runs.json").read_text())
    assert ok["Status"] == "ok" and ok["Report"] == "sub-01.html"
    assert [(r["AslFile"], r["Session"], r["Status"], r["Error"]) for r in ok["Runs"]] == [
        ("sub-01/ses-a/perf/sub-01_ses-a_asl.nii.gz", "a", "ok", None),
        ("sub-01/ses-b/perf/sub-01_ses-b_asl.nii.gz", "b", "ok", None),
    ]
    failed = json.loads((out / "logs" / "sub-02_runs.json").read_text())
    (run,) = failed["Runs"]
    assert failed["Status"] == run["Status"] == "failed"
    assert MISSING_FIELD in run["Error"] and run["Error"] in result.stderr


def test_reports_are_byte_identical(processed):
    from aslprep_lite.reports.participant import write_reports
    from aslprep_lite.reports.status import status_path

    def snapshot() -> dict[str, bytes]:
        files = [processed.out / "sub-01.html", processed.out / "sub-02.html"]
        files += sorted((processed.out / "sub-01" / "figures").iterdir())
        files += [status_path(processed.out, s) for s in ("01", "02")]
        return {p.name: p.read_bytes() for p in files}

    before = snapshot()
    bids = processed.bids.resolve()
    runs = [str(p) for p in sorted(bids.glob("sub-01/ses-*/perf/*_asl.nii.gz"))]
    failed = json.loads((processed.out / "logs" / "sub-02_runs.json").read_text())
    failure = (str(bids / failed["Runs"][0]["AslFile"]), failed["Runs"][0]["Error"])
    write_reports(processed.out, bids, runs, [failure])
    assert snapshot() == before


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip("/usr/bin/chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _open(browser, path: Path, screenshot: Path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri(), wait_until="load")
    widths = page.eval_on_selector_all(
        "img", "images => images.map(i => i.complete ? i.naturalWidth : 0)"
    )
    text = page.inner_text("body")
    page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    return problems, requests, widths, text


def _pixel_sd(path: Path) -> float:
    from PIL import Image

    return float(np.asarray(Image.open(path).convert("L"), float).std())


@pytest.mark.parametrize("subject", ["01", "02"])
def test_report_in_chromium(browser, processed, subject, tmp_path):
    report = processed.out / f"sub-{subject}.html"
    screenshot = tmp_path / f"sub-{subject}.png"
    problems, requests, widths, text = _open(browser, report, screenshot)
    assert problems == []
    # only the page and its own figures, all from the disk
    assert all(url.startswith("file://") for url in requests), requests
    assert len(requests) == 1 + len(FIGURES[subject])
    assert len(widths) == len(FIGURES[subject])
    assert all(width >= 400 for width in widths), widths
    assert _pixel_sd(screenshot) > 10.0  # not a blank page
    if subject == "01":
        for words in (
            "Anatomy",
            "sub-01_ses-a",
            "sub-01_ses-b",
            "Arterial transit time",
            "multi-delay: 0.5, 1, 1.5, 2 s",
            "single-delay: 1.8 s",
            "References",
        ):
            assert words in text, words  # fmt: skip
    else:
        assert "Errors" in text and MISSING_FIELD in text
