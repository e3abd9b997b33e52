"""A finished sMRIPrep/fMRIPrep anatomy to reuse (``--anat-derivatives DIR``): found and checked.

:func:`find_precomputed_anatomy` returns a :class:`PrecomputedAnatomy` (the T1w-space files and
the T1w<->template transforms of one subject) or raises one
:class:`~aslprep_lite.errors.AslprepError` line that names the file pattern or the file, the
folder searched and what to do. Everything is checked here, before any processing, so that a
bad folder fails in seconds rather than hours into a run.

Layout
------
sMRIPrep and fMRIPrep (``--output-layout bids``, the default since fMRIPrep 21.0) write one
anatomical reference per subject in ``sub-<label>/anat/``, also when the subject has sessions
(``--subject-anatomical-reference first-lex`` or ``unbiased``). With ``sessionwise`` they write
one per session in ``sub-<label>/ses-<label>/anat/``, the file names carrying ``ses-<label>``.
The folder used is the one holding the preprocessed T1w: ``sub-<label>/anat/`` when it has one,
else the single ``ses-*/anat/`` that has one. Several per-session references are refused: which
one fits an ASL run is not ours to guess. Every other file is taken from that same folder.

File names (fMRIPrep's ``docs/outputs.rst`` and sMRIPrep's ``smriprep/data/io_spec.json``)::

    sub-01[_ses-1]_desc-preproc_T1w.nii.gz
    sub-01[_ses-1]_desc-brain_mask.nii.gz
    sub-01[_ses-1]_dseg.nii.gz
    sub-01[_ses-1]_label-{GM,WM,CSF}_probseg.nii.gz
    sub-01[_ses-1]_from-T1w_to-<template>_mode-image_xfm.h5
    sub-01[_ses-1]_from-<template>_to-T1w_mode-image_xfm.h5

T1w-space files have no ``space-`` entity; files with one are template-space outputs and are
ignored, as are other ``desc-`` values (``desc-aseg_dseg`` and ``desc-aparcaseg_dseg`` are
FreeSurfer's parcellations, not the three-tissue segmentation). The ``acq-``, ``ce-``,
``rec-`` and ``run-`` entities that some versions copy from the source T1w, and ``.nii`` for
``.nii.gz``, are accepted when exactly one file matches; several matches are an error listing
them. A template with a cohort (``MNIPediatricAsym:cohort-2``) is named
``MNIPediatricAsym+2`` in the transforms, as sMRIPrep writes it; a ``:res-N`` modifier does not
change the transforms and is ignored.

Segmentation labels
-------------------
``_dseg.nii.gz`` holds 1 = GM, 2 = WM, 3 = CSF (0 = background): the BIDS "common
image-derived labels" (BIDS specification, Derivatives, Imaging data, Segmentations), which
sMRIPrep applies to FSL FAST's classes (its ``apply_lut`` with ``lut=(0, 3, 1, 2)``: FAST's
1 = CSF, 2 = GM, 3 = WM become 3, 1, 2) and to FreeSurfer's aseg (its ``_aseg_to_three``).
A BIDS lookup table overrides this: ``<dseg name>.tsv`` beside the image, or a ``dseg.tsv``
with no other entities (or only entities of the image) in a parent folder, the nearest one
winning, as BIDS inheritance goes. fMRIPrep's top-level ``desc-aparcaseg_dseg.tsv`` and
``desc-aseg_dseg.tsv`` carry a ``desc-`` entity, so they do not apply (they list FreeSurfer
labels, where 2 is left cerebral white matter and 3 left cortex). A table row is GM, WM or CSF
by its ``abbreviation`` (``GM``), else its ``name`` (``Gray Matter``, ``grey matter``, ...),
else its ``mapping`` to the BIDS common labels (``1``).

Transforms
----------
The ``.h5`` files are ITK transforms (a composite of an affine and a displacement field, as
ANTs writes them). ITK's direction is that of resampling: a ``from-T1w_to-MNI`` transform maps
*MNI* points to *T1w* points (LPS mm), which is what resampling a T1w image into MNI space
needs; ``from-MNI_to-T1w`` maps T1w points to MNI points. (See
:mod:`aslprep_lite.quant.warps`.)

Each transform is read in full with ``SimpleITK.ReadTransform`` here. Measured on a 2-core
development VM (SimpleITK 2.5) for a composite with a displacement field on the 1 mm
MNI152NLin2009cAsym grid (193x229x193, a 205 MB file): 0.30-0.40 s per file and about 0.6 GB
of peak memory, freed at once; the budget of about 1 s per file that would have called for
checking the signature only is not reached. Two cheap checks run first, because HDF5 prints a
screen-long error stack on its own for a damaged file: the HDF5 signature, and the file's
length against the end-of-file address its superblock records (the usual damage, an
interrupted copy, is caught there with the byte counts). Any stack HDF5 still prints while
SimpleITK reads is kept off the terminal.

Every voxel of the six T1w-space images is read too, one image at a time, and a ``.gz`` to its
checksum: damage shows only there. On the same VM a 176x256x256 subject with one template took
about 2.5 s in all (1.7 s of it the images) and 0.75 GB of peak memory.
"""

