"""The interface through which enforcement points record security events."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class AuditSink(Protocol):
    """Somewhere to record a security-relevant event.

    ``record`` must not block on disk I/O: the control plane's audit log queues the event
    for its group commit and returns at once. Callers that must know the event is durable
    before acting use the log's own ``append`` instead.
    """

    def record(self, *, actor: str, action: str, detail: Mapping[str, Any]) -> None:
        """Queue one event: who did it, what (a dotted name), and JSON-able details."""
        ...
