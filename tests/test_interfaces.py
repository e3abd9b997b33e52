"""Numbers computed inside the nipype interfaces (beyond the quant/ equations they call)."""

from __future__ import annotations

import numpy as np
from nipype.interfaces.base import isdefined

from aslprep_lite.interfaces.m0 import included_m0


def test_included_m0_volumes_with_different_trs():
    """Each m0scan volume is brought to the longest TR's saturation before averaging."""
    m0 = np.full((2, 2, 2), 1000.0)
    recovered_at_2s = 1.0 - np.exp(-2.0 / 1.607)  # grey-matter T1 at 3 T: 0.71203
    series = np.stack([m0 * recovered_at_2s, m0, np.zeros_like(m0)], axis=3)
    context = ["m0scan", "m0scan", "control"]
    mean, trs = included_m0(series, context, [2.0, 8.0, 4.0], t1_tissue=1.607, threshold=5.0)
    assert trs == [2.0, 8.0]
    # TR 8 s is fully relaxed (>= 5 s): both volumes become 1000, not (712 + 1000) / 2
    np.testing.assert_allclose(mean, 1000.0, rtol=1e-12)
    # equal TRs: a plain mean, left for the shared correction of that TR
    mean, _ = included_m0(
        np.stack([m0, m0 * 0.5, m0], axis=3), context, [4.0] * 3, t1_tissue=1.607, threshold=5.0
    )
    np.testing.assert_allclose(mean, 750.0)


def _kinetic_node_run(tmp_path, truth, m0_scale=1.0, **options):
    """Run FitKineticModel on the raw synthetic series (no motion) with these options."""
    import nibabel as nb

    from aslprep_lite.bids.discovery import discover
    from aslprep_lite.config import QuantificationOptions
    from aslprep_lite.interfaces.cbf import ComputeDeltaM
    from aslprep_lite.interfaces.kinetic import FitKineticModel
    from aslprep_lite.workflows.asl.cbf import quantification_of

    (run,) = discover(tmp_path / "bids").runs
    settings = QuantificationOptions(**options)
    name = "_".join(f"{k}-{v}" for k, v in options.items()) or "default"
    work = tmp_path / f"{name}_m0x{m0_scale:g}"
    work.mkdir()
    mask_file = work / "mask.nii.gz"
    nb.save(nb.Nifti1Image(truth.brain_mask.astype(np.uint8), truth.affine), mask_file)
    m0_file = work / "m0.nii.gz"
    nb.save(nb.Nifti1Image((truth.m0 * m0_scale).astype(np.float32), truth.affine), m0_file)
    deltam = ComputeDeltaM(context=run.context, in_file=str(truth.asl_file))
    deltam = deltam.run(cwd=str(work)).outputs.out_file
    node = FitKineticModel(
        deltam_file=deltam,
        m0_file=str(m0_file),
        mask_file=str(mask_file),
        context=run.context,
        asl_type=run.asl_type,
        post_labeling_delay=run.post_labeling_delay,
        labeling_duration=run.labeling_duration,
        quantification=quantification_of(run),
        att_method=settings.att_method,
        att_prior=settings.att_prior,
    )
    outputs = node.run(cwd=str(work)).outputs
    cbf = nb.load(outputs.mean_file).get_fdata()[truth.brain_mask]
    return outputs, cbf