from __future__ import annotations

import csv
import gzip
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from aslprep_lite.bids.files import read_json
from aslprep_lite.errors import AslprepError

#: The three tissues, in the order of their BIDS common label values (1, 2, 3).
TISSUES = ("GM", "WM", "CSF")
#: The BIDS common image-derived labels of the three tissues, which sMRIPrep/fMRIPrep write.
BIDS_TISSUE_LABELS: dict[int, str] = {1: "GM", 2: "WM", 3: "CSF"}

#: Entities that some pipeline versions copy from the source T1w into the derived names.
_TOLERATED = frozenset({"acq", "ce", "rec", "run"})
_NIFTI = (".nii.gz", ".nii")
_EXTENSIONS = (".nii.gz", ".nii", ".h5", ".tsv")  # longest first: ".nii" ends ".nii.gz" too
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_LFS_POINTER = b"version https://git-lfs"
#: Grids whose affines differ by less than this (mm) are the same: NIfTI stores float32.
_AFFINE_TOLERANCE = 1e-3
#: Probability maps may exceed [0, 1] by this much (float rounding of resampled maps).
_PROBABILITY_TOLERANCE = 1e-3
#: ``name`` column spellings of the three tissues in lookup tables, lower case, no blanks.
_TISSUE_NAMES = {
    **dict.fromkeys(("gm", "graymatter", "greymatter"), "GM"),
    **dict.fromkeys(("wm", "whitematter"), "WM"),
    **dict.fromkeys(("csf", "cerebrospinalfluid"), "CSF"),
}


@dataclass(frozen=True)
class PrecomputedAnatomy:
    """The anatomy of one subject from a finished sMRIPrep/fMRIPrep run.

    All paths are absolute. Images are in the subject's T1w space, on one grid.

    Attributes
    ----------
    source
        The derivatives folder (``--anat-derivatives``).
    t1w
        The preprocessed T1w (``desc-preproc_T1w``).
    mask
        The brain mask (``desc-brain_mask``).
    dseg
        The discrete GM/WM/CSF segmentation (``_dseg``).
    probseg
        ``"GM"``, ``"WM"``, ``"CSF"`` -> the tissue probability maps (``label-X_probseg``).
    to_template
        Template, as given -> ``from-T1w_to-<template>_mode-image_xfm.h5``: maps template
        points to T1w points (ITK), i.e. resamples a T1w-space image into the template.
    from_template
        Template, as given -> ``from-<template>_to-T1w_mode-image_xfm.h5``: maps T1w points to
        template points, i.e. resamples a template-space image into T1w space.
    dseg_labels
        Label value in ``dseg`` -> ``"GM"``, ``"WM"`` or ``"CSF"``: ``{1: "GM", 2: "WM",
        3: "CSF"}`` unless a lookup table says otherwise. Other values (background, any other
        label of a lookup table) are absent.
    """

    source: Path
    t1w: Path
    mask: Path
    dseg: Path
    probseg: dict[str, Path]
    to_template: dict[str, Path]
    from_template: dict[str, Path]
    dseg_labels: dict[int, str]


