"""The enforcement point in front of every server, attacked through the real hub.

Two trainers (una, otto) run sandboxed servers behind Traefik. una first writes every
configuration source a user can write (Jupyter config in ``~/.jupyter`` and in the working
directory, ``~/.local/share/jupyter``, the Python user site with a ``.pth`` file and
``usercustomize``, ``sitecustomize``, shell start-up files exporting ``PYTHONPATH``) and
restarts her server. Then, each refused at the enforcement point and audited as
``proxy.refused``:

- a request without credentials, HTTP and WebSocket;
- another user's token, and another user's session cookie;
- a token without ``access:servers`` for the server; an expired token;
- a session past the hub session's maximum age, a tampered session, a signed-out one;
- with the server replaced by another listener, none of the above reaches it.

And: each configuration source, by name, changed nothing the server loads (the server runs
as the control plane configured it), and when a server process exits its sandbox ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from tests.hub.spawner.kernel_client import KernelSession
from tests.hubstack import (
    LoginStack,
    hub_token,
    provider_user,
    proxy_refusals,
    remove_accounts,
    running_stack,
    server_get,
    spawn_server,
    stop_server,
    wait_ready,
)
from ztlab.hub.identity import DATA_SCOPE
from ztlab.hub.spawner.serverenv import CONFIG_DIR

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

USERS = ("una", "otto")
POOL = "10.227.0.0/24"
TABLE = "ztlab_test_enforce"
SERVER_PORT = 8888
SESSION_MAX_AGE = 20

_SITE = f".local/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"


def _marker(name: str) -> str:
    """Python that leaves ``~/ztlab-loaded-NAME-PID`` holding the loading process's argv."""
    return (
        "import os, sys, json; "
        f"open(os.path.expanduser('~/ztlab-loaded-{name}-%d' % os.getpid()), 'w')"
        ".write(json.dumps(sys.argv))\n"
    )


def _header_config(value: str) -> str:
    return json.dumps(
        {
            "ServerApp": {
                "allow_unauthenticated_access": True,
                "tornado_settings": {"headers": {"X-Ztlab-Test-Loaded": value}},
            }
        }
    )


#: every configuration source a user can write: name -> (file under $HOME, content)
SOURCES: dict[str, tuple[str, str]] = {
    "jupyter_server_config.py in ~/.jupyter": (
        ".jupyter/jupyter_server_config.py",
        _marker("server-config-py")
        + "c.ServerApp.allow_unauthenticated_access = True\n"
        + "c.ServerApp.tornado_settings = {'headers': {'X-Ztlab-Test-Loaded': 'py'}}\n",
    ),
    "jupyter_server_config.json in ~/.jupyter": (
        ".jupyter/jupyter_server_config.json",
        _header_config("json"),
    ),
    "jupyter_server_config.d/*.json in ~/.jupyter": (
        ".jupyter/jupyter_server_config.d/ztlab-test.json",
        _header_config("config.d"),
    ),
    "jupyter_config.py in ~/.jupyter": (".jupyter/jupyter_config.py", _marker("jupyter-config")),
    "jupyter_notebook_config.py in ~/.jupyter": (
        ".jupyter/jupyter_notebook_config.py",
        _marker("notebook-config"),
    ),
    "jupyter_server_config.py in the working directory": (
        "jupyter_server_config.py",
        _marker("cwd-config"),
    ),
    "a kernelspec in ~/.local/share/jupyter": (
        ".local/share/jupyter/kernels/ztlab-test-evil/kernel.json",
        json.dumps({"argv": ["python3", "-c", "pass"], "display_name": "E", "language": "py"}),
    ),
    "a labextension in ~/.local/share/jupyter": (
        ".local/share/jupyter/labextensions/ztlab-test-evil/package.json",
        json.dumps({"name": "ztlab-test-evil", "version": "1.0.0", "jupyterlab": {}}),
    ),
    "a .pth file in the Python user site": (f"{_SITE}/ztlab-test.pth", _marker("pth")),
    "usercustomize.py in the Python user site": (
        f"{_SITE}/usercustomize.py",
        _marker("usercustomize"),
    ),
    "sitecustomize.py in the home directory": ("sitecustomize.py", _marker("sitecustomize")),
    "sitecustomize.py on a PYTHONPATH exported by shell start-up files": (
        "evil/sitecustomize.py",
        _marker("pythonpath"),
    ),
    "shell start-up files (~/.profile, ~/.bashrc)": (
        ".profile",
        "touch ~/ztlab-loaded-profile-0\nexport PYTHONPATH=$HOME/evil\n"
        "export JUPYTER_CONFIG_DIR=$HOME/.jupyter\n",
    ),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoginStack]:
    root = tmp_path_factory.mktemp("enforce-stack")
    users = {name: provider_user(name, "ml-trainers") for name in USERS}
    with running_stack(
        root,
        extra_users=users,
        pool=POOL,
        table=TABLE,
        session_max_age=SESSION_MAX_AGE,
    ) as running:
        yield running
    remove_accounts(*USERS)


