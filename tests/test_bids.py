"""Discovery and metadata validation: awkward-but-valid metadata passes, bad metadata fails
with one line naming the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import edit_sidecar

from aslprep_lite.bids.derivatives import planned_paths
from aslprep_lite.bids.discovery import discover
from aslprep_lite.bids.files import read_aslcontext
from aslprep_lite.config import QuantificationOptions
from aslprep_lite.errors import AslprepError
from aslprep_lite.synthetic import SyntheticSpec, write_dataset


def _dataset(tmp_path: Path, **spec) -> tuple[Path, Path]:
    root = tmp_path / "bids"
    write_dataset(root, [SyntheticSpec(n_pairs=2, shape=(16, 16, 6), **spec)])
    return root, root / "sub-01" / "perf" / "sub-01_asl.json"


def _only_failure(root: Path) -> str:
    result = discover(root)
    assert not result.runs
    assert len(result.failures) == 1
    message = result.failures[0][1]
    assert "\n" not in message
    return message


def test_plan_of_a_valid_run(tmp_path):
    root, _ = _dataset(tmp_path)
    result = discover(root)
    assert not result.failures
    (plan,) = result.runs
    assert plan.asl_type == "PCASL"
    assert plan.volume_counts == {"control": 2, "label": 2}
    assert plan.labeled_value("post_labeling_delay") == 1.8
    assert plan.m0_file.endswith("sub-01_m0scan.nii.gz")
    assert plan.m0_repetition_time == 6.0
    assert plan.prefix == "sub-01"
    assert plan.source_files[0] == "bids:raw:sub-01/perf/sub-01_asl.nii.gz"


@pytest.mark.parametrize(
    "intended_for",
    [
        "perf/sub-01_asl.nii.gz",
        ["perf/sub-01_asl.nii.gz"],
        "bids::sub-01/perf/sub-01_asl.nii.gz",
    ],
)
def test_intended_for_forms(tmp_path, intended_for):
    root, _ = _dataset(tmp_path)
    perf = root / "sub-01" / "perf"
    # rename the M0 so only IntendedFor can link it to the run
    for ext in (".nii.gz", ".json"):
        (perf / f"sub-01_m0scan{ext}").rename(perf / f"sub-01_acq-m0_m0scan{ext}")
    edit_sidecar(perf / "sub-01_acq-m0_m0scan.json", IntendedFor=intended_for)
    (plan,) = discover(root).runs
    assert plan.m0_file.endswith("sub-01_acq-m0_m0scan.nii.gz")


def test_fmap_m0scan_is_not_the_m0(tmp_path):
    root, _ = _dataset(tmp_path)
    perf = root / "sub-01" / "perf"
    fmap = root / "sub-01" / "fmap"
    fmap.mkdir()
    for ext in (".nii.gz", ".json"):
        (perf / f"sub-01_m0scan{ext}").rename(fmap / f"sub-01_dir-pa_m0scan{ext}")
    message = _only_failure(root)
    assert "sub-01_asl.json" in message and "'M0Type'" in message


def test_aslcontext_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "x_aslcontext.tsv"
    path.write_bytes(b"volume_type\r\ncontrol\r\nlabel\r\n\r\n\r\n")
    assert read_aslcontext(path) == ["control", "label"]


def test_manufacturer_is_optional_and_ms_hint(tmp_path):
    root, sidecar = _dataset(tmp_path)
    assert "Manufacturer" not in json.loads(sidecar.read_text())
    edit_sidecar(sidecar, PostLabelingDelay=1800)
    message = _only_failure(root)
    assert "'PostLabelingDelay'" in message and "1.8 s" in message


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"MagneticFieldStrength": None}, "MagneticFieldStrength", "missing"),
        ({"ArterialSpinLabelingType": None}, "ArterialSpinLabelingType", "missing"),
        ({"ArterialSpinLabelingType": "FAIR"}, "ArterialSpinLabelingType", "one of"),
        ({"PostLabelingDelay": None}, "PostLabelingDelay", "missing"),
        ({"PostLabelingDelay": "1.8"}, "PostLabelingDelay", "number"),
        ({"PostLabelingDelay": -1.8}, "PostLabelingDelay", "negative"),
        ({"PostLabelingDelay": [1.8, 1.8, 1.8]}, "PostLabelingDelay", "3 values"),
        (
            {"PostLabelingDelay": [1.5, 2.0, 1.5, 2.0]},
            "PostLabelingDelay",
            "within a control/label pair",
        ),
        ({"BackgroundSuppression": None}, "BackgroundSuppression", "missing"),
        ({"BackgroundSuppression": "yes"}, "BackgroundSuppression", "true or false"),
        ({"M0Type": None}, "M0Type", "missing"),
        ({"RepetitionTimePreparation": None}, "RepetitionTimePreparation", "missing"),
        ({"RepetitionTimePreparation": 0}, "RepetitionTimePreparation", "> 0"),
        ({"RepetitionTimePreparation": -4}, "RepetitionTimePreparation", "> 0"),
        ({"LabelingDuration": None}, "LabelingDuration", "missing"),
        ({"LabelingDuration": 0}, "LabelingDuration", "0 for a labeled volume"),
        ({"LabelingDuration": [1.8]}, "LabelingDuration", "1 values"),
        ({"MRAcquisitionType": "2D"}, "SliceTiming", "missing"),
        ({"M0Type": "Estimate"}, "M0Estimate", "missing"),
        ({"M0Type": "Absent", "BackgroundSuppression": True}, "M0Type", "Absent"),
        ({"LabelingEfficiency": 1.5}, "LabelingEfficiency", "[0.3, 1]"),
        ({"LabelingEfficiency": 1e-300}, "LabelingEfficiency", "[0.3, 1]"),
        ({"MagneticFieldStrength": 4.7}, "MagneticFieldStrength", "4.7 T"),
    ],
)
def test_invalid_metadata(tmp_path, changes, field, words):
    root, sidecar = _dataset(tmp_path)
    edit_sidecar(sidecar, **changes)
    message = _only_failure(root)
    assert str(sidecar) in message
    assert f"'{field}'" in message
    assert words in message


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"BolusCutOffFlag": False}, "BolusCutOffFlag"),
        ({"BolusCutOffFlag": None}, "BolusCutOffFlag"),
        ({"BolusCutOffTechnique": None}, "BolusCutOffTechnique"),
        ({"BolusCutOffDelayTime": None}, "BolusCutOffDelayTime"),
    ],
)
def test_pasl_requires_bolus_cutoff(tmp_path, changes, field):
    root, sidecar = _dataset(tmp_path, asl_type="PASL", m0_type="Included")
    edit_sidecar(sidecar, **changes)
    message = _only_failure(root)
    assert f"'{field}'" in message


def test_aslcontext_problems(tmp_path):
    root, _ = _dataset(tmp_path)
    context = root / "sub-01" / "perf" / "sub-01_aslcontext.tsv"
    context.write_text("volume_type\ncontrol\nlabel\ncontrol\n")
    assert "3 volumes" in _only_failure(root) or "lists 3" in _only_failure(root)
    context.write_text("volume_type\ncontrol\nlabel\ncontrol\nbanana\n")
    assert "'banana'" in _only_failure(root)
    context.write_text("volume_type\ncontrol\ncontrol\ncontrol\ncontrol\n")
    assert "no control/label pairs" in _only_failure(root)
    # one pair and two controls without a partner: processed, the two left out
    context.write_text("volume_type\ncontrol\nlabel\ncontrol\ncontrol\n")
    (run,) = discover(root).runs
    assert run.unpaired_volumes == [2, 3]
    context.unlink()
    assert "aslcontext.tsv" in _only_failure(root)


def test_dataset_level_errors(tmp_path):
    with pytest.raises(AslprepError, match="not a BIDS dataset"):
        discover(tmp_path)
    root, _ = _dataset(tmp_path)
    with pytest.raises(AslprepError, match="02 not found"):
        discover(root, participant_label=["sub-02"])
    (plan,) = discover(root, participant_label=["sub-01"]).runs
    assert plan.subject == "01"


def test_malformed_json_names_the_file(tmp_path):
    root, sidecar = _dataset(tmp_path)
    sidecar.write_text('{"PostLabelingDelay": 1.8,')
    with pytest.raises(AslprepError, match=r"sub-01_asl\.json: not valid JSON"):
        discover(root)


def test_dummy_scans_drop_a_pair(tmp_path):
    root, _ = _dataset(tmp_path)
    (plan,) = discover(root, dummy_scans=2).runs
    assert plan.volume_counts == {"control": 1, "label": 1}
    assert len(plan.post_labeling_delay) == 2
    # one dummy scan leaves label, control, label: the last label has no partner
    (odd,) = discover(root, dummy_scans=1).runs
    assert odd.unpaired_volumes == [3]
    assert any("volume(s) 3 (label) left out, unpaired" in w for w in odd.warnings)
    failure = discover(root, dummy_scans=3).failures[0][1]
    assert "nothing to quantify after dropping 3 dummy scans" in failure


def test_q2tips_with_one_value_is_taken_as_ti1(tmp_path):
    root, sidecar = _dataset(
        tmp_path, asl_type="PASL", bolus_cutoff_technique="Q2TIPS", bolus_cutoff_delay=0.7
    )
    edit_sidecar(sidecar, BolusCutOffDelayTime=0.7)
    (run,) = discover(root).runs
    assert run.bolus_cutoff_delay == [0.7]
    (assumed,) = [a for a in run.assumed_metadata if a["Field"] == "BolusCutOffDelayTime"]
    assert assumed["Value"] == [0.7] and "taken as TI1" in assumed["Reason"]
    assert any("one value for Q2TIPS: used as TI1" in w for w in run.warnings)
    edit_sidecar(sidecar, BolusCutOffDelayTime=None)  # missing is still an error
    assert "'BolusCutOffDelayTime' is required" in discover(root).failures[0][1]


def test_assumed_metadata_is_listed(tmp_path):
    root, sidecar = _dataset(tmp_path, background_suppression=True, bs_pulses=4)
    edit_sidecar(sidecar, BackgroundSuppressionNumberPulses=None, MRAcquisitionType=None)
    (run,) = discover(root).runs
    assumed = {a["Field"]: a for a in run.assumed_metadata}
    assert assumed["LabelingEfficiency"]["Value"] == 0.85  # the PCASL consensus value
    assert assumed["BackgroundSuppressionNumberPulses"]["Value"] == 1
    assert "multiplied by 0.95" in assumed["BackgroundSuppressionNumberPulses"]["Reason"]
    assert assumed["MRAcquisitionType"]["Value"] == "3D"
    edit_sidecar(sidecar, LabelingEfficiency=0.8, BackgroundSuppressionNumberPulses=None)
    (run,) = discover(root).runs
    assumed = {a["Field"]: a for a in run.assumed_metadata}
    assert "LabelingEfficiency" not in assumed
    assert assumed["BackgroundSuppressionNumberPulses"]["Value"] is None


@pytest.mark.parametrize(("pld", "warned"), [(0.2, True), (0.9, True), (1.0, False), (1.8, False)])
def test_short_single_delay_warns(tmp_path, pld, warned):
    root, sidecar = _dataset(tmp_path)
    edit_sidecar(sidecar, PostLabelingDelay=pld)
    (run,) = discover(root).runs
    assert bool(run.quality_warnings) == warned
    if warned:
        assert (
            f"post-labeling delay of {pld:g} s is not tissue perfusion" in run.quality_warnings[0]
        )


# ---- the real-world metadata of bids-examples (metadata only; placeholder images) ----


def test_bids_examples_single_delay_plans(bids_examples):
    plans = {}
    for name in ("asl001", "asl002", "asl005"):
        result = discover(bids_examples / name, check_images=False)
        assert not result.failures, result.failures
        (plans[name],) = result.runs
    # GE deltam-only with an included M0: no registration possible
    assert plans["asl001"].volume_counts == {"m0scan": 1, "deltam": 1}
    assert plans["asl001"].hmc_summary.startswith("skipped")
    assert plans["asl001"].bs_pulses == 4
    # Philips 2D EPI: per-slice PLD, control first, separate M0 with TR 9 s
    assert plans["asl002"].slice_timing and len(plans["asl002"].slice_timing) == 20
    assert plans["asl002"].m0_repetition_time == 9.0
    # Siemens 3D GRASE with M0 TR 4.95 s: below 5 s, so the TR correction will apply
    assert plans["asl005"].m0_repetition_time == 4.95
    assert plans["asl005"].m0_file.endswith("perf/sub-Sub103_m0scan.nii.gz")


def _single_plan(path: Path):
    result = discover(path, check_images=False)
    assert not result.failures, result.failures
    (plan,) = result.runs
    return plan


def test_bids_examples_multi_delay_plans(bids_examples):
    plans = {name: _single_plan(bids_examples / name) for name in ("asl003", "asl004")}
    # Siemens PASL FAIR Q2TIPS: 10 inversion times, label first, BolusCutOffDelayTime [TI1, TI1s]
    pasl = plans["asl003"]
    assert pasl.is_multidelay and len(pasl.delays) == 10
    assert pasl.bolus_cutoff_technique == "Q2TIPS" and pasl.bolus_cutoff_delay == [0.7, 1.6]
    assert pasl.model(QuantificationOptions()).startswith("multi-TI PASL")
    # 6 PLDs with 16 volumes each; the reverse-PE m0scan under fmap/ is not the M0
    pcasl = plans["asl004"]
    assert pcasl.delays == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert set(pcasl.volumes_per_delay.values()) == {16}
    assert pcasl.labeling_efficiency == 0.88
    assert "/perf/" in pcasl.m0_file and "dir-pa" not in pcasl.m0_file


def test_bids_examples_hcp_aging_plan(hcp_aging_example):
    # HCP-Aging: 5 PLDs with unequal repeats, noRF and m0scan volumes inside the series
    hcp = _single_plan(hcp_aging_example)
    assert hcp.volumes_per_delay == {
        "0.2": 12,
        "0.7": 12,
        "1.2": 12,
        "1.7": 20,
        "2.2": 30,
    }
    assert hcp.volume_counts == {"label": 43, "control": 43, "noRF": 2, "m0scan": 2}
    assert hcp.m0_type == "Included" and hcp.m0_repetition_time == 8.0
    assert hcp.slice_timing and len(hcp.slice_timing) == 60
    assert any(
        suffix.endswith("_att.nii.gz") for suffix in planned_paths(hcp, QuantificationOptions())
    )


def test_bids_examples_images_are_placeholders(bids_examples):
    # with image checks on, the empty placeholder NIfTI is reported, by name, in one line
    result = discover(bids_examples / "asl005")
    (failure,) = result.failures
    assert "sub-Sub103_asl.nii.gz: not a readable NIfTI image" in failure[1]


def test_negative_slice_encoding_direction_reverses_slice_timing(tmp_path):
    root, sidecar = _dataset(tmp_path, slice_timing=True)
    timing = json.loads(sidecar.read_text())["SliceTiming"]
    (plan,) = discover(root).runs
    assert plan.slice_timing == timing  # "k" (the default): array order
    edit_sidecar(sidecar, SliceEncodingDirection="k-")
    (plan,) = discover(root).runs
    assert plan.slice_timing == timing[::-1]  # first entry = slice with the largest index


def test_filters_override_the_query_and_name_their_kind(tmp_path):
    """fMRIPrep-style filter files: an entity the query also sets is overridden, not doubled."""
    root, _ = _dataset(tmp_path)
    (run,) = discover(root, bids_filters={"asl": {"extension": ".nii.gz"}}).runs
    assert run.subject == "01"
    with pytest.raises(AslprepError, match="invalid BIDS filter for 't1w'"):
        discover(root, bids_filters={"t1w": {"bogus_entity": "x"}})


def test_cbf_volumes_do_not_make_a_series_multidelay(tmp_path):
    root, sidecar = _dataset(tmp_path)
    context = root / "sub-01" / "perf" / "sub-01_aslcontext.tsv"
    context.write_text("volume_type\ncbf\ncbf\ncbf\ncbf\n")
    edit_sidecar(sidecar, PostLabelingDelay=[1.5, 1.5, 2.0, 2.0])
    (run,) = discover(root).runs
    assert not run.is_multidelay and run.delays == []


def test_reference_calibration_echo_time_must_be_a_number(tmp_path):
    root, _ = _dataset(tmp_path)
    m0_sidecar = root / "sub-01" / "perf" / "sub-01_m0scan.json"
    edit_sidecar(m0_sidecar, EchoTime=[])
    failure = discover(root, m0_calibration="csf").failures[0][1]
    assert "sub-01_m0scan.json: field 'EchoTime' must be a number, not []" in failure


def test_t1w_choice_is_the_first_in_bids_order(tmp_path):
    """Several T1w: the first in BIDS order is the reference, the others are listed; a
    ``t1w`` filter picks another; a damaged T1w fails its participant's runs in one line."""
    import nibabel as nb
    import numpy as np

    from aslprep_lite.bids.summary import run_summary
    from aslprep_lite.config import QuantificationOptions
    from aslprep_lite.spaces import DEFAULT_OUTPUT_SPACES, parse_output_spaces

    write_dataset(tmp_path, [SyntheticSpec(subject="01"), SyntheticSpec(subject="02")])
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir()
    image = nb.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    for run in (2, 1):
        image.to_filename(anat / f"sub-01_run-{run}_T1w.nii.gz")
    (tmp_path / "sub-02" / "anat").mkdir()
    (tmp_path / "sub-02" / "anat" / "sub-02_T1w.nii.gz").write_bytes(b"\x1f\x8b truncated")
    result = discover(tmp_path)
    (run,) = result.runs
    assert run.t1w_file.endswith("sub-01_run-1_T1w.nii.gz")
    assert [Path(p).name for p in run.other_t1w] == ["sub-01_run-2_T1w.nii.gz"]
    (failure,) = result.failures
    assert "sub-02_T1w.nii.gz: T1w image is not a readable NIfTI" in failure[1]
    assert "\n" not in failure[1]
    summary = run_summary(run, QuantificationOptions(), parse_output_spaces(DEFAULT_OUTPUT_SPACES))
    assert summary["anatomy"]["mode"] == "T1w"
    assert any("space-T1w_cbf" in path for path in summary["outputs"])
    picked = discover(tmp_path, participant_label=["01"], bids_filters={"t1w": {"run": 2}})
    assert picked.runs[0].t1w_file.endswith("sub-01_run-2_T1w.nii.gz")
    assert picked.runs[0].other_t1w == []
