"""Graph construction (built, not run), the methods text of every branch, node caching."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from nipype.interfaces.base import isdefined
from nipype.pipeline import engine as pe

from aslprep_lite.bids.derivatives import ASL_DERIVATIVES, BY_KEY, planned_derivatives
from aslprep_lite.bids.discovery import discover
from aslprep_lite.cli.run import main
from aslprep_lite.config import QuantificationOptions
from aslprep_lite.synthetic import SyntheticSpec, write_dataset
from aslprep_lite.workflows.asl.base import init_asl_wf
from aslprep_lite.workflows.asl.fit import m0_methods
from aslprep_lite.workflows.base import collect_boilerplate

MULTI_PLD = (0.5, 1.0, 1.5, 2.0)
#: One small run per branch the graph takes: single/multi-delay × M0Type (× 2D readout).
SMALL = {"shape": (12, 12, 6), "n_pairs": 2}
CASES = {
    "separate": SyntheticSpec(subject="separate", **SMALL),
    "included": SyntheticSpec(subject="included", m0_type="Included", **SMALL),
    "estimate": SyntheticSpec(subject="estimate", m0_type="Estimate", **SMALL),
    "absent": SyntheticSpec(subject="absent", m0_type="Absent", **SMALL),
    "multi": SyntheticSpec(subject="multi", shape=(12, 12, 6), n_pairs=1, plds=MULTI_PLD),
    "multi2d": SyntheticSpec(
        subject="multi2d", shape=(12, 12, 6), n_pairs=1, plds=MULTI_PLD, slice_timing=True,
        m0_type="Included", background_suppression=True, bs_pulses=3,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    write_dataset(root, list(CASES.values()))
    discovery = discover(root)
    assert not discovery.failures
    return {run.subject: run for run in discovery.runs}


def _nodes(workflow: pe.Workflow) -> set[str]:
    """Dotted node names inside the run workflow."""
    return set(workflow.list_node_names())


def _build(run, **options):
    options = QuantificationOptions(**options)
    workflow = init_asl_wf(run, options, output_dir="/nonexistent", omp_nthreads=1)
    return workflow, options


@pytest.mark.parametrize(
    ("subject", "calibration"),
    # validation refuses reference-region calibration without an M0 image (Estimate)
    [(s, c) for s in CASES for c in ("voxel", "csf") if not (s == "estimate" and c == "csf")],
)
def test_graph_builds_for_every_branch(runs, subject, calibration, tmp_path):
    run = runs[subject]
    mask = tmp_path / "csf.nii.gz"
    mask.write_bytes(b"")
    workflow, options = _build(
        run,
        m0_calibration=calibration,
        m0_reference_mask=str(mask) if calibration != "voxel" else None,
    )
    nodes = _nodes(workflow)
    assert {"load_series", "hmc_wf.estimate", "m0_wf.prepare_m0", "cbf_wf.deltam"} <= nodes
    assert "outputs_wf.write_derivatives" in nodes
    # the M0 is registered only when it is a separate scan
    assert ("m0_wf.align_m0" in nodes) == (run.m0_type == "Separate")
    # one quantification node, the one for the number of delays
    assert ("cbf_wf.kinetic_fit" in nodes) == run.is_multidelay
    assert ("cbf_wf.cbf" in nodes) == (not run.is_multidelay)
    # quality control for every run; SCORE/SCRUB for single-delay runs only; without a T1w
    # or a template space, the QC registers the template's priors itself
    assert "qc_wf.qc" in nodes
    assert ("qc_wf.score_scrub" in nodes) == (not run.is_multidelay)
    assert "qc_wf.align_priors" in nodes
    # the writer writes exactly the planned derivatives
    write = workflow.get_node("outputs_wf.write_derivatives")
    assert write.inputs.keys == [d.key for d in planned_derivatives(run, options)]
    assert ("m0_reference_mask" in write.inputs.keys) == (calibration != "voxel")
    # no node input carries a whole run record: every input is a plain, narrow value
    for name in workflow.list_node_names():
        node = workflow.get_node(name)
        for trait, value in node.inputs.get().items():
            assert trait != "plan"
            assert not (isinstance(value, dict) and "asl_file" in value), (name, trait)


def test_options_reach_only_the_nodes_that_use_them(runs):
    single, _ = _build(runs["separate"], att_prior="none", smooth_kernel=3.0)
    # a single-delay graph hashes no multi-delay option anywhere
    for name in single.list_node_names():
        inputs = single.get_node(name).inputs.get()
        assert "att_prior" not in inputs and "att_method" not in inputs
    parameters = single.get_node("outputs_wf.write_derivatives").inputs.parameters
    assert parameters == {
        "M0Scale": 1.0,
        "M0SmoothingFWHM": 3.0,
        "DummyScans": 0,
        "M0Calibration": "voxel",
        "RandomSeed": 20240,
        "PairAverage": "mean",
    }
    assert single.get_node("m0_wf.prepare_m0").inputs.fwhm == 3.0
    multi, _ = _build(runs["multi"], att_prior="none")
    assert multi.get_node("cbf_wf.kinetic_fit").inputs.att_prior == "none"
    parameters = multi.get_node("outputs_wf.write_derivatives").inputs.parameters
    assert parameters["ATTPrior"] == "none" and parameters["ATTMethod"] == "fit"
    # the per-pair average acts on single-delay runs only
    assert "PairAverage" not in parameters


def test_output_spec_names():
    assert BY_KEY["cbf"].filename("sub-01") == "sub-01_cbf.nii.gz"
    assert BY_KEY["mask"].filename("sub-01_ses-1") == "sub-01_ses-1_desc-brain_mask.nii.gz"
    assert BY_KEY["confounds"].sidecar_name("sub-01") == "sub-01_desc-confounds_timeseries.json"
    # the entities fMRIPrep orders as space, res, desc
    in_template = BY_KEY["cbf_stderr"].__class__(
        "x", "cbf", desc="stderr", space="MNI152NLin2009aSym", res="2"
    )
    assert in_template.filename("sub-01") == (
        "sub-01_space-MNI152NLin2009aSym_res-2_desc-stderr_cbf.nii.gz"
    )
    assert len({d.key for d in ASL_DERIVATIVES}) == len(ASL_DERIVATIVES)


def _methods(run, **options) -> str:
    workflow, _ = _build(run, **options)
    top = pe.Workflow(name="top")
    subject = pe.Workflow(name="sub_wf")
    subject.add_nodes([workflow])
    top.add_nodes([subject])
    return "\n\n".join(collect_boilerplate(top))


def test_methods_of_runs_that_differ_are_attributed(runs):
    top = pe.Workflow(name="top")
    subject = pe.Workflow(name="sub_wf")
    subject.add_nodes([_build(runs[name])[0] for name in ("separate", "estimate", "absent")])
    top.add_nodes([subject])
    paragraphs = collect_boilerplate(top)
    m0 = [p for p in paragraphs if "calibration M0" in p]
    labels = [p.split(":")[0] for p in m0]
    assert labels == ["For sub-absent", "For sub-estimate", "For sub-separate"]  # sorted runs
    # head motion is described the same way for all three: one paragraph, no attribution
    assert sum("Head motion was estimated" in p for p in paragraphs) == 1
    assert not any(p.startswith("For") and "Head motion" in p for p in paragraphs)


def test_methods_in_processing_order(runs):
    text = _methods(runs["separate"])
    order = ["Head motion was estimated", "The calibration M0", "Cerebral blood flow was", "Six"]
    assert [text.index(p) for p in order] == sorted(text.index(p) for p in order)


def test_methods_follow_m0_type(runs):
    assert "separately acquired M0 scan, rigidly aligned" in _methods(runs["separate"])
    included = _methods(runs["included"])
    assert "M0 volumes of the ASL series" in included
    assert "M0Estimate" in _methods(runs["estimate"])
    absent = _methods(runs["absent"])
    assert "mean control image, acquired without background suppression" in absent
    assert "smoothed with a Gaussian kernel of 5 mm FWHM" in absent


def test_methods_for_scanner_deltam_and_pasl_cutoffs(tmp_path):
    root = tmp_path / "bids"
    specs = [
        SyntheticSpec(subject="dm", deltam_only=True, m0_type="Included", **SMALL),
        SyntheticSpec(subject="quipss", asl_type="PASL", bolus_cutoff_technique="QUIPSS", **SMALL),
        SyntheticSpec(subject="q2tips", asl_type="PASL", bolus_cutoff_technique="Q2TIPS", **SMALL),
    ]
    write_dataset(root, specs)
    runs = {run.subject: run for run in discover(root).runs}
    deltam = _methods(runs["dm"])
    assert "The ΔM volumes computed on the scanner (deltam) were used as acquired" in deltam
    assert "control − label" not in deltam
    assert "Head-motion correction was skipped" in deltam
    quipss = _methods(runs["quipss"])
    assert "(2·α·(TI − TI1)·M0) for PASL with QUIPSS (Wong et al. 1998)" in quipss
    assert "Luh" not in quipss
    assert "(2·α·TI1·M0) for PASL with Q2TIPS (Luh et al. 1999)" in _methods(runs["q2tips"])


def test_methods_follow_calibration_and_smoothing(runs, tmp_path):
    mask = tmp_path / "csf.nii.gz"
    mask.write_bytes(b"")
    csf = _methods(runs["separate"], m0_calibration="csf", m0_reference_mask=str(mask))
    assert "reference region of cerebrospinal fluid" in csf
    assert "smoothed" not in csf.split("The brain mask")[0]  # no voxelwise smoothing then
    assert "1 − exp(−TR/T1,tissue)" not in csf and "full recovery" not in csf
    assert "from the M0 as acquired" in csf
    assert "It was not smoothed." in _methods(runs["separate"], smooth_kernel=0.0)
    assert "M0 scale factor 10" in _methods(runs["separate"], m0_scale=10.0)
    assert "M0 scale factor" not in _methods(runs["separate"])


def test_methods_follow_delays_readout_and_background_suppression(runs):
    single = _methods(runs["separate"])
    assert "single-compartment model recommended by the ASL consensus" in single
    assert "general kinetic model" not in single and "2D readout" not in single
    multi2d = _methods(runs["multi2d"])
    assert "multi-delay acquisition (4 delays)" in multi2d
    assert "general kinetic model (Buxton et al. 1998)" in multi2d
    assert "Gaussian prior per voxel" in multi2d
    assert "For the 2D readout the delay of each slice" in multi2d
    assert "3 background-suppression inversion pulses" in multi2d
    assert "background-suppression" not in single
    assert "Gaussian prior" not in _methods(runs["multi2d"], att_prior="none")
    assert "weighted mean delay" in _methods(runs["multi2d"], att_method="weighted-delay")


def test_m0_methods_tr_correction():
    common = {
        "m0_type": "Separate",
        "registered": True,
        "has_control": True,
        "m0_scale": 1.0,
        "fwhm": 5.0,
    }
    short = m0_methods(m0_repetition_time=4.0, calibration="voxel", **common)
    assert "repetition time of 4 s (below 5 s), it was divided by 1 − exp(−TR/T1" in short
    assert "no saturation correction" in m0_methods(
        m0_repetition_time=6.0, calibration="voxel", **common
    )


def _result_mtimes(work: Path) -> dict[str, float]:
    """Modification time of every node's result file: rewritten only when a node reruns."""
    return {
        str(path.relative_to(work)): path.stat().st_mtime_ns
        for path in work.rglob("result_*.pklz")
    }