def test_kinetic_node_att_prior_and_methods(tmp_path):
    """The sidecar says which ATT estimate ran: the local prior (default, with its settings
    and typical values), none, or the weighted delay (no prior, no ATT error map)."""
    from aslprep_lite.synthetic import SyntheticSpec, write_dataset

    spec = SyntheticSpec(
        subject="md", plds=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5), labeling_duration=1.4, n_pairs=2
    )
    (truth,) = write_dataset(tmp_path / "bids", [spec])
    local, cbf_local = _kinetic_node_run(tmp_path, truth)
    none, cbf_none = _kinetic_node_run(tmp_path, truth, att_prior="none")
    wd, _ = _kinetic_node_run(tmp_path, truth, att_method="weighted-delay")

    prior = local.metadata["FitSettings"]["ATTPrior"]
    assert prior["NeighbourhoodFWHM"] == 8.0 and prior["MinimumSD"] == 0.1
    assert 0.9 < prior["MedianMean"] < 1.6  # GM 1.2 s, WM 1.6 s
    assert prior["MedianSD"] >= 0.1
    assert "posterior SD" in local.maps_metadata["att_stderr"]["Description"]
    assert none.metadata["FitSettings"]["ATTPrior"] == "none"
    assert "att_stderr" not in none.maps_metadata  # the spec's description stands
    assert "ATTPrior" not in wd.metadata["FitSettings"]
    assert not isdefined(wd.att_stderr)
    # The prior changes the estimates (same data, same node otherwise)
    assert not np.array_equal(cbf_local, cbf_none)
    assert np.median(np.abs(cbf_local - cbf_none)) < 0.1 * np.median(np.abs(cbf_none))

    # Plausible CBF: no warning; an M0 100 times too small (a vendor scale): a loud one
    assert local.metadata["QualityWarnings"] == []
    scaled, _ = _kinetic_node_run(tmp_path, truth, m0_scale=0.01)
    (warning,) = scaled.metadata["QualityWarnings"]
    assert "M0 scaling" in warning


def _blob(shape=(24, 24, 20)) -> np.ndarray:
    """A smooth, asymmetric head-like volume."""
    grid = np.indices(shape, dtype=np.float64)
    centre = np.array([11.0, 12.5, 9.0])[:, None, None, None]
    radii = np.array([8.0, 6.0, 5.0])[:, None, None, None]
    head = np.exp(-(((grid - centre) / radii) ** 2).sum(axis=0))
    spot = np.exp(-(((grid - np.array([15.0, 9.0, 11.0])[:, None, None, None]) / 2.5) ** 2).sum(0))
    return (1000 * head + 400 * spot).astype(np.float32)


def test_rigid_registration_node_recovers_a_shift(tmp_path):
    """The generic node returns the fixed-to-moving world matrix: a 2 mm / -1.5 mm shift."""
    import nibabel as nb

    from aslprep_lite.interfaces.registration import RigidRegistration

    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    shifted = affine.copy()
    shifted[:3, 3] = [2.0, -1.5, 0.0]  # the same data, 2 mm right and 1.5 mm back in the world
    nb.save(nb.Nifti1Image(_blob(), affine), tmp_path / "fixed.nii.gz")
    volumes = np.stack([_blob(), _blob()], axis=3)  # 4D: registered through its mean
    nb.save(nb.Nifti1Image(volumes, shifted), tmp_path / "moving.nii.gz")
    node = RigidRegistration(
        fixed_file=str(tmp_path / "fixed.nii.gz"),
        moving_file=str(tmp_path / "moving.nii.gz"),
        metric="correlation",
        seed=1,
    )
    matrix = np.load(node.run(cwd=str(tmp_path)).outputs.matrix_file)
    np.testing.assert_allclose(matrix[:3, 3], [2.0, -1.5, 0.0], atol=0.1)
    np.testing.assert_allclose(matrix[:3, :3], np.eye(3), atol=0.01)


def test_rigid_registration_node_refuses_an_empty_image(tmp_path):
    import nibabel as nb
    import pytest

    from aslprep_lite.errors import AslprepError
    from aslprep_lite.interfaces.registration import RigidRegistration

    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    nb.save(nb.Nifti1Image(_blob(), affine), tmp_path / "fixed.nii.gz")
    nb.save(nb.Nifti1Image(np.zeros((24, 24, 20), np.float32), affine), tmp_path / "m0.nii.gz")
    node = RigidRegistration(
        fixed_file=str(tmp_path / "fixed.nii.gz"),
        moving_file=str(tmp_path / "m0.nii.gz"),
        moving_name="M0",
        seed=1,
    )
    with pytest.raises(AslprepError, match=r"m0.nii.gz: M0 has no positive signal"):
        node.run(cwd=str(tmp_path))


