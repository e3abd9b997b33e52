"""The report's parts without the pipeline: status record, markdown, figures, sections.

A small fake output folder (a 24 x 28 x 10 map, a 6-volume CBF series, SCORE/SCRUB maps, a
confounds table with ``score_outlier_index`` and a QC table) checks that the sections appear
exactly when their files do. The browser test runs the real command line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from aslprep_lite.quant.qc import COLUMNS, write_qc_tsv
from aslprep_lite.reports.figures import Volume, mosaic, series_plot
from aslprep_lite.reports.markdown import markdown_to_html
from aslprep_lite.reports.participant import build_report, write_reports
from aslprep_lite.reports.status import collect_statuses, status_record

SHAPE = (24, 28, 10)
AFFINE = np.diag([3.0, 3.0, 4.0, 1.0])
#: Volumes of the CBF series; SCORE removed volumes 2 and 4.
N_VOLUMES = 6
REMOVED = (2, 4)


def _save(data: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nb.Nifti1Image(np.asarray(data, np.float32), AFFINE).to_filename(path)


@pytest.fixture
def fake_output(tmp_path: Path) -> tuple[Path, Path]:
    """BIDS and output folders of one processed run (sub-01) and one failed run (sub-02)."""
    bids, out = tmp_path / "bids", tmp_path / "out"
    rng = np.random.default_rng(0)
    grid = np.indices(SHAPE)
    centre = np.array(SHAPE)[:, None, None, None] / 2
    mask = (((grid - centre) / (np.array(SHAPE)[:, None, None, None] / 2.5)) ** 2).sum(0) < 1
    cbf = np.where(mask, 60 + 5 * rng.standard_normal(SHAPE), 0)
    perf = out / "sub-01" / "perf"
    _save(cbf, perf / "sub-01_cbf.nii.gz")
    _save(mask, perf / "sub-01_desc-brain_mask.nii.gz")
    series = np.stack([cbf * (1 + 0.1 * t) for t in range(N_VOLUMES)], axis=-1)
    _save(series, perf / "sub-01_desc-timeseries_cbf.nii.gz")
    _save(cbf * 0.9, perf / "sub-01_desc-score_cbf.nii.gz")
    _save(cbf * 0.8, perf / "sub-01_desc-scrub_cbf.nii.gz")
    index = ["1" if t in REMOVED else "0" for t in range(N_VOLUMES)]
    (perf / "sub-01_desc-confounds_timeseries.tsv").write_text(
        "framewise_displacement\tscore_outlier_index\n"
        + "".join(f"{'n/a' if t == 0 else '0.1'}\t{index[t]}\n" for t in range(N_VOLUMES))
    )
    row = dict.fromkeys(COLUMNS)
    row.update(gm_cbf=61.5, pairs_used=4, pairs_removed=2)
    write_qc_tsv([row], perf / "sub-01_desc-qualitycontrol_cbf.tsv")
    (perf / "sub-01_cbf.json").write_text(
        json.dumps(
            {
                "PostLabelingDelay": 1.8,
                "QualityWarnings": ["a warning from the sidecar"],
                "Coregistration": {"Quality": "lower than through a T1w"},
                "Quantification": {"BloodT1": {"Value": 1.65, "Units": "s", "Source": "X"}},
            }
        )
    )
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "CITATION.md").write_text("# Methods\n\nText with **bold**.\n\n- ref <1>\n")
    for subject in ("01", "02"):
        raw = bids / f"sub-{subject}" / "perf" / f"sub-{subject}_asl.nii.gz"
        raw.parent.mkdir(parents=True)
        raw.write_bytes(b"")  # the raw series is read only for the carpet plot
    return bids, out


def _statuses(bids: Path):
    return collect_statuses(
        bids,
        [str(bids / "sub-01/perf/sub-01_asl.nii.gz")],
        [(str(bids / "sub-02/perf/sub-02_asl.nii.gz"), "sub-02_asl.json: field 'X' <bad>")],
    )


def test_status_record(tmp_path):
    bids = tmp_path / "bids"
    statuses = _statuses(bids)
    assert list(statuses) == ["01", "02"]
    record = status_record("02", statuses["02"])
    assert record == {
        "Participant": "02",
        "Report": "sub-02.html",
        "Runs": [
            {
                "AslFile": "sub-02/perf/sub-02_asl.nii.gz",
                "Error": "sub-02_asl.json: field 'X' <bad>",
                "Prefix": "sub-02",
                "Session": None,
                "Status": "failed",
            }
        ],
        "SchemaVersion": 1,
        "Status": "failed",
    }
    assert status_record("01", statuses["01"])["Status"] == "ok"


def test_status_keeps_the_first_error_and_sessions(tmp_path):
    bids = tmp_path / "bids"
    asl = str(bids / "sub-03/ses-b/perf/sub-03_ses-b_run-2_asl.nii.gz")
    (run,) = collect_statuses(bids, [asl], [(asl, "first"), (asl, "second")])["03"]
    assert (run.session, run.prefix, run.status, run.error) == (
        "b",
        "sub-03_ses-b_run-2",
        "failed",
        "first",
    )


def test_markdown():
    text = (
        "# Methods\n\nOne *a* and **b** with `c` <x>.\nSame paragraph.\n\n"
        "## Refs\n\n- one\n- two\n  more"
    )
    assert markdown_to_html(text) == (
        "<h2>Methods</h2>\n"
        "<p>One <em>a</em> and <strong>b</strong> with <code>c</code> &lt;x&gt;. "
        "Same paragraph.</p>\n"
        "<h3>Refs</h3>\n<ul><li>one</li><li>two more</li></ul>"
    )


def test_figures_are_deterministic_pngs():
    rng = np.random.default_rng(1)
    volume = Volume(rng.random(SHAPE).astype(np.float32) * 100, (3.0, 3.0, 4.0), AFFINE)
    first = mosaic(volume, vmin=0, vmax=100, label="CBF")
    assert first == mosaic(volume, vmin=0, vmax=100, label="CBF")
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"Software" not in first and b"tIME" not in first
    plot = series_plot(np.arange(5.0), np.array([0, 1, 0, 0, 1], bool), "CBF")
    assert plot == series_plot(np.arange(5.0), np.array([0, 1, 0, 0, 1], bool), "CBF")


def test_sections_follow_the_files(fake_output):
    bids, out = fake_output
    reports = write_reports(
        out,
        bids,
        [str(bids / "sub-01/perf/sub-01_asl.nii.gz")],
        [(str(bids / "sub-02/perf/sub-02_asl.nii.gz"), "bad <sidecar>")],
    )
    assert reports == [out / "sub-01.html", out / "sub-02.html"]
    page = reports[0].read_text()
    figures = sorted(p.name for p in (out / "sub-01" / "figures").iterdir())
    assert figures == [
        "sub-01_desc-cbf_asl.png",
        "sub-01_desc-cbfseries_asl.png",
        "sub-01_desc-motion_asl.png",
        "sub-01_desc-score_asl.png",
        "sub-01_desc-scrub_asl.png",
    ]
    assert re.findall(r'<img src="([^"]+)"', page) == [f"sub-01/figures/{f}" for f in (
        "sub-01_desc-cbf_asl.png", "sub-01_desc-motion_asl.png",
        "sub-01_desc-cbfseries_asl.png", "sub-01_desc-score_asl.png",
        "sub-01_desc-scrub_asl.png")]  # fmt: skip
    assert f"{len(REMOVED)} volume(s) removed by SCORE marked" in page
    assert "<tr><td>gm_cbf</td><td>61.5</td><td>mL/100 g/min</td></tr>" in page
    assert "<tr><td>pairs_removed</td><td>2</td><td>count</td></tr>" in page
    assert "<tr><td>qei</td><td>n/a</td>" in page
    assert "a warning from the sidecar" in page and "lower than through a T1w" in page
    assert "<th>BloodT1</th><td>1.65 s — X</td>" in page
    assert "<strong>bold</strong>" in page and "ref &lt;1&gt;" in page
    assert "<script" not in page and "http" not in page
    failed = reports[1].read_text()
    assert '<p class="error">bad &lt;sidecar&gt;</p>' in failed
    assert not (out / "sub-02").exists()  # a failed participant: no folder of its own
    assert json.loads((out / "logs" / "sub-02_runs.json").read_text())["Status"] == "failed"
    # the same files give the same bytes; a figure whose file went is removed
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "sub-01" / "perf" / "sub-01_desc-scrub_cbf.nii.gz").unlink()
    build_report(out, bids, "01", _statuses(bids)["01"])
    assert not (out / "sub-01" / "figures" / "sub-01_desc-scrub_asl.png").exists()
    assert "SCRUB" not in (out / "sub-01.html").read_text()
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    changed = {p.name for p in before if before[p] != after.get(p)}
    assert changed == {"sub-01.html", "sub-01_desc-scrub_asl.png", "sub-01_desc-scrub_cbf.nii.gz"}


def test_removed_volumes_from_either_table_layout():
    from aslprep_lite.reports.participant import _removed_volumes

    per_volume = np.array([0, 1, 0, 1.0])
    assert _removed_volumes(per_volume, 4, []).tolist() == [False, True, False, True]
    # a row per ASL volume: n/a on the rows that are not CBF volumes
    with_na = np.array([np.nan, 0, np.nan, 1, np.nan, 0])
    assert _removed_volumes(with_na, 3, []).tolist() == [False, True, False]
    # a row per ASL volume, both volumes of a pair flagged: the label rows
    pairs = np.array([0, 0, 1, 1, 0, 0.0])
    context = ["control", "label"] * 3
    assert _removed_volumes(pairs, 3, context).tolist() == [False, True, False]
    assert _removed_volumes(pairs, 4, context) is None


def test_status_keeps_runs_of_earlier_invocations(fake_output):
    bids, out = fake_output
    first = str(bids / "sub-01/perf/sub-01_asl.nii.gz")
    second = bids / "sub-01/perf/sub-01_run-2_asl.nii.gz"
    second.write_bytes(b"")
    write_reports(out, bids, [first], [])
    # another invocation (e.g. a BIDS filter) considers run 2 only, which fails
    write_reports(out, bids, [], [(str(second), "run 2 <failed>")])
    record = json.loads((out / "logs" / "sub-01_runs.json").read_text())
    assert [(r["Prefix"], r["Status"]) for r in record["Runs"]] == [
        ("sub-01", "ok"),
        ("sub-01_run-2", "failed"),
    ]
    assert record["Status"] == "failed"
    page = (out / "sub-01.html").read_text()
    assert 'id="run-sub-01"' in page and 'id="run-sub-01_run-2"' in page
    # an earlier ok run whose CBF map is gone is no longer listed
    (out / "sub-01" / "perf" / "sub-01_cbf.nii.gz").unlink()
    write_reports(out, bids, [], [(str(second), "run 2 <failed>")])
    record = json.loads((out / "logs" / "sub-01_runs.json").read_text())
    assert [r["Prefix"] for r in record["Runs"]] == ["sub-01_run-2"]


def test_removed_volumes_of_mixed_contexts():
    """A CBF volume is removed when any of its source volumes is flagged: pairs, deltam and
    cbf volumes, in the order of quant.deltam.timeseries_sources."""
    from aslprep_lite.reports.participant import _removed_volumes

    context = ["m0scan", "control", "label", "deltam", "cbf", "control", "label"]
    # CBF series: pair (1, 2), deltam 3, cbf 4, pair (5, 6); SCORE removed cbf 4 and pair 5-6
    index = np.array([0, 0, 0, 0, 1, 1, 1.0])
    assert _removed_volumes(index, 4, context).tolist() == [False, False, True, True]
    # a pair with its label first (volumes 1-2) between two deltam volumes; flagging only one
    # volume of the pair removes it
    context = ["deltam", "label", "control", "deltam"]
    assert _removed_volumes(np.array([0, 1, 0, 0.0]), 3, context).tolist() == [
        False,
        True,
        False,
    ]
    assert _removed_volumes(np.array([1, 0, 0, 1.0]), 3, context).tolist() == [
        True,
        False,
        True,
    ]
    # rows that are not those of the context, or a CBF series of another length: unmatched
    assert _removed_volumes(np.zeros(6), 4, context) is None
    assert _removed_volumes(np.zeros(4), 4, context) is None


def test_status_badge_is_escaped(fake_output):
    from aslprep_lite.reports.participant import Page, run_section
    from aslprep_lite.reports.status import RunStatus

    bids, out = fake_output
    status = RunStatus("sub-01/perf/sub-01_asl.nii.gz", "sub-01", "01", None, 'ok"><x>')
    html = run_section(Page(out, bids, "01"), status)
    assert '<span class="badge ok&quot;&gt;&lt;x&gt;">ok&quot;&gt;&lt;x&gt;</span>' in html
    assert "<x>" not in html


def _annexed(bids: Path, relative: str, data: np.ndarray) -> Path:
    """``bids/relative`` as DataLad/git-annex stores it: a relative symbolic link to an
    object under ``.git/annex/objects`` whose name has no BIDS entities."""
    key = "MD5E-s1234--0123456789abcdef0123456789abcdef.nii.gz"
    target = bids / ".git" / "annex" / "objects" / "Xk" / "3q" / key / key
    _save(data, target)
    link = bids / relative
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(Path("../" * (len(Path(relative).parts) - 1)) / target.relative_to(bids))
    return link


def test_annexed_asl_file_keeps_its_bids_path(fake_output, tmp_path):
    """A DataLad dataset: the record names the BIDS file, not the annex object, and the report
    finds the raw sidecar and aslcontext beside it."""
    bids, out = fake_output
    rng = np.random.default_rng(2)
    raw = rng.random((*SHAPE, N_VOLUMES)).astype(np.float32)
    link = _annexed(bids, "sub-01/perf/sub-01_asl.nii.gz", raw)
    assert ".git/annex/objects" in str(link.resolve())
    perf = bids / "sub-01" / "perf"
    (perf / "sub-01_asl.json").write_text(
        json.dumps({"ArterialSpinLabelingType": "PCASL", "M0Type": "Estimate"})
    )
    (perf / "sub-01_aslcontext.tsv").write_text("volume_type\n" + "deltam\n" * N_VOLUMES)
    write_reports(out, bids, [str(link)], [])
    record = json.loads((out / "logs" / "sub-01_runs.json").read_text())
    assert [r["AslFile"] for r in record["Runs"]] == ["sub-01/perf/sub-01_asl.nii.gz"]
    page = (out / "sub-01.html").read_text()
    assert '<p class="source">sub-01/perf/sub-01_asl.nii.gz</p>' in page
    assert "<tr><th>Labeling</th><td>PCASL</td></tr>" in page
    assert "<tr><th>M0Type</th><td>Estimate</td></tr>" in page
    assert (out / "sub-01" / "figures" / "sub-01_desc-carpet_asl.png").is_file()
    # one CBF volume per deltam volume of the aslcontext: SCORE's removals are matched
    assert f"{len(REMOVED)} volume(s) removed by SCORE marked" in page
    # the dataset reached through a link of its own: the file is still named within it
    alias = tmp_path / "alias"
    alias.symlink_to(bids)
    (run,) = collect_statuses(alias, [str(link)], [])["01"]
    assert run.asl_file == "sub-01/perf/sub-01_asl.nii.gz"
    # a file outside the dataset (should not happen) keeps its whole path
    outside = tmp_path / "elsewhere" / "sub-09_asl.nii.gz"
    (run,) = collect_statuses(bids, [str(outside)], [])["09"]
    assert run.asl_file == str(outside)


def test_report_with_reused_anatomy(fake_output, tmp_path):
    """--anat-derivatives: no anat/ in the output; the report takes the T1w, mask, dseg and
    transform that the CBF sidecar's ProcessingParameters.AnatDerivatives names."""
    from aslprep_lite.quant.warps import Deformation

    bids, out = fake_output
    deriv = tmp_path / "smriprep"
    anat = deriv / "sub-01" / "anat"
    grid = np.indices(SHAPE)
    centre = np.array(SHAPE)[:, None, None, None] / 2
    radius = (((grid - centre) / (np.array(SHAPE)[:, None, None, None] / 2.5)) ** 2).sum(0)
    brain = radius < 1
    dseg = np.where(radius < 0.4, 2, np.where(brain, 1, 0))
    _save(np.where(brain, 100.0, 0.0), anat / "sub-01_desc-preproc_T1w.nii.gz")
    _save(brain, anat / "sub-01_desc-brain_mask.nii.gz")
    _save(dseg, anat / "sub-01_dseg.nii.gz")
    tpl = "MNI152NLin2009aSym"
    xfm = anat / f"sub-01_from-T1w_to-{tpl}_mode-image_xfm.h5"
    Deformation.from_affine(np.eye(4), SHAPE, AFFINE).to_itk_file(xfm)
    perf = out / "sub-01" / "perf"
    _save(np.where(brain, 60.0, 0.0), perf / "sub-01_space-T1w_cbf.nii.gz")
    _save(brain, perf / "sub-01_space-T1w_desc-brain_mask.nii.gz")
    sidecar = json.loads((perf / "sub-01_cbf.json").read_text())
    folder = "sub-01/anat/sub-01_"
    sidecar["ProcessingParameters"] = {
        "AnatDerivatives": {
            "Folder": str(deriv),
            "Files": [
                f"{folder}desc-preproc_T1w.nii.gz", f"{folder}desc-brain_mask.nii.gz",
                f"{folder}dseg.nii.gz", f"{folder}label-CSF_probseg.nii.gz",
                f"{folder}label-GM_probseg.nii.gz", f"{folder}label-WM_probseg.nii.gz",
                f"{folder}from-T1w_to-{tpl}_mode-image_xfm.h5",
                f"{folder}from-{tpl}_to-T1w_mode-image_xfm.h5",
            ],
        }
    }  # fmt: skip
    (perf / "sub-01_cbf.json").write_text(json.dumps(sidecar))
    write_reports(out, bids, [str(bids / "sub-01/perf/sub-01_asl.nii.gz")], [])
    assert not (out / "sub-01" / "anat").exists()
    figures = sorted(p.name for p in (out / "sub-01" / "figures").iterdir())
    assert figures == [
        "sub-01_desc-MNI152NLin2009aSym_T1w.png",
        "sub-01_desc-cbf_asl.png",
        "sub-01_desc-cbfseries_asl.png",
        "sub-01_desc-coreg_asl.png",
        "sub-01_desc-motion_asl.png",
        "sub-01_desc-score_asl.png",
        "sub-01_desc-scrub_asl.png",
        "sub-01_desc-seg_T1w.png",
    ]
    page = (out / "sub-01.html").read_text()
    assert '<li><a href="#anatomy">Anatomy</a></li>' in page
    assert f"through sub-01_from-T1w_to-{tpl}_mode-image_xfm.h5" in page


