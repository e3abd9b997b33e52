"""The quantification equations against values computed by hand.

Reference values were worked out with a calculator from the printed equations of Alsop et al.
2015 (eq. 1 and 2); the working is in each comment.
"""

from __future__ import annotations

import numpy as np
import pytest

from aslprep_lite.quant import constants
from aslprep_lite.quant.cbf import (
    consensus_cbf,
    implausible_cbf,
    pasl_bolus_duration,
    pasl_cbf,
    pcasl_cbf,
    slice_delays,
)
from aslprep_lite.quant.deltam import plan_subtraction, subtract
from aslprep_lite.quant.m0 import (
    brain_mask,
    otsu_threshold,
    reference_region_m0,
    smooth_within_mask,
    tr_correction_factor,
)


def test_pcasl_consensus_value():
    # 6000*0.9*10*e^(1.8/1.65) / (2*0.85*1.65*1000*(1-e^(-1.8/1.65)))
    # = 54000*2.976785 / (2805*0.664064) = 160746.4 / 1862.70 = 86.2999
    cbf = pcasl_cbf(
        10.0, 1000.0, pld=1.8, labeling_duration=1.8, t1_blood=1.65, labeling_efficiency=0.85
    )
    assert cbf == pytest.approx(86.29992, rel=1e-6)


def test_casl_at_1p5_tesla():
    # CASL α 0.68, T1b 1.35 s, PLD 1.5 s, τ 2.0 s:
    # 54000*e^(1.5/1.35) / (2*0.68*1.35*1000*(1-e^(-2/1.35))) = 115.6272
    cbf = pcasl_cbf(
        10.0, 1000.0, pld=1.5, labeling_duration=2.0, t1_blood=1.35, labeling_efficiency=0.68
    )
    assert cbf == pytest.approx(115.62719, rel=1e-6)


def test_cbf_scales_linearly_and_inversely():
    base = pcasl_cbf(
        10.0, 1000.0, pld=1.8, labeling_duration=1.8, t1_blood=1.65, labeling_efficiency=0.85
    )
    assert pcasl_cbf(
        20.0, 1000.0, pld=1.8, labeling_duration=1.8, t1_blood=1.65, labeling_efficiency=0.85
    ) == pytest.approx(2 * base)
    assert pcasl_cbf(
        10.0, 2000.0, pld=1.8, labeling_duration=1.8, t1_blood=1.65, labeling_efficiency=0.85
    ) == pytest.approx(base / 2)


@pytest.mark.parametrize(
    ("technique", "delay", "expected"),
    [
        # QUIPSS II / Q2TIPS: bolus = TI1 = 0.7 s; 6000*0.9*8*e^(1.8/1.65)/(2*0.98*0.7*1000)
        # = 43200*2.976785/1372 = 93.7358
        ("QUIPSSII", [0.7], 93.735788),
        ("Q2TIPS", [0.7, 1.6], 93.735788),
        # QUIPSS: bolus = TI - delay = 1.1 s: 128597.1/2156 = 59.6500
        ("QUIPSS", [0.7], 59.650047),
    ],
)
def test_pasl_bolus_cutoff_variants(technique, delay, expected):
    bolus = pasl_bolus_duration(technique, 1.8, delay)
    cbf = pasl_cbf(
        8.0,
        1000.0,
        inversion_time=1.8,
        bolus_duration=bolus,
        t1_blood=1.65,
        labeling_efficiency=0.98,
    )
    assert cbf == pytest.approx(expected, rel=1e-6)


def test_pasl_unknown_technique():
    with pytest.raises(ValueError, match="BolusCutOffTechnique"):
        pasl_bolus_duration("FAIR", 1.8, [0.7])


def test_slice_timing_delay():
    # slice k acquired SliceTiming[k] - min later: PLD 1.8 + 0.09 s for the third slice;
    # 54000*e^(1.89/1.65)/(1862.70) = 91.1379
    timing = [0.0, 0.045, 0.09, 0.135]
    delays = slice_delays(1.8, timing, ndim=3, slice_axis=2)
    assert delays.shape == (1, 1, 4)
    np.testing.assert_allclose(delays.ravel(), [1.8, 1.845, 1.89, 1.935])
    deltam = np.full((2, 2, 4), 10.0)
    cbf = pcasl_cbf(
        deltam,
        np.full((2, 2, 4), 1000.0),
        pld=delays,
        labeling_duration=1.8,
        t1_blood=1.65,
        labeling_efficiency=0.85,
    )
    assert cbf[0, 0, 2] == pytest.approx(91.137935, rel=1e-6)
    # per-volume delays on the last axis of a 4D series
    four = slice_delays(np.array([1.8, 2.0]), timing, ndim=4, slice_axis=2)
    assert four.shape == (1, 1, 4, 2)
    assert four[0, 0, 3, 1] == pytest.approx(2.135)


