"""The one module that talks to :mod:`cedarpy` (untyped), behind a small typed surface.

Everything else in :mod:`ztlab.hub.policy` calls these functions; none imports cedarpy.
Handles (``SchemaHandle``, ``PolicySetHandle``, ``EntitiesHandle``) are opaque: they are
parsed once at start-up and passed back in on every call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeAlias

import cedarpy

SchemaHandle: TypeAlias = cedarpy.Schema
PolicySetHandle: TypeAlias = cedarpy.PolicySet
EntitiesHandle: TypeAlias = cedarpy.Entities

JsonObject: TypeAlias = dict[str, Any]


class CedarError(ValueError):
    """Cedar rejected its input; ``str()`` is Cedar's own message."""


@dataclass(frozen=True, slots=True)
class CedarResult:
    """One evaluated request: Cedar's decision, the policies that determined it, errors."""

    decision: str
    """``"Allow"``, ``"Deny"`` or ``"NoDecision"`` (the request could not be built)."""
    policy_ids: list[str]
    """The ids of the policies that determined the decision (permits or forbids)."""
    errors: list[str]
    """Evaluation errors, or why the request could not be built."""


def parse_schema(text: str) -> SchemaHandle:
    """Parse a schema in Cedar's human-readable syntax."""
    try:
        return cedarpy.Schema.from_str(text)
    except ValueError as exc:
        raise CedarError(str(exc)) from exc


def render_schema(schema: SchemaHandle) -> str:
    """The schema in Cedar's canonical rendering (sorted, one declaration per statement)."""
    return str(schema)


def policy_to_json(text: str) -> JsonObject:
    """Parse Cedar policy text into Cedar's JSON policy-set form (``staticPolicies``...)."""
    try:
        result: JsonObject = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as exc:
        raise CedarError(str(exc)) from exc
    return result


def validate(text: str, schema: SchemaHandle) -> list[str]:
    """Validate policy text against the schema; the error messages, empty when valid."""
    result = cedarpy.validate_policies(text, schema)
    if result.validation_passed:
        return []
    return [str(err.error) for err in result.errors] or ["validation failed"]


def policy_set(static_policies: dict[str, JsonObject]) -> PolicySetHandle:
    """Build a policy set whose policy ids are the keys of ``static_policies``."""
    doc = {"staticPolicies": static_policies, "templates": {}, "templateLinks": []}
    try:
        return cedarpy.PolicySet.from_json_str(json.dumps(doc))
    except ValueError as exc:
        raise CedarError(str(exc)) from exc


def entities(doc: list[JsonObject], schema: SchemaHandle) -> EntitiesHandle:
    """Parse an entity set (Cedar JSON entity form), validated against the schema."""
    try:
        return cedarpy.Entities.from_json_str(json.dumps(doc), schema)
    except ValueError as exc:
        raise CedarError(str(exc)) from exc


def is_authorized(
    request: JsonObject, policies: PolicySetHandle, ents: EntitiesHandle
) -> CedarResult:
    """Evaluate one request (``principal``/``action``/``resource`` as ``{type, id}``).

    No schema is passed: the caller has checked the request against the schema facts,
    and ``ents`` was built with the schema (which adds the action entities), so Cedar
    skips re-validating the request on every call.
    """
    result = cedarpy.is_authorized(request, policies, ents)
    diagnostics = result.diagnostics
    return CedarResult(
        decision=result.decision.value,
        policy_ids=list(diagnostics.reasons),
        errors=list(diagnostics.errors),
    )
