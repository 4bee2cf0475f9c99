"""The MLflow tracking server as a process the control plane runs.

Not a JupyterHub-managed service: a hub killed with ``kill -9`` leaves such a service
running, holding its port, and the next hub's would fail to bind. The control plane starts
MLflow in its own session with a pid file (:class:`~ztlab.hub.processes.ManagedProcess`), so
a new hub first stops what an earlier one left (and only that: a pid file whose process
started at another time is stale), refuses a port some other process holds, starts MLflow
again if it exits, and stops it with the hub.
"""

from __future__ import annotations

import os

from ztlab.common.config import ZtlabConfig
from ztlab.hub.models.mlflow import server_command, server_environment
from ztlab.hub.processes import LocalService

#: the process's name under ``<state_dir>/run`` and ``<state_dir>/logs``
NAME = "mlflow"


class ModelServer(LocalService):
    """Start, watch and stop the hub's MLflow server (``[models]``)."""

    name = NAME
    port_key = "models.mlflow_port"

    def __init__(self, config: ZtlabConfig, *, config_source: str = "ztlab.toml") -> None:
        super().__init__(config.models.mlflow_port, config.state_dir, config_source=config_source)
        self._config = config

    def start(self) -> None:
        """Stop what an earlier hub left, check the port, start the server (not waiting)."""
        self.prepare()
        models = self._config.models
        store = self._config.models_store
        self._process.start(
            server_command(store, models.mlflow_port, destination=models.artifacts_destination),
            env={
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": os.environ.get("HOME", "/root"),
                "LANG": os.environ.get("LANG", "C.UTF-8"),
                **server_environment(store, default_permission=models.default_permission),
            },
        )
