"""Validation of one ASL run's files and metadata into an :class:`AslRun`.

One small reader per concern (images, labeling, timing, bolus cut-off, background
suppression, readout, volume selection, M0, reference-region echo), each raising one-line
errors that name the file and the field. :func:`validate_run` calls them in a fixed order, so
the first problem of a run is always the one reported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aslprep_lite.bids.asl_run import LABELED_TYPES, AslRun
from aslprep_lite.bids.files import (
    SidecarFields,
    asl_prefix,
    bids_uri,
    image_shape,
    read_aslcontext,
    sidecar_of,
)
from aslprep_lite.errors import AslprepError
from aslprep_lite.quant import constants
from aslprep_lite.quant.deltam import Subtraction, plan_subtraction

LOGGER = logging.getLogger("aslprep_lite")

ASL_TYPES = ("PCASL", "CASL", "PASL")
M0_TYPES = ("Separate", "Included", "Estimate", "Absent")
BOLUS_TECHNIQUES = ("QUIPSS", "QUIPSSII", "Q2TIPS")
#: A delay above this many seconds is almost certainly in milliseconds.
MAX_PLAUSIBLE_DELAY_S = 30.0


@dataclass
class _Notes:
    """What validation tells the user about a run: warnings, and values it filled in."""

    warnings: list[str] = field(default_factory=list)
    assumed: list[dict] = field(default_factory=list)

    def assume(self, name: str, value, reason: str, *, warn: str | None = None) -> None:
        """Record a value the pipeline fills in (sidecar ``AssumedMetadata``), and warn."""
        self.assumed.append({"Field": name, "Value": value, "Reason": reason})
        if warn:
            self.warnings.append(warn)


@dataclass
class _M0:
    """The M0 of a run as validation found it."""

    file: Path | None = None
    repetition_time: float | None = None
    estimate: float | None = None


def validate_run(
    layout,
    asl_file: Path,
    bids_dir: Path,
    *,
    dummy_scans: int = 0,
    find_m0,
    check_images: bool = True,
    m0_calibration: str = "voxel",
) -> AslRun:
    """Validate one ASL run's files and metadata.

    Parameters
    ----------
    layout
        The dataset's pybids layout (entities and inherited metadata).
    asl_file, bids_dir
        The run's ``_asl.nii[.gz]`` and the dataset root.
    dummy_scans
        Volumes dropped from the start of the series before pairing.
    check_images
        Read NIfTI headers (off for ``--dry-run`` on metadata-only datasets).
    m0_calibration
        ``voxel``, ``csf`` or ``wm``: reference-region calibration needs the M0's echo time.
    find_m0
        ``find_m0(asl_file) -> Path | None``: the run's separate M0 scan (discovery).

    Raises
    ------
    AslprepError
        The first problem found, in one line naming the file and the field.
    """
    entities = layout.parse_file_entities(str(asl_file))
    sidecar = sidecar_of(asl_file)
    aslcontext_file = Path(str(asl_file)[: str(asl_file).rindex("_asl.nii")] + "_aslcontext.tsv")
    context_all = read_aslcontext(aslcontext_file)
    metadata = dict(layout.get_metadata(str(asl_file)))
    if not metadata:
        raise AslprepError(
            "no sidecar metadata found: every ASL run needs an _asl.json", path=str(sidecar)
        )
    fields = SidecarFields(metadata, sidecar)
    notes = _Notes()

    shape = _read_image(asl_file, aslcontext_file, len(context_all)) if check_images else None
    asl_type, m0_type, field_strength = _read_labeling(fields)
    pld_all, tr_all, ld_all = _read_timing(fields, asl_type, context_all)
    bolus_technique, bolus_delay = _read_bolus_cutoff(fields, asl_type, notes)
    background_suppression, bs_pulses, efficiency = _read_background_suppression(
        fields, asl_type, notes
    )
    acquisition, slice_timing, slice_axis = _read_readout(fields, tr_all, shape, notes)

    context, subtraction = _select_volumes(context_all, dummy_scans, asl_file, aslcontext_file)
    if subtraction.unpaired:
        notes.warnings.append(_unpaired_note(context, subtraction, dummy_scans))
    keep = slice(dummy_scans, None)
    pld = pld_all[keep]
    labeling_duration = ld_all[keep] if ld_all is not None else None
    repetition_time = tr_all[keep]
    _check_pair_timing(fields, subtraction, dummy_scans, pld, labeling_duration)
    labeled = {p for p, kind in zip(pld, context, strict=True) if kind in LABELED_TYPES}
    _check_bolus_against_delays(fields, bolus_technique, bolus_delay, labeled)
    quality = _short_delay_warnings(asl_type, labeled) if subtraction.n_volumes else []

    m0 = _M0()
    if subtraction.n_volumes:
        m0 = _read_m0(
            fields,
            m0_type,
            context,
            repetition_time,
            background_suppression,
            m0_file=find_m0(asl_file) if m0_type == "Separate" else None,
            check_images=check_images,
            notes=notes,
        )
    else:
        notes.warnings.append("cbf volumes only: they are passed through, no M0 is used")

    echo_time, spin_echo = 0.0, False
    if m0_calibration != "voxel" and subtraction.n_volumes:
        echo_time, spin_echo = _read_reference_echo(
            fields, m0_type, m0.file, m0_calibration, notes
        )
    sources = [asl_file, aslcontext_file] + ([m0.file] if m0.file else [])
    session = entities.get("session")
    run = AslRun(
        asl_file=str(asl_file),
        aslcontext_file=str(aslcontext_file),
        sidecar_file=str(sidecar),
        prefix=asl_prefix(asl_file),
        subject=str(entities["subject"]),
        session=str(session) if session is not None else None,
        out_dir=os.path.relpath(asl_file.parent, bids_dir),
        context=context,
        n_source_volumes=len(context_all),
        dummy_scans=dummy_scans,
        asl_type=asl_type,
        m0_type=m0_type,
        field_strength=field_strength,
        background_suppression=background_suppression,
        bs_pulses=bs_pulses,
        post_labeling_delay=pld,
        labeling_duration=labeling_duration,
        repetition_time=repetition_time,
        labeling_efficiency=efficiency,
        bolus_cutoff_technique=bolus_technique,
        bolus_cutoff_delay=bolus_delay,
        mr_acquisition_type=acquisition,
        slice_timing=slice_timing,
        slice_axis=slice_axis,
        m0_file=str(m0.file) if m0.file else None,
        m0_repetition_time=m0.repetition_time,
        m0_estimate=m0.estimate,
        source_files=[bids_uri(p, bids_dir) for p in sources],
        warnings=notes.warnings,
        assumed_metadata=notes.assumed,
        quality_warnings=quality,
        echo_time=echo_time,
        spin_echo=spin_echo,
        unpaired_volumes=[i + dummy_scans for i in subtraction.unpaired],
    )
    for message in notes.warnings:
        LOGGER.warning("%s: %s", sidecar, message)
    return run


def _read_image(asl_file: Path, aslcontext_file: Path, n_volumes: int) -> tuple[int, ...]:
    """The series' shape: 4D, with as many volumes as the aslcontext lists."""
    shape = image_shape(asl_file)
    if len(shape) != 4:
        raise AslprepError(
            f"is a {len(shape)}D image; an ASL series must be 4D (x, y, z, volumes)",
            path=str(asl_file),
        )
    if shape[3] != n_volumes:
        raise AslprepError(
            f"has {shape[3]} volumes but {aslcontext_file.name} lists {n_volumes}",
            path=str(asl_file),
        )
    return shape


