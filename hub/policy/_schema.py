"""The facts ztlab needs from the Cedar schema, read in Python once at start-up.

Cedar checks every request against the schema too, but its messages are terse
("context ... is not valid"). To say exactly what was wrong and what was expected, the
engine checks each request's shape here first: which actions exist, which resource kinds
each applies to, and which context keys (and types) each takes.

The facts are read from Cedar's own canonical rendering of the parsed schema
(``str(Schema)``), not from the file: the rendering is sorted, fully bracketed and free of
comments, so this reader handles one regular form of the grammar. Cedar has already
accepted the schema when this runs; an unexpected token here is a bug in this reader or a
schema feature it does not model, and is reported as such.

Conventions a ztlab schema must follow (checked here):

- everything lives in namespace ``Ztlab``; the principal type is ``Ztlab::User``, with a
  ``name: String`` attribute and parents of type ``Ztlab::Role`` (a plain entity type,
  not an enum, so that an unknown role name is representable and simply matches nothing);
- every action with ``appliesTo`` applies to principal ``Ztlab::User`` and to resources
  of types in ``Ztlab``; a resource type's *kind* is its name in snake case
  (``Ztlab::Pool`` -> ``pool``, ``Ztlab::ModelVersion`` -> ``model_version``);
- resource types carry no attributes: requests name resources only as ``KIND:NAME``;
- a resource type declared ``in [User]`` is per-user: the resource named after a user
  (``server:alice``) is that user's own (``resource in principal`` holds for it);
- context attributes have types String, Long, Bool, ipaddr, decimal, datetime, duration,
  ``Set<...>`` or records of these (no entity references).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

NAMESPACE = "Ztlab"
USER_TYPE = f"{NAMESPACE}::User"
ROLE_TYPE = f"{NAMESPACE}::Role"
ACTION_TYPE = f"{NAMESPACE}::Action"

PRIMITIVES = frozenset({"String", "Long", "Bool"})
EXTENSIONS = frozenset({"ipaddr", "decimal", "datetime", "duration"})


class SchemaFactsError(ValueError):
    """The schema is valid Cedar but does not follow ztlab's conventions."""


# --- types -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrimType:
    """A primitive or extension type: String, Long, Bool, ipaddr, decimal, ..."""

    name: str

    def describe(self) -> str:
        """The type as written in a schema."""
        return self.name


@dataclass(frozen=True, slots=True)
class SetType:
    """``Set<element>``."""

    element: CedarType

    def describe(self) -> str:
        """The type as written in a schema."""
        return f"Set<{self.element.describe()}>"


@dataclass(frozen=True, slots=True)
class Attribute:
    """One attribute of a record type."""

    type: CedarType
    required: bool


@dataclass(frozen=True, slots=True)
class RecordType:
    """A record: attribute name -> type and whether it must be present."""

    attributes: Mapping[str, Attribute] = field(default_factory=dict)

    def describe(self) -> str:
        """The type as written in a schema."""
        inner = ", ".join(
            f"{name}{'' if attr.required else '?'}: {attr.type.describe()}"
            for name, attr in self.attributes.items()
        )
        return "{" + inner + "}"


@dataclass(frozen=True, slots=True)
class EntityRefType:
    """A reference to an entity type (fully qualified)."""

    name: str

    def describe(self) -> str:
        """The type as written in a schema."""
        return self.name


@dataclass(frozen=True, slots=True)
class _Unresolved:
    """A type name as written, before common types and entity types are known."""

    path: str
    namespace: str

    def describe(self) -> str:
        return self.path


CedarType = PrimType | SetType | RecordType | EntityRefType | _Unresolved


# --- facts -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActionFacts:
    """What one action applies to and which context it takes."""

    name: str
    kinds: tuple[str, ...]
    """Resource kinds (``pool``, ``dataset``...) the action applies to, sorted."""
    context: RecordType
    groups: frozenset[str] = frozenset()
    """The action groups (names in ``Ztlab``) this action is in, transitively."""


@dataclass(frozen=True, slots=True)
class SchemaFacts:
    """The request shapes a ztlab schema allows."""

    actions: Mapping[str, ActionFacts]
    """Requestable actions by name (actions without ``appliesTo`` are left out)."""
    kind_types: Mapping[str, str]
    """Resource kind -> Cedar entity type (``pool`` -> ``Ztlab::Pool``)."""
    owned_kinds: frozenset[str]
    """Kinds whose resource named after a user belongs to that user."""