def test_zero_m0_gives_zero_not_inf():
    cbf = pcasl_cbf(
        np.array([10.0, 10.0, np.nan]),
        np.array([0.0, np.inf, 1000.0]),
        pld=1.8,
        labeling_duration=1.8,
        t1_blood=1.65,
        labeling_efficiency=0.85,
    )
    assert np.all(np.isfinite(cbf))
    np.testing.assert_array_equal(cbf, [0.0, 0.0, 0.0])


def test_constants_table():
    assert constants.blood_t1(1.5).value == 1.35
    assert constants.blood_t1(3.0).value == 1.65
    assert constants.blood_t1(7.0).value == 2.087
    assert constants.blood_t1(2.89).value == 1.65  # Siemens "3 T" systems report 2.89
    with pytest.raises(ValueError, match=r"4\.7 T"):
        constants.blood_t1(4.7)
    assert constants.tissue_t1(3.0).value == 1.607
    assert constants.scalar("partition_coefficient").value == 0.9
    assert "Zhang" in constants.reference(constants.blood_t1(7).source.split()[0])


def test_labeling_efficiency_defaults_and_background_suppression():
    assert constants.labeling_efficiency("PCASL").value == 0.85
    assert constants.labeling_efficiency("CASL").value == 0.68
    assert constants.labeling_efficiency("PASL").value == 0.98
    # 0.85 * 0.95^4 = 0.85 * 0.81450625 = 0.692330
    bs = constants.labeling_efficiency("PCASL", background_suppression=True, bs_pulses=4)
    assert bs.value == pytest.approx(0.6923303, rel=1e-6)
    assert "Garcia2005" in bs.source
    # a measured efficiency is used as given, background suppression or not
    given = constants.labeling_efficiency(
        "PCASL", given=0.88, background_suppression=True, bs_pulses=2
    )
    assert given.value == 0.88
    assert given.source == "LabelingEfficiency (sidecar)"


def test_tr_correction():
    # 1 / (1 - e^(-4.8/1.607)) = 1 / (1 - 0.050450) = 1.053121
    assert tr_correction_factor(4.8, 1.607) == pytest.approx(1.0531215, rel=1e-6)
    assert tr_correction_factor(5.0, 1.607) == 1.0
    assert tr_correction_factor(9.0, 1.607) == 1.0
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="> 0"):
            tr_correction_factor(bad, 1.607)


@pytest.mark.parametrize(
    ("context", "control", "label"),
    [
        (["control", "label"] * 3, (0, 2, 4), (1, 3, 5)),
        (["label", "control"] * 3, (1, 3, 5), (0, 2, 4)),
        (["m0scan", "label", "control", "noRF", "label", "control"], (2, 5), (1, 4)),
        (["m0scan", "deltam", "deltam"], (1, 2), (-1, -1)),
    ],
)
def test_pairing(context, control, label):
    plan = plan_subtraction(context)
    assert plan.control == control
    assert plan.label == label


def test_subtraction_sign_and_passthrough():
    series = np.zeros((1, 1, 1, 5), dtype=np.float32)
    series[..., :] = [100.0, 99.0, 7.0, 98.5, 100.0]  # label, control, deltam, label, control
    plan = plan_subtraction(["label", "control", "deltam", "label", "control"])
    out = subtract(series, plan)
    np.testing.assert_allclose(out.ravel(), [-1.0, 7.0, 1.5])


@pytest.mark.parametrize(
    ("context", "control", "label", "unpaired"),
    [
        # control-first, cut short after a control: the last control is left out
        (["control", "label"] * 3 + ["control"], (0, 2, 4), (1, 3, 5), (6,)),
        # label-first, one label too many at the end
        (["label", "control"] * 2 + ["label"], (1, 3), (0, 2), (4,)),
        # Siemens 3D PCASL: the M0 takes the first label slot, so the control beside it
        # (the first after the unsuppressed M0 shot) is the one without a partner
        (["m0scan", "control"] + ["label", "control"] * 3, (3, 5, 7), (2, 4, 6), (1,)),
        # a volume lost in the middle: slots no longer line up, neighbours pair instead
        (["control", "label", "label", "control", "control", "label", "control"],
         (0, 3, 4), (1, 2, 5), (6,)),
        # blocked: neighbours would pair only once, so the i-th control takes the i-th
        # label and the longer block's last volume is left out
        (["control"] * 4 + ["label"] * 3, (0, 1, 2), (4, 5, 6), (3,)),
        # nothing pairs
        (["control"] * 3, (), (), (0, 1, 2)),
    ],
)  # fmt: skip
def test_unbalanced_series_pair_what_pairs(context, control, label, unpaired):
    plan = plan_subtraction(context)
    assert (plan.control, plan.label, plan.unpaired) == (control, label, unpaired)


def test_balanced_series_leave_nothing_out():
    for context in (["control", "label"] * 3, ["control"] * 3 + ["label"] * 3):
        assert plan_subtraction(context).unpaired == ()


def test_otsu_separates_two_populations():
    values = np.concatenate([np.full(500, 10.0), np.full(300, 100.0)])
    threshold = otsu_threshold(values)
    assert 10.0 < threshold < 100.0


