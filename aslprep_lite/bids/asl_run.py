"""One validated ASL run: what was acquired, as the workflows need it.

:class:`AslRun` holds facts about the data only (files, volume types, timing, labeling, M0);
the options of a run live in :mod:`aslprep_lite.config`. Workflow factories read the fields
they use from it and hand nodes plain values, never the whole record.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from aslprep_lite.config import QuantificationOptions
from aslprep_lite.quant.motion import MIN_REGISTERED_VOLUMES, estimates_motion

#: Volume types that carry labeled blood, so their PLD and labeling duration matter.
LABELED_TYPES = frozenset({"control", "label", "deltam", "cbf"})
#: Volume types that make ΔM: their delays decide the model (cbf volumes are passed through).
DELTAM_TYPES = frozenset({"control", "label", "deltam"})


@dataclass
class AslRun:
    """Everything known about one ASL run after validation.

    Per-volume arrays (``post_labeling_delay``, ``labeling_duration``, ``repetition_time``)
    have one entry per volume kept (after the dummy scans), aligned with ``context``.
    ``unpaired_volumes`` are control/label volumes left out for want of a partner, numbered
    in the source series. ``assumed_metadata`` lists the values the pipeline filled in
    (``{"Field", "Value", "Reason"}``), written to the CBF sidecars; ``quality_warnings``
    are known before processing (a delay too short for tissue) and join the sidecars'
    ``QualityWarnings``.
    """

    asl_file: str
    aslcontext_file: str
    sidecar_file: str
    prefix: str
    subject: str
    session: str | None
    out_dir: str
    context: list[str]
    n_source_volumes: int
    dummy_scans: int
    asl_type: str
    m0_type: str
    field_strength: float
    background_suppression: bool
    bs_pulses: int
    post_labeling_delay: list[float]
    labeling_duration: list[float] | None
    repetition_time: list[float]
    labeling_efficiency: float | None
    bolus_cutoff_technique: str | None
    bolus_cutoff_delay: list[float] | None
    mr_acquisition_type: str
    slice_timing: list[float] | None
    slice_axis: int
    m0_file: str | None
    m0_repetition_time: float | None
    m0_estimate: float | None
    source_files: list[str]
    warnings: list[str] = field(default_factory=list)
    echo_time: float = 0.0
    spin_echo: bool = False
    unpaired_volumes: list[int] = field(default_factory=list)
    assumed_metadata: list[dict] = field(default_factory=list)
    quality_warnings: list[str] = field(default_factory=list)
    #: The participant's anatomical reference (:func:`~aslprep_lite.bids.anatomy.choose_t1w`),
    #: None when it has no T1w: template outputs then come from the T1w-free mode.
    t1w_file: str | None = None
    #: The T1w images of the participant left unused (several sessions or runs).
    other_t1w: list[str] = field(default_factory=list)

    @property
    def volume_counts(self) -> dict[str, int]:
        """Number of volumes of each type kept for processing."""
        return dict(Counter(self.context))

    @property
    def delays(self) -> list[float]:
        """Distinct post-labeling delays (inversion times for PASL) of the ΔM volumes."""
        return sorted(
            {
                d
                for d, kind in zip(self.post_labeling_delay, self.context, strict=True)
                if kind in DELTAM_TYPES
            }
        )

    @property
    def volumes_per_delay(self) -> dict[str, int]:
        """Volumes making ΔM at each delay."""
        return {
            f"{d:g}": sum(
                1
                for v, kind in zip(self.post_labeling_delay, self.context, strict=True)
                if v == d and kind in DELTAM_TYPES
            )
            for d in self.delays
        }

    @property
    def has_deltam(self) -> bool:
        """The run has ΔM to quantify (pairs or deltam); a cbf-only series needs no M0."""
        return any(kind in ("control", "label", "deltam") for kind in self.context)

    @property
    def is_multidelay(self) -> bool:
        """More than one delay among the ΔM volumes: the kinetic model is fitted."""
        return len(self.delays) > 1

    @property
    def hmc_summary(self) -> str:
        """What head-motion correction will do for this run."""
        if not estimates_motion(self.context):
            return (
                f"skipped: fewer than {MIN_REGISTERED_VOLUMES} control/label volumes to register"
            )
        types = sorted({k for k in self.context if k in ("control", "label", "m0scan", "noRF")})
        return "rigid, estimated per volume type (" + ", ".join(types) + ")"

    def model(self, options: QuantificationOptions) -> str:
        """The quantification model this run uses under ``options``."""
        if self.is_multidelay:
            kind = "multi-TI PASL" if self.asl_type == "PASL" else f"multi-delay {self.asl_type}"
            fitted = (
                "CBF fitted at the weighted-delay arterial transit time (Dai et al. 2012)"
                if options.att_method == "weighted-delay"
                else "fitted for CBF and arterial transit time"
                + (" with a local ATT prior" if options.att_prior == "local" else "")
            )
            return (
                f"{kind}: general kinetic model (Buxton et al. 1998) {fitted} over "
                f"{len(self.delays)} delays"
            )
        if self.asl_type == "PASL":
            return (
                f"single-delay PASL with {self.bolus_cutoff_technique} bolus cut-off "
                "(Alsop et al. 2015, eq. 2)"
            )
        return f"single-delay {self.asl_type} (Alsop et al. 2015, eq. 1)"

    def labeled_value(self, name: str) -> float | list[float] | None:
        """The value(s) of a per-volume field over the labeled volumes (one if all agree)."""
        per_volume = getattr(self, name)
        if per_volume is None:
            return None
        values = sorted(
            {v for v, kind in zip(per_volume, self.context, strict=True) if kind in LABELED_TYPES}
        )
        return values[0] if len(values) == 1 else values