# --- reading the canonical rendering -----------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|//[^\n]*)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<path>::)
  | (?P<punct>[{}\[\]<>(),;:=?@])
    """,
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}


def _unescape(body: str) -> str:
    def sub(match: re.Match[str]) -> str:
        text = match.group(0)
        if text.startswith("\\u{"):
            return chr(int(text[3:-1], 16))
        return _ESCAPES.get(text[1], text[1])

    return re.sub(r"\\u\{[0-9A-Fa-f]+\}|\\.", sub, body)


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # "str", "ident" or the punctuation itself
    text: str


def _tokens(text: str) -> Iterator[_Tok]:
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise SchemaFactsError(f"unexpected character {text[pos]!r} in the schema")
        pos = match.end()
        kind = match.lastgroup
        if kind == "ws":
            continue
        if kind == "str":
            yield _Tok("str", _unescape(match.group(0)[1:-1]))
        elif kind == "ident":
            yield _Tok("ident", match.group(0))
        else:
            yield _Tok(match.group(0), match.group(0))


@dataclass
class _RawEntity:
    parents: list[str]
    attributes: RecordType
    namespace: str
    enum: bool
    tags: bool


@dataclass
class _RawAction:
    principals: list[str]
    resources: list[str]
    context: CedarType
    namespace: str
    applies: bool
    parents: list[tuple[str, str]] = field(default_factory=list)


class _Reader:
    """Recursive-descent reader of Cedar's canonical schema rendering."""

    def __init__(self, text: str) -> None:
        self.toks = list(_tokens(text))
        self.pos = 0
        self.entities: dict[str, _RawEntity] = {}
        self.common: dict[str, CedarType] = {}
        self.actions: dict[tuple[str, str], _RawAction] = {}

    # token helpers
    def peek(self, offset: int = 0) -> _Tok | None:
        idx = self.pos + offset
        return self.toks[idx] if idx < len(self.toks) else None

    def next(self) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise SchemaFactsError("unexpected end of the schema")
        self.pos += 1
        return tok

    def at(self, text: str) -> bool:
        tok = self.peek()
        return tok is not None and tok.text == text and tok.kind in (text, "ident")

    def expect(self, text: str) -> None:
        tok = self.next()
        if tok.text != text:
            raise SchemaFactsError(f"expected {text!r} in the schema, found {tok.text!r}")

    def accept(self, text: str) -> bool:
        if self.at(text):
            self.pos += 1
            return True
        return False

    def name(self) -> str:
        tok = self.next()
        if tok.kind not in ("ident", "str"):
            raise SchemaFactsError(f"expected a name in the schema, found {tok.text!r}")
        return tok.text

    def parts(self) -> list[str]:
        parts = [self.name()]
        while self.accept("::"):
            parts.append(self.name())
        return parts

    def path(self) -> str:
        return "::".join(self.parts())

    def action_ref(self, ns: str) -> tuple[str, str]:
        parts = self.parts()
        if len(parts) == 1:
            return ns, parts[0]
        if parts[-2] != "Action":
            raise SchemaFactsError(f"unexpected action reference {'::'.join(parts)!r}")
        return ("::".join(parts[:-2]) if len(parts) > 2 else ns), parts[-1]

    def annotations(self) -> None:
        while self.accept("@"):
            self.name()
            if self.accept("("):
                self.next()
                self.expect(")")

    # grammar
    def read(self) -> None:
        while self.peek() is not None:
            self.annotations()
            if self.accept("namespace"):
                namespace = self.path()
                self.expect("{")
                while not self.accept("}"):
                    self.declaration(namespace)
            else:
                self.declaration("")

    def declaration(self, ns: str) -> None:
        self.annotations()
        keyword = self.next().text
        if keyword == "entity":
            self.entity(ns)
        elif keyword == "action":
            self.action(ns)
        elif keyword == "type":
            name = self.name()
            self.expect("=")
            self.common[_qualify(ns, name)] = self.type(ns)
            self.expect(";")
        else:
            raise SchemaFactsError(f"unsupported schema declaration {keyword!r}")

    def entity(self, ns: str) -> None:
        names = [self.name()]
        while self.accept(","):
            names.append(self.name())
        parents: list[str] = []
        attributes = RecordType()
        enum = tags = False
        if self.accept("enum"):
            enum = True
            self.expect("[")
            while not self.accept("]"):
                self.next()
        else:
            if self.accept("in"):
                parents = self.type_list()
            self.accept("=")
            if self.at("{"):
                record = self.type(ns)
                assert isinstance(record, RecordType)
                attributes = record
            if self.accept("tags"):
                tags = True
                self.type(ns)
        self.expect(";")
        for name in names:
            self.entities[_qualify(ns, name)] = _RawEntity(
                parents=[_qualify_ref(ns, p) for p in parents],
                attributes=attributes,
                namespace=ns,
                enum=enum,
                tags=tags,
            )

    def action(self, ns: str) -> None:
        names = [self.name()]
        while self.accept(","):
            names.append(self.name())
        parents: list[tuple[str, str]] = []
        if self.accept("in"):
            if self.accept("["):
                while not self.accept("]"):
                    parents.append(self.action_ref(ns))
                    self.accept(",")
            else:
                parents.append(self.action_ref(ns))
        raw = _RawAction([], [], RecordType(), ns, applies=False, parents=parents)
        if self.accept("appliesTo"):
            raw.applies = True
            self.expect("{")
            while not self.accept("}"):
                key = self.name()
                self.expect(":")
                if key == "principal":
                    raw.principals = [_qualify_ref(ns, p) for p in self.type_list()]
                elif key == "resource":
                    raw.resources = [_qualify_ref(ns, p) for p in self.type_list()]
                elif key == "context":
                    raw.context = self.type(ns)
                else:
                    raise SchemaFactsError(f"unsupported appliesTo key {key!r}")
                self.accept(",")
        self.expect(";")
        for name in names:
            self.actions[(ns, name)] = raw

    def type_list(self) -> list[str]:
        if not self.accept("["):
            return [self.path()]
        out: list[str] = []
        while not self.accept("]"):
            out.append(self.path())
            self.accept(",")
        return out

    def type(self, ns: str) -> CedarType:
        if self.accept("{"):
            attributes: dict[str, Attribute] = {}
            while not self.accept("}"):
                self.annotations()
                name = self.name()
                required = not self.accept("?")
                self.expect(":")
                attributes[name] = Attribute(self.type(ns), required)
                self.accept(",")
            return RecordType(MappingProxyType(attributes))
        path = self.path()
        if path in ("Set", "__cedar::Set") and self.accept("<"):
            element = self.type(ns)
            self.expect(">")
            return SetType(element)
        return _Unresolved(path, ns)


