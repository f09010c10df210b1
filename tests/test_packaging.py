"""Packaging: the wheel's package list covers the tree, and the shipped hparams travel with it."""

from __future__ import annotations

from pathlib import Path

import tomllib
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def test_package_list_matches_the_tree():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    methods = {f"fastedit.hparams.{d.name}" for d in (ROOT / "hparams").iterdir() if d.is_dir()}
    assert methods and methods <= listed  # every method folder is a listed (data-only) package
    assert listed - {"fastedit.hparams", *methods} == set(find_packages(str(ROOT), include=["fastedit*"]))
    assert config["package-dir"] == {"fastedit.hparams": "hparams"}
    # Every shipped file matches the package-data pattern (one folder per method).
    pattern = config["package-data"]["fastedit.hparams"]
    shipped = {p.relative_to(ROOT / "hparams") for p in (ROOT / "hparams").rglob("*") if p.is_file()}
    assert shipped and all(p.match(pattern[0]) for p in shipped)
