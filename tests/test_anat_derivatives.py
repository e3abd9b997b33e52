"""``--anat-derivatives``: finding and checking a finished sMRIPrep/fMRIPrep anatomy.

Every test builds a small fake fMRIPrep output folder in ``tmp_path``: real NIfTI images on a
20x24x20 grid and real ITK transforms (an affine and a displacement field in a composite, as
ANTs writes them) saved with SimpleITK, plus the files a real folder has that must be ignored
(template-space outputs, FreeSurfer's ``desc-aseg_dseg`` and its lookup tables, sidecars).
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
import SimpleITK as sitk

from aslprep_lite.bids.anat_derivatives import (
    BIDS_TISSUE_LABELS,
    PrecomputedAnatomy,
    find_precomputed_anatomy,
)
from aslprep_lite.errors import AslprepError

SHAPE = (20, 24, 20)
#: 2 mm voxels, LAS, centred near the origin: not the identity, so that grids are compared.
AFFINE = np.array(
    [[-2.0, 0, 0, 19.0], [0, 2.0, 0, -23.0], [0, 0, 2.0, -19.0], [0, 0, 0, 1]], dtype=float
)
MNI = "MNI152NLin2009cAsym"
MNI6 = "MNI152NLin6Asym"
#: fMRIPrep's top-level FreeSurfer lookup table: must not be read for the 3-tissue dseg.
APARCASEG_TSV = "index\tname\n2\tLeft-Cerebral-White-Matter\n3\tLeft-Cerebral-Cortex\n"


def _tissues(labels: dict[str, int] | None = None) -> np.ndarray:
    """A segmentation in slabs along z: CSF, GM, WM (BIDS values unless ``labels``)."""
    labels = labels or {"GM": 1, "WM": 2, "CSF": 3}
    dseg = np.zeros(SHAPE, dtype=np.int16)
    dseg[2:18, 2:22, 2:7] = labels["CSF"]
    dseg[2:18, 2:22, 7:12] = labels["GM"]
    dseg[2:18, 2:22, 12:18] = labels["WM"]
    return dseg


def _save(data: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> None:
    img = nb.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.to_filename(str(path))


def _composite(seed: int) -> sitk.CompositeTransform:
    """An affine and a smooth displacement field, composed, as in ANTs' ``*Composite.h5``."""
    rng = np.random.default_rng(seed)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.02, 0.01, 0.0, -0.01, 0.98, 0.02, 0.0, -0.02, 1.01))
    affine.SetTranslation(tuple(rng.uniform(-3, 3, 3)))
    affine.SetCenter((1.0, -2.0, 3.0))
    field = rng.normal(0, 1.5, size=(6, 7, 6, 3))  # (z, y, x, vector), mm
    image = sitk.GetImageFromArray(field, isVector=True)
    image.SetSpacing((8.0, 8.0, 8.0))
    image.SetOrigin((-20.0, -24.0, -20.0))
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(image)])