def _read_labeling(fields: SidecarFields) -> tuple[str, str, float]:
    """Labeling scheme, M0Type and a field strength blood T1 is known for."""
    asl_type = fields.string("ArterialSpinLabelingType", ASL_TYPES)
    m0_type = fields.string("M0Type", M0_TYPES)
    field_strength = fields.number("MagneticFieldStrength")
    if field_strength <= 0:
        raise fields.error("MagneticFieldStrength", f"must be > 0 T, not {field_strength:g}")
    try:
        constants.blood_t1(field_strength)
    except ValueError as err:
        raise fields.error("MagneticFieldStrength", str(err)) from None
    return asl_type, m0_type, field_strength


def _check_delays(
    fields: SidecarFields, key: str, values: Sequence[float], context: Sequence[str]
) -> None:
    """Delays in seconds: never negative, never plausible only as milliseconds."""
    labeled = [v for v, kind in zip(values, context, strict=True) if kind in LABELED_TYPES]
    if any(v < 0 for v in values):
        raise fields.error(key, f"is negative ({min(values):g}): delays are times in seconds")
    if any(v > MAX_PLAUSIBLE_DELAY_S for v in values):
        raise fields.error(
            key,
            f"is {max(values):g}, implausible in seconds: BIDS times are in seconds "
            f"(did you mean {max(values) / 1000:g} s?)",
        )
    if labeled and min(labeled) == 0:
        raise fields.error(key, "is 0 for a labeled volume: no labeled blood can be imaged")


