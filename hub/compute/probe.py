"""The control plane asks a cluster's scheduler, with its own certificate of the pool.

The hub is the one client every cluster admits besides its owner (``control-plane`` in
:mod:`ztlab.common.poolidentity`); its key stays in the control plane's state. Used for a
cluster's status (``identity``) and to collect the connections it refused
(``ztlab_refusals``, see :mod:`ztlab.kernels.cluster`).
"""

from __future__ import annotations

import asyncio
from typing import Any

#: seconds one question may take
TIMEOUT_SECONDS = 5.0


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