def build_fmriprep(
    root: Path,
    *,
    subject: str = "01",
    session: str | None = None,
    extension: str = ".nii.gz",
    templates: Sequence[str] = (MNI,),
    extra: str = "",
) -> Path:
    """A fake fMRIPrep output folder; returns the ``anat`` folder written.

    ``session`` writes a per-session reference (``--subject-anatomical-reference
    sessionwise``); ``extra`` adds entities to the T1w-derived images (``_acq-mprage``).
    """
    root.mkdir(parents=True, exist_ok=True)
    description = {"Name": "fMRIPrep - fMRI PREProcessing workflow", "BIDSVersion": "1.4.0"}
    (root / "dataset_description.json").write_text(
        json.dumps({**description, "DatasetType": "derivative"})
    )
    (root / "desc-aparcaseg_dseg.tsv").write_text(APARCASEG_TSV)
    (root / "desc-aseg_dseg.tsv").write_text(APARCASEG_TSV)
    (root / "logs").mkdir(exist_ok=True)
    (root / f"sub-{subject}.html").write_text("<html></html>")
    folder = root / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
    folder.mkdir(parents=True, exist_ok=True)
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    image = f"{prefix}{extra}"

    dseg = _tissues()
    rng = np.random.default_rng(1)
    t1w = (dseg * 300 + rng.uniform(10, 20, SHAPE)).astype(np.float32)
    _save(t1w, folder / f"{image}_desc-preproc_T1w{extension}")
    _save((dseg > 0).astype(np.uint8), folder / f"{image}_desc-brain_mask{extension}")
    _save(dseg, folder / f"{image}_dseg{extension}")
    for tissue, value in (("GM", 1), ("WM", 2), ("CSF", 3)):
        _save(
            (dseg == value).astype(np.float32),
            folder / f"{image}_label-{tissue}_probseg{extension}",
        )
    for number, template in enumerate(templates):
        label = template
        sitk.WriteTransform(
            _composite(2 * number), str(folder / f"{prefix}_from-T1w_to-{label}_mode-image_xfm.h5")
        )
        sitk.WriteTransform(
            _composite(2 * number + 1),
            str(folder / f"{prefix}_from-{label}_to-T1w_mode-image_xfm.h5"),
        )
    # What a real folder also has, none of which may be taken: template-space outputs,
    # FreeSurfer's segmentations, sidecars, the fsnative transforms.
    for name in (
        f"{image}_space-{MNI}_desc-preproc_T1w{extension}",
        f"{image}_space-{MNI}_desc-brain_mask{extension}",
        f"{image}_space-{MNI}_dseg{extension}",
        f"{image}_space-{MNI}_label-GM_probseg{extension}",
        f"{image}_desc-aseg_dseg{extension}",
        f"{image}_desc-aparcaseg_dseg{extension}",
        f"{image}_desc-preproc_T2w{extension}",
    ):
        (folder / name).write_bytes(b"")
    (folder / f"{image}_desc-preproc_T1w.json").write_text("{}")
    (folder / f"{prefix}_from-T1w_to-fsnative_mode-image_xfm.txt").write_text("")
    return folder


def _error(deriv: Path, templates: Sequence[str] = (MNI,), subject: str = "01") -> str:
    """The message of the AslprepError raised, checked to be one line."""
    with pytest.raises(AslprepError) as caught:
        find_precomputed_anatomy(deriv, subject, templates)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message, message
    return message


def _names(anatomy: PrecomputedAnatomy) -> dict[str, str]:
    return {
        "t1w": anatomy.t1w.name,
        "mask": anatomy.mask.name,
        "dseg": anatomy.dseg.name,
        **{f"probseg-{k}": v.name for k, v in anatomy.probseg.items()},
        **{f"to-{k}": v.name for k, v in anatomy.to_template.items()},
        **{f"from-{k}": v.name for k, v in anatomy.from_template.items()},
    }


# -- the happy paths --------------------------------------------------------------------------


def test_finds_every_file_for_two_templates(tmp_path: Path) -> None:
    deriv = tmp_path / "fmriprep"
    anat = build_fmriprep(deriv, templates=(MNI, MNI6))
    anatomy = find_precomputed_anatomy(deriv, "01", [MNI, MNI6])
    assert _names(anatomy) == {
        "t1w": "sub-01_desc-preproc_T1w.nii.gz",
        "mask": "sub-01_desc-brain_mask.nii.gz",
        "dseg": "sub-01_dseg.nii.gz",
        "probseg-GM": "sub-01_label-GM_probseg.nii.gz",
        "probseg-WM": "sub-01_label-WM_probseg.nii.gz",
        "probseg-CSF": "sub-01_label-CSF_probseg.nii.gz",
        f"to-{MNI}": f"sub-01_from-T1w_to-{MNI}_mode-image_xfm.h5",
        f"to-{MNI6}": f"sub-01_from-T1w_to-{MNI6}_mode-image_xfm.h5",
        f"from-{MNI}": f"sub-01_from-{MNI}_to-T1w_mode-image_xfm.h5",
        f"from-{MNI6}": f"sub-01_from-{MNI6}_to-T1w_mode-image_xfm.h5",
    }
    assert anatomy.source == deriv
    assert anatomy.t1w.parent == anat and anatomy.t1w.is_absolute()
    assert list(anatomy.probseg) == ["GM", "WM", "CSF"]
    # The top-level desc-aparcaseg_dseg.tsv (FreeSurfer labels) does not apply to _dseg.
    assert anatomy.dseg_labels == {1: "GM", 2: "WM", 3: "CSF"} == BIDS_TISSUE_LABELS


