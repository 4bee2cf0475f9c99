"""Make ``ztlab``'s plain-text ``--help`` safe for sphinx-click's reStructuredText.

The command's docstrings and option help are written for a terminal, where ``*.cedar`` or
``name_`` mean just what they say. sphinx-click parses the same text as
reStructuredText, where an unmatched ``*`` starts emphasis and a trailing ``_`` makes a
link, both of which warn (and ``make docs`` fails on warnings). This extension escapes
those characters in the help text only, leaving sphinx-click's own directive and field
lines alone, so the help text needs no markup for the docs' sake.
"""

from __future__ import annotations

import re
from typing import Any

from sphinx.application import Sphinx
from sphinx.util.typing import ExtensionMetadata

__all__ = ["escape_help_line", "setup"]

#: sphinx-click events whose lines come from help text (not ``usage``: a code block)
EVENTS = (
    "sphinx-click-process-description",
    "sphinx-click-process-options",
    "sphinx-click-process-arguments",
    "sphinx-click-process-epilog",
)

_UNESCAPED_STAR = re.compile(r"(?<!\\)\*")
_TRAILING_UNDERSCORE = re.compile(r"(?<=\w)_(?=$|[\s.,;:!?)\]])")


def escape_help_line(line: str) -> str:
    """Escape what reStructuredText would read as markup in one line of plain help.

    An odd number of ``*`` on a line cannot all be emphasis: all of them are escaped
    (``*.cedar``); a balanced ``*word*`` is left as emphasis. A ``_`` ending a word
    (which would be a reference) is escaped. Directive (``.. option::``) and field
    (``:default:``) lines written by sphinx-click are returned unchanged.
    """
    stripped = line.lstrip()
    if stripped.startswith(".. ") or re.match(r":[\w-]+:", stripped):
        return line
    if len(_UNESCAPED_STAR.findall(line)) % 2:
        line = _UNESCAPED_STAR.sub(r"\\*", line)
    return _TRAILING_UNDERSCORE.sub(r"\\_", line)


def _escape_lines(_app: Sphinx, _ctx: Any, lines: list[str]) -> None:
    lines[:] = [escape_help_line(line) for line in lines]


def setup(app: Sphinx) -> ExtensionMetadata:
    """Hook sphinx-click's line events (loads sphinx-click first if needed)."""
    app.setup_extension("sphinx_click")
    for event in EVENTS:
        app.connect(event, _escape_lines)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
