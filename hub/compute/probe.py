"""The control plane asks a cluster's scheduler, with its own certificate of the pool.

The hub is the one client every cluster admits besides its owner (``control-plane`` in
:mod:`ztlab.common.poolidentity`); its key stays in the control plane's state. Used for a
cluster's status (``identity``) and to collect the connections it refused
(``ztlab_refusals``, see :mod:`ztlab.kernels.cluster`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

_log = logging.getLogger(__name__)

#: seconds one question may take
TIMEOUT_SECONDS = 5.0


async def collect_refusals(service: Any, records: Iterable[Any]) -> None:
    """Ask each running cluster's scheduler for the connections it refused and record them
    (periodically, and before a cluster is stopped, so none is lost with it)."""
    for record in records:
        if record.state != "running":
            continue
        try:
            entries = await ask_scheduler(service, record, "ztlab_refusals")
        except Exception as exc:
            _log.warning("cluster %s did not hand over its refusals: %s", record.id, exc)
            continue
        if entries:
            service.record_refusals(record, entries)


async def ask_scheduler(service: Any, record: Any, op: str, **arguments: Any) -> Any:
    """Call ``op`` on ``record``'s scheduler; its answer (``OSError``/``TimeoutError`` if
    it does not answer)."""
    from distributed.core import rpc
    from distributed.security import Security

    cert, key = await asyncio.to_thread(service.probe_certificate, record.pool)
    security = Security(
        tls_ca_file=service.authority(record.pool).ca_pem.decode(),
        tls_client_cert=cert,
        tls_client_key=key,
        require_encryption=True,
    )
    async with rpc(
        record.address,
        connection_args=security.get_connection_args("client"),
        timeout=TIMEOUT_SECONDS,
    ) as scheduler:
        return await asyncio.wait_for(getattr(scheduler, op)(**arguments), TIMEOUT_SECONDS)