def test_subject_label_with_prefix_and_no_templates(tmp_path: Path) -> None:
    build_fmriprep(tmp_path)
    anatomy = find_precomputed_anatomy(tmp_path, "sub-01", [])
    assert anatomy.to_template == {} and anatomy.from_template == {}
    assert anatomy.t1w.name == "sub-01_desc-preproc_T1w.nii.gz"


def test_subject_level_reference_of_a_subject_with_sessions(tmp_path: Path) -> None:
    """first-lex/unbiased: one reference in sub-01/anat, runs in sub-01/ses-*/."""
    anat = build_fmriprep(tmp_path)
    for session in ("1", "2"):
        func = tmp_path / "sub-01" / f"ses-{session}" / "func"
        func.mkdir(parents=True)
        (func / f"sub-01_ses-{session}_task-rest_desc-preproc_bold.nii.gz").write_bytes(b"")
    # A session folder with its own anat (template-space files only) changes nothing.
    (tmp_path / "sub-01" / "ses-1" / "anat").mkdir()
    anatomy = find_precomputed_anatomy(tmp_path, "01", [MNI])
    assert anatomy.t1w.parent == anat


def test_per_session_reference_in_one_session(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path, session="pre")
    (tmp_path / "sub-01" / "ses-post" / "func").mkdir(parents=True)
    anatomy = find_precomputed_anatomy(tmp_path, "01", [MNI])
    assert anatomy.t1w == anat / "sub-01_ses-pre_desc-preproc_T1w.nii.gz"
    assert anatomy.to_template[MNI].name == f"sub-01_ses-pre_from-T1w_to-{MNI}_mode-image_xfm.h5"
    assert anatomy.probseg["CSF"].name == "sub-01_ses-pre_label-CSF_probseg.nii.gz"


def test_per_session_references_in_two_sessions_are_refused(tmp_path: Path) -> None:
    build_fmriprep(tmp_path, session="1")
    build_fmriprep(tmp_path, session="2")
    message = _error(tmp_path)
    assert str(tmp_path / "sub-01") in message
    assert "ses-1, ses-2" in message and "--subject-anatomical-reference" in message


def test_uncompressed_nifti(tmp_path: Path) -> None:
    build_fmriprep(tmp_path, extension=".nii")
    anatomy = find_precomputed_anatomy(tmp_path, "01", [MNI])
    assert anatomy.t1w.name == "sub-01_desc-preproc_T1w.nii"
    assert anatomy.probseg["GM"].name == "sub-01_label-GM_probseg.nii"


def test_acq_and_rec_entities_are_tolerated(tmp_path: Path) -> None:
    build_fmriprep(tmp_path, extra="_acq-mprage_rec-norm")
    anatomy = find_precomputed_anatomy(tmp_path, "01", [MNI])
    assert anatomy.t1w.name == "sub-01_acq-mprage_rec-norm_desc-preproc_T1w.nii.gz"
    assert anatomy.dseg.name == "sub-01_acq-mprage_rec-norm_dseg.nii.gz"


def test_cohort_template_is_named_with_a_plus(tmp_path: Path) -> None:
    """sMRIPrep names MNIPediatricAsym:cohort-2 ``MNIPediatricAsym+2`` in transforms."""
    build_fmriprep(tmp_path, templates=("MNIPediatricAsym+2",))
    template = "MNIPediatricAsym:cohort-2:res-1"
    anatomy = find_precomputed_anatomy(tmp_path, "01", [template])
    assert anatomy.to_template[template].name == (
        "sub-01_from-T1w_to-MNIPediatricAsym+2_mode-image_xfm.h5"
    )


def test_symlinked_files_keep_their_names(tmp_path: Path) -> None:
    """DataLad/git-annex files are links into .git/annex: the BIDS name must be kept."""
    anat = build_fmriprep(tmp_path)
    store = tmp_path / ".git" / "annex"
    store.mkdir(parents=True)
    t1w = anat / "sub-01_desc-preproc_T1w.nii.gz"
    shutil.move(t1w, store / "MD5E-s1234--abc.nii.gz")
    t1w.symlink_to(store / "MD5E-s1234--abc.nii.gz")
    assert find_precomputed_anatomy(tmp_path, "01", [MNI]).t1w == t1w


