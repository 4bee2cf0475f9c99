"""Resolving a server's paths inside its own root: links never leave it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ztlab.hub.proxy.files import UnresolvablePath, resolve_inside


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A sandbox root: /home/u with a file, a dataset mount, and links of every kind."""
    root = tmp_path / "root"
    home = root / "home" / "u"
    home.mkdir(parents=True)
    (home / "data.csv").write_text("x\n")
    (root / "datasets" / "d").mkdir(parents=True)
    (root / "datasets" / "d" / "big.bin").write_bytes(b"\0" * 1000)
    (home / "d").symlink_to("/datasets/d")  # absolute: inside the sandbox's root
    (home / "alias.csv").symlink_to("data.csv")  # relative
    (home / "up").symlink_to("../../../../../../etc")  # climbs: stops at the root
    (home / "loop").symlink_to("loop")
    return root


def test_links_resolve_inside_the_root(root: Path) -> None:
    assert resolve_inside(str(root), "/home/u/data.csv") == "/home/u/data.csv"
    assert resolve_inside(str(root), "/home/u/alias.csv") == "/home/u/data.csv"
    assert resolve_inside(str(root), "/home/u/d/big.bin") == "/datasets/d/big.bin"
    # an absolute link means the sandbox's /, never the host's
    assert resolve_inside(str(root), "/home/u/up/passwd") is None
    assert resolve_inside(str(root), "/home/u/../../../../etc/passwd") is None
    assert resolve_inside(str(root), "/home/u/missing.csv") is None


def test_a_loop_cannot_be_resolved(root: Path) -> None:
    with pytest.raises(UnresolvablePath, match="too many symbolic links"):
        resolve_inside(str(root), "/home/u/loop")
