"""Numbers computed inside the nipype interfaces (beyond the quant/ equations they call)."""

from __future__ import annotations

import numpy as np

from aslprep_lite.interfaces.m0 import _included_m0


def test_included_m0_volumes_with_different_trs():
    """Each m0scan volume is brought to the longest TR's saturation before averaging."""
    m0 = np.full((2, 2, 2), 1000.0)
    recovered_at_2s = 1.0 - np.exp(-2.0 / 1.607)  # grey-matter T1 at 3 T: 0.71203
    series = np.stack([m0 * recovered_at_2s, m0, np.zeros_like(m0)], axis=3)
    plan = {
        "context": ["m0scan", "m0scan", "control"],
        "repetition_time": [2.0, 8.0, 4.0],
        "field_strength": 3.0,
    }
    mean, trs = _included_m0(series, plan)
    assert trs == [2.0, 8.0]
    # TR 8 s is fully relaxed (>= 5 s): both volumes become 1000, not (712 + 1000) / 2
    np.testing.assert_allclose(mean, 1000.0, rtol=1e-12)
    # equal TRs: a plain mean, left for the shared correction of that TR
    plan["repetition_time"] = [4.0, 4.0, 4.0]
    mean, _ = _included_m0(np.stack([m0, m0 * 0.5, m0], axis=3), plan)
    np.testing.assert_allclose(mean, 750.0)


def _kinetic_node_run(tmp_path, truth, m0_scale=1.0, **options):
    """Run FitKineticModel on the raw synthetic series (no motion) with these options."""
    import nibabel as nb

    from aslprep_lite.bids import ProcessingOptions, discover
    from aslprep_lite.interfaces.cbf import ComputeDeltaM
    from aslprep_lite.interfaces.kinetic import FitKineticModel

    (plan,) = discover(tmp_path / "bids", options=ProcessingOptions(**options)).plans
    name = "_".join(f"{k}-{v}" for k, v in options.items()) or "default"
    work = tmp_path / f"{name}_m0x{m0_scale:g}"
    work.mkdir()
    mask_file = work / "mask.nii.gz"
    nb.save(nb.Nifti1Image(truth.brain_mask.astype(np.uint8), truth.affine), mask_file)
    m0_file = work / "m0.nii.gz"
    nb.save(nb.Nifti1Image((truth.m0 * m0_scale).astype(np.float32), truth.affine), m0_file)
    deltam = ComputeDeltaM(plan=plan.as_dict(), in_file=str(truth.asl_file))
    deltam = deltam.run(cwd=str(work)).outputs.out_file
    node = FitKineticModel(
        plan=plan.as_dict(), deltam_file=deltam, m0_file=str(m0_file), mask_file=str(mask_file)
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
    assert "posterior SD" in local.maps_metadata["desc-stderr_att.nii.gz"]["Description"]
    assert none.metadata["FitSettings"]["ATTPrior"] == "none"
    assert "posterior" not in none.maps_metadata["desc-stderr_att.nii.gz"]["Description"]
    assert "ATTPrior" not in wd.metadata["FitSettings"]
    assert "desc-stderr_att.nii.gz" not in wd.maps
    # The prior changes the estimates (same data, same node otherwise)
    assert not np.array_equal(cbf_local, cbf_none)
    assert np.median(np.abs(cbf_local - cbf_none)) < 0.1 * np.median(np.abs(cbf_none))

    # Plausible CBF: no warning; an M0 100 times too small (a vendor scale): a loud one
    assert local.metadata["QualityWarnings"] == []
    scaled, _ = _kinetic_node_run(tmp_path, truth, m0_scale=0.01)
    (warning,) = scaled.metadata["QualityWarnings"]
    assert "M0 scaling" in warning