# -- the dseg labels --------------------------------------------------------------------------


def _relabel(anat: Path, labels: dict[str, int]) -> None:
    _save(_tissues(labels), anat / "sub-01_dseg.nii.gz")


def test_labels_from_the_sidecar_lookup_table(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path)
    _relabel(anat, {"GM": 10, "WM": 20, "CSF": 30})
    (anat / "sub-01_dseg.tsv").write_text(
        "index\tname\tabbreviation\n0\tBackground\tBG\n10\tGray Matter\tGM\n"
        "20\tWhite Matter\tWM\n30\tCerebrospinal Fluid\tCSF\n"
    )
    anatomy = find_precomputed_anatomy(tmp_path, "01", [MNI])
    assert anatomy.dseg_labels == {10: "GM", 20: "WM", 30: "CSF"}


def test_labels_from_a_top_level_dseg_tsv_by_name_and_mapping(tmp_path: Path) -> None:
    """Names alone, or the BIDS mapping column, say which row is which tissue."""
    anat = build_fmriprep(tmp_path)
    _relabel(anat, {"GM": 3, "WM": 1, "CSF": 2})
    (tmp_path / "dseg.tsv").write_text(
        "index\tname\tmapping\r\n1\twhite matter\t\r\n2\tventricles\t3\r\n3\tGrey Matter\t1\r\n"
        "4\tLesion\t7\r\n\r\n"
    )
    anatomy = find_precomputed_anatomy(tmp_path, "01", [MNI])
    assert anatomy.dseg_labels == {1: "WM", 2: "CSF", 3: "GM"}


def test_the_nearest_lookup_table_wins(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path)
    _relabel(anat, {"GM": 5, "WM": 6, "CSF": 7})
    (tmp_path / "dseg.tsv").write_text("index\tname\n1\tGM\n2\tWM\n3\tCSF\n")
    (tmp_path / "sub-01" / "sub-01_dseg.tsv").write_text("index\tname\n5\tGM\n6\tWM\n7\tCSF\n")
    assert find_precomputed_anatomy(tmp_path, "01", []).dseg_labels == {
        5: "GM",
        6: "WM",
        7: "CSF",
    }


def test_lookup_table_without_a_tissue(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path)
    table = anat / "sub-01_dseg.tsv"
    table.write_text("index\tname\n1\tGray Matter\n2\tWhite Matter\n")
    message = _error(tmp_path)
    assert str(table) in message and "no row for CSF" in message


def test_lookup_table_without_the_bids_columns(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path)
    table = anat / "sub-01_dseg.tsv"
    table.write_text("label,name\n1,GM\n")
    message = _error(tmp_path)
    assert str(table) in message and "'index' and 'name'" in message


def test_lookup_table_with_a_bad_index(tmp_path: Path) -> None:
    build_fmriprep(tmp_path)
    (tmp_path / "dseg.tsv").write_text("index\tname\n1\tGM\ntwo\tWM\n3\tCSF\n")
    message = _error(tmp_path)
    assert "line 3: index 'two'" in message and str(tmp_path / "dseg.tsv") in message


def test_two_lookup_tables_at_one_level(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path, extra="_acq-x")
    (anat / "sub-01_dseg.tsv").write_text("index\tname\n1\tGM\n2\tWM\n3\tCSF\n")
    (anat / "sub-01_acq-x_dseg.tsv").write_text("index\tname\n1\tGM\n2\tWM\n3\tCSF\n")
    message = _error(tmp_path)
    assert "2 lookup tables apply" in message and "sub-01_acq-x_dseg.tsv" in message


def test_segmentation_without_a_tissue(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path)
    dseg = _tissues()
    dseg[dseg == 3] = 0  # no CSF
    _save(dseg, anat / "sub-01_dseg.nii.gz")
    message = _error(tmp_path)
    assert (
        "sub-01_dseg.nii.gz" in message
        and "no voxel labelled CSF (3; values found: 0, 1, 2)" in message
    )


def test_segmentation_with_fractional_values(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path)
    _save(_tissues().astype(np.float32) * 0.5, anat / "sub-01_dseg.nii.gz")
    assert "non-integer values" in _error(tmp_path)


# -- folders and missing files ----------------------------------------------------------------


