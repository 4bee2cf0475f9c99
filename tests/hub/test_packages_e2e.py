"""The package proxy and kernel environments, through real sandboxed servers.

One hub with the package proxy (devpi-server mirroring a local PEP 503 index of hand-made
wheels) and an admin-built ``base`` environment. Users install with plain ``pip`` in their
kernels; the attacks are the ones a user's code can make: a package off the list, a
version outside its range, a tampered cache, another index or address, a changed file in a
built environment.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.hub.spawner.kernel_client import KernelSession
from tests.hubstack import (
    LoginStack,
    ensure_server,
    hub_token,
    provider_user,
    remove_accounts,
    running_stack,
    stop_server,
)
from tests.package_index import SimpleIndex

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

USERS = ("pia", "pete", "vic", "ada")

ROLE_RULES = """
[roles.trainer]
packages = ["tinya<2", "tinyc", "tinyd", "tinye"]

[gpu.pools.research]
gpus = ["0"]
roles = ["trainer"]
"""

PIP = "import subprocess, sys\n"


def pip(*args: str) -> str:
    """A cell that runs pip in the kernel's interpreter and prints its output."""
    return (
        PIP + f"r = subprocess.run([sys.executable, '-m', 'pip', {', '.join(map(repr, args))}], "
        "capture_output=True, text=True)\n"
        "print(r.returncode); print(r.stdout[-3000:]); print(r.stderr[-3000:])\n"
    )


@dataclass
class PackageStack:
    stack: LoginStack
    index: SimpleIndex
    upstream: str
    envs: Path
    tokens: dict[str, str]

    def api(self, user: str, method: str, path: str, body: object = None) -> requests.Response:
        return requests.request(
            method,
            f"{self.stack.hub_url}/hub/api/ztlab{path}",
            json=body,
            headers={"Authorization": f"token {self.tokens[user]}"},
            timeout=120,
        )

    def build(self, name: str) -> dict[str, object]:
        started = self.api("ada", "POST", f"/environments/{name}/builds", {})
        assert started.status_code == 202, started.text
        return self.wait_built(name, started.json()["build"])

    def wait_built(self, name: str, build: int) -> dict[str, object]:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            state = self.api("ada", "GET", f"/environments/{name}/builds/{build}").json()
            if state["status"] != "building":
                assert state["status"] == "ready", "\n".join(state["log"])
                return dict(state)
            time.sleep(1)
        raise AssertionError(f"build {name} {build} did not end")

    def records(self, action: str, since: int = 0) -> list[dict[str, object]]:
        return self.stack.details(action, since)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PackageStack]:
    root = tmp_path_factory.mktemp("packages")
    index = SimpleIndex(root / "upstream")
    for name, version in [("tinya", "1.0"), ("tinya", "2.0"), ("tinyb", "0.1")]:
        index.add(name, version)
    index.add("tinyc", "1.0", payload=b"c" * 50_000)
    index.add("tinyd", "3.0")
    index.add("tinyd", "3.1")
    index.add("tinye", "0.5")
    # envs must be readable by the users' accounts (pytest's folders are 0700)
    envs = Path(tempfile.mkdtemp(prefix="ztlab-envs-", dir="/tmp"))
    envs.chmod(0o755)
    remove_accounts(*USERS)
    try:
        with (
            index.serve() as upstream,
            running_stack(
                root,
                extra_config=ROLE_RULES,
                extra_users={
                    "pia": provider_user("pia", "ml-trainers"),
                    "pete": provider_user("pete", "ml-trainers"),
                    "vic": provider_user("vic", "viewers"),
                    "ada": provider_user("ada", "ztlab-admins"),
                },
                pool="10.230.0.0/16",
                table="ztlab_test_packages",
                packages=upstream,
                environments=envs,
            ) as stack,
        ):
            tokens = {user: hub_token(stack, user) for user in USERS}
            stack_ = PackageStack(stack, index, upstream, envs, tokens)
            # a new hub builds base on its own (as the control plane)
            stack_.wait_built("base", 1)
            yield stack_
            for user in USERS:
                stop_server(stack, user, tokens[user])
    finally:
        remove_accounts(*USERS)
        shutil.rmtree(envs, ignore_errors=True)


def _server(packages: PackageStack, user: str) -> None:
    """``user``'s server, started unless it runs."""
    ensure_server(packages.stack, user, packages.tokens[user])


def _kernel(packages: PackageStack, user: str, kernel: str | None = None) -> KernelSession:
    return KernelSession(packages.stack.hub_url, user, packages.tokens[user], kernel)