def test_changed_options_rerun_only_the_nodes_that_use_them(tmp_path):
    """Same work directory: --att-prior on single-delay data reruns nothing, and
    --smooth-kernel reruns the M0 step and what follows, never head-motion estimation."""
    bids, out, work = tmp_path / "bids", tmp_path / "out", tmp_path / "work"
    write_dataset(bids, [SyntheticSpec(subject="01", shape=(16, 16, 8), n_pairs=3)])
    args = [str(bids), str(out), "participant", "-w", str(work), "--nprocs", "1"]
    assert main(args) == 0
    first = _result_mtimes(work)
    assert any("hmc_wf/estimate" in name for name in first)
    cbf_sidecar = (out / "sub-01" / "perf" / "sub-01_cbf.json").read_bytes()

    assert main([*args, "--att-prior", "none"]) == 0
    assert _result_mtimes(work) == first  # no node ran again
    assert (out / "sub-01" / "perf" / "sub-01_cbf.json").read_bytes() == cbf_sidecar

    assert main([*args, "--smooth-kernel", "3"]) == 0
    third = _result_mtimes(work)
    rerun = {name for name in third if third[name] != first.get(name)}
    assert not any("hmc_wf" in name or "load_series" in name for name in rerun)
    assert any("prepare_m0" in name for name in rerun)
    assert not any("align_m0" in name for name in rerun)
    assert any("write_derivatives" in name for name in rerun)
    smoothing = json.loads((out / "sub-01" / "perf" / "sub-01_cbf.json").read_text())
    assert smoothing["M0"]["SmoothingFWHM"]["Value"] == 3.0
    assert os.listdir(out / "sub-01" / "perf")  # outputs still in place

    # derivatives deleted since: the writer (only) runs again and puts them back
    (out / "sub-01" / "perf" / "sub-01_cbf.nii.gz").unlink()
    assert main([*args, "--smooth-kernel", "3"]) == 0
    fourth = _result_mtimes(work)
    assert {name for name in fourth if fourth[name] != third.get(name)} == {
        name for name in fourth if "write_derivatives" in name
    }
    assert (out / "sub-01" / "perf" / "sub-01_cbf.nii.gz").is_file()


