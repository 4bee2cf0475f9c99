"""The MLflow tracking server the hub runs, and the control plane's own client for it.

The server listens on 127.0.0.1 only (``[models] mlflow_port``) with a SQLite backend and a
local artifact store under ``[models] store`` (mode 0700); users and kernels reach it only
through the hub (:mod:`ztlab.hub.api.mlflow_proxy`), which authenticates them. The control
plane calls it directly with :class:`MlflowREST`, e.g. to set a protected alias after an
approval.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ztlab.common.errors import ZtlabError


class MlflowError(ZtlabError):
    """The MLflow server answered with an error or could not be reached."""

    def __init__(self, message: str, *, status: int = 502, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def server_command(store: Path, port: int) -> list[str]:
    """The ``mlflow server`` command for the hub's managed service."""
    mlflow = Path(sys.executable).with_name("mlflow")
    return [
        str(mlflow),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination",
        str(store / "artifacts"),
        "--serve-artifacts",
        "--workers",
        "1",
    ]


#: the server's environment: no background job runner (its seven huey workers take about
#: 1.6 GB and CPU that a 2-core machine needs; ztlab uses none of MLflow's server jobs)
SERVER_ENVIRONMENT = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def artifact_path(store: Path, uri: str) -> Path:
    """The local directory of an ``mlflow-artifacts:/...`` URI in the store (no escape)."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme != "mlflow-artifacts":
        raise MlflowError(f"artifacts at {uri!r} are not in the hub's artifact store", status=400)
    base = (store / "artifacts").resolve()
    path = (base / parsed.path.lstrip("/")).resolve()
    if path != base and base not in path.parents:
        raise MlflowError(f"artifact URI {uri!r} leaves the artifact store", status=400)
    return path


class MlflowREST:
    """A minimal synchronous client of MLflow's REST API (run it in a thread)."""

    def __init__(self, base_url: str) -> None:
        """``base_url``: ``http://127.0.0.1:PORT``."""
        self.base_url = base_url.rstrip("/")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """``method`` ``/api/2.0/mlflow/PATH`` with a JSON body (GET: query string)."""
        url = f"{self.base_url}/api/2.0/mlflow/{path}"
        data = None
        if method == "GET" and body:
            url += "?" + urllib.parse.urlencode(body)
        elif body is not None:
            data = json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - our own server on 127.0.0.1
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                answer = json.loads(exc.read())
            except ValueError:
                answer = {}
            raise MlflowError(
                f"MLflow: {answer.get('message') or exc.reason}",
                status=exc.code,
                code=str(answer.get("error_code", "")),
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise MlflowError(f"cannot reach the MLflow server at {self.base_url}: {exc}") from exc

    def model_version(self, name: str, version: str) -> dict[str, Any]:
        """The registered model version (``name``, ``version``, ``source``, ``run_id``...)."""
        answer = self.call("GET", "model-versions/get", {"name": name, "version": version})
        return dict(answer["model_version"])

    def run(self, run_id: str) -> dict[str, Any]:
        """The run (``info``, ``data``, ``inputs``)."""
        return dict(self.call("GET", "runs/get", {"run_id": run_id})["run"])

    def logged_model(self, model_id: str) -> dict[str, Any]:
        """An MLflow 3 logged model (``info.artifact_uri``...)."""
        return dict(self.call("GET", f"logged-models/{model_id}")["model"])

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``alias`` at ``version`` (the control plane only)."""
        self.call(
            "POST",
            "registered-models/alias",
            {"name": name, "alias": alias, "version": version},
        )

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``alias`` (the control plane only)."""
        self.call("DELETE", "registered-models/alias", {"name": name, "alias": alias})

    def alias(self, name: str, alias: str) -> dict[str, Any] | None:
        """The version ``alias`` points at, or ``None``."""
        try:
            answer = self.call("GET", "registered-models/alias", {"name": name, "alias": alias})
        except MlflowError as exc:
            if (
                exc.status == 404
                or exc.code == "RESOURCE_DOES_NOT_EXIST"
                or ("not found" in exc.message)
            ):
                return None
            raise
        return dict(answer["model_version"])

    def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        """Tag a model version (the control plane records the signature's digest)."""
        self.call(
            "POST",
            "model-versions/set-tag",
            {"name": name, "version": version, "key": key, "value": value},
        )
