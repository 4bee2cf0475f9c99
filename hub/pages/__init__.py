"""The hub's own pages (cookie-authenticated HTML), next to JupyterHub's."""

from __future__ import annotations

from typing import Any

from ztlab.hub.pages.approvals import approval_handlers
from ztlab.hub.pages.monitor import monitor_page_handlers
from ztlab.hub.pages.runs import run_page_handlers


def page_handlers() -> list[tuple[str, Any]]:
    """Every page, relative to the hub prefix (``/hub``)."""
    return [*approval_handlers(), *monitor_page_handlers(), *run_page_handlers()]


__all__ = ["page_handlers"]
