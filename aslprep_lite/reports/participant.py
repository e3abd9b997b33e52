"""Assemble ``OUT/sub-<label>.html``: one page per participant, from what is on disk.

The page reads only files: the participant's derivatives and sidecars, ``logs/CITATION.md``,
the status of its runs (:mod:`~aslprep_lite.reports.status`) and, read-only, the raw ASL
series of the input dataset (for the carpet plot). A section is left out when its files are
absent, so the same code reports complete, partial and failed runs. Figures are PNGs under
``sub-<label>/figures/``, referenced by relative paths: the page works offline, from the
disk, without scripts or anything fetched.

Each image file is read once per page (:class:`ImageCache`); the figures of a run take about
a second in all (``benchmarks/bench_report.py``).
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aslprep_lite.reports.status import OK, RunStatus, report_name

if TYPE_CHECKING:
    from aslprep_lite.reports.figures import Volume

LOGGER = logging.getLogger("aslprep_lite")

#: Fixed colour range of every CBF mosaic (mL/100 g/min): maps compare at a glance.
CBF_RANGE = (0.0, 100.0)
#: Colour range of arterial transit time maps (s).
ATT_RANGE = (0.0, 3.0)
CBF_UNITS = "CBF (mL/100 g/min)"
#: The template resolution (mm) of the normalization figure.
NORMALIZATION_RES = 2


@dataclass
class Figure:
    """One figure of the page: its file name, title, caption and PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


@dataclass
class ImageCache:
    """Images read once per page, in RAS orientation; None for a file absent or unreadable."""

    volumes: dict[Path, Volume | None] = field(default_factory=dict)

    def get(self, path: Path) -> Volume | None:
        """The :class:`~aslprep_lite.reports.figures.Volume` of ``path``, or None."""
        if path not in self.volumes:
            self.volumes[path] = None
            if path.is_file():
                try:
                    import nibabel as nb

                    from aslprep_lite.reports.figures import canonical

                    self.volumes[path] = canonical(nb.load(path))
                except Exception as err:  # a damaged file: the section is left out
                    LOGGER.info("report: %s not shown (%s)", path, err)
        return self.volumes[path]

    def forget(self, *folders: Path) -> None:
        """Drop the images of these folders (a run's, once its section is drawn): the page
        then holds one run's series at a time, besides the anatomy."""
        for path in [p for p in self.volumes if p.parent in folders]:
            del self.volumes[path]


def _json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _tsv(path: Path) -> dict[str, np.ndarray]:
    """Columns of a confounds TSV (``n/a`` as NaN); empty when absent or unreadable."""
    from aslprep_lite.quant.qc import read_confounds

    try:
        return read_confounds(path)
    except (OSError, ValueError, IndexError):
        return {}


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_number(v) for v in value)
    return str(value)


def _units(value: dict) -> str:
    """`` <units>`` of a sidecar value, nothing for a dimensionless one (``"1"``)."""
    units = str(value.get("Units", ""))
    return "" if units in ("", "1") else f" {units}"


def _table(rows: Sequence[tuple[str, str]], css: str = "kv") -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="{css}">{body}</table>'


class Page:
    """The figures and HTML blocks of one participant's page."""

    def __init__(self, output_dir: Path, bids_dir: Path, subject: str) -> None:
        self.output_dir = Path(output_dir)
        self.bids_dir = Path(bids_dir)
        self.subject = subject
        self.images = ImageCache()
        self.figures: list[Figure] = []
        #: The participant's anatomy (:func:`anatomy_files`); set by :func:`build_report`.
        self.anatomy: dict = {}

    @property
    def figure_dir(self) -> Path:
        return self.output_dir / f"sub-{self.subject}" / "figures"

    def figure(self, name: str, title: str, caption: str, draw: Callable[[], bytes]) -> str:
        """Draw one figure (``draw()`` returns PNG bytes) and return its HTML; a figure that
        cannot be drawn is left out with an INFO line, never failing the page."""
        try:
            png = draw()
        except Exception as err:
            LOGGER.info("report: figure %s of sub-%s not drawn (%s)", name, self.subject, err)
            return ""
        self.figures.append(Figure(name, title, caption, png))
        source = f"sub-{self.subject}/figures/{name}"
        return (
            f"<figure><figcaption><strong>{_e(title)}</strong> {_e(caption)}</figcaption>"
            f'<img src="{_e(source)}" alt="{_e(title)}"></figure>'
        )


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------


