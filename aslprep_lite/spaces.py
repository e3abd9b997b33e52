"""Output spaces: where the derivatives are written, fMRIPrep's ``--output-spaces`` grammar.

A space is one of

* ``asl``: the run's own (native) grid. Its files keep the names they have always had, with no
  ``space-`` entity.
* ``T1w``: the participant's T1w grid (``space-T1w``).
* a TemplateFlow template, ``TEMPLATE[:cohort-LABEL][:res-N]`` as in fMRIPrep, the modifiers in
  any order: ``MNI152NLin2009cAsym:res-2``, ``MNIPediatricAsym:cohort-2:res-1``. Files get
  ``space-TEMPLATE[_cohort-LABEL]_res-N``.

Decisions:

* ``res-`` takes a TemplateFlow resolution index, a positive whole number (``res-02`` is read
  as ``res-2``). Without ``res-`` a template is written at ``res-2``
  (:data:`DEFAULT_RESOLUTION`), so that every template file name carries its resolution.
  fMRIPrep's ``res-native`` (the ASL's own voxel size on the template's axes) is not supported:
  resampling needs a grid that TemplateFlow describes.
* ``cohort-`` takes a whole number, as TemplateFlow's cohorts are (``cohort-01`` is read as
  ``cohort-1``). A template that comes in cohorts must be given one (:func:`check_templates`).
* fMRIPrep's other names for the native spaces (``func``, ``bold``, ``run``, ``boldref``,
  ``anat``, ...) and the surface spaces (``fsnative``, ``fsaverage``, ``fsLR``, ...) are refused
  with a pointer to ``asl`` / ``T1w``: aslprep_lite writes volumes only.

:func:`check_templates` fetches, before any processing, the files each template space needs,
through :func:`aslprep_lite.templates.get_template` (offline; see that module).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aslprep_lite.errors import AslprepError

#: The run's own grid: derivatives without a ``space-`` entity.
NATIVE = "asl"
#: The participant's T1w grid.
ANATOMICAL = "T1w"
#: The spaces that are not templates.
NONSTANDARD = (NATIVE, ANATOMICAL)

#: The TemplateFlow resolution index of a template given without ``res-``.
DEFAULT_RESOLUTION = "2"

#: What ``--output-spaces`` accepts, quoted in every error.
GRAMMAR = "asl, T1w or TEMPLATE[:cohort-N][:res-N] (e.g. MNI152NLin2009cAsym:res-2)"

#: The default: native, T1w and the template that works offline (the embedded
#: ``MNI152NLin2009aSym`` of :mod:`aslprep_lite.templates`).
DEFAULT_OUTPUT_SPACES = ("asl", "T1w", "MNI152NLin2009aSym:res-2")

#: fMRIPrep's (and others') names of the native spaces, lower case: the name to use instead.
_ALIASES = {
    **dict.fromkeys(
        ("asl", "native", "func", "bold", "run", "boldref", "sbref", "aslref", "asl-native"),
        NATIVE,
    ),
    **dict.fromkeys(("t1w", "anat", "t1w-native"), ANATOMICAL),
}
#: Surface spaces (fMRIPrep's CIFTI and FreeSurfer outputs), lower case.
_SURFACES = ("fsnative", "fsaverage", "fsaverage5", "fsaverage6", "fslr")

#: TemplateFlow identifiers: letters and digits (``tpl-([a-zA-Z0-9]+)`` in its config).
_TEMPLATE_ID = re.compile(r"[A-Za-z0-9]+")
_NUMBER = re.compile(r"[0-9]+")

#: The template files each template space needs, by role: TemplateFlow entities.
REQUIRED_FILES: dict[str, dict[str, str]] = {
    "T1w": {"suffix": "T1w"},
    "mask": {"desc": "brain", "suffix": "mask"},
}
#: Used when the template has them (tissue priors of the T1w-free mode; TemplateFlow's
#: MNI152NLin6Asym has none): without a CSF map, CSF is brain mask - GM - WM.
OPTIONAL_FILES: dict[str, dict[str, str]] = {
    "GM": {"label": "GM", "suffix": "probseg"},
    "WM": {"label": "WM", "suffix": "probseg"},
    "CSF": {"label": "CSF", "suffix": "probseg"},
}
#: The registration grid: these roles at res-1 when the template has it.
REGISTRATION_RESOLUTION = 1
REGISTRATION_ROLES = ("T1w", "mask")


@dataclass(frozen=True)
class Space:
    """One output space.

    Parameters
    ----------
    name
        ``"asl"`` (the run's native grid), ``"T1w"`` or a TemplateFlow template identifier.
    cohort
        The template's cohort (a whole number as text), or None.
    resolution
        The template's TemplateFlow resolution index as text (``"2"``); None for ``asl`` and
        ``T1w``. A template built without one gets :data:`DEFAULT_RESOLUTION`.
    """

    name: str
    cohort: str | None = None
    resolution: str | None = None

    def __post_init__(self) -> None:
        if self.name in NONSTANDARD:
            if self.cohort is not None or self.resolution is not None:
                raise ValueError(f"{self.name} takes no cohort or resolution")
        elif self.resolution is None:
            object.__setattr__(self, "resolution", DEFAULT_RESOLUTION)

    @property
    def is_template(self) -> bool:
        """Whether this is a TemplateFlow template (not ``asl`` or ``T1w``)."""
        return self.name not in NONSTANDARD

    @property
    def entities(self) -> dict[str, str]:
        """The BIDS filename entities of this space, in filename order.

        ``{}`` for ``asl`` (native files have no ``space-`` entity), ``{"space": "T1w"}``, or
        ``{"space": TEMPLATE, "cohort": N, "res": N}`` (``cohort`` only when given).
        """
        if self.name == NATIVE:
            return {}
        entities = {"space": self.name}
        if self.cohort is not None:
            entities["cohort"] = self.cohort
        if self.resolution is not None:
            entities["res"] = self.resolution
        return entities

    @property
    def template_key(self) -> str:
        """The template with its cohort, as transforms name it: ``X``, or ``X+N`` for cohort N.

        sMRIPrep joins the cohort with ``+`` (``from-T1w_to-MNIPediatricAsym+2``); the
        resolution does not change a transform, so two resolutions of one template and cohort
        share one normalization, and two cohorts of one template do not.
        """
        return f"{self.name}+{self.cohort}" if self.cohort is not None else self.name

    @property
    def label(self) -> str:
        """The command-line spelling, e.g. ``MNI152NLin2009cAsym:res-2``."""
        modifiers = [f"{key}-{value}" for key, value in self.entities.items() if key != "space"]
        return ":".join([self.name, *modifiers])

    def __str__(self) -> str:
        return self.label


def _invalid(value: str, reason: str) -> AslprepError:
    return AslprepError(f"--output-spaces {value!r}: {reason}; each space is {GRAMMAR}")


def _name_problem(name: str) -> str | None:
    """Why ``name`` is not ``asl``, ``T1w`` or a TemplateFlow identifier (None: it is)."""
    if not name:
        return "the space name is empty"
    if name in NONSTANDARD:
        return None
    alias = _ALIASES.get(name.lower())
    if alias is not None:
        kind = "the run's own grid" if alias == NATIVE else "the participant's T1w grid"
        return f"write {alias} for {kind}"
    if name.lower() in _SURFACES:
        return "surface spaces are not supported: aslprep_lite writes volumes only"
    if any(c in name for c in ", \t"):
        return "give each space as its own argument, separated by blanks"
    if not _TEMPLATE_ID.fullmatch(name):
        return f"{name!r} is not a TemplateFlow template identifier (letters and digits only)"
    return None


def parse_space(value: str) -> Space:
    """Parse one ``--output-spaces`` value: ``asl``, ``T1w`` or ``TEMPLATE[:cohort-N][:res-N]``.

    Raises
    ------
    AslprepError
        One line naming ``value``, what is wrong with it and the accepted grammar.
    """
    name, *modifiers = value.split(":")
    problem = _name_problem(name)
    if problem:
        raise _invalid(value, problem)
    given: dict[str, str] = {}
    for modifier in modifiers:
        key, dash, text = modifier.partition("-")
        if not modifier:
            raise _invalid(value, "empty modifier (two ':' in a row, or a ':' at the end)")
        if not dash or key not in ("cohort", "res"):
            raise _invalid(
                value, f"unknown modifier {modifier!r}: only cohort-N and res-N are accepted"
            )
        if key in given:
            raise _invalid(value, f"{key}- is given twice")
        if not _NUMBER.fullmatch(text) or (key == "res" and int(text) == 0):
            what = (
                "a TemplateFlow resolution index, a positive whole number such as res-2 "
                "(res-native is not supported)"
                if key == "res"
                else "a TemplateFlow cohort, a whole number such as cohort-1"
            )
            raise _invalid(value, f"{modifier!r} must be {what}")
        given[key] = str(int(text))
    if given and name in NONSTANDARD:
        raise _invalid(
            value, f"{name} takes no cohort- or res- modifier: it is written on its own grid"
        )
    return Space(name, cohort=given.get("cohort"), resolution=given.get("res"))


def parse_output_spaces(values: Sequence[str]) -> tuple[Space, ...]:
    """Parse ``--output-spaces`` values; duplicates are dropped, the first kept in place.

    ``MNI152NLin2009cAsym``, ``MNI152NLin2009cAsym:res-2`` and ``MNI152NLin2009cAsym:res-02``
    are the same space, and so are modifiers given in another order.

    Raises
    ------
    AslprepError
        One line naming the first bad value and the accepted grammar, or when no value is given.
    """
    if isinstance(values, str):  # one value, not its characters
        values = [values]
    if not values:
        raise AslprepError(f"--output-spaces needs at least one space: {GRAMMAR}")
    return tuple(dict.fromkeys(parse_space(value) for value in values))


def describe_spaces(spaces: Iterable[Space]) -> str:
    """A short, one-line description of the output spaces, for the run summary.

    Example: ``asl (the run's own grid); T1w (the participant's T1w grid);
    MNI152NLin2009aSym:res-2 (TemplateFlow template MNI152NLin2009aSym, resolution 2)``.
    """
    parts = []
    for space in spaces:
        if space.name == NATIVE:
            what = "the run's own grid"
        elif space.name == ANATOMICAL:
            what = "the participant's T1w grid"
        else:
            cohort = f", cohort {space.cohort}" if space.cohort is not None else ""
            what = f"TemplateFlow template {space.name}{cohort}, resolution {space.resolution}"
        parts.append(f"{space.label} ({what})")
    return "; ".join(parts)


# ------------------------------------------------------------------------- template files


def _cohorts(home: Path, template: str) -> list[str] | None:
    """The cohorts listed in the template's ``template_description.json`` (None: unknown)."""
    try:
        description = json.loads(
            (home / f"tpl-{template}" / "template_description.json").read_text()
        )
    except (OSError, ValueError):
        return None
    cohorts = description.get("cohort") if isinstance(description, dict) else None
    if not isinstance(cohorts, dict):
        return []
    return sorted((str(c) for c in cohorts), key=lambda c: (len(c), c))


def _check_cohort(space: Space, home: Path) -> None:
    """One line when the template has cohorts and none is given, or not the one given."""
    cohorts = _cohorts(home, space.name)
    if cohorts is None:  # no description: let the file queries decide
        return
    if space.cohort is None and cohorts:
        raise AslprepError(
            f"--output-spaces {space.label}: template {space.name} comes in cohorts "
            f"({', '.join(cohorts)}): choose one, e.g. "
            f"{space.name}:cohort-{cohorts[0]}:res-{space.resolution}"
        )
    if space.cohort is not None and space.cohort not in cohorts:
        listed = f"its cohorts are {', '.join(cohorts)}" if cohorts else "it has none"
        raise AslprepError(
            f"--output-spaces {space.label}: template {space.name} has no cohort "
            f"{space.cohort} ({listed})"
        )


def _template_files(space: Space) -> dict[str, Path]:
    """The files of one template space, by role (see :func:`check_templates`)."""
    from aslprep_lite.templates import _client, configure_templateflow, get_template

    home = configure_templateflow(space.name)
    _check_cohort(space, home)
    base: dict[str, Any] = {} if space.cohort is None else {"cohort": int(space.cohort)}
    resolution = int(space.resolution or DEFAULT_RESOLUTION)

    def listed(entities: dict[str, Any]) -> bool:
        # the query get_template makes, but only the local index: is the file there at all?
        query = {"desc": None, "extension": [".nii.gz", ".nii"], **base, **entities}
        try:
            return bool(_client(home).ls(space.name, **query))
        except Exception:  # an invalid query: get_template then reports it in one line
            return True

    files = {
        role: get_template(space.name, **base, resolution=resolution, **entities)
        for role, entities in REQUIRED_FILES.items()
    }
    for role, entities in OPTIONAL_FILES.items():
        if listed({"resolution": resolution, **entities}):
            files[role] = get_template(space.name, **base, resolution=resolution, **entities)
    for role in REGISTRATION_ROLES:
        query = {"resolution": REGISTRATION_RESOLUTION, **REQUIRED_FILES[role]}
        if resolution != REGISTRATION_RESOLUTION and listed(query):
            files[f"registration_{role}"] = get_template(space.name, **base, **query)
        else:
            files[f"registration_{role}"] = files[role]
    return files


def check_templates(spaces: Iterable[Space]) -> dict[str, dict[str, Path]]:
    """Fetch, before any processing, the template files each template space needs.

    For each template space (``asl`` and ``T1w`` need none), at its resolution and cohort:
    ``T1w`` and ``mask`` (``desc-brain_mask``), required; ``GM``, ``WM`` and ``CSF``
    (``label-*_probseg``, the tissue priors of the T1w-free mode) when the template has them
    (the embedded MNI152NLin2009aSym has no CSF map: CSF is then brain mask - GM - WM;
    TemplateFlow's MNI152NLin6Asym has none); and the registration grid
    ``registration_T1w`` and ``registration_mask``: the T1w and mask at res-1 when the template
    has them, else the same files as ``T1w`` and ``mask``.

    A file the template lists must be obtainable, optional or not: which files a run used
    must not depend on which ones happened to be downloaded.

    Parameters
    ----------
    spaces
        Output spaces, e.g. ``Settings.outputs.output_spaces``.

    Returns
    -------
    dict
        ``{space.label: {role: path}}`` for the template spaces, in the order given.

    Raises
    ------
    AslprepError
        The one-line error of :func:`aslprep_lite.templates.get_template` for the first
        required file that is missing (naming the template, the query and the fix), or a
        template with cohorts given none, or a cohort the template does not have.
    """
    found: dict[str, dict[str, Path]] = {}
    for space in spaces:
        if space.is_template and space.label not in found:
            found[space.label] = _template_files(space)
    return found


def anatomy_template_files() -> dict[str, Path]:
    """The files of the template that drives T1w brain extraction and segmentation.

    Always the embedded ``MNI152NLin2009aSym`` (:data:`aslprep_lite.templates.EMBEDDED_TEMPLATE`)
    at res-1: it works offline and has the GM and WM priors the segmentation needs, whatever
    the output spaces are.
    """
    from aslprep_lite.templates import EMBEDDED_TEMPLATE, _filename, layout_embedded_home

    # From the embedded home even when TEMPLATEFLOW_HOME points elsewhere: a user's folder
    # pre-fetched for other templates need not hold this one.
    folder = layout_embedded_home() / f"tpl-{EMBEDDED_TEMPLATE}"
    names = {"T1w": "T1w", "mask": "desc-brain_mask", "GM": "label-GM_probseg",
             "WM": "label-WM_probseg"}  # fmt: skip
    return {role: folder / _filename(1, entities) for role, entities in names.items()}


def embedded_space_files() -> dict[str, Path]:
    """The files of the default template space, ``MNI152NLin2009aSym:res-2``, from the
    embedded home: the same roles and files :func:`check_templates` gives that space there.

    The quality control of a run without a T1w or a template space brings these priors to
    the ASL grid, so that its table does not depend on which output spaces were asked for.
    """
    from aslprep_lite.templates import _filename

    res1 = anatomy_template_files()
    folder = res1["T1w"].parent
    names = {"T1w": "T1w", "mask": "desc-brain_mask", "GM": "label-GM_probseg",
             "WM": "label-WM_probseg"}  # fmt: skip
    files = {role: folder / _filename(2, entities) for role, entities in names.items()}
    return files | {"registration_T1w": res1["T1w"], "registration_mask": res1["mask"]}
