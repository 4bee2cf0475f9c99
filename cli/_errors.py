"""Turning library errors into messages and exit statuses (the CLI layer only)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

import click

from ztlab.common.errors import ZtlabError

P = ParamSpec("P")
R = TypeVar("R")


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Print a :class:`ZtlabError` as ``error: ...`` on stderr and exit with its status."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except ZtlabError as exc:
            click.echo(f"error: {exc.diagnostics()}", err=True)
            sys.exit(exc.exit_code)

    return wrapper
