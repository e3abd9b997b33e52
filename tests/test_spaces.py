"""Output spaces: the ``--output-spaces`` grammar, file name entities, the template files each
space needs (offline, through the embedded TemplateFlow home) and the new command-line options.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from aslprep_lite.cli.parser import build_parser
from aslprep_lite.config import OutputOptions, QuantificationOptions, build_settings
from aslprep_lite.errors import AslprepError
from aslprep_lite.spaces import (
    DEFAULT_OUTPUT_SPACES,
    GRAMMAR,
    Space,
    check_templates,
    describe_spaces,
    parse_output_spaces,
    parse_space,
)
from aslprep_lite.templates import EMBEDDED_TEMPLATE, TEMPLATES_ENV, layout_embedded_home

TPL = f"tpl-{EMBEDDED_TEMPLATE}"


# ------------------------------------------------------------------------------- grammar


#: value -> (name, cohort, resolution), label
VALID = {
    "asl": (("asl", None, None), "asl"),
    "T1w": (("T1w", None, None), "T1w"),
    "MNI152NLin2009cAsym:res-2": (("MNI152NLin2009cAsym", None, "2"), "MNI152NLin2009cAsym:res-2"),
    "MNI152NLin2009cAsym": (("MNI152NLin2009cAsym", None, "2"), "MNI152NLin2009cAsym:res-2"),
    "MNI152NLin6Asym:res-02": (("MNI152NLin6Asym", None, "2"), "MNI152NLin6Asym:res-2"),
    "MNI152NLin6Asym:res-1": (("MNI152NLin6Asym", None, "1"), "MNI152NLin6Asym:res-1"),
    "MNIPediatricAsym:cohort-2:res-1": (
        ("MNIPediatricAsym", "2", "1"),
        "MNIPediatricAsym:cohort-2:res-1",
    ),
    "MNIPediatricAsym:res-1:cohort-2": (
        ("MNIPediatricAsym", "2", "1"),
        "MNIPediatricAsym:cohort-2:res-1",
    ),
    "MNIPediatricAsym:cohort-01": (
        ("MNIPediatricAsym", "1", "2"),
        "MNIPediatricAsym:cohort-1:res-2",
    ),
    "UNCInfant:cohort-1:res-1": (("UNCInfant", "1", "1"), "UNCInfant:cohort-1:res-1"),
}


@pytest.mark.parametrize("value", list(VALID))
def test_valid_spaces(value: str) -> None:
    (name, cohort, resolution), label = VALID[value]
    space = parse_space(value)
    assert (space.name, space.cohort, space.resolution) == (name, cohort, resolution)
    assert space.label == str(space) == label
    assert parse_space(space.label) == space  # the label reads back as the same space
    assert space.is_template == (name not in ("asl", "T1w"))


def test_entities_in_filename_order() -> None:
    cases = {
        "asl": {},
        "T1w": {"space": "T1w"},
        "MNI152NLin2009cAsym:res-2": {"space": "MNI152NLin2009cAsym", "res": "2"},
        "MNIPediatricAsym:res-1:cohort-2": {
            "space": "MNIPediatricAsym",
            "cohort": "2",
            "res": "1",
        },
    }
    names = []
    for value, expected in cases.items():
        entities = parse_space(value).entities
        assert entities == expected
        assert list(entities) == list(expected)  # the order, not only the content
        names.append("_".join(["sub-01", *(f"{k}-{v}" for k, v in entities.items()), "cbf"]))
    assert names == [
        "sub-01_cbf",  # native files keep their names
        "sub-01_space-T1w_cbf",
        "sub-01_space-MNI152NLin2009cAsym_res-2_cbf",
        "sub-01_space-MNIPediatricAsym_cohort-2_res-1_cbf",
    ]


def test_space_built_directly() -> None:
    assert Space("MNI152NLin2009cAsym") == parse_space("MNI152NLin2009cAsym:res-2")
    assert Space("asl").entities == {}
    assert not Space("T1w").is_template
    with pytest.raises(ValueError, match="takes no cohort or resolution"):
        Space("asl", resolution="2")


def test_duplicates_removed_keeping_order() -> None:
    spaces = parse_output_spaces(
        [
            "T1w",
            "MNI152NLin2009cAsym:res-2",
            "asl",
            "MNI152NLin2009cAsym",
            "T1w",
            "MNIPediatricAsym:res-1:cohort-2",
            "MNIPediatricAsym:cohort-2:res-01",
            "MNI152NLin2009cAsym:res-1",
        ]
    )
    assert [s.label for s in spaces] == [
        "T1w",
        "MNI152NLin2009cAsym:res-2",
        "asl",
        "MNIPediatricAsym:cohort-2:res-1",
        "MNI152NLin2009cAsym:res-1",
    ]


def test_one_string_is_one_space() -> None:
    assert parse_output_spaces("T1w") == (Space("T1w"),)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "the space name is empty"),
        (":res-2", "the space name is empty"),
        ("MNI152NLin2009cAsym:den-2", "unknown modifier 'den-2': only cohort-N and res-N"),
        ("MNI152NLin2009cAsym:res2", "unknown modifier 'res2'"),
        ("MNI152NLin2009cAsym:RES-2", "unknown modifier 'RES-2'"),
        ("MNI152NLin2009cAsym::res-2", "empty modifier"),
        ("MNI152NLin2009cAsym:res-2:", "empty modifier"),
        ("MNI152NLin2009cAsym:res-1:res-2", "res- is given twice"),
        ("MNIPediatricAsym:cohort-1:cohort-2", "cohort- is given twice"),
        ("MNI152NLin2009cAsym:res-native", "(res-native is not supported)"),
        ("MNI152NLin2009cAsym:res-0", "'res-0' must be a TemplateFlow resolution index"),
        ("MNI152NLin2009cAsym:res-", "'res-' must be a TemplateFlow resolution index"),
        ("MNI152NLin2009cAsym:res-1.5", "positive whole number"),
        ("MNIPediatricAsym:cohort-a", "'cohort-a' must be a TemplateFlow cohort"),
        ("MNI-152", "'MNI-152' is not a TemplateFlow template identifier"),
        ("tpl-MNI152NLin2009cAsym", "is not a TemplateFlow template identifier"),
        ("MNI152_NLin", "(letters and digits only)"),
        ("asl:res-2", "asl takes no cohort- or res- modifier"),
        ("T1w:res-2", "T1w takes no cohort- or res- modifier"),
        ("T1w:cohort-1", "T1w takes no cohort- or res- modifier"),
        ("ASL", "write asl for the run's own grid"),
        ("asl-native", "write asl for the run's own grid"),
        ("func", "write asl for the run's own grid"),
        ("bold", "write asl for the run's own grid"),
        ("anat", "write T1w for the participant's T1w grid"),
        ("t1w", "write T1w for the participant's T1w grid"),
        ("fsaverage", "surface spaces are not supported"),
        ("fsLR", "surface spaces are not supported"),
        ("asl,T1w", "give each space as its own argument"),
        ("asl T1w", "give each space as its own argument"),
    ],
)
def test_invalid_spaces_are_one_line(value: str, reason: str) -> None:
    with pytest.raises(AslprepError) as caught:
        parse_output_spaces(["asl", value])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"--output-spaces {value!r}: ")
    assert reason in message
    assert message.endswith(f"; each space is {GRAMMAR}")


def test_no_space_at_all() -> None:
    with pytest.raises(AslprepError, match=r"^--output-spaces needs at least one space: asl,"):
        parse_output_spaces([])


def test_defaults() -> None:
    spaces = parse_output_spaces(DEFAULT_OUTPUT_SPACES)
    assert [s.label for s in spaces] == list(DEFAULT_OUTPUT_SPACES)
    assert spaces[-1] == Space(EMBEDDED_TEMPLATE, resolution="2")  # works offline
    assert OutputOptions(output_dir=Path("out")).output_spaces == spaces
    text = describe_spaces(spaces)
    assert "\n" not in text
    assert text == (
        "asl (the run's own grid); T1w (the participant's T1w grid); "
        "MNI152NLin2009aSym:res-2 (TemplateFlow template MNI152NLin2009aSym, resolution 2)"
    )
    assert "cohort 2, resolution 1" in describe_spaces([parse_space("X:cohort-2:res-1")])


# ----------------------------------------------------------------------- template files


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded home laid out once for the module."""
    return layout_embedded_home(tmp_path_factory.mktemp("templates") / "templateflow")