@pytest.fixture(scope="module")
def tokens(stack: LoginStack) -> dict[str, str]:
    return {user: hub_token(stack, user) for user in USERS}


def _start(stack: LoginStack, user: str, token: str) -> None:
    response = spawn_server(stack, user, token, {})
    assert response.status_code in (201, 202), response.text
    wait_ready(stack, user, token)


@pytest.fixture(scope="module")
def servers(stack: LoginStack, tokens: dict[str, str]) -> dict[str, str]:
    """Both servers running; una's restarted after she wrote every configuration source."""
    for user in USERS:
        _start(stack, user, tokens[user])
    stop_server(stack, "una", tokens["una"])
    entry = pwd.getpwnam("ztl-una")
    home = Path(entry.pw_dir)
    for relative, content in SOURCES.values():
        path = home / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    (home / ".bashrc").write_text((home / ".profile").read_text())
    (home / "secret.csv").write_text("person,income\n1,52000\n" * 100)
    subprocess.run(["chown", "-R", f"{entry.pw_uid}:{entry.pw_gid}", str(home)], check=True)
    _start(stack, "una", tokens["una"])
    return tokens


def _server_process(user: str) -> int:
    uid = pwd.getpwnam(f"ztl-{user}").pw_uid
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if proc.stat().st_uid != uid:
                continue
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if Path(argv[0].decode()).name.startswith("python") and b"jupyterhub.singleuser" in argv:
            return int(proc.name)
    raise AssertionError(f"no server process of {user}")


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


# -- no credentials ---------------------------------------------------------------------------


def test_no_credentials_http_is_refused_and_audited(
    stack: LoginStack, servers: dict[str, str]
) -> None:
    since = stack.audit_size()
    base = f"{stack.hub_url}/user/una"
    for path in ("files/secret.csv", "api/contents/secret.csv", "api/status", "lab"):
        answer = requests.get(f"{base}/{path}", allow_redirects=False, timeout=30)
        assert answer.status_code == 401, (path, answer.status_code, answer.text[:200])
        assert answer.json()["message"] == "Sign in to the hub first."
        assert "person" not in answer.text
    # a browser is sent to sign in, on the hub's public address
    page = requests.get(
        f"{base}/files/secret.csv",
        headers={"Accept": "text/html"},
        allow_redirects=False,
        timeout=30,
    )
    assert page.status_code == 302
    assert page.headers["Location"].startswith(
        f"{stack.hub_url}/hub/ztlab/enforce/session?next=%2Fuser%2Funa%2Ffiles%2Fsecret.csv"
    )
    refused = proxy_refusals(stack, since, at_least=5)
    assert {(r["actor"], r["route"], r["reason"]) for r in refused} >= {
        ("anonymous", "files", "anonymous"),
        ("anonymous", "other", "anonymous"),
    }
    assert all(r["server"] == "una" for r in refused)


