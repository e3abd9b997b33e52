"""Multi-delay ASL: the Buxton general kinetic model, a vectorised fit, and weighted delay.

References
----------
- Buxton RB et al. (1998) A general kinetic model for quantitative perfusion imaging with
  arterial spin labeling. Magn Reson Med 40:383-396, doi:10.1002/mrm.1910400308 (the tissue
  model).
- Alsop DC et al. (2015) Magn Reson Med 73:102-116 (the single-delay consensus model this
  model reduces to once all the label has arrived).
- Woods JG et al. (2024) Recommendations for quantitative cerebral perfusion MRI using
  multi-timepoint arterial spin labeling. Magn Reson Med 92:469-495, doi:10.1002/mrm.30091
  (the ISMRM multi-delay recommendations: the same single-compartment model, fitted for CBF
  and ATT).
- Chappell MA et al. (2010) Separation of macrovascular signal in multi-inversion time arterial
  spin labelling MRI. Magn Reson Med 63:1357-1365 (the arterial component, as in BASIL).
- Dai W et al. (2012) Reduced resolution transit delay prescan for quantitative continuous
  arterial spin labeling perfusion imaging. Magn Reson Med 67:1252-1265 (weighted delay).

Model
-----
Time ``t`` runs from the start of labeling: ``t = τ + PLD`` for (P)CASL with labeling duration
τ, ``t = TI`` for PASL with bolus duration τ (TI1 for QUIPSS II / Q2TIPS). With f the CBF in
mL/g/s (``cbf / 6000``), Δt the arterial transit time (ATT), α the labeling efficiency, λ the
partition coefficient and T1b the blood T1, the labeled bolus reaches the voxel between Δt and
Δt + τ and relaxes with T1b before arrival and with T1' after it (well-mixed single
compartment). With ``u = clip(t, Δt, Δt + τ)``, the time the last label seen at ``t`` arrived::

    (P)CASL  ΔM/M0 = 2 α f/λ · e^(-Δt/T1b) · T1' · e^(-(t-u)/T1') · (1 - e^(-(u-Δt)/T1'))
    PASL     ΔM/M0 = 2 α f/λ · e^(-Δt/T1b) · e^(-(t-Δt)/T1') · (1 - e^(-k(u-Δt))) / k,
             k = 1/T1b - 1/T1'   ((u - Δt) when k = 0)

which is 0 before arrival (t < Δt), rises while the bolus arrives (Δt ≤ t < Δt + τ) and decays
once it has all arrived (t ≥ Δt + τ). These are the pulsed and continuous solutions of Buxton
et al. 1998 with M0b = M0/λ and with the apparent tissue relaxation time T1' held constant:

- **default, T1' = T1b** (``t1_tissue=None``): the label is assumed to keep relaxing with the
  blood T1 after arrival. This is the single-compartment assumption of the consensus papers
  (Alsop 2015; Woods 2024); with it the decay phase of (P)CASL is exactly Alsop et al. 2015
  eq. [1] and that of PASL eq. [2], independent of Δt.
- ``t1_tissue=T1`` gives Buxton's form with T1' = T1, i.e. his 1/T1' = 1/T1 + f/λ with the
  venous outflow term f/λ (≈ 0.01 s⁻¹, 1-2 % of 1/T1) neglected, so that CBF stays a linear
  parameter of the model (what makes the fit below fast).

Optional arterial (macrovascular) component, as in BASIL (Chappell et al. 2010): labeled blood
still in arteries, of fractional volume aBV (mL blood per mL voxel) arriving at aBAT, for the
bolus duration, with arterial blood magnetization M0/λ::

    ΔM_art/M0 = 2 α aBV/λ · c(t),   c(t) = e^(-aBAT/T1b) · B(t)   (P)CASL
                                    c(t) = e^(-t/T1b)    · B(t)   PASL
    B(t) = Φ((t - aBAT)/σ) - Φ((t - aBAT - τ)/σ)

B is the boxcar 1[aBAT ≤ t < aBAT + τ] with its edges blurred by a Gaussian arrival-time
dispersion of SD σ (``arterial_dispersion``, default 0.1 s; σ = 0 gives the hard boxcar). The
blur is what makes aBAT estimable from a handful of delays: with a hard boxcar the signal at
each delay is a step function of aBAT, with zero derivative between the steps. For (P)CASL
the decay factor is evaluated at the mean arrival aBAT (the exact dispersed form differs by a
factor e^(σ²/2T1b²), 1.0018 at σ = 0.1 s, T1b = 1.65 s).

The model is continuous but has kinks at t = Δt and t = Δt + τ; the Jacobians below are the
one-sided derivatives of the phase that holds at ``t`` (rising phase for t = Δt, decay phase
for t = Δt + τ).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from scipy.special import ndtr

from aslprep_lite.quant.cbf import UNIT_CONVERSION
from aslprep_lite.quant.m0 import voxel_sigma

__all__ = [
    "ABAT_BOUNDS",
    "ABV_BOUNDS",
    "ARTERIAL_DISPERSION",
    "ATT_BOUNDS",
    "ATT_STEP",
    "CBF_BOUNDS",
    "FAIL_AT_BOUNDS",
    "FAIL_INPUT",
    "FAIL_NONFINITE",
    "FAIL_NOT_CONVERGED",
    "FAIL_SINGULAR",
    "MAX_ITER",
    "NO_ARTERIAL",
    "FitResult",
    "WeightedDelay",
    "arterial_signal",
    "att_upper_bound",
    "cbf_at_fixed_att",
    "fit_multidelay",
    "fit_with_arterial_selection",
    "kinetic_jacobian",
    "local_att_prior",
    "tissue_signal",
    "weighted_delay_att",
]

_CONTINUOUS = ("PCASL", "CASL")
_PULSED = ("PASL",)

#: ``FitResult.reason`` bits. Any of them except ``NO_ARTERIAL`` sets ``FitResult.failed``.
FAIL_INPUT = 1  #: non-finite ΔM, or M0 non-finite or <= 0: the voxel was not fitted
FAIL_NOT_CONVERGED = 2  #: still improving after ``max_iter`` iterations
FAIL_AT_BOUNDS = 4  #: CBF, ATT (or aBAT, or aBV at its upper bound) ends on a bound
FAIL_SINGULAR = 8  #: JᵀJ singular, or a standard error wider than its parameter's bounds
FAIL_NONFINITE = 16  #: a parameter or its standard error is not finite
NO_ARTERIAL = 32  #: arterial fit only: aBV is 0 (no arterial signal), aBAT is undetermined

# Defaults of :func:`fit_multidelay`, defined once here so that whoever records the fit's
# settings (e.g. the BIDS sidecar) can import them instead of restating the numbers.
CBF_BOUNDS = (-100.0, 500.0)  #: CBF box (mL/100 g/min), see :func:`fit_multidelay`
ATT_BOUNDS = (0.0, 5.0)  #: ATT box (s)
ABV_BOUNDS = (0.0, 0.1)  #: arterial blood volume fraction box (mL/mL)
ABAT_BOUNDS = (0.0, 3.0)  #: arterial bolus arrival time box (s)
ATT_STEP = 0.05  #: spacing (s) of the starting grid over ATT (and aBAT)
MAX_ITER = 100  #: Levenberg-Marquardt iteration limit
ARTERIAL_DISPERSION = 0.1  #: SD σ (s) of the arterial boxcar's blurred edges

# Typical magnitudes of (cbf, att, abv, abat): the fit works in these units so that the
# Levenberg-Marquardt damping floor means the same for every parameter.
_SCALES = np.array([100.0, 1.0, 0.01, 1.0])


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
def _check_type(asl_type: str) -> bool:
    """True for pulsed labeling, False for continuous; raise on anything else."""
    if asl_type in _CONTINUOUS:
        return False
    if asl_type in _PULSED:
        return True
    raise ValueError(f"asl_type must be one of {_CONTINUOUS + _PULSED}, got {asl_type!r}")


def _phi(k: float, d: NDArray) -> NDArray:
    """(1 - e^(-k d)) / k, and its limit d at k = 0 (expm1 keeps small k accurate)."""
    if k == 0.0:
        return d
    return -np.expm1(-k * d) / k


def _time(delay: NDArray, duration: NDArray, pulsed: bool) -> NDArray:
    """Time since the start of labeling: TI for PASL, τ + PLD for (P)CASL."""
    return delay if pulsed else duration + delay


def _tissue(
    att: NDArray,
    t: NDArray,
    tau: NDArray,
    *,
    pulsed: bool,
    t1b: float,
    t1p: float,
    derivative: bool,
) -> tuple[NDArray, NDArray | None]:
    """ΔM/M0 per unit f/λ·2α (i.e. the kinetic curve shape) and its derivative in Δt."""
    u = np.clip(t, att, att + tau)
    arrived = t >= att
    decaying = t >= att + tau  # du/dΔt = 1 here, 0 in the rising phase
    inflow = np.exp(-att / t1b)  # relaxation of the label on its way to the voxel
    if pulsed:
        k = 1.0 / t1b - 1.0 / t1p
        after = np.exp(-(t - att) / t1p)
        shape = inflow * after * _phi(k, u - att)
    else:
        shape = inflow * t1p * np.exp(-(t - u) / t1p) * -np.expm1(-(u - att) / t1p)
    shape = np.where(arrived, shape, 0.0)
    if not derivative:
        return shape, None
    # Once the whole bolus has arrived, Δt only shifts how long the label relaxed with T1b
    # instead of T1': d/dΔt = (1/T1' - 1/T1b) ΔM, written so that it is exactly 0 for
    # T1' = T1b (a rounding-level derivative would make ATT look weakly determined).
    d_decay = (1.0 / t1p - 1.0 / t1b) * shape
    if pulsed:
        # rising: d/dΔt of e^(-t/T1') (e^(-kΔt) - e^(-kt)) / k = -e^(-Δt/T1b) e^(-(t-Δt)/T1')
        d_rise = -inflow * after
    else:
        # rising: d/dΔt of e^(-Δt/T1b) T1' (1 - e^(-(t-Δt)/T1'))
        d_rise = -shape / t1b - inflow * np.exp(-(t - att) / t1p)
    d_att = np.where(decaying, d_decay, d_rise)
    return shape, np.where(arrived, d_att, 0.0)


def _arterial(
    abat: NDArray,
    t: NDArray,
    tau: NDArray,
    *,
    pulsed: bool,
    t1b: float,
    sigma: float,
    derivative: bool,
) -> tuple[NDArray, NDArray | None]:
    """c(t) of the arterial component and its derivative in aBAT."""
    lead = t - abat
    trail = lead - tau
    if sigma > 0:
        box = ndtr(lead / sigma) - ndtr(trail / sigma)
    else:
        box = ((lead >= 0) & (trail < 0)).astype(np.float64)
    decay = np.exp(-(t if pulsed else abat) / t1b)
    curve = decay * box
    if not derivative:
        return curve, None
    if sigma > 0:
        gauss = np.exp(-0.5 * (lead / sigma) ** 2) - np.exp(-0.5 * (trail / sigma) ** 2)
        d_box = -gauss / (sigma * np.sqrt(2.0 * np.pi))
    else:
        d_box = np.zeros_like(box)
    d_abat = decay * d_box
    if not pulsed:
        d_abat = d_abat - curve / t1b
    return curve, d_abat


def _as_params(value: ArrayLike) -> NDArray:
    """A per-voxel parameter with a trailing axis that broadcasts against timings (..., N)."""
    return np.asarray(value, dtype=np.float64)[..., np.newaxis]


def _scale_m0(signal: NDArray, m0: ArrayLike | None) -> NDArray:
    return signal if m0 is None else signal * _as_params(m0)


def tissue_signal(
    cbf: ArrayLike,
    att: ArrayLike,
    delay: ArrayLike,
    duration: ArrayLike,
    *,
    asl_type: str,
    t1_blood: float,
    labeling_efficiency: float,
    partition_coefficient: float = 0.9,
    t1_tissue: float | None = None,
    m0: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """Tissue ΔM of the Buxton model (see the module docstring for the equations).

    Parameters
    ----------
    cbf, att
        CBF (mL/100 g/min) and arterial transit time Δt (s), shape (...,) e.g. (V,).
    delay
        Per volume, shape (N,) (or anything broadcasting to (..., N)): the post-labeling delay
        for PCASL/CASL, the inversion time TI for PASL (BIDS ``PostLabelingDelay``).
    duration
        Labeling duration τ (PCASL/CASL) or bolus duration (PASL: TI1 for QUIPSS II and
        Q2TIPS, see :func:`aslprep_lite.quant.cbf.pasl_bolus_duration`), same shape rules.
    asl_type : {"PCASL", "CASL", "PASL"}
    t1_blood
        Arterial blood T1 (s).
    labeling_efficiency
        α, background-suppression losses included.
    partition_coefficient
        λ (mL/g).
    t1_tissue
        T1' after arrival (s); None (default) uses ``t1_blood`` (consensus assumption).
    m0
        (...,) M0; when given, ΔM is returned instead of ΔM/M0.

    Returns
    -------
    numpy.ndarray
        (..., N) ΔM/M0, or ΔM when ``m0`` is given.
    """
    pulsed = _check_type(asl_type)
    tau = np.asarray(duration, dtype=np.float64)
    t = _time(np.asarray(delay, dtype=np.float64), tau, pulsed)
    shape, _ = _tissue(
        _as_params(att),
        t,
        tau,
        pulsed=pulsed,
        t1b=t1_blood,
        t1p=t1_blood if t1_tissue is None else t1_tissue,
        derivative=False,
    )
    scale = 2.0 * labeling_efficiency / (partition_coefficient * UNIT_CONVERSION)
    return _scale_m0(scale * _as_params(cbf) * shape, m0)


def arterial_signal(
    abv: ArrayLike,
    abat: ArrayLike,
    delay: ArrayLike,
    duration: ArrayLike,
    *,
    asl_type: str,
    t1_blood: float,
    labeling_efficiency: float,
    partition_coefficient: float = 0.9,
    arterial_dispersion: float = ARTERIAL_DISPERSION,
    m0: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """Arterial (macrovascular) ΔM, Chappell et al. 2010 (see the module docstring).

    ``abv`` is the arterial blood volume fraction (mL/mL, e.g. 0.01), ``abat`` its arrival
    time (s), ``arterial_dispersion`` the SD σ (s) of the Gaussian that blurs the boxcar's
    edges. Shapes and the other arguments as in :func:`tissue_signal`.
    """
    pulsed = _check_type(asl_type)
    tau = np.asarray(duration, dtype=np.float64)
    t = _time(np.asarray(delay, dtype=np.float64), tau, pulsed)
    curve, _ = _arterial(
        _as_params(abat),
        t,
        tau,
        pulsed=pulsed,
        t1b=t1_blood,
        sigma=arterial_dispersion,
        derivative=False,
    )
    scale = 2.0 * labeling_efficiency / partition_coefficient
    return _scale_m0(scale * _as_params(abv) * curve, m0)


def kinetic_jacobian(
    cbf: ArrayLike,
    att: ArrayLike,
    delay: ArrayLike,
    duration: ArrayLike,
    *,
    asl_type: str,
    t1_blood: float,
    labeling_efficiency: float,
    partition_coefficient: float = 0.9,
    t1_tissue: float | None = None,
    abv: ArrayLike | None = None,
    abat: ArrayLike | None = None,
    arterial_dispersion: float = ARTERIAL_DISPERSION,
    m0: ArrayLike | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Total ΔM (tissue, plus arterial when ``abv`` and ``abat`` are given) and its Jacobian.

    Returns
    -------
    signal : numpy.ndarray
        (..., N), as :func:`tissue_signal` + :func:`arterial_signal`.
    jacobian : numpy.ndarray
        (..., N, P): derivatives with respect to (cbf, att) or (cbf, att, abv, abat), in the
        units of the parameters (per mL/100 g/min, per s, per unit aBV fraction, per s).
        One-sided at the kinks t = Δt (rising side) and t = Δt + τ (decay side).
    """
    pulsed = _check_type(asl_type)
    arterial = abv is not None or abat is not None
    if arterial and (abv is None or abat is None):
        raise ValueError("kinetic_jacobian: give both abv and abat, or neither")
    tau = np.asarray(duration, dtype=np.float64)
    t = _time(np.asarray(delay, dtype=np.float64), tau, pulsed)
    params = [_as_params(cbf), _as_params(att)]
    if arterial:
        params += [_as_params(abv), _as_params(abat)]
    signal, columns = _evaluate(
        params,
        t,
        tau,
        pulsed=pulsed,
        t1b=t1_blood,
        t1p=t1_blood if t1_tissue is None else t1_tissue,
        alpha=labeling_efficiency,
        lam=partition_coefficient,
        sigma=arterial_dispersion,
        derivative=True,
    )
    jacobian = np.stack(np.broadcast_arrays(*columns), axis=-1)
    if m0 is not None:
        m0 = _as_params(m0)
        return signal * m0, jacobian * m0[..., np.newaxis]
    return signal, jacobian


