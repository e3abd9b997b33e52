"""The docs stay in step with the code: every CLI option, every constant, a strict build."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from aslprep_lite.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _numbers(entry: dict) -> list[float]:
    """The numeric value(s) of one constants.toml table (``value`` or ``values``)."""
    if "value" in entry:
        return [float(entry["value"])]

    def flatten(values) -> list[float]:  # e.g. reference_tissue: one table per tissue
        if isinstance(values, dict):
            return [number for v in values.values() for number in flatten(v)]
        return [float(values)]

    return flatten(entry["values"])


def _spellings(value: float) -> set[str]:
    """Ways a number may be written in the docs: ``5``, ``5.0``, ``2.087``, ``6000``."""
    return {f"{value:g}", repr(value)}


def _mentions(text: str, number: str) -> bool:
    """Whether ``number`` occurs in ``text`` as a whole number (not inside 15.0 or 0.955)."""
    return re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", text) is not None


def test_usage_lists_every_option() -> None:
    usage = (DOCS / "usage.md").read_text(encoding="utf-8")
    options = [
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option not in ("-h", "--help")
    ]
    assert options, "the parser has no options?"
    missing = [option for option in options if f"`{option}" not in usage]
    assert not missing, f"docs/usage.md does not document {missing}"


def test_methods_lists_every_constant() -> None:
    methods = (DOCS / "methods.md").read_text(encoding="utf-8")
    with resources.files("aslprep_lite.data").joinpath("constants.toml").open("rb") as fobj:
        table = tomllib.load(fobj)
    missing = []
    for key, entry in table.items():
        if key == "references":
            continue
        if f"`{key}`" not in methods:
            missing.append(key)
        for value in _numbers(entry):
            if not any(_mentions(methods, s) for s in _spellings(value)):
                missing.append(f"{key} = {value:g}")
    assert not missing, f"docs/methods.md does not list {missing}"


def test_methods_cites_every_reference() -> None:
    methods = (DOCS / "methods.md").read_text(encoding="utf-8")
    with resources.files("aslprep_lite.data").joinpath("constants.toml").open("rb") as fobj:
        references = tomllib.load(fobj)["references"]
    missing = [
        key for key, citation in references.items() if citation.split("doi:")[-1] not in methods
    ]
    assert not missing, f"docs/methods.md does not cite {missing}"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed")
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
