"""Shared test fixtures, and a check that the tests run against this checkout's code.

ztlab is installed into the venv as a copy (``make test`` copies it again whenever a file
changed), so a test run straight after an edit, without ``make``, would test the code as it
was. The session refuses to start, naming the first file that differs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import ztlab

ROOT = Path(__file__).resolve().parents[1]
#: checkout folder -> where it lands in the installed package (as setup.py maps them)
PACKAGE_DIRS = {
    "src/ztlab": "",
    **{name: name for name in ("cli", "common", "hub", "extensions", "kernels", "dev", "deploy")},
}


def _stale_file() -> str | None:
    installed = Path(ztlab.__file__).resolve().parent
    if installed == ROOT / "src" / "ztlab":
        return None  # imported straight from the checkout
    for folder, target in PACKAGE_DIRS.items():
        for source in (ROOT / folder).rglob("*.py"):
            copy = installed / target / source.relative_to(ROOT / folder)
            if not copy.is_file() or (
                hashlib.sha256(copy.read_bytes()).digest()
                != hashlib.sha256(source.read_bytes()).digest()
            ):
                return str(source.relative_to(ROOT))
    return None


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = _stale_file()
    if stale is not None:
        raise pytest.UsageError(
            f"the installed ztlab ({Path(ztlab.__file__).parent}) is not this checkout's code "
            f"({stale} differs): run `make venv-dev` (or `make test`), which installs it again"
        )
