"""How the control plane writes moments in answers, audit details and messages (UTC)."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_iso(ts: float) -> str:
    """``2026-11-27T14:05:09Z`` (POSIX seconds, to the second)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def clock_text(ts: float, now: float) -> str:
    """``14:05 UTC`` today (UTC), ``2026-11-27 14:05 UTC`` on another day: for messages."""
    moment = datetime.fromtimestamp(ts, UTC)
    if moment.date() == datetime.fromtimestamp(now, UTC).date():
        return moment.strftime("%H:%M UTC")
    return moment.strftime("%Y-%m-%d %H:%M UTC")