@dataclass(frozen=True)
class _Kind:
    """One kind of file to find: its required entities, suffix and extensions."""

    what: str
    entities: tuple[tuple[str, str], ...]
    suffix: str
    extensions: tuple[str, ...] = _NIFTI

    def pattern(self, prefix: str) -> str:
        """The file name shown in messages, e.g. ``sub-01_desc-brain_mask.nii[.gz]``."""
        parts = [prefix, *(f"{key}-{value}" for key, value in self.entities), self.suffix]
        extension = ".nii[.gz]" if self.extensions == _NIFTI else "|".join(self.extensions)
        return "_".join(parts) + extension


def _parse(name: str) -> tuple[dict[str, str], str, str] | None:
    """BIDS entities, suffix and extension of a file name; None when it is not of that form."""
    extension = next((ext for ext in _EXTENSIONS if name.endswith(ext)), None)
    if extension is None:
        return None
    *pairs, suffix = name[: -len(extension)].split("_")
    entities: dict[str, str] = {}
    for pair in pairs:
        key, dash, value = pair.partition("-")
        if not (dash and key and value) or key in entities:
            return None
        entities[key] = value
    return entities, suffix, extension


def _template_label(template: str) -> str:
    """The ``to-``/``from-`` label of a template: ``X``, or ``X+N`` for ``X:cohort-N``.

    sMRIPrep joins the cohort with ``+`` (its ``_combine_cohort``); the resolution does not
    change a transform, so ``:res-N`` is dropped.
    """
    name, *modifiers = template.split(":")
    cohort = next((m.split("-", 1)[1] for m in modifiers if m.startswith("cohort-")), None)
    return f"{name}+{cohort}" if cohort else name


def _without_resolution(template: str) -> str:
    """``X:cohort-2:res-1`` -> ``X:cohort-2``: the ``--output-spaces`` value to ask for."""
    return ":".join(part for part in template.split(":") if not part.startswith("res-"))


def _one_line(text: object) -> str:
    """Library messages (HDF5, zlib, nibabel) can span lines; ours must not."""
    return " ".join(str(text).split())


