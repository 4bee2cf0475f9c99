"""Egress accounting: the bytes that leave users' servers through the enforcement point.

Traefik writes one JSON line per request to its access log (mode 0600, with no header but
the enforcement point's ``X-Ztlab-Actor``, ``X-Ztlab-Server`` and ``X-Ztlab-Route``, which
Traefik put on the request after the hub let it through, and without the request's path,
whose query may hold a token). :class:`EgressMeter` reads the new lines every second and counts, per
caller, server and route class, the response bytes Traefik sent to the client
(``DownstreamContentSize``: the body as sent, compressed when the server compressed it):

- as Prometheus metrics on the hub's ``/hub/metrics`` (``ztlab_proxy_egress_bytes_total``
  and ``ztlab_proxy_egress_requests_total``, labels ``user``, ``server``, ``route``);
- as audit records: ``proxy.egress`` each time one caller's bytes out of one server in a
  UTC day pass another multiple of the largest ``[roles.NAME] egress_report`` of their roles.

Only requests the enforcement point let through are counted (a refusal carries no
``X-Ztlab-Route`` from the hub, and its few bytes are the hub's message, not the server's).
Traefik's access log has 0 bytes for an upgraded connection, so a WebSocket's frames (kernel
output, terminals) are counted by the ``wscount`` middleware (a Traefik local plugin,
``hub/proxy/wscount/``), which appends ``{"actor", "server", "route", "bytes"}`` to its own
log every MiB, every 5 s of traffic and when the connection closes; both logs are read here.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter as Metric

EGRESS_BYTES = Metric(
    "ztlab_proxy_egress_bytes",
    "Response bytes sent to clients from users' servers, through the enforcement point",
    ["user", "server", "route"],
)
EGRESS_REQUESTS = Metric(
    "ztlab_proxy_egress_requests",
    "Requests to users' servers let through by the enforcement point",
    ["user", "server", "route"],
)

#: the most of the access log read in one poll (the rest is read at the next)
READ_LIMIT = 8 * 1024 * 1024


@dataclass
class _Day:
    """One UTC day's bytes per caller and server, and what was reported of them."""

    date: str
    total: Counter[tuple[str, str]] = field(default_factory=Counter)
    by_route: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    reported: Counter[tuple[str, str]] = field(default_factory=Counter)


@dataclass
class _Tail:
    """The new lines of a log file that Traefik appends to (and may start anew)."""

    path: Path
    inode: int | None = None
    offset: int = 0
    partial: bytes = b""

    def skip_to_end(self) -> None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return
        self.inode, self.offset = info.st_ino, info.st_size

    def read_lines(self) -> list[bytes]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        try:
            info = os.fstat(fd)
            if info.st_ino != self.inode or info.st_size < self.offset:
                # a new or truncated log (Traefik started again, or the log was rotated)
                self.inode, self.offset, self.partial = info.st_ino, 0, b""
            os.lseek(fd, self.offset, os.SEEK_SET)
            data = os.read(fd, READ_LIMIT)
        finally:
            os.close(fd)
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        return [line for line in lines if line.strip()]


class EgressMeter:
    """Reads Traefik's access log, and the WebSocket counter's log, and counts what left
    each server (module docstring)."""

    def __init__(
        self,
        access_log: Path,
        *,
        record: Callable[..., None],
        report_bytes: Callable[[str], int],
        websocket_log: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._access = _Tail(access_log)
        self._websockets = _Tail(websocket_log) if websocket_log is not None else None
        self._record = record
        self._report_bytes = report_bytes
        self._clock = clock
        self._day = _Day(date="")
        #: bytes and requests since the hub started, per (caller, server, route class)
        self.bytes: Counter[tuple[str, str, str]] = Counter()
        self.requests: Counter[tuple[str, str, str]] = Counter()

    def start_at_end(self) -> None:
        """Skip what the logs hold already (a restarted hub counts from its start)."""
        self._access.skip_to_end()
        if self._websockets is not None:
            self._websockets.skip_to_end()

    def poll(self) -> int:
        """Count the lines written since the last poll; return how many were counted."""
        counted = sum(1 for line in self._access.read_lines() if self.count(line))
        if self._websockets is not None:
            lines = self._websockets.read_lines()
            counted += sum(1 for line in lines if self.count_websocket(line))
        return counted

    def count(self, line: bytes) -> bool:
        """Count one access-log line; False if it is not a request the hub let through."""
        try:
            entry: dict[str, Any] = json.loads(line)
        except ValueError:
            return False
        route = entry.get("request_X-Ztlab-Route")
        actor = entry.get("request_X-Ztlab-Actor")
        owner = entry.get("request_X-Ztlab-Server")
        if not route or not actor or not owner or not entry.get("OriginStatus"):
            return False
        sent = int(entry.get("DownstreamContentSize") or 0)
        key = (str(actor), str(owner), str(route))
        self.bytes[key] += sent
        self.requests[key] += 1
        EGRESS_BYTES.labels(*key).inc(sent)
        EGRESS_REQUESTS.labels(*key).inc()
        self._add_to_day(key, sent)
        return True

    def count_websocket(self, line: bytes) -> bool:
        """Count one line of the WebSocket counter (bytes an upgraded connection sent since
        its last line); False if it is not for a connection the hub let through."""
        try:
            entry: dict[str, Any] = json.loads(line)
        except ValueError:
            return False
        route, actor, owner = entry.get("route"), entry.get("actor"), entry.get("server")
        sent = entry.get("bytes")
        if not route or not actor or not owner or not isinstance(sent, int) or sent <= 0:
            return False
        key = (str(actor), str(owner), str(route))
        self.bytes[key] += sent
        EGRESS_BYTES.labels(*key).inc(sent)
        self._add_to_day(key, sent)
        return True

    def _add_to_day(self, key: tuple[str, str, str], sent: int) -> None:
        today = datetime.fromtimestamp(self._clock(), UTC).date().isoformat()
        if self._day.date != today:
            self._day = _Day(date=today)
        actor, owner, route = key
        pair = (actor, owner)
        day = self._day
        day.total[pair] += sent
        day.by_route.setdefault(pair, Counter())[route] += sent
        step = max(1, self._report_bytes(actor))
        passed = day.total[pair] // step
        if passed > day.reported[pair]:
            day.reported[pair] = passed
            self._record(
                actor,
                "proxy.egress",
                server=owner,
                day=today,
                bytes_today=day.total[pair],
                routes=dict(day.by_route[pair]),
                report_every=step,
            )