def test_options_that_do_not_act_are_not_handed_on(runs, tmp_path):
    """--att-prior with the weighted delay, --smooth-kernel with a reference region: neither
    reaches a node nor the sidecar, so changing them reruns nothing."""
    weighted, _ = _build(runs["multi"], att_method="weighted-delay", att_prior="none")
    assert not isdefined(weighted.get_node("cbf_wf.kinetic_fit").inputs.att_prior)
    parameters = weighted.get_node("outputs_wf.write_derivatives").inputs.parameters
    assert parameters["ATTMethod"] == "weighted-delay" and "ATTPrior" not in parameters
    mask = tmp_path / "csf.nii.gz"
    mask.write_bytes(b"")
    csf, _ = _build(
        runs["separate"], m0_calibration="csf", m0_reference_mask=str(mask), smooth_kernel=2.0
    )
    assert not isdefined(csf.get_node("m0_wf.prepare_m0").inputs.fwhm)
    parameters = csf.get_node("outputs_wf.write_derivatives").inputs.parameters
    assert "M0SmoothingFWHM" not in parameters and parameters["M0Calibration"] == "csf"


@pytest.fixture(scope="module")
def space_resources():
    """Template files of the default spaces (the embedded template: offline)."""
    from aslprep_lite.spaces import (
        DEFAULT_OUTPUT_SPACES,
        anatomy_template_files,
        check_templates,
        parse_output_spaces,
    )
    from aslprep_lite.workflows.base import SpaceResources

    spaces = parse_output_spaces(DEFAULT_OUTPUT_SPACES)
    files = check_templates(spaces)
    return SpaceResources(
        spaces=spaces,
        template_files={k: {r: str(p) for r, p in v.items()} for k, v in files.items()},
        space_records={k: {"Template": k.split(":")[0]} for k in files},
        anatomy_template_files={k: str(v) for k, v in anatomy_template_files().items()},
    )


