"""MLflow's auth app with the hub's identities: the real server, no hub in front.

The hub's proxy is tested end to end in ``test_models_e2e.py``; here the MLflow server
runs as the hub starts it (``server_command`` + ``server_environment``) with
``default_permission = NO_PERMISSIONS``, and requests are made as the proxy makes them.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztlab.hub.models.mlflow import (
    MlflowError,
    MlflowREST,
    proxy_key,
    server_command,
    server_environment,
)
from ztlab.hub.private import private_directory

pytestmark = [pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    store = private_directory(tmp_path_factory.mktemp("mlflow") / "store", what="store")
    port = _free_port()
    log = store.parent / "mlflow.log"
    env = {**os.environ, **server_environment(store, default_permission="NO_PERMISSIONS")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            server_command(store, port), env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        yield url, store
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_auth_stores_and_secrets_are_the_control_planes(server: tuple[str, Path]) -> None:
    _, store = server
    for name in ("auth.ini", "proxy.key", "auth.db", "mlflow.db"):
        assert stat.S_IMODE((store / name).stat().st_mode) & 0o077 == 0, name
    assert len(proxy_key(store)) >= 32


def test_without_the_proxy_key_mlflow_answers_nobody(server: tuple[str, Path]) -> None:
    url, store = server
    for headers in ({}, {"X-Ztlab-User": "alice"}, {"X-Ztlab-Proxy-Key": proxy_key(store)[:-1]}):
        request = urllib.request.Request(
            f"{url}/api/2.0/mlflow/experiments/search?max_results=1", headers=headers
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 401
    with pytest.raises(MlflowError) as missing:
        MlflowREST(url, key=proxy_key(store), user="").call("GET", "users/current")
    assert missing.value.status == 401


def test_no_permissions_hides_other_users_work_until_shared(server: tuple[str, Path]) -> None:
    url, store = server
    key = proxy_key(store)
    control = MlflowREST(url, key=key)
    alice = MlflowREST(url, key=key, user="alice")
    bob = MlflowREST(url, key=key, user="bob")
    experiment = alice.call("POST", "experiments/create", {"name": "secret"})["experiment_id"]
    alice.call("POST", "registered-models/create", {"name": "secret-model"})
    for call in (
        lambda: bob.call("GET", "experiments/get", {"experiment_id": experiment}),
        lambda: bob.call("GET", "registered-models/get", {"name": "secret-model"}),
        lambda: bob.call("POST", "runs/create", {"experiment_id": experiment}),
    ):
        with pytest.raises(MlflowError) as caught:
            call()
        assert caught.value.status == 403
    found = bob.call("POST", "experiments/search", {"max_results": 100}).get("experiments", [])
    assert "secret" not in [e["name"] for e in found]
    # users are created on first sight, never as admins; the control plane is MLflow's admin
    assert bob.call("GET", "users/current")["user"]["is_admin"] is False
    assert control.call("GET", "users/current")["user"]["is_admin"] is True
    # alice manages what she created and shares it read-only
    alice.grant("bob", "experiment", experiment, "READ")
    assert bob.call("GET", "experiments/get", {"experiment_id": experiment})
    with pytest.raises(MlflowError) as caught:
        bob.call("POST", "runs/create", {"experiment_id": experiment})
    assert caught.value.status == 403
    # bob cannot share alice's work onward, nor make himself an admin
    with pytest.raises(MlflowError):
        bob.grant("carol", "experiment", experiment, "READ")
    with pytest.raises(MlflowError):
        bob.call("PATCH", "users/update-admin", {"username": "bob", "is_admin": True})
