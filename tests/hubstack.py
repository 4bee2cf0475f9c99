"""A real hub stack for end-to-end tests: identity provider, a tampering proxy in front of
it, and the hub (JupyterHub + configurable-http-proxy) started with ``ztlab hub``.

The provider's issuer is the proxy's URL, so every request the hub and the browser make to
the provider passes through it; it forwards them unchanged unless a test sets a forging
mode. Nothing in the hub is patched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import requests

from tests.hub.login.tampering_proxy import TamperingProxy
from ztlab.common.auditlog.record import parse_record
from ztlab.dev.idp.flow import idp_login
from ztlab.dev.idp.launcher import DevIdP, demo_users, generate_signing_jwk

CLIENT_SECRET = "e2e-client-secret-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LoginStack:
    """What a test needs to drive and inspect the running stack."""

    hub_url: str
    idp: DevIdP
    proxy: TamperingProxy
    audit_log: Path
    state_dir: Path
    hub_log: Path
    hub: HubProcess

    def config(self) -> Any:
        """The stack's validated ztlab.toml."""
        from ztlab.common.config import load_config

        return load_config(self.hub.config)

    def segments(self) -> Any:
        """The servers' network (the stack's own pool and nftables table)."""
        from ztlab.hub.sandbox.netns import NetworkSegments

        sandbox = self.config().sandbox
        return NetworkSegments(
            pool=sandbox.address_pool,
            table=sandbox.firewall_table,
            state_file=self.state_dir / "sandbox" / "netns.json",
        )

    def session(self, user_agent: str = "ztlab-e2e/1.0") -> requests.Session:
        session = requests.Session()
        session.headers["User-Agent"] = user_agent
        return session

    def login(
        self, session: requests.Session, user: str, *, follow: bool = True
    ) -> requests.Response:
        return idp_login(
            session,
            f"{self.hub_url}/hub/oauth_login",
            username=user,
            password=f"{user}-password",
            follow_redirects=follow,
        )

    def records(self, action: str | None = None, actor: str | None = None) -> list[Any]:
        rows = []
        if not self.audit_log.exists():
            return rows
        for line in self.audit_log.read_bytes().splitlines():
            record = parse_record(line)
            if (action is None or record.action == action) and (
                actor is None or record.actor == actor
            ):
                rows.append(record)
        return rows

    def wait_record(
        self, action: str, *, actor: str | None = None, since: int = 0, timeout: float = 10
    ) -> Any:
        """The first record of ``action`` after index ``since`` (records are queued)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self.records(action, actor) if r.seq >= since]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no audit record {action!r} (actor {actor!r}) after {since}")

    def details(self, action: str, since: int = 0) -> list[dict[str, Any]]:
        """The actor and detail of each ``action`` record from index ``since`` on, once the
        records queued so far are written."""
        time.sleep(0.5)
        return [
            {"actor": r.actor, **r.detail} for r in self.records()[since:] if r.action == action
        ]

    def audit_size(self) -> int:
        if not self.audit_log.exists():
            return 0
        return len(self.audit_log.read_bytes().splitlines())

    def logged_in(self, session: requests.Session) -> bool:
        response = session.get(f"{self.hub_url}/hub/home", allow_redirects=False, timeout=10)
        return response.status_code == 200


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class HubProcess:
    """``ztlab hub`` as a process of its own, to start, kill (any signal) and start again.

    Every process group it ever started is ended at :meth:`stop`, so what a hub killed with
    ``SIGKILL`` left behind (its proxy, its services) does not outlive the test.
    """

    def __init__(self, *, config: Path, log: Path, health: str) -> None:
        self.config = config
        self.log = log
        self.health = health
        self.proc: subprocess.Popen[bytes] | None = None
        self._groups: list[int] = []

    def start(self, timeout: float = 60) -> None:
        """Start the hub and wait until it answers its health check.

        The hub starts with SIGINT ignored, as a shell starts a command it runs in the
        background (CI often does): its shutdown must not depend on how it was started.
        """
        ztlab = Path(sys.executable).with_name("ztlab")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(ztlab), "hub", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_ignore_sigint,
            )
        self._groups.append(self.proc.pid)
        _wait_http(self.health, self.proc, self.log, timeout=timeout)

    def kill(self, sig: signal.Signals = signal.SIGKILL, timeout: float = 30) -> int:
        """Send ``sig`` to the hub process alone (not its children); its exit status."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Stop the hub (SIGTERM, then SIGKILL) and whatever its earlier runs left."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        for group in self._groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        # MLflow runs in a session of its own: end what a hub killed mid-stop left
        from ztlab.common.config import load_config
        from ztlab.hub.processes import ManagedProcess

        state_dir = load_config(self.config).state_dir
        ManagedProcess("mlflow", state_dir).stop()
        ManagedProcess("devpi", state_dir).stop()


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the hub exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the hub did not answer {url} in {timeout} s:\n{log.read_text()[-4000:]}")