@pytest.mark.parametrize(
    ("t1w", "calibration", "spaces"),
    [(True, "voxel", "default"), (True, "csf", "default"), (False, "voxel", "default"),
     (False, "voxel", "asl"), (True, "voxel", "asl")],
)  # fmt: skip
def test_graph_spaces_branches(runs, space_resources, t1w, calibration, spaces, tmp_path):
    """Anatomy, coregistration, T1w-free alignment and reference regions where they belong."""
    from dataclasses import replace

    import nibabel as nb
    import numpy as np

    from aslprep_lite.config import ExecutionOptions, OutputOptions, Settings
    from aslprep_lite.workflows.base import init_aslprep_lite_wf

    t1w_file = tmp_path / "T1w.nii.gz"
    nb.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)).to_filename(t1w_file)
    run = replace(runs["separate"], t1w_file=str(t1w_file) if t1w else None)
    resources = space_resources
    if spaces == "asl":
        resources = replace(resources, spaces=resources.spaces[:1], template_files={})
    settings = Settings(
        execution=ExecutionOptions(bids_dir=tmp_path, work_dir=tmp_path / "w"),
        quantification=QuantificationOptions(m0_calibration=calibration),
        outputs=OutputOptions(output_dir=tmp_path / "o", output_spaces=resources.spaces),
    )
    workflow = init_aslprep_lite_wf(settings, [run], resources)
    nodes = set(workflow.list_node_names())
    prefix = "sub_separate_wf.asl_sub_separate."
    templates = spaces == "default"
    assert ("sub_separate_wf.anat_wf.preprocess_t1w" in nodes) == t1w
    assert ("sub_separate_wf.anat_wf.write_anatomy" in nodes) == t1w
    assert ("sub_separate_wf.anat_wf.itk_MNI152NLin2009aSym" in nodes) == (t1w and templates)
    assert (prefix + "coreg_wf.coregister" in nodes) == t1w
    assert (prefix + "spaces_wf.resample" in nodes) == (t1w or templates)
    assert (prefix + "spaces_wf.align_MNI152NLin2009aSym" in nodes) == (templates and not t1w)
    assert (prefix + "spaces_wf.tissue_cbf" in nodes) == (t1w or templates)
    assert (prefix + "reference_region" in nodes) == (t1w and calibration == "csf")
    if t1w and calibration == "csf":  # the CBF sidecar says where the region came from
        prepare = workflow.get_node(prefix + "m0_wf.prepare_m0")
        assert prepare.inputs.reference_source == "T1w segmentation (pCSF > 0.9 on the ASL grid)"
    text = " ".join(collect_boilerplate(workflow))
    assert ("normalized to the MNI152NLin2009aSym template" in text) == t1w
    assert ("No T1w image was available" in text) == (templates and not t1w)


