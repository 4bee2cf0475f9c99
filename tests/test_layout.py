"""The tree is what setup.py installs: no symbolic links, every package folder mapped."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("cli", "common", "hub", "extensions", "kernels", "dev", "deploy")


def test_no_symbolic_links_are_tracked() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the tree is read through git ls-files)")
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-s"], capture_output=True, text=True, check=True
    ).stdout
    links = [line.split("\t", 1)[1] for line in listed.splitlines() if line.startswith("120000")]
    assert links == []


def test_setup_maps_every_package_folder() -> None:
    text = (ROOT / "setup.py").read_text()
    for name in SUBPACKAGES:
        assert f'"{name}"' in text, name
        assert (ROOT / name / "__init__.py").is_file(), name
    assert (ROOT / "src" / "ztlab" / "__init__.py").is_file()
    # nothing at the top level could shadow the installed package
    assert not (ROOT / "ztlab").exists()


def test_the_installed_package_is_a_copy() -> None:
    import ztlab

    installed = Path(ztlab.__file__).resolve()
    assert ROOT not in installed.parents, f"ztlab is imported from the checkout: {installed}"