def write_config(
    path: Path,
    *,
    state: Path,
    hub: str,
    api: str,
    proxy_api: str,
    issuer: str,
    secret_file: Path,
    extra: str = "",
    models: bool = False,
    models_extra: str = "",
    session_max_age: int = 8,
    extra_groups: dict[str, list[str]] | None = None,
    packages: str | None = None,
    environments: Path | None = None,
) -> None:
    """A ztlab.toml for a test stack; ``extra`` is appended (whole TOML tables) and
    ``extra_groups`` maps more provider groups to roles. ``packages``: the upstream index
    the package proxy mirrors (``None``: no package proxy); ``environments``: their root."""
    groups = "".join(
        f"{group} = [{', '.join(repr(role) for role in roles)}]\n".replace("'", '"')
        for group, roles in (extra_groups or {}).items()
    )
    path.write_text(
        f"""
state_dir = "{state}"

[hub]
bind_url = "{hub}"
api_url = "{api}"
proxy_api_url = "{proxy_api}"

[audit]
checkpoint_interval_seconds = 0.5

[login]
issuer = "{issuer}"
client_id = "ztlab-hub"
session_max_age_seconds = {session_max_age}
auth_refresh_age_seconds = 1
totp_max_failures = 3
allowed_networks = ["127.0.0.1/32"]

[groups]
ml-trainers = ["trainer"]
model-approvers = ["approver"]
data-stewards = ["data-steward"]
viewers = ["viewer"]
ztlab-admins = ["admin"]
{groups}
[secrets]
oidc_client_secret = {{ file = "{secret_file}" }}

[models]
enabled = {"true" if models else "false"}
mlflow_port = {free_port()}
{models_extra}

[packages]
enabled = {"true" if packages else "false"}
port = {free_port()}
devpi_port = {free_port()}
upstream = "{packages or "https://pypi.org/simple/"}"

[environments]
root = "{environments or state / "envs"}"

{extra}
"""
    )


