"""The MLflow tracking server the hub runs, and the control plane's own client for it.

The server listens on 127.0.0.1 only (``[models] mlflow_port``) with a SQLite backend and a
local artifact store under ``[models] store`` (mode 0700); users and kernels reach it only
through the hub (:mod:`ztlab.hub.api.models`), which authenticates them and shows MLflow
who is asking (:mod:`ztlab.hub.models.mlflow_auth`); MLflow's auth app then enforces its
per-experiment and per-model permissions. The control plane calls it directly with
:class:`MlflowREST` as MLflow's admin, e.g. to set a protected alias after an approval.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ztlab.common.errors import ZtlabError
from ztlab.hub.models.mlflow_auth import CONTROL_USER, KEY_ENV, KEY_HEADER, USER_HEADER
from ztlab.hub.private import private_file, read_private_file


class MlflowError(ZtlabError):
    """The MLflow server answered with an error or could not be reached."""

    def __init__(
        self, message: str, *, status: int = 502, code: str = "", hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.code = code


def server_command(store: Path, port: int, *, destination: str | None = None) -> list[str]:
    """The ``mlflow server`` command for the hub's managed service (with MLflow's auth app).

    ``destination``: where artifacts go (``s3://bucket/prefix``); by default the local
    store's ``artifacts`` directory.
    """
    mlflow = Path(sys.executable).with_name("mlflow")
    return [
        str(mlflow),
        "server",
        "--app-name",
        "basic-auth",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination",
        destination or str(store / "artifacts"),
        "--serve-artifacts",
        "--workers",
        "1",
    ]


#: what ``[models] default_permission`` may be (MLflow's permission names)
DEFAULT_PERMISSIONS = ("READ", "NO_PERMISSIONS")


def proxy_key(store: Path) -> str:
    """The secret the hub's proxy shows MLflow (``<store>/proxy.key``, mode 0600)."""
    path = private_file(
        store / "proxy.key",
        what="MLflow proxy key",
        error=MlflowError,
        content=secrets.token_urlsafe(32).encode(),
    )
    return read_private_file(path, what="MLflow proxy key", error=MlflowError).decode().strip()


#: the hub's environment variables the server gets for object storage (credentials stay in
#: the environment or the files these name, never in ztlab.toml)
OBJECT_STORE_ENVIRONMENT = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_CA_BUNDLE",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_S3_IGNORE_TLS",
)


def _store_path(uri: str) -> str:
    """The path of an ``mlflow-artifacts:/PATH`` URI inside the artifact store."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme != "mlflow-artifacts":
        raise MlflowError(f"artifacts at {uri!r} are not in the hub's artifact store", status=400)
    return parsed.path


def remote_artifact_uri(destination: str, uri: str) -> str:
    """Where in object storage an ``mlflow-artifacts:/PATH`` URI's files are (no escape)."""
    parts = [p for p in _store_path(uri).split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise MlflowError(f"artifact URI {uri!r} leaves the artifact store", status=400)
    return destination.rstrip("/") + "/" + "/".join(parts)


def server_environment(store: Path, *, default_permission: str = "READ") -> dict[str, str]:
    """The managed server's environment; writes its auth configuration into ``store``.

    MLflow's auth app (``mlflow[auth]``) keeps users and their READ/EDIT/MANAGE grants in
    ``<store>/auth.db`` and asks :func:`ztlab.hub.models.mlflow_auth.authenticate` who each
    request is for. Its admin is the control plane (:data:`CONTROL_USER`); the bootstrap
    password is random and never used. No background job runner: its seven workers take
    about 1.6 GB and CPU that a 2-core machine needs, and ztlab uses none of MLflow's jobs.
    """
    if default_permission not in DEFAULT_PERMISSIONS:
        raise MlflowError(
            f"default_permission: expected one of {', '.join(DEFAULT_PERMISSIONS)}, "
            f"got {default_permission!r}",
            status=500,
        )
    for database in ("mlflow.db", "auth.db"):
        # SQLite takes an empty file as a new database and keeps its mode (MLflow would
        # create them 0644)
        private_file(store / database, what="MLflow database", error=MlflowError)
    ini = store / "auth.ini"
    text = (
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = sqlite:///{store / 'auth.db'}\n"
        f"admin_username = {CONTROL_USER}\n"
        "authorization_function = ztlab.hub.models.mlflow_auth:authenticate\n"
    )
    private_file(ini, what="MLflow auth configuration", error=MlflowError)
    ini.write_text(text)
    return {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.token_urlsafe(32),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),
        KEY_ENV: proxy_key(store),
        **{name: os.environ[name] for name in OBJECT_STORE_ENVIRONMENT if name in os.environ},
    }


def artifact_path(store: Path, uri: str) -> Path:
    """The local directory of an ``mlflow-artifacts:/...`` URI in the store (no escape)."""
    base = (store / "artifacts").resolve()
    path = (base / _store_path(uri).lstrip("/")).resolve()
    if path != base and base not in path.parents:
        raise MlflowError(f"artifact URI {uri!r} leaves the artifact store", status=400)
    return path


class MlflowREST:
    """A minimal synchronous client of MLflow's REST API (run it in a thread)."""

    def __init__(self, base_url: str, *, key: str = "", user: str = CONTROL_USER) -> None:
        """``base_url``: ``http://127.0.0.1:PORT``; ``key``: :func:`proxy_key`; calls are
        made as ``user`` (by default the control plane, MLflow's admin)."""
        self.base_url = base_url.rstrip("/")
        self.headers = {KEY_HEADER: key, USER_HEADER: user}

    def headers_for(self, user: str) -> dict[str, str]:
        """The headers that make a request to MLflow one made for hub user ``user``."""
        return {**self.headers, USER_HEADER: user}

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, api: str = "2.0"
    ) -> Any:
        """``method`` ``/api/API/mlflow/PATH`` with a JSON body (GET: query string)."""
        url = f"{self.base_url}/api/{api}/mlflow/{path}"
        data = None
        if method == "GET" and body:
            url += "?" + urllib.parse.urlencode(body)
        elif body is not None:
            data = json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - our own server on 127.0.0.1
            url,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **self.headers},
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

    def create_user(self, user: str) -> None:
        """Make hub user ``user`` known to MLflow (with a password nobody knows)."""
        try:
            self.call(
                "POST", "users/create", {"username": user, "password": secrets.token_urlsafe(32)}
            )
        except MlflowError as exc:
            if exc.code != "RESOURCE_ALREADY_EXISTS":
                raise

    def grant(self, user: str, resource_type: str, resource_id: str, permission: str) -> None:
        """Give ``user`` ``permission`` on an experiment or registered model."""
        self.call(
            "POST",
            "users/permissions/grant",
            {
                "username": user,
                "resource_type": resource_type,
                "resource_id": resource_id,
                "permission": permission,
            },
            api="3.0",
        )

    def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        """Tag a model version (the control plane records the signature's digest)."""
        self.call(
            "POST",
            "model-versions/set-tag",
            {"name": name, "version": version, "key": key, "value": value},
        )