def _listing(folder: Path) -> list[str]:
    """File names in a folder; broken links too, so that they are reported, not 'missing'."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() or p.is_symlink())


def _matches(names: list[str], prefix: dict[str, str], kind: _Kind) -> list[str]:
    """The names in ``names`` that are a file of ``kind`` (tolerated extra entities allowed)."""
    expected = {**prefix, **dict(kind.entities)}
    found = []
    for name in names:
        parsed = _parse(name)
        if parsed is None:
            continue
        entities, suffix, extension = parsed
        if (
            suffix == kind.suffix
            and extension in kind.extensions
            and all(entities.get(key) == value for key, value in expected.items())
            # space-, desc-aseg, res-, ...: another file, not a variant of this one
            and set(entities) - set(expected) <= _TOLERATED
        ):
            found.append(name)
    return found


def _find(
    folder: Path,
    names: list[str],
    prefix: dict[str, str],
    kind: _Kind,
    template: str | None = None,
) -> Path:
    """The one file of ``kind`` in ``folder``; one line when there is none or several.

    ``template`` (as given by the caller) marks a transform: its fix is another
    ``--output-spaces``, not another folder.
    """
    found = _matches(names, prefix, kind)
    pattern = kind.pattern("_".join(f"{key}-{value}" for key, value in prefix.items()))
    if len(found) > 1:
        raise AslprepError(
            f"{len(found)} files match {pattern} ({kind.what}): {', '.join(found)}; keep one "
            "(move the others out of this folder)",
            path=str(folder),
        )
    if not found and template is not None:
        raise AslprepError(
            f"no {pattern} ({kind.what}): rerun sMRIPrep/fMRIPrep with --output-spaces "
            f"{_without_resolution(template)} and point --anat-derivatives at its output "
            f"(transforms to templates in this folder: {_available_templates(names, prefix)})",
            path=str(folder),
        )
    if not found:
        raise AslprepError(
            f"no {pattern} ({kind.what}): point --anat-derivatives at the complete output "
            f"of a finished sMRIPrep/fMRIPrep run for sub-{prefix['sub']}",
            path=str(folder),
        )
    return _absolute(folder / found[0])


def _absolute(path: Path) -> Path:
    """An absolute, normalised path that keeps symbolic links.

    ``resolve()`` would replace a DataLad/git-annex file by its object in ``.git/annex``,
    whose name has no BIDS entities.
    """
    return Path(os.path.abspath(path))


def _available_templates(names: list[str], prefix: dict[str, str]) -> str:
    """The templates that have a ``from-T1w_to-<template>`` transform, for messages."""
    templates = set()
    for name in names:
        parsed = _parse(name)
        if parsed and parsed[1] == "xfm" and parsed[2] == ".h5":
            entities = parsed[0]
            if entities.get("from") == "T1w" and all(
                entities.get(key) == value for key, value in prefix.items()
            ):
                templates.add(entities.get("to", "?"))
    return ", ".join(sorted(templates)) or "none"


def _dataset_description(deriv_dir: Path) -> None:
    """A BIDS derivatives folder has a ``dataset_description.json``; require it, and valid."""
    description = deriv_dir / "dataset_description.json"
    if not description.is_file():
        # A common slip: the parent of the pipeline's folder (derivatives/ with fmriprep/
        # in it, or fMRIPrep's legacy layout <out>/fmriprep/).
        inside = sorted(
            f"{p.parent.name}/"
            for p in deriv_dir.glob("*/dataset_description.json")
            if p.is_file()
        )
        hint = f" (found one in {', '.join(inside)}: point --anat-derivatives there)"
        raise AslprepError(
            "no dataset_description.json: --anat-derivatives must be the BIDS derivatives "
            f"folder of an sMRIPrep/fMRIPrep run, which always has one{hint if inside else ''}",
            path=str(deriv_dir),
        )
    read_json(description)  # one line when it is not valid JSON


def _anat_folder(deriv_dir: Path, subject: str) -> tuple[Path, dict[str, str]]:
    """The ``anat`` folder holding the subject's reference, and the entities of its names."""
    subject_dir = deriv_dir / f"sub-{subject}"
    if not subject_dir.is_dir():
        others = sorted(p.name for p in deriv_dir.glob("sub-*") if p.is_dir())
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise AslprepError(
            f"no sub-{subject} folder (subjects here: {shown or 'none'}): run "
            f"sMRIPrep/fMRIPrep on sub-{subject} or point --anat-derivatives at the run that "
            "processed it",
            path=str(deriv_dir),
        )
    t1w = _t1w_kind()
    prefix = {"sub": subject}
    anat = subject_dir / "anat"
    if anat.is_dir() and _has(anat, prefix, t1w):
        return anat, prefix
    sessions = [
        folder.parent
        for folder in sorted(subject_dir.glob("ses-*/anat"))
        if folder.is_dir() and _has(folder, {**prefix, "ses": folder.parent.name[4:]}, t1w)
    ]
    if len(sessions) > 1:
        raise AslprepError(
            f"one anatomical reference per session ({', '.join(s.name for s in sessions)}) "
            f"and none in sub-{subject}/anat: aslprep_lite needs one per subject; rerun "
            f"sMRIPrep/fMRIPrep with --subject-anatomical-reference unbiased (or first-lex)",
            path=str(subject_dir),
        )
    if not sessions:
        raise AslprepError(
            f"no {t1w.pattern(f'sub-{subject}')} ({t1w.what}) in sub-{subject}/anat nor in "
            f"sub-{subject}/ses-*/anat: point --anat-derivatives at the output of a finished "
            f"sMRIPrep/fMRIPrep run (not at the raw dataset or a functional-only run)",
            path=str(subject_dir),
        )
    return sessions[0] / "anat", {**prefix, "ses": sessions[0].name[4:]}


