"""Route rules at the enforcement point: what may leave a server through its raw-file routes.

Each role says, in ``[roles.NAME] raw_files``, what its holders may download as raw files
from their own server (``files`` routes, see :mod:`ztlab.hub.proxy.routes`): ``"allow"``,
``"refuse"``, or a size. A user with several roles gets the most generous rule. Only reads
(``GET``, ``HEAD``) are ruled: saving and uploading are not egress. A refusal names the rule
(``[roles.viewer] raw_files = "refuse"``) so that users and administrators know what to
change; the airlock for reviewed exports comes later and will live here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: the methods the rules apply to (reads; writes bring data in)
RULED_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class FileRule:
    """The raw-file rule that applies to a user (from one of their roles)."""

    #: bytes a file may have: ``None`` without a limit, ``0`` refused
    limit: int | None
    #: the role the rule comes from (empty: the user holds no role)
    role: str
    #: the rule as written (``"refuse"``, ``"allow"``, ``"100M"``)
    value: str

    @property
    def name(self) -> str:
        """How the rule is spelt in ``ztlab.toml``."""
        if not self.role:
            return "no role allows raw files"
        return f'[roles.{self.role}] raw_files = "{self.value}"'

    @property
    def audit_name(self) -> str:
        """The rule in audit records (``rule: roles.viewer.raw_files``)."""
        return f"rule: roles.{self.role or '-'}.raw_files"


def file_rule(roles: frozenset[str], config_roles: Mapping[str, Any]) -> FileRule:
    """The most generous raw-file rule among ``roles``."""
    best = FileRule(limit=0, role="", value="refuse")
    for role in sorted(roles):
        config = config_roles.get(role)
        if config is None:
            continue
        limit = config.raw_files_limit
        if limit is None:
            return FileRule(limit=None, role=role, value=config.raw_files)
        if best.role == "" or limit > (best.limit or 0):
            best = FileRule(limit=limit, role=role, value=config.raw_files)
    return best


def refusal(rule: FileRule, file: str, size: int | None, *, unknown: bool = False) -> str | None:
    """What the user is told when ``rule`` refuses ``file`` of ``size`` bytes (``None``: let
    through). ``size`` is ``None`` for a file that does not exist (the server answers 404);
    ``unknown`` when its size could not be told (refused when the rule has a limit)."""
    if rule.limit is None:
        return None
    if rule.limit == 0:
        return (
            f"Downloading raw files from your server is refused for your roles (rule "
            f"{rule.name}). Notebooks still open, run and save in JupyterLab."
        )
    if unknown:
        return (
            f"The size of {file} could not be checked, and your roles allow raw files only up "
            f"to {_human(rule.limit)} (rule {rule.name})."
        )
    if size is not None and size > rule.limit:
        return (
            f"{file} is {_human(size)}; your roles allow raw files up to "
            f"{_human(rule.limit)} (rule {rule.name})."
        )
    return None


def _human(size: int) -> str:
    """``157286400`` -> ``"150 MiB"`` (one decimal where it is not whole)."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    if unit == "bytes":
        return f"{size} bytes"
    return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
