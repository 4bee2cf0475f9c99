"""The hub's own pages (cookie-authenticated HTML), next to JupyterHub's."""

from __future__ import annotations

from typing import Any

from ztlab.hub.pages.approvals import approval_handlers


def page_handlers() -> list[tuple[str, Any]]:
    """Every page, relative to the hub prefix (``/hub``)."""
    return [*approval_handlers()]


__all__ = ["page_handlers"]
