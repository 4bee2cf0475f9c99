"""The control plane's HTTP API for kernels and the ``ztlab`` command, inside the hub.

The handlers are mounted under ``/hub/api/ztlab/`` by :class:`~ztlab.hub.app.ZtlabHub`, so
they run in the hub process that owns the audit log's single writer and the policy engine,
and they take JupyterHub's own credentials: a hub API token (a user's token, or the
``JUPYTERHUB_API_TOKEN`` of the user's server, which its kernels inherit) that holds the
``custom:ztlab:data`` scope. The token names the user; what the user may do is a policy
decision on the roles the identity provider granted at the last login or refresh. Every
answer waits until the audit records of the request are on disk.
"""

from __future__ import annotations

from typing import Any

from ztlab.hub.api.datasets import dataset_handlers
from ztlab.hub.api.environments import environment_handlers
from ztlab.hub.api.models import model_handlers
from ztlab.hub.api.monitor import monitor_handlers
from ztlab.hub.api.pools import pool_handlers
from ztlab.hub.api.runs import run_handlers


def api_handlers() -> list[tuple[str, Any]]:
    """Every API handler, relative to the hub prefix (``/hub``)."""
    return [
        *dataset_handlers(),
        *model_handlers(),
        *environment_handlers(),
        *pool_handlers(),
        *monitor_handlers(),
        *run_handlers(),
    ]


__all__ = ["api_handlers"]
