"""matplotlib figures of the report: mosaics, overlays, motion, carpet and CBF series.

Every function returns the PNG bytes of one figure. matplotlib is imported lazily with the
Agg backend (no display, and ``--help`` stays fast). The PNGs are byte-identical run to run:
fixed size and dpi, no ``Software`` text chunk, and the only inputs are the arrays.

Volumes are shown in RAS orientation (:func:`canonical`): axial slices with anterior up and the
participant's left on the left of the page (neurological convention, as nilearn and fMRIPrep).
Mosaics are one image of tiled slices, so a figure is one ``imshow`` and one ``contour`` per
outline whatever the number of slices: a figure takes tens of milliseconds.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

#: Pixels per inch of every figure (with the figure sizes in inches, the size of the PNGs).
DPI = 100
#: Width of a mosaic figure (inches).
MOSAIC_WIDTH = 10.0
#: Colours of outlines, in order (red, cyan, yellow, magenta).
OUTLINE_COLOURS = ("#ff3030", "#00e5ff", "#ffe000", "#ff40ff")


@dataclass(frozen=True)
class Volume:
    """A 3D (or 4D) array in RAS orientation, its voxel sizes and its affine."""

    data: NDArray[np.float32]
    zooms: tuple[float, float, float]
    affine: NDArray[np.float64]


@dataclass(frozen=True)
class Outline:
    """A mask drawn as a contour over a mosaic."""

    mask: NDArray
    colour: str
    label: str


def canonical(img) -> Volume:
    """The image's data reoriented to RAS (axis flips and swaps only, no interpolation).

    Parameters
    ----------
    img : nibabel.Nifti1Image
        A 3D or 4D image.

    Returns
    -------
    Volume
        Its data (float32), voxel sizes and affine after reorientation.
    """
    import nibabel as nb

    img = nb.as_closest_canonical(img)
    data = np.asarray(img.dataobj, dtype=np.float32)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Volume(data, zooms, np.asarray(img.affine, float))  # type: ignore[arg-type]


def on_grid(volume: Volume, reference: Volume, *, order: int = 1) -> NDArray[np.float32]:
    """``volume`` (3D) on the grid of ``reference``: the same array when the grids agree, else
    resampled through the world coordinates (identity mapping, one interpolation)."""
    shape = reference.data.shape[:3]
    if volume.data.shape[:3] == shape and np.allclose(volume.affine, reference.affine, atol=1e-3):
        return volume.data
    from aslprep_lite.quant.warps import resample_through

    return resample_through(
        volume.data, volume.affine, np.eye(4), shape, reference.affine, order=order
    )


def choose_slices(extent: NDArray, n_slices: int) -> list[int]:
    """``n_slices`` axial slices spread evenly over the slices where ``extent`` is non-zero
    (the brain mask), or over the whole volume when it is empty."""
    rows = np.flatnonzero(np.any(extent, axis=(0, 1)))
    low, high = (rows[0], rows[-1]) if rows.size else (0, extent.shape[2] - 1)
    margin = (high - low) / (2 * n_slices)  # the first and last slice are half a step in
    picks = np.linspace(low + margin, high - margin, n_slices)
    return sorted({round(float(k)) for k in picks})


def tile(data: NDArray, slices: Sequence[int], columns: int) -> NDArray:
    """Axial slices of a 3D array tiled into one 2D image, anterior up, one voxel of NaN
    between tiles (so that outlines of neighbouring tiles never join)."""
    nx, ny = data.shape[:2]
    rows = -(-len(slices) // columns)
    out = np.full((rows * (ny + 1), columns * (nx + 1)), np.nan, np.float32)
    for i, k in enumerate(slices):
        r, c = divmod(i, columns)
        # rows of the image: y (anterior at the top); columns: x (right of the participant
        # on the right of the page)
        out[r * (ny + 1) : r * (ny + 1) + ny, c * (nx + 1) : c * (nx + 1) + nx] = data[
            :, ::-1, k
        ].T
    return out


def _figure(width: float, height: float):
    # matplotlib says at WARNING level that it builds its font cache (first use) or makes a
    # temporary config folder (a read-only home, as in the container): not the user's concern,
    # and the command line's stderr keeps one line per problem
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    # Figure() without pyplot: no global state, nothing kept alive between figures
    return Figure(figsize=(width, height), dpi=DPI)


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes, without time stamp or software text (byte-identical)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return buffer.getvalue()


def mosaic(
    image: Volume,
    *,
    extent: NDArray | None = None,
    background: Volume | None = None,
    outlines: Sequence[Outline] = (),
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    label: str | None = None,
    alpha: float = 1.0,
    n_slices: int = 12,
    columns: int = 6,
) -> bytes:
    """Axial slices of ``image`` with a colour bar, optionally over a grey ``background`` and
    with mask ``outlines``.

    Parameters
    ----------
    image : Volume
        The map to show (3D). With ``background``, it must be on the background's grid
        (:func:`on_grid`) and is drawn translucent (``alpha``) where it is non-zero.
    extent : array or None
        Where the slices are chosen (default: the non-zero voxels of the image or background).
    background : Volume or None
        A grey-scale image under ``image`` (2nd-98th percentile range).
    outlines : sequence of Outline
        Masks (on the same grid) drawn as contours at 0.5.
    vmin, vmax : float or None
        Fixed colour range; None: the 2nd and 98th percentiles of the non-zero voxels.
    cmap : str
        matplotlib colour map of ``image``.
    label : str or None
        Colour bar label (with units); None: no colour bar.
    alpha : float
        Opacity of ``image``.
    n_slices, columns : int
        Number of slices and of tiles per row.

    Returns
    -------
    bytes
        The PNG.
    """
    base = background if background is not None else image
    if extent is None:
        extent = base.data != 0
    slices = choose_slices(extent, n_slices)
    columns = min(columns, len(slices))
    shown = tile(image.data, slices, columns)
    finite = shown[np.isfinite(shown) & (shown != 0)]
    if vmin is None or vmax is None:
        low, high = np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0)
        vmin = float(low) if vmin is None else vmin
        vmax = float(high) if vmax is None else vmax
        vmax = max(vmax, vmin + 1e-6)  # a constant map still gets a colour range
    height_px, width_px = shown.shape
    zx, zy = base.zooms[0], base.zooms[1]
    aspect = zy / zx
    bar = 0.9 if label else 0.0
    width = MOSAIC_WIDTH
    legend = 0.3 if outlines else 0.0  # a strip under the slices for the outlines' legend
    height = max(1.0, width * (height_px * aspect) / width_px) + legend
    fig = _figure(width + bar, height)
    axes = fig.add_axes((0.0, legend / height, width / (width + bar), 1.0 - legend / height))
    axes.set_axis_off()
    axes.set_facecolor("black")
    fig.set_facecolor("black")
    if background is not None:
        grey = tile(background.data, slices, columns)
        values = grey[np.isfinite(grey) & (grey != 0)]
        g_low, g_high = np.percentile(values, [2, 98]) if values.size else (0.0, 1.0)
        axes.imshow(
            np.nan_to_num(grey),
            cmap="gray",
            vmin=g_low,
            vmax=g_high,
            aspect=aspect,
            interpolation="nearest",
        )
    # zero is "no value" (outside the mask the maps are written as 0): the black background
    shown = np.ma.masked_where(~np.isfinite(shown) | (shown == 0), shown)
    drawn = axes.imshow(
        shown, cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha, aspect=aspect, interpolation="nearest"
    )
    handles = []
    for outline in outlines:
        edges = np.nan_to_num(tile(outline.mask.astype(np.float32), slices, columns))
        if edges.any():
            axes.contour(edges, levels=[0.5], colors=[outline.colour], linewidths=0.8)
        handles.append((outline.colour, outline.label))
    if handles:
        from matplotlib.lines import Line2D

        axes.legend(
            [Line2D([], [], color=colour) for colour, _ in handles],
            [text for _, text in handles],
            loc="lower left",
            ncols=len(handles),
            fontsize=8,
            frameon=False,
            labelcolor="white",
            bbox_to_anchor=(0.0, -legend / (height - legend)),
        )
    if label:
        cax = fig.add_axes((width / (width + bar) + 0.01, 0.1, 0.15 * bar / (width + bar), 0.8))
        colourbar = fig.colorbar(drawn, cax=cax)
        colourbar.set_label(label, color="white", fontsize=8)
        colourbar.ax.tick_params(colors="white", labelsize=7)
        colourbar.solids.set_alpha(1.0)
    return png_bytes_dark(fig)


def png_bytes_dark(fig) -> bytes:
    """As :func:`png_bytes` with the figure's own (black) background."""
    buffer = io.BytesIO()
    fig.savefig(
        buffer, format="png", dpi=DPI, metadata={"Software": None}, facecolor=fig.get_facecolor()
    )
    return buffer.getvalue()