def _nifti_stem(name: str) -> str:
    """A NIfTI file's name without ``.nii`` or ``.nii.gz``."""
    return re.sub(r"\.nii(\.gz)?$", "", name)


def _template_file(template: str, resolution: int, **entities) -> Path | None:
    try:
        from aslprep_lite.templates import get_template

        return Path(get_template(template, resolution=resolution, **entities))
    except Exception:  # not available offline: the figure is left out
        return None


def _template_volume(page: Page, template: str, resolution: int, **entities) -> Volume | None:
    path = _template_file(template, resolution, **entities)
    return page.images.get(path) if path is not None else None


def _template_entities(template_key: str) -> tuple[str, dict[str, str]]:
    """TemplateFlow's name and query entities of a template key: ``X`` or ``X+N`` (cohort N,
    as sMRIPrep names transforms); without the cohort, a template that comes in cohorts
    matches several files."""
    name, _, cohort = template_key.partition("+")
    return name, ({"cohort": cohort} if cohort else {})


def anatomy_files(output_dir: Path, subject: str, runs: Sequence[RunStatus]) -> dict:
    """The participant's preprocessed T1w, brain mask, segmentation and ``from-T1w_to-<tpl>``
    transforms.

    Parameters
    ----------
    output_dir : Path
        The output folder.
    subject : str
        The participant label.
    runs : sequence of RunStatus
        The participant's runs: their CBF sidecars name a reused anatomy.

    Returns
    -------
    dict
        ``t1w``, ``mask``, ``dseg`` (Path or None) and ``xfms`` (list of Path): those of
        ``OUT/sub-<label>/anat/`` when it has the T1w, else those of ``--anat-derivatives``
        named by ``ProcessingParameters.AnatDerivatives`` of the first run's CBF sidecar that
        has it (a reused anatomy is not copied into the output); empty without either.
    """
    name = f"sub-{subject}"
    anat = Path(output_dir) / name / "anat"
    t1w = anat / f"{name}_desc-preproc_T1w.nii.gz"
    if t1w.is_file():
        return {
            "t1w": t1w,
            "mask": anat / f"{name}_desc-brain_mask.nii.gz",
            "dseg": anat / f"{name}_dseg.nii.gz",
            "xfms": sorted(anat.glob(f"{name}_from-T1w_to-*_mode-image_xfm.h5")),
        }
    for run in runs:
        folder = Path(output_dir) / name
        if run.session:
            folder = folder / f"ses-{run.session}"
        sidecar = _json(folder / "perf" / f"{run.prefix}_cbf.json")
        parameters = sidecar.get("ProcessingParameters")
        reused = parameters.get("AnatDerivatives") if isinstance(parameters, dict) else None
        if not isinstance(reused, dict) or not isinstance(reused.get("Files"), list):
            continue
        files = [Path(str(reused.get("Folder", ""))) / str(f) for f in reused["Files"]]

        def first(pattern: str, files=files) -> Path | None:
            return next((f for f in files if re.search(pattern, f.name)), None)

        return {
            "t1w": first(r"_T1w\.nii(\.gz)?$"),
            "mask": first(r"_mask\.nii(\.gz)?$"),
            "dseg": first(r"_dseg\.nii(\.gz)?$"),
            "xfms": sorted(
                (f for f in files if re.search(r"_from-T1w_to-[A-Za-z0-9+]+_mode-image_xfm\.h5$",
                                               f.name)),
                key=lambda f: f.name,
            ),
        }  # fmt: skip
    return {}