def test_folder_does_not_exist(tmp_path: Path) -> None:
    message = _error(tmp_path / "nowhere")
    assert message.startswith(f"{tmp_path / 'nowhere'}: --anat-derivatives folder does not exist")


def test_no_dataset_description_points_to_the_pipeline_folder(tmp_path: Path) -> None:
    build_fmriprep(tmp_path / "fmriprep")
    message = _error(tmp_path)
    assert message.startswith(f"{tmp_path}: no dataset_description.json")
    assert "found one in fmriprep/" in message


def test_invalid_dataset_description(tmp_path: Path) -> None:
    build_fmriprep(tmp_path)
    (tmp_path / "dataset_description.json").write_text("{")
    assert "dataset_description.json: not valid JSON" in _error(tmp_path)


def test_no_subject_folder(tmp_path: Path) -> None:
    build_fmriprep(tmp_path, subject="02")
    message = _error(tmp_path)
    assert message.startswith(f"{tmp_path}: no sub-01 folder (subjects here: sub-02)")


def test_no_reference_anywhere(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path)
    (anat / "sub-01_desc-preproc_T1w.nii.gz").unlink()
    message = _error(tmp_path)
    assert message.startswith(f"{tmp_path / 'sub-01'}: no sub-01_desc-preproc_T1w.nii[.gz]")
    assert "sub-01/ses-*/anat" in message


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("sub-01_desc-brain_mask.nii.gz", "sub-01_desc-brain_mask.nii[.gz] (brain mask)"),
        ("sub-01_dseg.nii.gz", "sub-01_dseg.nii[.gz] (tissue segmentation)"),
        ("sub-01_label-GM_probseg.nii.gz", "sub-01_label-GM_probseg.nii[.gz]"),
        ("sub-01_label-WM_probseg.nii.gz", "sub-01_label-WM_probseg.nii[.gz]"),
        ("sub-01_label-CSF_probseg.nii.gz", "sub-01_label-CSF_probseg.nii[.gz]"),
    ],
)
def test_missing_image(tmp_path: Path, name: str, pattern: str) -> None:
    anat = build_fmriprep(tmp_path)
    (anat / name).unlink()
    message = _error(tmp_path)
    assert message.startswith(f"{anat}: no {pattern}")
    assert "point --anat-derivatives at the complete output" in message


@pytest.mark.parametrize(
    ("name", "available"),
    [
        (f"sub-01_from-T1w_to-{MNI}_mode-image_xfm.h5", MNI6),
        (f"sub-01_from-{MNI}_to-T1w_mode-image_xfm.h5", f"{MNI}, {MNI6}"),
    ],
)
def test_missing_transform_says_which_output_space_to_ask_for(
    tmp_path: Path, name: str, available: str
) -> None:
    anat = build_fmriprep(tmp_path, templates=(MNI, MNI6))
    (anat / name).unlink()
    message = _error(tmp_path, templates=(MNI6, f"{MNI}:res-2"))
    assert message.startswith(f"{anat}: no {name}")
    assert f"rerun sMRIPrep/fMRIPrep with --output-spaces {MNI} and point" in message
    assert message.endswith(f"(transforms to templates in this folder: {available})")


def test_transform_for_a_template_not_computed(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path)
    message = _error(tmp_path, templates=("MNIPediatricAsym:cohort-2:res-1",))
    assert message.startswith(
        f"{anat}: no sub-01_from-T1w_to-MNIPediatricAsym+2_mode-image_xfm.h5"
    )
    assert "--output-spaces MNIPediatricAsym:cohort-2 and" in message
    assert f"in this folder: {MNI})" in message


@pytest.mark.parametrize(
    ("existing", "duplicate"),
    [
        ("sub-01_desc-preproc_T1w.nii.gz", "sub-01_acq-mprage_desc-preproc_T1w.nii.gz"),
        ("sub-01_dseg.nii.gz", "sub-01_dseg.nii"),
        ("sub-01_label-WM_probseg.nii.gz", "sub-01_run-2_label-WM_probseg.nii.gz"),
    ],
)
def test_several_candidates_are_refused(tmp_path: Path, existing: str, duplicate: str) -> None:
    anat = build_fmriprep(tmp_path)
    shutil.copy(anat / existing, anat / duplicate)
    message = _error(tmp_path)
    assert message.startswith(f"{anat}: 2 files match")
    assert existing in message and duplicate in message


