"""MLflow's ``authorization_function``: identities come from the hub, never from MLflow.

This module runs inside the MLflow tracking server (``mlflow server --app-name
basic-auth``, a control-plane process). MLflow's auth plugin then enforces its own
permissions (READ / EDIT / MANAGE per experiment and registered model; the creator of
either gets MANAGE), but who is asking is decided here:

- a request must carry the proxy key (``X-Ztlab-Proxy-Key``), a random secret that only
  the hub and this server hold (``<store>/proxy.key``, mode 0600, passed in the server's
  environment). Anything else on the machine that connects to MLflow's port directly,
  another user's process included, is answered 401;
- the user is the hub's authenticated user, in ``X-Ztlab-User``. The hub's proxy drops
  every header a client sends except ``Content-Type`` and ``Accept``, so a client cannot
  choose it. Users are created in MLflow's user table on first sight, with a random
  password nobody knows (passwords are never checked: there is no way to log in to MLflow
  except through the hub).
"""

from __future__ import annotations

import hmac
import importlib
import os
import secrets
import threading
from typing import Any

#: the header with the hub's proxy key
KEY_HEADER = "X-Ztlab-Proxy-Key"
#: the header with the hub user the request is made for
USER_HEADER = "X-Ztlab-User"
#: the environment variable holding the proxy key in the MLflow server
KEY_ENV = "ZTLAB_MLFLOW_PROXY_KEY"
#: MLflow's admin user: the control plane itself (never a hub user: the proxy refuses it)
CONTROL_USER = "ztlab-control-plane"

_known: set[str] = set()
_lock = threading.Lock()


def _refuse(message: str) -> Any:
    flask: Any = importlib.import_module("flask")
    return flask.Response(message + "\n", status=401, mimetype="text/plain")


def _ensure_user(username: str) -> None:
    """Create the MLflow user for a hub user the first time it is seen."""
    if username in _known:
        return
    auth: Any = importlib.import_module("mlflow.server.auth")
    with _lock:
        if not auth.store.has_user(username, use_primary=True):
            try:
                auth.store.create_user(username, secrets.token_urlsafe(32))
            except Exception:
                if not auth.store.has_user(username, use_primary=True):
                    raise
        _known.add(username)


def authenticate() -> Any:
    """Return a werkzeug ``Authorization`` for the hub user, or a 401 ``Response``."""
    flask: Any = importlib.import_module("flask")
    datastructures: Any = importlib.import_module("werkzeug.datastructures")
    expected = os.environ.get(KEY_ENV, "")
    given = flask.request.headers.get(KEY_HEADER, "")
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        return _refuse(
            "MLflow is reached through the hub only: use $JUPYTERHUB_API_URL/ztlab/mlflow "
            "with a hub token."
        )
    username = flask.request.headers.get(USER_HEADER, "")
    if not username:
        return _refuse(f"{USER_HEADER} is missing (the hub's proxy always sends it).")
    _ensure_user(username)
    return datastructures.Authorization("basic", {"username": username, "password": ""})