def anatomy_section(page: Page) -> str:
    """T1w with its brain mask, its segmentation, and each normalization; "" without a T1w."""
    from aslprep_lite.reports.figures import Outline, Volume, mosaic

    name = f"sub-{page.subject}"
    files = page.anatomy

    def volume(key: str) -> Volume | None:
        path = files.get(key)
        return page.images.get(path) if path is not None else None

    t1w = volume("t1w")
    if t1w is None:
        return ""
    mask = volume("mask")
    dseg = volume("dseg")
    parts = []
    if dseg is not None:
        outlines = [
            Outline(dseg.data == 1, "#ff3030", "GM"),
            Outline(dseg.data == 2, "#00e5ff", "WM"),
        ]
        if mask is not None:
            outlines.append(Outline(mask.data > 0.5, "#ffe000", "brain mask"))
        parts.append(
            page.figure(
                f"{name}_desc-seg_T1w.png",
                "Brain mask and tissue segmentation.",
                "The preprocessed T1w with the outlines of the grey and white matter of the "
                "discrete segmentation (dseg) and of the brain mask.",
                lambda: mosaic(
                    t1w, extent=mask.data > 0 if mask else None, outlines=outlines, cmap="gray"
                ),
            )
        )
    for xfm in files.get("xfms", []):
        template = re.search(r"_to-([A-Za-z0-9+]+)_mode", xfm.name).group(1)
        tpl_name, cohort = _template_entities(template)
        reference = _template_volume(
            page, tpl_name, NORMALIZATION_RES, desc=None, suffix="T1w", **cohort
        )
        tpl_mask = _template_volume(
            page, tpl_name, NORMALIZATION_RES, desc="brain", suffix="mask", **cohort
        )
        tpl_wm = _template_volume(
            page, tpl_name, NORMALIZATION_RES, label="WM", suffix="probseg", **cohort
        )
        if reference is None:
            continue

        def draw(xfm=xfm, reference=reference, tpl_mask=tpl_mask, tpl_wm=tpl_wm):
            from aslprep_lite.quant.warps import Deformation, resample_through

            # from-T1w_to-<tpl> resamples the T1w into the template: for each template point
            # it gives the T1w point (the convention of quant/warps.py)
            mapping = Deformation.from_itk_file(xfm, reference.data.shape, reference.affine)
            warped = resample_through(
                t1w.data, t1w.affine, mapping, reference.data.shape, reference.affine
            )
            outlines = []
            if tpl_wm is not None:
                outlines.append(Outline(tpl_wm.data > 0.5, "#ff3030", "template white matter"))
            if tpl_mask is not None:
                outlines.append(Outline(tpl_mask.data > 0.5, "#ffe000", "template brain mask"))
            shown = Volume(warped, reference.zooms, reference.affine)
            return mosaic(
                shown,
                extent=(tpl_mask.data > 0.5) if tpl_mask else None,
                outlines=outlines,
                cmap="gray",
            )

        parts.append(
            page.figure(
                f"{name}_desc-{re.sub('[^A-Za-z0-9]', '', template)}_T1w.png",
                f"Spatial normalization to {template}.",
                f"The participant's T1w brought to {template} ({NORMALIZATION_RES} mm) through "
                f"{xfm.name}, with the outlines of the template's white matter and brain "
                "mask: they should follow the T1w's.",
                draw,
            )
        )
    dseg_file = files.get("dseg")
    sidecar = {}
    if dseg_file is not None:
        sidecar = _json(dseg_file.with_name(_nifti_stem(dseg_file.name) + ".json"))
    rows = []
    normalization = sidecar.get("Normalization", {})
    if normalization:
        rows.append(
            (
                "Normalization",
                _e(f"{normalization.get('Template', '')}: {normalization.get('Method', '')}"),
            )
        )
        if "Correlation" in normalization:
            rows.append(("Correlation with the template", _e(normalization["Correlation"])))
    for key in ("BrainExtraction", "Segmentation", "BiasFieldCorrection"):
        if key in sidecar:
            rows.append((key, _e(sidecar[key])))
    if "BrainVolume" in sidecar:
        rows.append(("Brain volume (mL)", _e(sidecar["BrainVolume"])))
    table = _table(rows) if rows else ""
    return '<section id="anatomy"><h2>Anatomy</h2>' + table + "".join(parts) + "</section>"


# --------------------------------------------------------------------------------------------
# One ASL run
# --------------------------------------------------------------------------------------------


def _raw_sidecar(bids_dir: Path, asl_file: str) -> dict:
    """The run's raw ``_asl.json`` with the BIDS inheritance principle: every ``asl.json``
    from the dataset root down to the run's folder whose entities the run has, the deeper
    ones overriding (a damaged one is skipped: the run's own error says why)."""
    run = Path(asl_file)
    entities = set(re.sub(r"_asl\.nii(\.gz)?$", "", run.name).split("_"))
    merged: dict = {}
    folder = Path(bids_dir)
    for part in ("", *run.parent.parts):
        folder = folder / part if part else folder
        for candidate in sorted(folder.glob("*asl.json"), key=lambda p: len(p.name)):
            stem = candidate.name[: -len("asl.json")].rstrip("_")
            if not stem or set(stem.split("_")) <= entities:
                merged.update(_json(candidate))
    return merged