def _kernel_ws(stack: LoginStack, user: str, kernel_id: str, headers: dict[str, str]) -> int:
    """The status a WebSocket handshake to ``user``'s kernel gets (101: connected)."""

    async def connect() -> int:
        url = f"{stack.hub_url}/user/{user}/api/kernels/{kernel_id}/channels".replace(
            "http://", "ws://", 1
        )
        try:
            conn = await websocket_connect(HTTPRequest(url, headers=headers))
        except HTTPClientError as exc:
            return exc.code
        conn.close()
        return 101

    return asyncio.run(connect())


def test_websockets_need_the_owners_credentials(stack: LoginStack, servers: dict[str, str]) -> None:
    kernel = KernelSession(stack.hub_url, "una", servers["una"])
    try:
        since = stack.audit_size()
        assert _kernel_ws(stack, "una", kernel.kernel_id, {}) == 401
        other = {"Authorization": f"token {servers['otto']}"}
        assert _kernel_ws(stack, "una", kernel.kernel_id, other) == 403
        own = {"Authorization": f"token {servers['una']}"}
        assert _kernel_ws(stack, "una", kernel.kernel_id, own) == 101
        refused = proxy_refusals(stack, since, at_least=2)
        assert {(r["actor"], r["route"]) for r in refused} == {
            ("anonymous", "kernels"),
            ("otto", "kernels"),
        }
    finally:
        kernel.close()


def test_the_access_log_keeps_no_credential(stack: LoginStack, servers: dict[str, str]) -> None:
    """A token in the query counts only for a browser's WebSocket (as JupyterHub's servers
    accept it); Traefik's access log (the egress accounting's input) holds neither such a
    token nor one from a header, and only the hub may read it."""
    token = servers["una"]
    url = f"{stack.hub_url}/user/una/api/status?token={token}"
    refused = requests.get(url, timeout=30)
    assert refused.status_code == 401
    assert refused.headers["X-Ztlab-Decision"] == "sign-in"
    answer = requests.get(url, headers={"Sec-Fetch-Mode": "websocket"}, timeout=30)
    assert answer.status_code == 200
    answer = server_get(stack, "una", "api/status", token)
    assert answer.status_code == 200
    log = stack.state_dir / "hub" / "proxy-access.log"
    deadline = time.monotonic() + 10
    while log.read_text().count('"request_X-Ztlab-Server":"una"') < 2:
        assert time.monotonic() < deadline, "the requests were not logged"
        time.sleep(0.1)
    assert token not in log.read_text()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


# -- other users, scopes, expiry --------------------------------------------------------------


def test_another_users_token_is_refused(stack: LoginStack, servers: dict[str, str]) -> None:
    since = stack.audit_size()
    answer = server_get(stack, "una", "files/secret.csv", servers["otto"])
    assert answer.status_code == 403
    # the hub's scopes refuse it first (otto's token holds access:servers!user=otto only)
    assert "lacks the access:servers scope" in answer.json()["message"]
    [refusal] = proxy_refusals(stack, since)
    assert (refusal["actor"], refusal["reason"]) == ("otto", "token-scope")
    # the same token reaches its own server
    own = server_get(stack, "otto", "api/status", servers["otto"])
    assert own.status_code == 200


def _browser_session(stack: LoginStack, user: str) -> requests.Session:
    """A signed-in session that went through the enforcement point to ``user``'s server."""
    session = stack.session()
    assert stack.login(session, user).status_code == 200
    answer = session.get(
        f"{stack.hub_url}/user/{user}/lab", headers={"Accept": "text/html"}, timeout=60
    )
    assert answer.status_code == 200, answer.text[:300]
    assert answer.url.startswith(f"{stack.hub_url}/user/{user}/lab")
    assert session.cookies.get("ztlab-session", path=f"/user/{user}/")
    return session