def _read_timing(
    fields: SidecarFields, asl_type: str, context: Sequence[str]
) -> tuple[list[float], list[float], list[float] | None]:
    """Per-volume PLD (TI), repetition time and, for (P)CASL, labeling duration."""
    n_volumes = len(context)
    pld = fields.per_volume("PostLabelingDelay", n_volumes)
    _check_delays(fields, "PostLabelingDelay", pld, context)
    tr = fields.per_volume("RepetitionTimePreparation", n_volumes)
    if any(t <= 0 for t in tr):
        raise fields.error(
            "RepetitionTimePreparation",
            f"is {min(tr):g}: it must be > 0 s (a zero TR would quantify to nonsense)",
        )
    if any(t > 100 for t in tr):
        raise fields.error(
            "RepetitionTimePreparation",
            f"is {max(tr):g}, implausible in seconds (milliseconds?)",
        )
    duration = None
    if asl_type in ("PCASL", "CASL"):
        duration = fields.per_volume("LabelingDuration", n_volumes, why=f" for {asl_type}")
        _check_delays(fields, "LabelingDuration", duration, context)
    return pld, tr, duration


def _read_bolus_cutoff(
    fields: SidecarFields, asl_type: str, notes: _Notes
) -> tuple[str | None, list[float] | None]:
    """PASL: the bolus cut-off technique and its delay time(s) (TI1, or [TI1, TI1s]).

    Q2TIPS with one value: Siemens DICOMs do not store TI1s (the end of the saturation train)
    and the CBF model needs only TI1, so the one value is taken as TI1, and said so.
    """
    if asl_type != "PASL":
        return None, None
    if not fields.boolean("BolusCutOffFlag", why=" for PASL"):
        raise fields.error(
            "BolusCutOffFlag",
            "is false: PASL without a bolus cut-off (QUIPSS, QUIPSS II, Q2TIPS) has no "
            "known bolus duration and cannot be quantified with the single-compartment model",
        )
    technique = fields.string("BolusCutOffTechnique", BOLUS_TECHNIQUES)
    raw = fields.required("BolusCutOffDelayTime", " when BolusCutOffFlag is true")
    delay = [
        fields.number("BolusCutOffDelayTime", v) for v in (raw if isinstance(raw, list) else [raw])
    ]
    expected = 2 if technique == "Q2TIPS" else 1
    if technique == "Q2TIPS" and len(delay) == 1:
        notes.assume(
            "BolusCutOffDelayTime",
            delay,
            "Q2TIPS with one value: taken as TI1, the bolus duration the CBF model uses; TI1s "
            "(the end of the saturation train, not stored in Siemens DICOMs) is not needed",
            warn="BolusCutOffDelayTime has one value for Q2TIPS: used as TI1 (the bolus "
            "duration); give [TI1, TI1s] to silence this",
        )
        expected = 1
    if len(delay) != expected:
        raise fields.error(
            "BolusCutOffDelayTime",
            f"has {len(delay)} value(s); {technique} needs {expected}"
            + (" ([TI1, TI1s])" if expected == 2 else ""),
        )
    _check_delays(fields, "BolusCutOffDelayTime", delay, ["label"] * len(delay))
    if len(delay) == 2 and not delay[1] > delay[0]:
        raise fields.error(
            "BolusCutOffDelayTime",
            f"is {delay}: Q2TIPS needs [TI1, TI1s] with TI1s after TI1",
        )
    return technique, delay