def _summary(cbf: dict, raw: dict) -> str:
    """Protocol, constants, warnings and values filled in, as tables."""
    rows: list[tuple[str, str]] = []
    labeling = raw.get("ArterialSpinLabelingType")
    if labeling:
        rows.append(("Labeling", _e(labeling)))
    plds = cbf.get("PostLabelingDelay", raw.get("PostLabelingDelay"))
    if plds is not None:
        values = sorted(set(plds)) if isinstance(plds, list) else [plds]
        kind = "multi-delay" if len(values) > 1 else "single-delay"
        rows.append(("Delays", _e(f"{kind}: {_number(values)} s")))
    if "LabelingDuration" in cbf or "LabelingDuration" in raw:
        rows.append(
            (
                "Labeling duration (s)",
                _e(_number(cbf.get("LabelingDuration", raw.get("LabelingDuration")))),
            )
        )
    m0_type = cbf.get("M0", {}).get("M0Type", raw.get("M0Type"))
    if m0_type:
        rows.append(("M0Type", _e(m0_type)))
    if "BackgroundSuppression" in raw:
        pulses = raw.get("BackgroundSuppressionNumberPulses")
        text = "yes" if raw["BackgroundSuppression"] else "no"
        if raw["BackgroundSuppression"] and pulses is not None:
            text += f" ({pulses} pulses)"
        rows.append(("Background suppression", _e(text)))
    if "MagneticFieldStrength" in raw:
        rows.append(("Field strength (T)", _e(raw["MagneticFieldStrength"])))
    if "Model" in cbf:
        rows.append(("Model", _e(cbf["Model"])))
    if "NumberOfVolumesAveraged" in cbf:
        rows.append(("Volumes averaged", _e(cbf["NumberOfVolumesAveraged"])))
    tissue = cbf.get("TissueCBF", {})
    for key, text in (("MeanCBFGM", "Mean GM CBF"), ("MeanCBFWM", "Mean WM CBF")):
        if key in tissue:
            rows.append((f"{text} (mL/100 g/min)", _e(tissue[key])))
    coregistration = cbf.get("Coregistration", {})
    if "Path" in coregistration:
        rows.append(
            (
                "Coregistration",
                _e(f"from the {coregistration['Path']}, Dice {coregistration.get('Dice')}"),
            )
        )
    out = ["<h3>Summary</h3>", _table(rows)] if rows else []
    constants = [
        (key, _e(f"{_number(value['Value'])}{_units(value)} — {value.get('Source', '')}"))
        for key, value in sorted(cbf.get("Quantification", {}).items())
        if isinstance(value, dict) and "Value" in value
    ]
    if constants:
        out += ["<h3>Constants used</h3>", _table(constants)]
    flagged = [str(w) for w in cbf.get("QualityWarnings", [])]
    if coregistration.get("Warning"):
        flagged.append(str(coregistration["Warning"]))
    if coregistration.get("Quality"):
        flagged.append(f"Template-space outputs of lower quality: {coregistration['Quality']}")
    if flagged:
        out.append(
            '<h3>Warnings</h3><ul class="warnings">'
            + "".join(f"<li>{_e(w)}</li>" for w in flagged)
            + "</ul>"
        )
    assumed = cbf.get("AssumedMetadata", [])
    if assumed:
        out += [
            "<h3>Values filled in</h3>",
            '<table class="grid"><tr><th>Field</th><th>Value</th><th>Reason</th></tr>'
            + "".join(
                f"<tr><td>{_e(a.get('Field'))}</td><td>{_e(_number(a.get('Value')))}</td>"
                f"<td>{_e(a.get('Reason'))}</td></tr>"
                for a in assumed
            )
            + "</table>",
        ]
    return "".join(out)


def _qc_table(path: Path) -> str:
    if not path.is_file():
        return ""
    try:
        from aslprep_lite.quant.qc import COLUMNS, read_qc_tsv

        rows = read_qc_tsv(path)
    except Exception as err:
        LOGGER.info("report: %s not shown (%s)", path, err)
        return ""
    body = "".join(
        f"<tr><td>{_e(name)}</td><td>{'n/a' if value is None else _e(_number(value))}</td>"
        f"<td>{_e(COLUMNS.get(name, {}).get('Units', ''))}</td></tr>"
        for row in rows
        for name, value in row.items()
    )
    header = "<tr><th>Metric</th><th>Value</th><th>Units</th></tr>"
    return f'<h3>Quality control</h3><table class="grid">{header}{body}</table>'


def _series_means(series, mask) -> np.ndarray:
    inside = mask.data > 0.5
    return np.array(
        [float(np.nanmean(series.data[..., t][inside])) for t in range(series.data.shape[3])]
    )


