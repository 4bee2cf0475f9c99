"""The route from the users a cluster is shared with to its scheduler, through the hub.

Users' network namespaces reach nothing of each other's (the firewall routes nothing
between them), and the owner's cluster runs in the owner's namespace. For a cluster shared
with named users the hub opens one TCP relay on the sandboxes' service address:

- the firewall lets only the shared users' namespaces reach the relay's port;
- each connection's source address must belong to a user the cluster is shared with (or
  its owner), looked up in the allocations of the network segments at that moment;
  anything else is closed at once and recorded as ``pool.connection_refused``;
- the bytes pass through unchanged: TLS runs end to end between the user's client and the
  scheduler, which still checks the certificate (the relay never sees a key).

:meth:`ClusterRelays.sync` opens relays for running shared clusters and closes those of
clusters that stopped (the hub calls it after each start and at every sweep).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

#: bytes read at a time on each side
CHUNK: Final = 256 * 1024

_log = logging.getLogger("ztlab.hub.compute.relay")


@dataclass
class _Relay:
    record: Any
    port: int
    server: asyncio.Server
    allowed_ns: list[Any]


class ClusterRelays:
    """One relay per running cluster that is shared with someone."""

    def __init__(
        self,
        *,
        segments: Any,
        port_base: int,
        record: Callable[..., None],
        size: int = 200,
    ) -> None:
        self.segments = segments
        self.port_base = port_base
        self.size = size
        self._record = record
        self._relays: dict[str, _Relay] = {}

    def address(self, cluster_id: str) -> str | None:
        """``tls://SERVICE_IP:PORT`` of a cluster's relay, if it has one."""
        relay = self._relays.get(cluster_id)
        return f"tls://{self.segments.service_ip}:{relay.port}" if relay else None

    async def sync(self, active: Iterable[Any]) -> None:
        """Open relays for shared running clusters; close the rest."""
        wanted = {r.id: r for r in active if r.shared_with and r.state == "running"}
        for cluster_id in list(self._relays):
            if cluster_id not in wanted:
                await self._close(cluster_id)
        for cluster_id, record in wanted.items():
            if cluster_id not in self._relays:
                await self._open(record)
            else:
                self._relays[cluster_id].record = record

    async def close(self) -> None:
        """Close every relay."""
        for cluster_id in list(self._relays):
            await self._close(cluster_id)

    async def _open(self, record: Any) -> None:
        used = {relay.port for relay in self._relays.values()}
        for port in range(self.port_base, self.port_base + self.size):
            if port in used:
                continue
            try:
                server = await asyncio.start_server(
                    functools.partial(self._serve, record.id),
                    host=self.segments.service_ip,
                    port=port,
                )
            except OSError:
                continue
            break
        else:
            _log.error("no free relay port for cluster %s", record.id)
            return
        allowed = []
        for user in record.shared_with:
            ns = await asyncio.to_thread(self.segments.create, user)
            await asyncio.to_thread(
                self.segments.allow, ns, dest=self.segments.service_ip, port=port
            )
            allowed.append(ns)
        self._relays[record.id] = _Relay(record, port, server, allowed)

    async def _close(self, cluster_id: str) -> None:
        relay = self._relays.pop(cluster_id)
        relay.server.close()
        for ns in relay.allowed_ns:
            await asyncio.to_thread(
                self.segments.disallow, ns, dest=self.segments.service_ip, port=relay.port
            )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(relay.server.wait_closed(), 5)

    async def _serve(
        self, cluster_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        relay = self._relays.get(cluster_id)
        peer = writer.get_extra_info("peername") or ("", 0)
        user = await asyncio.to_thread(self.segments.owner_of, peer[0])
        record = relay.record if relay is not None else None
        if (
            record is None
            or user is None
            or (user not in record.shared_with and user != record.owner)
        ):
            self._record(
                f"cluster {cluster_id}",
                "pool.connection_refused",
                cluster=cluster_id,
                owner=record.owner if record else "",
                pool=record.pool if record else "",
                peer=f"{peer[0]}:{peer[1]}",
                reason="the relay admits only the users the cluster is shared with, not "
                + (user or "an address outside the users' sandboxes"),
                holder=None,
                count=1,
            )
            writer.close()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                record.host, record.port
            )
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            _pipe(reader, upstream_writer), _pipe(upstream_reader, writer), return_exceptions=True
        )


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(Exception):
            writer.close()
