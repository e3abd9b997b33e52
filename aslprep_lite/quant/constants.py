"""Physical constants from the one table ``aslprep_lite/data/constants.toml``.

Each lookup returns a :class:`Constant` that carries its value, units and source, so that
the quantification sidecar can say, for every number used, where it came from.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any


@dataclass(frozen=True)
class Constant:
    """A value used in quantification, with its provenance."""

    value: float
    units: str
    source: str

    def as_json(self) -> dict[str, Any]:
        """Return the ``{"Value", "Units", "Source"}`` record written to sidecars."""
        return {"Value": self.value, "Units": self.units, "Source": self.source}


@cache
def table() -> dict[str, Any]:
    """Return the parsed constants table."""
    with files("aslprep_lite.data").joinpath("constants.toml").open("rb") as fobj:
        return tomllib.load(fobj)


def reference(key: str) -> str:
    """Return the full citation for a reference key such as ``"Alsop2015"``."""
    return table()["references"].get(key, key)


def scalar(name: str) -> Constant:
    """Return a single-valued constant from the table by name."""
    entry = table()[name]
    return Constant(float(entry["value"]), entry["units"], entry["source"])


def _by_field(name: str, field_strength: float) -> Constant:
    entry = table()[name]
    tolerance = scalar("field_strength_tolerance").value
    fields = {float(key): key for key in entry["values"]}
    nearest = min(fields, key=lambda f: abs(f - field_strength))
    if abs(nearest - field_strength) > tolerance:
        known = ", ".join(f"{f:g} T" for f in sorted(fields))
        raise ValueError(
            f"no {entry['description'].lower()} is tabulated for {field_strength:g} T "
            f"(known: {known})"
        )
    key = fields[nearest]
    return Constant(
        float(entry["values"][key]),
        entry["units"],
        f"{entry['sources'][key]} ({nearest:g} T)",
    )


def blood_t1(field_strength: float) -> Constant:
    """Arterial blood T1 (s) for a field strength (T).

    Alsop et al. 2015 for 1.5 T and 3 T; Zhang et al. 2013 for 7 T.
    """
    return _by_field("blood_t1", field_strength)


def tissue_t1(field_strength: float) -> Constant:
    """Grey-matter T1 (s) for a field strength (T); Lu et al. 2005, Wright et al. 2008."""
    return _by_field("tissue_t1", field_strength)


def labeling_efficiency(
    asl_type: str,
    *,
    given: float | None = None,
    background_suppression: bool = False,
    bs_pulses: int = 0,
) -> Constant:
    """Total labeling efficiency α used in the CBF equation.

    ``LabelingEfficiency`` from the sidecar is taken as is (it is the efficiency the site
    measured or simulated for its protocol). Otherwise the consensus default for the labeling
    type (Alsop et al. 2015: 0.85 PCASL, 0.68 CASL, 0.98 PASL) is multiplied by
    ``0.95 ** BackgroundSuppressionNumberPulses`` when background suppression is on: each
    inversion pulse loses a few percent of the label (Garcia et al. 2005).
    """
    if given is not None:
        return Constant(float(given), "1", "LabelingEfficiency (sidecar)")
    entry = table()["labeling_efficiency"]
    alpha = float(entry["values"][asl_type])
    source = f"{entry['sources'][asl_type]} ({asl_type} default)"
    if background_suppression and bs_pulses > 0:
        per_pulse = scalar("background_suppression_pulse_efficiency")
        alpha *= per_pulse.value**bs_pulses
        source += (
            f" x {per_pulse.value:g}^{bs_pulses} background-suppression pulses"
            f" ({per_pulse.source})"
        )
    return Constant(alpha, "1", source)


def quantification_record(
    *,
    field_strength: float,
    asl_type: str,
    labeling_efficiency_given: float | None,
    background_suppression: bool,
    bs_pulses: int,
) -> dict[str, Any]:
    """The constants a run is quantified with, each with its value, units and source.

    This is the ``Quantification`` block of the CBF sidecars, and what the CBF nodes read
    their constants from.
    """
    alpha = labeling_efficiency(
        asl_type,
        given=labeling_efficiency_given,
        background_suppression=background_suppression,
        bs_pulses=bs_pulses,
    )
    record: dict[str, Any] = {
        "PartitionCoefficient": scalar("partition_coefficient").as_json(),
        "BloodT1": blood_t1(field_strength).as_json(),
        "LabelingEfficiency": alpha.as_json(),
        "UnitConversion": scalar("unit_conversion").as_json(),
    }
    cited = " ".join(entry["Source"] for entry in record.values()) + " Alsop2015"
    record["References"] = {
        key: text for key, text in sorted(table()["references"].items()) if key in cited
    }
    return record


def m0_record(field_strength: float) -> dict[str, Any]:
    """The constants the M0 step uses: saturation recovery, λ and the reference tissues.

    Handed to the M0 node as an input, so that a changed table reruns it.
    """
    return {
        "TissueT1": tissue_t1(field_strength).as_json(),
        "M0TRThreshold": scalar("m0_tr_threshold").as_json(),
        "PartitionCoefficient": scalar("partition_coefficient").as_json(),
        "ReferenceTissue": table()["reference_tissue"],
        "BloodT2": table()["blood_t2"],
    }
