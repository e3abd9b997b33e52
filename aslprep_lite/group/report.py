"""``group.html``: the group report, one self-contained page (no script, font or URL).

Sections: a summary; the distribution of each QC metric, screened ones first (figure); the
outliers, each linking to its participant's report ``sub-<label>.html`` beside this page; the
participants that failed or have no outputs; the group CBF maps (mosaic); every run's
screened metrics. Nothing in it depends on the time or the machine, so the same inputs give
the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from aslprep_lite import __version__
from aslprep_lite.group.inputs import GroupInputs
from aslprep_lite.group.table import OUTLIER_METRICS, GroupTable, flag_rule
from aslprep_lite.quant.group import MIN_RELIABLE, Z_THRESHOLD
from aslprep_lite.quant.qc import COLUMNS

__all__ = ["MapSection", "render_report"]

_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th { background: #f2f2f2; } td.id { text-align: left; }
td.flag { background: #f8d0d0; font-weight: bold; }
.warn { background: #fff3cd; border: 1px solid #e0c060; padding: 0.5em; }
img { max-width: 100%; } code { font-size: 0.9em; }
"""


@dataclass(frozen=True)
class MapSection:
    """A group map as the report shows it."""

    title: str
    mosaic: str
    mean_file: str
    sd_file: str
    included: Sequence[str]
    excluded: Sequence[str]


def _value(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _subject_link(subject: str) -> str:
    label = escape(f"sub-{subject}")
    return f'<a href="{label}.html">{label}</a>'


def _outlier_rows(table: GroupTable) -> list[str]:
    rows = []
    for i in table.outliers:
        run = table.runs[i]
        details = "; ".join(
            f"{metric} = {_value(run.row[metric])} (z = {table.scores[metric].z[i]:+.1f})"
            for metric in table.flagged(i)
        )
        rows.append(
            f'<tr><td class="id">{_subject_link(run.subject)}</td>'
            f'<td class="id">{escape(run.prefix)}</td><td class="id">{escape(details)}</td></tr>'
        )
    return rows


def _failure_section(inputs: GroupInputs) -> list[str]:
    parts = ["<h2>Failed runs and participants without outputs</h2>"]
    missing = inputs.without_outputs
    failed = {label: lines for label, lines in inputs.failures.items() if lines}
    if not missing and not failed:
        parts.append("<p>None: every selected participant with ASL data has QC outputs.</p>")
        return parts
    if missing:
        parts.append(
            "<p>Participants with ASL data in the input dataset but no quality-control file "
            "(not processed, or every run failed):</p><ul>"
        )
        parts += [f"<li>{_subject_link(label)}</li>" for label in missing]
        parts.append("</ul>")
    if failed:
        parts.append("<table><tr><th>participant</th><th>run</th><th>error</th></tr>")
        for label, lines in failed.items():
            for run, message in lines:
                parts.append(
                    f'<tr><td class="id">{_subject_link(label)}</td>'
                    f'<td class="id">{escape(run)}</td><td class="id">{escape(message)}</td></tr>'
                )
        parts.append("</table>")
    return parts


def _runs_table(table: GroupTable) -> list[str]:
    header = "".join(
        f"<th>{escape(m)} ({escape(COLUMNS[m]['Units'])})</th>" for m in OUTLIER_METRICS
    )
    parts = [f"<table><tr><th>participant</th><th>run</th>{header}</tr>"]
    for i, run in enumerate(table.runs):
        cells = "".join(
            f"<td{' class=flag' if table.scores[m].flags[i] else ''}>{_value(run.row[m])}</td>"
            for m in OUTLIER_METRICS
        )
        parts.append(
            f'<tr><td class="id">{_subject_link(run.subject)}</td>'
            f'<td class="id">{escape(run.prefix)}</td>{cells}</tr>'
        )
    parts.append("</table>")
    return parts


def render_report(
    table: GroupTable,
    inputs: GroupInputs,
    *,
    distributions: str,
    maps: Sequence[MapSection],
    table_file: str,
) -> str:
    """The HTML of ``group.html``; figure paths are relative to the page."""
    participants = sorted({run.subject for run in table.runs})
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>aslprep_lite group report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>aslprep_lite: group report</h1>",
        f"<p>{table.n} run(s) of {len(participants)} participant(s); aslprep_lite "
        f"{escape(__version__)}. Every run's values and flags: "
        f"<code>{escape(table_file)}</code>.</p>",
    ]
    if not table.reliable:
        parts.append(
            f'<p class="warn">Only {table.n} run(s): with fewer than {MIN_RELIABLE} the median '
            "and MAD are unstable and the outlier flags are unreliable.</p>"
        )
    parts += [
        "<h2>Distributions</h2>",
        f'<img src="{escape(distributions)}" alt="distribution of the QC metrics">',
        "<p>One point per run; red diamonds are outliers: robust z-score "
        f"z = 0.6745 (x &minus; median) / MAD beyond {Z_THRESHOLD:g} (Iglewicz &amp; "
        "Hoaglin 1993), over the runs with a value, on the side of poor quality only: "
        + ", ".join(f"<code>{m}</code> {escape(flag_rule(m))}" for m in OUTLIER_METRICS)
        + ".</p>",
        "<h2>Outliers</h2>",
    ]
    outliers = _outlier_rows(table)
    if outliers:
        parts.append("<table><tr><th>participant</th><th>run</th><th>flagged on</th></tr>")
        parts += outliers
        parts.append("</table>")
    else:
        parts.append("<p>No run is an outlier on the screened metrics.</p>")
    parts += _failure_section(inputs)
    parts.append("<h2>Group CBF maps</h2>")
    if not maps:
        parts.append("<p>No run has a CBF map in a template space (see --output-spaces).</p>")
    for section in maps:
        excluded = (
            "excluded as outliers: " + ", ".join(escape(p) for p in section.excluded)
            if section.excluded
            else "no run excluded"
        )
        parts += [
            f"<h3>{escape(section.title)}</h3>",
            f'<img src="{escape(section.mosaic)}" alt="group mean and SD CBF, '
            f'{escape(section.title)}">',
            f"<p>Mean and SD of {len(section.included)} run(s) ({excluded}): "
            f"<code>{escape(section.mean_file)}</code>, <code>{escape(section.sd_file)}</code>."
            "</p>",
        ]
    parts += ["<h2>Runs</h2>", *_runs_table(table), "</body></html>"]
    return "\n".join(parts) + "\n"
