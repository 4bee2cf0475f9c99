"""Checking a request's shape against the schema facts, and writing it in Cedar's form.

Runs on every decision, so it does the least work that gives a precise message: a
dictionary lookup for the action, one ``partition`` for the resource, and a walk over
the (usually empty or tiny) context.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Set
from typing import Any

from ztlab.common.errors import PolicyError
from ztlab.hub.policy._schema import (
    ActionFacts,
    CedarType,
    PrimType,
    RecordType,
    SchemaFacts,
    SetType,
)

_KIND = re.compile(r"[a-z][a-z0-9_]*")
_BAD_NAME_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")
_DECIMAL = re.compile(r"-?[0-9]+\.[0-9]{1,4}")
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
_EXTENSION_FN = {
    "ipaddr": "ip",
    "decimal": "decimal",
    "datetime": "datetime",
    "duration": "duration",
}


def action_facts(facts: SchemaFacts, action: str) -> ActionFacts:
    """The facts of a known action, or :class:`PolicyError` listing the valid actions."""
    found = facts.actions.get(action)
    if found is None:
        raise PolicyError(
            f"unknown action {action!r}; expected one of: {', '.join(sorted(facts.actions))}"
        )
    return found


def _kinds_text(kinds: tuple[str, ...]) -> str:
    examples = ", ".join(f"{kind}:NAME" for kind in kinds)
    return f"{' or '.join(kinds)} resources ({examples})"


def resource_uid(facts: SchemaFacts, action: ActionFacts, resource: str) -> tuple[str, str]:
    """Check ``KIND:NAME`` against the action; return the Cedar entity type and id."""
    kind, sep, name = resource.partition(":") if isinstance(resource, str) else ("", "", "")
    if not sep or not _KIND.fullmatch(kind) or not name or _BAD_NAME_CHARS.search(name):
        raise PolicyError(
            f"malformed resource {resource!r}: expected KIND:NAME "
            f"(e.g. pool:research, dataset:mnist@3); NAME may not be empty or hold spaces"
        )
    if kind not in action.kinds:
        if kind not in facts.kind_types:
            raise PolicyError(
                f"unknown resource kind {kind!r} in {resource!r}; action {action.name!r} "
                f"applies to {_kinds_text(action.kinds)}"
            )
        raise PolicyError(
            f"action {action.name!r} applies to {_kinds_text(action.kinds)}, got {resource!r}"
        )
    return facts.kind_types[kind], name


def cedar_context(action: ActionFacts, context: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check the context against the action's declared context; return Cedar JSON."""
    if context is None:
        context = {}
    elif not isinstance(context, Mapping):
        raise PolicyError(
            f"the context of action {action.name!r} must be a mapping, got {type(context).__name__}"
        )
    return _record(action, action.context, context, prefix="")


def _record(
    action: ActionFacts, record: RecordType, value: Mapping[str, Any], *, prefix: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    attributes = record.attributes
    for key, item in value.items():
        path = f"{prefix}{key}"
        attr = attributes.get(key) if isinstance(key, str) else None
        if attr is None:
            expected = ", ".join(f"{name} ({a.type.describe()})" for name, a in attributes.items())
            raise PolicyError(
                f"unknown context key {path!r} for action {action.name!r}; "
                f"expected keys: {expected or 'none'}"
            )
        out[key] = _value(action, attr.type, item, path=path)
    for name, attr in attributes.items():
        if attr.required and name not in value:
            raise PolicyError(
                f"context key {prefix + name!r} ({attr.type.describe()}) is required by "
                f"action {action.name!r}"
            )
    return out


def _value(action: ActionFacts, typ: CedarType, value: Any, *, path: str) -> Any:
    if isinstance(typ, PrimType):
        name = typ.name
        if name == "String":
            if isinstance(value, str):
                return value
        elif name == "Long":
            if isinstance(value, int) and not isinstance(value, bool):
                if _LONG_MIN <= value <= _LONG_MAX:
                    return value
                raise PolicyError(
                    f"context key {path!r} of action {action.name!r} is out of the Long range"
                )
        elif name == "Bool":
            if isinstance(value, bool):
                return value
        elif isinstance(value, str) and _extension_ok(name, value):
            return {"__extn": {"fn": _EXTENSION_FN[name], "arg": value}}
    elif isinstance(typ, SetType):
        if isinstance(value, list | tuple | Set):
            return [_value(action, typ.element, item, path=f"{path}[]") for item in value]
    elif isinstance(typ, RecordType) and isinstance(value, Mapping):
        return _record(action, typ, value, prefix=f"{path}.")
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    raise PolicyError(
        f"context key {path!r} of action {action.name!r} must be {_article(typ)}, "
        f"got {type(value).__name__} {shown}"
    )


def _extension_ok(name: str, value: str) -> bool:
    if name == "ipaddr":
        try:
            ipaddress.ip_interface(value)
        except ValueError:
            return False
        return "%" not in value
    if name == "decimal":
        return _DECIMAL.fullmatch(value) is not None
    return True  # datetime, duration: Cedar checks the text


def _article(typ: CedarType) -> str:
    text = typ.describe()
    if isinstance(typ, PrimType) and typ.name == "ipaddr":
        return "an ipaddr (an IP address or CIDR range as a string)"
    if isinstance(typ, PrimType) and typ.name == "decimal":
        return "a decimal (a string like '1.25', at most 4 decimal places)"
    return f"{'an' if text[:1] in 'AEIOUaeiou' else 'a'} {text}"


def jsonable(value: Any) -> Any:
    """A copy of a context value that ``json.dumps`` accepts (sets become sorted lists)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, Set):
        return sorted((jsonable(v) for v in value), key=repr)
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
