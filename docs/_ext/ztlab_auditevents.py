"""``ztlab-audit-events``: the audit-event catalogue as tables, one per section.

Generated from :data:`ztlab.common.auditlog.events.CATALOGUE`, the list every control-plane
writer is checked against, so the page cannot drift from what the hub records.
"""

from __future__ import annotations

import inspect
from itertools import groupby

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.typing import ExtensionMetadata

__all__ = ["AuditEventsDirective", "setup"]

_SECTIONS = {
    "control_plane": "The control plane",
    "audit": "The audit log",
    "login": "Sign-in",
    "session": "Sessions",
    "mfa": "The hub's TOTP",
    "policy": "Policy decisions",
    "account": "Servers",
    "server": "Servers",
    "proxy": "The enforcement point",
    "gpu": "GPU leases and the GPU monitor",
    "dataset": "Datasets",
    "model": "Models",
    "package": "Packages",
    "pool": "GPU pools and clusters",
    "environment": "Environments",
    "schedule": "Notebook runs and schedules",
    "run": "Notebook runs and schedules",
}


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


class AuditEventsDirective(SphinxDirective):
    """Every catalogued audit action, its actor and its detail fields."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from ztlab.common.auditlog import events

        source = inspect.getsourcefile(events)
        if source is not None:
            self.env.note_dependency(source)
        lines: list[str] = []
        by_section = groupby(
            events.event_types(), key=lambda e: _SECTIONS.get(e.section, e.section)
        )
        for title, group in by_section:
            lines += [f".. rubric:: {title}", "", ".. list-table::", "   :header-rows: 1", ""]
            lines += ["   * - action", "     - what happened", "     - actor", "     - detail"]
            for event in group:
                fields = "; ".join(
                    f"``{name}``{' (optional)' if name in event.optional else ''}: {_cell(meaning)}"
                    for name, meaning in event.fields.items()
                )
                lines += [
                    f"   * - ``{event.name}``",
                    f"     - {_cell(event.summary)}",
                    f"     - {_cell(event.actor)}",
                    f"     - {fields or 'none'}",
                ]
            lines.append("")
        return _parse_rst("\n".join(lines), self.state.document.settings)


def _parse_rst(text: str, settings: object) -> list[nodes.Node]:
    """The nodes of reStructuredText ``text``, whatever the page's own parser is.

    ``parse_text_to_nodes`` would parse with the page's parser: in a MyST page the
    generated ``.. rubric::`` and ``.. list-table::`` came out as plain text.
    """
    from docutils.parsers.rst import Parser
    from docutils.utils import new_document

    document = new_document("<ztlab-audit-events>", settings)
    Parser().parse(text, document)
    return list(document.children)


def setup(app: Sphinx) -> ExtensionMetadata:
    """Register the directive."""
    app.add_directive("ztlab-audit-events", AuditEventsDirective)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
