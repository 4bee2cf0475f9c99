"""Backends found by name: an entry-point group per kind, checked when they are defined.

The GPU lease backend (:mod:`ztlab.hub.gpu.backend`) and the compute backend
(:mod:`ztlab.hub.compute.backend`) are abstract classes that third parties may implement
and register as entry points; the configuration names which one runs.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TypeVar

from ztlab.common.errors import ConfigError

_B = TypeVar("_B", bound=type)


def check_complete(cls: type, base: type) -> None:
    """:class:`TypeError` now, when ``cls`` is defined, if it leaves out a method of
    ``base`` (rather than when a user first needs it)."""
    missing = sorted(
        name
        for name in getattr(base, "__abstractmethods__", ())
        if getattr(getattr(cls, name), "__isabstractmethod__", False)
    )
    if missing:
        raise TypeError(f"{cls.__name__} must implement {', '.join(missing)}")


def load_backend(group: str, name: str, base: _B, *, key: str, source: str, what: str) -> _B:
    """The class registered as ``name`` in the entry-point ``group``, a subclass of
    ``base``; :class:`ConfigError` naming the file, ``key`` and ``what`` was looked for."""
    found = {ep.name: ep for ep in entry_points(group=group)}
    if name not in found:
        known = ", ".join(sorted(found)) or "none installed yet"
        raise ConfigError(f"{source}: {key}: no {what} {name!r}; expected one of: {known}")
    backend = found[name].load()
    if not (isinstance(backend, type) and issubclass(backend, base)):
        raise ConfigError(f"{source}: {key}: {name!r} is not a {base.__name__}")
    return backend  # type: ignore[return-value]