@pytest.fixture
def offline(embedded: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The embedded home in use, as on a machine without TEMPLATEFLOW_HOME (restored after)."""
    monkeypatch.setenv(TEMPLATES_ENV, str(embedded))
    monkeypatch.delenv("TEMPLATEFLOW_HOME", raising=False)  # configure sets it: reset after
    monkeypatch.setenv("TEMPLATEFLOW_AUTOUPDATE", "0")
    return embedded


def _user_home(tmp_path: Path, embedded: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's TEMPLATEFLOW_HOME holding a copy of the embedded template."""
    user = tmp_path / "templateflow"
    shutil.copytree(embedded, user)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(user))
    monkeypatch.setenv("TEMPLATEFLOW_AUTOUPDATE", "0")
    return user


def _write_template(home: Path, name: str, files: list[str], cohorts: list[str] | None = None):
    """A small template ``name`` with ``files`` (names after ``tpl-NAME_``)."""
    folder = home / f"tpl-{name}"
    folder.mkdir()
    description = {"Identifier": name, "Name": name}
    if cohorts:
        description["cohort"] = {c: {"name": f"cohort {c}"} for c in cohorts}
    (folder / "template_description.json").write_text(json.dumps(description))
    img = nb.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4))
    for file in files:
        cohort = file.split("_")[0] if file.startswith("cohort-") else None
        target = folder / cohort if cohort else folder
        target.mkdir(exist_ok=True)
        nb.save(img, target / f"tpl-{name}_{file}.nii.gz")