def _read_background_suppression(
    fields: SidecarFields, asl_type: str, notes: _Notes
) -> tuple[bool, int, float | None]:
    """Background suppression, its pulse count and a labeling efficiency given in the sidecar.

    Without LabelingEfficiency the consensus value for the labeling type is used, times 0.95
    per background-suppression pulse; without the pulse count one pulse is assumed. Both are
    recorded as assumed values, the second also as a warning.
    """
    enabled = fields.boolean("BackgroundSuppression")
    pulses = 0
    efficiency = None
    if fields.has("LabelingEfficiency"):
        efficiency = fields.number("LabelingEfficiency")
        # Consensus values are 0.68-0.98; below 0.3 is a typo, not a labeling scheme.
        if not 0.3 <= efficiency <= 1:
            raise fields.error(
                "LabelingEfficiency", f"is {efficiency:g}; it must be a fraction in [0.3, 1]"
            )
    if efficiency is None:
        default = constants.labeling_efficiency(asl_type)
        notes.assume(
            "LabelingEfficiency",
            default.value,
            f"not in the sidecar: the {asl_type} consensus value ({default.source}) for the "
            "labeling alone; give LabelingEfficiency to override",
        )
    if enabled:
        if fields.has("BackgroundSuppressionNumberPulses"):
            count = fields.number("BackgroundSuppressionNumberPulses")
            if count < 0 or count != int(count):
                raise fields.error(
                    "BackgroundSuppressionNumberPulses",
                    f"must be a whole number >= 0, not {count:g}",
                )
            pulses = int(count)
        elif efficiency is None:
            pulses = 1
            per_pulse = constants.scalar("background_suppression_pulse_efficiency").value
            notes.assume(
                "BackgroundSuppressionNumberPulses",
                1,
                "BackgroundSuppression is true but the pulse count is missing: one inversion "
                f"pulse assumed, so the labeling efficiency is multiplied by {per_pulse:g} "
                "(Garcia et al. 2005); give BackgroundSuppressionNumberPulses or "
                "LabelingEfficiency to override",
                warn="BackgroundSuppressionNumberPulses missing: assuming 1 pulse for the "
                "labeling efficiency; add the field or LabelingEfficiency",
            )
        else:
            notes.assume(
                "BackgroundSuppressionNumberPulses",
                None,
                "not in the sidecar; LabelingEfficiency is given and taken to include the "
                "losses of the background-suppression pulses",
            )
    return enabled, pulses, efficiency


def _read_readout(
    fields: SidecarFields,
    repetition_time: Sequence[float],
    shape: tuple[int, ...] | None,
    notes: _Notes,
) -> tuple[str, list[float] | None, int]:
    """Acquisition type and, for 2D readouts, the slice times in array order and their axis."""
    if not fields.has("MRAcquisitionType"):
        notes.assume(
            "MRAcquisitionType",
            "3D",
            "not in the sidecar: every slice taken as imaged at the same delay; give "
            "MRAcquisitionType 2D and SliceTiming for per-slice delays",
        )
    acquisition = str(fields.metadata.get("MRAcquisitionType", "3D"))
    if acquisition != "2D":
        return acquisition, None, 2
    timing = fields.required("SliceTiming", " for 2D acquisitions (MRAcquisitionType 2D)")
    if not isinstance(timing, list) or not timing:
        raise fields.error("SliceTiming", "must be an array of one time per slice")
    slice_timing = [fields.number("SliceTiming", v) for v in timing]
    if min(slice_timing) < 0 or max(slice_timing) > max(repetition_time):
        raise fields.error("SliceTiming", "values must lie between 0 and the repetition time")
    if not fields.has("SliceEncodingDirection"):
        notes.assume(
            "SliceEncodingDirection",
            "k",
            "not in the sidecar: slices taken along the third image axis, SliceTiming in "
            "array order (the BIDS default)",
        )
    direction = str(fields.metadata.get("SliceEncodingDirection", "k"))
    if direction.rstrip("-") not in ("i", "j", "k"):
        raise fields.error("SliceEncodingDirection", f"is {direction!r}; use i, j or k")
    axis = "ijk".index(direction.rstrip("-"))
    if direction.endswith("-"):
        # BIDS: with a negative direction the first entry is the slice with the largest
        # index; the run keeps one entry per array index, in array order.
        slice_timing = slice_timing[::-1]
    if shape is not None and len(slice_timing) != shape[axis]:
        raise fields.error(
            "SliceTiming",
            f"has {len(slice_timing)} values but the image has {shape[axis]} slices",
        )
    return acquisition, slice_timing, axis