@pytest.mark.parametrize("t1w", [True, False])
def test_two_cohorts_of_one_template_are_two_normalizations(runs, space_resources, t1w, tmp_path):
    """Kid:cohort-1 and Kid:cohort-2 are keyed Kid+1 and Kid+2 (sMRIPrep's names): one
    normalization (with a T1w) or one registration (T1w-free) each, each T1w-free template
    output carrying its own template's registration record."""
    from dataclasses import replace

    import nibabel as nb
    import numpy as np

    from aslprep_lite.bids.derivatives import planned_anatomy_paths, transform_targets
    from aslprep_lite.config import ExecutionOptions, OutputOptions, Settings
    from aslprep_lite.spaces import parse_output_spaces
    from aslprep_lite.workflows.base import init_aslprep_lite_wf

    t1w_file = tmp_path / "T1w.nii.gz"
    nb.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)).to_filename(t1w_file)
    run = replace(runs["separate"], t1w_file=str(t1w_file) if t1w else None)
    spaces = parse_output_spaces(["asl", "T1w", "Kid:cohort-1", "Kid:cohort-2"])
    files = {
        s.label: {
            r: str(tmp_path / f"{s.template_key}_{r}.nii.gz") for r in ("T1w", "mask", "GM", "WM")
        }
        for s in spaces
        if s.is_template
    }
    for template in files.values():  # graph inputs must exist; the graph is not run
        for path in template.values():
            Path(path).touch()
    resources = replace(
        space_resources,
        spaces=spaces,
        template_files=files,
        space_records={
            label: {"Template": "Kid", "Cohort": label.split(":")[1].removeprefix("cohort-")}
            for label in files
        },
    )
    settings = Settings(
        execution=ExecutionOptions(bids_dir=tmp_path, work_dir=tmp_path / "w"),
        quantification=QuantificationOptions(),
        outputs=OutputOptions(output_dir=tmp_path / "o", output_spaces=spaces),
    )
    workflow = init_aslprep_lite_wf(settings, [run], resources)
    nodes = set(workflow.list_node_names())
    anat = "sub_separate_wf.anat_wf."
    spaces_wf = workflow.get_node("sub_separate_wf.asl_sub_separate.spaces_wf")
    assert transform_targets(run, spaces) == (["T1w"] if t1w else ["Kid+1", "Kid+2"])
    if t1w:
        for key in ("Kid_1", "Kid_2"):
            assert f"{anat}normalize_{key}" in nodes and f"{anat}itk_{key}" in nodes
        assert workflow.get_node(f"{anat}write_anatomy").inputs.templates == ["Kid+1", "Kid+2"]
        paths = planned_anatomy_paths("01", spaces)
        assert "sub-01/anat/sub-01_from-T1w_to-Kid+1_mode-image_xfm.h5" in paths
        assert "sub-01/anat/sub-01_from-Kid+2_to-T1w_mode-image_xfm.h5" in paths
        assert len([p for p in paths if p.endswith(".h5")]) == 4
        norm = workflow.get_node(f"{anat}normalize_Kid_2")
        assert norm.inputs.template_files == files["Kid:cohort-2:res-2"]
        return
    align = {k: spaces_wf.get_node(f"align_{k}") for k in ("Kid_1", "Kid_2")}
    assert align["Kid_1"].inputs.template_files == files["Kid:cohort-1:res-2"]
    assert align["Kid_2"].inputs.template_files == files["Kid:cohort-2:res-2"]
    records = spaces_wf.get_node("align_records")
    graph = spaces_wf._graph
    assert graph.get_edge_data(align["Kid_1"], records)["connect"] == [("record", "in1")]
    assert graph.get_edge_data(align["Kid_2"], records)["connect"] == [("record", "in2")]
    resample = spaces_wf.get_node("resample")
    assert ("out", "coregistrations") in graph.get_edge_data(records, resample)["connect"]
    outputnode = spaces_wf.get_node("outputnode")
    assert ("out", "xfm_records") in graph.get_edge_data(records, outputnode)["connect"]
    assert resample.inputs.templates == ["Kid+1", "Kid+2"]
    assert [s["template"] for s in resample.inputs.spaces] == ["Kid+1", "Kid+2"]


