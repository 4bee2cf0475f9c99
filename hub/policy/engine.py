"""The policy decision point: one ``authorize`` call for every enforcement point.

Policies are code: Cedar files validated against a Cedar schema when the engine starts
(a syntax error or a schema violation stops start-up with the file and line). Each
decision is deny by default; a ``forbid`` overrides every ``permit``; and when Cedar
reports an evaluation error the engine denies even where a permit matched (a broken
guardrail must not fail open).

Shipped default roles (``hub/policy/defaults``; "own" = the user's own server, or a model
version the context names the user as trainer of)::

    action            admin  data-steward  trainer  approver  viewer
    spawn_server      own    own           own      own       own
    lease_gpu         -      -             yes      -         -
    join_pool         -      -             yes      -         -
    read_dataset      -      yes           yes      -         -
    register_dataset  -      yes           -        -         -
    register_model    -      -             own*     -         -
    sign_model        -      -             own      -         -
    approve_model     -      -             -        others'   -
    run_schedule      yes    -             yes      -         -
    read_audit        yes    -             -        -         -
    use_environment   base   base          all      base      base
    manage_environment yes   -             -        -         -
    approve_package   yes    -             -        -         -

    * register_model: forbidden when the context names another user as trainer.

Guardrails (``guardrails.cedar``, forbids for everyone, admin included): the two-person
rule (no approval of a model version one trained, nor one whose trainer is not named),
sign only one's own model versions, register only one's own, start only one's own
server, and the admin role never leases GPUs or joins pools (unless the same user also
holds the trainer role). A user with no role, or only unknown roles, is denied
everything; several roles grant the union of their permissions.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from ztlab.common.auditlog.sink import AuditSink
from ztlab.common.errors import PolicyError
from ztlab.hub.policy import _cedar, _load, _requests
from ztlab.hub.policy._schema import ACTION_TYPE, ROLE_TYPE, USER_TYPE

_ROLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_BAD_NAME_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")

#: the ``action`` of the audit record written for every decision
AUDIT_ACTION = "policy.decision"


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """Who asks: an authenticated user name and the roles the identity provider granted.

    ``roles`` may name roles no policy mentions (they simply match nothing), but each must
    be a plain name (letters, digits, ``.``, ``_``, ``-``). Any set-like collection is
    accepted and stored as a ``frozenset``; a bare string is rejected.
    """

    name: str
    roles: frozenset[str]

    def __post_init__(self) -> None:
        name: object = self.name
        if not isinstance(name, str) or not name or _BAD_NAME_CHARS.search(name):
            raise PolicyError(
                f"invalid principal name {name!r}: expected a non-empty user name "
                "without spaces or control characters"
            )
        roles: object = self.roles
        if isinstance(roles, str | bytes) or not isinstance(roles, set | frozenset | list | tuple):
            raise PolicyError(
                f"roles of principal {name!r} must be a set of role names, got {roles!r}"
            )
        for role in roles:
            if not isinstance(role, str) or not _ROLE_NAME.fullmatch(role):
                raise PolicyError(
                    f"invalid role {role!r} for principal {name!r}: a role is a plain name "
                    "(letters, digits, '.', '_' and '-', starting with a letter or digit)"
                )
        if not isinstance(roles, frozenset):
            object.__setattr__(self, "roles", frozenset(roles))


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The answer to one request.

    ``reason`` is for people ("permitted by policy 'x': ...", "forbidden by policy 'y':
    ...", "denied by default: ..."); ``policy_id`` is the ``@id`` of the policy that
    determined the decision, or ``None`` when no policy did (denied by default).
    """

    allowed: bool
    reason: str
    policy_id: str | None


def _defaults_dir() -> Traversable:
    return resources.files("ztlab.hub.policy").joinpath("defaults")