def _select_volumes(
    context_all: list[str], dummy_scans: int, asl_file: Path, aslcontext_file: Path
) -> tuple[list[str], Subtraction]:
    """Drop the non-steady-state volumes, then pair controls with labels.

    Volumes that find no partner are left out (see :func:`plan_subtraction`); only a series
    with nothing to quantify is refused.
    """
    n_all = len(context_all)
    if dummy_scans < 0 or dummy_scans >= n_all:
        raise AslprepError(
            f"--dummy-scans {dummy_scans} leaves no volumes (the series has {n_all})",
            path=str(asl_file),
        )
    context = context_all[dummy_scans:]
    subtraction = plan_subtraction(context)
    if subtraction.n_volumes == 0 and "cbf" not in context:
        raise AslprepError(
            "no control/label pairs, no deltam and no cbf volumes: nothing to quantify"
            + (f" after dropping {dummy_scans} dummy scans" if dummy_scans else ""),
            path=str(aslcontext_file),
        )
    return context, subtraction


def _unpaired_note(context: Sequence[str], subtraction: Subtraction, dummy_scans: int) -> str:
    """Why and which volumes were left out, for the log, the plan and the sidecar."""
    counts = {kind: sum(k == kind for k in context) for kind in ("control", "label")}
    listed = ", ".join(f"{i + dummy_scans} ({context[i]})" for i in subtraction.unpaired)
    return (
        f"volume(s) {listed} left out, unpaired: {counts['control']} control and "
        f"{counts['label']} label volumes; the others were paired in acquisition order "
        "(volume indices from 0)"
    )


def _check_pair_timing(
    fields: SidecarFields,
    subtraction: Subtraction,
    dummy_scans: int,
    pld: Sequence[float],
    duration: Sequence[float] | None,
) -> None:
    """A control and its label are one measurement: they must share their timing."""
    for key, values in (("PostLabelingDelay", pld), ("LabelingDuration", duration)):
        if values is None:
            continue
        for c, lab in zip(subtraction.control, subtraction.label, strict=True):
            if lab >= 0 and values[c] != values[lab]:
                raise fields.error(
                    key,
                    f"differs within a control/label pair (volumes {min(c, lab) + dummy_scans} "
                    f"and {max(c, lab) + dummy_scans}: {values[c]:g} vs {values[lab]:g})",
                )


def _check_bolus_against_delays(
    fields: SidecarFields,
    technique: str | None,
    bolus_delay: list[float] | None,
    labeled: set[float],
) -> None:
    """PASL: the inversion times (of the labeled volumes) must leave room for the cut-off."""
    if technique == "QUIPSS" and len(labeled) > 1:
        raise fields.error(
            "BolusCutOffTechnique",
            "is QUIPSS with several inversion times: its bolus width changes with TI, which the "
            "kinetic model does not describe (QUIPSS II and Q2TIPS are supported)",
        )
    if technique == "QUIPSS" and bolus_delay and min(labeled) <= bolus_delay[0]:
        raise fields.error(
            "BolusCutOffDelayTime",
            "must be shorter than the inversion time (PostLabelingDelay) for QUIPSS",
        )
    if (
        technique in ("QUIPSSII", "Q2TIPS")
        and len(labeled) == 1
        and min(labeled) <= bolus_delay[0]
    ):
        raise fields.error(
            "PostLabelingDelay",
            f"(the inversion time, {min(labeled):g} s) must be longer than "
            f"BolusCutOffDelayTime ({bolus_delay[0]:g} s) for single-delay {technique}",
        )


def _short_delay_warnings(asl_type: str, labeled: set[float]) -> list[str]:
    """Single-delay runs imaged before the label reaches tissue: the map shows vessels.

    ``labeled`` holds the distinct delays of the labeled volumes.
    """
    threshold = constants.scalar("minimum_tissue_delay").value
    if len(labeled) != 1 or min(labeled) >= threshold:
        return []
    delay = "inversion time" if asl_type == "PASL" else "post-labeling delay"
    return [
        f"single-delay CBF at a {delay} of {min(labeled):g} s is not tissue perfusion: arterial "
        "transit takes about 0.7-1.5 s in healthy adults (Alsop et al. 2015), so much of the "
        f"label is still in arteries and the map is dominated by vessels; a delay of at least "
        f"{threshold:g} s (1.8-2 s recommended) or a multi-delay acquisition measures tissue CBF"
    ]