def motion_plot(columns: dict[str, NDArray]) -> bytes:
    """Framewise displacement and RMSD (top), translations and rotations (bottom).

    Parameters
    ----------
    columns : dict of str to array
        Columns of ``desc-confounds_timeseries.tsv`` (``n/a`` as NaN); those absent are left
        out. Rotations are in radians and drawn in degrees.

    Returns
    -------
    bytes
        The PNG.
    """
    fig = _figure(10.0, 4.2)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for name, text in (("framewise_displacement", "FD"), ("rmsd", "RMSD")):
        if name in columns:
            top.plot(columns[name], marker=".", label=text)
    top.set_ylabel("mm")
    if top.lines:
        top.legend(loc="upper right", fontsize=8, ncols=2)
    for axis in "xyz":
        if f"trans_{axis}" in columns:
            bottom.plot(columns[f"trans_{axis}"], label=f"trans {axis} (mm)")
    for axis in "xyz":
        if f"rot_{axis}" in columns:
            bottom.plot(
                np.degrees(columns[f"rot_{axis}"]), linestyle="--", label=f"rot {axis} (°)"
            )
    bottom.set_ylabel("mm / °")
    bottom.set_xlabel("volume")
    if bottom.lines:
        bottom.legend(loc="upper right", fontsize=7, ncols=6)
    fig.tight_layout()
    return png_bytes(fig)


