"""Loading policies as code: read, parse, check annotations, validate against the schema.

Each policy file is split into its statements (a policy ends at a ``;`` outside strings
and comments) so that every message names the file and the line where the policy
starts. Each policy must carry a unique ``@id("...")`` and a ``@reason("...")``; the
policy set handed to Cedar is keyed by those ids, so Cedar's diagnostics name them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from types import MappingProxyType

from ztlab.common.errors import PolicyError
from ztlab.hub.policy import _cedar
from ztlab.hub.policy._schema import (
    ACTION_TYPE,
    ActionFacts,
    SchemaFacts,
    SchemaFactsError,
    read_facts,
)

SCHEMA_FILE = "schema.cedarschema"
POLICY_SUFFIX = ".cedar"

_POLICY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CEDAR_POLICY_PREFIX = re.compile(r"^for policy `[^`]*`, ")


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    """One policy, as the engine explains it."""

    policy_id: str
    reason: str
    effect: str
    """``permit`` or ``forbid``."""
    source: str
    """``FILE:LINE`` where the policy starts."""


@dataclass(frozen=True, slots=True)
class LoadedPolicies:
    """A validated policy set and the schema facts requests are checked against."""

    schema: _cedar.SchemaHandle
    facts: SchemaFacts
    policies: Mapping[str, LoadedPolicy]
    """Policies by id, in load order (files sorted by name, then by position)."""
    policy_set: _cedar.PolicySetHandle
    """All policies."""
    by_action: Mapping[str, _cedar.PolicySetHandle]
    """Per action, only the policies whose action scope can match it (Cedar evaluates
    every policy of a set, so a smaller set halves the cost of a decision)."""


@dataclass(frozen=True, slots=True)
class _Statement:
    line: int
    text: str


def split_statements(text: str) -> tuple[list[_Statement], _Statement | None]:
    """Split Cedar policy text into statements; also return trailing unterminated text."""
    statements: list[_Statement] = []
    line = 1
    start = -1
    start_line = 0
    in_string = in_comment = escaped = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\n":
            line += 1
            in_comment = False
        elif in_comment:
            pass
        elif in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == "/" and text.startswith("//", i):
            in_comment = True
        elif not ch.isspace():
            if start < 0:
                start, start_line = i, line
            if ch == '"':
                in_string = True
            elif ch == ";":
                statements.append(_Statement(start_line, text[start : i + 1]))
                start = -1
        i += 1
    trailing = _Statement(start_line, text[start:]) if start >= 0 else None
    return statements, trailing


def load(
    *, schema_text: str, schema_source: str, policy_texts: Mapping[str, str]
) -> LoadedPolicies:
    """Parse and validate a schema and policy files (``source name -> Cedar text``).

    Raises :class:`PolicyError` naming the file (and line) and the problem.
    """
    try:
        schema = _cedar.parse_schema(schema_text)
    except _cedar.CedarError as exc:
        raise PolicyError(f"{schema_source}: invalid Cedar schema: {exc}") from exc
    try:
        facts = read_facts(_cedar.render_schema(schema))
    except SchemaFactsError as exc:
        raise PolicyError(f"{schema_source}: {exc}") from exc

    if not policy_texts:
        raise PolicyError(
            "no policy files (*.cedar) were given",
            hint="deny-all by an empty policy set is almost certainly a mistake",
        )
    loaded: dict[str, LoadedPolicy] = {}
    ests: dict[str, _cedar.JsonObject] = {}
    for source in sorted(policy_texts):
        for policy, est in _load_file(source, policy_texts[source], schema):
            first = loaded.get(policy.policy_id)
            if first is not None:
                raise PolicyError(
                    f"{policy.source}: duplicate @id {policy.policy_id!r}, "
                    f"already used at {first.source}",
                    hint="every policy needs its own @id",
                )
            loaded[policy.policy_id] = policy
            ests[policy.policy_id] = est
    if not loaded:
        raise PolicyError(
            f"no policies in {', '.join(sorted(policy_texts))}",
            hint="deny-all by an empty policy set is almost certainly a mistake",
        )
    try:
        policy_set = _cedar.policy_set(ests)
        by_action = {
            action.name: _cedar.policy_set(
                {pid: est for pid, est in ests.items() if _may_match(est, action)}
            )
            for action in facts.actions.values()
        }
    except _cedar.CedarError as exc:  # pragma: no cover - each policy parsed on its own
        raise PolicyError(f"cannot assemble the policy set: {exc}") from exc
    return LoadedPolicies(
        schema=schema,
        facts=facts,
        policies=MappingProxyType(loaded),
        policy_set=policy_set,
        by_action=MappingProxyType(by_action),
    )


def _may_match(est: _cedar.JsonObject, action: ActionFacts) -> bool:
    """Whether a policy's action scope can match ``action`` (when unsure: yes)."""
    scope = est.get("action") or {}
    op = scope.get("op")
    if op == "==":
        uids = [scope.get("entity")]
        names = {action.name}
    elif op == "in":
        uids = scope["entities"] if "entities" in scope else [scope.get("entity")]
        names = {action.name, *action.groups}
    else:
        return True
    for uid in uids:
        if not isinstance(uid, dict) or uid.get("type") != ACTION_TYPE:
            return True
        if uid.get("id") in names:
            return True
    return False


