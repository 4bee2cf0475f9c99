"""Local Sphinx extension for the zerotrust-lab docs.

Two directives, both usable from MyST (```` ```{name} ````) and reStructuredText:

``ztlab-config-reference``
    Generates the ``ztlab.toml`` reference from the pydantic configuration model, so the
    model stays the single source of truth. It walks the model's fields recursively:

    - a field whose type is a model becomes a TOML table section, ``[audit]``;
    - ``dict[str, Model]`` becomes ``[roles.NAME]`` (one table per entry, any name);
    - ``list[Model]`` becomes an array of tables, ``[[pools]]``;
    - everything else is a key, shown with its key path, type, default and description.

    Every table and key gets an anchor and a label, ``config-`` and its key path
    (``config-audit-log``, ``config-roles-name-max-gpus``), for links from other pages.

    The type shown is what the file may hold: where a field converts its input first (a
    ``BeforeValidator``, e.g. a memory size written ``"16G"`` and stored as bytes), it is
    read from the field's JSON Schema. Defaults are shown as the model serializes them.

    Options: ``:model:`` (``module:Attribute``, default ``ztlab.common.config:ZtlabConfig``);
    ``:require-descriptions:`` (warn about any field without a ``description``);
    ``:prose-defaults:`` (where a description states its own default with ``Default:``,
    do not repeat the generated one: the prose can say what "not set" means; a prose
    default that contradicts the model's is a warning, so the two cannot drift apart).

``ztlab-literalinclude-glob``
    Includes every file matching a glob (relative to the document, like
    ``literalinclude``; wildcards in the file name only), sorted by name, each as a literal
    block captioned with its file name, so the page follows the directory as files are
    added or removed. Options:
    ``:language:`` (default ``text``) and ``:allow-empty:`` (no warning when nothing
    matches).

Both produce docutils nodes directly (no text is re-parsed), so descriptions cannot
break the build with markup warnings; problems are reported as Sphinx warnings, which
``make docs`` turns into errors.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import importlib
import inspect
import ipaddress
import json
import os
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, ClassVar, TypeGuard

from docutils import nodes
from docutils.parsers.rst import directives
from pydantic import BaseModel, BeforeValidator, PlainValidator, TypeAdapter, WrapValidator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from sphinx.application import Sphinx
from sphinx.directives.code import LiteralInclude
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.typing import ExtensionMetadata

logger = logging.getLogger(__name__)

__all__ = ["ConfigReferenceDirective", "LiteralIncludeGlobDirective", "setup"]

DEFAULT_MODEL = "ztlab.common.config:ZtlabConfig"
#: placeholder for the user-chosen key of a ``dict[str, Model]`` entry
NAME_PLACEHOLDER = "NAME"

#: checked in this order with ``issubclass``: a subclass before its base (``bool`` is an ``int``)
_SCALAR_NAMES: dict[type, str] = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    bytes: "bytes",
    PurePath: "path",
    dt.datetime: "date-time",
    dt.date: "date",
    dt.time: "time",
    dt.timedelta: "duration in seconds",
    ipaddress.IPv4Address: "IPv4 address",
    ipaddress.IPv6Address: "IPv6 address",
    ipaddress.IPv4Network: "IPv4 network",
    ipaddress.IPv6Network: "IPv6 network",
}
_SEQUENCE_ORIGINS = (list, tuple, set, frozenset, Sequence)
_MAPPING_ORIGINS = (dict, Mapping)
_CONSTRAINT_SYMBOLS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "multiple_of": "multiple of"}


# --------------------------------------------------------------------------------------
# Reading the model
# --------------------------------------------------------------------------------------


def _is_model(tp: object) -> TypeGuard[type[BaseModel]]:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _strip_annotated(tp: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, m1, m2]`` -> ``(T, [m1, m2])``; any other type -> ``(tp, [])``."""
    metadata: list[Any] = []
    while typing.get_origin(tp) is typing.Annotated:
        tp, *extra = typing.get_args(tp)
        metadata.extend(extra)
    return tp, metadata


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``T | None`` -> ``(T, True)``; a union of several non-None types keeps them."""
    tp, _ = _strip_annotated(tp)
    args = _union_args(tp)
    if args is None or type(None) not in args:
        return tp, False
    rest = tuple(a for a in args if a is not type(None))
    if len(rest) == 1:
        return rest[0], True
    return typing.Union[rest], True  # noqa: UP007 -- building a union at run time


def _constraints(metadata: Sequence[Any]) -> list[str]:
    """Readable constraints from ``annotated_types`` / pydantic metadata."""
    out: list[str] = []
    for item in metadata:
        for attr, symbol in _CONSTRAINT_SYMBOLS.items():
            value = getattr(item, attr, None)
            if value is not None and not callable(value):
                out.append(f"{symbol} {_literal(value)}")
        min_length = getattr(item, "min_length", None)
        max_length = getattr(item, "max_length", None)
        if min_length is not None:
            out.append(f"at least {min_length} long")
        if max_length is not None:
            out.append(f"at most {max_length} long")
        pattern = getattr(item, "pattern", None)
        if isinstance(pattern, str):
            out.append(f"matching {pattern}")
    return out


def type_text(tp: Any, metadata: Sequence[Any] = ()) -> str:
    """A readable, TOML-oriented name for a type annotation."""
    tp, inner = _strip_annotated(tp)
    base = _type_text(tp)
    extra = _constraints([*metadata, *inner])
    return f"{base} ({', '.join(extra)})" if extra else base


def _type_text(tp: Any) -> str:
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "not set"
    args = _union_args(tp)
    if args is not None:
        parts = [type_text(a) for a in args if a is not type(None)]
        text = " or ".join(dict.fromkeys(parts))
        return f"{text}, or not set" if type(None) in args else text
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(_literal(v) for v in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(_literal(m.value) for m in tp)
    if origin is not None and isinstance(origin, type) and issubclass(origin, _SEQUENCE_ORIGINS):
        items = typing.get_args(tp)
        if origin is tuple and items and items[-1] is not Ellipsis:
            return "array [" + ", ".join(type_text(a) for a in items) + "]"
        return f"array of {type_text(items[0])}" if items else "array"
    if origin is not None and isinstance(origin, type) and issubclass(origin, _MAPPING_ORIGINS):
        items = typing.get_args(tp)
        return f"table of {type_text(items[1])}" if len(items) == 2 else "table"
    if isinstance(tp, type):
        if _is_model(tp):
            return "table"
        for known, name in _SCALAR_NAMES.items():
            if issubclass(tp, known):
                return name
        return _pydantic_type_name(tp)
    return str(tp).replace("typing.", "")


def _pydantic_type_name(tp: type) -> str:
    name = tp.__name__
    if name.startswith("Secret"):
        return "secret string"
    if name.endswith("Url") or name.endswith("Dsn"):
        return "URL"
    if name == "EmailStr":
        return "e-mail address"
    return name


def _literal(value: Any) -> str:
    """A value as it would be written in TOML."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | PurePath):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, dt.timedelta):
        return repr(value.total_seconds())
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_key(str(k))} = {_literal(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return "[" + ", ".join(_literal(v) for v in items) + "]"
    if isinstance(value, BaseModel):
        return _literal(value.model_dump(mode="json", by_alias=True))
    name = type(value).__name__
    if name.startswith("Secret"):
        return '"********"'
    return json.dumps(str(value), ensure_ascii=False)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


@dataclass(frozen=True)
class KeyDoc:
    """One key of a table."""

    path: str
    type: str
    default: str
    description: str
    examples: tuple[str, ...] = ()
    deprecated: str | None = None
    #: the default as the model serializes it (JSON-like), or ``_MISSING``
    default_value: Any = None


@dataclass
class TableDoc:
    """One TOML table (``[a.b]``) or array of tables (``[[a]]``)."""

    path: str
    header: str
    description: list[str] = field(default_factory=list)
    keys: list[KeyDoc] = field(default_factory=list)
    #: whether keys not listed are rejected (``extra="forbid"``)
    closed: bool = False


@dataclass
class _Walker:
    require_descriptions: bool
    warn: Callable[[str], None]
    modules: set[str] = field(default_factory=set)
    tables: list[TableDoc] = field(default_factory=list)
    _stack: list[type[BaseModel]] = field(default_factory=list)

    def walk(self, model: type[BaseModel], path: str, header: str, notes: list[str]) -> None:
        if model in self._stack:
            notes.append(f"Same structure as the enclosing {model.__name__} table (recursive).")
            self.tables.append(TableDoc(path=path, header=header, description=notes))
            return
        self._stack.append(model)
        self.modules.add(model.__module__)
        closed = model.model_config.get("extra") == "forbid"
        table = TableDoc(path=path, header=header, description=notes, closed=closed)
        self.tables.append(table)
        children: list[tuple[type[BaseModel], str, str, list[str]]] = []
        for name, info in model.model_fields.items():
            key = info.alias if isinstance(info.alias, str) else name
            key_path = f"{path}.{_key(key)}" if path else _key(key)
            description = (info.description or "").strip()
            if not description and self.require_descriptions:
                self.warn(f"{model.__module__}.{model.__qualname__}.{name} has no description")
            child = self._child_table(info.annotation, key_path, description, info)
            if child is not None:
                children.append(child)
                continue
            table.keys.append(
                KeyDoc(
                    path=key_path,
                    type=_field_type_text(info),
                    default=_default_text(info),
                    default_value=_serialized_default(info),
                    description=description,
                    examples=tuple(_literal(e) for e in (info.examples or ())),
                    deprecated=_deprecated_text(info.deprecated),
                )
            )
        for child_model, child_path, child_header, child_notes in children:
            self.walk(child_model, child_path, child_header, child_notes)
        self._stack.pop()

    def _child_table(
        self, annotation: Any, key_path: str, description: str, info: FieldInfo
    ) -> tuple[type[BaseModel], str, str, list[str]] | None:
        """Return ``(model, path, header, notes)`` if this field is a table of its own."""
        tp, optional = _split_optional(annotation)
        notes = [description] if description else []
        if _is_model(tp):
            if optional:
                notes.append("This table may be left out (default: not set).")
            return tp, key_path, f"[{key_path}]", notes
        origin = typing.get_origin(tp)
        args = [_strip_annotated(a)[0] for a in typing.get_args(tp)]
        is_mapping = isinstance(origin, type) and issubclass(origin, _MAPPING_ORIGINS)
        if is_mapping and len(args) == 2 and _is_model(args[1]):
            entry_path = f"{key_path}.{NAME_PLACEHOLDER}"
            notes.append(
                f"One table per entry; {NAME_PLACEHOLDER} is a name you choose "
                f"(written ``[{key_path}.my-name]``)."
            )
            shipped = _default_value(info)
            if isinstance(shipped, Mapping) and shipped:
                names = ", ".join(_key(str(k)) for k in shipped)
                notes.append(f"Entries present by default: {names}.")
            return args[1], entry_path, f"[{entry_path}]", notes
        if (
            isinstance(origin, type)
            and issubclass(origin, _SEQUENCE_ORIGINS)
            and args
            and _is_model(args[0])
        ):
            notes.append(f"An array of tables: repeat ``[[{key_path}]]`` once per entry.")
            return args[0], key_path, f"[[{key_path}]]", notes
        return None


_MISSING = object()


def _default_value(info: FieldInfo) -> Any:
    """The field's default (calling its factory), or ``_MISSING`` if there is none to show."""
    try:
        value = info.get_default(call_default_factory=True)
    except Exception:  # a factory that needs the other fields' values: computed on load
        return _MISSING
    return _MISSING if value is PydanticUndefined else value


def _serialized_default(info: FieldInfo) -> Any:
    """The default as the model writes it (a size stored in bytes is ``"2G"``)."""
    if info.is_required():
        return _MISSING
    value = _default_value(info)
    if value is not _MISSING:
        with contextlib.suppress(Exception):  # else: as stored
            value = TypeAdapter(_full_annotation(info)).dump_python(value, mode="json")
    return value


def _default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = _serialized_default(info)
    return "computed when loaded" if value is _MISSING else _literal(value)


_PROSE_DEFAULT = re.compile(r"Default:\s*(.*?)(?:\.\s|\.?$|\s\(|;|,)", re.DOTALL)
_EMPTY_WORDS = ("empty", "none", "no ")


def prose_default_mismatch(description: str, value: Any) -> str | None:
    """What a description's ``Default: ...`` says, if it contradicts ``value``; else None.

    Tolerant by design: a number is compared as a number, "empty"/"none" match an empty
    value, and anything said about an unset (``None``) default is accepted, since the
    prose is where "not set" gets its meaning.
    """
    match = _PROSE_DEFAULT.search(description)
    if match is None or value is _MISSING or value is None:
        return None
    said = match.group(1).strip().strip("`").strip()
    plain = said.strip('"')
    if isinstance(value, bool):
        ok = plain.lower() == ("true" if value else "false")
    elif isinstance(value, int | float):
        try:
            ok = float(plain) == float(value)
        except ValueError:
            ok = False
    elif value in ("", [], {}, ()):
        ok = plain.lower().startswith(_EMPTY_WORDS) or plain in ("", "[]", "{}")
    elif isinstance(value, str):
        ok = plain == value
    else:
        ok = True  # tables and arrays: prose summarises them
    return None if ok else said


def _full_annotation(info: FieldInfo) -> Any:
    if not info.metadata:
        return info.annotation
    return typing.Annotated[(info.annotation, *info.metadata)]


_CONVERTERS = (BeforeValidator, PlainValidator, WrapValidator)


def _converts_input(tp: Any, metadata: Sequence[Any]) -> bool:
    """Whether a validator replaces pydantic's own reading of the input type."""
    tp, inner = _strip_annotated(tp)
    if any(isinstance(m, _CONVERTERS) for m in (*metadata, *inner)):
        return True
    return any(_converts_input(arg, ()) for arg in typing.get_args(tp))


def _field_type_text(info: FieldInfo) -> str:
    if _converts_input(info.annotation, info.metadata):
        try:
            schema = TypeAdapter(_full_annotation(info)).json_schema(mode="validation")
        except Exception:  # noqa: S110 -- fall back to the annotation
            pass
        else:
            return schema_type_text(schema)
    return type_text(info.annotation, info.metadata)


_JSON_TYPES = {
    "string": "string",
    "integer": "integer",
    "number": "number",
    "boolean": "boolean",
    "null": "not set",
}
_JSON_BOUNDS = {
    "exclusiveMinimum": ">",
    "minimum": "≥",
    "exclusiveMaximum": "<",
    "maximum": "≤",
}


def schema_type_text(schema: Mapping[str, Any]) -> str:
    """A readable type from a JSON Schema (patterns left out: descriptions explain them)."""
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema:
            parts = [schema_type_text(s) for s in schema[combinator]]
            return " or ".join(dict.fromkeys(parts))
    if "enum" in schema:
        return "one of " + ", ".join(_literal(v) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items")
        return f"array of {schema_type_text(items)}" if isinstance(items, Mapping) else "array"
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            return f"table of {schema_type_text(extra)}"
        return "table"
    text = _JSON_TYPES.get(str(kind), str(kind or "any value"))
    if schema.get("format") == "path":
        text = "path"
    bounds = [f"{sym} {_literal(schema[k])}" for k, sym in _JSON_BOUNDS.items() if k in schema]
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _deprecated_text(value: Any) -> str | None:
    if not value:
        return None
    if isinstance(value, str):
        return value
    return str(getattr(value, "message", "")) or "deprecated"


def _import_object(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def collect_tables(
    model: object, *, require_descriptions: bool, warn: Callable[[str], None]
) -> tuple[list[TableDoc], set[str]]:
    """Walk ``model`` and return its tables (root first) and the modules it spans."""
    if not _is_model(model):
        raise TypeError(f"{model!r} is not a pydantic BaseModel subclass")
    walker = _Walker(require_descriptions=require_descriptions, warn=warn)
    walker.walk(model, "", "Top-level keys", [])
    return walker.tables, walker.modules


# --------------------------------------------------------------------------------------
# Rendering to docutils nodes
# --------------------------------------------------------------------------------------

_INLINE_CODE = re.compile(r"``(.+?)``|`([^`]+)`")


def _inline(text: str) -> Iterator[nodes.Node]:
    """Plain text with ``code`` or `code` spans turned into literals; nothing else parsed."""
    pos = 0
    for match in _INLINE_CODE.finditer(text):
        if match.start() > pos:
            yield nodes.Text(text[pos : match.start()])
        code = match.group(1) or match.group(2)
        yield nodes.literal(code, code)
        pos = match.end()
    if pos < len(text):
        yield nodes.Text(text[pos:])


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def _type_nodes(text: str) -> Iterator[nodes.Node]:
    """A type text with its quoted values as literals (so smart quotes leave them alone)."""
    pos = 0
    for match in _QUOTED.finditer(text):
        if match.start() > pos:
            yield nodes.Text(text[pos : match.start()])
        yield nodes.literal(match.group(), match.group())
        pos = match.end()
    if pos < len(text):
        yield nodes.Text(text[pos:])


def _paragraphs(text: str) -> list[nodes.Node]:
    return [
        nodes.paragraph("", "", *_inline(" ".join(chunk.split())))
        for chunk in re.split(r"\n\s*\n", text.strip())
        if chunk.strip()
    ]


class ConfigReferenceDirective(SphinxDirective):
    """``ztlab-config-reference``: the ``ztlab.toml`` reference, generated from the model.

    Emits sections, so place it last under its heading (a following heading of the same
    or a higher level is fine; body text after it under the same heading is not).
    """

    has_content = False
    required_arguments = 0
    optional_arguments = 0
    option_spec: ClassVar[dict[str, Callable[[str], Any]]] = {
        "model": directives.unchanged_required,
        "require-descriptions": directives.flag,
        "prose-defaults": directives.flag,
    }

    def run(self) -> list[nodes.Node]:
        spec = self.options.get("model", DEFAULT_MODEL)
        location = self.get_location()

        def warn(message: str) -> None:
            logger.warning("ztlab-config-reference: %s", message, location=location)

        try:
            model = _import_object(spec)
            tables, modules = collect_tables(
                model,
                require_descriptions="require-descriptions" in self.options,
                warn=warn,
            )
        except Exception as exc:
            warn(f"cannot document {spec}: {type(exc).__name__}: {exc}")
            return []
        if "prose-defaults" in self.options:
            for key in (key for table in tables for key in table.keys):
                said = prose_default_mismatch(key.description, key.default_value)
                if said is not None:
                    warn(
                        f"{key.path}: the description says 'Default: {said}' but the "
                        f"model's default is {key.default}"
                    )
        for module_name in sorted(modules):
            source = _module_source(module_name)
            if source is not None:
                self.env.note_dependency(source)
        result: list[nodes.Node] = []
        if all(table.closed for table in tables):
            result.extend(_paragraphs("Unknown keys are rejected in every table."))
        result.extend(self._section(t) for t in tables if t.keys or t.description)
        return result

    def _section(self, table: TableDoc) -> nodes.section:
        title_text = table.header
        title = nodes.title(title_text, "")
        if table.path:
            title += nodes.literal(title_text, title_text)
        else:
            title += nodes.Text(title_text)
        section = nodes.section("", title)
        self._set_unique_id(section, "config-" + (table.path or "top-level"))
        for note in table.description:
            section.extend(_paragraphs(note))
        if not table.closed:
            section.extend(_paragraphs("Keys not listed here are accepted in this table."))
        if table.keys:
            section += nodes.definition_list("", *(self._item(key) for key in table.keys))
        return section

    def _item(self, key: KeyDoc) -> nodes.definition_list_item:
        term = nodes.term("", "", nodes.literal(key.path, key.path))
        self._set_unique_id(term, "config-" + key.path)
        classifier = nodes.classifier(key.type, "", *_type_nodes(key.type))
        body = nodes.definition()
        if key.deprecated:
            note = nodes.paragraph("", "", nodes.strong("Deprecated: ", "Deprecated: "))
            note.extend(_inline(key.deprecated))
            body += note
        body.extend(_paragraphs(key.description) or [nodes.paragraph("", "(no description)")])
        fields = nodes.field_list()
        if not ("prose-defaults" in self.options and "Default:" in key.description):
            fields += _field("Default", key.default, literal=key.default not in _NON_LITERALS)
        for example in key.examples:
            fields += _field("Example", f"{key.path.rsplit('.', 1)[-1]} = {example}", literal=True)
        if fields.children:
            body += fields
        return nodes.definition_list_item("", term, classifier, body)

    def _set_unique_id(self, node: nodes.Element, text: str) -> None:
        """Give ``node`` a stable anchor and label (``config-audit-log``).

        The label is an explicit target, so ``[...](configuration.md#config-audit-log)``
        and ``{ref}`config-audit-log``` resolve from other pages.
        """
        document = self.state.document
        base = nodes.make_id(text) or "config"
        candidate, n = base, 1
        while candidate in document.ids or candidate in document.nameids:
            n += 1
            candidate = f"{base}-{n}"
        node["ids"].append(candidate)
        node["names"].append(candidate)
        document.note_explicit_target(node, node)


_NON_LITERALS = {"required", "computed when loaded", "not set"}


def _field(name: str, value: str, *, literal: bool) -> nodes.field:
    content: nodes.Node = nodes.literal(value, value) if literal else nodes.emphasis(value, value)
    return nodes.field(
        "",
        nodes.field_name(name, name),
        nodes.field_body("", nodes.paragraph("", "", content)),
    )


def _module_source(module_name: str) -> str | None:
    try:
        source = inspect.getsourcefile(importlib.import_module(module_name))
    except (ImportError, TypeError):
        return None
    return source


# --------------------------------------------------------------------------------------
# Including every file that matches a glob
# --------------------------------------------------------------------------------------


class LiteralIncludeGlobDirective(SphinxDirective):
    """``ztlab-literalinclude-glob``: ``literalinclude`` for every file matching a glob."""

    has_content = False
    required_arguments = 1
    optional_arguments = 0
    final_argument_whitespace = True
    option_spec: ClassVar[dict[str, Callable[[str], Any]]] = {
        "language": directives.unchanged_required,
        "allow-empty": directives.flag,
    }

    def run(self) -> list[nodes.Node]:
        pattern = self.arguments[0]
        rel_pattern, abs_pattern = self.env.relfn2path(pattern)
        directory = Path(abs_pattern).parent
        matches: list[Path] = []
        if directory.is_dir():
            # A file added to or removed from the directory changes its mtime: rebuild then.
            self.env.note_dependency(str(directory))
            matches = sorted(p for p in directory.glob(Path(abs_pattern).name) if p.is_file())
        if not matches:
            if "allow-empty" not in self.options:
                logger.warning(
                    "ztlab-literalinclude-glob: no file matches %s",
                    rel_pattern,
                    location=self.get_location(),
                )
            return []
        result: list[nodes.Node] = []
        source_dir = Path(self.env.doc2path(self.env.docname)).parent
        for match in matches:
            relative = Path(os.path.relpath(match, source_dir)).as_posix()
            options = {"language": self.options.get("language", "text"), "caption": match.name}
            include = LiteralInclude(
                "literalinclude",
                [relative],
                options,
                self.content,
                self.lineno,
                self.content_offset,
                self.block_text,
                self.state,
                self.state_machine,
            )
            result.extend(include.run())
        return result


def setup(app: Sphinx) -> ExtensionMetadata:
    """Register the directives."""
    app.add_directive("ztlab-config-reference", ConfigReferenceDirective)
    app.add_directive("ztlab-literalinclude-glob", LiteralIncludeGlobDirective)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
