"""``ztlab up`` / ``ztlab down``: the whole environment, started for real on free ports."""

from __future__ import annotations

import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from tests.auditlog_helpers import verify
from tests.hubstack import free_port
from ztlab.cli.main import cli
from ztlab.common.auditlog.record import parse_record
from ztlab.dev.idp.flow import idp_login


def _config(tmp_path: Path, extra: str = "") -> tuple[Path, str]:
    hub = f"http://127.0.0.1:{free_port()}"
    path = tmp_path / "ztlab.toml"
    path.write_text(
        f"""
state_dir = "{tmp_path / "state"}"
[hub]
bind_url = "{hub}"
api_url = "http://127.0.0.1:{free_port()}"
proxy_api_url = "http://127.0.0.1:{free_port()}"
[login]
issuer = "http://127.0.0.1:{free_port()}"
development_provider = true
[sandbox]
address_pool = "10.218.0.0/16"
firewall_table = "ztlab_test_up"
[groups]
ml-trainers = ["trainer"]
[secrets]
oidc_client_secret = {{ file = "{tmp_path / "state" / "secrets" / "oidc-client-secret"}" }}
[packages]
port = {free_port()}
devpi_port = {free_port()}
[environments]
root = "{_envs_root()}"
{extra}
"""
    )
    return path, hub


def _envs_root() -> Path:
    """Where the hub builds base: readable by the servers' accounts (pytest's are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="ztlab-up-envs-", dir="/tmp"))
    root.chmod(0o755)
    return root


def _ztlab(*args: str) -> subprocess.CompletedProcess[str]:
    ztlab = Path(sys.executable).with_name("ztlab")
    return subprocess.run(
        [str(ztlab), *args], capture_output=True, text=True, timeout=180, check=False
    )


@pytest.mark.e2e
def test_up_starts_the_idp_and_the_hub_and_down_stops_them(tmp_path: Path) -> None:
    config, hub = _config(tmp_path)
    up = _ztlab("up", "--config", str(config))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"open              {hub}/hub/" in up.stdout
        assert "alice  ml-trainers" in up.stdout
        again = _ztlab("up", "--config", str(config))
        assert again.returncode == 0, again.stderr
        assert "is already up" in again.stdout
        state = tmp_path / "state"
        # state and secrets are readable by the control plane only
        for path in (state, state / "hub", state / "secrets"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
        for path in (
            state / "hub" / "jupyterhub.sqlite",
            state / "hub" / "jupyterhub_cookie_secret",
            state / "secrets" / "oidc-client-secret",
            state / "keys" / "audit-ed25519.key",
            state / "audit" / "audit.jsonl",
        ):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        # a demo user can sign in through the development IdP
        session = requests.Session()
        final = idp_login(
            session,
            f"{hub}/hub/oauth_login",
            username="alice",
            password="alice-password",
            follow_redirects=True,
        )
        assert final.status_code == 200
        assert final.url.endswith("/hub/home")
    finally:
        down = _ztlab("down", "--config", str(config))
    assert down.returncode == 0, down.stderr
    assert "hub: stopped" in down.stdout
    assert "devidp: stopped" in down.stdout
    assert "sandbox network: removed" in down.stdout
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{hub}/hub/health", timeout=5)
    report = verify(tmp_path / "state" / "audit" / "audit.jsonl")
    actions = [
        parse_record(line).action
        for line in (tmp_path / "state" / "audit" / "audit.jsonl").read_bytes().splitlines()
    ]
    assert actions[0] == "control_plane.up"
    assert "login.success" in actions
    assert report.records == len(actions)


def test_up_refuses_an_invalid_config(tmp_path: Path) -> None:
    config, _ = _config(tmp_path, "[audit]\ncheckpoint_interval_seconds = 0\n")
    result = CliRunner().invoke(cli, ["up", "--config", str(config)])
    assert result.exit_code == 2
    assert "audit.checkpoint_interval_seconds" in result.stderr
    assert not (tmp_path / "state").exists()  # nothing starts on a half-valid config


def test_the_hub_refuses_to_start_when_the_mlflow_port_is_taken(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config, _ = _config(tmp_path, f"[models]\nmlflow_port = {port}\n")
        result = CliRunner().invoke(cli, ["hub", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert f"models.mlflow_port: port {port} on 127.0.0.1 is in use" in result.stderr
    assert "ss -ltnp" in result.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_down_and_up_with_a_server_running(tmp_path: Path) -> None:
    """`ztlab down` with a user's sandboxed server running stops it cleanly (its sandbox
    ended, recorded); `ztlab up` again starts with nothing left over to reconcile."""
    from ztlab.hub.sandbox.cgroups import CgroupManager

    config, hub = _config(tmp_path, "[models]\nenabled = false\n")
    log = tmp_path / "state" / "audit" / "audit.jsonl"
    try:
        up = _ztlab("up", "--config", str(config))
        assert up.returncode == 0, up.stdout + up.stderr
        session = requests.Session()
        home = idp_login(
            session,
            f"{hub}/hub/oauth_login",
            username="alice",
            password="alice-password",
            follow_redirects=True,
        )
        assert home.url.endswith("/hub/home")
        xsrf = {"X-XSRFToken": session.cookies.get("_xsrf") or ""}
        started = session.post(f"{hub}/hub/api/users/alice/server", headers=xsrf, timeout=120)
        assert started.status_code in (201, 202), started.text
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            model = session.get(f"{hub}/hub/api/users/alice", timeout=30).json()
            if (model.get("servers") or {}).get("", {}).get("ready"):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"alice's server did not start: {model}")
        alice = CgroupManager.detect(parent="ztlab").get("ztl-alice")
        assert alice is not None
        assert alice.procs()
        down = _ztlab("down", "--config", str(config))
        assert down.returncode == 0, down.stderr
        assert alice.procs() == []  # the server and everything in its sandbox ended
        actions = [parse_record(line) for line in log.read_bytes().splitlines()]
        assert any(r.action == "server.stopped" and r.actor == "alice" for r in actions)
        assert actions[-1].action == "control_plane.stopped"
        again = _ztlab("up", "--config", str(config))
        assert again.returncode == 0, again.stdout + again.stderr
        records = [parse_record(line) for line in log.read_bytes().splitlines()]
        reconciled = [r for r in records if r.action == "control_plane.reconciled"][-1]
        assert reconciled.detail == {"running": [], "leases_released": [], "sandboxes_stopped": []}
    finally:
        _ztlab("down", "--config", str(config))
        subprocess.run(["userdel", "--remove", "ztl-alice"], check=False, capture_output=True)
    verify(log)