def _load_file(
    source: str, text: str, schema: _cedar.SchemaHandle
) -> Iterable[tuple[LoadedPolicy, _cedar.JsonObject]]:
    statements, trailing = split_statements(text)
    if trailing is not None:
        detail = _syntax_error(trailing.text) or "policy is not terminated by ';'"
        raise PolicyError(f"{source}:{trailing.line}: syntax error: {detail}")
    out: list[tuple[LoadedPolicy, _cedar.JsonObject]] = []
    for stmt in statements:
        where = f"{source}:{stmt.line}"
        try:
            doc = _cedar.policy_to_json(stmt.text)
        except _cedar.CedarError as exc:
            raise PolicyError(f"{where}: syntax error: {exc}") from exc
        if doc.get("templates"):
            raise PolicyError(
                f"{where}: policy is a template (uses ?principal or ?resource)",
                hint="ztlab policies are static; write the principal or resource out",
            )
        static = list(doc.get("staticPolicies", {}).values())
        if len(static) != 1:  # pragma: no cover - one statement is one policy
            raise PolicyError(f"{where}: expected one policy, found {len(static)}")
        est: _cedar.JsonObject = static[0]
        policy = _annotations(where, est)
        errors = _cedar.validate(stmt.text, schema)
        if errors:
            problems = "; ".join(_CEDAR_POLICY_PREFIX.sub("", err) for err in errors)
            raise PolicyError(
                f"{where}: policy {policy.policy_id!r} does not match the schema: {problems}"
            )
        out.append((policy, est))
    return out


def _annotations(where: str, est: _cedar.JsonObject) -> LoadedPolicy:
    annotations = est.get("annotations") or {}
    policy_id = annotations.get("id")
    if policy_id is None:
        raise PolicyError(
            f'{where}: policy has no @id("...") annotation',
            hint='give every policy a unique @id("...") and a @reason("...")',
        )
    if not isinstance(policy_id, str) or not _POLICY_ID.fullmatch(policy_id):
        raise PolicyError(
            f"{where}: @id {policy_id!r} is not a plain name "
            "(letters, digits, '.', '_' and '-', starting with a letter or digit)"
        )
    reason = annotations.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise PolicyError(
            f'{where}: policy {policy_id!r} has no @reason("...") annotation',
            hint="the reason is shown to the user with every decision the policy makes",
        )
    return LoadedPolicy(
        policy_id=policy_id,
        reason=reason.strip(),
        effect=str(est.get("effect", "permit")),
        source=where,
    )


def _syntax_error(text: str) -> str | None:
    try:
        _cedar.policy_to_json(text)
    except _cedar.CedarError as exc:
        return str(exc)
    return None


@dataclass(frozen=True, slots=True)
class PolicySources:
    """The texts of a policy directory: its schema and its policy files."""

    schema_text: str
    schema_source: str
    policy_texts: Mapping[str, str]


def read_directory(directory: Traversable, *, fallback_schema: Traversable) -> PolicySources:
    """Read ``*.cedar`` files and ``schema.cedarschema`` from a directory.

    Without its own ``schema.cedarschema`` the directory's policies are validated against
    ``fallback_schema`` (the shipped schema: the contract the enforcement points call).
    """
    if not directory.is_dir():
        raise PolicyError(
            f"policy directory {directory} does not exist or is not a directory",
            hint="pass a directory holding *.cedar files (and optionally schema.cedarschema)",
        )
    schema_file = directory.joinpath(SCHEMA_FILE)
    if not schema_file.is_file():
        schema_file = fallback_schema
    texts: dict[str, str] = {}
    for entry in sorted(directory.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(POLICY_SUFFIX) and entry.is_file():
            texts[str(entry)] = _read(entry)
    if not texts:
        raise PolicyError(
            f"policy directory {directory} holds no policy files (*.cedar)",
            hint="deny-all by an empty policy set is almost certainly a mistake",
        )
    return PolicySources(
        schema_text=_read(schema_file), schema_source=str(schema_file), policy_texts=texts
    )


def _read(entry: Traversable) -> str:
    try:
        return entry.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read {entry}: {exc}") from exc
