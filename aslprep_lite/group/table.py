"""The group QC table ``group_desc-qualitycontrol_cbf.tsv``: one row per run, outlier flags.

Identifiers (``participant_id``, ``session_id``, ``run``, ``prefix``), the columns of the
per-run table (:data:`aslprep_lite.quant.qc.COLUMNS`), then for each metric of
:data:`OUTLIER_METRICS` its robust z-score (``<metric>_z``) and flag (``<metric>_outlier``,
1 or 0, ``n/a`` where the value is; only the metric's poor-quality side is flagged,
:data:`aslprep_lite.quant.group.OUTLIER_SIDES`), and ``outlier``: 1 when any metric is flagged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aslprep_lite.group.inputs import QcRun
from aslprep_lite.quant.group import (
    IGLEWICZ_HOAGLIN_1993,
    MIN_RELIABLE,
    OUTLIER_SIDES,
    SIDES,
    Z_THRESHOLD,
    RobustZ,
    robust_z,
)
from aslprep_lite.quant.qc import COLUMNS, qc_sidecar

__all__ = [
    "IDENTIFIERS",
    "OUTLIER_METRICS",
    "GroupTable",
    "flag_rule",
    "group_table",
    "rule_text",
]

#: The metrics screened for outliers: mean GM CBF (calibration, labelling), the spatial CoV
#: (vascular artefacts, long transit times), mean FD (head motion) and the QEI (overall map
#: quality). Each is flagged on one side or both (:data:`aslprep_lite.quant.group.OUTLIER_SIDES`).
OUTLIER_METRICS = tuple(OUTLIER_SIDES)


def flag_rule(metric: str) -> str:
    """The flag rule of ``metric`` as text, e.g. ``z < -3.5`` for the QEI."""
    return SIDES[OUTLIER_SIDES[metric]].format(t=Z_THRESHOLD)


def rule_text() -> str:
    """Every screened metric with its rule, e.g. ``gm_cbf |z| > 3.5, ..., qei z < -3.5``."""
    return ", ".join(f"{m} {flag_rule(m)}" for m in OUTLIER_METRICS)


IDENTIFIERS = {
    "participant_id": {"Description": "Participant label, with its sub- prefix"},
    "session_id": {"Description": "Session label, with its ses- prefix; n/a without sessions"},
    "run": {"Description": "Run index (the run- entity); n/a when the file name has none"},
    "prefix": {
        "Description": "File-name prefix of the run's derivatives (all its entities), e.g. "
        "sub-01_ses-1_run-1: the run's QC table is "
        "<prefix>_desc-qualitycontrol_cbf.tsv"
    },
}
_DECIMALS = 6


@dataclass
class GroupTable:
    """The runs, their robust z-scores per metric, and the columns to write."""

    runs: list[QcRun]
    scores: dict[str, RobustZ]

    @property
    def n(self) -> int:
        """Number of runs."""
        return len(self.runs)

    @property
    def reliable(self) -> bool:
        """Enough runs for the flags to be trusted (:data:`MIN_RELIABLE`)."""
        return self.n >= MIN_RELIABLE

    def flagged(self, index: int) -> list[str]:
        """The metrics on which run ``index`` is an outlier."""
        return [m for m in OUTLIER_METRICS if bool(self.scores[m].flags[index])]

    @property
    def outliers(self) -> list[int]:
        """Indices of the runs flagged on any metric."""
        return [i for i in range(self.n) if self.flagged(i)]

    def columns(self) -> list[str]:
        """Header of the TSV."""
        extra = [c for m in OUTLIER_METRICS for c in (f"{m}_z", f"{m}_outlier")]
        return [*IDENTIFIERS, *COLUMNS, *extra, "outlier"]

    def to_tsv(self) -> str:
        """The table as text: tab-separated, ``n/a`` for undefined, 6 decimals."""
        lines = ["\t".join(self.columns())]
        for i, run in enumerate(self.runs):
            fields = [
                f"sub-{run.subject}",
                f"ses-{run.session}" if run.session else "n/a",
                run.run or "n/a",
                run.prefix,
            ]
            for name in COLUMNS:
                fields.append(_number(run.row[name]))
            for metric in OUTLIER_METRICS:
                z = float(self.scores[metric].z[i])
                fields.append(_number(z))
                fields.append("n/a" if math.isnan(z) else str(int(self.scores[metric].flags[i])))
            fields.append(str(int(bool(self.flagged(i)))))
            lines.append("\t".join(fields))
        return "\n".join(lines) + "\n"

    def sidecar(self, tissue_sources: Sequence[str]) -> dict[str, Any]:
        """JSON sidecar: every column's description, the tissue sources, the outlier rule."""
        per_run = qc_sidecar("")
        per_run.pop("TissueSource")
        qei_parameters = per_run.pop("QEIParameters")
        sidecar: dict[str, Any] = {name: dict(entry) for name, entry in IDENTIFIERS.items()}
        sidecar.update(per_run)
        for metric in OUTLIER_METRICS:
            sidecar[f"{metric}_z"] = {
                "Description": f"Robust z-score of {metric}: 0.6745 ({metric} - median) / MAD "
                "over the runs of this table with a value (Iglewicz & Hoaglin 1993); when the "
                "MAD is 0, (value - median) / (1.2533 MeanAD); n/a where the value is",
                "Units": "1",
                "Reference": IGLEWICZ_HOAGLIN_1993,
            }
            rule = flag_rule(metric).replace("z", f"{metric}_z", 1)
            sidecar[f"{metric}_outlier"] = {
                "Description": f"1 when {rule}, else 0 (only the side of poor quality is flagged)",
                "Levels": {"0": "not an outlier", "1": "outlier"},
            }
        sidecar["outlier"] = {
            "Description": "1 when the run is an outlier on any of " + ", ".join(OUTLIER_METRICS),
            "Levels": {"0": "not an outlier", "1": "outlier"},
        }
        sidecar["TissueSources"] = sorted(set(tissue_sources))
        sidecar["QEIParameters"] = qei_parameters
        sidecar["OutlierDetection"] = {
            "Method": "robust (modified) z-score beyond the threshold on the side of poor "
            "quality of each metric (Side: low, z < -threshold; high, z > threshold; both, "
            "|z| > threshold)",
            "Threshold": Z_THRESHOLD,
            "Reference": IGLEWICZ_HOAGLIN_1993,
            "Runs": self.n,
            "Reliable": self.reliable,
            "Note": (
                f"flags are unreliable with fewer than {MIN_RELIABLE} runs"
                if not self.reliable
                else ""
            ),
            "Metrics": {
                metric: {
                    "Median": _json_number(score.median),
                    "Scale": _json_number(score.scale),
                    "ScaleEstimator": score.scale_estimator,
                    "RunsWithValue": score.n,
                    "Side": score.side,
                    "Rule": flag_rule(metric),
                }
                for metric, score in self.scores.items()
            },
        }
        return sidecar


def _number(value: float | int | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    value = float(value)
    return f"{value:.{_DECIMALS}f}" if math.isfinite(value) else "n/a"


def _json_number(value: float) -> float | None:
    return round(value, _DECIMALS) if math.isfinite(value) else None


def group_table(runs: Sequence[QcRun]) -> GroupTable:
    """Robust z-scores of :data:`OUTLIER_METRICS` over ``runs`` (in the order given)."""
    runs = list(runs)
    scores = {
        m: robust_z([run.row[m] for run in runs], side=OUTLIER_SIDES[m]) for m in OUTLIER_METRICS
    }
    return GroupTable(runs=runs, scores=scores)


def dump_json(content: dict[str, Any]) -> str:
    """JSON as every sidecar is written: indented, keys in insertion order, final newline."""
    return json.dumps(content, indent=2, ensure_ascii=False) + "\n"