def test_check_templates_embedded(offline: Path) -> None:
    found = check_templates(parse_output_spaces(DEFAULT_OUTPUT_SPACES))
    assert list(found) == ["MNI152NLin2009aSym:res-2"]  # asl and T1w need no template file
    files = found["MNI152NLin2009aSym:res-2"]
    folder = offline / TPL
    assert files == {
        "T1w": folder / f"{TPL}_res-2_T1w.nii.gz",
        "mask": folder / f"{TPL}_res-2_desc-brain_mask.nii.gz",
        "GM": folder / f"{TPL}_res-2_label-GM_probseg.nii.gz",
        "WM": folder / f"{TPL}_res-2_label-WM_probseg.nii.gz",
        # no CSF map in the embedded copy; registration on the res-1 grid
        "registration_T1w": folder / f"{TPL}_res-1_T1w.nii.gz",
        "registration_mask": folder / f"{TPL}_res-1_desc-brain_mask.nii.gz",
    }
    res1 = check_templates([parse_space(f"{EMBEDDED_TEMPLATE}:res-1")])
    files = res1[f"{EMBEDDED_TEMPLATE}:res-1"]
    assert files["T1w"] == files["registration_T1w"] == folder / f"{TPL}_res-1_T1w.nii.gz"
    assert files["mask"] == files["registration_mask"]
    assert check_templates(parse_output_spaces(["asl", "T1w"])) == {}