def _t1w_kind() -> _Kind:
    return _Kind("preprocessed T1w", (("desc", "preproc"),), "T1w")


def _transform_kind(source: str, target: str) -> _Kind:
    return _Kind(
        f"{source} to {target} transform",
        (("from", source), ("to", target), ("mode", "image")),
        "xfm",
        extensions=(".h5",),
    )


def _has(folder: Path, prefix: dict[str, str], kind: _Kind) -> bool:
    """Whether ``folder`` has a file of ``kind`` (several are reported when it is used)."""
    return bool(_matches(_listing(folder), prefix, kind))


def _check_available(path: Path, what: str) -> None:
    """Files that are only placeholders for their content, common in shared derivatives."""
    if path.is_symlink() and not path.exists():
        raise AslprepError(
            f"the {what} is a broken link (a DataLad/git-annex file whose content was not "
            "fetched?): run 'datalad get' on it or copy the real file",
            path=str(path),
        )
    try:
        with path.open("rb") as handle:
            head = handle.read(len(_LFS_POINTER))
    except OSError as err:
        raise AslprepError(
            f"cannot open the {what}: {err.strerror}: fix its permissions", path=str(path)
        ) from None
    if head == _LFS_POINTER:
        raise AslprepError(
            f"the {what} is a Git LFS pointer, not the file: run 'git lfs pull' in its "
            "repository or copy the real file",
            path=str(path),
        )