def test_cohort_templates_are_asked_with_their_cohort(monkeypatch, tmp_path):
    """A transform to X+N asks TemplateFlow for X with cohort N (else several files match)."""
    from aslprep_lite.reports import participant

    asked = []

    def fake(template, resolution, **entities):
        asked.append((template, resolution, entities))
        return None

    monkeypatch.setattr(participant, "_template_file", fake)
    anat = tmp_path / "out" / "sub-01" / "anat"
    _save(np.ones(SHAPE), anat / "sub-01_desc-preproc_T1w.nii.gz")
    (anat / "sub-01_from-T1w_to-MNIPediatricAsym+2_mode-image_xfm.h5").write_bytes(b"")
    page = participant.Page(tmp_path / "out", tmp_path / "bids", "01")
    page.anatomy = participant.anatomy_files(tmp_path / "out", "01", [])
    participant.anatomy_section(page)
    assert asked == [
        ("MNIPediatricAsym", 2, {"desc": None, "suffix": "T1w", "cohort": "2"}),
        ("MNIPediatricAsym", 2, {"desc": "brain", "suffix": "mask", "cohort": "2"}),
        ("MNIPediatricAsym", 2, {"label": "WM", "suffix": "probseg", "cohort": "2"}),
    ]


def test_cohort_space_maps_are_drawn_over_their_cohort(fake_output, monkeypatch):
    """A CBF map in space-X_cohort-N is drawn over X's cohort-N T1w."""
    from aslprep_lite.reports import participant
    from aslprep_lite.reports.status import RunStatus

    asked = []

    def fake(template, resolution, **entities):
        asked.append((template, resolution, entities))
        return None

    monkeypatch.setattr(participant, "_template_file", fake)
    bids, out = fake_output
    perf = out / "sub-01" / "perf"
    _save(np.ones(SHAPE), perf / "sub-01_space-MNIPediatricAsym_cohort-2_res-2_cbf.nii.gz")
    status = RunStatus("sub-01/perf/sub-01_asl.nii.gz", "sub-01", "01", None, "ok")
    html = participant.run_section(participant.Page(out, bids, "01"), status)
    assert asked == [("MNIPediatricAsym", 2, {"desc": None, "suffix": "T1w", "cohort": "2"})]
    assert "CBF resampled to space-MNIPediatricAsym_cohort-2_res-2." in html
