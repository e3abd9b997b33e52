"""The normalization's quality gate, and what a failed anatomy leaves in ``anat/``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from aslprep_lite.bids.derivatives import planned_anatomy_paths
from aslprep_lite.cli.workflow import _remove_anatomy, _report_anatomy_warnings
from aslprep_lite.config import ExecutionOptions, OutputOptions, QuantificationOptions, Settings
from aslprep_lite.errors import AslprepError
from aslprep_lite.interfaces.anatomical import (
    NORMALIZATION_CORRELATION,
    NORMALIZATION_FAILED_CORRELATION,
    _normalization_record,
)
from aslprep_lite.spaces import DEFAULT_OUTPUT_SPACES, parse_output_spaces

T1W = "/data/bids/sub-01/anat/sub-01_T1w.nii.gz"
TPL = "MNI152NLin2009aSym"


def test_thresholds_are_ordered():
    assert 0 < NORMALIZATION_FAILED_CORRELATION < NORMALIZATION_CORRELATION < 0.9


def test_good_normalization_has_no_warning():
    record = _normalization_record(TPL, 0.9013, T1W)
    assert record["Correlation"] == 0.9013
    assert record["CorrelationThreshold"] == NORMALIZATION_CORRELATION
    assert "Warning" not in record


def test_doubtful_normalization_warns():
    record = _normalization_record(TPL, 0.62, T1W)
    assert record["Warning"] == (
        f"normalization of the T1w to {TPL} may have failed (correlation with the template "
        f"0.62 < {NORMALIZATION_CORRELATION}): check the outputs in template space"
    )


def test_noise_t1w_fails_naming_the_t1w():
    """A pure-noise T1w normalizes with a correlation of about 0.16: the participant fails."""
    with pytest.raises(AslprepError) as caught:
        _normalization_record(TPL, 0.16, T1W)
    assert str(caught.value) == (
        f"{T1W}: normalization of the T1w to {TPL} failed (correlation of the normalized T1w "
        f"with the template 0.16 < {NORMALIZATION_FAILED_CORRELATION}): check that the image is "
        'a T1w head scan, or leave it out with --bids-filter-file (e.g. {"t1w": '
        '{"acquisition": "none"}})'
    )


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        execution=ExecutionOptions(bids_dir=tmp_path / "bids", work_dir=tmp_path / "work"),
        quantification=QuantificationOptions(),
        outputs=OutputOptions(
            output_dir=tmp_path / "out", output_spaces=parse_output_spaces(DEFAULT_OUTPUT_SPACES)
        ),
    )


def test_failed_anatomy_leaves_no_anat_files(tmp_path):
    """Files of an earlier run are removed when the participant's anatomy now fails; files
    aslprep_lite does not write there stay, and so does the folder holding them."""
    settings = _settings(tmp_path)
    out = settings.outputs.output_dir
    planned = planned_anatomy_paths("01", settings.outputs.output_spaces)
    for path in planned:
        for name in (path, path.replace(".nii.gz", ".json").replace(".h5", ".json")):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("old")
    _remove_anatomy(settings, "01")
    assert not (out / "sub-01" / "anat").exists()

    (out / "sub-01" / "anat").mkdir()
    for path in planned:
        (out / path).write_text("old")
    notes = out / "sub-01" / "anat" / "notes.txt"
    notes.write_text("the user's")
    _remove_anatomy(settings, "01")
    assert sorted(p.name for p in (out / "sub-01" / "anat").iterdir()) == ["notes.txt"]


def test_normalization_warnings_are_logged(tmp_path, caplog):
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    warning = _normalization_record("Kid+2", 0.7, T1W)["Warning"]
    sidecar = anat / "sub-01_from-T1w_to-Kid+2_mode-image_xfm.json"
    sidecar.write_text(json.dumps({"Normalization": {"Warning": warning}}))
    (anat / "sub-01_desc-preproc_T1w.json").write_text(json.dumps({"Normalization": {}}))
    with caplog.at_level(logging.WARNING, logger="aslprep_lite"):
        _report_anatomy_warnings(tmp_path, "01")
    assert [r.getMessage() for r in caplog.records] == [f"{sidecar}: {warning}"]
