"""SCORE and SCRUB (aslprep_lite.quant.score).

A 24 x 24 x 8 phantom (cylindrical brain: GM ring around WM around a CSF ventricle, inside a
CSF rim, partial volume at every boundary) carries true CBF 60 pGM + 20 pWM. Twenty volumes
add Gaussian noise (SD 30, a single-pair level) and three gross outliers: a +80 GM offset
(vol 3), a +300 spike over a GM/WM block (vol 9) and a motion-like edge artefact, +600 on the
left half of the brain's rim and -600 on the right, which leaves the GM mean unchanged
(vol 15), so that only SCORE's structural pass can catch it. Two small WM spikes in kept
volumes are below SCORE's reach and left to SCRUB.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from aslprep_lite.quant.score import (
    FLAG_GM_OUTLIER,
    FLAG_KEPT,
    FLAG_STRUCTURAL,
    SCORE_REFERENCE,
    SCRUB_REFERENCE,
    TUNING_CONSTANTS,
    ScoreResult,
    _noise_variance_law,
    score,
    score_record,
    scrub,
)

SHAPE = (24, 24, 8)
N_VOLUMES = 20
SIGMA = 30.0
F_GM, F_WM = 60.0, 20.0
PLANTED = (3, 9, 15)
SEED = 1


def _phantom(supersample: int = 4):
    """GM, WM, CSF fractions and brain mask of concentric tissue rings, same in every slice."""
    nx, ny, nz = SHAPE
    x = (np.arange(nx * supersample) + 0.5) / supersample - nx / 2
    y = (np.arange(ny * supersample) + 0.5) / supersample - ny / 2
    radius = np.hypot(x[:, None], y[None, :])
    label = np.zeros(radius.shape, dtype=int)
    label[radius < 10.5] = 3  # CSF rim
    label[radius < 9.5] = 1  # GM ring
    label[radius < 6.5] = 2  # WM
    label[radius < 3.0] = 3  # ventricle

    def fraction(tissue):
        plane = (label == tissue).reshape(nx, supersample, ny, supersample).mean(axis=(1, 3))
        return np.repeat(plane[:, :, None], nz, axis=2)

    gm, wm, csf = fraction(1), fraction(2), fraction(3)
    return gm, wm, csf, (gm + wm + csf) > 0.5


def _series(seed: int, *, outliers: bool = True):
    """(data, truth, gm, wm, csf, mask, residual spike voxels) of one synthetic run."""
    gm, wm, csf, mask = _phantom()
    truth = (F_GM * gm + F_WM * wm) * mask
    rng = np.random.default_rng(seed)
    data = (truth[..., None] + rng.normal(0.0, SIGMA, (*SHAPE, N_VOLUMES))) * mask[..., None]
    residual = np.zeros(SHAPE, dtype=bool)
    if outliers:
        data[..., 3] += 80.0 * gm * mask
        block = np.zeros(SHAPE, dtype=bool)
        block[2:7, 9:15, 2:6] = True  # straddles the GM ring and WM
        data[block & mask, 9] += 300.0
        x = np.arange(SHAPE[0]) + 0.5 - SHAPE[0] / 2
        radius = np.hypot(x[:, None], x[None, :])[..., None]
        rim = mask & (radius > 8.0)
        data[..., 15] += np.where(x[:, None, None] < 0, 600.0, -600.0) * rim
        residual[10:13, 7:9, 3:6] = True  # pure WM, 18 voxels
        residual &= mask
        data[residual, 5] += 400.0
        data[residual, 12] += 400.0
    return data, truth, gm, wm, csf, mask, residual


@pytest.fixture(scope="module")
def run():
    data, truth, gm, wm, csf, mask, residual = _series(SEED)
    result = score(data, gm, wm, csf, mask)
    return data, truth, gm, wm, csf, mask, residual, result


def _rmse(estimate, truth, where):
    return float(np.sqrt(np.mean((estimate[where] - truth[where]) ** 2)))


def _direct_score(data, gm, wm, csf, mask, thresh=0.9, mad_factor=2.5):
    """The author's two passes written plainly, one volume and one mean at a time."""
    tissues = [(p > thresh) & mask for p in (gm, wm, csf)]
    union = tissues[0] | tissues[1] | tissues[2]
    n_vol = data.shape[-1]
    gm_means = np.array([data[..., t][tissues[0]].mean() for t in range(n_vol)])
    med = np.median(gm_means)
    flags = np.where(
        np.abs(gm_means - med) > mad_factor * np.median(np.abs(gm_means - med)) / 0.675, 1, 0
    )

    def pooled(selection):
        mean = data[..., selection == 0].mean(axis=-1)
        return sum((t.sum() - 1) * mean[t].var(ddof=1) for t in tissues if t.sum() > 1)

    current = pooled(flags)
    while np.sum(flags == 0) > 2:
        mean = data[..., flags == 0].mean(axis=-1)
        corr = np.full(n_vol, -2.0)
        for t in np.flatnonzero(flags == 0):
            corr[t] = np.corrcoef(mean[union], data[..., t][union])[0, 1]
        trial = flags.copy()
        trial[int(np.argmax(corr))] = 2
        if not pooled(trial) < current:
            break
        flags, current = trial, pooled(trial)
    return flags