@contextlib.contextmanager
def running_stack(
    root: Path,
    *,
    extra_config: str = "",
    extra_users: dict[str, dict[str, object]] | None = None,
    pool: str = "10.217.0.0/16",
    table: str = "ztlab_test_login",
    models: bool = False,
    models_extra: str = "",
    session_max_age: int = 8,
    extra_groups: dict[str, list[str]] | None = None,
    packages: str | None = None,
    environments: Path | None = None,
) -> Iterator[LoginStack]:
    """Start provider, tampering proxy and hub under ``root``; stop them all on exit.

    The servers' network (``[sandbox]`` pool and nftables table) is the stack's own and is
    removed afterwards. ``extra_config`` is appended right after the ``[sandbox]`` table the
    stack writes, so it may begin with more ``[sandbox]`` keys.
    """
    state = root / "state"
    hub_port, api_port, proxy_api_port = free_port(), free_port(), free_port()
    idp_port, tamper_port = free_port(), free_port()
    hub_url = f"http://127.0.0.1:{hub_port}"
    issuer = f"http://127.0.0.1:{tamper_port}"

    jwk = generate_signing_jwk("RS256")
    signing_key = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(jwk))
    idp = DevIdP(
        users={**demo_users(), **(extra_users or {})},
        clients=[
            {
                "client_id": "ztlab-hub",
                "client_secret": CLIENT_SECRET,
                "redirect_uris": [f"{hub_url}/hub/oauth_callback"],
            }
        ],
        state_dir=root / "idp",
        port=idp_port,
        issuer=issuer,
        jwks={"keys": [jwk]},
        refresh_token_ttl=3600,
    )
    proxy = TamperingProxy(
        upstream=f"http://127.0.0.1:{idp_port}",
        port=tamper_port,
        signing_key=signing_key,
        kid=str(jwk["kid"]),
    )
    proxy.start()
    idp.start()

    secret_file = root / "client-secret"
    secret_file.write_text(CLIENT_SECRET)
    secret_file.chmod(0o600)
    config = root / "ztlab.toml"
    write_config(
        config,
        state=state,
        hub=hub_url,
        api=f"http://127.0.0.1:{api_port}",
        proxy_api=f"http://127.0.0.1:{proxy_api_port}",
        issuer=issuer,
        secret_file=secret_file,
        extra=f'[sandbox]\naddress_pool = "{pool}"\nfirewall_table = "{table}"\n{extra_config}',
        models=models,
        models_extra=models_extra,
        session_max_age=session_max_age,
        extra_groups=extra_groups,
        packages=packages,
        environments=environments,
    )
    hub = HubProcess(config=config, log=root / "hub.log", health=f"{hub_url}/hub/health")
    try:
        hub.start()
        yield LoginStack(
            hub_url=hub_url,
            idp=idp,
            proxy=proxy,
            audit_log=state / "audit" / "audit.jsonl",
            state_dir=state,
            hub_log=hub.log,
            hub=hub,
        )
    finally:
        hub.stop()
        idp.stop()
        proxy.stop()
        from ztlab.hub.sandbox.netns import NetworkSegments

        state_file = state / "sandbox" / "netns.json"
        NetworkSegments(pool=pool, table=table, state_file=state_file).teardown()
    assert_catalogued(state / "audit" / "audit.jsonl")


def assert_catalogued(audit_log: Path) -> None:
    """Every record the hub wrote is in the audit-event catalogue, with its fields."""
    from ztlab.common.auditlog.events import check_event_type
    from ztlab.common.errors import AuditError

    problems = []
    if audit_log.exists():
        for line in audit_log.read_bytes().splitlines():
            record = parse_record(line)
            try:
                check_event_type(record.action, record.detail)
            except AuditError as exc:
                problems.append(f"record {record.seq}: {exc.message}")
    assert not problems, "records outside the audit-event catalogue:\n" + "\n".join(problems)


def provider_user(name: str, *groups: str, provider_mfa: bool = True) -> dict[str, object]:
    """A user of the development provider (password ``NAME-password``)."""
    return {
        "password": f"{name}-password",
        "email": f"{name}@example.org",
        "name": name,
        "groups": list(groups),
        "amr": ["pwd", "otp"] if provider_mfa else ["pwd"],
        "acr": "urn:ztlab:mfa" if provider_mfa else "urn:ztlab:pwd",
        "disabled": False,
    }