def test_allowed_install_works_and_a_new_kernel_imports_it(packages: PackageStack) -> None:
    _server(packages, "pia")
    since = len(packages.stack.records())
    kernel = _kernel(packages, "pia")
    try:
        done = kernel.execute(pip("install", "tinya"), timeout=180)
    finally:
        kernel.close()
    assert done.stdout.startswith("0"), done.stdout
    fresh = _kernel(packages, "pia")
    try:
        result = fresh.execute(
            "import os, tinya\n"
            "print(tinya.VERSION, tinya.__file__, os.environ['ZTLAB_ENVIRONMENT'])"
        )
    finally:
        fresh.close()
    version, path, environment = result.stdout.split()
    # 2.0 is outside the trainer's range "tinya<2": pip took the newest allowed version,
    # into the user's own layer on top of the read-only environment
    assert version == "1.0"
    assert "/.local/share/ztlab/layers/base/" in path
    assert environment == "base"
    served = packages.records("package.served", since)
    assert [(r["actor"], r["project"], r["version"]) for r in served] == [("pia", "tinya", "1.0")]
    wheel = packages.index.root / "tinya" / "tinya-1.0-py3-none-any.whl"
    import hashlib

    assert served[0]["sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert served[0]["rule"] == "tinya<2 (role trainer)"


def test_a_clusters_workers_run_in_the_kernels_environment_with_the_users_layer(
    packages: PackageStack,
) -> None:
    _server(packages, "pia")
    kernel = _kernel(packages, "pia")
    try:
        installed = kernel.execute(pip("install", "tinya"), timeout=180)
        assert installed.stdout.startswith("0"), installed.stdout
        result = kernel.execute(
            "import ztlab.pools\n"
            "client = ztlab.pools.cluster('research', workers=1, timeout=90)\n"
            "def probe():\n"
            "    import os, tinya\n"
            "    return [tinya.VERSION, os.environ.get('ZTLAB_ENVIRONMENT'), tinya.__file__]\n"
            "print('WORKER', *client.submit(probe).result())\n"
            "ztlab.pools.stop(client)\n",
            timeout=180,
        )
    finally:
        kernel.close()
    assert "WORKER" in result.stdout, result.stdout + result.stderr
    version, environment, path = result.stdout.split("WORKER", 1)[1].split()[:3]
    # what pia installed in her layer of base, seen by her cluster's worker
    assert (version, environment) == ("1.0", "base")
    assert "/.local/share/ztlab/layers/base/" in path


def test_a_package_off_the_list_is_refused_with_the_rule(packages: PackageStack) -> None:
    _server(packages, "pia")
    since = len(packages.stack.records())
    kernel = _kernel(packages, "pia")
    try:
        off_list = kernel.execute(pip("install", "tinyb"), timeout=180)
        out_of_range = kernel.execute(pip("install", "tinya==2.0"), timeout=180)
    finally:
        kernel.close()
    assert not off_list.stdout.startswith("0")
    assert "tinyb is not on the package allowlist of your roles" in off_list.stdout
    assert 'ztlab packages request tinyb --reason "what it is for"' in off_list.stdout
    assert not out_of_range.stdout.startswith("0")
    assert "tinya 2.0 is outside the allowed versions: tinya below 2 (role trainer)" in (
        out_of_range.stdout
    )
    refused = packages.records("package.refused", since)
    assert {(r["actor"], r["project"], r["version"]) for r in refused} == {
        ("pia", "tinyb", "0.1"),
        ("pia", "tinya", "2.0"),
    }
    assert not packages.records("package.served", since)


def test_a_tampered_cache_is_refused(packages: PackageStack) -> None:
    _server(packages, "pete")
    kernel = _kernel(packages, "pete")
    try:
        first = kernel.execute(pip("install", "--no-cache-dir", "tinyc"), timeout=180)
        assert first.stdout.startswith("0"), first.stdout
        cached = next((packages.stack.state_dir / "packages" / "devpi").rglob("tinyc-1.0-*.whl"))
        data = bytearray(cached.read_bytes())
        data[-100] ^= 0xFF  # one flipped byte in the mirror's copy
        cached.write_bytes(bytes(data))
        since = len(packages.stack.records())
        again = kernel.execute(
            pip("install", "--no-cache-dir", "--force-reinstall", "tinyc"), timeout=180
        )
    finally:
        kernel.close()
    assert not again.stdout.startswith("0")
    assert "tinyc-1.0-py3-none-any.whl differs from the index" in again.stdout
    refused = packages.records("package.refused", since)
    assert refused
    assert refused[0]["expected"] != refused[0]["sha256"]
    assert not packages.records("package.served", since)


def test_no_other_index_or_address_is_reachable(packages: PackageStack) -> None:
    _server(packages, "pete")
    config, segments = packages.stack.config(), packages.stack.segments()
    netns = segments.get("pete")
    assert netns is not None
    upstream_port = int(packages.upstream.rsplit(":", 1)[1].strip("/"))
    targets = [
        (segments.service_ip, config.packages.devpi_port),  # the mirror itself
        (netns.host_ip, config.packages.devpi_port),
        ("127.0.0.1", config.packages.devpi_port),
        (segments.service_ip, upstream_port),  # the upstream index
        ("127.0.0.1", upstream_port),
        ("151.101.0.223", 443),  # pypi.org
    ]
    code = (
        "import socket\n"
        f"for host, port in {targets!r}:\n"
        "    s = socket.socket(); s.settimeout(3)\n"
        "    try:\n"
        "        s.connect((host, port)); print('OPEN', host, port)\n"
        "    except OSError as e:\n"
        "        print('closed', host, port)\n"
        "    finally:\n"
        "        s.close()\n"
    )
    kernel = _kernel(packages, "pete")
    try:
        result = kernel.execute(code, timeout=60)
        other = kernel.execute(
            pip("install", "--no-cache-dir", "--index-url", packages.upstream, "tinyb"),
            timeout=180,
        )
    finally:
        kernel.close()
    assert "OPEN" not in result.stdout, result.stdout
    assert result.stdout.count("closed") == len(targets)
    assert not other.stdout.startswith("0")


def test_the_gateway_refuses_a_caller_it_does_not_know(packages: PackageStack) -> None:
    """Not a sandbox's address (a process on the host), or a made-up build token."""
    config, segments = packages.stack.config(), packages.stack.segments()
    url = f"http://{segments.service_ip}:{config.packages.port}/files/tinyc/"
    wheel = url + "tinyc-1.0-py3-none-any.whl"
    session = requests.Session()
    session.trust_env = False
    for auth in (None, ("build", "made-up-token")):
        answer = session.get(wheel, auth=auth, timeout=30)
        assert answer.status_code == 403
        assert "not a user's server known to the package proxy" in answer.text
        assert b"PK" not in answer.content[:2]


def test_an_approved_request_makes_the_next_install_work(packages: PackageStack) -> None:
    _server(packages, "pete")
    kernel = _kernel(packages, "pete")
    try:
        refused = kernel.execute(pip("install", "tinyb"), timeout=180)
        assert not refused.stdout.startswith("0")
        asked = kernel.execute(
            "import subprocess, shutil\n"
            "r = subprocess.run(['ztlab', 'packages', 'request', 'tinyb', '--reason', "
            "'tokenizer experiments'], capture_output=True, text=True)\n"
            "print(r.returncode, r.stdout, r.stderr)\n",
            timeout=60,
        )
        assert asked.stdout.startswith("0 request "), asked.stdout
        request_id = int(asked.stdout.split()[2])
        # the asker cannot approve their own request
        own = packages.api(
            "pete", "POST", f"/packages/requests/{request_id}", {"decision": "approve"}
        )
        assert own.status_code == 403
        approved = packages.api(
            "ada", "POST", f"/packages/requests/{request_id}", {"decision": "approve"}
        )
        assert approved.status_code == 200, approved.text
        assert approved.json()["scope"] == "user:pete"
        works = kernel.execute(pip("install", "tinyb"), timeout=180)
    finally:
        kernel.close()
    assert works.stdout.startswith("0"), works.stdout
    decided = packages.records("package.request_decided")
    assert decided[-1]["actor"] == "ada"
    assert decided[-1]["user"] == "pete"
    # the approval is pete's, not every trainer's
    rules = packages.api("pia", "GET", "/packages/rules").json()["rules"]
    assert all(r["requirement"] != "tinyb" for r in rules)


def test_uv_installs_into_the_layer_from_a_terminal_environment(packages: PackageStack) -> None:
    _server(packages, "pia")
    kernel = _kernel(packages, "pia")
    try:
        done = kernel.execute(
            "import os, subprocess\n"
            "r = subprocess.run(['uv', 'pip', 'install', 'tinye'], capture_output=True, "
            "text=True, env={**os.environ, 'PATH': os.environ['PATH']})\n"
            "print(r.returncode, r.stderr[-2000:])\n",
            timeout=180,
        )
    finally:
        kernel.close()
    assert done.stdout.startswith("0"), done.stdout
    fresh = _kernel(packages, "pia")
    try:
        imported = fresh.execute("import tinye; print(tinye.VERSION)")
    finally:
        fresh.close()
    assert imported.stdout.strip() == "0.5"


def test_pip_and_uv_in_a_terminal_install_into_the_layer(packages: PackageStack) -> None:
    """A terminal is the user's shell, with the server's environment: the layer's pip and
    the runtime's uv come first on its PATH, both pointed at the gateway."""
    import asyncio

    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    _server(packages, "pete")
    headers = {"Authorization": f"token {packages.tokens['pete']}"}
    base = f"{packages.stack.hub_url}/user/pete"
    name = requests.post(f"{base}/api/terminals", headers=headers, timeout=60).json()["name"]
    command = (
        "which pip uv; pip install tinyd 2>&1 | tail -1; uv pip install tinye 2>&1 | tail -1; "
        "echo END-OF-CHECK\r"
    )

    async def run() -> str:
        url = base.replace("http://", "ws://", 1) + f"/terminals/websocket/{name}"
        socket = await websocket_connect(HTTPRequest(url, headers=headers))
        await socket.write_message(json.dumps(["stdin", command]))
        seen = ""
        while seen.count("END-OF-CHECK") < 2:
            message = await asyncio.wait_for(socket.read_message(), 120)
            assert message is not None, seen
            kind, *data = json.loads(message)
            if kind == "stdout":
                seen += data[0]
        socket.close()
        return seen

    output = asyncio.run(run())
    assert "/.local/share/ztlab/layers/base/bin/pip" in output
    assert "/opt/ztlab/venv/bin/uv" in output or "/bin/uv" in output
    assert "Successfully installed tinyd-3.1" in output
    requests.delete(f"{base}/api/terminals/{name}", headers=headers, timeout=60)
    kernel = _kernel(packages, "pete")
    try:
        seen = kernel.execute("import tinyd, tinye; print(tinyd.VERSION, tinye.VERSION)")
    finally:
        kernel.close()
    assert seen.stdout.split() == ["3.1", "0.5"]


def test_an_environment_is_a_kernel_only_for_users_the_policy_allows(
    packages: PackageStack,
) -> None:
    index = packages.index
    defined = packages.api(
        "ada",
        "POST",
        "/environments",
        {"name": "small", "requirements": "tinyd==3.1\n", "description": "a test"},
    )
    assert defined.status_code == 201, defined.text
    refused = packages.api(
        "pia", "POST", "/environments", {"name": "mine", "requirements": "tinyd\n"}
    )
    assert refused.status_code == 403
    built = packages.build("small")
    assert str(built["digest"]).startswith("sha256:")
    assert index  # the mirror served the build's wheel through the gateway
    shown = packages.api("ada", "GET", "/environments/small").json()
    assert shown["lock"]["distributions"]["tinyd"] == "3.1"
    assert shown["lock"]["digest"] == built["digest"]

    for user in ("pia", "vic"):
        stop_server(packages.stack, user, packages.tokens[user])
        _server(packages, user)
    specs = {}
    for user in ("pia", "vic"):
        answer = requests.get(
            f"{packages.stack.hub_url}/user/{user}/api/kernelspecs",
            headers={"Authorization": f"token {packages.tokens[user]}"},
            timeout=60,
        )
        specs[user] = set(answer.json()["kernelspecs"])
    assert specs["pia"] == {"ztlab-env-base", "ztlab-env-small"}
    assert specs["vic"] == {"ztlab-env-base"}
    kernel = _kernel(packages, "pia", "ztlab-env-small")
    try:
        used = kernel.execute(
            "import os, tinyd; print(tinyd.VERSION, os.environ['ZTLAB_ENVIRONMENT_DIGEST'])"
        )
    finally:
        kernel.close()
    assert used.stdout.split() == ["3.1", built["digest"]]
    # the folder is not even there for a user the policy does not allow
    kernel = _kernel(packages, "vic")
    try:
        seen = kernel.execute(f"import os; print(os.path.exists({str(built['path'])!r}))")
    finally:
        kernel.close()
    assert seen.stdout.strip() == "False"


def test_a_changed_file_in_a_built_environment_is_detected(packages: PackageStack) -> None:
    current = packages.api("ada", "GET", "/environments/small").json()["current"]
    assert packages.api("ada", "POST", "/environments/small/verify").json()["ok"] is True
    target = next(Path(current["path"]).rglob("tinyd/__init__.py"))
    original = target.read_bytes()
    target.write_bytes(original.replace(b"3.1", b"6.6"))
    since = len(packages.stack.records())
    try:
        answer = packages.api("ada", "POST", "/environments/small/verify").json()
    finally:
        target.write_bytes(original)
    assert answer["ok"] is False
    assert any("modified" in p and p.endswith("tinyd/__init__.py") for p in answer["problems"])
    verified = packages.records("environment.verified", since)
    assert verified
    assert verified[0]["ok"] is False
    # a viewer may not verify (nor build, nor retire)
    assert packages.api("vic", "POST", "/environments/small/verify").status_code == 403


def test_a_layer_package_that_replaces_the_environments_is_named(
    packages: PackageStack,
) -> None:
    _server(packages, "pia")
    kernel = _kernel(packages, "pia", "ztlab-env-small")
    try:
        done = kernel.execute(pip("install", "tinyd==3.0"), timeout=180)
    finally:
        kernel.close()
    assert done.stdout.startswith("0"), done.stdout
    fresh = _kernel(packages, "pia", "ztlab-env-small")
    try:
        first = fresh.execute("import tinyd; print(tinyd.VERSION)")
        removed = fresh.execute(pip("uninstall", "-y", "tinyd"), timeout=120)
    finally:
        fresh.close()
    assert removed.stdout.startswith("0"), removed.stdout
    assert first.stdout.strip() == "3.0"  # the user's layer comes first
    assert "ztlab: tinyd 3.0 in your layer" in first.stderr
    advice = (
        "replaces tinyd 3.1 of environment small; to use the environment's: pip uninstall tinyd"
    )
    assert advice in first.stderr


def test_the_admin_commands_work_against_the_hub(packages: PackageStack, tmp_path: Path) -> None:
    import subprocess
    import sys

    token = tmp_path / "ada.token"
    token.write_text(packages.tokens["ada"])
    ztlab = [str(Path(sys.executable).with_name("ztlab"))]
    hub = ["--hub-url", f"{packages.stack.hub_url}/hub/api", "--token-file", str(token)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*ztlab, *args, *hub], capture_output=True, text=True, timeout=120, check=False
        )

    listed = run("env", "list")
    assert listed.returncode == 0, listed.stderr
    assert "base" in listed.stdout
    assert "gpu              not built" in listed.stdout
    verified = run("env", "verify", "small")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "matches its lock sha256:" in verified.stdout
    shown = run("env", "show", "small", "--packages")
    assert "tinyd==3.1" in shown.stdout
    bad = tmp_path / "bad.txt"
    bad.write_text("tinyd\n--index-url http://elsewhere/simple/\n")
    refused = run("env", "create", "bad", "-r", str(bad))
    assert refused.returncode == 2
    assert "requirements line 2" in refused.stderr
    assert "pip options are not allowed" in refused.stderr
    missing = tmp_path / "missing.txt"
    missing.write_text("tinyz==1.0\n")
    assert run("env", "create", "broken", "-r", str(missing)).returncode == 0
    failed = run("env", "build", "broken")
    assert failed.returncode == 1
    assert "No matching distribution found for tinyz==1.0" in failed.stderr
    requests_ = run("packages", "requests")
    assert requests_.returncode == 0
    assert "tinyb" in requests_.stdout