# --- SCORE -------------------------------------------------------------------------------------


def test_score_removes_exactly_the_planted_outliers(run):
    *_, result = run
    assert result.removed == PLANTED
    assert result.kept.tolist() == [i not in PLANTED for i in range(N_VOLUMES)]
    assert result.flags[3] == FLAG_GM_OUTLIER  # offset: the mean-GM pass
    assert result.flags[9] == FLAG_GM_OUTLIER  # the spike raises the GM mean too
    assert result.flags[15] == FLAG_STRUCTURAL  # balanced edge artefact: structural pass only
    assert result.note is None


def test_score_mean_is_closer_to_truth_than_the_plain_mean(run):
    data, truth, gm, _, _, mask, _, result = run
    plain = data.mean(axis=-1)
    assert result.cbf.dtype == np.float32
    assert _rmse(result.cbf, truth, mask) < 0.5 * _rmse(plain, truth, mask)
    core = (gm > 0.9) & mask
    assert abs(result.cbf[core].mean() - F_GM) < abs(plain[core].mean() - F_GM)
    np.testing.assert_allclose(
        result.cbf[mask], data[mask][:, list(result.kept)].mean(axis=1), rtol=1e-6
    )
    assert np.all(result.cbf[~mask] == 0)


def test_score_removes_nothing_from_a_clean_series():
    data, _, gm, wm, csf, mask, _ = _series(SEED, outliers=False)
    result = score(data, gm, wm, csf, mask)
    assert result.removed == ()
    assert result.kept.all()
    assert np.all(result.flags == FLAG_KEPT)


def test_score_false_positives_on_clean_series_stay_rare():
    """By design the GM pass rejects clean volumes beyond 2.5 robust SDs (1.2 % for Gaussian
    means, more with a MAD from 20 values); the structural pass should reject none."""
    removed_gm = removed_structural = 0
    for seed in range(20):
        data, _, gm, wm, csf, mask, _ = _series(seed, outliers=False)
        flags = score(data, gm, wm, csf, mask).flags
        removed_gm += int(np.sum(flags == FLAG_GM_OUTLIER))
        removed_structural += int(np.sum(flags == FLAG_STRUCTURAL))
    assert removed_structural == 0
    assert removed_gm / (20 * N_VOLUMES) < 0.05


@pytest.mark.parametrize("seed", [0, 1, 5, 7])
def test_score_matches_a_direct_transcription_of_the_algorithm(seed):
    data, _, gm, wm, csf, mask, _ = _series(seed)
    expected = _direct_score(data, gm, wm, csf, mask)
    assert score(data, gm, wm, csf, mask).flags.tolist() == expected.tolist()


def test_identical_volumes_remove_nothing():
    _, truth, gm, wm, csf, mask, _ = _series(SEED, outliers=False)
    data = np.repeat(truth[..., None], 12, axis=-1)
    result = score(data, gm, wm, csf, mask)
    assert result.removed == ()
    np.testing.assert_allclose(result.cbf, truth, rtol=1e-6)
    np.testing.assert_allclose(scrub(data, gm, wm, csf, mask), truth, rtol=1e-6)


@pytest.mark.parametrize("n_volumes", [1, 2])
def test_fewer_than_three_volumes_return_the_mean(n_volumes):
    data, _, gm, wm, csf, mask, _ = _series(SEED)
    data = data[..., 3 : 3 + n_volumes]  # an outlier among them, still not removed
    result = score(data, gm, wm, csf, mask)
    assert result.removed == ()
    assert result.kept.all()
    assert "fewer than 3" in result.note
    np.testing.assert_allclose(result.cbf, data.mean(axis=-1) * mask, rtol=1e-6)
    assert "fewer than 3" in score_record(result)["Note"]


def test_a_3d_map_counts_as_one_volume():
    data, _, gm, wm, csf, mask, _ = _series(SEED)
    result = score(data[..., 0], gm, wm, csf, mask)
    assert result.kept.shape == (1,)
    np.testing.assert_allclose(result.cbf, data[..., 0], rtol=1e-6)


def test_non_finite_voxels_are_left_out():
    data, _, gm, wm, csf, mask, _ = _series(SEED)
    data = data.copy()
    voxel = (3, 12, 4)
    assert mask[voxel]
    data[(*voxel, 7)] = np.nan
    result = score(data, gm, wm, csf, mask)
    assert result.removed == PLANTED
    assert result.cbf[voxel] == 0
    assert np.all(np.isfinite(result.cbf))
    smoothed = scrub(data, gm, wm, csf, mask, score_result=result)
    assert smoothed[voxel] == 0 and np.all(np.isfinite(smoothed))


