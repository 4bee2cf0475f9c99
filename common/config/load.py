"""Reading ``ztlab.toml``, explaining what is wrong with it, and writing it back out.

:func:`load_config` either returns a complete, validated :class:`ZtlabConfig` or raises one
:class:`InvalidConfigError` (a :class:`~ztlab.common.errors.ConfigError`) whose message
names the file, the key path of every problem and what was expected there. Pydantic's own
wording, error codes and URLs never reach the user.
"""

from __future__ import annotations

import json
import re
import stat
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from ztlab.common.config.model import (
    Expect,
    InvalidConfigError,
    Problem,
    SecretRef,
    SecretsConfig,
    ZtlabConfig,
    describe_value,
    key_path,
    toml_literal,
)
from ztlab.common.errors import ConfigError

__all__ = [
    "dump_json",
    "dump_toml",
    "load_config",
    "parse_config",
    "problems_from_validation_error",
]


def load_config(path: Path | str) -> ZtlabConfig:
    """Read and validate a ``ztlab.toml`` file.

    Raises :class:`~ztlab.common.errors.ConfigError` when the file is missing, unreadable,
    a directory, writable by others or not UTF-8, and :class:`InvalidConfigError` (a
    ``ConfigError``) when it is not valid TOML or not a valid configuration. Messages start
    with ``path`` as given.
    """
    source = str(path)
    file = Path(path)
    try:
        info = file.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{source}: is a directory; expected a TOML file")
        if info.st_mode & stat.S_IWOTH:
            raise ConfigError(
                f"{source}: is writable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                "expected a file only its owner can change",
                hint=f"chmod o-w {source}",
            )
        raw = file.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{source}: no such file") from exc
    except PermissionError as exc:
        raise ConfigError(f"{source}: cannot be read: permission denied") from exc
    except OSError as exc:
        raise ConfigError(f"{source}: cannot be read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InvalidConfigError(
            source, [Problem(f"line {line}", "invalid TOML: expected UTF-8 text")]
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidConfigError(source, [_toml_problem(exc)]) from exc
    return parse_config(data, source=source)


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> ZtlabConfig:
    """Validate already-parsed TOML (a mapping); raise one :class:`InvalidConfigError`."""
    try:
        return ZtlabConfig.model_validate(data)
    except ValidationError as exc:
        # The pydantic error hides its inputs (hide_input_in_errors), so chaining it is safe.
        problems = problems_from_validation_error(exc, data)
        raise InvalidConfigError(source, problems) from exc
    except InvalidConfigError as exc:  # cross-reference problems, raised without a source
        raise InvalidConfigError(source, exc.problems) from exc


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*\Z")
_TOML_END = re.compile(r"\s*\(at end of document\)\s*\Z")


def _toml_problem(exc: tomllib.TOMLDecodeError) -> Problem:
    text = str(exc)
    where = ""
    if match := _TOML_POSITION.search(text):
        where = f"line {match[1]}, column {match[2]}"
        text = text[: match.start()]
    elif match := _TOML_END.search(text):
        where = "end of file"
        text = text[: match.start()]
    text = text.strip().rstrip(".")
    text = text[:1].lower() + text[1:]
    return Problem(where, f"invalid TOML: {text}")


# --------------------------------------------------------------------------------------
# From pydantic errors to our wording
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """What the schema says about one location."""

    annotation: Any = None
    metadata: tuple[Any, ...] = ()
    #: the model that owns the last key of the location (for "expected one of")
    parent: type[BaseModel] | None = None
    #: under a secret: show types of wrong values, never the values
    sensitive: bool = False


def _is_model(tp: object) -> typing.TypeGuard[type[BaseModel]]:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _strip(tp: Any, metadata: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
    """Remove ``Annotated`` (keeping its metadata) and ``| None`` from a type."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp, *extra = typing.get_args(tp)
            metadata = (*metadata, *extra)
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(rest) == 1:
                tp = rest[0]
                continue
        return tp, metadata


def _target(loc: Sequence[str | int]) -> _Target:
    tp: Any = ZtlabConfig
    metadata: tuple[Any, ...] = ()
    parent: type[BaseModel] | None = None
    sensitive = False
    for i, part in enumerate(loc):
        if part == "[key]":  # already handled with the key itself
            continue
        tp, metadata = _strip(tp, metadata)
        if _is_model(tp):
            if issubclass(tp, SecretRef | SecretsConfig):
                sensitive = True
            field = tp.model_fields.get(str(part))
            if field is None:
                return _Target(parent=tp, sensitive=sensitive)
            parent, tp, metadata = tp, field.annotation, tuple(field.metadata)
            continue
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        parent = None
        if origin is dict and len(args) == 2:
            is_key = i + 1 < len(loc) and loc[i + 1] == "[key]"
            tp, metadata = (args[0] if is_key else args[1]), ()
        elif origin is list and args:
            tp, metadata = args[0], ()
        else:
            return _Target(sensitive=sensitive)
    tp, metadata = _strip(tp, metadata)
    if _is_model(tp) and issubclass(tp, SecretRef | SecretsConfig):
        sensitive = True
    return _Target(tp, metadata, parent, sensitive)


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _expected(target: _Target) -> str:
    """How to describe what a location expects: ``an integer >= 0``."""
    for item in target.metadata:
        if isinstance(item, Expect):
            return item.text
    tp = target.annotation
    if tp is SecretRef:
        return 'a table { env = "NAME" } or { file = "/path" }'
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        base = "an integer"
    elif tp is float:
        base = "a number"
    elif tp is str:
        base = "a string"
    elif isinstance(tp, type) and issubclass(tp, PurePath):
        base = "a path"
    elif origin is list:
        base = "an array"
    elif origin is dict or _is_model(tp):
        base = "a table"
    else:
        base = "a value"
    bounds = [
        f"{symbol} {toml_literal(getattr(item, attr))}"
        for item in target.metadata
        if isinstance(item, annotated_types.BaseMetadata)
        for attr, symbol in _BOUNDS
        if getattr(item, attr, None) is not None
    ]
    return f"{base} {' and '.join(bounds)}" if bounds else base


_TYPE_ERRORS = {
    "bool_type",
    "bool_parsing",
    "int_type",
    "int_parsing",
    "int_from_float",
    "float_type",
    "float_parsing",
    "string_type",
    "list_type",
    "dict_type",
    "model_type",
    "model_attributes_type",
    "dataclass_type",
    "path_type",
    "is_instance_of",
    "none_required",
}
_VALUE_ERRORS = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "finite_number",
    "string_pattern_mismatch",
    "string_too_short",
    "string_too_long",
    "too_short",
    "too_long",
}


def _describe_error(error: ErrorDetails) -> Problem:
    loc = list(error["loc"])
    is_key = bool(loc) and loc[-1] == "[key]"
    target = _target(loc)
    shown = [part for part in loc if part != "[key]"]
    path = key_path(shown)
    kind = error["type"]
    value = error.get("input")
    if kind == "ztlab":
        return Problem(path, error["msg"])
    if kind == "extra_forbidden":
        parent = target.parent or _target(loc[:-1]).parent
        if parent is None:  # pragma: no cover - every table with fixed keys is a model
            return Problem(path, "unknown key")
        allowed = ", ".join(sorted(parent.model_fields))
        return Problem(path, f"unknown key; expected one of: {allowed}")
    expected = _expected(target)
    if kind == "missing":
        return Problem(path, f"missing required key; expected {expected}")
    if kind == "value_error":
        return Problem(path, str((error.get("ctx") or {}).get("error", error["msg"])))
    if kind in _VALUE_ERRORS and not target.sensitive:
        got = toml_literal(value)
    else:
        got = describe_value(value, sensitive=target.sensitive)
    if is_key:
        return Problem(path, f"invalid key; expected {expected}, got {got}")
    if kind in _TYPE_ERRORS or kind in _VALUE_ERRORS:
        return Problem(path, f"expected {expected}, got {got}")
    # Anything else pydantic may say: still our shape, with its short message.
    message = error["msg"].rstrip(".")
    message = message[:1].lower() + message[1:]
    return Problem(path, f"{message}; expected {expected}, got {got}")


def _file_order(data: object, loc: Sequence[str | int]) -> tuple[int, ...]:
    """Where ``loc`` is in the parsed file: keys in the order written, missing ones last."""
    order: list[int] = []
    for part in loc:
        if isinstance(data, Mapping):
            keys = list(data)
            index = keys.index(part) if part in keys else len(keys)
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            index, data = part, data[part]
        else:
            break
        order.append(index)
    return tuple(order)


def problems_from_validation_error(
    exc: ValidationError, data: Mapping[str, Any] | None = None
) -> list[Problem]:
    """Our wording for each error pydantic found while validating a :class:`ZtlabConfig`.

    With ``data`` (what was validated), the problems come in the order of the file.
    """
    errors = exc.errors(include_url=False)
    if data is not None:
        errors = sorted(errors, key=lambda error: _file_order(data, error["loc"]))
    problems: list[Problem] = []
    for error in errors:
        problem = _describe_error(error)
        if problem not in problems:
            problems.append(problem)
    return problems


# --------------------------------------------------------------------------------------
# Writing TOML (for ``ztlab config show``)
# --------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f"}
_ESCAPES["\r"] = "\\r"


def _toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_key(name: str) -> str:
    return name if _BARE_KEY.match(name) else _toml_string(name)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")  # pragma: no cover


def _table_lines(model: BaseModel, header: str) -> Iterator[str]:
    """The lines of one table: its own keys, then its sub-tables (``[header.sub]``)."""
    data = model.model_dump(mode="json", exclude_none=True)
    own: list[str] = []
    children: list[tuple[str, BaseModel | Mapping[str, Any]]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = _toml_key(name)
        sub = f"{header}.{key}" if header else key
        if value is None:
            own.append(f"# {key}: not set")
        elif isinstance(value, SecretRef):  # a reference, written inline: { env = "NAME" }
            own.append(f"{key} = {_toml_value(data[name])}")
        elif isinstance(value, BaseModel):
            children.append((sub, value))
        elif isinstance(value, Mapping) and any(isinstance(v, BaseModel) for v in value.values()):
            children.extend((f"{sub}.{_toml_key(str(k))}", v) for k, v in value.items())
        elif isinstance(value, Mapping):
            children.append((sub, data[name]))
        else:
            own.append(f"{key} = {_toml_value(data[name])}")
    if header and (own or not children):  # [gpu] alone is implied by [gpu.pools.x]
        yield f"[{header}]"
    yield from own
    for i, (child_header, child) in enumerate(children):
        if i or own or not header:
            yield ""
        if isinstance(child, BaseModel):
            yield from _table_lines(child, child_header)
        else:
            yield f"[{child_header}]"
            yield from (f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in child.items())


def dump_toml(config: ZtlabConfig, *, header: str | None = None) -> str:
    """``config`` as TOML that :func:`load_config` reads back to an equal configuration.

    Secrets appear as their references (``{ env = "NAME" }``) only. ``header`` becomes a
    leading comment.
    """
    lines: list[str] = []
    if header:
        lines.extend(f"# {line}".rstrip() for line in header.splitlines())
        lines.append("")
    lines.extend(_table_lines(config, ""))
    return "\n".join(lines).rstrip("\n") + "\n"


def dump_json(config: ZtlabConfig) -> str:
    """``config`` as indented JSON; secrets appear as their references only."""
    return json.dumps(config.model_dump(mode="json", exclude_none=True), indent=2) + "\n"