def test_a_retired_environment_keeps_running_kernels(packages: PackageStack) -> None:
    _server(packages, "pia")
    kernel = _kernel(packages, "pia", "ztlab-env-small")
    try:
        retired = packages.api("ada", "POST", "/environments/small/retire")
        assert retired.status_code == 200
        still = kernel.execute("import tinyd; print(tinyd.VERSION)")
        assert still.stdout.strip() == "3.1"
    finally:
        kernel.close()
    stop_server(packages.stack, "pia", packages.tokens["pia"])
    _server(packages, "pia")
    answer = requests.get(
        f"{packages.stack.hub_url}/user/pia/api/kernelspecs",
        headers={"Authorization": f"token {packages.tokens['pia']}"},
        timeout=60,
    )
    assert set(answer.json()["kernelspecs"]) == {"ztlab-env-base"}
    listed = {
        e["name"]: e for e in packages.api("ada", "GET", "/environments").json()["environments"]
    }
    assert listed["small"]["retired"] is True
    json.dumps(listed)


def test_installs_work_offline_from_the_mirrors_cache(packages: PackageStack) -> None:
    """Last in the module: the upstream goes away."""
    packages.index.stop()
    _server(packages, "pete")
    kernel = _kernel(packages, "pete")
    try:
        again = kernel.execute(
            pip("install", "--no-cache-dir", "--force-reinstall", "tinye"), timeout=180
        )
    finally:
        kernel.close()
    assert again.stdout.startswith("0"), again.stdout