def hub_token(stack: LoginStack, user: str, *, note: str = "test") -> str:
    """A hub API token of ``user``, made after a real login."""
    session = stack.session()
    assert stack.login(session, user).status_code == 200
    xsrf = session.cookies.get("_xsrf") or ""
    response = session.post(
        f"{stack.hub_url}/hub/api/users/{user}/tokens",
        json={"note": note, "expires_in": 3600},
        headers={"X-XSRFToken": xsrf},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def spawn_server(
    stack: LoginStack, user: str, token: str, options: dict[str, object]
) -> requests.Response:
    """Ask the hub's REST API to start ``user``'s server with ``options``."""
    return requests.post(
        f"{stack.hub_url}/hub/api/users/{user}/server",
        json=options,
        headers={"Authorization": f"token {token}"},
        timeout=120,
    )


def ensure_server(stack: LoginStack, user: str, token: str) -> None:
    """``user``'s default server, started (with no options) unless it is ready."""
    model = requests.get(
        f"{stack.hub_url}/hub/api/users/{user}",
        headers={"Authorization": f"token {token}"},
        timeout=30,
    ).json()
    if (model.get("servers") or {}).get("", {}).get("ready"):
        return
    answer = spawn_server(stack, user, token, {})
    assert answer.status_code in (201, 202), answer.text
    wait_ready(stack, user, token)


def wait_ready(stack: LoginStack, user: str, token: str, timeout: float = 120) -> None:
    """Wait until ``user``'s server is ready; fail if it stops while starting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model = requests.get(
            f"{stack.hub_url}/hub/api/users/{user}",
            headers={"Authorization": f"token {token}"},
            timeout=30,
        ).json()
        server = (model.get("servers") or {}).get("")
        if server and server.get("ready"):
            return
        if not model.get("pending") and not server:
            raise AssertionError(f"{user}'s server stopped while starting: {model}")
        time.sleep(0.5)
    raise AssertionError(
        f"{user}'s server was not ready in {timeout} s:\n{stack.hub_log.read_text()[-3000:]}"
    )


def server_get(stack: LoginStack, user: str, path: str, token: str) -> requests.Response:
    """``GET /user/USER/PATH`` through the hub's public address with an API ``token``
    (redirects not followed: an answer of the enforcement point is seen as it is)."""
    return requests.get(
        f"{stack.hub_url}/user/{user}/{path}",
        headers={"Authorization": f"token {token}"},
        allow_redirects=False,
        timeout=60,
    )


def proxy_refusals(stack: LoginStack, since: int, at_least: int = 1) -> list[dict[str, Any]]:
    """The ``proxy.refused`` records from ``since`` on, as ``{"actor": ..., **detail}``
    (they are queued: wait up to 10 s for ``at_least`` of them)."""
    deadline = time.monotonic() + 10
    while True:
        found = [
            {"actor": r.actor, **r.detail} for r in stack.records("proxy.refused") if r.seq >= since
        ]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def stop_server(stack: LoginStack, user: str, token: str) -> None:
    """Stop ``user``'s server and wait until the hub says it has stopped."""
    requests.delete(
        f"{stack.hub_url}/hub/api/users/{user}/server",
        headers={"Authorization": f"token {token}"},
        timeout=60,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        model = requests.get(
            f"{stack.hub_url}/hub/api/users/{user}",
            headers={"Authorization": f"token {token}"},
            timeout=30,
        ).json()
        if not model.get("servers") and not model.get("pending"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{user}'s server did not stop")


@contextlib.contextmanager
def nvidia_nodes(*minors: int) -> Iterator[list[Path]]:
    """GPU device nodes (NVIDIA's major 195) on a machine without a GPU; removed after."""
    import stat

    made = []
    try:
        for minor in minors:
            node = Path(f"/dev/nvidia{minor}")
            if not node.exists():
                os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(195, minor))
                node.chmod(0o666)  # as the NVIDIA driver makes them: the fence is the cgroup
                made.append(node)
        yield [Path(f"/dev/nvidia{minor}") for minor in minors]
    finally:
        for node in made:
            node.unlink(missing_ok=True)


def remove_accounts(*users: str) -> None:
    """Kill the processes of the users' ``ztl-NAME`` accounts and delete the accounts."""
    for user in users:
        subprocess.run(["pkill", "-KILL", "-u", f"ztl-{user}"], check=False)
        subprocess.run(["userdel", "--remove", f"ztl-{user}"], check=False, capture_output=True)


#: Debian's chromium, driven by Playwright (make test installs it)
CHROMIUM = "/usr/bin/chromium"


@contextlib.contextmanager
def browser_page(stack: LoginStack, user: str) -> Iterator[Any]:
    """A chromium page at the provider's login form for ``user``, filled in (not sent)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "make test installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{stack.hub_url}/hub/login")
            page.get_by_role("button", name="Sign in").or_(
                page.get_by_role("link", name="Sign in")
            ).first.click()
            # the identity provider's own login page
            page.wait_for_selector("input[name=login]")
            page.fill("input[name=login]", user)
            page.fill("input[name=password]", f"{user}-password")
            yield page
        finally:
            browser.close()