# -- unusable images --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "sub-01_desc-preproc_T1w.nii.gz",
        "sub-01_desc-brain_mask.nii.gz",
        "sub-01_dseg.nii.gz",
        "sub-01_label-CSF_probseg.nii.gz",
    ],
)
def test_truncated_image(tmp_path: Path, name: str) -> None:
    anat = build_fmriprep(tmp_path)
    path = anat / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = _error(tmp_path)
    assert message.startswith(f"{path}: cannot read the ")
    assert "truncated or corrupt" in message


def test_not_a_nifti_at_all(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path, extension=".nii")
    path = anat / "sub-01_desc-brain_mask.nii"
    path.write_text("not an image")
    assert _error(tmp_path).startswith(f"{path}: cannot read the brain mask")


def test_gzip_with_a_bad_checksum(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path)
    path = anat / "sub-01_label-GM_probseg.nii.gz"
    raw = bytearray(gzip.compress(gzip.decompress(path.read_bytes())))
    raw[-8] ^= 0xFF  # the CRC32 of the data
    path.write_bytes(bytes(raw))
    assert _error(tmp_path).startswith(f"{path}: cannot read the GM probability map")


def test_broken_link_and_lfs_pointer(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path)
    mask = anat / "sub-01_desc-brain_mask.nii.gz"
    mask.unlink()
    mask.symlink_to(tmp_path / ".git" / "annex" / "objects" / "missing")
    message = _error(tmp_path)
    assert message.startswith(f"{mask}: the brain mask is a broken link")
    mask.unlink()
    mask.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    assert _error(tmp_path).startswith(f"{mask}: the brain mask is a Git LFS pointer")


def test_images_on_different_grids(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path)
    mask = anat / "sub-01_desc-brain_mask.nii.gz"
    _save(np.ones((20, 24, 21), np.uint8), mask)
    message = _error(tmp_path)
    assert message.startswith(f"{mask}: the brain mask is not on the grid of the preprocessed T1w")
    assert "shape (20, 24, 21) vs (20, 24, 20)" in message

    build_fmriprep(tmp_path)
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    probseg = anat / "sub-01_label-WM_probseg.nii.gz"
    _save((_tissues() == 2).astype(np.float32), probseg, affine=shifted)
    message = _error(tmp_path)
    assert message.startswith(f"{probseg}: the WM probability map is not on the grid")
    assert "affines differ by up to 2" in message


def test_empty_mask_and_probabilities_out_of_range(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path)
    mask = anat / "sub-01_desc-brain_mask.nii.gz"
    _save(np.zeros(SHAPE, np.uint8), mask)
    assert _error(tmp_path).startswith(f"{mask}: the brain mask has no voxel above 0")

    build_fmriprep(tmp_path)
    probseg = anat / "sub-01_label-GM_probseg.nii.gz"
    _save((_tissues() == 1).astype(np.float32) * 100, probseg)
    message = _error(tmp_path)
    assert message.startswith(f"{probseg}: the GM probability map must hold probabilities")
    assert "from 0 to 100" in message


def test_image_that_is_not_3d(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path)
    t1w = anat / "sub-01_desc-preproc_T1w.nii.gz"
    _save(np.ones((*SHAPE, 2), np.float32), t1w)
    assert "must be a 3D image, not of shape (20, 24, 20, 2)" in _error(tmp_path)


# -- unusable transforms ----------------------------------------------------------------------

TO_MNI = f"sub-01_from-T1w_to-{MNI}_mode-image_xfm.h5"


