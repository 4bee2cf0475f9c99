"""The architecture page matches the code: every path it names exists, every control-plane
package is on it, and the audit page renders the event catalogue."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def test_every_path_on_the_architecture_page_exists() -> None:
    text = ARCHITECTURE.read_text()
    paths = set(re.findall(r"\b((?:hub|cli|common|tests)/[\w/]+\.py)\b", text))
    paths |= set(re.findall(r"`((?:hub|cli|common)/[\w/]+/)`", text))
    assert len(paths) > 20, "the pattern found too few paths: it is out of date"
    missing = sorted(path for path in paths if not (ROOT / path).exists())
    assert not missing, f"the architecture page names paths that do not exist: {missing}"


def test_the_architecture_page_names_every_control_plane_package() -> None:
    text = ARCHITECTURE.read_text()
    packages = sorted(path.parent.name for path in (ROOT / "hub").glob("*/__init__.py"))
    modules = sorted(path.stem for path in (ROOT / "hub").glob("*.py") if path.stem != "__init__")
    unnamed = [name for name in packages + modules if f"hub/{name}" not in text]
    assert not unnamed, f"not on the architecture page: {unnamed}"


def test_the_audit_page_renders_the_catalogue() -> None:
    assert "```{ztlab-audit-events}" in (ROOT / "docs" / "audit.md").read_text()
