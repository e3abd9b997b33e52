"""Templates through TemplateFlow, offline: the embedded MNI152NLin2009aSym home and its errors.

templateflow reads TEMPLATEFLOW_HOME and TEMPLATEFLOW_AUTOUPDATE once, when it is first
imported, so every test of what the environment variables do runs in a fresh interpreter (a
subprocess) with its own HOME and XDG_CACHE_HOME, and with the network blocked in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from scipy import ndimage

from aslprep_lite.errors import AslprepError
from aslprep_lite.spaces import check_templates, parse_space
from aslprep_lite.templates import (
    EMBEDDED_FILES,
    EMBEDDED_TEMPLATE,
    TEMPLATES_ENV,
    configure_templateflow,
    embedded_home,
    get_template,
    layout_embedded_home,
)

TPL = f"tpl-{EMBEDDED_TEMPLATE}"
NILEARN_T1W = (
    Path(next(iter(find_spec("nilearn").submodule_search_locations)))
    / "datasets"
    / "data"
    / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
)

# Run first in every subprocess: any attempt to reach the network is recorded and refused at
# once, so a test that would otherwise wait on a network time-out fails fast instead.
_OFFLINE = textwrap.dedent(
    """
    import json, socket, sys, time
    ATTEMPTS = []

    def _refuse(*args, **kwargs):
        ATTEMPTS.append(repr(args[1:2] or args[:1])[:80])
        raise OSError("network blocked by the test")

    socket.socket.connect = _refuse
    socket.socket.connect_ex = _refuse
    socket.create_connection = _refuse
    socket.getaddrinfo = _refuse
    """
)


def _run(code: str, tmp_path: Path, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter, offline; it prints one JSON object last."""
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TEMPLATEFLOW_") and k not in (TEMPLATES_ENV, "XDG_CACHE_HOME")
    }
    # A private HOME: nothing the test runs may touch the real ~/.cache.
    environ.update({"HOME": str(tmp_path / "home"), **env})
    result = subprocess.run(
        [sys.executable, "-c", _OFFLINE + textwrap.dedent(code)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded home laid out once for the module."""
    return layout_embedded_home(tmp_path_factory.mktemp("templates") / "templateflow")


@pytest.fixture
def use_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TEMPLATEFLOW_HOME set to the module's home (restored after the test)."""
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    monkeypatch.setenv("TEMPLATEFLOW_AUTOUPDATE", "0")  # configure sets it: monkeypatch resets
    return home


def test_layout_has_templateflow_names(home: Path) -> None:
    names = sorted(p.name for p in (home / TPL).iterdir())
    assert names == sorted([*EMBEDDED_FILES, "LICENSE", "template_description.json"])
    assert [p.name for p in home.iterdir()] == [TPL]  # no temporary folder left behind
    description = json.loads((home / TPL / "template_description.json").read_text())
    assert description["Identifier"] == EMBEDDED_TEMPLATE
    assert description["Name"] == "ICBM 152 Nonlinear Symmetrical template version 2009a"
    assert description["EmbeddedFrom"]["PackageVersion"] == metadata.version("nilearn")
    assert "Louis Collins" in (home / TPL / "LICENSE").read_text()


@pytest.mark.parametrize(
    ("resolution", "shape", "origin"),
    [(1, (193, 229, 193), (-96.0, -132.0, -78.0)), (2, (97, 115, 97), (-96.5, -132.5, -78.5))],
)
def test_get_template_t1w_grids(use_home: Path, resolution, shape, origin) -> None:
    path = get_template(EMBEDDED_TEMPLATE, resolution=resolution, suffix="T1w")
    assert path == use_home / TPL / f"{TPL}_res-{resolution}_T1w.nii.gz"
    img = nb.load(path)
    assert img.shape == shape  # TemplateFlow's grids (see aslprep_lite.templates._GRIDS)
    assert img.header.get_zooms() == (resolution,) * 3
    expected = np.diag([resolution, resolution, resolution, 1.0])
    expected[:3, 3] = origin
    np.testing.assert_array_equal(img.affine, expected)
    assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (4, 4)  # MNI152


def test_res1_t1w_is_nilearns_data_exactly(use_home: Path) -> None:
    ours = nb.load(get_template(EMBEDDED_TEMPLATE, resolution=1, suffix="T1w"))
    theirs = nb.load(NILEARN_T1W)
    data, source = np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj)
    assert data.dtype == source.dtype == np.uint8
    # Voxel (i, j, k) of nilearn's grid is voxel (i, j, k) + shift of ours: whole millimetres.
    shift = (np.linalg.inv(ours.affine) @ theirs.affine)[:3, 3]
    np.testing.assert_array_equal(shift, np.round(shift))
    si, sj, sk = np.round(shift).astype(int)  # (-2, -2, 6): 197x233x189 -> 193x229x193
    lo = np.maximum(0, -np.array([si, sj, sk]))
    hi = np.minimum(source.shape, np.array(data.shape) - [si, sj, sk])
    crop = source[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    np.testing.assert_array_equal(
        data[lo[0] + si : hi[0] + si, lo[1] + sj : hi[1] + sj, lo[2] + sk : hi[2] + sk], crop
    )
    # Nothing was lost in the crop, nothing added around it.
    assert int(crop.astype(np.int64).sum()) == int(source.astype(np.int64).sum())
    assert int(data.astype(np.int64).sum()) == int(source.astype(np.int64).sum())


@pytest.mark.parametrize("resolution", [1, 2])
def test_probabilities_and_brain_mask(use_home: Path, resolution: int) -> None:
    probs = {
        label: nb.load(
            get_template(EMBEDDED_TEMPLATE, resolution=resolution, label=label, suffix="probseg")
        ).get_fdata()
        for label in ("GM", "WM")
    }
    for data in probs.values():
        assert data.min() >= 0.0
        assert data.max() <= 1.0
    mask_img = nb.load(
        get_template(EMBEDDED_TEMPLATE, resolution=resolution, desc="brain", suffix="mask")
    )
    mask = np.asanyarray(mask_img.dataobj)
    assert set(np.unique(mask).tolist()) == {0, 1}
    voxel_ml = float(np.prod(mask_img.header.get_zooms())) / 1000.0
    volume_ml = float(mask.sum()) * voxel_ml
    tissue_ml = float((probs["GM"] + probs["WM"]).sum()) * voxel_ml
    # GM + WM of the ICBM 2009a maps add up to 1679 mL (MNI space is larger than an average
    # native brain): a mask of the whole brain holds that tissue plus the CSF of the ventricles
    # and sulci, about a tenth more. Measured: 1886.5 mL (res-1), 1899.5 mL (res-2).
    assert 1670 < tissue_ml < 1690
    assert 1800 < volume_ml < 2000
    assert volume_ml > tissue_ml
    inside = float(((probs["GM"] + probs["WM"]) * mask).sum()) * voxel_ml
    assert inside / tissue_ml > 0.99  # the mask holds 99.3% of the tissue
    _, count = ndimage.label(mask)
    assert count == 1  # one piece
    assert ndimage.binary_fill_holes(mask).sum() == mask.sum()  # no holes


def test_res2_keeps_volumes(use_home: Path) -> None:
    def volume(resolution: int, **entities) -> float:
        img = nb.load(get_template(EMBEDDED_TEMPLATE, resolution=resolution, **entities))
        return float(img.get_fdata().sum()) * float(np.prod(img.header.get_zooms())) / 1000

    for entities in ({"label": "GM", "suffix": "probseg"}, {"label": "WM", "suffix": "probseg"}):
        # Block means keep a probability map's total exactly (float32 rounding aside).
        assert volume(2, **entities) == pytest.approx(volume(1, **entities), rel=1e-5)
    mask = {"desc": "brain", "suffix": "mask"}
    assert volume(2, **mask) == pytest.approx(volume(1, **mask), rel=0.02)


def test_layout_is_byte_identical_and_left_alone(home: Path, tmp_path: Path) -> None:
    again = layout_embedded_home(tmp_path / "again")
    assert _hashes(again) == _hashes(home)  # every file, template_description.json included
    mtimes = {p: p.stat().st_mtime_ns for p in again.rglob("*")}
    layout_embedded_home(again)  # complete: nothing is rewritten
    assert {p: p.stat().st_mtime_ns for p in again.rglob("*")} == mtimes
    # A damaged copy is not complete: it is laid out again, whole.
    (again / TPL / f"{TPL}_res-2_T1w.nii.gz").write_bytes(b"")
    layout_embedded_home(again)
    assert _hashes(again) == _hashes(home)
    assert [p.name for p in again.iterdir()] == [TPL]


def test_concurrent_first_use(home: Path, tmp_path: Path) -> None:
    target, go = tmp_path / "shared", tmp_path / "go"
    code = _OFFLINE + textwrap.dedent(
        f"""
        import os, time
        from aslprep_lite.templates import layout_embedded_home
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        print(layout_embedded_home({str(target)!r}))
        """
    )
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    time.sleep(1.0)  # both interpreters up and waiting
    go.touch()
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs == [str(target)] * 2
    assert _hashes(target) == _hashes(home)
    assert [p.name for p in target.iterdir()] == [TPL]


def test_missing_template_fails_fast_offline(tmp_path: Path) -> None:
    embedded = tmp_path / "embedded"
    out = _run(
        """
        from aslprep_lite.errors import AslprepError
        from aslprep_lite.templates import configure_templateflow, get_template
        configure_templateflow()  # lays out the embedded home first: not part of the timing
        start = time.monotonic()
        try:
            get_template("MNI152NLin6Asym", resolution=2, suffix="T1w")
        except AslprepError as err:
            message = str(err)
        print(json.dumps({"message": message, "seconds": time.monotonic() - start,
                          "attempts": ATTEMPTS}))
        """,
        tmp_path,
        **{TEMPLATES_ENV: str(embedded)},
    )
    message = out["message"]
    assert "\n" not in message
    assert message.startswith(f"{embedded}: template MNI152NLin6Asym")
    assert "resolution=2, suffix='T1w'" in message
    assert "TEMPLATEFLOW_HOME" in message
    assert f"holds only {EMBEDDED_TEMPLATE}" in message
    assert "tf.get('MNI152NLin6Asym')" in message
    assert out["attempts"] == []  # not even tried
    assert out["seconds"] < 5


def test_listed_but_not_downloaded_fails_fast_offline(tmp_path: Path) -> None:
    user = tmp_path / "user"
    (user / "tpl-Sketch").mkdir(parents=True)
    (user / "tpl-Sketch" / "template_description.json").write_text('{"Name": "Sketch"}')
    (user / "tpl-Sketch" / "tpl-Sketch_res-1_T1w.nii.gz").write_bytes(b"")  # a placeholder
    out = _run(
        """
        from aslprep_lite.errors import AslprepError
        from aslprep_lite.templates import get_template
        start = time.monotonic()
        try:
            get_template("Sketch", resolution=1, suffix="T1w")
        except AslprepError as err:
            message = str(err)
        print(json.dumps({"message": message, "seconds": time.monotonic() - start,
                          "attempts": ATTEMPTS}))
        """,
        tmp_path,
        TEMPLATEFLOW_HOME=str(user),
    )
    message = out["message"]
    assert "\n" not in message
    assert message.startswith(f"{user}: tpl-Sketch_res-1_T1w.nii.gz of template Sketch")
    assert "not downloaded, and the download failed" in message
    assert "tf.get('Sketch')" in message
    assert out["attempts"]  # templateflow did try, and was refused at once
    assert out["seconds"] < 5


def _snapshot(folder: Path) -> dict[str, tuple]:
    return {
        str(p.relative_to(folder)): (
            p.stat().st_mode,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None,
        )
        for p in sorted([folder, *folder.rglob("*")])
    }


def _set_writable(folder: Path, writable: bool) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
        path.chmod(mode | stat.S_IWUSR if writable else mode & ~bits)


def test_user_home_is_used_as_is_and_never_written(home: Path, tmp_path: Path) -> None:
    user = tmp_path / "user"
    shutil.copytree(home, user)
    custom = user / "tpl-Custom"
    custom.mkdir()
    (custom / "template_description.json").write_text('{"Name": "A custom template"}')
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    nb.save(nb.Nifti1Image(np.ones((4, 4, 4), np.float32), affine), custom / "tpl-Custom_T1w.nii")
    never = tmp_path / "never"
    _set_writable(user, False)  # (root may write anyway: the snapshot is what proves it)
    before = _snapshot(user)
    try:
        out = _run(
            f"""
            import os
            from aslprep_lite.templates import get_template, template_provenance
            paths = [str(get_template({EMBEDDED_TEMPLATE!r}, resolution=2, suffix="T1w")),
                     str(get_template("Custom", suffix="T1w"))]
            from templateflow import conf
            print(json.dumps({{
                "paths": paths,
                "custom": template_provenance("Custom"),
                "embedded": template_provenance({EMBEDDED_TEMPLATE!r}),
                "tf_home": str(conf.TF_HOME), "tf_autoupdate": conf.TF_AUTOUPDATE,
                "env": os.environ["TEMPLATEFLOW_AUTOUPDATE"], "attempts": ATTEMPTS,
            }}))
            """,
            tmp_path,
            TEMPLATEFLOW_HOME=str(user),
            **{TEMPLATES_ENV: str(never)},
        )
        after = _snapshot(user)
    finally:
        _set_writable(user, True)
    assert out["paths"] == [
        str(user / TPL / f"{TPL}_res-2_T1w.nii.gz"),
        str(custom / "tpl-Custom_T1w.nii"),
    ]
    assert after == before
    assert not never.exists()  # the embedded home was not laid out
    assert (out["tf_home"], out["tf_autoupdate"], out["env"]) == (str(user), False, "0")
    assert out["custom"] == {
        "Template": "Custom",
        "Source": "TEMPLATEFLOW_HOME",
        "TemplateFlowHome": str(user),
        "templateflowVersion": metadata.version("templateflow"),
        "Name": "A custom template",
    }
    # A copy of the embedded home is still nilearn's template: provenance reads the files.
    assert out["embedded"]["Source"] == "embedded"
    assert out["attempts"] == []


def test_embedded_home_is_the_default(tmp_path: Path) -> None:
    out = _run(
        f"""
        import os
        from aslprep_lite.templates import configure_templateflow, get_template
        from aslprep_lite.templates import template_provenance
        home = configure_templateflow()
        env = {{k: os.environ[k] for k in ("TEMPLATEFLOW_HOME", "TEMPLATEFLOW_AUTOUPDATE")}}
        import templateflow.api  # after configure_templateflow, as aslprep_lite does
        from templateflow import conf
        print(json.dumps({{
            "home": str(home), "env": env,
            "tf_home": str(conf.TF_HOME), "tf_autoupdate": conf.TF_AUTOUPDATE,
            "mask": str(get_template({EMBEDDED_TEMPLATE!r}, resolution=1, desc="brain",
                                     suffix="mask")),
            "provenance": template_provenance({EMBEDDED_TEMPLATE!r}),
            "attempts": ATTEMPTS,
        }}))
        """,
        tmp_path,
        XDG_CACHE_HOME=str(tmp_path / "xdg"),
    )
    home = tmp_path / "xdg" / "aslprep_lite" / "templateflow"
    assert out["home"] == out["tf_home"] == str(home)
    assert out["env"] == {"TEMPLATEFLOW_HOME": str(home), "TEMPLATEFLOW_AUTOUPDATE": "0"}
    assert out["tf_autoupdate"] is False
    assert out["mask"] == str(home / TPL / f"{TPL}_res-1_desc-brain_mask.nii.gz")
    provenance = out["provenance"]
    assert provenance["Source"] == "embedded"
    assert provenance["nilearnVersion"] == metadata.version("nilearn")
    assert provenance["templateflowVersion"] == metadata.version("templateflow")
    assert provenance["TemplateFlowHome"] == str(home)
    assert "skull-stripped" in provenance["Description"]
    # templateflow's own default cache (~/.cache/templateflow) was never populated.
    assert not (tmp_path / "home" / ".cache" / "templateflow").exists()
    assert out["attempts"] == []


def test_templateflow_imported_too_early(home: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(home, other)
    out = _run(
        f"""
        import os
        import templateflow.api  # reads TEMPLATEFLOW_HOME={str(home)!r} now, once
        os.environ["TEMPLATEFLOW_HOME"] = {str(other)!r}
        from aslprep_lite.templates import get_template
        print(json.dumps({{"path": str(get_template({EMBEDDED_TEMPLATE!r}, resolution=1,
                                                    suffix="T1w"))}}))
        """,
        tmp_path,
        TEMPLATEFLOW_HOME=str(home),
    )
    assert out["path"] == str(other / TPL / f"{TPL}_res-1_T1w.nii.gz")


def test_embedded_home_location() -> None:
    assert embedded_home({TEMPLATES_ENV: "/opt/tf", "XDG_CACHE_HOME": "/x"}) == Path("/opt/tf")
    assert embedded_home({"XDG_CACHE_HOME": "/x"}) == Path("/x/aslprep_lite/templateflow")
    # A relative XDG_CACHE_HOME is invalid per the XDG specification: ignored.
    assert embedded_home({"XDG_CACHE_HOME": "rel"}) == (
        Path.home() / ".cache" / "aslprep_lite" / "templateflow"
    )


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_user_home_must_exist_and_hold_something(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    user = tmp_path / "mount"
    if kind == "empty":
        user.mkdir()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(user))
    monkeypatch.setenv("TEMPLATEFLOW_AUTOUPDATE", "0")
    with pytest.raises(AslprepError, match="TEMPLATEFLOW_HOME is") as caught:
        configure_templateflow()
    assert str(caught.value).startswith(f"{user}: ")
    assert "\n" not in str(caught.value)
    if kind == "empty":
        assert list(user.iterdir()) == []  # templateflow's skeleton was not written into it


def test_ambiguous_query_names_the_matches(use_home: Path) -> None:
    with pytest.raises(AslprepError) as caught:
        get_template(EMBEDDED_TEMPLATE, resolution=1, suffix="probseg")
    message = str(caught.value)
    assert message.startswith(f"{use_home}: 2 files of template {EMBEDDED_TEMPLATE} match")
    assert "label-GM_probseg" in message and "label-WM_probseg" in message
    assert "\n" not in message


def test_empty_user_home_names_the_template_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty home fails before any file is looked for: the template is still named, with
    the command that pre-fetches it."""
    user = tmp_path / "mount"
    user.mkdir()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(user))
    with pytest.raises(AslprepError) as caught:
        check_templates([parse_space("MNI152NLin6Asym:res-2")])
    message = str(caught.value)
    assert message.startswith(f"{user}: TEMPLATEFLOW_HOME is empty (a bind mount"), message
    assert "; template MNI152NLin6Asym is needed: on a machine with internet run" in message
    assert "tf.get('MNI152NLin6Asym')" in message
    assert "\n" not in message
    assert list(user.iterdir()) == []