def test_reused_anatomy_is_named_in_the_sidecars(runs, space_resources, tmp_path):
    """--anat-derivatives: every sidecar of the run names the folder and the files it uses;
    the T1w and template spaces name the reused T1w and transform."""
    from dataclasses import replace

    from aslprep_lite.bids.anat_derivatives import PrecomputedAnatomy
    from aslprep_lite.config import ExecutionOptions, OutputOptions, Settings
    from aslprep_lite.workflows.base import init_aslprep_lite_wf

    deriv = tmp_path / "smriprep"
    anat = deriv / "sub-separate" / "anat"
    anat.mkdir(parents=True)

    def placeholder(name: str) -> Path:
        path = anat / f"sub-separate_{name}"
        path.touch()
        return path

    tpl = "MNI152NLin2009aSym"
    precomputed = PrecomputedAnatomy(
        source=deriv,
        t1w=placeholder("desc-preproc_T1w.nii.gz"),
        mask=placeholder("desc-brain_mask.nii.gz"),
        dseg=placeholder("dseg.nii.gz"),
        probseg={t: placeholder(f"label-{t}_probseg.nii.gz") for t in ("GM", "WM", "CSF")},
        to_template={tpl: placeholder(f"from-T1w_to-{tpl}_mode-image_xfm.h5")},
        from_template={tpl: placeholder(f"from-{tpl}_to-T1w_mode-image_xfm.h5")},
        dseg_labels={1: "GM", 2: "WM", 3: "CSF"},
    )
    run = replace(runs["separate"], t1w_file=str(precomputed.t1w))
    resources = replace(space_resources, precomputed={"separate": precomputed})
    settings = Settings(
        execution=ExecutionOptions(bids_dir=tmp_path, work_dir=tmp_path / "w"),
        quantification=QuantificationOptions(),
        outputs=OutputOptions(output_dir=tmp_path / "o", output_spaces=resources.spaces),
    )
    workflow = init_aslprep_lite_wf(settings, [run], resources)
    prefix = "sub_separate_wf.asl_sub_separate."
    parameters = workflow.get_node(prefix + "outputs_wf.write_derivatives").inputs.parameters
    folder = "sub-separate/anat/sub-separate_"
    assert parameters["AnatDerivatives"] == {
        "Folder": str(deriv),
        "Files": [
            f"{folder}desc-preproc_T1w.nii.gz", f"{folder}desc-brain_mask.nii.gz",
            f"{folder}dseg.nii.gz", f"{folder}label-CSF_probseg.nii.gz",
            f"{folder}label-GM_probseg.nii.gz", f"{folder}label-WM_probseg.nii.gz",
            f"{folder}from-T1w_to-{tpl}_mode-image_xfm.h5",
            f"{folder}from-{tpl}_to-T1w_mode-image_xfm.h5",
        ],
    }  # fmt: skip
    records = {
        space["label"]: space["record"]
        for space in workflow.get_node(prefix + "spaces_wf.resample").inputs.spaces
    }
    assert records["T1w"]["Reference"] == str(precomputed.t1w)
    assert records[f"{tpl}:res-2"]["Transforms"][1] == str(precomputed.to_template[tpl])