def run_section(page: Page, status: RunStatus) -> str:
    """Everything about one run, its error first when it failed."""
    from aslprep_lite.reports.figures import (
        Outline,
        Volume,
        carpet_plot,
        mosaic,
        motion_plot,
        on_grid,
        series_plot,
    )

    prefix = status.prefix
    parts = [
        f'<section class="run" id="run-{_e(prefix)}">'
        f'<h2>{_e(prefix)} <span class="badge {_e(status.status)}">{_e(status.status)}</span>'
        "</h2>"
        f'<p class="source">{_e(status.asl_file)}</p>'
    ]
    if status.error:
        parts.append(f'<p class="error">{_e(status.error)}</p>')
    folder = page.output_dir / f"sub-{status.subject}"
    if status.session:
        folder = folder / f"ses-{status.session}"
    perf = folder / "perf"

    def path(suffix: str) -> Path:
        return perf / f"{prefix}_{suffix}"

    cbf_meta = _json(path("cbf.json"))
    parts.append(_summary(cbf_meta, _raw_sidecar(page.bids_dir, status.asl_file)))
    images = page.images
    cbf = images.get(path("cbf.nii.gz"))
    mask = images.get(path("desc-brain_mask.nii.gz"))
    brain = [Outline(mask.data > 0.5, "#ff3030", "brain mask")] if mask else []
    extent = mask.data > 0.5 if mask else None
    figures = []
    if cbf is not None:
        figures.append(
            page.figure(
                f"{prefix}_desc-cbf_asl.png",
                "CBF.",
                f"Mean CBF on the ASL grid, fixed range {CBF_RANGE[0]:g}–{CBF_RANGE[1]:g}.",
                lambda: mosaic(
                    cbf, extent=extent, vmin=CBF_RANGE[0], vmax=CBF_RANGE[1], label=CBF_UNITS
                ),
            )
        )
    deltam = images.get(path("desc-mean_deltam.nii.gz"))
    if deltam is not None:
        figures.append(
            page.figure(
                f"{prefix}_desc-deltam_asl.png",
                "Mean ΔM.",
                "Mean perfusion-weighted image (control − label) with the brain mask.",
                lambda: mosaic(
                    deltam, extent=extent, outlines=brain, cmap="gray", label="ΔM (a.u.)"
                ),
            )
        )
    m0 = images.get(path("desc-preproc_m0scan.nii.gz"))
    if m0 is not None:
        figures.append(
            page.figure(
                f"{prefix}_desc-m0_asl.png",
                "M0.",
                "The calibration M0 as used (aligned, smoothed) with the brain mask.",
                lambda: mosaic(m0, extent=extent, outlines=brain, cmap="gray", label="M0 (a.u.)"),
            )
        )
    # ASL -> T1w coregistration: the T1w under the CBF in T1w space
    # (the participant's T1w and segmentation: in anat/, or those of --anat-derivatives)
    t1w_file, dseg_file = page.anatomy.get("t1w"), page.anatomy.get("dseg")
    t1w = images.get(t1w_file) if t1w_file is not None else None
    cbf_t1w = images.get(path("space-T1w_cbf.nii.gz"))
    if t1w is not None and cbf_t1w is not None:
        asl_mask_t1w = images.get(path("space-T1w_desc-brain_mask.nii.gz"))
        dseg = images.get(dseg_file) if dseg_file is not None else None

        def coregistration() -> bytes:
            outlines = []
            if asl_mask_t1w is not None:
                outlines.append(
                    Outline(on_grid(asl_mask_t1w, t1w) > 0.5, "#ff3030", "ASL brain mask")
                )
            if dseg is not None:
                outlines.append(
                    Outline(on_grid(dseg, t1w, order=0) == 2, "#00e5ff", "T1w white matter")
                )
            shown = Volume(on_grid(cbf_t1w, t1w), t1w.zooms, t1w.affine)
            return mosaic(
                shown,
                background=t1w,
                extent=outlines[0].mask if outlines else None,
                outlines=outlines,
                vmin=CBF_RANGE[0],
                vmax=CBF_RANGE[1],
                label=CBF_UNITS,
                alpha=0.6,
            )

        figures.append(
            page.figure(
                f"{prefix}_desc-coreg_asl.png",
                "ASL to T1w coregistration.",
                "CBF in T1w space over the preprocessed T1w, with the outlines of the ASL brain "
                "mask and of the T1w white matter: CBF should sit on the cortex.",
                coregistration,
            )
        )
    for space_file in sorted(perf.glob(f"{prefix}_space-*_cbf.nii.gz")):
        entities = space_file.name[len(prefix) + 1 : -len("_cbf.nii.gz")]
        if "desc-" in entities or entities == "space-T1w":
            continue
        space = images.get(space_file)
        if space is None:
            continue
        template = re.match(r"space-([A-Za-z0-9]+)", entities).group(1)
        resolution = re.search(r"res-(\d+)", entities)
        cohort = re.search(r"cohort-(\d+)", entities)
        background = _template_volume(
            page,
            template,
            int(resolution.group(1)) if resolution else 1,
            desc=None,
            suffix="T1w",
            **({"cohort": cohort.group(1)} if cohort else {}),
        )
        if background is not None and background.data.shape != space.data.shape:
            background = None  # a cohort or resolution we cannot match: the map alone
        space_mask = images.get(perf / f"{prefix}_{entities}_desc-brain_mask.nii.gz")
        outlines = (
            [Outline(space_mask.data > 0.5, "#ff3030", "ASL brain mask")] if space_mask else []
        )

        def draw(space=space, background=background, outlines=outlines):
            return mosaic(
                space,
                background=background,
                extent=outlines[0].mask if outlines else None,
                outlines=outlines,
                vmin=CBF_RANGE[0],
                vmax=CBF_RANGE[1],
                label=CBF_UNITS,
                alpha=0.75 if background is not None else 1.0,
            )

        tag = re.sub("[^A-Za-z0-9]", "", entities.replace("space-", "").replace("res-", "res"))
        figures.append(
            page.figure(
                f"{prefix}_desc-cbf{tag}_asl.png",
                f"CBF in {template}.",
                f"CBF resampled to {entities}"
                + (", over the template T1w." if background is not None else "."),
                draw,
            )
        )
    parts.append("<h3>Perfusion</h3>" + "".join(figures) if any(figures) else "")
    # multi-delay
    att = images.get(path("att.nii.gz"))
    fit = []
    if att is not None:
        fit.append(
            page.figure(
                f"{prefix}_desc-att_asl.png",
                "Arterial transit time.",
                f"ATT from the kinetic fit, range {ATT_RANGE[0]:g}–{ATT_RANGE[1]:g} s.",
                lambda: mosaic(
                    att,
                    extent=extent,
                    vmin=ATT_RANGE[0],
                    vmax=ATT_RANGE[1],
                    cmap="magma",
                    label="ATT (s)",
                ),
            )
        )
    rsquared = images.get(path("desc-fitrsquared_cbf.nii.gz"))
    failed = images.get(path("desc-fitfailed_mask.nii.gz"))
    if rsquared is not None:
        n_failed = int((failed.data > 0.5).sum()) if failed is not None else None
        caption = "Goodness of fit (R²) of the kinetic model"
        caption += f"; {n_failed} voxels where the fit failed, outlined." if failed else "."
        outlines = [Outline(failed.data > 0.5, "#ff3030", "fit failed")] if failed else []
        fit.append(
            page.figure(
                f"{prefix}_desc-fitrsquared_asl.png",
                "Fit quality.",
                caption,
                lambda: mosaic(
                    rsquared,
                    extent=extent,
                    vmin=0.0,
                    vmax=1.0,
                    cmap="cividis",
                    outlines=outlines,
                    label="R²",
                ),
            )
        )
    if any(fit):
        parts.append("<h3>Multi-delay fit</h3>" + "".join(fit))
    # time series: motion, carpet, CBF per volume, SCORE / SCRUB
    series_parts = []
    confounds = _tsv(path("desc-confounds_timeseries.tsv"))
    if any(k in confounds for k in ("framewise_displacement", "trans_x")):
        mean_fd = np.nanmean(confounds.get("framewise_displacement", np.array([np.nan])))
        series_parts.append(
            page.figure(
                f"{prefix}_desc-motion_asl.png",
                "Head motion.",
                f"Framewise displacement (mean {mean_fd:.3f} mm), RMSD and the six rigid-body "
                "parameters per volume.",
                lambda: motion_plot(confounds),
            )
        )
    raw_file = page.bids_dir / status.asl_file
    context = _aslcontext(
        page.bids_dir / re.sub(r"_asl\.nii(\.gz)?$", "_aslcontext.tsv", status.asl_file)
    )
    if mask is not None and raw_file.is_file():
        raw = images.get(raw_file)
        if raw is not None and raw.data.ndim == 4 and raw.data.shape[:3] == mask.data.shape:
            series_parts.append(
                page.figure(
                    f"{prefix}_desc-carpet_asl.png",
                    "Carpet plot.",
                    "The raw ASL series inside the brain mask: one row per voxel (z-scored), one "
                    "column per volume; the strip on top gives the volume types.",
                    lambda: carpet_plot(raw.data, mask.data, context),
                )
            )
    timeseries = images.get(path("desc-timeseries_cbf.nii.gz"))
    if timeseries is not None and mask is not None and timeseries.data.ndim == 4:
        removed = None
        if "score_outlier_index" in confounds:
            # the confounds' rows are the volumes after the dummy scans
            dummy = cbf_meta.get("ProcessingParameters", {}).get("DummyScans", 0)
            removed = _removed_volumes(
                confounds["score_outlier_index"],
                timeseries.data.shape[3],
                context[dummy:] if isinstance(dummy, int) else [],
            )
        n_removed = int(removed.sum()) if removed is not None else None
        caption = "Mean CBF in the brain mask of each volume of the CBF series"
        caption += (
            f"; {n_removed} volume(s) removed by SCORE marked." if removed is not None else "."
        )
        series_parts.append(
            page.figure(
                f"{prefix}_desc-cbfseries_asl.png",
                "CBF per volume.",
                caption,
                lambda: series_plot(
                    _series_means(timeseries, mask), removed, "mean CBF (mL/100 g/min)"
                ),
            )
        )
    for desc, title, text in (
        ("score", "SCORE CBF.", "CBF averaged over the volumes SCORE kept (Dolui et al. 2017)."),
        ("scrub", "SCRUB CBF.", "CBF from SCRUB's robust Bayesian average (Dolui et al. 2016)."),
    ):
        volume = images.get(path(f"desc-{desc}_cbf.nii.gz"))
        if volume is not None:
            series_parts.append(
                page.figure(
                    f"{prefix}_desc-{desc}_asl.png",
                    title,
                    text,
                    lambda volume=volume: mosaic(
                        volume,
                        extent=extent,
                        vmin=CBF_RANGE[0],
                        vmax=CBF_RANGE[1],
                        label=CBF_UNITS,
                    ),
                )
            )
    if any(series_parts):
        parts.append("<h3>Time series</h3>" + "".join(series_parts))
    parts.append(_qc_table(path("desc-qualitycontrol_cbf.tsv")))
    parts.append("</section>")
    images.forget(perf, raw_file.parent)
    return "".join(parts)


