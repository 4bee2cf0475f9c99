"""Which packages a user may install: the rules of their roles, and approved requests.

A rule is ``*`` (every package the mirror has) or a name with an optional version range
(``requests>=2,<3``), from ``[roles.NAME] packages`` in ztlab.toml or from a request an
admin approved (:mod:`ztlab.hub.packages.requests`). With several roles the union applies.
:meth:`PackageRules.check` answers for one file's project and version, with the rule that
allowed it or a refusal that says what the rules are and how to ask.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version


@dataclass(frozen=True, slots=True)
class Rule:
    """One allowlist entry: ``requirement`` (``*`` or a requirement) and where it comes from
    (``role trainer``, ``request 3``)."""

    requirement: str
    source: str

    @property
    def project(self) -> NormalizedName | None:
        """The project this rule is for (``None`` for ``*``)."""
        if self.requirement == "*":
            return None
        return canonicalize_name(Requirement(self.requirement).name)

    def admits(self, version: Version | None) -> bool:
        """Whether ``version`` of the rule's project lies in its range (any, unknown)."""
        if self.requirement == "*" or version is None:
            return True
        return Requirement(self.requirement).specifier.contains(version, prereleases=True)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer for one project (and version): allowed by ``rule``, or refused."""

    allowed: bool
    project: str
    version: str | None
    rule: str
    message: str


def how_to_ask(project: str) -> str:
    """The command that asks an admin for ``project``."""
    return f'ztlab packages request {project} --reason "what it is for"'


class ApprovedRules(Protocol):
    """Where approved requests come from (:class:`~ztlab.hub.packages.PackageRequests`)."""

    def approved_rules(self, user: str, roles: frozenset[str]) -> list[Rule]: ...


def role_rules(roles: Mapping[str, Any]) -> dict[str, list[str]]:
    """``[roles.NAME] packages`` of the configuration: role -> its rules."""
    return {name: list(role.packages) for name, role in roles.items()}


class PackageRules:
    """The allowlist of one user: their roles' rules and the requests approved for them."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = tuple(rules)

    @classmethod
    def for_user(
        cls,
        roles: Iterable[str],
        role_rules: Mapping[str, Iterable[str]],
        approved: Iterable[Rule] = (),
    ) -> PackageRules:
        """The rules of ``roles`` (``role_rules``: role -> its ``packages``) and ``approved``."""
        rules = [
            Rule(requirement, f"role {role}")
            for role in sorted(set(roles))
            for requirement in role_rules.get(role, ())
        ]
        return cls([*rules, *approved])

    @classmethod
    def of_user(
        cls,
        user: str,
        roles: frozenset[str],
        role_rules: Mapping[str, Iterable[str]],
        requests: ApprovedRules,
    ) -> PackageRules:
        """``user``'s allowlist: the rules of ``roles`` and the requests approved for them
        (reads the request store: call it from a thread)."""
        return cls.for_user(roles, role_rules, requests.approved_rules(user, roles))

    def for_project(self, project: str) -> list[Rule]:
        """The rules that name ``project`` (or any project)."""
        name = canonicalize_name(project)
        return [rule for rule in self.rules if rule.project in (None, name)]

    def check(self, project: str, version: str | None = None) -> Verdict:
        """May ``project`` (at ``version``) be installed?"""
        parsed: Version | None = None
        if version is not None:
            try:
                parsed = Version(version)
            except InvalidVersion:
                return Verdict(
                    False, project, version, "", f"{project} {version}: not a valid version"
                )
        matching = self.for_project(project)
        for rule in matching:
            if rule.admits(parsed):
                return Verdict(True, project, version, f"{rule.requirement} ({rule.source})", "")
        if not matching:
            return Verdict(
                False,
                project,
                version,
                "",
                f"{project} is not on the package allowlist of your roles; "
                f"to ask for it: {how_to_ask(project)}",
            )
        ranges = "; ".join(f"{rule.requirement} ({rule.source})" for rule in matching)
        return Verdict(
            False,
            project,
            version,
            "",
            f"{project} {version} is outside the allowed versions: {ranges}; "
            f"to ask for it: {how_to_ask(f'{project}=={version}')}",
        )