def _read_image(path: Path, what: str) -> tuple[NDArray, nb.Nifti1Image]:
    """All voxels of a 3D image: a damaged ``.gz`` only fails once all of it is read."""
    _check_available(path, what)
    try:
        if path.name.endswith(".gz"):
            # nibabel stops reading at the last voxel and never sees the gzip trailer (CRC32
            # and length): a damaged stream that still inflates would pass. gzip checks it.
            raw = gzip.decompress(path.read_bytes())
            nifti2 = raw[:4] in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")  # sizeof_hdr 540
            img = (nb.Nifti2Image if nifti2 else nb.Nifti1Image).from_bytes(raw)
        else:
            img = nb.load(path)
        data = np.asanyarray(img.dataobj)  # the stored type: no float copy of a 1 mm image
    except Exception as err:  # EOFError, zlib.error, ImageFileError, ... for damaged files
        raise AslprepError(
            f"cannot read the {what} ({type(err).__name__}: {_one_line(err)}): the file is "
            f"truncated or corrupt; copy it again from the sMRIPrep/fMRIPrep output or rerun it",
            path=str(path),
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise AslprepError(
            f"the {what} must be a 3D image, not of shape {data.shape}: use the "
            "sMRIPrep/fMRIPrep file as written",
            path=str(path),
        )
    return data, img


def _check_grid(path: Path, what: str, img: nb.Nifti1Image, t1w: nb.Nifti1Image) -> None:
    """Every T1w-space file must share the T1w's voxel grid: they are read voxel by voxel."""
    shape, reference = img.shape[:3], t1w.shape[:3]
    difference = float(np.abs(img.affine - t1w.affine).max())
    if shape != reference or difference > _AFFINE_TOLERANCE:
        raise AslprepError(
            f"the {what} is not on the grid of the preprocessed T1w (shape {shape} vs "
            f"{reference}, affines differ by up to {difference:.3g}): use files of one "
            f"sMRIPrep/fMRIPrep run, unmodified",
            path=str(path),
        )


def _check_images(
    t1w: Path, mask: Path, dseg: Path, probseg: dict[str, Path], labels: dict[int, str]
) -> None:
    """Read every image once, one at a time (1 mm images: tens of MB each)."""
    _, reference = _read_image(t1w, "preprocessed T1w")
    data, img = _read_image(mask, "brain mask")
    _check_grid(mask, "brain mask", img, reference)
    if not np.any(data > 0):
        raise AslprepError(
            "the brain mask has no voxel above 0: rerun sMRIPrep/fMRIPrep (its brain extraction "
            "failed) or point --anat-derivatives at another run",
            path=str(mask),
        )
    data, img = _read_image(dseg, "tissue segmentation")
    _check_grid(dseg, "tissue segmentation", img, reference)
    if not np.issubdtype(data.dtype, np.integer) and not np.all(np.mod(data, 1) == 0):
        raise AslprepError(
            "the tissue segmentation has non-integer values: a _dseg image holds one whole "
            "label per voxel; use the sMRIPrep/fMRIPrep file as written",
            path=str(dseg),
        )
    for tissue in TISSUES:
        values = sorted(value for value, name in labels.items() if name == tissue)
        if not np.isin(data, values).any():
            present = np.unique(data).astype(int).tolist()  # sorting 1 mm: only to report
            raise AslprepError(
                f"the tissue segmentation has no voxel labelled {tissue} "
                f"({' or '.join(map(str, values))}; values found: "
                f"{', '.join(map(str, present))}): check its lookup table or rerun "
                f"sMRIPrep/fMRIPrep",
                path=str(dseg),
            )
    for tissue, path in probseg.items():
        what = f"{tissue} probability map"
        data, img = _read_image(path, what)
        _check_grid(path, what, img, reference)
        finite = np.isfinite(data).all()
        low, high = (float(data.min()), float(data.max())) if finite else (np.nan, np.nan)
        tolerance = _PROBABILITY_TOLERANCE
        if not (finite and low >= -tolerance and high <= 1 + tolerance):
            raise AslprepError(
                f"the {what} must hold probabilities from 0 to 1, not values from {low:.4g} to "
                f"{high:.4g}: use the sMRIPrep/fMRIPrep file as written",
                path=str(path),
            )


def _lookup_table(deriv_dir: Path, dseg: Path) -> Path | None:
    """The BIDS lookup table that applies to ``dseg``, by inheritance; None when there is none.

    A ``*_dseg.tsv`` applies when its entities are a subset of the image's (``dseg.tsv``,
    ``sub-01_dseg.tsv``, ``sub-01_acq-x_dseg.tsv`` for ``sub-01_acq-x_dseg.nii.gz``); the
    nearest folder wins, from the image's own up to the derivatives folder.
    """
    parsed = _parse(dseg.name)
    assert parsed is not None  # found by _find
    image_entities = parsed[0]
    folder = dseg.parent
    while True:
        tables = []
        for name in _listing(folder):
            table = _parse(name)
            if table and table[1:] == ("dseg", ".tsv"):
                entities = table[0]
                if all(image_entities.get(key) == value for key, value in entities.items()):
                    tables.append(name)
        if len(tables) > 1:
            raise AslprepError(
                f"{len(tables)} lookup tables apply to {dseg.name}: {', '.join(tables)}; keep "
                "one (BIDS allows one per folder level)",
                path=str(folder),
            )
        if tables:
            return folder / tables[0]
        if folder == deriv_dir or deriv_dir not in folder.parents:
            return None
        folder = folder.parent


def _row_tissue(row: dict[str, str]) -> str | None:
    """GM, WM or CSF by the row's abbreviation, else its name, else its BIDS mapping."""
    abbreviation = (row.get("abbreviation") or "").strip().upper()
    if abbreviation in TISSUES:
        return abbreviation
    name = re.sub(r"[\s_-]+", "", (row.get("name") or "").lower())
    if name in _TISSUE_NAMES:
        return _TISSUE_NAMES[name]
    mapping = (row.get("mapping") or "").strip()
    return BIDS_TISSUE_LABELS.get(int(mapping)) if mapping.isdigit() else None


def _read_labels(table: Path) -> dict[int, str]:
    """Label value -> tissue from a BIDS ``dseg.tsv`` (columns ``index``, ``name``, ...)."""
    _check_available(table, "lookup table")
    try:
        with table.open(encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle, delimiter="\t"))
    except (OSError, UnicodeDecodeError) as err:
        raise AslprepError(
            f"cannot read the lookup table: {_one_line(err)}", path=str(table)
        ) from None
    header = [column.strip() for column in rows[0]] if rows else []
    if "index" not in header or "name" not in header:
        raise AslprepError(
            "a segmentation lookup table needs the tab-separated columns 'index' and 'name' "
            "(BIDS dseg.tsv): fix the header or remove the file to use the BIDS labels "
            "1 GM, 2 WM, 3 CSF",
            path=str(table),
        )
    labels: dict[int, str] = {}
    for number, cells in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue  # blank lines, a trailing newline
        row = dict(zip(header, (cell.strip() for cell in cells), strict=False))
        index = row.get("index", "")
        if not re.fullmatch(r"-?\d+", index):
            raise AslprepError(
                f"line {number}: index {index!r} is not a whole number: fix the lookup table",
                path=str(table),
            )
        tissue = _row_tissue(row)
        if tissue is not None:
            labels[int(index)] = tissue  # CGM and SGM rows may both be GM: many-to-one
    missing = [tissue for tissue in TISSUES if tissue not in labels.values()]
    if missing:
        raise AslprepError(
            f"the lookup table has no row for {', '.join(missing)} (by abbreviation, name or "
            "mapping to the BIDS labels 1 GM, 2 WM, 3 CSF): add the rows or remove the file "
            "to use the BIDS labels",
            path=str(table),
        )
    return labels


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Keep HDF5's error stack off the terminal: HDF5 (in C) writes it to file descriptor 2."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (a daemon): nothing to keep quiet
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _check_hdf5_header(path: Path, what: str) -> None:
    """The HDF5 signature, and the file length against the end recorded in the superblock."""
    _check_available(path, what)
    with path.open("rb") as handle:
        head = handle.read(64)
    if not head.startswith(_HDF5_SIGNATURE):
        raise AslprepError(
            f"the {what} is not an HDF5 file (its first bytes are not the HDF5 signature): copy "
            f"it again from the sMRIPrep/fMRIPrep output or rerun sMRIPrep/fMRIPrep",
            path=str(path),
        )
    # Superblock versions 0 and 1 keep the size of addresses at byte 13 and the base address
    # at byte 24 or 28; versions 2 and 3 at byte 9 and 12. The end-of-file address is the
    # third address from the base address, in both (HDF5 File Format Specification, II.A).
    version = head[8] if len(head) > 8 else -1
    size_at, base_at = {0: (13, 24), 1: (13, 28), 2: (9, 12), 3: (9, 12)}.get(version, (0, 0))
    width = head[size_at] if size_at < len(head) else 0
    if not size_at or width not in (2, 4, 8) or len(head) < base_at + 3 * width:
        return  # an unknown or partly read superblock: SimpleITK decides
    base, _, end = (
        int.from_bytes(head[base_at + i * width : base_at + (i + 1) * width], "little")
        for i in range(3)
    )
    undefined = (1 << (8 * width)) - 1
    size = path.stat().st_size
    if undefined not in (base, end) and size < base + end:
        raise AslprepError(
            f"the {what} is truncated ({size} of {base + end} bytes): copy it again from the "
            f"sMRIPrep/fMRIPrep output",
            path=str(path),
        )


