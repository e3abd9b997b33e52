"""The group report's figures, rendered to PNG bytes in memory (matplotlib, Agg).

Deterministic: no ``Software`` or date in the PNG metadata, a fixed jitter, matplotlib's own
DejaVu fonts; the same inputs give the same bytes.
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.figure import Figure

from aslprep_lite.group.table import OUTLIER_METRICS, GroupTable
from aslprep_lite.quant.qc import COLUMNS

__all__ = ["distributions_png", "mosaic_png"]

_PNG_METADATA = {"Software": None}
_DPI = 90
_LABELS = {
    "gm_cbf": "GM CBF",
    "gm_spatial_cov": "GM spatial CoV",
    "mean_fd": "mean FD",
    "qei": "QEI",
}


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, metadata=_PNG_METADATA)
    return buffer.getvalue()


#: Panels per row of the distributions figure.
_COLUMNS_PER_ROW = 5


def distributions_png(table: GroupTable) -> bytes:
    """One panel per QC metric, the screened ones first: a box plot and one point per run;
    runs flagged on a screened metric in red (the other metrics are shown, not screened)."""
    metrics = [*OUTLIER_METRICS, *(c for c in COLUMNS if c not in OUTLIER_METRICS)]
    n_rows = math.ceil(len(metrics) / _COLUMNS_PER_ROW)
    figure = Figure(figsize=(2.6 * _COLUMNS_PER_ROW, 3.6 * n_rows))
    axes = figure.subplots(n_rows, _COLUMNS_PER_ROW, squeeze=False).ravel()
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    # a fixed jitter: the same table draws the same picture
    jitter = np.random.default_rng(0).uniform(-0.12, 0.12, size=table.n)
    for ax, metric in zip(axes, metrics, strict=False):
        values = np.array(
            [math.nan if r.row[metric] is None else float(r.row[metric]) for r in table.runs]
        )
        screened = metric in OUTLIER_METRICS
        flags = table.scores[metric].flags if screened else np.zeros(table.n, bool)
        defined = np.isfinite(values)
        if defined.any():
            ax.boxplot(
                values[defined],
                positions=[1.0],
                widths=0.5,
                showfliers=False,
                medianprops={"color": "#333333"},
            )
        x = 1.0 + jitter
        normal = defined & ~flags
        ax.scatter(x[normal], values[normal], s=14, color="#3b75af", alpha=0.8, zorder=3)
        ax.scatter(x[flags], values[flags], s=30, color="#d62728", marker="D", zorder=4)
        for i in np.flatnonzero(flags):
            ax.annotate(
                f"sub-{table.runs[i].subject}",
                (x[i], values[i]),
                xytext=(6, 0),
                textcoords="offset points",
                fontsize=7,
                color="#d62728",
                va="center",
            )
        units = COLUMNS[metric]["Units"]
        title = _LABELS.get(metric, metric)
        ax.set_title(title + ("" if screened else " (not screened)"), fontsize=9)
        ax.set_ylabel(units if units != "1" else "ratio", fontsize=8)
        ax.set_xticks([])
        ax.set_xlim(0.4, 1.8)
        ax.tick_params(labelsize=7)
        if not defined.any():
            ax.text(0.5, 0.5, "n/a", transform=ax.transAxes, ha="center", va="center")
    figure.tight_layout()
    return _png(figure)


def mosaic_png(mean: np.ndarray, sd: np.ndarray, n_slices: int = 7) -> bytes:
    """Axial slices of the group mean (top row) and SD (bottom row) CBF maps.

    The slices are cropped to the box of the voxels with a mean (with a 2-voxel margin): a
    brain small in its template grid is still seen.
    """
    support = np.abs(mean) > 0
    box = []
    for axis in range(3):
        present = np.flatnonzero(support.any(axis=tuple(a for a in range(3) if a != axis)))
        if present.size:
            box.append((max(int(present[0]) - 2, 0), min(int(present[-1]) + 3, mean.shape[axis])))
        else:
            box.append((0, mean.shape[axis]))
    (x0, x1), (y0, y1), (z0, z1) = box
    picks = np.linspace(z0, z1 - 1, n_slices + 2)[1:-1].round().astype(int)
    brain = mean[np.abs(mean) > 0]
    vmax = float(np.percentile(brain, 99)) if brain.size else 1.0
    sd_brain = sd[sd > 0]
    sd_max = float(np.percentile(sd_brain, 99)) if sd_brain.size else 1.0
    figure = Figure(figsize=(1.5 * n_slices + 0.8, 3.6))
    axes = figure.subplots(2, n_slices, squeeze=False)
    images = []
    for row, (data, top, cmap, name) in enumerate(
        ((mean, vmax, "viridis", "mean"), (sd, sd_max, "magma", "SD"))
    ):
        for col, z in enumerate(picks):
            ax = axes[row, col]
            images.append(
                ax.imshow(
                    np.rot90(data[x0:x1, y0:y1, z]),
                    cmap=cmap,
                    vmin=0.0,
                    vmax=max(top, 1e-6),
                    interpolation="nearest",
                )
            )
            ax.set_axis_off()
            if row == 0:
                ax.set_title(f"z={z}", fontsize=7)
        figure.colorbar(images[-1], ax=list(axes[row]), fraction=0.02, pad=0.01).set_label(
            f"{name} (mL/100 g/min)", fontsize=7
        )
    return _png(figure)