def test_sidecars_composed_from_the_output_spec():
    from aslprep_lite.bids.derivatives import BY_KEY, compose_sidecar

    records = {
        "quantification": {"Model": "m", "Description": "fitted"},
        "m0": {"BrainMask": "Otsu", "ReferenceRegion": {"Tissue": "csf"}},
        "confounds": {"framewise_displacement": {"Units": "mm"}},
        "maps": {"cbf_longestdelay": {"Description": "longest delay 2 s"}},
    }
    provenance = {"Sources": ["bids:raw:x"], "ProcessingParameters": {"M0Scale": 1.0}}
    cbf = compose_sidecar(BY_KEY["cbf"], records, provenance)
    # the node's Description (a multi-delay fit) wins over the spec's; the M0 record nests
    assert cbf["Units"] == "mL/100 g/min" and cbf["Description"] == "fitted"
    assert cbf["M0"] == records["m0"] and cbf["Sources"] == ["bids:raw:x"]
    assert compose_sidecar(BY_KEY["mask"], records, provenance)["Description"] == "Otsu"
    assert "Units" not in compose_sidecar(BY_KEY["mask"], records, provenance)
    reference = compose_sidecar(BY_KEY["m0_reference_mask"], records, provenance)
    assert reference["Type"] == "CSF"
    longest = compose_sidecar(BY_KEY["cbf_longestdelay"], records, provenance)
    assert longest == {
        "Units": "mL/100 g/min",
        "Description": "longest delay 2 s",
        **provenance,
    }
    confounds = compose_sidecar(BY_KEY["confounds"], records, provenance)
    assert confounds["framewise_displacement"] == {"Units": "mm"}


def test_anatomy_crash_names_the_bids_t1w(tmp_path):
    """SimpleITK's N4 refuses a 3-voxel T1w: the line names the T1w, not a work file."""
    import nibabel as nb
    import pytest

    from aslprep_lite.errors import AslprepError
    from aslprep_lite.interfaces.anatomical import PreprocessT1w
    from aslprep_lite.spaces import anatomy_template_files

    t1w = tmp_path / "sub-01_T1w.nii.gz"
    data = np.random.default_rng(0).random((3, 3, 3)).astype(np.float32)
    nb.save(nb.Nifti1Image(data, np.eye(4)), t1w)
    node = PreprocessT1w(
        t1w_file=str(t1w),
        template="MNI152NLin2009aSym",
        template_files={k: str(v) for k, v in anatomy_template_files().items()},
        seed=1,
    )
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(AslprepError) as caught:
        node.run(cwd=str(work))
    message = str(caught.value)
    assert message.startswith(
        f"{t1w}: T1w preprocessing (N4, normalization, segmentation) failed (RuntimeError: "
    ), message
    assert message.endswith(
        "check that the image holds a whole head at a usual resolution (details in the crash "
        "file of the working directory)"
    ), message
    assert "\n" not in message


def test_run_node_failure_names_the_bids_file_not_the_work_file(tmp_path):
    """An AslprepError about a work-directory file (here the tissue maps on the ASL grid) is
    re-issued naming the run's BIDS file, the reason unchanged."""
    import nibabel as nb
    import pytest

    from aslprep_lite.errors import AslprepError
    from aslprep_lite.interfaces.anatomical import ReferenceRegionFromTissue

    tissue = tmp_path / "tissue_asl.nii.gz"
    nb.save(nb.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), tissue)
    asl = "/data/bids/sub-01/perf/sub-01_asl.nii.gz"
    node = ReferenceRegionFromTissue(tissue_file=str(tissue), tissue="csf", source_file=asl)
    with pytest.raises(AslprepError) as caught:
        node.run(cwd=str(tmp_path))
    assert str(caught.value) == (
        f"{asl}: only 0 voxels of the ASL grid are pure CSF (fraction > 0.9) in the T1w "
        "segmentation: too few for --m0-calibration; give --m0-reference-mask or use "
        "--m0-calibration voxel"
    )


