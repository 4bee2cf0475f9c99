"""Resolving a server's paths inside its own root: links never leave it; a server's view is
reused only while the same process runs."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztlab.hub.proxy.files import ServerFiles, ServerView, UnresolvablePath, resolve_inside


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


class _CountingFiles(ServerFiles):
    """Looks each server up through the process it is given, and counts the lookups."""

    def __init__(self) -> None:
        super().__init__(users={}, db=None)
        self.lookups = 0
        self.pid: int | None = None

    def _lookup(self, owner: str) -> ServerView | None:
        self.lookups += 1
        return None if self.pid is None else ServerView(f"/proc/{self.pid}/root", "/")


@pytest.fixture
def server() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_view_is_reused_while_its_process_runs(server: subprocess.Popen[bytes]) -> None:
    files = _CountingFiles()
    files.pid = server.pid
    first = files.view("u")
    assert first is not None
    assert files.view("u") == first
    assert files.lookups == 1


def test_a_stopped_or_restarted_server_is_looked_up_again(
    server: subprocess.Popen[bytes],
) -> None:
    files = _CountingFiles()
    files.pid = server.pid
    assert files.view("u") is not None
    server.kill()
    server.wait()
    files.pid = None  # the hub has no server for u now
    assert files.view("u") is None
    assert files.lookups == 2
    with subprocess.Popen(["sleep", "60"]) as restarted:
        files.pid = restarted.pid  # a new server, before the reuse time is over
        found = files.view("u")
        restarted.kill()
    assert found == ServerView(f"/proc/{restarted.pid}/root", "/")
    assert files.lookups == 3