def test_missing_template_is_one_line(offline: Path) -> None:
    with pytest.raises(AslprepError) as caught:
        check_templates(parse_output_spaces(["asl", "MNI152NLin6Asym:res-2"]))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{offline}: template MNI152NLin6Asym (resolution=2, ")
    assert f"not in the embedded TEMPLATEFLOW_HOME, which holds only {EMBEDDED_TEMPLATE}" in (
        message
    )
    assert "tf.get('MNI152NLin6Asym')" in message


def test_missing_template_in_user_home(
    embedded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = _user_home(tmp_path, embedded, monkeypatch)
    with pytest.raises(AslprepError) as caught:
        check_templates([parse_space("MNI152NLin6Asym:res-2")])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{user}: template MNI152NLin6Asym (resolution=2, suffix='T1w')")
    assert "is not in this TEMPLATEFLOW_HOME" in message


def test_empty_templateflow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mount").mkdir()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "mount"))
    monkeypatch.setenv("TEMPLATEFLOW_AUTOUPDATE", "0")
    with pytest.raises(AslprepError, match="TEMPLATEFLOW_HOME is empty") as caught:
        check_templates([parse_space("MNI152NLin6Asym:res-2")])
    assert "\n" not in str(caught.value)


def test_tissue_maps_are_optional(
    embedded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = _user_home(tmp_path, embedded, monkeypatch)
    # T1w and mask only, as TemplateFlow's MNI152NLin6Asym: outputs need no tissue map
    _write_template(user, "Sketch", ["res-2_T1w", "res-2_desc-brain_mask"])
    files = check_templates([parse_space("Sketch")])["Sketch:res-2"]
    assert {"T1w", "mask"} <= set(files) and not {"GM", "WM", "CSF"} & set(files)


def test_required_file_missing_names_it(
    embedded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = _user_home(tmp_path, embedded, monkeypatch)
    _write_template(user, "Sketch", ["res-2_T1w"])
    with pytest.raises(AslprepError) as caught:
        check_templates([parse_space("Sketch")])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"{user}: no file of template Sketch matches desc='brain', resolution=2, suffix='mask'"
    )


def test_cohorts_csf_and_registration_grid(
    embedded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = _user_home(tmp_path, embedded, monkeypatch)
    roles = ["T1w", "desc-brain_mask", "label-GM_probseg", "label-WM_probseg", "label-CSF_probseg"]
    _write_template(
        user,
        "Kid",
        [f"cohort-{c}_res-{r}_{role}" for c in (1, 2) for r in (1, 2) for role in roles],
        cohorts=["1", "2"],
    )
    found = check_templates(parse_output_spaces(["Kid:res-2:cohort-2", "asl"]))
    folder = user / "tpl-Kid" / "cohort-2"
    assert found == {
        "Kid:cohort-2:res-2": {
            "T1w": folder / "tpl-Kid_cohort-2_res-2_T1w.nii.gz",
            "mask": folder / "tpl-Kid_cohort-2_res-2_desc-brain_mask.nii.gz",
            "GM": folder / "tpl-Kid_cohort-2_res-2_label-GM_probseg.nii.gz",
            "WM": folder / "tpl-Kid_cohort-2_res-2_label-WM_probseg.nii.gz",
            "CSF": folder / "tpl-Kid_cohort-2_res-2_label-CSF_probseg.nii.gz",
            "registration_T1w": folder / "tpl-Kid_cohort-2_res-1_T1w.nii.gz",
            "registration_mask": folder / "tpl-Kid_cohort-2_res-1_desc-brain_mask.nii.gz",
        }
    }
    for value, expected in (
        ("Kid", "--output-spaces Kid:res-2: template Kid comes in cohorts (1, 2): choose one, "
         "e.g. Kid:cohort-1:res-2"),
        ("Kid:cohort-3", "--output-spaces Kid:cohort-3:res-2: template Kid has no cohort 3 "
         "(its cohorts are 1, 2)"),
        (f"{EMBEDDED_TEMPLATE}:cohort-1", f"--output-spaces {EMBEDDED_TEMPLATE}:cohort-1:res-2: "
         f"template {EMBEDDED_TEMPLATE} has no cohort 1 (it has none)"),
    ):  # fmt: skip
        with pytest.raises(AslprepError) as caught:
            check_templates([parse_space(value)])
        assert str(caught.value) == expected


# ------------------------------------------------------------------ command line and config


def _settings(tmp_path: Path, *args: str):
    (tmp_path / "bids").mkdir(exist_ok=True)
    options = build_parser().parse_args(
        [str(tmp_path / "bids"), str(tmp_path / "out"), "participant", *args]
    )
    return build_settings(options)


def test_defaults_without_the_new_flags(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert settings.outputs.output_spaces == parse_output_spaces(DEFAULT_OUTPUT_SPACES)
    assert settings.execution.anat_derivatives is None
    assert settings.quantification.pvc is True


def test_new_flags(tmp_path: Path) -> None:
    anat = tmp_path / "smriprep"
    anat.mkdir()
    settings = _settings(
        tmp_path,
        "--output-spaces",
        "MNIPediatricAsym:res-1:cohort-2",
        "asl",
        "MNI152NLin2009cAsym",
        "asl",
        "--anat-derivatives",
        str(anat),
        "--no-pvc",
    )
    assert [s.label for s in settings.outputs.output_spaces] == [
        "MNIPediatricAsym:cohort-2:res-1",
        "asl",
        "MNI152NLin2009cAsym:res-2",
    ]
    assert settings.execution.anat_derivatives == anat.resolve()
    assert settings.quantification.pvc is False


def test_bad_output_space_from_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(AslprepError) as caught:
        _settings(tmp_path, "--output-spaces", "asl", "T1w:res-2")
    assert str(caught.value).startswith("--output-spaces 'T1w:res-2': T1w takes no")
    assert "\n" not in str(caught.value)


def test_output_spaces_needs_a_value(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        _settings(tmp_path, "--output-spaces")
    assert caught.value.code == 2


def test_anat_derivatives_must_exist(tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere"
    with pytest.raises(AslprepError) as caught:
        _settings(tmp_path, "--anat-derivatives", str(nowhere))
    assert str(caught.value) == (
        f"{nowhere}: --anat-derivatives folder does not exist: give the output folder of a "
        "finished sMRIPrep or fMRIPrep run"
    )
    (tmp_path / "file").write_text("")
    with pytest.raises(AslprepError, match="--anat-derivatives folder does not exist"):
        _settings(tmp_path, "--anat-derivatives", str(tmp_path / "file"))


def test_help_shows_the_group_and_defaults() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "anatomy and output spaces:" in text
    assert "(default: asl T1w MNI152NLin2009aSym:res-2)" in text
    assert "--no-pvc do not write partial-volume corrected GM and WM CBF maps" in text
    assert (
        "(default: None)"
        not in text.split("anatomy and output spaces:")[1].split("performance and execution:")[0]
    )


def test_pvc_acts_only_with_anatomy() -> None:
    options = QuantificationOptions()
    assert not options.applies("pvc", multidelay=False)  # existing callers: no anatomy
    assert options.applies("pvc", multidelay=True, anatomy=True)
    assert options.applies("m0_scale", multidelay=False, anatomy=True)
    # Runs without anatomy record no PVC (single-delay runs: how the pairs were averaged).
    assert list(options.sidecar_record(multidelay=False)) == [
        "M0Scale",
        "M0SmoothingFWHM",
        "DummyScans",
        "M0Calibration",
        "RandomSeed",
        "PairAverage",
    ]
    assert "PairAverage" not in options.sidecar_record(multidelay=True)
    assert options.sidecar_record(multidelay=False, anatomy=True)["PartialVolumeCorrection"]
    off = QuantificationOptions(pvc=False)
    assert off.sidecar_record(multidelay=True, anatomy=True)["PartialVolumeCorrection"] is False


def test_embedded_space_files_are_the_default_space() -> None:
    """The QC's own priors (no T1w, no template space) are the default space's files, so the
    QC table does not depend on the output spaces asked for."""
    from aslprep_lite.spaces import embedded_space_files

    space = parse_output_spaces(["MNI152NLin2009aSym:res-2"])
    fetched = check_templates(space)["MNI152NLin2009aSym:res-2"]  # the tests' own home
    own = embedded_space_files()
    assert {k: v.name for k, v in own.items()} == {k: v.name for k, v in fetched.items()}
    assert all(own[k].read_bytes() == fetched[k].read_bytes() for k in own)
