"""Login: round trip through the provider, the TOTP step-up and the hub, and 100 at once.

Baseline in the same run: a plain ``GenericOAuthenticator`` hub (no ID-token verification,
no MFA, no roles, no audit) started beside ours against the same development provider, with
the same users. Each login uses a fresh HTTP session, as a new browser would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pyotp
import requests

from bench._table import Row, percentile
from ztlab.common.installed import npm_command
from ztlab.dev.idp.flow import idp_login
from ztlab.dev.idp.launcher import DevIdP

SECRET = "bench-client-secret-0123456789abcdef"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _users(count: int) -> dict[str, dict[str, object]]:
    users: dict[str, dict[str, object]] = {}
    for i in range(count):
        for kind, amr in (("mfa", ["pwd", "otp"]), ("totp", ["pwd"])):
            name = f"{kind}{i:03d}"
            users[name] = {
                "password": f"{name}-password",
                "email": f"{name}@example.org",
                "name": name,
                "groups": ["ml-trainers"],
                "amr": amr,
                "acr": "urn:ztlab:mfa",
                "disabled": False,
            }
    return users


def _start(
    argv: list[str],
    log: Path,
    health: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    headers: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(health, headers=headers, timeout=2).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{health} did not answer:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _ztlab_hub(
    root: Path, hub: str, issuer: str, *, extra: str = "[sandbox]\nenabled = false\n"
) -> subprocess.Popen[bytes]:
    """``ztlab hub`` on the development provider; ``extra`` adds TOML lines (by default the
    sandbox is off: the login suite spawns nothing and leaves no firewall rules behind)."""
    root.mkdir(mode=0o700)
    secret = root / "client-secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    config = root / "ztlab.toml"
    config.write_text(
        textwrap.dedent(f"""
        state_dir = "{root / "state"}"
        [hub]
        bind_url = "{hub}"
        api_url = "http://127.0.0.1:{_port()}"
        proxy_api_url = "http://127.0.0.1:{_port()}"
        [login]
        issuer = "{issuer}"
        [groups]
        ml-trainers = ["trainer"]
        [models]
        # MLflow is not part of these measurements (and two hubs would share its port)
        enabled = false
        [secrets]
        oidc_client_secret = {{ file = "{secret}" }}
        """)
        + textwrap.dedent(extra)
    )
    ztlab = Path(sys.executable).with_name("ztlab")
    return _start(
        [str(ztlab), "hub", "--config", str(config)], root / "hub.log", f"{hub}/hub/health"
    )


def _plain_hub(root: Path, hub: str, idp: DevIdP, *, extra: str = "") -> subprocess.Popen[bytes]:
    """A stock JupyterHub with GenericOAuthenticator on the same provider (the baseline);
    ``extra`` adds configuration lines (e.g. a spawner)."""
    root.mkdir(mode=0o700)
    config = root / "jupyterhub_config.py"
    chp = npm_command("configurable-http-proxy", "configurable-http-proxy")
    config.write_text(
        textwrap.dedent(f"""
        c.JupyterHub.bind_url = "{hub}"
        c.JupyterHub.hub_bind_url = "http://127.0.0.1:{_port()}"
        c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{_port()}"
        c.ConfigurableHTTPProxy.command = ["{chp}"]
        c.JupyterHub.db_url = "sqlite:///{root / "plain.sqlite"}"
        c.JupyterHub.cookie_secret_file = "{root / "cookie_secret"}"
        c.JupyterHub.authenticator_class = "generic-oauth"
        c.GenericOAuthenticator.client_id = "plain-hub"
        c.GenericOAuthenticator.client_secret = "{SECRET}"
        c.GenericOAuthenticator.oauth_callback_url = "{hub}/hub/oauth_callback"
        c.GenericOAuthenticator.authorize_url = "{idp.authorization_url}"
        c.GenericOAuthenticator.token_url = "{idp.token_url}"
        c.GenericOAuthenticator.userdata_url = "{idp.userinfo_url}"
        c.GenericOAuthenticator.scope = ["openid", "profile", "email", "groups"]
        c.GenericOAuthenticator.username_claim = "preferred_username"
        c.GenericOAuthenticator.enable_pkce = True
        c.GenericOAuthenticator.allow_all = True
        c.JupyterHub.default_url = "/hub/home"
        """)
        + textwrap.dedent(extra)
    )
    jupyterhub = Path(sys.executable).with_name("jupyterhub")
    return _start(
        [str(jupyterhub), "-f", str(config)], root / "hub.log", f"{hub}/hub/health", cwd=root
    )


def _timed(login: Callable[[], requests.Response]) -> float:
    start = time.perf_counter()
    response = login()
    elapsed = time.perf_counter() - start
    if response.status_code != 200 or not response.url.endswith("/hub/home"):
        raise RuntimeError(f"login ended at {response.url} ({response.status_code})")
    return elapsed * 1000


def _provider_login(hub: str, user: str) -> requests.Response:
    return idp_login(
        requests.Session(),
        f"{hub}/hub/oauth_login",
        username=user,
        password=f"{user}-password",
        follow_redirects=True,
    )


def _totp_login(hub: str, user: str, secret: str | None) -> tuple[requests.Response, str]:
    """IdP, then the TOTP page (enrolling on first use), then the hub."""
    session = requests.Session()
    response = idp_login(
        session, f"{hub}/hub/oauth_login", username=user, password=f"{user}-password"
    )
    if not response.headers.get("Location", "").endswith("/hub/ztlab/mfa"):
        raise RuntimeError(f"{user}: expected the TOTP step-up, got {response.status_code}")

    page = session.get(f"{hub}/hub/ztlab/mfa", timeout=30).text
    xsrf = page.split('name="_xsrf" value="', 1)[1].split('"', 1)[0]
    stage = "enroll" if 'value="enroll"' in page else "verify"
    if stage == "enroll":
        secret = page.split('id="mfa-secret">', 1)[1].split("<", 1)[0]
    assert secret is not None
    done = session.post(
        f"{hub}/hub/ztlab/mfa",
        timeout=30,
        data={"_xsrf": xsrf, "stage": stage, "code": pyotp.TOTP(secret).now()},
    )
    return done, secret


def run(*, quick: bool = False) -> list[Row]:
    count = 10 if quick else 40
    concurrent = 20 if quick else 100
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp)
        ours, plain = f"http://127.0.0.1:{_port()}", f"http://127.0.0.1:{_port()}"
        idp = DevIdP(
            users=_users(max(count, concurrent)),
            clients=[
                {
                    "client_id": "ztlab-hub",
                    "client_secret": SECRET,
                    "redirect_uris": [f"{ours}/hub/oauth_callback"],
                },
                {
                    "client_id": "plain-hub",
                    "client_secret": SECRET,
                    "redirect_uris": [f"{plain}/hub/oauth_callback"],
                },
            ],
            state_dir=root / "idp",
        )
        idp.start()
        hubs: list[subprocess.Popen[bytes]] = []
        try:
            hubs.append(_ztlab_hub(root / "ztlab", ours, idp.issuer))
            hubs.append(_plain_hub(root / "plain", plain, idp))
            users = [f"mfa{i:03d}" for i in range(count)]
            _timed(lambda: _provider_login(ours, users[0]))  # warm up both hubs
            _timed(lambda: _provider_login(plain, users[0]))
            base: list[float] = []
            mfa: list[float] = []
            for user in users:  # interleaved, so that both see the same machine state
                base.append(_timed(partial(_provider_login, plain, user)))
                mfa.append(_timed(partial(_provider_login, ours, user)))
            # TOTP users: enroll now, then log in again in the next 30 s time step
            totp_users = [f"totp{i:03d}" for i in range(count)]
            secrets = {u: _totp_login(ours, u, None)[1] for u in totp_users}
            time.sleep(30 - time.time() % 30 + 0.5)
            totp = []
            for user in totp_users:
                start = time.perf_counter()
                done, _ = _totp_login(ours, user, secrets[user])
                totp.append((time.perf_counter() - start) * 1000)
                if done.status_code != 200 or not done.url.endswith("/hub/home"):
                    raise RuntimeError(f"TOTP login of {user} ended at {done.url}")
            base_p50 = percentile(base, 0.5)
            for label, samples in (("provider MFA", mfa), ("IdP + TOTP step-up", totp)):
                p50, p95 = percentile(samples, 0.5), percentile(samples, 0.95)
                rows.append(
                    Row(
                        "login",
                        f"{label} round trip p50",
                        p50,
                        "ms",
                        target="overhead < 50 ms",
                        baseline=f"plain GenericOAuthenticator: {base_p50:.1f} ms",
                        ratio=p50 / base_p50,
                    )
                )
                rows.append(
                    Row("login", f"{label} overhead p50", p50 - base_p50, "ms", target="< 50 ms")
                )
                rows.append(
                    Row(
                        "login",
                        f"{label} round trip p95",
                        p95,
                        "ms",
                        baseline=f"plain p95: {percentile(base, 0.95):.1f} ms",
                        ratio=p95 / percentile(base, 0.95),
                    )
                )
            # many users at once, each with a fresh session (hubtraf-style)
            names = [f"mfa{i:03d}" for i in range(concurrent)]
            errors: list[str] = []

            def one(user: str) -> float:
                try:
                    return _timed(partial(_provider_login, ours, user))
                except Exception as exc:  # counted, not raised: the figure is the error count
                    errors.append(f"{user}: {exc}")
                    return float("nan")

            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=concurrent) as pool:
                times = [t for t in pool.map(one, names) if t == t]
            wall = time.perf_counter() - start
            rows.append(
                Row("login", f"{concurrent} concurrent logins: errors", len(errors), "", target="0")
            )
            rows.append(
                Row(
                    "login",
                    f"{concurrent} concurrent logins: wall time",
                    wall,
                    "s",
                    baseline=f"p95 per login {percentile(times or [0], 0.95):.0f} ms",
                )
            )
            if errors:
                print("\n".join(errors[:5]), file=sys.stderr)
        finally:
            for proc in hubs:
                _stop(proc)
            idp.stop()
    return rows