def _removed_volumes(index: np.ndarray, n_volumes: int, context: Sequence[str]):
    """Which volumes of the CBF series SCORE removed, from the confounds' column
    ``score_outlier_index`` (1 = removed), or None when its rows cannot be matched.

    Parameters
    ----------
    index : numpy.ndarray
        The column, one row per volume of the ASL series the run processed.
    n_volumes : int
        Volumes of the CBF series.
    context : sequence of str
        Volume type of each volume of that series (after dummy scans), or empty when the
        ``aslcontext.tsv`` cannot be read.

    Returns
    -------
    numpy.ndarray of bool or None
        With the context: a CBF volume is removed when any of the series volumes it was made
        from (:func:`aslprep_lite.quant.deltam.timeseries_sources`: a pair, a ``deltam`` or
        a ``cbf`` volume) has 1. Without it: the column when it has a row per CBF volume,
        or its rows with a value (n/a elsewhere) when there are as many.
    """
    from aslprep_lite.quant.deltam import timeseries_sources

    if context:
        if len(context) != index.size:
            return None
        try:
            sources = timeseries_sources(context)
        except ValueError:  # a context the run could not have used
            return None
        if len(sources) != n_volumes:
            return None
        return np.array([bool(np.any(index[list(rows)] == 1)) for rows in sources])
    if index.size == n_volumes:
        return index == 1
    valued = index[np.isfinite(index)]
    if valued.size == n_volumes:
        return valued == 1
    return None