def test_each_template_output_carries_its_own_registration(tmp_path):
    """T1w-free with two templates: each template's maps and transform carry that template's
    registration record; the native maps keep the run's (the first template's)."""
    import json

    import nibabel as nb

    from aslprep_lite.interfaces.outputs import WriteDerivatives

    cbf = tmp_path / "cbf.nii.gz"
    nb.save(nb.Nifti1Image(np.ones((2, 2, 2), np.float32), np.eye(4)), cbf)
    xfm = tmp_path / "xfm.txt"
    xfm.write_text("#Insight Transform File V1.0\n")
    coreg = {
        k: {"Coregistration": {"Dice": d, "Template": k}} for k, d in (("A", 0.9), ("B+2", 0.7))
    }
    spaces = {"A": "A:res-2", "B+2": "B:cohort-2:res-2"}
    node = WriteDerivatives(
        output_dir=str(tmp_path / "out"), out_dir="sub-01/perf", prefix="sub-01",
        keys=["cbf"], cbf=str(cbf), sources=["bids::x"], parameters={},
        cbf_metadata={}, m0_metadata={}, confounds_metadata={},
        coregistration_metadata=coreg["A"],
        resampled=[
            {"key": "cbf", "space": spaces[k], "file": str(cbf), "record": {"Template": k},
             "coregistration": coreg[k]}
            for k in spaces
        ],
        xfm_targets=list(spaces), xfm_files=[str(xfm)] * 2, xfm_records=list(coreg.values()),
    )  # fmt: skip
    node.run(cwd=str(tmp_path))
    perf = tmp_path / "out" / "sub-01" / "perf"

    def dice(name: str) -> float:
        return json.loads((perf / name).read_text())["Coregistration"]["Dice"]

    assert dice("sub-01_cbf.json") == 0.9
    assert dice("sub-01_space-A_res-2_cbf.json") == 0.9
    assert dice("sub-01_space-B_cohort-2_res-2_cbf.json") == 0.7
    assert dice("sub-01_from-aslref_to-A_mode-image_xfm.json") == 0.9
    assert dice("sub-01_from-aslref_to-B+2_mode-image_xfm.json") == 0.7


def test_coregistration_failure_names_the_bids_file(tmp_path):
    """A T1w brain far smaller than the ASL brain cannot match it (Dice < 0.5): the line
    names the run's BIDS file (its M0 scan), not the reference in the work directory."""
    import nibabel as nb
    import pytest

    from aslprep_lite.errors import AslprepError
    from aslprep_lite.interfaces.anatomical import CoregisterAsl

    def ball(shape, zoom, radius_mm):
        ijk = np.indices(shape).transpose(1, 2, 3, 0)
        centre = (np.asarray(shape) - 1) / 2
        inside = np.linalg.norm((ijk - centre) * zoom, axis=-1) < radius_mm
        affine = np.diag([zoom, zoom, zoom, 1.0])
        affine[:3, 3] = -centre * zoom
        return inside, affine

    asl, asl_affine = ball((24, 24, 24), 3.0, 30.0)
    t1w, t1w_affine = ball((48, 48, 48), 2.0, 18.0)  # Dice about 2 * 0.216 / 1.216
    files = {}
    for name, data, affine in (
        ("reference", asl * 1000.0, asl_affine), ("asl_mask", asl, asl_affine),
        ("t1w", t1w * 500.0, t1w_affine), ("t1w_mask", t1w, t1w_affine),
    ):  # fmt: skip
        files[name] = tmp_path / f"{name}.nii.gz"
        nb.save(nb.Nifti1Image(data.astype(np.float32), affine), files[name])
    m0 = "/data/bids/sub-01/perf/sub-01_m0scan.nii.gz"
    node = CoregisterAsl(
        reference_file=str(files["reference"]), asl_mask_file=str(files["asl_mask"]),
        t1w_file=str(files["t1w"]), t1w_mask_file=str(files["t1w_mask"]),
        reference_name="M0", seed=1, source_file=m0,
    )  # fmt: skip
    with pytest.raises(AslprepError) as caught:
        node.run(cwd=str(tmp_path))
    message = str(caught.value)
    assert message.startswith(f"{m0}: ASL to T1w coregistration failed (Dice of the brain "), (
        message
    )
    assert "check that the T1w is this participant's and covers the brain" in message