def _check_transform(path: Path, what: str) -> None:
    """Read the transform with SimpleITK, as the pipeline will (see the module docstring)."""
    _check_hdf5_header(path, what)
    try:
        with _quiet_stderr():
            transform = sitk.ReadTransform(str(path))
    except RuntimeError as err:
        # SimpleITK's text is many lines of ITK internals (object addresses, the list of
        # readers tried): kept for -v by chaining, not shown in the one line.
        raise AslprepError(
            f"SimpleITK cannot read the {what}: the file is not an ITK transform or is "
            "damaged; copy it again from the sMRIPrep/fMRIPrep output",
            path=str(path),
        ) from err
    if transform.GetDimension() != 3:
        raise AslprepError(
            f"the {what} is a {transform.GetDimension()}D transform, not 3D: use the "
            "sMRIPrep/fMRIPrep file as written",
            path=str(path),
        )


def find_precomputed_anatomy(
    deriv_dir: Path, subject: str, templates: Sequence[str], *, check_files: bool = True
) -> PrecomputedAnatomy:
    """Find and check one subject's anatomy in a finished sMRIPrep/fMRIPrep output folder.

    Parameters
    ----------
    deriv_dir
        The pipeline's output folder: the one holding ``dataset_description.json`` and the
        ``sub-*`` folders.
    subject
        The subject label, with or without ``sub-``.
    templates
        The templates to which transforms are needed, as ``--output-spaces`` spells them
        (``MNI152NLin2009cAsym``, ``MNIPediatricAsym:cohort-2``, ``...:res-2``); the keys of
        :attr:`PrecomputedAnatomy.to_template` and ``from_template``. May be empty.
    check_files
        Read every image and transform in full (the default). ``--dry-run`` passes False: the
        files are found by name and the lookup table read, but no image is opened.

    Returns
    -------
    PrecomputedAnatomy
        Absolute paths of the files, and the segmentation's labels.

    Raises
    ------
    AslprepError
        One line naming the missing file pattern and the folder searched, or the file that
        cannot be used, and what to do: a missing folder or ``dataset_description.json``, no
        subject folder, several per-session references, a missing file or several candidates,
        an unreadable image, images on different grids, an unusable segmentation, lookup
        table or transform.
    """
    deriv_dir = _absolute(Path(deriv_dir).expanduser())
    subject = subject.removeprefix("sub-")
    if not deriv_dir.is_dir():
        raise AslprepError(
            "--anat-derivatives folder does not exist: give the output folder of a "
            "finished sMRIPrep or fMRIPrep run",
            path=str(deriv_dir),
        )
    _dataset_description(deriv_dir)
    anat, prefix = _anat_folder(deriv_dir, subject)
    names = _listing(anat)

    def find(kind: _Kind) -> Path:
        return _find(anat, names, prefix, kind)

    t1w = find(_t1w_kind())
    mask = find(_Kind("brain mask", (("desc", "brain"),), "mask"))
    dseg = find(_Kind("tissue segmentation", (), "dseg"))
    probseg = {
        tissue: find(_Kind(f"{tissue} probability map", (("label", tissue),), "probseg"))
        for tissue in TISSUES
    }
    to_template: dict[str, Path] = {}
    from_template: dict[str, Path] = {}
    for template in dict.fromkeys(templates):  # in the order given, once each
        label = _template_label(template)
        to_template[template] = _find(
            anat, names, prefix, _transform_kind("T1w", label), template=template
        )
        from_template[template] = _find(
            anat, names, prefix, _transform_kind(label, "T1w"), template=template
        )

    table = _lookup_table(deriv_dir, dseg)
    labels = _read_labels(table) if table else dict(BIDS_TISSUE_LABELS)
    if check_files:
        _check_images(t1w, mask, dseg, probseg, labels)
    for template in to_template if check_files else ():
        label = _template_label(template)
        _check_transform(to_template[template], _transform_kind("T1w", label).what)
        _check_transform(from_template[template], _transform_kind(label, "T1w").what)
    return PrecomputedAnatomy(
        source=deriv_dir,
        t1w=t1w,
        mask=mask,
        dseg=dseg,
        probseg=probseg,
        to_template=to_template,
        from_template=from_template,
        dseg_labels=labels,
    )