def _aslcontext(path: Path) -> list[str]:
    """The run's volume types, read as discovery reads them; empty when unreadable (the page
    then draws the carpet plot without them)."""
    from aslprep_lite.bids.files import read_aslcontext
    from aslprep_lite.errors import AslprepError

    try:
        return read_aslcontext(path)
    except AslprepError:
        return []


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


def _errors_section(runs: Sequence[RunStatus]) -> str:
    failed = [run for run in runs if run.status != OK]
    if not failed:
        return ""
    items = "".join(
        f'<li><a href="#run-{_e(run.prefix)}">{_e(run.prefix)}</a>'
        f'<p class="error">{_e(run.error)}</p></li>'
        for run in failed
    )
    return f'<section id="errors"><h2>Errors</h2><ul>{items}</ul></section>'


def _methods_section(output_dir: Path) -> str:
    from aslprep_lite.reports.markdown import markdown_to_html

    path = output_dir / "logs" / "CITATION.md"
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8")
    return f'<section id="methods">{markdown_to_html(text, heading_offset=1)}</section>'


def build_report(
    output_dir: Path, bids_dir: Path, subject: str, runs: Sequence[RunStatus]
) -> Path:
    """Write ``OUT/sub-<label>.html`` and its figures under ``OUT/sub-<label>/figures/``.

    Parameters
    ----------
    output_dir : Path
        The output folder of the participant-level run.
    bids_dir : Path
        The input dataset (read only: the raw series of the carpet plot, the sidecars).
    subject : str
        The participant label.
    runs : sequence of RunStatus
        The participant's runs and what happened to them
        (:func:`~aslprep_lite.reports.status.collect_statuses`).

    Returns
    -------
    Path
        The report written.
    """
    from aslprep_lite.images import write_atomic_text
    from aslprep_lite.reports.template import render_page

    output_dir, bids_dir = Path(output_dir), Path(bids_dir)
    page = Page(output_dir, bids_dir, subject)
    page.anatomy = anatomy_files(output_dir, subject, runs)
    sections = [run_section(page, run) for run in runs]
    anatomy = anatomy_section(page)
    n_failed = sum(run.status != OK for run in runs)
    links = "".join(f'<li><a href="#run-{_e(r.prefix)}">{_e(r.prefix)}</a></li>' for r in runs)
    body = [
        f"<h1>aslprep_lite report: sub-{_e(subject)}</h1>",
        f"<p>{len(runs)} ASL run(s), {n_failed} failed. Status record: "
        f"<code>logs/sub-{_e(subject)}_runs.json</code>.</p>",
        "<nav><ul>"
        + ('<li><a href="#errors">Errors</a></li>' if n_failed else "")
        + ('<li><a href="#anatomy">Anatomy</a></li>' if anatomy else "")
        + links
        + '<li><a href="#methods">Methods</a></li></ul></nav>',
        _errors_section(runs),
        anatomy,
        *sections,
        _methods_section(output_dir),
    ]
    _write_figures(page)
    report = output_dir / report_name(subject)
    write_atomic_text(report, render_page(f"sub-{_e(subject)}", "\n".join(b for b in body if b)))
    return report


