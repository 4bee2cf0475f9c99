"""Signed models in the kernel: ask the control plane to sign, load only what verifies.

``ztlab.models.sign(name, version)`` asks the hub to sign a registered version (the hub
hashes the artifacts itself and checks the run's datasets; the kernel only asks).
``ztlab.models.load("models:/NAME@ALIAS")`` asks the hub which version the approval
service put behind the alias and for its bundle, downloads the artifacts through the hub's
MLflow endpoint, verifies every file against the bundle with the pinned trusted keys, and
only then lets MLflow deserialise the model: a pickled model runs code when loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ztlab.common.attest.model import parse_bundle, verify_model
from ztlab.common.errors import UsageError, VerificationError
from ztlab.extensions.datasets.client import HubRegistry

_URI = re.compile(r"models:/([A-Za-z0-9][A-Za-z0-9_.-]{0,127})@([A-Za-z0-9_-]+)")


class ModelIntegrityError(VerificationError):
    """A model's files or signature do not verify; nothing was deserialised."""


class ModelRefused(UsageError):
    """The control plane refused: not signed, not approved, not allowed."""


def _ask(hub: HubRegistry, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    from ztlab.extensions.datasets.errors import DatasetError

    try:
        return hub.call(method, path, body)
    except DatasetError as exc:  # the client's name for a 4xx answer
        raise ModelRefused(exc.message, hint=exc.hint) from exc


def _hub() -> HubRegistry:
    if not (os.environ.get("JUPYTERHUB_API_URL") and os.environ.get("JUPYTERHUB_API_TOKEN")):
        raise UsageError("not in a ztlab server: JUPYTERHUB_API_URL / _TOKEN are unset")
    return HubRegistry.from_environment()


def sign(name: str, version: str | int) -> dict[str, Any]:
    """Ask the control plane to sign ``name`` version ``version`` (you must be its trainer)."""
    answer: dict[str, Any] = _ask(_hub(), "POST", f"/ztlab/models/{name}/{version}/sign", {})
    return answer


def load(uri: str, *, flavor: str = "pyfunc") -> Any:
    """Verify, then load ``models:/NAME@ALIAS`` (an approved alias); ``flavor``: an MLflow
    flavor module name (``pyfunc``, ``sklearn``...)."""
    import importlib

    match = _URI.fullmatch(uri)
    if not match:
        raise UsageError(f"bad model URI {uri!r}", hint="expected models:/NAME@ALIAS")
    name, alias = match.groups()
    hub = _hub()
    answer = _ask(hub, "GET", f"/ztlab/models/{name}/aliases/{alias}")
    version, bundle = str(answer["version"]), answer.get("bundle")
    if not bundle:
        raise ModelIntegrityError(f"{name} version {version} has no signature")
    keys = hub.trusted_keys()  # ZTLAB_TRUSTED_KEYS (pinned by the spawner), else the hub's
    mlflow: Any = importlib.import_module("mlflow")
    local = Path(tempfile.mkdtemp(prefix=f"ztlab-model-{name}-"))
    mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=local)
    # MLflow's client writes this note (name and version) into every registry download
    (local / "registered_model_meta").unlink(missing_ok=True)
    try:
        envelope = parse_bundle(json.dumps(bundle), source=f"the signature of {name} {version}")
        check = verify_model(local, envelope, keys)
    except VerificationError:
        shutil.rmtree(local, ignore_errors=True)
        raise
    extra = check.signature.extra
    if extra.get("model") != name or str(extra.get("version")) != version:
        shutil.rmtree(local, ignore_errors=True)
        raise ModelIntegrityError(
            f"the signature is for {extra.get('model')} version {extra.get('version')}, "
            f"not {name} version {version}"
        )
    if not check.ok:
        shutil.rmtree(local, ignore_errors=True)
        changed = [m[0] for m in check.modified] + check.missing + check.extra
        changed += [r.path for r in check.refused]
        raise ModelIntegrityError(
            f"{name} version {version} does not match its signature: {', '.join(changed[:10])}",
            hint="the artifacts changed after signing; nothing was loaded",
        )
    module: Any = importlib.import_module(f"mlflow.{flavor}")
    return module.load_model(str(local))


def configure_mlflow_tls() -> str | None:
    """Give MLflow's client this server's TLS client certificate for the hub's API.

    The hub's internal TLS asks clients for a certificate; MLflow's client takes one file
    holding certificate and key (``MLFLOW_TRACKING_CLIENT_CERT_PATH``), so the two files
    the spawner provides are joined into a private (0600) temporary file.
    """
    cert, key = os.environ.get("JUPYTERHUB_SSL_CERTFILE"), os.environ.get("JUPYTERHUB_SSL_KEYFILE")
    if not cert or not key or "MLFLOW_TRACKING_CLIENT_CERT_PATH" in os.environ:
        return None
    try:
        joined = Path(cert).read_bytes() + b"\n" + Path(key).read_bytes()
    except OSError:
        return None
    fd, path = tempfile.mkstemp(prefix="ztlab-mlflow-", suffix=".pem")
    with os.fdopen(fd, "wb") as handle:
        handle.write(joined)
    os.environ["MLFLOW_TRACKING_CLIENT_CERT_PATH"] = path
    return path