def _qualify(ns: str, name: str) -> str:
    return f"{ns}::{name}" if ns else name


def _qualify_ref(ns: str, path: str) -> str:
    return path if "::" in path else _qualify(ns, path)


def kind_of(entity_type: str) -> str:
    """The request kind of an entity type: ``Ztlab::ModelVersion`` -> ``model_version``."""
    base = entity_type.rsplit("::", 1)[-1]
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", base).lower()


class _Resolver:
    def __init__(self, reader: _Reader) -> None:
        self.reader = reader

    def resolve(self, typ: CedarType, seen: frozenset[str] = frozenset()) -> CedarType:
        if isinstance(typ, SetType):
            return SetType(self.resolve(typ.element, seen))
        if isinstance(typ, RecordType):
            return RecordType(
                MappingProxyType(
                    {
                        name: Attribute(self.resolve(attr.type, seen), attr.required)
                        for name, attr in typ.attributes.items()
                    }
                )
            )
        if not isinstance(typ, _Unresolved):
            return typ
        path = typ.path.removeprefix("__cedar::")
        candidates = [typ.path] if "::" in typ.path else [_qualify(typ.namespace, path), path]
        for name in candidates:
            if name in self.reader.common:
                if name in seen:
                    raise SchemaFactsError(f"common type {name} refers to itself")
                return self.resolve(self.reader.common[name], seen | {name})
            if name in self.reader.entities:
                return EntityRefType(name)
        if path in PRIMITIVES or path in EXTENSIONS:
            return PrimType(path)
        raise SchemaFactsError(f"unknown type {typ.path!r} in the schema")