def _write_figures(page: Page) -> None:
    """Write the page's figures; remove figures of an earlier report that this one lacks
    (a participant with no figure gets no ``sub-<label>/`` folder)."""
    folder = page.figure_dir
    names = {figure.name for figure in page.figures}
    if folder.is_dir():
        for stale in folder.glob("*.png"):
            if stale.name not in names:
                stale.unlink()
    for figure in page.figures:
        target = folder / figure.name
        if target.is_file() and target.read_bytes() == figure.png:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{figure.name}.tmp"
        temporary.write_bytes(figure.png)
        temporary.replace(target)


def write_reports(
    output_dir: Path,
    bids_dir: Path,
    processed: Sequence[str],
    failures: Sequence[tuple[str, str]],
) -> list[Path]:
    """The status record and the report of every participant of a participant-level run.

    Parameters
    ----------
    output_dir, bids_dir : Path
        The output folder and the input dataset.
    processed : sequence of str
        ASL files of the runs handed to processing (validated at discovery).
    failures : sequence of (str, str)
        ``(asl_file, one-line error)`` of every failed run, wherever it failed.

    Returns
    -------
    list of Path
        The reports written, one per participant, in label order.
    """
    from aslprep_lite.reports.status import collect_statuses, with_earlier_runs, write_status

    reports = []
    for subject, runs in collect_statuses(bids_dir, processed, failures).items():
        runs = with_earlier_runs(output_dir, bids_dir, subject, runs)
        write_status(output_dir, subject, runs)
        try:
            reports.append(build_report(output_dir, bids_dir, subject, runs))
        except Exception as err:  # the derivatives are written: a report never fails a run
            LOGGER.warning(
                "could not write the report of sub-%s: %s: %s", subject, type(err).__name__, err
            )
    return reports