def _evaluate(
    params: list[NDArray],
    t: NDArray,
    tau: NDArray,
    *,
    pulsed: bool,
    t1b: float,
    t1p: float,
    alpha: float,
    lam: float,
    sigma: float,
    derivative: bool,
) -> tuple[NDArray, list[NDArray]]:
    """Model ΔM/M0 and (optionally) its Jacobian columns for params [cbf, att(, abv, abat)]."""
    tissue_scale = 2.0 * alpha / (lam * UNIT_CONVERSION)
    shape, d_att = _tissue(
        params[1], t, tau, pulsed=pulsed, t1b=t1b, t1p=t1p, derivative=derivative
    )
    signal = tissue_scale * params[0] * shape
    columns: list[NDArray] = []
    if derivative:
        columns = [tissue_scale * shape, tissue_scale * params[0] * d_att]
    if len(params) == 4:
        arterial_scale = 2.0 * alpha / lam
        curve, d_abat = _arterial(
            params[3], t, tau, pulsed=pulsed, t1b=t1b, sigma=sigma, derivative=derivative
        )
        signal = signal + arterial_scale * params[2] * curve
        if derivative:
            columns += [arterial_scale * curve, arterial_scale * params[2] * d_abat]
    return signal, columns


# --------------------------------------------------------------------------------------------
# Fit
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FitResult:
    """Per-voxel result of :func:`fit_multidelay` (all arrays (V,)).

    Attributes
    ----------
    cbf, att, cbf_se, att_se
        CBF (mL/100 g/min), ATT (s) and their standard errors, ``sqrt(diag(s² (JᵀJ)⁻¹))``
        with ``s² = RSS / (N - P)`` over all N volumes and P fitted parameters. NaN where the
        input was invalid. Where JᵀJ is singular the other errors are NaN and ``cbf_se`` is
        the error with the other parameters held fixed. With an ATT prior they are the
        posterior SDs, ``sqrt(diag(s² (JᵀJ + s²/σ_p² e_ATT e_ATTᵀ)⁻¹))`` with s² of the
        least-squares fit (a prior computed from it) or of the grid optimum (a given prior),
        finite also where JᵀJ is singular only in ATT.
    abv, abat, abv_se, abat_se
        Arterial blood volume fraction (mL/mL), its arrival time (s) and standard errors;
        None unless the fit had ``arterial=True``. With :data:`NO_ARTERIAL`, aBV is 0 and
        aBAT and both errors are NaN.
    rmse
        Root mean square residual over all N volumes, in the units of ``deltam``.
    r2
        Coefficient of determination of the delay curve: 1 - Σ n_i (d̄_i - m_i)² /
        Σ n_i (d̄_i - d̄)², over the per-delay means d̄_i of ΔM (n_i volumes at delay i) and
        the model m_i. It measures how well the kinetic curve explains the variation of ΔM
        across delays; the scatter of repeats at one delay (noise) does not lower it.
        NaN when all delay means are equal.
    failed
        True where ``reason`` has any bit but :data:`NO_ARTERIAL` set.
    reason
        Bit mask of :data:`FAIL_INPUT`, :data:`FAIL_NOT_CONVERGED`, :data:`FAIL_AT_BOUNDS`,
        :data:`FAIL_SINGULAR`, :data:`FAIL_NONFINITE`, :data:`NO_ARTERIAL`.
    n_iter
        Levenberg-Marquardt iterations used by each voxel.
    att_prior
        (mean, SD) of the ATT prior the fit used, per voxel (s; NaN where not fitted), or
        None for a least-squares fit.
    """

    cbf: NDArray[np.float64]
    att: NDArray[np.float64]
    cbf_se: NDArray[np.float64]
    att_se: NDArray[np.float64]
    abv: NDArray[np.float64] | None
    abat: NDArray[np.float64] | None
    abv_se: NDArray[np.float64] | None
    abat_se: NDArray[np.float64] | None
    rmse: NDArray[np.float64]
    r2: NDArray[np.float64]
    failed: NDArray[np.bool_]
    reason: NDArray[np.uint8]
    n_iter: NDArray[np.int32]
    att_prior: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None


#: ``fit_multidelay``'s ``att_prior``: (mean, SD), scalars or (V,) arrays, or a function of
#: the least-squares fit returning them (or None for no prior).
AttPriorSpec = (
    tuple[ArrayLike, ArrayLike] | Callable[[FitResult], tuple[ArrayLike, ArrayLike] | None]
)