#: Colours of the volume types on the carpet plot's strip.
CONTEXT_COLOURS = {
    "control": "#1f77b4",
    "label": "#ff7f0e",
    "m0scan": "#2ca02c",
    "deltam": "#9467bd",
    "cbf": "#8c564b",
    "noRF": "#7f7f7f",
}
#: Largest number of voxels (rows) drawn on a carpet plot: a subsample keeps it fast.
CARPET_ROWS = 1500


def carpet_plot(series: NDArray, mask: NDArray, context: Sequence[str]) -> bytes:
    """Voxels of the brain mask × volumes of the raw series, each voxel z-scored.

    Parameters
    ----------
    series : array, 4D
        The raw ASL series (on the mask's grid).
    mask : array, 3D
        The brain mask.
    context : sequence of str
        The volume types (``aslcontext.tsv``), drawn as a coloured strip on top; may be empty.

    Returns
    -------
    bytes
        The PNG.
    """
    voxels = series[mask > 0]
    step = max(1, -(-voxels.shape[0] // CARPET_ROWS))
    voxels = voxels[::step].astype(np.float64)
    mean = voxels.mean(axis=1, keepdims=True)
    sd = voxels.std(axis=1, keepdims=True)
    z = np.divide(voxels - mean, sd, out=np.zeros_like(voxels), where=sd > 0)
    fig = _figure(10.0, 3.6)
    strip, carpet = fig.subplots(2, 1, sharex=True, height_ratios=(1, 12))
    n = series.shape[3]
    if len(context) == n:
        from matplotlib.colors import ListedColormap

        kinds = sorted(set(context), key=list(CONTEXT_COLOURS).index)
        codes = np.array([[kinds.index(c) for c in context]])
        strip.imshow(
            codes,
            aspect="auto",
            interpolation="nearest",
            vmin=0,
            vmax=max(len(kinds) - 1, 1),
            cmap=ListedColormap(
                [CONTEXT_COLOURS[k] for k in kinds] + ["white"] * (len(kinds) < 2)
            ),
        )
        from matplotlib.patches import Patch

        strip.legend(
            handles=[Patch(color=CONTEXT_COLOURS[k], label=k) for k in kinds],
            loc="lower left",
            bbox_to_anchor=(0.0, 1.0),
            ncols=len(kinds),
            fontsize=8,
            frameon=False,
        )
    strip.set_yticks([])
    carpet.imshow(z, aspect="auto", cmap="gray", vmin=-2, vmax=2, interpolation="nearest")
    carpet.set_xlabel("volume")
    carpet.set_ylabel(f"voxels (1 in {step})" if step > 1 else "voxels")
    carpet.set_yticks([])
    fig.tight_layout()
    return png_bytes(fig)


def series_plot(values: NDArray, removed: NDArray | None, label: str) -> bytes:
    """Mean CBF of each volume of the CBF series, the volumes SCORE removed marked.

    Parameters
    ----------
    values : array
        One value per volume of ``desc-timeseries_cbf``.
    removed : array of bool or None
        True for the volumes SCORE removed (None: not known).
    label : str
        The y-axis label.

    Returns
    -------
    bytes
        The PNG.
    """
    fig = _figure(10.0, 2.6)
    axes = fig.subplots()
    index = np.arange(values.size)
    axes.plot(index, values, marker="o", color="#1f77b4", label="per volume")
    axes.axhline(float(np.nanmean(values)), color="grey", linestyle=":", label="mean")
    if removed is not None and removed.any():
        axes.plot(
            index[removed],
            values[removed],
            linestyle="none",
            marker="x",
            markersize=10,
            color="#d62728",
            label="removed by SCORE",
        )
    axes.set_xlabel("volume of the CBF series")
    axes.set_ylabel(label)
    axes.legend(loc="upper right", fontsize=8, ncols=3)
    fig.tight_layout()
    return png_bytes(fig)