def default_policy_files() -> dict[str, str]:
    """The shipped schema and default policies: file name -> text (schema first)."""
    directory = _defaults_dir()
    entries = sorted(directory.iterdir(), key=lambda e: (e.name != _load.SCHEMA_FILE, e.name))
    return {
        entry.name: entry.read_text(encoding="utf-8")
        for entry in entries
        if entry.name == _load.SCHEMA_FILE or entry.name.endswith(_load.POLICY_SUFFIX)
    }


class PolicyEngine:
    """Evaluates requests against a validated Cedar policy set (deny by default).

    Build one at start-up with :meth:`defaults` or :meth:`from_directory` (or from texts
    with the constructor) and share it: it is immutable and thread-safe. Every decision
    is recorded on ``audit`` when one is given.
    """

    def __init__(
        self,
        *,
        schema: str,
        policies: Mapping[str, str],
        audit: AuditSink | None = None,
        schema_source: str = _load.SCHEMA_FILE,
        cache_size: int = 1024,
    ) -> None:
        """Parse and validate ``schema`` (Cedar schema text) and ``policies``.

        ``policies`` maps a source name (shown in messages, e.g. a file path) to Cedar
        policy text. Raises :class:`PolicyError` naming the source and line of the first
        problem. ``cache_size`` bounds the per-principal cache of entity handles.
        """
        loaded = _load.load(
            schema_text=schema, schema_source=schema_source, policy_texts=dict(policies)
        )
        self._loaded = loaded
        self._facts = loaded.facts
        self._schema = loaded.schema
        self._by_action = loaded.by_action
        self._policies = loaded.policies
        self._rank = {policy_id: index for index, policy_id in enumerate(loaded.policies)}
        self._audit = audit
        self._entities = functools.lru_cache(maxsize=cache_size)(self._build_entities)

    @classmethod
    def from_directory(
        cls, path: str | os.PathLike[str], *, audit: AuditSink | None = None
    ) -> PolicyEngine:
        """Load ``*.cedar`` policies (and ``schema.cedarschema``) from a directory.

        A directory without its own ``schema.cedarschema`` is validated against the
        shipped schema, the contract the enforcement points are written against.
        """
        sources = _load.read_directory(
            Path(path), fallback_schema=_defaults_dir().joinpath(_load.SCHEMA_FILE)
        )
        return cls._from_sources(sources, audit=audit)

    @classmethod
    def defaults(cls, *, audit: AuditSink | None = None) -> PolicyEngine:
        """The shipped schema and default role policies (see the module docstring)."""
        directory = _defaults_dir()
        sources = _load.read_directory(
            directory, fallback_schema=directory.joinpath(_load.SCHEMA_FILE)
        )
        return cls._from_sources(sources, audit=audit)

    def with_audit(self, audit: AuditSink | None) -> PolicyEngine:
        """The same policies recording decisions to ``audit`` (this engine is unchanged)."""
        twin = copy.copy(self)
        twin._audit = audit
        return twin

    @classmethod
    def _from_sources(
        cls, sources: _load.PolicySources, *, audit: AuditSink | None
    ) -> PolicyEngine:
        return cls(
            schema=sources.schema_text,
            schema_source=sources.schema_source,
            policies=sources.policy_texts,
            audit=audit,
        )

    # --- introspection ---------------------------------------------------------------

    @property
    def actions(self) -> tuple[str, ...]:
        """The actions requests may name, sorted."""
        return tuple(sorted(self._facts.actions))

    @property
    def policy_ids(self) -> tuple[str, ...]:
        """The ``@id`` of every loaded policy, in load order."""
        return tuple(self._policies)

    def resource_kinds(self, action: str) -> tuple[str, ...]:
        """The resource kinds ``action`` applies to (``("pool",)`` for ``lease_gpu``)."""
        return _requests.action_facts(self._facts, action).kinds

    def policy_reason(self, policy_id: str) -> str:
        """The ``@reason`` text of a loaded policy."""
        return self._policies[policy_id].reason

    # --- decisions -------------------------------------------------------------------

    def authorize(
        self,
        principal: Principal,
        action: str,
        resource: str,
        context: Mapping[str, Any] | None = None,
    ) -> Decision:
        """Decide whether ``principal`` may do ``action`` on ``resource`` (``KIND:NAME``).

        ``context`` holds the facts the enforcement point knows, typed per action by the
        schema (e.g. ``{"trainer": "bob"}`` for ``approve_model``). Raises
        :class:`PolicyError` when the request does not fit the schema (unknown action,
        malformed resource, a kind the action does not apply to, an unknown context key
        or a wrong type). When an audit sink was given, records the decision on it; an
        error from the sink propagates (no decision is returned unrecorded).
        """
        if not isinstance(principal, Principal):
            raise PolicyError(f"principal must be a Principal, got {type(principal).__name__}")
        facts = self._facts
        action_facts = _requests.action_facts(facts, action)
        resource_type, resource_id = _requests.resource_uid(facts, action_facts, resource)
        cedar_context = _requests.cedar_context(action_facts, context)
        request = {
            "principal": {"type": USER_TYPE, "id": principal.name},
            "action": {"type": ACTION_TYPE, "id": action},
            "resource": {"type": resource_type, "id": resource_id},
            "context": cedar_context,
        }
        entities = self._entities(principal.name, principal.roles)
        result = _cedar.is_authorized(request, self._by_action[action], entities)
        if result.decision not in ("Allow", "Deny"):
            raise PolicyError(
                f"request {action} on {resource} does not fit the schema: "
                + "; ".join(result.errors)
            )
        decision = self._explain(principal, action, resource, result)
        if self._audit is not None:
            self._audit.record(
                actor=principal.name,
                action=AUDIT_ACTION,
                detail={
                    "roles": sorted(principal.roles),
                    "action": action,
                    "resource": resource,
                    "allowed": decision.allowed,
                    "policy_id": decision.policy_id,
                    "reason": decision.reason,
                    "context": _requests.jsonable(context) if context else {},
                },
            )
        return decision

    def _explain(
        self, principal: Principal, action: str, resource: str, result: _cedar.CedarResult
    ) -> Decision:
        errors = f" (evaluation errors: {'; '.join(result.errors)})" if result.errors else ""
        if result.errors and result.decision == "Allow":
            return Decision(
                allowed=False,
                reason=f"denied: a policy failed to evaluate, failing closed{errors}",
                policy_id=None,
            )
        if result.policy_ids:
            policy_id = min(result.policy_ids, key=lambda p: self._rank.get(p, len(self._rank)))
            policy = self._policies.get(policy_id)
            text = policy.reason if policy is not None else "(unknown policy)"
            if result.decision == "Allow":
                return Decision(
                    allowed=True,
                    reason=f"permitted by policy {policy_id!r}: {text}",
                    policy_id=policy_id,
                )
            return Decision(
                allowed=False,
                reason=f"forbidden by policy {policy_id!r}: {text}{errors}",
                policy_id=policy_id,
            )
        roles = ", ".join(sorted(principal.roles))
        return Decision(
            allowed=False,
            reason=(
                f"denied by default: no policy permits roles [{roles}] to {action} "
                f"on {resource}{errors}"
            ),
            policy_id=None,
        )

    def _build_entities(self, name: str, roles: frozenset[str]) -> _cedar.EntitiesHandle:
        user = {"type": USER_TYPE, "id": name}
        role_uids = [{"type": ROLE_TYPE, "id": role} for role in sorted(roles)]
        doc: list[dict[str, Any]] = [{"uid": uid, "attrs": {}, "parents": []} for uid in role_uids]
        doc.append({"uid": user, "attrs": {"name": name}, "parents": role_uids})
        for kind in sorted(self._facts.owned_kinds):
            own = {"type": self._facts.kind_types[kind], "id": name}
            doc.append({"uid": own, "attrs": {}, "parents": [user]})
        try:
            return _cedar.entities(doc, self._schema)
        except _cedar.CedarError as exc:
            raise PolicyError(f"cannot represent principal {name!r}: {exc}") from exc