def _as_prior(prior: tuple[ArrayLike, ArrayLike], n_vox: int) -> tuple[NDArray, NDArray]:
    """(mean, SD) broadcast to (V,) float arrays."""
    if len(prior) != 2:
        raise ValueError(f"an ATT prior is (mean, SD), got {prior!r}")
    mean, sd = (np.broadcast_to(np.asarray(v, dtype=np.float64), (n_vox,)) for v in prior)
    return mean, sd


@dataclass(frozen=True)
class _Problem:
    """Everything the fit needs that is not a parameter, in ΔM/M0 units."""

    mean: NDArray  # (V, U) mean ΔM/M0 per unique timing
    counts: NDArray  # (U,) volumes per unique timing
    t: NDArray  # (U,) or (V, U) time since the start of labeling
    tau: NDArray  # (U,)
    pulsed: bool
    t1b: float
    t1p: float
    alpha: float
    lam: float
    sigma: float
    prior_mean: NDArray | None = None  # (V,) ATT prior mean
    prior_weight: NDArray | None = None  # (V,) s²/σ_p² of the ATT prior, None: no prior

    def evaluate(
        self, params: list[NDArray], t: NDArray, derivative: bool
    ) -> tuple[NDArray, list[NDArray]]:
        """:func:`_evaluate` with this problem's constants."""
        return _evaluate(
            params,
            t,
            self.tau,
            pulsed=self.pulsed,
            t1b=self.t1b,
            t1p=self.t1p,
            alpha=self.alpha,
            lam=self.lam,
            sigma=self.sigma,
            derivative=derivative,
        )

    def model(
        self, p: NDArray, rows: NDArray | None, derivative: bool
    ) -> tuple[NDArray, NDArray | None]:
        """(V', U) ΔM/M0 and (V', U, P) Jacobian at params p (V', P) for voxels ``rows``."""
        t = self.t if self.t.ndim == 1 or rows is None else self.t[rows]
        params = [p[:, j : j + 1] for j in range(p.shape[1])]
        signal, columns = self.evaluate(params, t, derivative)
        signal = np.broadcast_to(signal, (p.shape[0], self.tau.size))
        if not derivative:
            return signal, None
        shape = (p.shape[0], self.tau.size)
        return signal, np.stack([np.broadcast_to(c, shape) for c in columns], axis=-1)

    def penalty(self, p: NDArray, rows: NDArray) -> NDArray:
        """The ATT prior's term of the cost, s²((ATT - μ)/σ_p)² (0 without a prior)."""
        if self.prior_weight is None:
            return np.zeros(p.shape[0])
        return self.prior_weight[rows] * (p[:, 1] - self.prior_mean[rows]) ** 2

    def with_prior(self, prior: tuple[NDArray, NDArray], noise_var: NDArray) -> _Problem:
        """This problem with an ATT prior in its cost, RSS + s² ((ATT − μ) / σ_p)².

        Parameters
        ----------
        prior
            (V,) prior mean μ and SD σ_p of every voxel.
        noise_var
            (V,) noise variance s²: it puts the prior on the scale of the RSS, so that the
            cost is −2 s² × the log posterior up to a constant (maximum a posteriori).
        """
        return replace(self, prior_mean=prior[0], prior_weight=noise_var / prior[1] ** 2)


def _group_timings(delay: NDArray, duration: NDArray) -> tuple[NDArray, NDArray, NDArray, NDArray]:
    """Unique (delay, duration) pairs, the column → pair index and the count of each pair."""
    pairs = np.stack([delay, duration], axis=1)
    unique, inverse, counts = np.unique(pairs, axis=0, return_inverse=True, return_counts=True)
    return unique[:, 0], unique[:, 1], inverse.ravel(), counts.astype(np.float64)