def test_transform_that_is_not_hdf5(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    anat = build_fmriprep(tmp_path)
    path = anat / TO_MNI
    path.write_text("#Insight Transform File V1.0\n")
    message = _error(tmp_path)
    assert message.startswith(f"{path}: the T1w to {MNI} transform is not an HDF5 file")
    assert "HDF5-DIAG" not in capfd.readouterr().err


def test_truncated_transform(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    anat = build_fmriprep(tmp_path)
    path = anat / f"sub-01_from-{MNI}_to-T1w_mode-image_xfm.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    message = _error(tmp_path)
    assert message.startswith(f"{path}: the {MNI} to T1w transform is truncated")
    assert f"({len(data) // 3} of {len(data)} bytes)" in message
    assert "HDF5-DIAG" not in capfd.readouterr().err


def test_truncated_transform_with_an_old_superblock(tmp_path: Path) -> None:
    """HDF5 before 1.10 (older ANTs builds) writes superblock version 0."""
    h5py = pytest.importorskip("h5py")
    anat = build_fmriprep(tmp_path)
    path = anat / TO_MNI
    with h5py.File(path, "w", libver="earliest") as handle:
        handle["TransformGroup/0/TransformParameters"] = np.zeros(1000)
    assert path.read_bytes()[8] == 0  # superblock version 0
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    assert "is truncated" in _error(tmp_path)


def test_hdf5_file_that_is_not_a_transform(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A complete HDF5 file (here an ITK image) that ITK cannot read as a transform."""
    anat = build_fmriprep(tmp_path)
    path = anat / TO_MNI
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32)), str(path))
    message = _error(tmp_path)
    assert message.startswith(f"{path}: SimpleITK cannot read the T1w to {MNI} transform: ")
    assert "HDF5-DIAG" not in capfd.readouterr().err


def test_hdf5_file_with_a_damaged_superblock(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    anat = build_fmriprep(tmp_path)
    path = anat / TO_MNI
    data = bytearray(path.read_bytes())
    data[9] = 3  # an impossible size of addresses: the superblock checksum fails too
    path.write_bytes(bytes(data))
    assert _error(tmp_path).startswith(f"{path}: SimpleITK cannot read the")
    assert "HDF5-DIAG" not in capfd.readouterr().err


def test_two_dimensional_transform(tmp_path: Path) -> None:
    anat = build_fmriprep(tmp_path)
    sitk.WriteTransform(sitk.AffineTransform(2), str(anat / TO_MNI))
    assert f"T1w to {MNI} transform is a 2D transform, not 3D" in _error(tmp_path)


# -- the ITK convention -----------------------------------------------------------------------


def test_h5_round_trip_and_the_direction_of_a_from_t1w_to_mni_transform(tmp_path: Path) -> None:
    """The written .h5 maps points as the original does; ``from-T1w_to-MNI`` maps MNI -> T1w.

    ITK transforms go from the output (fixed, reference) space to the input (moving) space,
    the direction a resampler needs: resampling a T1w image into MNI space asks, for each MNI
    voxel, where it is in the T1w image. So the transform fMRIPrep names
    ``from-T1w_to-MNI`` takes *MNI* points (LPS mm) to *T1w* points.
    """
    original = _composite(seed=7)
    path = tmp_path / f"sub-01_from-T1w_to-{MNI}_mode-image_xfm.h5"
    sitk.WriteTransform(original, str(path))
    read = sitk.ReadTransform(str(path))
    assert read.GetName() == "CompositeTransform"
    rng = np.random.default_rng(3)
    for point in rng.uniform(-25, 25, size=(50, 3)):
        expected = np.array(original.TransformPoint(tuple(point)))
        assert np.allclose(read.TransformPoint(tuple(point)), expected, rtol=0, atol=1e-6)

    # Resampling a T1w image into an "MNI" grid with this transform: the MNI voxel at p gets
    # the T1w value at T(p). A T1w image whose value is its own x coordinate (LPS, mm)
    # shows it without interpolation error (linear in x).
    x = np.arange(60) * 2.0 - 60.0
    values = np.broadcast_to(x[None, None, :], (60, 60, 60)).copy()  # (z, y, x)
    t1w = sitk.GetImageFromArray(values)
    t1w.SetOrigin((-60.0, -60.0, -60.0))
    t1w.SetSpacing((2.0, 2.0, 2.0))
    mni = sitk.Image([10, 10, 10], sitk.sitkFloat64)
    mni.SetOrigin((-10.0, -10.0, -10.0))
    mni.SetSpacing((2.0, 2.0, 2.0))
    resampled = sitk.Resample(t1w, mni, read, sitk.sitkLinear, 0.0)
    index = (3, 4, 5)
    p = resampled.TransformIndexToPhysicalPoint(index)
    assert resampled[index] == pytest.approx(read.TransformPoint(p)[0], abs=1e-6)