def test_brain_mask_finds_the_ball():
    grid = np.indices((32, 32, 32)).astype(float) - 15.5
    ball = (grid**2).sum(axis=0) < 10.0**2
    image = np.where(ball, 1000.0, 5.0)
    mask = brain_mask(image, (2.0, 2.0, 2.0))
    # smoothing blurs the edge by < 1 voxel: the mask matches the ball to within 10 %
    assert abs(int(mask.sum()) - int(ball.sum())) < 0.1 * ball.sum()
    assert mask[16, 16, 16] and not mask[0, 0, 0]


def test_masked_smoothing_keeps_constants_and_edges():
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[4:16, 4:16, 4:16] = True
    smoothed = smooth_within_mask(np.full(mask.shape, 800.0), mask, (3.0, 3.0, 3.0), 5.0)
    # normalized convolution: a constant stays constant up to the mask edge, 0 outside
    np.testing.assert_allclose(smoothed[mask], 800.0, rtol=1e-10)
    assert np.all(smoothed[~mask] == 0)


def test_masked_smoothing_keeps_voids_from_pulling_neighbours_down():
    # an M0 of 800 with a signal void (M0 0) and a partial-volume edge voxel (M0 300)
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[4:16, 4:16, 4:16] = True
    image = np.where(mask, 800.0, 0.0)
    image[10, 10, 10] = 0.0
    image[4, 10, 10] = 300.0
    plain = smooth_within_mask(image, mask, (3.0, 3.0, 3.0), 5.0)
    assert plain[11, 10, 10] < 0.95 * 800.0  # the void drags its neighbour's M0 down (-7 %)
    robust = smooth_within_mask(image, mask, (3.0, 3.0, 3.0), 5.0, min_fraction=0.5)
    np.testing.assert_allclose(robust[mask], 800.0, rtol=1e-10)  # voids filled, none pulled
    assert np.all(robust[~mask] == 0)


def test_masked_smoothing_fwhm():
    # a delta smoothed with FWHM f has sd f / 2.3548 (mm) along each axis
    mask = np.ones((41, 41, 41), dtype=bool)
    image = np.zeros(mask.shape)
    image[20, 20, 20] = 1.0
    out = smooth_within_mask(image, mask, (1.0, 1.0, 1.0), 8.0)
    profile = out[:, 20, 20] / out[:, 20, 20].sum()
    x = np.arange(41) - 20.0
    sd = np.sqrt((profile * x**2).sum())
    assert sd == pytest.approx(8.0 / 2.3548, rel=0.02)  # FWHM = 2.3548 σ


def test_implausible_cbf_warning():
    mask = np.ones((4, 4, 4), dtype=bool)
    assert implausible_cbf(np.full(mask.shape, 45.0), mask, 5.0, 200.0) is None
    warning = implausible_cbf(np.full(mask.shape, 4500.0), mask, 5.0, 200.0)
    assert "4500" in warning and "--m0-scale" in warning
    assert "0.5" in implausible_cbf(np.full(mask.shape, 0.5), mask, 5.0, 200.0)


def test_reference_region_m0():
    # CSF, TR 6 s, TE 14 ms, T2* readout: 1400 / (1 - e^(-6/4.3)) = 1400 / 0.752266 = 1861.05;
    # x e^(0.014/0.4) = 1927.33; / 1.15 = 1675.94; x e^(-0.014/0.05) = 1266.67
    m0a = reference_region_m0(
        1400.0,
        repetition_time=6.0,
        echo_time=0.014,
        t1_reference=4.3,
        t2_reference=0.4,
        partition_coefficient=1.15,
        t2_blood=0.05,
    )
    assert m0a == pytest.approx(1266.671, rel=1e-5)
    # at TE 0 and a long TR it reduces to S / pc
    assert reference_region_m0(
        1150.0, repetition_time=1e6, echo_time=0.0, t1_reference=4.3, t2_reference=0.4,
        partition_coefficient=1.15, t2_blood=0.05,
    ) == pytest.approx(1000.0)  # fmt: skip
    with pytest.raises(ValueError, match="> 0"):
        reference_region_m0(
            1.0, repetition_time=0.0, echo_time=0.0, t1_reference=4.3, t2_reference=0.4,
            partition_coefficient=1.15, t2_blood=0.05,
        )  # fmt: skip


def test_consensus_cbf_picks_the_equation_of_the_labeling_type():
    common = {"t1_blood": 1.65, "delay": 1.8}
    # the hand values of test_pcasl_consensus_value and the QUIPSS II case above
    pcasl = consensus_cbf(
        10.0, 1000.0, asl_type="PCASL", duration=1.8, labeling_efficiency=0.85, **common
    )
    pasl = consensus_cbf(
        8.0, 1000.0, asl_type="PASL", duration=0.7, labeling_efficiency=0.98, **common
    )
    assert pcasl == pytest.approx(86.29992, rel=1e-6)
    assert pasl == pytest.approx(93.735788, rel=1e-6)