def test_result_is_read_only(run):
    *_, result = run
    assert isinstance(result, ScoreResult)
    for array in (result.cbf, result.kept, result.flags):
        with pytest.raises(ValueError):
            array[0] = 0


def test_input_errors():
    data, _, gm, wm, csf, mask, _ = _series(SEED)
    with pytest.raises(ValueError, match="GM probability"):
        score(data, np.zeros(SHAPE), wm, csf, mask)
    with pytest.raises(ValueError, match="shape"):
        score(data, gm[:-1], wm, csf, mask)
    with pytest.raises(ValueError, match="wfun"):
        scrub(data, gm, wm, csf, mask, wfun="tukey")
    with pytest.raises(ValueError, match="volumes"):
        scrub(data[..., :10], gm, wm, csf, mask, score_result=score(data, gm, wm, csf, mask))


def test_score_record(run):
    *_, result = run
    record = score_record(result)
    json.dumps(record)
    assert record["Method"] == "SCORE"
    assert record["TissueProbabilityThreshold"] == 0.9
    assert record["VolumesRemoved"] == list(PLANTED)
    assert record["VolumesRemovedGMOutlier"] == [3, 9]
    assert record["VolumesRemovedStructural"] == [15]
    assert record["NumberOfVolumesKept"] == N_VOLUMES - 3
    assert record["References"] == [SCORE_REFERENCE]
    assert "10.1002/jmri.25436" in SCORE_REFERENCE
    with_scrub = score_record(result, scrub_wfun="huber")
    assert with_scrub["Method"] == "SCORE+SCRUB"
    assert with_scrub["SCRUB"]["TuningConstant"] == 1.345
    assert with_scrub["References"] == [SCORE_REFERENCE, SCRUB_REFERENCE]


# --- SCRUB -------------------------------------------------------------------------------------


def test_scrub_gm_mean_is_within_3_percent_and_beats_the_plain_mean(run):
    data, truth, gm, wm, csf, mask, _, result = run
    estimate = scrub(data, gm, wm, csf, mask, score_result=result)
    assert estimate.dtype == np.float32
    core = (gm > 0.9) & mask
    plain = data.mean(axis=-1)
    assert abs(estimate[core].mean() - F_GM) < 0.03 * F_GM
    assert abs(estimate[core].mean() - F_GM) < abs(plain[core].mean() - F_GM)
    assert _rmse(estimate, truth, mask) < _rmse(plain, truth, mask)
    assert np.all(estimate[~mask] == 0)


def test_scrub_tempers_residual_spikes_that_score_keeps(run):
    data, truth, gm, wm, csf, mask, residual, result = run
    assert 5 not in result.removed and 12 not in result.removed
    estimate = scrub(data, gm, wm, csf, mask, score_result=result)
    assert _rmse(estimate, truth, residual) < 0.5 * _rmse(result.cbf, truth, residual)
    assert _rmse(estimate, truth, mask) < _rmse(result.cbf, truth, mask)


def test_scrub_runs_score_itself_when_not_given_a_result(run):
    data, _, gm, wm, csf, mask, _, result = run
    np.testing.assert_array_equal(
        scrub(data, gm, wm, csf, mask), scrub(data, gm, wm, csf, mask, score_result=result)
    )


def test_scrub_leaves_noise_like_voxels_at_the_mean():
    """Where the temporal variance is within the white-noise law, the prior weight is 0 and
    the modified-robust residuals vanish: SCRUB is then the plain mean of the kept volumes."""
    data, _, gm, wm, csf, mask, _ = _series(SEED, outliers=False)
    result = score(data, gm, wm, csf, mask)
    estimate = scrub(data, gm, wm, csf, mask, score_result=result)
    same = np.isclose(estimate[mask], result.cbf[mask], rtol=1e-5, atol=1e-4)
    assert same.mean() > 0.99


@pytest.mark.parametrize("wfun", sorted(TUNING_CONSTANTS))
def test_every_weight_function_gives_a_sound_estimate(run, wfun):
    data, _, gm, wm, csf, mask, _, result = run
    estimate = scrub(data, gm, wm, csf, mask, wfun=wfun, score_result=result)
    core = (gm > 0.9) & mask
    assert np.all(np.isfinite(estimate))
    assert abs(estimate[core].mean() - F_GM) < 0.03 * F_GM


@pytest.mark.parametrize(
    ("n", "percentile", "ratio"),
    # The author's simulated table (getchisquarevals, 1e5 draws) for a few n.
    [(2, 15.484663, 2.177715), (3, 8.886835, 1.446966), (20, 2.649955, 1.037296),
     (100, 1.609462, 1.007087)],
)  # fmt: skip
def test_noise_law_matches_the_author_table(n, percentile, ratio):
    exact_percentile, exact_ratio = _noise_variance_law(n)
    # A 99.99th percentile from 1e5 draws rests on ~10 tail draws: a few % of sampling error.
    assert exact_percentile == pytest.approx(percentile, rel=0.05)
    assert exact_ratio == pytest.approx(ratio, rel=0.01)