def _source_file_unset(workflow: pe.Workflow) -> list[str]:
    """Nodes whose interface has a mandatory ``source_file`` input that no one set."""
    unset = []
    for name in workflow.list_node_names():
        node = workflow.get_node(name)
        if "source_file" in node.interface.inputs.traits(mandatory=True):
            if not isdefined(node.inputs.source_file):
                unset.append(name)
    return unset


def _mandatory_unset(workflow: pe.Workflow) -> list[str]:
    """``node.input`` of every mandatory input that is neither set nor connected.

    Such a node fails its input check before nipype writes its result file, and nipype's
    MultiProc then waits for that file forever: the run hangs instead of failing.
    """
    graph = workflow._create_flat_graph()  # the graph nipype runs (connections resolved)
    connected = {node: set() for node in graph.nodes()}
    for _, node, data in graph.in_edges(data=True):
        connected[node] |= {dest for _, dest in data["connect"]}
    return sorted(
        f"{node.fullname}.{name}"
        for node in graph.nodes()
        for name in node.interface.inputs.traits(mandatory=True)
        if not isdefined(getattr(node.inputs, name)) and name not in connected[node]
    )


@pytest.mark.parametrize(
    ("t1w", "spaces"),
    [(False, "asl"), (True, "asl"), (False, "default"), (True, "default"),
     (False, "no-priors"), (True, "reused")],
)  # fmt: skip
def test_every_node_names_its_source_file(runs, space_resources, t1w, spaces, tmp_path):
    """Every node whose failures name the BIDS file (a mandatory ``source_file``) is given it,
    in each branch of the participant's graph: a node built without it fails at run time."""
    from dataclasses import replace

    import nibabel as nb
    import numpy as np

    from aslprep_lite.bids.anat_derivatives import PrecomputedAnatomy
    from aslprep_lite.config import ExecutionOptions, OutputOptions, Settings
    from aslprep_lite.workflows.base import init_aslprep_lite_wf

    t1w_file = tmp_path / "T1w.nii.gz"
    nb.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)).to_filename(t1w_file)
    run = replace(runs["separate"], t1w_file=str(t1w_file) if t1w else None)
    resources = space_resources
    if spaces == "asl":
        resources = replace(resources, spaces=resources.spaces[:1], template_files={})
    elif spaces == "no-priors":  # template spaces without GM/WM maps: the QC's own priors
        resources = replace(
            resources,
            template_files={
                label: {r: p for r, p in files.items() if r in ("T1w", "mask")}
                for label, files in resources.template_files.items()
            },
        )
    elif spaces == "reused":  # --anat-derivatives
        anat = tmp_path / "smriprep" / "sub-separate" / "anat"
        anat.mkdir(parents=True)
        tpl = "MNI152NLin2009aSym"
        names = {
            "t1w": "desc-preproc_T1w", "mask": "desc-brain_mask", "dseg": "dseg",
            "GM": "label-GM_probseg", "WM": "label-WM_probseg", "CSF": "label-CSF_probseg",
        }  # fmt: skip
        paths = {k: anat / f"sub-separate_{v}.nii.gz" for k, v in names.items()}
        for path in paths.values():
            path.touch()
        xfms = {d: anat / f"sub-separate_{d}_mode-image_xfm.h5"
                for d in (f"from-T1w_to-{tpl}", f"from-{tpl}_to-T1w")}  # fmt: skip
        for path in xfms.values():
            path.touch()
        precomputed = PrecomputedAnatomy(
            source=anat.parents[1],
            t1w=paths["t1w"],
            mask=paths["mask"],
            dseg=paths["dseg"],
            probseg={t: paths[t] for t in ("GM", "WM", "CSF")},
            to_template={tpl: xfms[f"from-T1w_to-{tpl}"]},
            from_template={tpl: xfms[f"from-{tpl}_to-T1w"]},
            dseg_labels={1: "GM", 2: "WM", 3: "CSF"},
        )
        run = replace(run, t1w_file=str(precomputed.t1w))
        resources = replace(resources, precomputed={"separate": precomputed})
    settings = Settings(
        execution=ExecutionOptions(bids_dir=tmp_path, work_dir=tmp_path / "w"),
        quantification=QuantificationOptions(),
        outputs=OutputOptions(output_dir=tmp_path / "o", output_spaces=resources.spaces),
    )
    workflow = init_aslprep_lite_wf(settings, [run], resources)
    nodes = set(workflow.list_node_names())
    prefix = "sub_separate_wf.asl_sub_separate."
    # the branch under test is the one built: the QC registers its own priors without tissue
    own_priors = not t1w and spaces in ("asl", "no-priors")
    assert (prefix + "qc_wf.align_priors" in nodes) == own_priors
    assert (prefix + "qc_wf.priors_on_asl" in nodes) == own_priors
    assert _source_file_unset(workflow) == []
    assert _mandatory_unset(workflow) == []
    if own_priors:  # the Separate M0 is the reference: failures name the M0 scan
        for node in ("align_priors", "priors_on_asl"):
            assert workflow.get_node(prefix + "qc_wf." + node).inputs.source_file == run.m0_file
        # the QC sidecar says that coregistration_dice is the Dice of this registration
        qc = workflow.get_node(prefix + "qc_wf.qc")
        assert qc.inputs.tissue_source.endswith(
            "made for the quality control only; coregistration_dice is the Dice of the ASL and "
            "template brain masks after this registration)"
        )
