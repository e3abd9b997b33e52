"""Deterministic synthetic BIDS ASL datasets with a known CBF.

The test suite, the README example and the benchmark all need raw ASL data whose true CBF is
known exactly. :func:`write_dataset` writes such a dataset and returns the truth for every
series it wrote.

Forward model
-------------
The phantom is a smooth ellipsoidal head in normalised field-of-view coordinates (so it only
depends on the matrix size): a brain ellipsoid spanning ~70 % of the FOV with a grey-matter
(GM) shell ``_GM_THICKNESS`` voxels thick over a white-matter (WM) core, a pair of deep GM
nuclei, a pair of CSF ventricles, and a faint scalp ring. Tissue fractions are computed on a
3x supersampled grid (partial volume) and then smoothed with a Gaussian of sigma 0.7 voxel so
that registration has gradients to work with.

Fully relaxed M0 (arbitrary units)::

    M0 = 1000 f_GM + 800 f_WM + 1400 f_CSF + 300 f_scalp

True CBF (mL/100 g/min)::

    CBF = gm_cbf f_GM + wm_cbf f_WM            (0 in CSF and outside the brain)

Single-compartment consensus model (Alsop et al. 2015, MRM 73:102), with lambda = 0.9,
T1 of blood ``T1b`` (1.35 / 1.65 / 2.087 s at 1.5 / 3 / 7 T) and labeling efficiency ``alpha``
(``LabelingEfficiency`` when given, else 0.85 PCASL / 0.68 CASL / 0.98 PASL, times
0.95 ** BackgroundSuppressionNumberPulses when background suppression is on)::

    (P)CASL        dM = CBF 2 alpha T1b M0 (1 - exp(-tau / T1b)) exp(-PLD / T1b) / (6000 lambda)
    PASL QUIPSSII  dM = CBF 2 alpha TI1 M0 exp(-TI / T1b) / (6000 lambda)
    (and Q2TIPS, TI1 = first BolusCutOffDelayTime)
    PASL QUIPSS    dM = CBF 2 alpha (TI - TI1) M0 exp(-TI / T1b) / (6000 lambda)

For a 2D readout the effective PLD (or TI) of slice k is ``PLD + SliceTiming[k]``. For
``M0Type`` Estimate the M0 in these formulas is the declared ``M0Estimate`` (a single
whole-brain value), so that the pipeline can recover ``truth.cbf`` everywhere.

Volumes::

    control = c M0_asl + noise          c = 1 (an unsuppressed control is the saturation-
                                        recovered M0), or 0.1 with background suppression
    label   = control - dM + noise      (independent noise)
    deltam  = dM + noise * sqrt(2)      (deltam_only: the difference of two noisy images)
    m0scan  = M0 (1 - exp(-m0_tr / T1gm)) if m0_tr < 5 s else M0, + noise

where ``M0_asl = M0 (1 - exp(-TR / T1gm))`` is the tissue signal at the ASL TR of 4 s and
T1gm = 1.197 / 1.607 / 1.939 s at 1.5 / 3 / 7 T. The 5 s threshold mirrors the pipeline, which
corrects the M0 for incomplete recovery only below 5 s (consensus paper), so that the truth
stays consistent with what a correct pipeline computes.

Multi-delay series
------------------
With ``plds`` set, the series cycles through the delays: pair 1 at ``plds[0]``, pair 2 at
``plds[1]``, ..., then again, ``n_pairs`` pairs per delay (``TotalAcquiredPairs`` is
``n_pairs * len(plds)``), and ``PostLabelingDelay`` is written per volume (0 for an included
M0). dM of each volume is then the Buxton general kinetic model (Buxton et al. 1998, MRM
40:383) of :func:`aslprep_lite.quant.kinetic.tissue_signal` with T1' = T1b, labeling duration
``labeling_duration`` ((P)CASL) or bolus TI1 (PASL, QUIPSS II or Q2TIPS), and the arterial
transit time (ATT) map::

    ATT = (gm_cbf f_GM gm_att + wm_cbf f_WM wm_att) / (gm_cbf f_GM + wm_cbf f_WM)

i.e. every voxel is one well-mixed compartment with the flow-weighted mean ATT of its tissues
(a real partial-volume voxel would hold two curves; one compartment keeps the truth exactly
representable by the fitted model). Once all the label has arrived (PLD >= ATT) the model
equals the single-delay formulas above. That module's equations are checked against hand
values in ``tests/test_kinetic.py``; ``tests/test_synthetic.py`` checks the written data
against its own closed form. The single-delay path (``plds`` None) does not use it.

Anatomy
-------
With ``anatomy`` set (an :class:`~aslprep_lite.synthetic_anatomy.AnatomySpec`), the tissue
fractions come from a synthetic subject made from the MNI152NLin2009aSym template
(:mod:`aslprep_lite.synthetic_anatomy`) instead of the ellipsoidal phantom: GM, WM and CSF are
the template's probabilities carried through the subject's known warp and the head motion
between the T1w and the ASL scans, averaged over 3 x 3 x 3 sub-voxels (no further smoothing:
the template maps are smooth already), and the scalp is the subject's scalp band. The ASL grid
is axis-aligned in the ASL world and centred on the brain; with the phantom's default matrix
and voxel size it becomes :data:`ANATOMY_ASL_SHAPE` x :data:`ANATOMY_ASL_ZOOMS`, which holds
the whole brain. The dataset gets ``sub-<label>/anat/sub-<label>_T1w.nii.gz`` once per
subject. Everything after the fractions (M0, CBF, kinetics, motion, noise) is as above, and
:class:`SyntheticTruth` carries the anatomy with the true transforms
(:meth:`SyntheticTruth.in_template`).

Rigid motion (``motion_mm > 0``) is a smooth random drift plus one or two single-volume spikes,
all six parameters bounded by ``motion_mm`` (mm for translations, degrees for rotations), with
the first volume of the series unmoved. The slice-timing factor is applied after the motion,
in the acquisition frame, because that is where the slice is read out.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from aslprep_lite.images import write_nifti
from aslprep_lite.synthetic_anatomy import AnatomySpec, SyntheticAnatomy, make_anatomy

__all__ = [
    "ANATOMY_ASL_SHAPE",
    "ANATOMY_ASL_ZOOMS",
    "AnatomySpec",
    "SyntheticSpec",
    "SyntheticTruth",
    "write_dataset",
]

#: ASL matrix and voxel size (mm) of a series with an anatomy whose spec keeps the phantom's
#: default grid: 196 x 224 x 200 mm, which holds the brain (cerebellum and brain stem included)
#: of 30 random subjects with at least 6 mm to spare.
ANATOMY_ASL_SHAPE = (56, 64, 50)
ANATOMY_ASL_ZOOMS = (3.5, 3.5, 4.0)
_PHANTOM_SHAPE = (32, 32, 12)
_PHANTOM_ZOOMS = (3.5, 3.5, 5.0)

# Constants of the forward model. They deliberately live here and not in quant/constants.py:
# the truth must not change when the pipeline's constants do (tests/test_synthetic.py checks
# that the two tables agree).
_LAMBDA = 0.9  # mL/g, brain/blood partition coefficient
_UNIT = 6000.0  # (mL/100 g/min) / (mL/g/s)
_BLOOD_T1 = {1.5: 1.35, 3.0: 1.65, 7.0: 2.087}  # s
_GM_T1 = {1.5: 1.197, 3.0: 1.607, 7.0: 1.939}  # s
_FIELD_TOLERANCE = 0.15  # T
_ALPHA = {"PCASL": 0.85, "CASL": 0.68, "PASL": 0.98}
_BS_PULSE_EFFICIENCY = 0.95
_M0_TR_THRESHOLD = 5.0  # s
_ASL_TR = 4.0  # s, RepetitionTimePreparation of the ASL series
_ECHO_TIME = 0.012  # s, required by BIDS for perf data; irrelevant to the model
_SLICE_DURATION = 0.045  # s per slice, ascending
_Q2TIPS_LAST_PULSE = 0.6  # s after TI1, second BolusCutOffDelayTime value for Q2TIPS

_M0_TISSUE = {"gm": 1000.0, "wm": 800.0, "csf": 1400.0, "scalp": 300.0}
_CONTROL_FRACTION = {False: 1.0, True: 0.1}  # without / with background suppression
_GM_THICKNESS = 2.5  # voxels; thick enough that the shell keeps >= 90 % GM voxels after smoothing
_PV_SIGMA = 0.7  # voxels
_SUPERSAMPLE = 3
_GM_MASK_THRESHOLD = 0.9

# T1w sidecar of a synthetic anatomy: a typical 3 T MPRAGE (s and degrees).
_T1W_METADATA = {
    "MRAcquisitionType": "3D",
    "PulseSequenceType": "MPRAGE",
    "RepetitionTime": 2.3,
    "EchoTime": 0.00298,
    "InversionTime": 0.9,
    "FlipAngle": 9,
}

_ASL_TYPES = ("PCASL", "CASL", "PASL")
_M0_TYPES = ("Separate", "Included", "Estimate", "Absent")
_ORDERS = ("control-first", "label-first")
_BOLUS_TECHNIQUES = ("QUIPSS", "QUIPSSII", "Q2TIPS")


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of one synthetic ASL series.

    Frozen (and therefore hashable) so that a spec can be a dictionary key or a pytest id.
    All times are in seconds. See the module docstring for the forward model.

    Attributes
    ----------
    subject, session, run
        BIDS entities of the series. ``session`` and ``run`` are omitted when None.
    asl_type : {"PCASL", "CASL", "PASL"}
    m0_type : {"Separate", "Included", "Estimate", "Absent"}
    order : {"control-first", "label-first"}
    deltam_only : bool
        The series holds ``n_pairs`` ``deltam`` volumes (GE style) instead of control/label.
    n_pairs : int
        Number of control/label pairs (``TotalAcquiredPairs``).
    shape, zooms
        Matrix size and voxel size (mm). With ``anatomy`` set and both left at their defaults,
        they become :data:`ANATOMY_ASL_SHAPE` and :data:`ANATOMY_ASL_ZOOMS`.
    field_strength : float
        Tesla; must be within 0.15 T of 1.5, 3 or 7.
    pld : float
        PostLabelingDelay; for PASL the inversion time TI.
    labeling_duration : float
        LabelingDuration of (P)CASL.
    bolus_cutoff_technique : {"QUIPSS", "QUIPSSII", "Q2TIPS"}
        PASL only.
    bolus_cutoff_delay : float
        TI1 (PASL). Q2TIPS writes ``[TI1, TI1 + 0.6]``.
    background_suppression : bool
    bs_pulses : int
        BackgroundSuppressionNumberPulses (written only when suppression is on).
    labeling_efficiency : float or None
        Written as LabelingEfficiency and used as alpha when not None.
    slice_timing : bool
        True: 2D readout with ascending SliceTiming (45 ms per slice); False: 3D.
    m0_tr : float
        RepetitionTimePreparation of the M0 image.
    m0_estimate : float
        M0Estimate for M0Type Estimate.
    motion_mm : float
        Maximum amplitude of the random rigid motion (mm and degrees).
    noise : float
        Gaussian noise standard deviation as a fraction of the mean brain M0.
    gm_cbf, wm_cbf : float
        True CBF of pure GM and pure WM (mL/100 g/min).
    seed : int
        Seed of the random generator (motion and noise).
    plds : tuple of float or None
        Multi-delay series: the PLDs (PASL: TIs) the series cycles through, ``n_pairs``
        pairs at each (see the module docstring). ``pld`` is then ignored. None: single delay.
    gm_att, wm_att : float
        Arterial transit time of pure GM and pure WM (s); used only when ``plds`` is set.
    anatomy : AnatomySpec or None
        Take the tissue fractions from this synthetic subject (and write its T1w) instead of
        the ellipsoidal phantom. Every series of a subject must have the same ``anatomy``.
    """

    subject: str = "01"
    session: str | None = None
    run: int | None = None
    asl_type: str = "PCASL"
    m0_type: str = "Separate"
    order: str = "control-first"
    deltam_only: bool = False
    n_pairs: int = 8
    shape: tuple[int, int, int] = _PHANTOM_SHAPE
    zooms: tuple[float, float, float] = _PHANTOM_ZOOMS
    field_strength: float = 3.0
    pld: float = 1.8
    labeling_duration: float = 1.8
    bolus_cutoff_technique: str = "QUIPSSII"
    bolus_cutoff_delay: float = 0.8
    background_suppression: bool = False
    bs_pulses: int = 0
    labeling_efficiency: float | None = None
    slice_timing: bool = False
    m0_tr: float = 6.0
    m0_estimate: float = 1000.0
    motion_mm: float = 0.0
    noise: float = 0.002
    gm_cbf: float = 60.0
    wm_cbf: float = 20.0
    seed: int = 0
    plds: tuple[float, ...] | None = None
    gm_att: float = 1.2
    wm_att: float = 1.6
    anatomy: AnatomySpec | None = None

    def __post_init__(self) -> None:
        # Lists would make the frozen spec unhashable; normalise them to tuples.
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "zooms", tuple(float(z) for z in self.zooms))
        if (
            self.anatomy is not None
            and self.shape == _PHANTOM_SHAPE
            and self.zooms == _PHANTOM_ZOOMS
        ):
            # The phantom's grid would cut a real-sized brain; this one holds it.
            object.__setattr__(self, "shape", ANATOMY_ASL_SHAPE)
            object.__setattr__(self, "zooms", ANATOMY_ASL_ZOOMS)
        if self.plds is not None:
            object.__setattr__(self, "plds", tuple(float(d) for d in self.plds))
        delays = self.delays
        checks = [
            (self.asl_type in _ASL_TYPES, f"asl_type must be one of {_ASL_TYPES}"),
            (self.m0_type in _M0_TYPES, f"m0_type must be one of {_M0_TYPES}"),
            (self.order in _ORDERS, f"order must be one of {_ORDERS}"),
            (
                self.bolus_cutoff_technique in _BOLUS_TECHNIQUES,
                f"bolus_cutoff_technique must be one of {_BOLUS_TECHNIQUES}",
            ),
            (len(self.shape) == 3 and min(self.shape) >= 4, "shape must be 3 sizes >= 4"),
            (len(self.zooms) == 3 and min(self.zooms) > 0, "zooms must be 3 positive sizes"),
            (self.n_pairs >= 1, "n_pairs must be >= 1"),
            (self.bs_pulses >= 0, "bs_pulses must be >= 0"),
            (self.pld > 0 and self.labeling_duration > 0, "pld and labeling_duration must be > 0"),
            (len(delays) >= 1 and min(delays) > 0, "plds must be a non-empty tuple of delays > 0"),
            (self.gm_att >= 0 and self.wm_att >= 0, "gm_att and wm_att must be >= 0"),
            (
                self.plds is None
                or self.asl_type != "PASL"
                or self.bolus_cutoff_technique != "QUIPSS",
                "multi-delay PASL needs a QUIPSSII or Q2TIPS bolus (a fixed bolus duration TI1)",
            ),
            (self.m0_tr > 0 and self.m0_estimate > 0, "m0_tr and m0_estimate must be > 0"),
            (self.motion_mm >= 0 and self.noise >= 0, "motion_mm and noise must be >= 0"),
            (
                self.asl_type != "PASL" or 0 < self.bolus_cutoff_delay < min(delays),
                "PASL needs 0 < bolus_cutoff_delay (TI1) < pld (TI)",
            ),
            (
                self.labeling_efficiency is None or 0 < self.labeling_efficiency <= 1,
                "labeling_efficiency must be in (0, 1]",
            ),
            (self.subject.isalnum(), "subject must be alphanumeric"),
            (self.session is None or self.session.isalnum(), "session must be alphanumeric"),
            (self.run is None or self.run >= 0, "run must be a non-negative integer"),
            (
                self.anatomy is None or isinstance(self.anatomy, AnatomySpec),
                "anatomy must be an AnatomySpec or None",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SyntheticSpec: {message}")
        _lookup_field(_BLOOD_T1, self.field_strength)  # fails early on an untabulated field

    @property
    def delays(self) -> tuple[float, ...]:
        """The delays of the series: ``plds``, or ``(pld,)`` for a single-delay series."""
        return (self.pld,) if self.plds is None else self.plds

    @property
    def stem(self) -> str:
        """BIDS filename prefix, e.g. ``sub-01_ses-A_run-1``."""
        parts = [f"sub-{self.subject}"]
        if self.session is not None:
            parts.append(f"ses-{self.session}")
        if self.run is not None:
            parts.append(f"run-{self.run}")
        return "_".join(parts)

    @property
    def perf_dir(self) -> Path:
        """Directory of the series relative to the dataset root."""
        base = Path(f"sub-{self.subject}")
        if self.session is not None:
            base = base / f"ses-{self.session}"
        return base / "perf"


@dataclass(frozen=True, eq=False)  # eq=False: array fields make generated __eq__ ambiguous
class SyntheticTruth:
    """Ground truth of one written series (arrays are read-only).

    Attributes
    ----------
    cbf : numpy.ndarray
        (X, Y, Z) true CBF in mL/100 g/min, in the reference (unmoved) frame.
    m0 : numpy.ndarray
        (X, Y, Z) true fully relaxed M0.
    gm_mask : numpy.ndarray
        Boolean, voxels that are >= 90 % grey matter (where tests check CBF).
    brain_mask : numpy.ndarray
        Boolean, voxels that are >= 50 % brain tissue (GM + WM + CSF).
    affine : numpy.ndarray
        (4, 4) voxel-to-RAS affine shared by every image of the series.
    motion : numpy.ndarray
        (T, 4, 4) RAS world transforms applied to each volume of the ASL series
        (reference world -> volume world); identity for every volume without motion.
    asl_file : pathlib.Path
        The written ``*_asl.nii.gz``.
    spec : SyntheticSpec
        The spec the series was made from.
    att : numpy.ndarray or None
        (X, Y, Z) true arterial transit time (s) of a multi-delay series (the flow-weighted
        mean of ``gm_att`` and ``wm_att``, NaN where the true CBF is 0); None for a
        single-delay series, whose model has no transit time.
    anatomy : SyntheticAnatomy or None
        The synthetic subject of a series with ``spec.anatomy`` (shared by the series of that
        subject), with the true transforms; None for the phantom. See :attr:`asl_to_t1w`,
        :meth:`in_template`, :meth:`template_gm` and :meth:`template_cbf`.
    """

    cbf: np.ndarray
    m0: np.ndarray
    gm_mask: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray
    motion: np.ndarray
    asl_file: Path
    spec: SyntheticSpec
    att: np.ndarray | None = None
    anatomy: SyntheticAnatomy | None = None

    def _anatomy(self) -> SyntheticAnatomy:
        if self.anatomy is None:
            raise ValueError("this series has no anatomy (SyntheticSpec.anatomy is None)")
        return self.anatomy

    @property
    def asl_to_t1w(self) -> np.ndarray:
        """(4, 4) RAS matrix mapping ASL world coordinates to T1w world coordinates.

        The head moved between the T1w and the ASL scans: the ASL world point ``p`` (in the
        frame of :attr:`affine`, i.e. of the first, unmoved ASL volume) shows the tissue at the
        T1w world point ``asl_to_t1w @ p``. This is the matrix ASL -> T1w coregistration should
        find (ITK-style registration with the T1w as fixed image reports its inverse).
        """
        return self._anatomy().asl_to_t1w

    def in_template(self, asl_map: np.ndarray, res: int = 2, cval: float = 0.0) -> np.ndarray:
        """Resample a map on the ASL grid to the template grid through the true transforms.

        Template voxel -> template world ``y`` -> T1w world ``x`` (the numerical inverse of
        ``y = M x + b + d(x)``) -> ASL world ``asl_to_t1w^-1 x`` -> ASL voxel, trilinear
        interpolation, ``cval`` outside the ASL grid. ``in_template(truth.cbf)`` is what a
        pipeline's CBF in template space should be, up to its own resampling.

        Parameters
        ----------
        asl_map : numpy.ndarray
            (X, Y, Z) map on the grid of :attr:`affine` (the reference ASL frame).
        res : int
            Template resolution: 1 or 2 mm (MNI152NLin2009aSym res-1 or res-2 grid).
        cval : float
            Value of template voxels that fall outside the ASL grid.

        Returns
        -------
        numpy.ndarray
            The map on the template grid (float64).
        """
        anatomy = self._anatomy()
        return anatomy.to_template(asl_map, self.affine, res, anatomy.asl_to_t1w, cval)

    def template_gm(self, res: int = 2) -> np.ndarray:
        """True GM probability in template space: the template's own GM map at ``res``."""
        return self._anatomy().template_map("gm", res)

    def template_cbf(self, res: int = 2) -> np.ndarray:
        """True CBF in template space at template resolution: ``gm_cbf pGM + wm_cbf pWM``.

        Free of the ASL grid's partial volume; :meth:`in_template` of :attr:`cbf` is the same
        truth seen at ASL resolution.
        """
        anatomy = self._anatomy()
        gm = anatomy.template_map("gm", res).astype(np.float64)
        wm = anatomy.template_map("wm", res).astype(np.float64)
        return self.spec.gm_cbf * gm + self.spec.wm_cbf * wm


# --------------------------------------------------------------------------------------------
# Physics
# --------------------------------------------------------------------------------------------
def _lookup_field(table: dict[float, float], field_strength: float) -> float:
    """Value tabulated at the field closest to ``field_strength`` (within the tolerance)."""
    nearest = min(table, key=lambda b0: abs(b0 - field_strength))
    if abs(nearest - field_strength) > _FIELD_TOLERANCE:
        raise ValueError(
            f"SyntheticSpec: field_strength {field_strength} T is not within "
            f"{_FIELD_TOLERANCE} T of a tabulated field {sorted(table)}"
        )
    return table[nearest]


def _labeling_efficiency(spec: SyntheticSpec) -> float:
    if spec.labeling_efficiency is not None:
        return spec.labeling_efficiency
    alpha = _ALPHA[spec.asl_type]
    if spec.background_suppression:
        alpha *= _BS_PULSE_EFFICIENCY**spec.bs_pulses
    return alpha


def _slice_times(spec: SyntheticSpec) -> np.ndarray:
    """Acquisition time of each slice after the start of the readout (zeros for 3D)."""
    n_slices = spec.shape[2]
    if not spec.slice_timing:
        return np.zeros(n_slices)
    # Rounded so that the JSON holds the exact decimal the model used.
    return np.round(np.arange(n_slices) * _SLICE_DURATION, 6)


def _kinetic_factor(spec: SyntheticSpec) -> np.ndarray:
    """dM / (CBF M0) for every slice, in the acquisition frame (shape (Z,))."""
    t1b = _lookup_field(_BLOOD_T1, spec.field_strength)
    alpha = _labeling_efficiency(spec)
    delay = spec.pld + _slice_times(spec)  # effective PLD (or TI) of each slice
    if spec.asl_type == "PASL":
        ti1 = spec.bolus_cutoff_delay
        bolus = (
            delay - ti1 if spec.bolus_cutoff_technique == "QUIPSS" else np.full_like(delay, ti1)
        )
        factor = 2.0 * alpha * bolus * np.exp(-delay / t1b)
    else:
        tau = spec.labeling_duration
        factor = 2.0 * alpha * t1b * (1.0 - np.exp(-tau / t1b)) * np.exp(-delay / t1b)
    return factor / (_UNIT * _LAMBDA)


def _att_map(spec: SyntheticSpec, fractions: dict[str, np.ndarray]) -> np.ndarray:
    """Flow-weighted mean ATT of GM and WM; NaN where no blood flows (see the docstring)."""
    gm_flow = spec.gm_cbf * fractions["gm"]
    wm_flow = spec.wm_cbf * fractions["wm"]
    flow = gm_flow + wm_flow
    weighted = gm_flow * spec.gm_att + wm_flow * spec.wm_att
    out = np.full(flow.shape, np.nan)
    np.divide(weighted, flow, out=out, where=flow > 0)
    return out


def _multidelay_maps(
    spec: SyntheticSpec, cbf: np.ndarray, att: np.ndarray, m0_for_dm: np.ndarray
) -> dict[tuple[int, int], np.ndarray]:
    """Reference-frame dM map for each delay index and each acquisition slice.

    Key ``(i, z)``: dM of the whole volume as slice ``z`` sees it at delay ``plds[i]`` (its
    effective delay is ``plds[i] + SliceTiming[z]``); a moved volume takes slice ``z`` from
    the moved map ``(i, z)``. For a 3D readout every slice has the same map, key ``(i, -1)``.
    """
    # Imported here: the kinetic model is only needed for multi-delay series.
    from aslprep_lite.quant.kinetic import tissue_signal

    t1b = _lookup_field(_BLOOD_T1, spec.field_strength)
    duration = spec.bolus_cutoff_delay if spec.asl_type == "PASL" else spec.labeling_duration
    # ATT is moot where CBF is 0; any finite value keeps dM = 0 there.
    att = np.nan_to_num(att, nan=0.0)
    offsets = _slice_times(spec) if spec.slice_timing else np.zeros(1)
    delays = np.asarray(spec.plds)[:, None] + offsets[None, :]  # (n_delays, Z or 1)
    signal = tissue_signal(
        cbf[..., None],
        att[..., None],
        delays,
        duration,
        asl_type=spec.asl_type,
        t1_blood=t1b,
        labeling_efficiency=_labeling_efficiency(spec),
        partition_coefficient=_LAMBDA,
        m0=m0_for_dm[..., None],
    )  # (X, Y, Z, n_delays, Z or 1)
    maps = {}
    for i in range(len(spec.plds)):
        if spec.slice_timing:
            for z in range(offsets.size):
                maps[(i, z)] = signal[..., i, z]
        else:
            maps[(i, -1)] = signal[..., i, 0]
    return maps


def _saturation(tr: float, field_strength: float) -> float:
    """Fraction of M0 recovered after a saturation-recovery time ``tr`` in grey matter."""
    return 1.0 - np.exp(-tr / _lookup_field(_GM_T1, field_strength))


# --------------------------------------------------------------------------------------------
# Phantom
# --------------------------------------------------------------------------------------------
def _affine(shape: tuple[int, int, int], zooms: tuple[float, float, float]) -> np.ndarray:
    """RAS affine with the given voxel sizes whose FOV centre is the world origin."""
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -np.asarray(zooms) * (np.asarray(shape) - 1) / 2.0
    return affine


def _phantom(shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Tissue fractions (gm, wm, csf, scalp) of the ellipsoidal head phantom.

    Geometry is defined in coordinates normalised to the half-FOV of each axis (-1..1), so the
    head fills the same fraction of any matrix.
    """
    n = np.asarray(shape, dtype=float)
    s = _SUPERSAMPLE
    # Sub-voxel centres of a s-fold supersampled grid, in normalised coordinates.
    axes = [((np.arange(int(m) * s) + 0.5) / s - m / 2.0) / (m / 2.0) for m in n]
    u = np.meshgrid(*axes, indexing="ij", sparse=True)

    def inside(centre: tuple[float, float, float], radii: Sequence[float]) -> np.ndarray:
        return sum(((u[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) <= 1.0

    brain_radii = np.array([0.64, 0.74, 0.70])
    # The GM shell has the same thickness in voxels along every axis.
    wm_radii = brain_radii - _GM_THICKNESS / (n / 2.0)
    brain = inside((0, 0, 0), brain_radii)
    scalp = inside((0, 0, 0), brain_radii * 1.28) & ~inside((0, 0, 0), brain_radii * 1.14)
    wm = inside((0, 0, 0), wm_radii)
    nuclei = inside((0.30, -0.05, 0.0), (0.12, 0.18, 0.30)) | inside(
        (-0.30, -0.05, 0.0), (0.12, 0.18, 0.30)
    )
    ventricles = inside((0.10, 0.05, 0.05), (0.07, 0.22, 0.25)) | inside(
        (-0.10, 0.05, 0.05), (0.07, 0.22, 0.25)
    )
    # Mutually exclusive labels on the fine grid, so the fractions sum to <= 1.
    csf = brain & ventricles
    gm = brain & ~csf & (~wm | nuclei)
    wm = brain & wm & ~csf & ~nuclei

    fractions = {}
    for name, label in (("gm", gm), ("wm", wm), ("csf", csf), ("scalp", scalp)):
        coarse = label.reshape(shape[0], s, shape[1], s, shape[2], s).mean(axis=(1, 3, 5))
        fractions[name] = ndimage.gaussian_filter(coarse, _PV_SIGMA, mode="constant")
    return fractions


# --------------------------------------------------------------------------------------------
# Motion
# --------------------------------------------------------------------------------------------
def _rigid_matrix(params: np.ndarray) -> np.ndarray:
    """(T, 4, 4) world matrices from (T, 6) [tx, ty, tz (mm), rx, ry, rz (deg)]."""
    rx, ry, rz = np.deg2rad(params[:, 3:]).T
    c, s = np.cos, np.sin
    one, zero = np.ones_like(rx), np.zeros_like(rx)
    rot_x = np.stack([one, zero, zero, zero, c(rx), -s(rx), zero, s(rx), c(rx)], -1)
    rot_y = np.stack([c(ry), zero, s(ry), zero, one, zero, -s(ry), zero, c(ry)], -1)
    rot_z = np.stack([c(rz), -s(rz), zero, s(rz), c(rz), zero, zero, zero, one], -1)
    rotation = rot_z.reshape(-1, 3, 3) @ rot_y.reshape(-1, 3, 3) @ rot_x.reshape(-1, 3, 3)
    matrices = np.tile(np.eye(4), (len(params), 1, 1))
    matrices[:, :3, :3] = rotation
    matrices[:, :3, 3] = params[:, :3]
    return matrices


def _motion(n_volumes: int, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Random rigid motion: smooth drift plus 1-2 spikes, bounded by ``amplitude``."""
    params = np.zeros((n_volumes, 6))
    if amplitude > 0 and n_volumes > 1:
        walk = np.cumsum(rng.normal(size=(n_volumes, 6)), axis=0)
        drift = ndimage.gaussian_filter1d(walk, sigma=2.0, axis=0, mode="nearest")
        drift -= drift[0]  # the first volume is the unmoved reference
        peak = np.abs(drift).max(axis=0)
        drift *= 0.6 * amplitude * rng.uniform(0.5, 1.0, size=6) / np.where(peak > 0, peak, 1)
        params = drift
        n_spikes = int(rng.integers(1, 3))
        spikes = rng.choice(
            np.arange(1, n_volumes), size=min(n_spikes, n_volumes - 1), replace=False
        )
        params[spikes] = rng.uniform(-1.0, 1.0, size=(len(spikes), 6)) * amplitude
        params = np.clip(params, -amplitude, amplitude)
    return _rigid_matrix(params)


class _Mover:
    """Resample reference-frame maps into the frame of a moved volume (cubic B-spline)."""

    def __init__(self, affine: np.ndarray, maps: dict[str, np.ndarray]) -> None:
        self.affine = affine
        self.inverse_affine = np.linalg.inv(affine)
        self.maps = maps
        # Prefilter once per map instead of once per volume.
        self.coefficients = {
            key: ndimage.spline_filter(value, order=3, mode="nearest")
            for key, value in maps.items()
        }

    def __call__(self, key: str, world: np.ndarray) -> np.ndarray:
        if np.allclose(world, np.eye(4)):
            return self.maps[key]
        # Output voxel o sits at world A o in the moved volume; it shows the reference content
        # at T^-1 A o, i.e. reference voxel A^-1 T^-1 A o.
        vox = self.inverse_affine @ np.linalg.inv(world) @ self.affine
        return ndimage.affine_transform(
            self.coefficients[key],
            vox[:3, :3],
            offset=vox[:3, 3],
            order=3,
            mode="nearest",
            prefilter=False,
        )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _volume_types(spec: SyntheticSpec) -> list[str]:
    types = ["m0scan"] if spec.m0_type == "Included" else []
    n_pairs = spec.n_pairs * len(spec.delays)
    if spec.deltam_only:
        return types + ["deltam"] * n_pairs
    pair = ["control", "label"] if spec.order == "control-first" else ["label", "control"]
    return types + pair * n_pairs


def _volume_delays(spec: SyntheticSpec) -> list[int]:
    """Index into ``spec.delays`` of every volume (-1 for an included M0).

    The series cycles through the delays one pair (or one deltam volume) at a time.
    """
    per_pair = 1 if spec.deltam_only else 2
    head = [-1] if spec.m0_type == "Included" else []
    n_delays = len(spec.delays)
    return head + [
        (pair % n_delays) for pair in range(spec.n_pairs * n_delays) for _ in range(per_pair)
    ]


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, tr: float | None) -> None:
    """Write float32 NIfTI-1 with qform/sform set and a fixed gzip header.

    nibabel stamps the gzip header with the current time, so two otherwise identical writes
    differ; compressing the serialised image ourselves with mtime=0 and no file name makes
    the output byte-identical.
    """
    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    if tr is not None:
        image.header["pixdim"][4] = tr
    write_nifti(image, path)


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _asl_metadata(spec: SyntheticSpec, slice_times: np.ndarray) -> dict:
    meta: dict = {
        "MagneticFieldStrength": spec.field_strength,
        "MRAcquisitionType": "2D" if spec.slice_timing else "3D",
        "EchoTime": _ECHO_TIME,
        "ArterialSpinLabelingType": spec.asl_type,
        "PostLabelingDelay": spec.pld,
        "BackgroundSuppression": spec.background_suppression,
        "M0Type": spec.m0_type,
        "TotalAcquiredPairs": spec.n_pairs * len(spec.delays),
        "RepetitionTimePreparation": _ASL_TR,
        "VascularCrushing": False,
    }
    if spec.m0_type == "Included" and spec.m0_tr != _ASL_TR:
        # BIDS allows one value per volume: the included M0 has its own TR.
        meta["RepetitionTimePreparation"] = [spec.m0_tr] + [_ASL_TR] * (
            len(_volume_types(spec)) - 1
        )
    if spec.plds is not None:
        # One value per volume (BIDS), 0 for an included M0 image.
        meta["PostLabelingDelay"] = [
            0.0 if index < 0 else spec.plds[index] for index in _volume_delays(spec)
        ]
    if spec.background_suppression:
        meta["BackgroundSuppressionNumberPulses"] = spec.bs_pulses
    if spec.asl_type == "PASL":
        meta["BolusCutOffFlag"] = True
        ti1 = spec.bolus_cutoff_delay
        meta["BolusCutOffDelayTime"] = (
            [ti1, round(ti1 + _Q2TIPS_LAST_PULSE, 6)]
            if spec.bolus_cutoff_technique == "Q2TIPS"
            else ti1
        )
        meta["BolusCutOffTechnique"] = spec.bolus_cutoff_technique
    else:
        meta["LabelingDuration"] = spec.labeling_duration
    if spec.labeling_efficiency is not None:
        meta["LabelingEfficiency"] = spec.labeling_efficiency
    if spec.m0_type == "Estimate":
        meta["M0Estimate"] = spec.m0_estimate
    if spec.slice_timing:
        meta["SliceTiming"] = slice_times.tolist()
    return meta


def _write_series(
    root: Path, spec: SyntheticSpec, anatomy: SyntheticAnatomy | None = None
) -> SyntheticTruth:
    """Simulate one series, write its files under ``root`` and return its truth.

    ``anatomy`` is the subject made from ``spec.anatomy`` (None: the ellipsoidal phantom).
    """
    # The stream depends on the seed and on the series' identity only (not on its position in
    # the list), so different subjects with the default seed still get different noise.
    identity = zlib.crc32(spec.stem.encode())
    motion_rng, noise_rng = np.random.default_rng([spec.seed, identity]).spawn(2)

    if anatomy is None:
        affine = _affine(spec.shape, spec.zooms)
        fractions = _phantom(spec.shape)
    else:
        affine = anatomy.asl_affine(spec.shape, spec.zooms)
        fractions = anatomy.fractions_on(spec.shape, affine, world_to_t1w=anatomy.asl_to_t1w)
    m0 = sum(_M0_TISSUE[name] * fractions[name] for name in _M0_TISSUE)
    cbf = spec.gm_cbf * fractions["gm"] + spec.wm_cbf * fractions["wm"]
    brain_mask = (fractions["gm"] + fractions["wm"] + fractions["csf"]) >= 0.5
    gm_mask = fractions["gm"] >= _GM_MASK_THRESHOLD

    slice_times = _slice_times(spec)
    kinetic = _kinetic_factor(spec)  # (Z,), applied in the acquisition frame
    m0_for_dm = np.full_like(m0, spec.m0_estimate) if spec.m0_type == "Estimate" else m0
    m0_written = m0 * _saturation(spec.m0_tr, spec.field_strength)
    if spec.m0_tr >= _M0_TR_THRESHOLD:
        m0_written = m0
    control = (
        _CONTROL_FRACTION[spec.background_suppression]
        * m0
        * _saturation(_ASL_TR, spec.field_strength)
    )
    sd = spec.noise * float(m0[brain_mask].mean())

    types = _volume_types(spec)
    motion = _motion(len(types), spec.motion_mm, motion_rng)
    maps: dict = {"control": control, "dm": cbf * m0_for_dm, "m0": m0_written}
    att = None
    if spec.plds is not None:
        att = _att_map(spec, fractions)
        maps.pop("dm")
        maps.update(_multidelay_maps(spec, cbf, att, m0_for_dm))
    mover = _Mover(affine, maps)

    def delta_m(index: int, world: np.ndarray) -> np.ndarray:
        """dM of volume ``index`` in its acquisition frame."""
        if spec.plds is None:  # the kinetic factor broadcasts over the slice axis
            return mover("dm", world) * kinetic
        delay = _volume_delays(spec)[index]
        if not spec.slice_timing:
            return mover((delay, -1), world)
        out = np.empty(spec.shape)
        for z in range(spec.shape[2]):
            out[..., z] = mover((delay, z), world)[..., z]
        return out

    volumes = np.empty((*spec.shape, len(types)), dtype=np.float64)
    for index, (kind, world) in enumerate(zip(types, motion, strict=True)):
        if kind == "m0scan":
            volumes[..., index] = mover("m0", world)
        elif kind == "control":
            volumes[..., index] = mover("control", world)
        elif kind == "label":
            volumes[..., index] = mover("control", world) - delta_m(index, world)
        else:
            volumes[..., index] = delta_m(index, world)
    noise_sd = np.array([sd * np.sqrt(2.0) if kind == "deltam" else sd for kind in types])
    volumes += noise_rng.normal(size=volumes.shape) * noise_sd

    perf = root / spec.perf_dir
    perf.mkdir(parents=True, exist_ok=True)
    asl_file = perf / f"{spec.stem}_asl.nii.gz"
    _write_nifti(asl_file, volumes, affine, _ASL_TR)
    _write_json(perf / f"{spec.stem}_asl.json", _asl_metadata(spec, slice_times))
    (perf / f"{spec.stem}_aslcontext.tsv").write_text("volume_type\n" + "\n".join(types) + "\n")

    if spec.m0_type == "Separate":
        m0_image = m0_written + noise_rng.normal(size=m0.shape) * sd
        _write_nifti(perf / f"{spec.stem}_m0scan.nii.gz", m0_image, affine, None)
        subject_dir = root / f"sub-{spec.subject}"
        m0_meta: dict = {
            "IntendedFor": [asl_file.relative_to(subject_dir).as_posix()],
            "MagneticFieldStrength": spec.field_strength,
            "MRAcquisitionType": "2D" if spec.slice_timing else "3D",
            "EchoTime": _ECHO_TIME,
            "RepetitionTimePreparation": spec.m0_tr,
        }
        if spec.slice_timing:
            m0_meta["SliceTiming"] = slice_times.tolist()
        _write_json(perf / f"{spec.stem}_m0scan.json", m0_meta)

    def frozen(array: np.ndarray) -> np.ndarray:
        array.flags.writeable = False
        return array

    return SyntheticTruth(
        cbf=frozen(cbf),
        m0=frozen(m0),
        gm_mask=frozen(gm_mask),
        brain_mask=frozen(brain_mask),
        affine=frozen(affine),
        motion=frozen(motion),
        asl_file=asl_file,
        spec=spec,
        att=None if att is None else frozen(att),
        anatomy=anatomy,
    )


def _write_t1w(root: Path, subject: str, anatomy: SyntheticAnatomy, metadata: dict) -> None:
    """Write ``sub-<subject>/anat/sub-<subject>_T1w.nii.gz`` and its sidecar."""
    anat = root / f"sub-{subject}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{subject}_T1w"
    _write_nifti(anat / f"{stem}.nii.gz", np.asarray(anatomy.t1w.dataobj), anatomy.affine, None)
    _write_json(anat / f"{stem}.json", metadata)


def write_dataset(
    root: Path,
    specs: Sequence[SyntheticSpec] = (SyntheticSpec(),),
    name: str = "aslprep_lite synthetic",
) -> list[SyntheticTruth]:
    """Write a raw BIDS ASL dataset with one series per spec.

    Parameters
    ----------
    root : pathlib.Path
        Dataset root; created if needed. Existing files of the same names are overwritten.
    specs : sequence of SyntheticSpec
        One entry per ASL series. Several may share a subject if their session/run differ.
    name : str
        ``Name`` in ``dataset_description.json``.

    Returns
    -------
    list of SyntheticTruth
        The truth of each series, in the order of ``specs``.

    Raises
    ------
    ValueError
        If ``specs`` is empty, two specs would write the same files, or the series of one
        subject have different ``anatomy`` specs.

    Notes
    -----
    A subject whose specs have an ``anatomy`` gets its T1w (``anat/sub-<label>_T1w.nii.gz``,
    at the subject level even when the series have sessions); the anatomy is made once per
    subject and shared by the truths of its series.

    The same call writes byte-identical files: all randomness comes from
    ``numpy.random.default_rng`` seeded by each spec, and the gzip headers carry no time stamp.
    """
    root = Path(root)
    specs = list(specs)
    if not specs:
        raise ValueError("write_dataset: specs is empty")
    stems = [spec.stem for spec in specs]
    duplicates = sorted({stem for stem in stems if stems.count(stem) > 1})
    if duplicates:
        raise ValueError(f"write_dataset: several specs write {', '.join(duplicates)}")
    anatomy_specs: dict[str, AnatomySpec | None] = {}
    for spec in specs:
        if anatomy_specs.setdefault(spec.subject, spec.anatomy) != spec.anatomy:
            raise ValueError(
                f"write_dataset: the series of sub-{spec.subject} have different anatomies"
            )

    root.mkdir(parents=True, exist_ok=True)
    _write_json(
        root / "dataset_description.json",
        {"Name": name, "BIDSVersion": "1.9.0", "DatasetType": "raw"},
    )
    (root / "README").write_text(
        f"{name}\n\nSynthetic arterial spin labeling data with a known CBF, written by "
        "aslprep_lite.synthetic. See that module for the forward model.\n"
    )
    subjects = sorted({spec.subject for spec in specs})
    (root / "participants.tsv").write_text(
        "participant_id\n" + "".join(f"sub-{subject}\n" for subject in subjects)
    )
    anatomies: dict[str, SyntheticAnatomy] = {}
    for subject, anatomy_spec in anatomy_specs.items():
        if anatomy_spec is None:
            continue
        anatomies[subject] = make_anatomy(anatomy_spec)
        fields = {spec.field_strength for spec in specs if spec.subject == subject}
        metadata = dict(_T1W_METADATA)
        if len(fields) == 1:
            metadata = {"MagneticFieldStrength": fields.pop(), **metadata}
        _write_t1w(root, subject, anatomies[subject], metadata)
    return [_write_series(root, spec, anatomies.get(spec.subject)) for spec in specs]
