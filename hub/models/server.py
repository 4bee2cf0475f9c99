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
from pathlib import Path

from ztlab.common.config import ZtlabConfig
from ztlab.hub.models.mlflow import server_command, server_environment
from ztlab.hub.processes import ManagedProcess, check_port_free

#: the process's name under ``<state_dir>/run`` and ``<state_dir>/logs``
NAME = "mlflow"


class ModelServer:
    """Start, watch and stop the hub's MLflow server (``[models]``)."""

    def __init__(self, config: ZtlabConfig, *, config_source: str = "ztlab.toml") -> None:
        self._config = config
        self._source = config_source
        self._process = ManagedProcess(NAME, config.state_dir)

    @property
    def url(self) -> str:
        """Where the server listens (127.0.0.1 only)."""
        return f"http://127.0.0.1:{self._config.models.mlflow_port}"

    @property
    def log_file(self) -> Path:
        """The server's log."""
        return self._process.log_file

    def prepare(self) -> None:
        """Stop what an earlier hub left; refuse a port another process holds.

        The hub calls this before it changes anything on the machine, so a taken port
        leaves nothing behind.
        """
        self._process.stop()
        self._check_port_free()

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

    def running(self) -> bool:
        """Whether the server's process is alive."""
        return self._process.running()

    def exit_status(self) -> int | None:
        """How the process this object started ended (``None``: running, or not ours)."""
        return self._process.exit_status()

    def stop(self) -> None:
        """Stop the server and its workers."""
        self._process.stop()

    def _check_port_free(self) -> None:
        check_port_free(
            self._config.models.mlflow_port, key="models.mlflow_port", source=self._source
        )