def _grid_start(
    problem: _Problem,
    att_grid: NDArray,
    abat_grid: NDArray | None,
    bounds: NDArray,
    *,
    total: NDArray,
    dof: int,
    prior: tuple[NDArray, NDArray] | None = None,
    max_elements: int = 2_000_000,
) -> tuple[NDArray, NDArray]:
    """Starting values: the best point of an ATT (× aBAT) grid, linear parameters solved.

    For each grid point CBF (and aBV) enter the model linearly, so their least-squares values
    have a closed form and the grid only runs over the nonlinear times. aBV is constrained to
    ≥ 0 by falling back to the tissue-only solution where the 2-parameter one is negative.

    Also returns each voxel's noise variance estimate s² = RSS / ``dof`` at the grid's least-
    squares optimum, RSS = ``total`` (Σ y² over all volumes) − the best grid point's RSS
    reduction. With an ATT ``prior`` (mean, SD) the best grid point is the one that minimises
    RSS + s² ((ATT − mean) / SD)² instead (the maximum a posteriori point of the grid); mean
    and SD are (V,) arrays.
    """
    n_vox = problem.mean.shape[0]
    start = np.empty((n_vox, 2 if abat_grid is None else 4))
    noise_var = np.empty(n_vox)
    w = problem.counts
    unit = np.ones((1, 1))
    # Voxels per chunk, so that the (grid, voxel, timing) arrays stay ~16 MB each.
    n_grid = att_grid.size * (1 if abat_grid is None else abat_grid.size)
    chunk = max(1, max_elements // (n_grid * problem.tau.size))
    for lo in range(0, n_vox, chunk):
        rows = np.arange(lo, min(lo + chunk, n_vox))
        y = problem.mean[rows]  # (c, U)
        # ((ATT_k − μ) / σ_p)² per grid point and voxel (K, c|1): 0 without a prior
        z2 = (
            np.zeros((att_grid.size, 1))
            if prior is None
            else ((att_grid[:, None] - prior[0][rows]) / prior[1][rows]) ** 2
        )
        t = problem.t if problem.t.ndim == 1 else problem.t[rows]
        # Tissue templates g_k = model at CBF 1 and ATT = grid[k]: (K, c|1, U)
        g, _ = problem.evaluate([unit, att_grid.reshape(-1, 1, 1)], t, derivative=False)
        gg = (g**2) @ w  # (K, c|1)
        gy = (g * y) @ w  # (K, c)
        with np.errstate(invalid="ignore", divide="ignore"):
            cbf = np.where(gg > 0, gy / gg, 0.0)
        gain = cbf * gy  # RSS reduction of the best CBF at each grid point
        if abat_grid is None:
            s2 = np.maximum(total[rows] - gain.max(axis=0), 0.0) / dof
            best = np.argmax(gain - s2 * z2, axis=0)
            start[rows, 0] = cbf[best, np.arange(rows.size)]
            start[rows, 1] = att_grid[best]
            noise_var[rows] = s2
            continue
        # Arterial templates a_m = c(t) at aBV 1, aBAT = grid[m]: (M, c|1, U)
        zero = np.zeros((1, 1))
        a, _ = problem.evaluate(
            [zero, zero, unit, abat_grid.reshape(-1, 1, 1)], t, derivative=False
        )
        aa = (a**2) @ w  # (M, c|1)
        ay = (a * y) @ w  # (M, c)
        ga = np.einsum("kcu,mcu,u->kmc", g, a, w)  # (K, M, c|1)
        det = gg[:, None] * aa[None] - ga**2
        with np.errstate(invalid="ignore", divide="ignore"):
            f2 = (aa[None] * gy[:, None] - ga * ay[None]) / det
            v2 = (gg[:, None] * ay[None] - ga * gy[:, None]) / det
        gain2 = f2 * gy[:, None] + v2 * ay[None]
        ok = np.isfinite(gain2) & (det > 1e-12 * gg[:, None] * aa[None]) & (v2 >= 0)
        # aBAT <= ATT (see fit_multidelay); pairs beyond it fall back to the tissue-only fit.
        ok &= (abat_grid[None, :] <= att_grid[:, None])[:, :, None]
        # Where aBV would be negative, the constrained optimum has aBV = 0 (tissue only).
        gain2 = np.where(ok, gain2, gain[:, None])
        f2 = np.where(ok, f2, cbf[:, None])
        v2 = np.where(ok, v2, 0.0)
        s2 = np.maximum(total[rows] - gain2.max(axis=(0, 1)), 0.0) / dof
        flat = (gain2 - s2 * z2[:, None, :]).reshape(-1, rows.size)
        best = np.argmax(flat, axis=0)
        noise_var[rows] = s2
        cols = np.arange(rows.size)
        k, m = np.unravel_index(best, gain2.shape[:2])
        start[rows, 0] = f2.reshape(-1, rows.size)[best, cols]
        start[rows, 1] = att_grid[k]
        start[rows, 2] = v2.reshape(-1, rows.size)[best, cols]
        # Where aBV = 0 won, aBAT is moot: keep it on the feasible side of ATT.
        start[rows, 3] = np.minimum(abat_grid[m], start[rows, 1])
    return np.clip(start, bounds[:, 0], bounds[:, 1]), noise_var


def _project(p: NDArray, bounds: NDArray) -> NDArray:
    """Clip parameters (V, P) to the box, and for the arterial fit to aBAT <= ATT.

    aBAT > ATT is moved to the nearest point of the half-plane (both set to their mean, which
    stays inside both boxes since ATT < aBAT <= its upper bound and aBAT > ATT >= its lower).
    """
    p = np.clip(p, bounds[:, 0], bounds[:, 1])
    if p.shape[1] == 4:
        late = p[:, 3] > p[:, 1]
        middle = 0.5 * (p[late, 1] + p[late, 3])
        p[late, 1] = p[late, 3] = middle
    return p


def _singular(normal: NDArray) -> NDArray:
    """Which of the (V, P, P) normal matrices (in units of :data:`_SCALES`) are singular: a
    zero column (1e-10 of the largest in norm: that parameter does not change the model), or
    a reciprocal condition number of the correlation matrix below 1e-10."""
    diag = np.diagonal(normal, axis1=1, axis2=2)
    zero = np.any(~(diag > 1e-20 * diag.max(axis=1, keepdims=True)), axis=1)
    norm = np.sqrt(np.where(diag > 0, diag, 1.0))
    corr = normal / (norm[:, :, None] * norm[:, None, :])
    with np.errstate(invalid="ignore"):
        eig = np.linalg.eigvalsh(np.where(np.isfinite(corr), corr, 0.0))
    return zero | ~(eig[:, 0] > 1e-10 * eig[:, -1])


def _inverse(normal: NDArray, singular: NDArray) -> NDArray:
    """Inverses of the (V, P, P) matrices, NaN where ``singular``."""
    inverse = np.full_like(normal, np.nan)
    if np.any(~singular):
        inverse[~singular] = np.linalg.inv(normal[~singular])
    return inverse


def _solve_small(a: NDArray, b: NDArray) -> NDArray:
    """Solve the systems a x = b, a (V, P, P) symmetric, b (V, P): Cramer's rule for P = 2
    (an order of magnitude faster than the batched LAPACK call), LAPACK otherwise."""
    if a.shape[-1] != 2:
        return np.linalg.solve(a, b[..., None])[..., 0]
    a00, a01, a11 = a[:, 0, 0], a[:, 0, 1], a[:, 1, 1]
    det = a00 * a11 - a01 * a01
    return (
        np.stack([a11 * b[:, 0] - a01 * b[:, 1], a00 * b[:, 1] - a01 * b[:, 0]], 1) / det[:, None]
    )


def _levenberg_marquardt(
    problem: _Problem,
    start: NDArray,
    bounds: NDArray,
    *,
    max_iter: int,
    xtol: float,
    ftol: float,
) -> tuple[NDArray, NDArray, NDArray, NDArray, NDArray]:
    """Bound-constrained LM on all voxels at once, each with its own damping μ.

    Steps are solved in units of :data:`_SCALES` and projected onto the bounds; a voxel's
    step is accepted if it does not increase its cost (μ × 0.3), otherwise rejected (μ × 10).
    A voxel stops when a step (accepted or not) changes no parameter by more than ``xtol`` (in
    scaled units), when an accepted step changes the cost by less than ``ftol`` relative, or
    when μ > 1e10 (no descent direction left: a minimum, possibly on a kink or a bound).

    Returns params (V, P), converged (V,), iterations (V,), cost (V,) and the Jacobian at the
    params (V, U, P).
    """
    n_vox, n_par = start.shape
    scales = _SCALES[:n_par]
    signal, jac = problem.model(start, None, derivative=True)
    # Results per voxel, written when the voxel stops (or at the end).
    p_out, cost_out, jac_out = start.copy(), np.empty(n_vox), np.empty(jac.shape)
    n_iter = np.zeros(n_vox, dtype=np.int32)
    converged = np.zeros(n_vox, dtype=bool)
    # The working set: the voxels still iterating, compacted as voxels stop (gathering the
    # shrinking set once beats gathering and scattering every array at every iteration).
    idx = np.arange(n_vox)
    p, signal, jac = start.copy(), np.asarray(signal), np.asarray(jac)
    mean = problem.mean
    if problem.prior_weight is None:
        prior, prior_mean = np.zeros(n_vox), np.zeros(n_vox)
    else:
        prior, prior_mean = problem.prior_weight, problem.prior_mean
    cost = ((mean - signal) ** 2) @ problem.counts + prior * (p[:, 1] - prior_mean) ** 2
    mu = np.full(n_vox, 1e-3)
    eye = np.eye(n_par)
    for _ in range(max_iter):
        if idx.size == 0:
            break
        js = jac * scales  # Jacobian in scaled units
        jwt = (js * problem.counts[:, None]).transpose(0, 2, 1)
        normal = jwt @ js  # batched matmul: several times faster than einsum here
        gradient = (jwt @ (mean - signal)[..., None])[..., 0]
        # The prior is one more residual, sqrt(w)(μ − ATT), with derivative −sqrt(w).
        normal[:, 1, 1] += prior * scales[1] ** 2
        gradient[:, 1] += prior * scales[1] * (prior_mean - p[:, 1])
        diag = np.diagonal(normal, axis1=1, axis2=2)
        # Marquardt's scaling by diag(JᵀJ), floored so an undetermined parameter (zero
        # column) still gets a positive damping and the system stays solvable.
        floor = 1e-9 * diag.max(axis=1, keepdims=True) + 1e-300
        damping = mu[:, None] * np.maximum(diag, floor)
        system = normal + damping[:, :, None] * eye
        step = _solve_small(system, gradient) * scales
        trial = _project(p + step, bounds)
        trial_signal, trial_jac = problem.model(trial, idx, derivative=True)
        trial_cost = ((mean - trial_signal) ** 2) @ problem.counts
        trial_cost = trial_cost + prior * (trial[:, 1] - prior_mean) ** 2
        accept = np.isfinite(trial_cost) & (trial_cost <= cost)
        small = np.all(np.abs(trial - p) / scales <= xtol, axis=1)
        flat = (cost - trial_cost) <= ftol * cost
        p = np.where(accept[:, None], trial, p)
        signal = np.where(accept[:, None], trial_signal, signal)
        jac = np.where(accept[:, None, None], trial_jac, jac)
        cost = np.where(accept, trial_cost, cost)
        mu = np.where(accept, np.maximum(mu * 0.3, 1e-12), mu * 10.0)
        n_iter[idx] += 1
        # A step within xtol, taken or not, leaves nothing to gain beyond xtol: stop (else a
        # voxel on a kink or a bound rejects steps until μ > 1e10, ~13 wasted iterations).
        done = small | (accept & flat) | (mu > 1e10)
        if np.any(done):
            finished = idx[done]
            p_out[finished], cost_out[finished], jac_out[finished] = p[done], cost[done], jac[done]
            converged[finished] = True
            keep = ~done
            idx, p, signal, jac, cost, mu = (
                idx[keep],
                p[keep],
                signal[keep],
                jac[keep],
                cost[keep],
                mu[keep],
            )
            mean, prior, prior_mean = mean[keep], prior[keep], prior_mean[keep]
    # Voxels still iterating after max_iter: not converged.
    p_out[idx], cost_out[idx], jac_out[idx] = p, cost, jac
    return p_out, converged, n_iter, cost_out, jac_out


def _check_data(
    deltam: ArrayLike, m0: ArrayLike, plds: ArrayLike, labeling_duration: ArrayLike
) -> tuple[NDArray, NDArray, NDArray, NDArray]:
    """Check :func:`fit_multidelay`'s data and timings and make them float arrays.

    Parameters
    ----------
    deltam, m0, plds, labeling_duration
        As given to :func:`fit_multidelay`.

    Returns
    -------
    deltam : (V, N) ndarray
    m0 : (V,) ndarray
    delay, duration : (N,) ndarray
        ``m0``, ``plds`` and ``labeling_duration`` broadcast to these shapes (read-only).

    Raises
    ------
    ValueError
        ``deltam`` is not 2-D, a delay is not finite or negative, or a duration is not > 0.
    """
    deltam = np.asarray(deltam, dtype=np.float64)
    if deltam.ndim != 2:
        raise ValueError(f"deltam must be (V, N), got shape {deltam.shape}")
    n_vox, n_vol = deltam.shape
    m0 = np.broadcast_to(np.asarray(m0, dtype=np.float64), (n_vox,))
    delay = np.broadcast_to(np.asarray(plds, dtype=np.float64), (n_vol,))
    duration = np.broadcast_to(np.asarray(labeling_duration, dtype=np.float64), (n_vol,))
    if np.any(~np.isfinite(delay)) or np.any(delay < 0) or np.any(~(duration > 0)):
        raise ValueError("plds must be finite and >= 0, labeling_duration > 0")
    return deltam, m0, delay, duration


def _n_parameters(n_vol: int, arterial: bool, arterial_dispersion: float) -> int:
    """Number of fitted parameters: 2 (CBF, ATT) or, with ``arterial``, 4 (+ aBV, aBAT).

    Raises
    ------
    ValueError
        An arterial fit with a hard boxcar (σ = 0 leaves aBAT with a zero derivative between
        the delays, see :func:`arterial_signal`), or no more volumes than parameters.
    """
    n_par = 4 if arterial else 2
    if arterial and not arterial_dispersion > 0:
        raise ValueError("an arterial fit needs arterial_dispersion > 0 (see arterial_signal)")
    if n_vol <= n_par:
        raise ValueError(f"{n_vol} volumes cannot determine {n_par} parameters")
    return n_par


def _check_bounds(bounds: Sequence[tuple[float, float]]) -> NDArray:
    """The (P, 2) float array of the (lower, upper) bounds; raise unless each lower < upper."""
    box = np.array(bounds, dtype=float)
    if np.any(box[:, 0] >= box[:, 1]):
        raise ValueError("every lower bound must be below its upper bound")
    return box


def _fit_times(
    delay: NDArray,
    duration: NDArray,
    *,
    pulsed: bool,
    delay_offset: ArrayLike | None,
    n_vox: int,
) -> tuple[NDArray, NDArray, NDArray, NDArray]:
    """The distinct (delay, duration) timings of the volumes and their times since labeling.

    Parameters
    ----------
    delay, duration
        (N,) delay (PLD, or TI for PASL) and labeling/bolus duration of each volume.
    pulsed
        PASL (time = TI) rather than (P)CASL (time = τ + PLD).
    delay_offset
        (V,) extra delay per voxel, or None.
    n_vox
        V, the number of voxels ``delay_offset`` broadcasts to.

    Returns
    -------
    t : (U,) or (V, U) ndarray
        Time since the start of labeling of each distinct timing, per voxel with an offset.
    tau : (U,) ndarray
        The labeling/bolus duration of each distinct timing.
    column : (N,) ndarray of int
        Which distinct timing each volume has.
    counts : (U,) ndarray
        Volumes per distinct timing (float: they weight the residuals).
    """
    uniq_delay, tau, column, counts = _group_timings(delay, duration)
    if uniq_delay.size < 2:
        raise ValueError("a multi-delay fit needs at least 2 distinct delays")
    t = _time(uniq_delay, tau, pulsed)
    if delay_offset is not None:
        offset = np.broadcast_to(np.asarray(delay_offset, dtype=np.float64), (n_vox,))
        t = t + offset[:, None]
    return t, tau, column, counts


def _timing_means(
    deltam: NDArray, m0: NDArray, column: NDArray, counts: NDArray
) -> tuple[NDArray, NDArray, NDArray]:
    """ΔM/M0 of the fittable voxels, reduced to its mean at each distinct timing.

    The volumes at one timing share a model value, so the RSS splits into Σ n_i (d̄_i − m_i)²
    over the timings' means d̄_i plus the scatter of the volumes about those means, which no
    parameter changes: the fit runs on the means (exact, and N/U times cheaper) and adds the
    scatter back for the RSS.

    Parameters
    ----------
    deltam : (V, N) ndarray
    m0 : (V,) ndarray
    column : (N,) ndarray of int
        Distinct timing of each volume, see :func:`_fit_times`.
    counts : (U,) ndarray
        Volumes per distinct timing.

    Returns
    -------
    rows : (V',) ndarray of int
        The voxels that can be fitted: finite ΔM, finite M0 > 0.
    mean : (V', U) ndarray
        Mean ΔM/M0 per distinct timing.
    within : (V',) ndarray
        The scatter Σ (ΔM/M0 − d̄_i)² of the volumes about their timing's mean.
    """
    valid = np.all(np.isfinite(deltam), axis=1) & np.isfinite(m0) & (m0 > 0)
    rows = np.flatnonzero(valid)
    y = deltam[rows] / m0[rows, None]
    # Column sums via a one-hot matrix keep this a single matmul.
    n_vol = deltam.shape[1]
    onehot = np.zeros((n_vol, counts.size))
    onehot[np.arange(n_vol), column] = 1.0
    mean = (y @ onehot) / counts
    within = np.sum((y - mean[:, column]) ** 2, axis=1)
    return rows, mean, within


def _start_grid(bounds: tuple[float, float], latest: float, step: float) -> NDArray:
    """A starting grid (spacing ``step``) over an arrival time, from its lower bound up to
    (within half a step) its upper bound or ``latest``, the latest time of any delay,
    whichever comes first: later than that no label has arrived anywhere, so there is no
    point gridding it."""
    top = min(bounds[1], latest)
    return np.arange(bounds[0], top + 0.5 * step, step)


@dataclass(frozen=True, eq=False)
class _FitSetup:
    """One :func:`fit_multidelay` call reduced to what a fit of it needs.

    Built once and shared by the least-squares and the prior fit of an empirical-Bayes run.
    Arrays (V',) hold the fittable voxels only (``rows``).
    """

    problem: _Problem  # their per-timing ΔM/M0 means and the model constants
    rows: NDArray  # (V',) where the fittable voxels are among all V
    n_vox: int  # V
    n_vol: int  # N
    m0: NDArray  # (V',) M0, to bring the RMSE back to the units of ΔM
    within: NDArray  # (V',) scatter about the per-timing means: RSS no parameter changes
    total: NDArray  # (V',) Σ (ΔM/M0)² over all volumes: the RSS of a zero model
    bounds: NDArray  # (P, 2) (lower, upper) of (cbf, att[, abv, abat])
    att_grid: NDArray  # starting grid over ATT
    abat_grid: NDArray | None  # starting grid over aBAT; None: tissue-only fit

    @property
    def arterial(self) -> bool:
        """The fit includes the arterial component (aBV, aBAT)."""
        return self.bounds.shape[0] == 4

    @property
    def dof(self) -> int:
        """Residual degrees of freedom N − P."""
        return self.n_vol - self.bounds.shape[0]


def _set_up_fit(
    deltam: NDArray,
    m0: NDArray,
    delay: NDArray,
    duration: NDArray,
    bounds: Sequence[tuple[float, float]],
    *,
    pulsed: bool,
    t1b: float,
    t1p: float,
    alpha: float,
    lam: float,
    sigma: float,
    delay_offset: ArrayLike | None,
    att_step: float,
) -> _FitSetup:
    """Check the bounds and timings and reduce the data to the problem of the fittable voxels.

    Parameters
    ----------
    deltam, m0, delay, duration
        As returned by :func:`_check_data`.
    bounds
        (lower, upper) of (cbf, att) or, for the arterial fit, (cbf, att, abv, abat).
    pulsed, t1b, t1p, alpha, lam, sigma
        Model constants, see :class:`_Problem`.
    delay_offset
        (V,) extra delay per voxel, or None.
    att_step
        Spacing of the starting grids over ATT and aBAT (s).

    Returns
    -------
    _FitSetup
    """
    box = _check_bounds(bounds)
    n_vox, n_vol = deltam.shape
    t, tau, column, counts = _fit_times(
        delay, duration, pulsed=pulsed, delay_offset=delay_offset, n_vox=n_vox
    )
    rows, mean, within = _timing_means(deltam, m0, column, counts)
    problem = _Problem(
        mean=mean,
        counts=counts,
        t=t if t.ndim == 1 else t[rows],
        tau=tau,
        pulsed=pulsed,
        t1b=t1b,
        t1p=t1p,
        alpha=alpha,
        lam=lam,
        sigma=sigma,
    )
    latest = float(np.max(t))  # over every voxel's offset, fittable or not
    return _FitSetup(
        problem=problem,
        rows=rows,
        n_vox=n_vox,
        n_vol=n_vol,
        m0=m0[rows],
        within=within,
        total=within + (mean**2) @ counts,
        bounds=box,
        att_grid=_start_grid(bounds[1], latest, att_step),
        abat_grid=_start_grid(bounds[3], latest, att_step) if len(bounds) == 4 else None,
    )


def _normal_matrix(jac: NDArray, counts: NDArray) -> tuple[NDArray, NDArray]:
    """JᵀWJ in units of :data:`_SCALES`, W the number of volumes at each distinct timing.

    Parameters
    ----------
    jac : (V, U, K) ndarray
        Jacobian of the model's per-timing means with respect to the first K parameters.
    counts : (U,) ndarray
        Volumes per distinct timing.

    Returns
    -------
    normal : (V, K, K) ndarray
        The identity where JᵀWJ is not finite: a placeholder that keeps the batched linear
        algebra quiet, for voxels the caller flags singular through ``finite``.
    finite : (V,) ndarray of bool
    """
    k = jac.shape[-1]
    js = jac * _SCALES[:k]
    normal = (js * counts[:, None]).transpose(0, 2, 1) @ js
    finite = np.all(np.isfinite(normal), axis=(1, 2))
    normal[~finite] = np.eye(k)
    return normal, finite


def _covariance_errors(normal: NDArray, singular: NDArray, s2: NDArray) -> NDArray:
    """Standard errors sqrt(diag(s² A⁻¹)) in the units of the parameters.

    Parameters
    ----------
    normal : (V, K, K) ndarray
        A, in units of :data:`_SCALES` (JᵀWJ, or the posterior precision with a prior).
    singular : (V,) ndarray of bool
        Where A is not inverted: the errors are NaN there.
    s2 : (V,) ndarray
        Noise variance.

    Returns
    -------
    (V, K) ndarray
    """
    inverse = _inverse(normal, singular)
    k = normal.shape[-1]
    return np.sqrt(np.diagonal(inverse, axis1=1, axis2=2) * s2[:, None]) * _SCALES[:k]


def _block_errors(
    jac: NDArray,
    counts: NDArray,
    span: NDArray,
    *,
    s2: NDArray,
    variance: NDArray,
    prior_weight: NDArray | None,
) -> tuple[NDArray, NDArray]:
    """Standard errors (posterior SDs with an ATT prior) of the first K parameters.

    Parameters
    ----------
    jac : (V, U, K) ndarray
        Jacobian at the solution.
    counts : (U,) ndarray
        Volumes per distinct timing.
    span : (K,) ndarray
        Width of each parameter's bounds.
    s2 : (V,) ndarray
        Noise variance that scales the covariance: RSS / (N − P) for least squares, the
        variance that weighted the prior for a prior fit.
    variance : (V,) ndarray
        RSS / (N − P) of the solution, for CBF's conditional error.
    prior_weight : (V,) ndarray or None
        s²/σ_p² of the ATT prior (parameter 1), or None for least squares.

    Returns
    -------
    se : (V, K) ndarray
        NaN where the problem is singular, except CBF's error, see below.
    singular : (V,) ndarray of bool
        JᵀJ is singular (see :func:`_singular`) or not finite, or an error is wider than its
        parameter's bounds. Judged on the data alone, also with a prior.
    """
    normal, finite = _normal_matrix(jac, counts)
    singular = _singular(normal) | ~finite
    se = _covariance_errors(normal, singular, s2)
    # A parameter that barely moves the model (e.g. ATT when CBF ≈ 0) leaves JᵀJ
    # well-conditioned after scaling but is undetermined: its error exceeds its bounds.
    singular |= np.any(se > span, axis=1)
    if prior_weight is not None:
        # Posterior SDs, sqrt(diag(s² (JᵀJ + s²/σ_p² e_ATT e_ATTᵀ)⁻¹)): finite even where
        # the data alone leave ATT undetermined (which stays flagged singular).
        # The prior cannot fix a zero CBF column, s² = 0, or aBV/aBAT trading against
        # each other: those posteriors stay singular, their errors NaN.
        posterior = normal.copy()
        posterior[:, 1, 1] += prior_weight * _SCALES[1] ** 2
        se = _covariance_errors(posterior, _singular(posterior) | ~finite, s2)
    # Where ATT (or aBAT) is undetermined, CBF's error is still defined with the others
    # held fixed: exact when they do not change the model at all (ATT < shortest PLD).
    with np.errstate(divide="ignore", invalid="ignore"):  # used only where > 0 below
        cbf_only = np.sqrt(variance / normal[:, 0, 0]) * _SCALES[0]
    conditional = np.isnan(se[:, 0]) & (normal[:, 0, 0] > 0)
    se[:, 0] = np.where(conditional, cbf_only, se[:, 0])
    return se, singular


def _standard_errors(
    jac: NDArray,
    counts: NDArray,
    bounds: NDArray,
    *,
    s2: NDArray,
    variance: NDArray,
    prior_weight: NDArray | None,
    no_arterial: NDArray,
) -> tuple[NDArray, NDArray]:
    """Standard errors (posterior SDs with an ATT prior) of all parameters of every voxel.

    Parameters
    ----------
    jac : (V, U, P) ndarray
        Jacobian at the solution.
    counts : (U,) ndarray
        Volumes per distinct timing.
    bounds : (P, 2) ndarray
    s2, variance, prior_weight
        (V,), see :func:`_block_errors`.
    no_arterial : (V,) ndarray of bool
        Voxels of the arterial fit without arterial signal (all False for the tissue fit).

    Returns
    -------
    se : (V, P) ndarray
        From the full model, or from its (CBF, ATT) block where there is no arterial signal:
        aBV = 0 leaves aBAT moot, and the tissue errors stand (aBV's and aBAT's are NaN).
    singular : (V,) ndarray of bool
        See :func:`_block_errors`.
    """
    n_fit, _, n_par = jac.shape
    span = bounds[:, 1] - bounds[:, 0]
    se = np.full((n_fit, n_par), np.nan)
    singular = np.zeros(n_fit, dtype=bool)
    for select, k in ((~no_arterial, n_par), (no_arterial, 2)):
        if not np.any(select):
            continue
        se_block, singular_block = _block_errors(
            jac[select][:, :, :k],
            counts,
            span[:k],
            s2=s2[select],
            variance=variance[select],
            prior_weight=None if prior_weight is None else prior_weight[select],
        )
        se[select, :k] = se_block
        singular[select] = singular_block
    return se, singular


def _on_bounds(params: NDArray, bounds: NDArray) -> tuple[NDArray, NDArray]:
    """Which parameters (V, P) ended on their lower and on their upper bound: within 10⁻⁶ of
    the bound range of it (see :func:`fit_multidelay`'s Notes)."""
    tol = 1e-6 * (bounds[:, 1] - bounds[:, 0])
    return params <= bounds[:, 0] + tol, params >= bounds[:, 1] - tol


def _no_arterial(params: NDArray, bounds: NDArray) -> NDArray:
    """(V,) bool: voxels whose aBV ended on its lower bound, i.e. no arterial signal was found
    (all False for a tissue-only fit, whose params have 2 columns)."""
    if params.shape[1] != 4:
        return np.zeros(params.shape[0], dtype=bool)
    return _on_bounds(params, bounds)[0][:, 2]


def _nonfinite(params: NDArray, se: NDArray, no_arterial: NDArray) -> NDArray:
    """(V,) bool: a parameter (V, P) or error (V, P) is not finite, the aBV and aBAT values and
    errors that are NaN on purpose where there is no arterial signal apart."""
    checked = np.concatenate([params, se], axis=1)
    if params.shape[1] == 4:
        checked[np.ix_(no_arterial, [2, 3, 6, 7])] = 0.0
    return ~np.all(np.isfinite(checked), axis=1)


def _failure_reason(
    params: NDArray,
    se: NDArray,
    bounds: NDArray,
    *,
    converged: NDArray,
    singular: NDArray,
    no_arterial: NDArray,
) -> NDArray[np.uint8]:
    """The ``FitResult.reason`` bits of the fitted voxels.

    Parameters
    ----------
    params, se : (V, P) ndarray
        Solution and its errors.
    bounds : (P, 2) ndarray
    converged, singular, no_arterial : (V,) ndarray of bool
        From :func:`_levenberg_marquardt`, :func:`_standard_errors` and :func:`_no_arterial`.

    Returns
    -------
    (V,) ndarray of uint8
        :data:`FAIL_NOT_CONVERGED`, :data:`FAIL_AT_BOUNDS`, :data:`FAIL_SINGULAR`,
        :data:`FAIL_NONFINITE` and :data:`NO_ARTERIAL` (never :data:`FAIL_INPUT`).
    """
    reason = np.zeros(params.shape[0], dtype=np.uint8)
    reason[~converged] |= FAIL_NOT_CONVERGED
    reason[no_arterial] |= NO_ARTERIAL
    at_lower, at_upper = _on_bounds(params, bounds)
    if params.shape[1] == 4:
        at_lower[:, 2] = False  # aBV = 0 is a valid answer, not a failure
        at_lower[no_arterial, 3] = at_upper[no_arterial, 3] = False  # aBAT is moot there
    reason[np.any(at_lower | at_upper, axis=1)] |= FAIL_AT_BOUNDS
    reason[singular] |= FAIL_SINGULAR
    # A singular voxel's NaN errors are explained by FAIL_SINGULAR already.
    reason[_nonfinite(params, se, no_arterial) & ~singular] |= FAIL_NONFINITE
    return reason


def _r_squared(mean: NDArray, counts: NDArray, cost: NDArray) -> NDArray:
    """R² of the delay curve (see ``FitResult.r2``), NaN where all delay means are equal.

    Parameters
    ----------
    mean : (V, U) ndarray
        Per-timing mean ΔM/M0 d̄_i.
    counts : (U,) ndarray
        Volumes per timing n_i.
    cost : (V,) ndarray
        Σ n_i (d̄_i − m_i)² at the solution (the data's part of the cost, no prior term).
    """
    mean_of_means = (mean @ counts) / counts.sum()
    spread = ((mean - mean_of_means[:, None]) ** 2) @ counts
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(spread > 0, 1.0 - cost / spread, np.nan)


def _full_result(
    setup: _FitSetup,
    params: NDArray,
    se: NDArray,
    *,
    rss: NDArray,
    r2: NDArray,
    reason: NDArray,
    n_iter: NDArray,
    prior: tuple[NDArray, NDArray] | None,
) -> FitResult:
    """The :class:`FitResult` of all V voxels from the (V',) results of the fitted ones.

    Voxels that were not fitted get NaN, :data:`FAIL_INPUT` and 0 iterations. ``params`` and
    ``se`` are (V', P), ``prior`` the (V',) (mean, SD) the fit used or None.
    """

    def full(values: NDArray, fill: float = np.nan) -> NDArray:
        out = np.full(setup.n_vox, fill, dtype=values.dtype)
        out[setup.rows] = values
        return out

    reason = full(reason, FAIL_INPUT)
    arterial = setup.arterial
    return FitResult(
        cbf=full(params[:, 0]),
        att=full(params[:, 1]),
        cbf_se=full(se[:, 0]),
        att_se=full(se[:, 1]),
        abv=full(params[:, 2]) if arterial else None,
        abat=full(params[:, 3]) if arterial else None,
        abv_se=full(se[:, 2]) if arterial else None,
        abat_se=full(se[:, 3]) if arterial else None,
        rmse=full(np.sqrt(rss / setup.n_vol) * setup.m0),
        r2=full(r2),
        failed=(reason & ~np.uint8(NO_ARTERIAL)) != 0,
        reason=reason,
        n_iter=full(n_iter, 0),
        att_prior=None if prior is None else (full(prior[0]), full(prior[1])),
    )


def _prior_on_rows(
    prior: tuple[NDArray, NDArray] | None, rows: NDArray
) -> tuple[NDArray, NDArray] | None:
    """The (V,) ATT prior (mean, SD) of the fitted voxels ``rows``; raise where it is unusable.

    Only the fitted voxels are checked: the others never use their prior, which a prior
    computed from the least-squares fit may well leave undefined.
    """
    if prior is None:
        return None
    mean, sd = prior[0][rows], prior[1][rows]
    if not (np.all(np.isfinite(mean)) and np.all(sd > 0)):
        raise ValueError("the ATT prior needs a finite mean and an SD > 0 per voxel")
    return mean, sd


def _solve(
    setup: _FitSetup,
    prior: tuple[NDArray, NDArray] | None,
    noise: NDArray | None = None,
    *,
    max_iter: int,
    xtol: float,
    ftol: float,
) -> tuple[FitResult, NDArray]:
    """One fit of every voxel: grid start, Levenberg-Marquardt, errors and failure flags.

    Parameters
    ----------
    setup
        From :func:`_set_up_fit`.
    prior
        (V,) mean and SD of an ATT prior, or None for least squares.
    noise
        (V',) noise variance s² that weights the prior: the least-squares fit's for an
        empirical-Bayes prior; None uses the grid's estimate (see :func:`_grid_start`).
    max_iter, xtol, ftol
        Stopping rules of :func:`_levenberg_marquardt`.

    Returns
    -------
    result : FitResult
    variance : (V',) ndarray
        RSS / (N − P) of the solution: ``noise`` for a prior fit after this one.
    """
    prior = _prior_on_rows(prior, setup.rows)
    problem = setup.problem
    start, noise_var = _grid_start(
        problem,
        setup.att_grid,
        setup.abat_grid,
        setup.bounds,
        total=setup.total,
        dof=setup.dof,
        prior=prior,
    )
    if noise is not None:
        noise_var = noise
    if prior is not None:
        problem = problem.with_prior(prior, noise_var)
    params, converged, n_iter, cost, jac = _levenberg_marquardt(
        problem, start, setup.bounds, max_iter=max_iter, xtol=xtol, ftol=ftol
    )
    cost = cost - problem.penalty(params, np.arange(setup.rows.size))  # the data's part
    rss = cost + setup.within
    variance = rss / setup.dof
    no_arterial = _no_arterial(params, setup.bounds)
    se, singular = _standard_errors(
        jac,
        problem.counts,
        setup.bounds,
        s2=variance if prior is None else noise_var,
        variance=variance,
        prior_weight=problem.prior_weight,
        no_arterial=no_arterial,
    )
    reason = _failure_reason(
        params, se, setup.bounds, converged=converged, singular=singular, no_arterial=no_arterial
    )
    if setup.arterial:
        params[no_arterial, 2] = 0.0  # not a rounding-level positive value
        params[no_arterial, 3] = np.nan  # undetermined without arterial signal
    result = _full_result(
        setup,
        params,
        se,
        rss=rss,
        r2=_r_squared(problem.mean, problem.counts, cost),
        reason=reason,
        n_iter=n_iter,
        prior=prior,
    )
    return result, variance


def fit_multidelay(
    deltam: ArrayLike,
    m0: ArrayLike,
    plds: ArrayLike,
    labeling_duration: ArrayLike,
    *,
    asl_type: str,
    t1_blood: float,
    labeling_efficiency: float,
    partition_coefficient: float = 0.9,
    t1_tissue: float | None = None,
    arterial: bool = False,
    arterial_dispersion: float = ARTERIAL_DISPERSION,
    delay_offset: ArrayLike | None = None,
    cbf_bounds: tuple[float, float] = CBF_BOUNDS,
    att_bounds: tuple[float, float] = ATT_BOUNDS,
    abv_bounds: tuple[float, float] = ABV_BOUNDS,
    abat_bounds: tuple[float, float] = ABAT_BOUNDS,
    att_step: float = ATT_STEP,
    att_prior: AttPriorSpec | None = None,
    max_iter: int = MAX_ITER,
    xtol: float = 1e-7,
    ftol: float = 1e-12,
) -> FitResult:
    """Voxelwise least-squares fit of the Buxton model to multi-delay ΔM, all voxels at once.

    Parameters
    ----------
    deltam
        (V, N) control − label, one column per volume; repeats of a delay are more columns
        and need not be equally many per delay.
    m0
        (V,) equilibrium magnetization (same units as ``deltam``, already TR-corrected).
    plds
        (N,) post-labeling delay (PCASL/CASL) or inversion time TI (PASL) of each column, s.
    labeling_duration
        (N,) or scalar: labeling duration τ (PCASL/CASL) or bolus duration (PASL), s.
    asl_type : {"PCASL", "CASL", "PASL"}
    t1_blood, labeling_efficiency, partition_coefficient, t1_tissue
        Model constants, see :func:`tissue_signal`.
    arterial
        Also fit the arterial component (aBV, aBAT), see :func:`arterial_signal`.
    arterial_dispersion
        σ (s) of the arterial boxcar's edges; must be > 0 when ``arterial`` is True.
    delay_offset
        (V,) extra delay per voxel (s) added to every column, e.g. the slice acquisition time
        of a 2D readout (:func:`aslprep_lite.quant.cbf.slice_delays`).
    cbf_bounds, att_bounds, abv_bounds, abat_bounds
        Box constraints. CBF ∈ [−100, 500] mL/100 g/min: wide enough that noise in low-flow
        voxels is not clipped at 0 (which would bias ROI means upward), finite so that a
        voxel without signal cannot run away. ATT ∈ [0, 5] s covers every physiological
        transit time. aBV ∈ [0, 0.1] (no negative blood volume; 10 % is far above any
        artery-containing voxel at ASL resolution), aBAT ∈ [0, 3] s and aBAT ≤ ATT (the label
        passes through the voxel's arteries before it reaches its tissue; without this a late
        arterial bolus can imitate the tissue decay and trade against CBF).
    att_step
        Spacing (s) of the starting grid over ATT (and over aBAT for the arterial fit, whose
        cost has local minima where the arterial and tissue curves trade places: a grid
        twice as coarse, 0.1 s, already lands in the wrong one for some PASL curves).
    att_prior
        A Gaussian prior on ATT, (mean, SD) in s, each a scalar or (V,): the fit then
        minimises RSS + s² ((ATT − mean) / SD)² per voxel (maximum a posteriori with the
        noise variance s² of the voxel's own least-squares residual). Or a function of the
        least-squares :class:`FitResult` returning that (mean, SD), or None for no prior:
        the fit runs by least squares first, asks it for the prior (empirical Bayes, e.g.
        :func:`local_att_prior` with the voxels' positions) and fits again with it. The
        prior used is ``FitResult.att_prior``. None (default): plain least squares.
    max_iter, xtol, ftol
        Levenberg-Marquardt stopping rules (see ``_levenberg_marquardt``). ``max_iter=0``
        returns the grid starting values (flagged :data:`FAIL_NOT_CONVERGED`).

    Returns
    -------
    FitResult

    Notes
    -----
    The fit works on ΔM/M0, so the least-squares problem is the same as on ΔM: M0 is one
    number per voxel. Since the columns at one (delay, duration) share a model value, the RSS
    splits into Σ n_i (d̄_i − m_i)² over the U distinct timings plus the scatter about each
    mean d̄_i, which does not depend on the parameters; the fit runs on the (V, U) means with
    weights n_i (exact, and N/U times cheaper).

    *Start*: for every ATT on a grid from the lower ATT bound to the latest time at which any
    delay sees signal (step ``att_step``), CBF has a closed-form least-squares value; the
    grid point with the smallest RSS is the start (with ``arterial``, the same over an
    (ATT, aBAT) grid with CBF and aBV ≥ 0 solved jointly). *Refinement*: Levenberg-Marquardt
    on (CBF, ATT[, aBV, aBAT]) with per-voxel damping, steps projected onto the bounds.

    ATT is only determined when at least one delay catches the bolus still arriving
    (τ + PLD < Δt + τ, i.e. PLD < ATT for PCASL): with T1' = T1b the signal after full
    arrival does not depend on ATT. An ATT below the shortest PLD therefore gives a zero ATT
    column: the voxel is flagged :data:`FAIL_SINGULAR` (or ends at the lower bound,
    :data:`FAIL_AT_BOUNDS`), and its CBF is still the consensus CBF of the delays.

    *ATT prior*: with ``att_prior`` the grid picks the point of smallest penalised cost and
    LM treats the prior as one more residual, s/SD (mean − ATT). s² is the residual variance
    of the least-squares fit when the prior is a function of it (so noise-free voxels, s² =
    0, are unaffected), and of the grid's least-squares point for a given (mean, SD) (an
    upper bound, within ~1 % for noisy data). The singular test below still uses the data's JᵀJ
    alone, so a voxel whose ATT only the prior determines stays flagged; where the prior
    cannot make the problem regular (s² = 0, a zero CBF column, aBV and aBAT trading against
    each other) the errors are NaN as without it.

    A voxel is ``failed`` when its input is not finite or M0 ≤ 0, the fit did not converge,
    CBF or ATT ends within 10⁻⁶ of the bound range of a bound (for the arterial fit also aBAT,
    and aBV at its upper bound), JᵀJ is singular (reciprocal condition number of its
    correlation matrix < 10⁻¹⁰, or a zero column), or a result is not finite. A voxel
    without signal (pure noise) has CBF ≈ 0 and hence an ATT that moves the model very
    little; it typically ends on an ATT bound or with a singular JᵀJ and is flagged, but not
    always (a noise pattern can mimic a small curve), see ``tests/test_kinetic.py``.

    With ``arterial``, aBV = 0 (its lower bound) means no arterial signal was found; aBAT is
    then undetermined, reported as NaN with the :data:`NO_ARTERIAL` bit, which does not set
    ``failed``: the tissue parameters and their errors (from the (CBF, ATT) block) stand.
    Without priors (BASIL uses an automatic-relevance prior on aBV) the two extra parameters
    also fit noise: on noisy tissue-only data most voxels end with a small aBV > 0 and a CBF
    several times more variable than the tissue-only fit's (SD 4.7 vs 0.95 mL/100 g/min for
    CBF 60, ATT 1.2 s, 6 PLDs × 8, noise 0.05 % of M0). Fit the arterial component where
    macrovascular signal is expected, or compare with the tissue-only fit.
    """
    pulsed = _check_type(asl_type)
    deltam, m0, delay, duration = _check_data(deltam, m0, plds, labeling_duration)
    n_par = _n_parameters(deltam.shape[1], arterial, arterial_dispersion)
    if att_prior is not None and not callable(att_prior):
        att_prior = _as_prior(att_prior, deltam.shape[0])
    setup = _set_up_fit(
        deltam,
        m0,
        delay,
        duration,
        [cbf_bounds, att_bounds, abv_bounds, abat_bounds][:n_par],
        pulsed=pulsed,
        t1b=t1_blood,
        t1p=t1_blood if t1_tissue is None else t1_tissue,
        alpha=labeling_efficiency,
        lam=partition_coefficient,
        sigma=arterial_dispersion,
        delay_offset=delay_offset,
        att_step=att_step,
    )
    solver = {"max_iter": max_iter, "xtol": xtol, "ftol": ftol}
    if not callable(att_prior):
        return _solve(setup, att_prior, **solver)[0]
    # Empirical Bayes: least squares first, the prior from its ATTs, then the fit with it
    # (with the least-squares residual variance: exact, where the grid's is an upper bound).
    least_squares, noise = _solve(setup, None, **solver)
    prior = att_prior(least_squares)
    if prior is None:
        return least_squares
    return _solve(setup, _as_prior(prior, setup.n_vox), noise, **solver)[0]


# --------------------------------------------------------------------------------------------
# Weighted delay
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class WeightedDelay:
    """Result of :func:`weighted_delay_att` (arrays (V,)).

    Attributes
    ----------
    att
        ATT (s) read off the model's weighted-delay curve; clipped to ``att_range`` when the
        weighted delay falls outside the curve's range, NaN where it is undefined.
    weighted_delay
        WD = Σ w_i ΔM̄_i / Σ ΔM̄_i (s).
    in_range
        The weighted delay was defined (Σ ΔM̄_i > 0) and inside the curve's range.
    att_range
        (lowest, highest) ATT the weighted delay can resolve for these delays.
    """

    att: NDArray[np.float64]
    weighted_delay: NDArray[np.float64]
    in_range: NDArray[np.bool_]
    att_range: tuple[float, float]


def weighted_delay_att(
    deltam: ArrayLike,
    plds: ArrayLike,
    labeling_duration: ArrayLike,
    *,
    asl_type: str = "PCASL",
    t1_blood: float,
    t1_tissue: float | None = None,
    att_max: float = 5.0,
    resolution: float = 1e-3,
) -> WeightedDelay:
    """ATT from the weighted delay of multi-delay ΔM (Dai et al. 2012).

    The weighted delay WD = Σ_i w_i ΔM̄_i / Σ_i ΔM̄_i, with w_i the distinct delays (PLD; TI
    for PASL) and ΔM̄_i the mean ΔM of the columns at delay i (so unequal repeats do not
    change the weights), does not depend on CBF, M0 or α in the model, only on ATT. It
    increases monotonically with ATT once ATT exceeds the shortest delay, so ATT is read off
    a table of the model's WD on an ATT grid (``resolution`` s) by linear interpolation.

    Parameters
    ----------
    deltam
        (V, N) ΔM (any scale: M0 cancels).
    plds, labeling_duration
        (N,) timing of each column as in :func:`fit_multidelay`; the labeling/bolus duration
        must be the same for every column of a given delay.
    asl_type, t1_blood, t1_tissue
        Model, see :func:`tissue_signal`.
    att_max
        Largest ATT tabulated (s).
    resolution
        ATT grid step of the table (s).

    Returns
    -------
    WeightedDelay

    Notes
    -----
    With T1' = T1b the model's WD is flat for ATT below the shortest delay (all delays see the
    complete bolus), so ATT cannot be resolved there and is reported as the lower end of
    ``att_range``. The table stops where WD stops increasing (late ATTs for which even the
    longest delay sees no label).
    """
    pulsed = _check_type(asl_type)
    deltam = np.asarray(deltam, dtype=np.float64)
    n_vol = deltam.shape[1]
    delay = np.broadcast_to(np.asarray(plds, dtype=np.float64), (n_vol,))
    duration = np.broadcast_to(np.asarray(labeling_duration, dtype=np.float64), (n_vol,))
    uniq_delay, uniq_tau, column, counts = _group_timings(delay, duration)
    if np.unique(uniq_delay).size != uniq_delay.size:
        raise ValueError("weighted delay needs one labeling duration per delay")
    onehot = np.zeros((n_vol, uniq_delay.size))
    onehot[np.arange(n_vol), column] = 1.0
    mean = (deltam @ onehot) / counts
    total = mean.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        wd = (mean @ uniq_delay) / total

    grid = np.arange(0.0, att_max + 0.5 * resolution, resolution)
    t = _time(uniq_delay, uniq_tau, pulsed)
    shape, _ = _tissue(
        grid[:, None],
        t,
        uniq_tau,
        pulsed=pulsed,
        t1b=t1_blood,
        t1p=t1_blood if t1_tissue is None else t1_tissue,
        derivative=False,
    )
    norm = shape.sum(axis=1)
    keep = norm > 0
    table = (shape[keep] @ uniq_delay) / norm[keep]
    grid = grid[keep]
    # The strictly increasing stretch: from where WD leaves its flat start to its maximum.
    rising = np.flatnonzero(np.diff(table) > 1e-12 * np.abs(table[:-1]).max())
    first, last = rising[0], min(rising[-1] + 1, int(np.argmax(table)))
    table, grid = table[first : last + 1], grid[first : last + 1]
    att = np.interp(wd, table, grid)
    defined = np.isfinite(wd) & (total > 0)
    att = np.where(defined, att, np.nan)
    # A WD at either end of the table is what every ATT beyond that end gives: ambiguous.
    margin = 1e-9 * (uniq_delay.max() - uniq_delay.min())  # rounding of the two WD sums
    in_range = defined & (wd > table[0] + margin) & (wd < table[-1] - margin)
    return WeightedDelay(
        att=att,
        weighted_delay=wd,
        in_range=in_range,
        att_range=(float(grid[0]), float(grid[-1])),
    )


def cbf_at_fixed_att(
    deltam: ArrayLike,
    m0: ArrayLike,
    att: ArrayLike,
    plds: ArrayLike,
    labeling_duration: ArrayLike,
    *,
    asl_type: str,
    t1_blood: float,
    labeling_efficiency: float,
    partition_coefficient: float = 0.9,
    delay_offset: ArrayLike | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """CBF and its standard error at a known ATT (e.g. from :func:`weighted_delay_att`).

    CBF enters the model linearly: with s_i the signal of CBF = 1 at each volume,
    CBF = Σ s_i ΔM_i / Σ s_i² (least squares) and se = sqrt(RSS / (N − 1) / Σ s_i²).

    Parameters
    ----------
    deltam : (V, N)
    m0, att : (V,)
    plds, labeling_duration : (N,)
        Per-volume delay (PLD, or TI for PASL) and labeling/bolus duration.
    delay_offset : (V,), optional
        Extra delay per voxel (2D readouts: the slice's acquisition time).
    """
    deltam = np.asarray(deltam, dtype=np.float64)
    att = np.asarray(att, dtype=np.float64)
    delay = np.asarray(plds, dtype=np.float64)
    if delay_offset is not None:
        delay = delay[np.newaxis, :] + np.asarray(delay_offset, dtype=np.float64)[:, np.newaxis]
    unit = tissue_signal(
        np.ones_like(att),
        att,
        delay,
        np.asarray(labeling_duration, dtype=np.float64),
        asl_type=asl_type,
        t1_blood=t1_blood,
        labeling_efficiency=labeling_efficiency,
        partition_coefficient=partition_coefficient,
        m0=np.asarray(m0, dtype=np.float64),
    )
    energy = (unit**2).sum(axis=1)
    valid = np.isfinite(energy) & (energy > 0) & np.isfinite(deltam).all(axis=1)
    cbf = np.full(deltam.shape[0], np.nan)
    se = np.full(deltam.shape[0], np.nan)
    cbf[valid] = (unit[valid] * deltam[valid]).sum(axis=1) / energy[valid]
    dof = max(deltam.shape[1] - 1, 1)
    rss = ((deltam[valid] - cbf[valid, np.newaxis] * unit[valid]) ** 2).sum(axis=1)
    se[valid] = np.sqrt(rss / dof / energy[valid])
    return cbf, se


def fit_with_arterial_selection(
    deltam: ArrayLike,
    m0: ArrayLike,
    plds: ArrayLike,
    labeling_duration: ArrayLike,
    *,
    p_value: float = 0.05,
    **options,
) -> tuple[FitResult, NDArray[np.bool_]]:
    """Fit with and without the arterial component; keep it only where the data support it.

    Without a prior, the two arterial parameters fit noise in voxels that have no
    macrovascular signal and trade against CBF (on synthetic tissue-only data, grey-matter CBF
    rose by ~50 %). BASIL shrinks aBV with an automatic-relevance-determination prior (Chappell
    et al. 2010); here the nested models are compared voxel by voxel with the extra-sum-of-
    squares F-test: F = ((RSS_tissue − RSS_full) / 2) / (RSS_full / (N − 4)), and the arterial
    fit is kept where F exceeds the (1 − ``p_value``) quantile of F(2, N − 4) and it did not
    fail. Elsewhere the tissue-only result is used, with aBV = 0 and aBAT undefined.

    Returns
    -------
    (FitResult, ndarray of bool)
        The merged result (``abv``/``abat`` always set) and where the arterial model was kept.
    """
    from scipy.stats import f as f_distribution

    tissue = fit_multidelay(deltam, m0, plds, labeling_duration, arterial=False, **options)
    if callable(options.get("att_prior")):
        # One prior for both models, from the tissue-only least-squares ATTs.
        options = {**options, "att_prior": tissue.att_prior}
    full = fit_multidelay(deltam, m0, plds, labeling_duration, arterial=True, **options)
    n = np.asarray(deltam).shape[1]
    if n <= 4:  # no residual degrees of freedom for the test
        keep = np.zeros(tissue.cbf.shape, dtype=bool)
    else:
        rss_tissue, rss_full = tissue.rmse**2 * n, full.rmse**2 * n
        with np.errstate(divide="ignore", invalid="ignore"):
            statistic = ((rss_tissue - rss_full) / 2.0) / (rss_full / (n - 4))
        critical = f_distribution.ppf(1.0 - p_value, 2, n - 4)
        keep = (statistic > critical) & ~full.failed & np.isfinite(statistic)
    nan = np.full(tissue.cbf.shape, np.nan)

    def pick(name: str, fallback: NDArray) -> NDArray:
        return np.where(keep, getattr(full, name), fallback)

    merged = FitResult(
        cbf=pick("cbf", tissue.cbf),
        att=pick("att", tissue.att),
        cbf_se=pick("cbf_se", tissue.cbf_se),
        att_se=pick("att_se", tissue.att_se),
        abv=pick("abv", np.zeros_like(nan)),
        abat=pick("abat", nan),
        abv_se=pick("abv_se", nan),
        abat_se=pick("abat_se", nan),
        rmse=pick("rmse", tissue.rmse),
        r2=pick("r2", tissue.r2),
        failed=np.where(keep, full.failed, tissue.failed),
        reason=np.where(keep, full.reason, tissue.reason).astype(np.uint8),
        n_iter=np.where(keep, full.n_iter, tissue.n_iter).astype(np.int32),
        att_prior=tissue.att_prior,
    )
    return merged, keep


#: Smallest SD of an ATT prior from :func:`local_att_prior` (s).
ATT_PRIOR_MIN_SD = 0.1


#: FWHM (mm) of the neighbourhood :func:`local_att_prior` draws each voxel's prior from.
ATT_PRIOR_FWHM = 8.0


def local_att_prior(
    att: ArrayLike,
    mask: ArrayLike,
    zooms: Sequence[float],
    fwhm_mm: float = ATT_PRIOR_FWHM,
    min_sd: float = ATT_PRIOR_MIN_SD,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """A local empirical-Bayes ATT prior from least-squares ATTs: mean and SD per voxel.

    Arterial transit time varies smoothly within a vascular territory and changes between
    territories, so the voxels around a voxel say more about its ATT than the whole brain
    does. The prior's mean at a voxel is the Gaussian-weighted mean (FWHM ``fwhm_mm``) of the
    least-squares ATTs of the *other* voxels around it, and its SD the root of the equally
    weighted mean of their squared residuals (each one's ATT minus its own local mean), at
    least ``min_sd``: normalized convolutions over the voxels that have an ATT, leaving the
    voxel itself out (its own estimate must not count as prior evidence; with it in, an
    isolated voxel's prior was its own ATT with the floor SD, and its posterior SD 0.1 s
    whatever its data). The SD is the spread of the *estimates* (true spread plus fit noise),
    so the prior is wider than the spread of true ATTs: where territories meet, or a voxel's
    neighbours disagree, it is weak. Every fitted voxel counts, flagged ones included: voxels
    that ended on the upper ATT bound are the evidence of long transit times. A voxel with no
    neighbour in reach gets no prior (SD infinite).

    Why local: one prior for the whole brain (the median and robust SD of all least-squares
    ATTs) pulls anything whose ATT differs from the median toward it. On the benchmark's
    phantom (``benchmarks/bench_multidelay.py``: a territory of 20 % of the voxels with ATT
    1.6-1.9 s amid 0.8-1.3 s, delays up to 1.5 s) it made the territory's CBF 29 % low
    (least squares +2.6 %); the local prior (8 mm FWHM on 3.5 mm voxels) gave −3.7 %, with a
    lower CBF RMSE than least squares both there and elsewhere. In a separate simulation,
    wider kernels (Gaussian SD of 2 and 3 voxels instead of 1) biased such a territory more
    (−3.5 % and −5.0 % instead of −1.9 %). Where neighbouring voxels carry no spatial
    information (each ATT independent), the local prior behaves like one for the population:
    on a simulated 70/30 grey/white mixture laid out at random, white-matter CBF came out
    9 % low (least squares: 12 % high).

    Parameters
    ----------
    att
        (V,) least-squares ATT (s) of the voxels of ``mask`` in C order (``volume[mask]``, as
        fitted), NaN where there is none (not fitted).
    mask
        3D mask of the fitted voxels (e.g. the brain mask).
    zooms
        Voxel sizes (mm).
    fwhm_mm, min_sd
        Neighbourhood size and the smallest prior SD (s).

    Returns
    -------
    (mean, sd)
        (V,) prior mean and SD (s) of each voxel; 0 and inf where no neighbour has an ATT.
        A function of the least-squares fit returning these is ``fit_multidelay``'s
        ``att_prior``: ``lambda fit: local_att_prior(fit.att, mask, zooms)``.
    """
    mask = np.asarray(mask, dtype=bool)
    volume = np.full(mask.shape, np.nan)
    volume[mask] = np.asarray(att, dtype=np.float64)
    have = (mask & np.isfinite(volume)).astype(np.float64)
    values = np.where(have > 0, volume, 0.0)
    sigma = voxel_sigma(fwhm_mm, zooms)

    def smooth(image: NDArray) -> NDArray:
        return ndimage.gaussian_filter(image, sigma, mode="constant")

    # The kernel's weight at offset 0 (a single voxel smoothed with zeros around it): each
    # voxel's own share of its smoothed sums, taken out again below.
    own = float(smooth(np.ones((1,) * mask.ndim)).item())
    others = smooth(have) - own * have  # the neighbours' total weight
    reach = mask & (others > 1e-6)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(reach, (smooth(values) - own * values) / others, 0.0)
        residual2 = np.where(reach & (have > 0), (values - mean) ** 2, 0.0)
        variance = (smooth(residual2) - own * residual2) / others
    sd = np.where(reach, np.maximum(np.sqrt(np.maximum(variance, 0.0)), min_sd), np.inf)
    return mean[mask], sd[mask]


#: How far beyond the longest delay ATT may go (s), see :func:`att_upper_bound`.
ATT_MARGIN = 0.5


def att_upper_bound(delays: ArrayLike, asl_type: str, ceiling: float = ATT_BOUNDS[1]) -> float:
    """Largest ATT (s) a multi-delay design can tell apart from CBF.

    Past the longest delay (PLD for (P)CASL, TI for PASL) only a sliver of the bolus has
    arrived by the last image: ATT and CBF then trade against each other and CBF takes
    absurd values (on the benchmark's 6-PLD design at 0.5 % noise, allowing ATT up to 2.9 s
    gave a CBF RMSE of 25 mL/100 g/min; capping it at the longest PLD + 0.5 s gave 9.7). The
    fit is therefore bounded at the longest delay + :data:`ATT_MARGIN`; voxels that end on the
    bound are flagged (:data:`FAIL_AT_BOUNDS`), which is the honest answer for them.
    """
    _check_type(asl_type)
    return float(min(ceiling, np.max(np.asarray(delays, dtype=np.float64)) + ATT_MARGIN))
