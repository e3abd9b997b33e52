"""Standard-space templates through TemplateFlow, offline by default.

Every template file goes through the ``templateflow`` package's API, so that a user who has a
TemplateFlow folder (``TEMPLATEFLOW_HOME``) gets exactly the files TemplateFlow serves. Nothing is
downloaded unless the user's own TemplateFlow folder lists a file that is not there yet:

* With ``TEMPLATEFLOW_HOME`` set, that folder is used as it is. aslprep_lite never writes into it;
  templateflow may download a file that the folder lists as an empty placeholder, only when the
  folder is writable (:func:`get_template`).
* Without it, TemplateFlow is pointed at an *embedded* home in a per-user cache, laid out on first
  use from the ICBM 2009a nonlinear symmetric template files that nilearn's wheel ships
  (:data:`EMBEDDED_TEMPLATE`, ``MNI152NLin2009aSym``). A fresh machine with no network has it.

A template that is in neither fails at once, before any processing, with one line that names the
template, the query, the folder in use and how to pre-fetch or mount the template.

The embedded home has TemplateFlow's file names and res-1 grid for ``MNI152NLin2009aSym``, but
not the same content as TemplateFlow's copy (see :func:`layout_embedded_home`): nilearn's T1w is
skull-stripped and scaled to 0-255, its GM and WM maps have 8-bit precision, and res-2 exists
only in the embedded copy. :func:`template_provenance` says which copy
a run used, for the sidecars.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np
from numpy.typing import NDArray

from aslprep_lite import __version__
from aslprep_lite.errors import AslprepError
from aslprep_lite.images import write_nifti

#: The template that works without a network: laid out from nilearn's files.
EMBEDDED_TEMPLATE = "MNI152NLin2009aSym"

#: Overrides where the embedded home is laid out (default: a per-user cache).
TEMPLATES_ENV = "ASLPREP_LITE_TEMPLATES"

#: Bumped whenever the files of the embedded home change; a cache made by another layout
#: version is laid out again.
LAYOUT_VERSION = 1

#: nilearn's copies of the ICBM 2009a nonlinear symmetric template (``nilearn/datasets/data``).
NILEARN_FILES = {
    "T1w": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "GM": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "WM": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# TemplateFlow's metadata for this template, as in the template_description.json of
# tpl-MNI152NLin2009aSym that the templateflow 25.1.2 wheel carries in its skeleton
# (templateflow/conf/templateflow-skel.zip). Copied here so that laying out the home needs no
# private file of templateflow's and no network.
_TEMPLATEFLOW_METADATA: dict[str, Any] = {
    "Authors": ["Fonov V", "Evans AC", "Botteron K", "Almli CR", "McKinstry RC", "Collins DL"],
    "BIDSVersion": "1.1.0",
    "Curators": ["Esteban O"],
    "Identifier": EMBEDDED_TEMPLATE,
    "License": "See LICENSE file",
    "Name": "ICBM 152 Nonlinear Symmetrical template version 2009a",
    "RRID": "SCR_008796",
    "ReferencesAndLinks": [
        "https://doi.org/10.1016/j.neuroimage.2010.07.033",
        "https://doi.org/10.1016/S1053-8119(09)70884-5",
        "http://nist.mni.mcgill.ca/?p=904",
        "https://doi.org/10.1007/3-540-48714-X_16",
    ],
    "Species": "Homo sapiens",
    "TemplateFlowVersion": "1.0.0",
}

# The template's license, from the LICENSE file of the same tpl-MNI152NLin2009aSym skeleton. It
# asks for the copyright notice to appear in all copies, so the embedded home carries it.
_LICENSE = """\
Copyright (C) 1993-2004 Louis Collins, McConnell Brain
Imaging Centre, Montreal Neurological Institute, McGill University.
Permission to use, copy, modify, and distribute this software and
its documentation for any purpose and without fee is hereby granted,
provided that the above copyright notice appear in all copies.  The
authors and McGill University make no representations about the
suitability of this software for any purpose.  It is provided "as
is" without express or implied warranty.  The authors are not
responsible for any data loss, equipment damage, property loss, or
injury to subjects or patients resulting from the use or misuse of
this software package.
"""

# NIfTI xform code 4: the coordinates are in MNI152 space.
_XFORM_MNI152 = 4

_PREFETCH = (
    "on a machine with internet run TEMPLATEFLOW_HOME=/path/to/templateflow "
    "python -c \"import templateflow.api as tf; tf.get('{template}')\", then set "
    "TEMPLATEFLOW_HOME=/path/to/templateflow here (in a container, bind-mount that folder and "
    "set TEMPLATEFLOW_HOME to the mount point)"
)


@dataclass(frozen=True)
class _Grid:
    """An axis-aligned RAS voxel grid: shape, voxel size (mm) and centre of voxel (0, 0, 0)."""

    shape: tuple[int, int, int]
    zoom: float
    origin: tuple[float, float, float]

    @property
    def affine(self) -> NDArray[np.float64]:
        affine = np.diag([self.zoom, self.zoom, self.zoom, 1.0])
        affine[:3, 3] = self.origin
        return affine

    def describe(self) -> dict[str, list[float] | list[int]]:
        """The ``res`` entry of a TemplateFlow ``template_description.json``."""
        return {
            "origin": [float(v) for v in self.origin],
            "shape": list(self.shape),
            "zooms": [float(self.zoom)] * 3,
        }


# res-1 is the grid of TemplateFlow's own MNI152NLin2009aSym (its template_description.json:
# origin -96, -132, -78; 193 x 229 x 193), so that outputs at res-1 have the same grid whichever
# copy of the template made them. nilearn's files are on MNI's original 197 x 233 x 189 grid
# (origin -98, -134, -72): both have voxel centres on whole millimetres, so moving the data onto
# TemplateFlow's grid only crops and pads, with no interpolation, and every non-zero voxel of
# nilearn's files lies inside it. TemplateFlow has no res-2 for this template: res-2 is the
# 2 mm grid TemplateFlow uses for MNI152NLin2009cAsym (origin -96.5, -132.5, -78.5;
# 97 x 115 x 97), the same ICBM 2009 space and the grid of fMRIPrep-style res-2 outputs.
_GRIDS = {
    1: _Grid((193, 229, 193), 1.0, (-96.0, -132.0, -78.0)),
    2: _Grid((97, 115, 97), 2.0, (-96.5, -132.5, -78.5)),
}


def _filename(resolution: int, entities: str) -> str:
    return f"tpl-{EMBEDDED_TEMPLATE}_res-{resolution}_{entities}.nii.gz"


#: The files of the embedded home, per resolution, after TemplateFlow's names for this template.
EMBEDDED_FILES = tuple(
    _filename(res, entities)
    for res in sorted(_GRIDS)
    for entities in ("T1w", "label-GM_probseg", "label-WM_probseg", "desc-brain_mask")
)


# --------------------------------------------------------------------------- the embedded home


def embedded_home(environ: dict[str, str] | None = None) -> Path:
    """The folder where the embedded TemplateFlow home is (or will be) laid out.

    Parameters
    ----------
    environ
        The environment to read (default: ``os.environ``).

    Returns
    -------
    Path
        ``$ASLPREP_LITE_TEMPLATES`` if set, else ``$XDG_CACHE_HOME/aslprep_lite/templateflow``
        (when ``XDG_CACHE_HOME`` is an absolute path, as the XDG specification requires), else
        ``~/.cache/aslprep_lite/templateflow``.

    Raises
    ------
    AslprepError
        When none of these is set and the user has no home directory.
    """
    env = os.environ if environ is None else environ
    if env.get(TEMPLATES_ENV):
        return Path(env[TEMPLATES_ENV]).absolute()
    xdg = env.get("XDG_CACHE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "aslprep_lite" / "templateflow"
    try:
        home = Path.home()
    except RuntimeError:  # no HOME and no passwd entry: a container run as an arbitrary UID
        raise AslprepError(
            f"no home directory to keep the embedded template {EMBEDDED_TEMPLATE} in: set "
            f"{TEMPLATES_ENV} (or HOME) to a writable folder"
        ) from None
    return home / ".cache" / "aslprep_lite" / "templateflow"


def _nilearn_dir() -> Path:
    """nilearn's data folder, found without importing nilearn: only its data files are used."""
    spec = find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise AslprepError(
            f"nilearn is not installed, and the embedded template {EMBEDDED_TEMPLATE} is made "
            "from its files: reinstall aslprep_lite (pip install aslprep_lite), or set "
            "TEMPLATEFLOW_HOME to a pre-fetched TemplateFlow folder"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source_stamp() -> dict[str, Any]:
    """What the embedded home is made from: nilearn's files (by hash) and the layout version."""
    folder = _nilearn_dir()
    files = {}
    for name in NILEARN_FILES.values():
        path = folder / name
        if not path.is_file():
            raise AslprepError(
                f"nilearn's copy of the ICBM 2009a template is missing, so the embedded "
                f"template {EMBEDDED_TEMPLATE} cannot be made: reinstall nilearn "
                "(pip install --force-reinstall nilearn), or set TEMPLATEFLOW_HOME to a "
                "pre-fetched TemplateFlow folder",
                path=str(path),
            )
        files[name] = _sha256(path)
    return {"LayoutVersion": LAYOUT_VERSION, "SourceFiles": files}


def _is_complete(target: Path, stamp: dict[str, Any]) -> bool:
    """Whether ``target`` holds this layout of these source files, every file intact."""
    try:
        description = json.loads((target / "template_description.json").read_text())
        embedded = description["EmbeddedFrom"]
        if {k: embedded.get(k) for k in stamp} != stamp:
            return False  # another layout version, or other nilearn files
        if not (target / "LICENSE").is_file():
            return False
        if set(embedded["Files"]) != set(EMBEDDED_FILES):
            return False
        return all(_sha256(target / name) == sha for name, sha in embedded["Files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _on_grid(data: NDArray, source: nb.Nifti1Image, grid: _Grid) -> NDArray:
    """Place ``data`` on ``grid`` by whole-voxel shifts: crop and zero-pad, no interpolation."""
    offset = np.linalg.solve(source.affine, grid.affine)  # grid voxel -> source voxel
    if not np.allclose(offset[:3, :3], np.eye(3)) or not np.allclose(
        offset[:3, 3], np.round(offset[:3, 3])
    ):
        raise ValueError("the source is not on a whole-voxel shift of the target grid")
    shift = np.round(offset[:3, 3]).astype(int)
    out = np.zeros(grid.shape, dtype=data.dtype)
    src, dst = [], []
    for axis in range(3):
        start = max(0, -shift[axis])  # first grid voxel that lies inside the source
        stop = min(grid.shape[axis], data.shape[axis] - shift[axis])
        dst.append(slice(start, stop))
        src.append(slice(start + shift[axis], stop + shift[axis]))
    out[tuple(dst)] = data[tuple(src)]
    return out


def _halve(data: NDArray) -> NDArray[np.float32]:
    """res-1 to res-2: trilinear interpolation at the centres of the 2 mm voxels.

    A 2 mm centre lies half-way between two 1 mm centres along each axis (-96.5 between -97 and
    -96, ...), so trilinear interpolation there is the mean of a 2x2x2 block of 1 mm voxels,
    with zeros beyond the 1 mm grid: no aliasing, and the total (e.g. tissue volume) is kept.
    """
    res1, res2 = _GRIDS[1].shape, _GRIDS[2].shape
    padded = np.zeros(tuple(2 * n for n in res2), dtype=np.float64)
    # 1 mm voxel i sits at position i + 1 of the padded array: 2 mm voxel j averages 2j, 2j + 1.
    padded[1 : res1[0] + 1, 1 : res1[1] + 1, 1 : res1[2] + 1] = data
    blocks = padded.reshape(res2[0], 2, res2[1], 2, res2[2], 2)
    return blocks.mean(axis=(1, 3, 5)).astype(np.float32)


def _image(data: NDArray, grid: _Grid, dtype: type) -> nb.Nifti1Image:
    """A NIfTI image on ``grid`` with MNI152 xform codes, millimetres and no scaling."""
    img = nb.Nifti1Image(np.asarray(data, dtype=dtype), grid.affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(grid.affine, code=_XFORM_MNI152)
    img.set_sform(grid.affine, code=_XFORM_MNI152)
    return img


def _write_template(folder: Path, stamp: dict[str, Any]) -> None:
    """Write the files of ``tpl-MNI152NLin2009aSym`` into ``folder`` (deterministic bytes)."""
    source_dir = _nilearn_dir()
    res1 = _GRIDS[1]
    loaded = {key: nb.load(source_dir / name) for key, name in NILEARN_FILES.items()}
    # nilearn stores all three as uint8 0-255 without scaling: the T1w keeps those numbers
    # exactly; GM and WM become probabilities in [0, 1] (255 -> exactly 1.0).
    raw = {key: _on_grid(np.asanyarray(img.dataobj), img, res1) for key, img in loaded.items()}
    t1w = raw["T1w"]
    probs = {key: (raw[key].astype(np.float32) / np.float32(255)) for key in ("GM", "WM")}
    # Brain mask: the support of nilearn's T1w. nilearn ships the T1w already skull-stripped
    # ("skullstripped, re-scaled" in its docstring), so its non-zero voxels are the brain: one
    # connected piece without holes (every voxel inside is >= 43), the CSF of the ventricles
    # and sulci included. 1886.5 mL, with 99.3% of the GM + WM probability mass inside.
    mask = (t1w > 0).astype(np.uint8)

    files: dict[str, nb.Nifti1Image] = {
        _filename(1, "T1w"): _image(t1w, res1, np.uint8),
        _filename(1, "label-GM_probseg"): _image(probs["GM"], res1, np.float32),
        _filename(1, "label-WM_probseg"): _image(probs["WM"], res1, np.float32),
        _filename(1, "desc-brain_mask"): _image(mask, res1, np.uint8),
    }
    res2 = _GRIDS[2]
    files[_filename(2, "T1w")] = _image(_halve(t1w), res2, np.float32)
    for label in ("GM", "WM"):
        # A block mean of probabilities stays in [0, 1].
        files[_filename(2, f"label-{label}_probseg")] = _image(
            np.clip(_halve(probs[label]), 0, 1), res2, np.float32
        )
    # A 2 mm voxel is brain when at least half of its eight 1 mm voxels are.
    files[_filename(2, "desc-brain_mask")] = _image(
        (_halve(mask) >= 0.5).astype(np.uint8), res2, np.uint8
    )

    digests = {}
    for name, img in files.items():
        write_nifti(img, folder / name)
        digests[name] = _sha256(folder / name)

    description = dict(_TEMPLATEFLOW_METADATA)
    description["res"] = {str(res): grid.describe() for res, grid in sorted(_GRIDS.items())}
    nilearn_version = metadata.version("nilearn")
    description["GeneratedBy"] = [
        {
            "Name": "aslprep_lite",
            "Version": __version__,
            "Description": (
                f"Embedded copy laid out from the ICBM 2009a nonlinear symmetric T1w, GM and WM "
                f"files of nilearn {nilearn_version} (nilearn/datasets/data). TemplateFlow's "
                "names, metadata and res-1 grid; the T1w is nilearn's skull-stripped T1w "
                "scaled to 0-255 (uint8), GM and WM are nilearn's 8-bit maps divided by 255; "
                "desc-brain_mask is the support (T1w > 0) of that skull-stripped T1w; res-2 "
                "is the mean of 2x2x2 blocks of res-1 (trilinear at the 2 mm centres), the "
                "mask there is >= 0.5 of that mean."
            ),
        }
    ]
    description["EmbeddedFrom"] = {
        **stamp,
        "Package": "nilearn",
        "PackageVersion": nilearn_version,
        "Files": digests,
    }
    (folder / "template_description.json").write_text(
        json.dumps(description, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    (folder / "LICENSE").write_text(_LICENSE, encoding="utf-8")


def layout_embedded_home(home: str | Path | None = None) -> Path:
    """Lay out the embedded TemplateFlow home (``tpl-MNI152NLin2009aSym``) from nilearn's files.

    The folder gets ``tpl-MNI152NLin2009aSym/`` with ``template_description.json``, ``LICENSE``
    and, at ``res-1`` (1 mm) and ``res-2`` (2 mm), ``_T1w``, ``_label-GM_probseg``,
    ``_label-WM_probseg`` and ``_desc-brain_mask`` (:data:`EMBEDDED_FILES`). The same nilearn
    files always give the same bytes.

    Safe for concurrent first use: the template is written into a temporary folder beside the
    target and renamed into place, so a reader sees all of it or none of it. A complete copy
    already in place (same layout version, same nilearn files, every file intact) is left
    alone.

    Parameters
    ----------
    home
        The TemplateFlow home to lay out (default: :func:`embedded_home`).

    Returns
    -------
    Path
        The home, ready to be used as ``TEMPLATEFLOW_HOME``.

    Raises
    ------
    AslprepError
        When nilearn's files are missing or the folder cannot be written.
    """
    home = Path(home).absolute() if home is not None else embedded_home()
    target = home / f"tpl-{EMBEDDED_TEMPLATE}"
    stamp = _source_stamp()
    if _is_complete(target, stamp):
        return home
    try:
        home.mkdir(parents=True, exist_ok=True)
        # A dot-prefixed name: TemplateFlow's index ignores it while it is being written.
        staging = Path(tempfile.mkdtemp(dir=home, prefix=f".{target.name}.", suffix=".tmp"))
    except OSError as err:
        raise AslprepError(
            f"cannot write the embedded template {EMBEDDED_TEMPLATE} here ({err.strerror}): set "
            f"{TEMPLATES_ENV} to a writable folder, or TEMPLATEFLOW_HOME to a pre-fetched "
            "TemplateFlow folder",
            path=str(home),
        ) from None
    try:
        _write_template(staging, stamp)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache may be shared
        _move_into_place(staging, target, stamp)
    except OSError as err:
        raise AslprepError(
            f"cannot write the embedded template {EMBEDDED_TEMPLATE} here ({err.strerror}): "
            f"free some space or set {TEMPLATES_ENV} to another folder",
            path=str(home),
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return home


def _move_into_place(staging: Path, target: Path, stamp: dict[str, Any]) -> None:
    """Rename ``staging`` to ``target``; an outdated ``target`` is moved aside first."""
    for _ in range(5):
        try:
            os.rename(staging, target)  # atomic; fails when target is a non-empty folder
            return
        except OSError:
            if _is_complete(target, stamp):
                return  # another process got there first with the same files
        # An older layout (or a damaged copy): move it out of the way, then try again. If
        # another process moved it already, the rename fails and the loop simply retries.
        aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}.tmp")
        try:
            os.rename(target, aside)
        except FileNotFoundError:
            continue
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"could not move {staging} to {target}")


# ----------------------------------------------------------------------- TemplateFlow's config


def configure_templateflow(template: str | None = None) -> Path:
    """Point TemplateFlow at the right home, offline, before ``templateflow`` is imported.

    templateflow reads ``TEMPLATEFLOW_HOME`` and ``TEMPLATEFLOW_AUTOUPDATE`` once, when
    ``templateflow.conf`` is first imported (``templateflow.api`` imports it), so this must run
    before anything imports templateflow; :func:`get_template` copes when it did not. Importing
    templateflow with no home configured would also write TemplateFlow's skeleton (every
    template as an empty placeholder) into ``~/.cache/templateflow``.

    * ``TEMPLATEFLOW_HOME`` set by the user: that folder is used as it is; aslprep_lite does not
      write into it (only templateflow may, when :func:`get_template` asks for a file the
      folder lists as an empty placeholder and the folder is writable). It must exist and not
      be empty (an empty one is usually a bind mount that did not happen).
    * otherwise: the embedded home (:func:`embedded_home`) is laid out if needed and
      ``TEMPLATEFLOW_HOME`` is set to it, for this process and the processes it starts.

    ``TEMPLATEFLOW_AUTOUPDATE`` is set to ``0`` either way: templateflow 25.x then never
    overwrites what is in the home.

    Parameters
    ----------
    template
        The template the caller is about to look for: an empty home's error names it and its
        pre-fetch command.

    Returns
    -------
    Path
        The TemplateFlow home in use.

    Raises
    ------
    AslprepError
        When the user's ``TEMPLATEFLOW_HOME`` is missing or empty, or the embedded home cannot
        be laid out.
    """
    os.environ["TEMPLATEFLOW_AUTOUPDATE"] = "0"
    user_home = os.environ.get("TEMPLATEFLOW_HOME")
    if user_home:
        # Resolved as templateflow resolves it (no ~ expansion), so both see the same folder.
        home = Path(user_home).absolute()
        if not home.is_dir():
            raise AslprepError(
                "TEMPLATEFLOW_HOME is not a folder: point it at a pre-fetched TemplateFlow "
                "folder (in a container: the mount point), or unset it to use the embedded "
                f"{EMBEDDED_TEMPLATE}",
                path=str(home),
            )
        if not any(home.iterdir()):
            # the template asked for is named with its pre-fetch command: the user's next step
            wanted = (
                f"; template {template} is needed: {_PREFETCH.format(template=template)}"
                if template
                else ""
            )
            raise AslprepError(
                "TEMPLATEFLOW_HOME is empty (a bind mount that did not happen?): point it at a "
                "pre-fetched TemplateFlow folder, or unset it to use the embedded "
                f"{EMBEDDED_TEMPLATE}{wanted}",
                path=str(home),
            )
        return home
    home = layout_embedded_home()
    os.environ["TEMPLATEFLOW_HOME"] = str(home)
    return home


_CLIENTS: dict[Path, Any] = {}


def _client(home: Path) -> Any:
    """``templateflow.api`` when it serves ``home``, else a client of its own for ``home``.

    The second case arises only when templateflow was imported before
    :func:`configure_templateflow` ran, or the home changed since (tests): ``templateflow.api``
    is then stuck with the home it read at import time. A ``TemplateFlowClient`` has the same
    ``ls`` and ``get`` as the module.
    """
    import templateflow.api as tf_api
    from templateflow import conf as tf_conf

    if Path(tf_conf.TF_HOME).absolute() == home and not tf_conf.TF_AUTOUPDATE:
        return tf_api
    if home not in _CLIENTS:
        from templateflow import TemplateFlowClient

        _CLIENTS[home] = TemplateFlowClient(root=home, autoupdate=False)
    return _CLIENTS[home]


# ---------------------------------------------------------------------------------- queries


def _query_text(entities: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in sorted(entities.items())) or "any file"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def get_template(template: str, **entities: Any) -> Path:
    """The one file of ``template`` that matches ``entities``, through TemplateFlow's API.

    Examples: ``get_template("MNI152NLin2009aSym", resolution=1, suffix="T1w")``,
    ``get_template("MNI152NLin2009aSym", resolution=2, desc="brain", suffix="mask")``,
    ``get_template("MNI152NLin2009aSym", resolution=1, label="GM", suffix="probseg")``.

    Parameters
    ----------
    template
        A TemplateFlow identifier, e.g. ``MNI152NLin2009aSym``.
    **entities
        TemplateFlow entities (``resolution``, ``suffix``, ``desc``, ``label``, ``atlas``,
        ``cohort``, ``extension``, ...). Two defaults keep a query from matching more files in
        a full TemplateFlow home than in the embedded one: ``desc=None`` (no ``desc-`` entity:
        ``_T1w`` but not ``_desc-brain_T1w``) and ``extension=[".nii.gz", ".nii"]`` (the image,
        not a JSON sidecar). Pass either explicitly to change it.

    Returns
    -------
    Path
        The absolute path of the file, which exists and is not empty.

    Raises
    ------
    AslprepError
        One line naming the template, the query, the home in use and the fix, when no file or
        several files match, or when the file is only listed (not downloaded) and cannot be
        fetched. A template that is not in the home is never looked for on the network.
    """
    home = configure_templateflow(template)
    client = _client(home)
    shown = _query_text(entities)
    query = {"desc": None, "extension": [".nii.gz", ".nii"], **entities}
    try:
        embedded_here = home == embedded_home()
    except AslprepError:  # no home directory: then the user's TEMPLATEFLOW_HOME is in use
        embedded_here = False
    fix = _PREFETCH.format(template=template)
    if template == EMBEDDED_TEMPLATE and not embedded_here:
        # TemplateFlow's own MNI152NLin2009aSym has res-1 only; the embedded copy has res-2 too.
        fix += (
            f"; or unset TEMPLATEFLOW_HOME to use aslprep_lite's embedded {EMBEDDED_TEMPLATE} "
            "(res-1 and res-2)"
        )
    try:
        # ls() only reads the local index: no network, whatever the home holds.
        matches = [Path(p) for p in client.ls(template, **query)]
    except Exception as err:  # pybids: an entity TemplateFlow does not know, a bad value
        raise AslprepError(
            f"invalid TemplateFlow query for template {template} ({shown}) in this "
            f"TEMPLATEFLOW_HOME: {_one_line(err)}",
            path=str(home),
        ) from None

    if not matches:
        if not (home / f"tpl-{template}").is_dir():
            where = (
                f"the embedded TEMPLATEFLOW_HOME, which holds only {EMBEDDED_TEMPLATE}"
                if embedded_here
                else "this TEMPLATEFLOW_HOME"
            )
            raise AslprepError(
                f"template {template} ({shown}) is not in {where}, and aslprep_lite does not "
                f"download templates at run time: {fix}",
                path=str(home),
            )
        raise AslprepError(
            f"no file of template {template} matches {shown} in this TEMPLATEFLOW_HOME: check "
            f'the query (list the files with TEMPLATEFLOW_HOME={home} python -c "import '
            f"templateflow.api as tf; print(tf.ls('{template}'))\"), or {fix}",
            path=str(home),
        )
    if len(matches) > 1:
        names = ", ".join(p.name for p in sorted(matches)[:4])
        more = f" and {len(matches) - 4} more" if len(matches) > 4 else ""
        raise AslprepError(
            f"{len(matches)} files of template {template} match {shown} in this "
            f"TEMPLATEFLOW_HOME ({names}{more}): add entities (desc=, label=, atlas=, "
            "resolution=, ...) to pick one",
            path=str(home),
        )

    path = matches[0].absolute()
    if path.is_file() and path.stat().st_size > 0:
        return path
    # TemplateFlow lists the file but holds an empty placeholder: only a download can fill it.
    # aslprep_lite itself never writes into a user's home; templateflow's own download is tried
    # when the home is writable, and fails within templateflow's timeout without a network.
    if not os.access(path.parent, os.W_OK):
        reason = "the folder is read-only"
    else:
        try:
            fetched = client.get(template, **query)
        except Exception as err:  # requests' ConnectionError, RuntimeError, OSError, ...
            detail = _one_line(err)
            detail = detail if len(detail) <= 120 else detail[:117] + "..."
            reason = f"the download failed ({type(err).__name__}: {detail})"
        else:
            fetched = Path(fetched) if isinstance(fetched, (str, os.PathLike)) else None
            if fetched is not None and fetched.is_file() and fetched.stat().st_size > 0:
                return fetched.absolute()
            reason = "the download left it empty"
    raise AslprepError(
        f"{path.name} of template {template} ({shown}) is listed in this TEMPLATEFLOW_HOME but "
        f"not downloaded, and {reason}: {fix}",
        path=str(home),
    )


def template_provenance(template: str) -> dict[str, Any]:
    """Where the files of ``template`` come from, for the sidecars of outputs in its space.

    Parameters
    ----------
    template
        A TemplateFlow identifier, e.g. ``MNI152NLin2009aSym``.

    Returns
    -------
    dict
        ``Template``, ``Source`` (``"embedded"``: aslprep_lite's copy made from nilearn's ICBM
        2009a files; ``"TEMPLATEFLOW_HOME"``: a TemplateFlow folder), ``TemplateFlowHome``,
        ``templateflowVersion``, the template's ``Name`` and ``ReferencesAndLinks`` when its
        ``template_description.json`` has them, and for the embedded copy ``nilearnVersion``,
        ``LayoutVersion`` and ``Description`` (how it was made).
    """
    home = configure_templateflow()
    info: dict[str, Any] = {
        "Template": template,
        "Source": "TEMPLATEFLOW_HOME",
        "TemplateFlowHome": str(home),
        "templateflowVersion": metadata.version("templateflow"),
    }
    try:
        description = json.loads(
            (home / f"tpl-{template}" / "template_description.json").read_text()
        )
    except (OSError, ValueError):
        return info
    for key in ("Name", "ReferencesAndLinks"):
        if key in description:
            info[key] = description[key]
    embedded = description.get("EmbeddedFrom")
    # Decided by the files, not by the folder's name: a copy of the embedded home that a user
    # points TEMPLATEFLOW_HOME at is still nilearn's template.
    if isinstance(embedded, dict) and embedded.get("Package") == "nilearn":
        info["Source"] = "embedded"
        info["nilearnVersion"] = embedded.get("PackageVersion")
        info["LayoutVersion"] = embedded.get("LayoutVersion")
        generated = description.get("GeneratedBy") or [{}]
        info["Description"] = generated[0].get("Description")
    return info