def _check_request_type(typ: CedarType, where: str) -> None:
    if isinstance(typ, SetType):
        _check_request_type(typ.element, where)
    elif isinstance(typ, RecordType):
        for name, attr in typ.attributes.items():
            _check_request_type(attr.type, f"{where}.{name}")
    elif not isinstance(typ, PrimType):
        raise SchemaFactsError(
            f"{where} has type {typ.describe()}; request context may only use String, Long, "
            "Bool, ipaddr, decimal, datetime, duration, Set<...> and records of these"
        )


def _ancestors(reader: _Reader, start: tuple[str, str]) -> frozenset[str]:
    seen: set[tuple[str, str]] = set()
    todo = list(reader.actions[start].parents)
    while todo:
        ref = todo.pop()
        if ref in seen:
            continue
        seen.add(ref)
        parent = reader.actions.get(ref)
        if parent is not None:
            todo.extend(parent.parents)
    return frozenset(name for ns, name in seen if ns == NAMESPACE)


def read_facts(canonical: str) -> SchemaFacts:
    """Read the request shapes from Cedar's canonical rendering of a parsed schema.

    Raises :class:`SchemaFactsError` when the schema does not follow ztlab's conventions.
    """
    reader = _Reader(canonical)
    reader.read()
    resolver = _Resolver(reader)

    user = reader.entities.get(USER_TYPE)
    role = reader.entities.get(ROLE_TYPE)
    if user is None or role is None:
        raise SchemaFactsError(
            f"the schema must declare entity types {USER_TYPE} and {ROLE_TYPE} "
            f"in namespace {NAMESPACE}"
        )
    if role.enum:
        raise SchemaFactsError(f"{ROLE_TYPE} must be a plain entity type, not an enum")
    name_attr = user.attributes.attributes.get("name")
    if name_attr is None or resolver.resolve(name_attr.type) != PrimType("String"):
        raise SchemaFactsError(f"{USER_TYPE} must have an attribute 'name: String'")
    extra = [n for n, a in user.attributes.attributes.items() if a.required and n != "name"]
    if extra:
        raise SchemaFactsError(f"{USER_TYPE} may require no attribute but 'name', got {extra}")
    if ROLE_TYPE not in user.parents:
        raise SchemaFactsError(f"{USER_TYPE} must be declared 'in [Role]'")

    actions: dict[str, ActionFacts] = {}
    kind_types: dict[str, str] = {}
    owned: set[str] = set()
    for (ns, name), raw in sorted(reader.actions.items()):
        if ns != NAMESPACE or not raw.applies:
            continue
        if USER_TYPE not in raw.principals:
            raise SchemaFactsError(f"action {name!r} must apply to principal {USER_TYPE}")
        kinds: list[str] = []
        for rtype in raw.resources:
            entity = reader.entities.get(rtype)
            if entity is None or entity.namespace != NAMESPACE:
                raise SchemaFactsError(
                    f"action {name!r} applies to resource type {rtype}, "
                    f"which is not an entity type of namespace {NAMESPACE}"
                )
            if entity.attributes.attributes or entity.tags or entity.enum:
                raise SchemaFactsError(
                    f"resource type {rtype} must be a plain entity type without attributes "
                    "or tags: requests name resources only as KIND:NAME"
                )
            kind = kind_of(rtype)
            if kind_types.setdefault(kind, rtype) != rtype:
                raise SchemaFactsError(
                    f"resource types {kind_types[kind]} and {rtype} share the kind {kind!r}"
                )
            if USER_TYPE in entity.parents:
                owned.add(kind)
            kinds.append(kind)
        context = resolver.resolve(raw.context)
        if not isinstance(context, RecordType):
            raise SchemaFactsError(f"the context of action {name!r} must be a record")
        _check_request_type(context, f"context of action {name!r}")
        actions[name] = ActionFacts(
            name=name,
            kinds=tuple(sorted(kinds)),
            context=context,
            groups=_ancestors(reader, (ns, name)),
        )
    if not actions:
        raise SchemaFactsError(f"the schema declares no action in namespace {NAMESPACE}")
    return SchemaFacts(
        actions=MappingProxyType(actions),
        kind_types=MappingProxyType(dict(sorted(kind_types.items()))),
        owned_kinds=frozenset(owned),
    )