def _read_m0(
    fields: SidecarFields,
    m0_type: str,
    context: Sequence[str],
    repetition_time: Sequence[float],
    background_suppression: bool,
    *,
    m0_file: Path | None,
    check_images: bool,
    notes: _Notes,
) -> _M0:
    """Find and check the M0 for the run's M0Type."""
    if m0_type == "Separate":
        return _separate_m0(fields, m0_file, check_images, notes)
    if m0_type == "Included":
        indices = [i for i, kind in enumerate(context) if kind == "m0scan"]
        if not indices:
            raise fields.error("M0Type", "is Included but the aslcontext has no m0scan volume")
        return _M0(repetition_time=max(repetition_time[i] for i in indices))
    if m0_type == "Estimate":
        estimate = fields.number("M0Estimate", why=" when M0Type is Estimate")
        if estimate <= 0:
            raise fields.error("M0Estimate", f"is {estimate:g}; it must be > 0")
        return _M0(estimate=estimate)
    # Absent: calibrate with the mean control, only valid without background suppression.
    if background_suppression:
        raise fields.error(
            "M0Type",
            "is Absent with BackgroundSuppression true: suppressed control images cannot "
            "stand in for M0; provide an M0 scan or M0Estimate",
        )
    if "control" not in context:
        raise fields.error("M0Type", "is Absent and there are no control volumes to use as M0")
    controls = [repetition_time[i] for i, kind in enumerate(context) if kind == "control"]
    return _M0(repetition_time=max(controls))


def _separate_m0(
    fields: SidecarFields, m0_file: Path | None, check_images: bool, notes: _Notes
) -> _M0:
    """A separate M0 scan: found, with a positive TR, 3D or 4D."""
    if m0_file is None:
        raise fields.error(
            "M0Type",
            "is Separate but no perf/*_m0scan.nii[.gz] has IntendedFor naming this run "
            "or shares its entities: add the M0 or correct M0Type",
        )
    m0_fields = SidecarFields.of_image(m0_file)
    key = (
        "RepetitionTimePreparation"
        if m0_fields.has("RepetitionTimePreparation")
        else "RepetitionTime"
    )
    if not m0_fields.has(key):
        raise m0_fields.error(
            "RepetitionTimePreparation", "is required for the M0 scan but missing"
        )
    m0_tr = m0_fields.first_number(key)
    if m0_tr <= 0:
        raise m0_fields.error(key, f"is {m0_tr:g}: it must be > 0 s")
    if key == "RepetitionTime":
        notes.assume(
            "RepetitionTimePreparation",
            m0_tr,
            f"not in the M0 sidecar ({m0_fields.path}): its RepetitionTime used for the "
            "saturation-recovery correction",
        )
    if check_images:
        shape = image_shape(m0_file)
        if len(shape) not in (3, 4):
            raise AslprepError(f"has shape {shape}; an M0 must be 3D (or 4D)", path=str(m0_file))
    return _M0(file=m0_file, repetition_time=m0_tr)


def _read_reference_echo(
    fields: SidecarFields,
    m0_type: str,
    m0_file: Path | None,
    m0_calibration: str,
    notes: _Notes,
) -> tuple[float, bool]:
    """Reference-region calibration: the M0's echo time and whether the readout is spin echo."""
    if m0_type == "Estimate":
        raise fields.error(
            "M0Type",
            f"is Estimate: --m0-calibration {m0_calibration} needs an M0 image "
            "(Separate, Included or Absent)",
        )
    m0_fields = SidecarFields.of_image(m0_file) if m0_file else fields
    echo_time = 0.0
    if m0_fields.has("EchoTime"):
        echo_time = m0_fields.first_number("EchoTime")
        if not 0 <= echo_time < 1:
            raise m0_fields.error(
                "EchoTime", f"is {echo_time:g}: it must be in seconds, between 0 and 1"
            )
    else:
        notes.assume(
            "EchoTime",
            0.0,
            "not in the M0 sidecar: the reference-region M0 is not corrected for T2 decay",
            warn="EchoTime missing: the reference-region M0 is not corrected for T2 decay",
        )
    if not fields.has("PulseSequenceType"):
        notes.assume(
            "PulseSequenceType",
            None,
            "not in the sidecar: a gradient-echo readout assumed, so the reference region is "
            "corrected with T2* rather than T2",
        )
    sequence = str(fields.metadata.get("PulseSequenceType", "")).lower()
    return echo_time, "grase" in sequence or "spin" in sequence