def test_another_users_session_cookie_is_refused(
    stack: LoginStack, servers: dict[str, str]
) -> None:
    otto = _browser_session(stack, "otto")
    value = otto.cookies.get("ztlab-session", path="/user/otto/")
    since = stack.audit_size()
    # the browser never sends it to una's path; sent there on purpose, it is refused
    answer = requests.get(
        f"{stack.hub_url}/user/una/api/contents/secret.csv",
        cookies={"ztlab-session": value},
        timeout=30,
    )
    assert answer.status_code == 403
    # nor do the hub's own cookies open a server
    hub_cookies = {c.name: c.value for c in otto.cookies if c.name != "ztlab-session"}
    answer = requests.get(f"{stack.hub_url}/user/una/api/status", cookies=hub_cookies, timeout=30)
    assert answer.status_code == 401
    refused = proxy_refusals(stack, since, at_least=2)
    assert ("otto", "policy: own-server-use-only") in {(r["actor"], r["reason"]) for r in refused}


def _scoped_token(stack: LoginStack, user: str, **body: object) -> str:
    session = stack.session()
    assert stack.login(session, user).status_code == 200
    response = session.post(
        f"{stack.hub_url}/hub/api/users/{user}/tokens",
        json={"note": "scoped", **body},
        headers={"X-XSRFToken": session.cookies.get("_xsrf") or ""},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def test_a_token_without_access_servers_is_refused(
    stack: LoginStack, servers: dict[str, str]
) -> None:
    token = _scoped_token(stack, "una", scopes=[DATA_SCOPE], expires_in=600)
    since = stack.audit_size()
    answer = server_get(stack, "una", "api/status", token)
    assert answer.status_code == 403
    assert "lacks the access:servers scope" in answer.json()["message"]
    [refusal] = proxy_refusals(stack, since)
    assert (refusal["actor"], refusal["reason"]) == ("una", "token-scope")


def test_an_expired_token_is_refused(stack: LoginStack, servers: dict[str, str]) -> None:
    token = _scoped_token(stack, "una", expires_in=1)
    time.sleep(2.5)
    since = stack.audit_size()
    answer = server_get(stack, "una", "api/status", token)
    assert answer.status_code == 401
    [refusal] = proxy_refusals(stack, since)
    assert refusal["reason"] in ("expired-token", "bad-token")


def test_sessions_end_with_age_sign_out_and_tampering(
    stack: LoginStack, servers: dict[str, str]
) -> None:
    url = f"{stack.hub_url}/user/una/api/status"
    session = _browser_session(stack, "una")
    value = session.cookies.get("ztlab-session", path="/user/una/")
    # a flipped byte in the signed value
    flipped = value[:-3] + ("A" if value[-3] != "A" else "B") + value[-2:]
    since = stack.audit_size()
    assert requests.get(url, cookies={"ztlab-session": flipped}, timeout=30).status_code == 401
    assert proxy_refusals(stack, since)[0]["reason"] == "session-expired"
    # past the hub session's maximum age: the browser is sent to sign in again
    time.sleep(SESSION_MAX_AGE + 1)
    since = stack.audit_size()
    again = requests.get(
        url,
        cookies={"ztlab-session": value},
        headers={"Accept": "text/html"},
        allow_redirects=False,
        timeout=30,
    )
    assert again.status_code == 302
    assert "/hub/ztlab/enforce/session?next=" in again.headers["Location"]
    assert proxy_refusals(stack, since)[0]["reason"] == "session-max-age"
    # signed out: the hub's cookie id rotates and the session is over at once
    fresh = _browser_session(stack, "una")
    value = fresh.cookies.get("ztlab-session", path="/user/una/")
    fresh.get(f"{stack.hub_url}/hub/logout", timeout=30)
    time.sleep(5.5)  # past the decision cache
    since = stack.audit_size()
    assert requests.get(url, cookies={"ztlab-session": value}, timeout=30).status_code == 401
    assert proxy_refusals(stack, since)[0]["reason"] == "session-ended"


# -- what the server loads --------------------------------------------------------------------


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_a_user_written_configuration_source_changes_nothing(
    stack: LoginStack, servers: dict[str, str], source: str
) -> None:
    home = Path(pwd.getpwnam("ztl-una").pw_dir)
    relative, content = SOURCES[source]
    assert (home / relative).read_text() == content, "the source is in place"
    # nothing the server process ran left a marker
    loaded = {
        marker.name: marker.read_text()
        for marker in home.glob("ztlab-loaded-*")
        if "singleuser" in marker.read_text() or "profile" in marker.name
    }
    assert loaded == {}
    headers = {"Authorization": f"token {servers['una']}"}
    status = requests.get(f"{stack.hub_url}/user/una/api/status", headers=headers, timeout=30)
    assert status.status_code == 200
    assert "X-Ztlab-Test-Loaded" not in status.headers
    specs = requests.get(f"{stack.hub_url}/user/una/api/kernelspecs", headers=headers, timeout=30)
    assert "ztlab-test-evil" not in specs.json()["kernelspecs"]
    lab = requests.get(f"{stack.hub_url}/user/una/lab", headers=headers, timeout=60)
    assert lab.status_code == 200
    assert "ztlab-test-evil" not in lab.text
    # the process runs as the control plane configured it
    pid = _server_process("una")
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[1:4] == [b"-I", b"-m", b"jupyterhub.singleuser"]
    env = _environ(pid)
    assert env["JUPYTER_CONFIG_DIR"] == str(Path(sys.prefix) / CONFIG_DIR)
    assert "PYTHONPATH" not in env
    assert env["JUPYTERHUB_DISABLE_USER_CONFIG"] == "1"


def test_the_payloads_work_where_they_are_not_ignored(servers: dict[str, str]) -> None:
    """The control for the test above: without the control plane's settings the same files
    are read (so a server that read them would have been changed).

    Jupyter's own defaults point into una's home; the Debian Python (whose user site is on,
    unlike the venv's) runs the ``.pth`` file and ``usercustomize`` from it.
    """
    entry = pwd.getpwnam("ztl-una")
    home = Path(entry.pw_dir)
    as_una = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    paths = subprocess.run(
        [*as_una, sys.executable, "-c",
         "import jupyter_core.paths as p; print(p.jupyter_config_dir()); "
         "print(p.jupyter_data_dir())"],
        cwd=home, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert paths == [str(home / ".jupyter"), str(home / ".local/share/jupyter")]
    system_python = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system_python.exists():
        pytest.skip(f"needs {system_python} (the user site's Python version)")
    subprocess.run([*as_una, str(system_python), "-c", "pass"], cwd=home, env=env, check=True)
    names = {marker.name.rsplit("-", 1)[0] for marker in home.glob("ztlab-loaded-*")}
    assert {"ztlab-loaded-pth", "ztlab-loaded-usercustomize"} <= names


def test_the_server_still_checks_credentials_itself(
    stack: LoginStack, servers: dict[str, str]
) -> None:
    """The second line: a request that reached the server without the hub's credentials
    (here straight from the proxy's host, with the proxy's client certificate) is refused
    by the server too, although una's config asked it to allow unauthenticated access."""
    netns = stack.segments().get("una")
    assert netns is not None
    certs = stack.state_dir / "hub" / "internal-ssl"
    client = certs / "proxy-client"
    answer = requests.get(
        f"https://{netns.sandbox_ip}:{SERVER_PORT}/user/una/api/contents/secret.csv",
        cert=(str(client / "proxy-client.crt"), str(client / "proxy-client.key")),
        verify=str(certs / "proxy-client-ca_trust.crt"),
        allow_redirects=False,
        timeout=30,
    )
    assert answer.status_code in (302, 403), answer.status_code
    assert "person" not in answer.text


# -- a replaced server, and a server that exits ------------------------------------------------


def _listening(address: tuple[str, int]) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(address) == 0


_IMPOSTER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen()
n = 0
while True:
    c, _ = s.accept(); n += 1
    open(sys.argv[1], "w").write(str(n)); c.close()
"""


def test_a_replaced_server_gets_nothing_without_the_owners_credentials(
    stack: LoginStack, servers: dict[str, str]
) -> None:
    """una's server is replaced by a listener that accepts anything: requests without
    credentials, with otto's token and with otto's session never reach it; una's own do."""
    otto = _browser_session(stack, "otto")
    otto_cookie = otto.cookies.get("ztlab-session", path="/user/otto/")
    netns = stack.segments().get("una")
    assert netns is not None
    entry = pwd.getpwnam("ztl-una")
    subprocess.run(["pkill", "-KILL", "-u", "ztl-una"], check=False)
    deadline = time.monotonic() + 10
    while _listening((netns.sandbox_ip, SERVER_PORT)) and time.monotonic() < deadline:
        time.sleep(0.05)
    shared = Path(tempfile.mkdtemp(prefix="ztlab-imposter-", dir="/tmp"))
    shared.chmod(0o777)
    count = shared / "accepted"
    imposter = subprocess.Popen(
        ["ip", "netns", "exec", netns.name, "setpriv", f"--reuid={entry.pw_uid}",
         f"--regid={entry.pw_gid}", "--clear-groups", sys.executable, "-c", _IMPOSTER,
         str(count), str(SERVER_PORT)],
    )  # fmt: skip
    try:
        while not _listening((netns.sandbox_ip, SERVER_PORT)):
            assert imposter.poll() is None, "the imposter did not start"
            time.sleep(0.05)
        time.sleep(0.2)
        probes = _accepted(count)  # the test's own readiness probes
        url = f"{stack.hub_url}/user/una/files/secret.csv"
        assert requests.get(url, timeout=30).status_code == 401
        other = {"Authorization": f"token {servers['otto']}"}
        assert requests.get(url, headers=other, timeout=30).status_code == 403
        assert (
            requests.get(url, cookies={"ztlab-session": otto_cookie}, timeout=30).status_code == 403
        )
        assert _accepted(count) == probes, "a refused request reached the imposter"
        # the owner's own request is let through, and reaches whatever listens there
        own = {"Authorization": f"token {servers['una']}"}
        requests.get(url, headers=own, timeout=30)
        assert _accepted(count) > probes
    finally:
        imposter.send_signal(signal.SIGKILL)
        imposter.wait()
        subprocess.run(["rm", "-rf", str(shared)], check=False)


def _accepted(count: Path) -> int:
    return int(count.read_text() or 0) if count.exists() else 0


def test_when_the_server_process_exits_its_sandbox_ends(
    stack: LoginStack, servers: dict[str, str]
) -> None:
    """otto's kernel starts a detached listener, then kills its own server: everything in
    the sandbox ends with the server, so nothing is left to take over its address."""
    kernel = KernelSession(stack.hub_url, "otto", servers["otto"])
    netns = stack.segments().get("otto")
    assert netns is not None
    code = (
        "import os, subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import socket,time; s=socket.socket(); "
        's.bind(("0.0.0.0", 9999)); s.listen(); time.sleep(600)\'], start_new_session=True)\n'
        "time.sleep(1)\n"
        "print('ok', flush=True)\n"
    )
    assert kernel.execute(code).stdout.strip() == "ok"
    assert {9999, SERVER_PORT} <= _ports(netns.name)
    os.kill(_server_process("otto"), signal.SIGKILL)
    deadline = time.monotonic() + 10
    uid = pwd.getpwnam("ztl-otto").pw_uid
    while time.monotonic() < deadline:
        left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _owned(p, uid)]
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"processes outlived the server: {left}"
    assert _ports(netns.name) == set()


def _ports(netns: str) -> set[int]:
    """The TCP ports something listens on in a network namespace."""
    lines = subprocess.run(
        ["ip", "netns", "exec", netns, "ss", "-Hltn"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in lines if line.strip()}


def _owned(proc: Path, uid: int) -> bool:
    try:
        return proc.stat().st_uid == uid
    except OSError:
        return False
