"""Route rules and egress accounting at the enforcement point, through the real hub.

A viewer (raw files refused by the built-in rule) and a trainer (raw files up to 1 MiB in
this stack) run sandboxed servers. Raw-file routes are refused with the rule's message and
audited; notebooks still open, run and save in JupyterLab in chromium; the egress counters
on the hub's metrics match the bytes the clients really received to within 1%, and a
trainer who takes more than their role's ``egress_report`` out in a day is audited.
"""

from __future__ import annotations

import json
import pwd
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
import requests

from tests.hub.spawner.kernel_client import KernelSession
from tests.hubstack import (
    LoginStack,
    browser_page,
    hub_token,
    provider_user,
    proxy_refusals,
    remove_accounts,
    running_stack,
    server_get,
    spawn_server,
    wait_ready,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

USERS = ("vio", "tara", "ada")
M = 1024**2
VIEWER_RULE = '[roles.viewer] raw_files = "refuse"'

NOTEBOOK = {
    "cells": [
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "c1",
            "metadata": {},
            "outputs": [],
            "source": ["print('ztlab-' + 'ran')"],
        }
    ],
    "metadata": {
        "kernelspec": {
            "display_name": "Python (ztlab)",
            "language": "python",
            "name": "ztlab-secure",
        }
    },
    "nbformat": 4,
    "nbformat_minor": 5,
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoginStack]:
    root = tmp_path_factory.mktemp("rules-stack")
    users = {
        "vio": provider_user("vio", "viewers"),
        "tara": provider_user("tara", "ml-trainers"),
        "ada": provider_user("ada", "ztlab-admins"),
    }
    extra = '\n[roles.trainer]\nraw_files = "1M"\negress_report = "2M"\n'
    with running_stack(
        root,
        extra_config=extra,
        extra_users=users,
        pool="10.229.0.0/24",
        table="ztlab_test_rules",
        session_max_age=3600,
    ) as running:
        yield running
    remove_accounts(*USERS)


@pytest.fixture(scope="module")
def tokens(stack: LoginStack) -> dict[str, str]:
    tokens = {user: hub_token(stack, user) for user in USERS}
    for user in ("vio", "tara"):
        response = spawn_server(stack, user, tokens[user], {})
        assert response.status_code in (201, 202), response.text
        wait_ready(stack, user, tokens[user])
        home = Path(pwd.getpwnam(f"ztl-{user}").pw_dir)
        (home / "secret.csv").write_text("person,income\n" + "1,52000\n" * 2000)
        (home / "nb.ipynb").write_text(json.dumps(NOTEBOOK))
        (home / "big.bin").write_bytes(b"\1" * (2 * M))
        (home / "medium.csv").write_bytes(b"2" * (900 * 1024))
        (home / "alias.csv").symlink_to("big.bin")
        entry = pwd.getpwnam(f"ztl-{user}")
        subprocess.run(["chown", "-hR", f"{entry.pw_uid}:{entry.pw_gid}", str(home)], check=True)
    return tokens


def test_raw_file_routes_are_refused_with_the_rules_message(
    stack: LoginStack, tokens: dict[str, str]
) -> None:
    since = stack.audit_size()
    refused_paths = (
        "files/secret.csv",
        "files/secret.csv?download=1",
        "view/secret.csv",
        "nbconvert/html/nb.ipynb?download=true",
        "api/contents/secret.csv?type=file&format=text&content=1",
        "api/contents/nb.ipynb?type=file&format=text",
    )
    for path in refused_paths:
        answer = server_get(stack, "vio", path, tokens["vio"])
        assert answer.status_code == 403, (path, answer.status_code)
        assert VIEWER_RULE in answer.json()["message"]
        assert answer.headers["X-Ztlab-Decision"] == "refuse"
        assert "52000" not in answer.text
    records = proxy_refusals(stack, since, len(refused_paths))
    assert {(r["actor"], r["reason"]) for r in records} == {("vio", "rule: roles.viewer.raw_files")}
    # notebooks, listings and metadata still go through
    notebook = server_get(
        stack, "vio", "api/contents/nb.ipynb?type=notebook&content=1", tokens["vio"]
    )
    assert notebook.status_code == 200
    assert notebook.json()["type"] == "notebook"
    listing = server_get(stack, "vio", "api/contents?content=1", tokens["vio"])
    assert {item["name"] for item in listing.json()["content"]} >= {"secret.csv", "nb.ipynb"}
    meta = server_get(stack, "vio", "api/contents/secret.csv?content=0", tokens["vio"])
    assert meta.status_code == 200
    assert meta.json()["content"] is None


def test_a_size_rule_checks_the_file_the_server_would_send(
    stack: LoginStack, tokens: dict[str, str]
) -> None:
    token = tokens["tara"]
    assert server_get(stack, "tara", "files/secret.csv", token).status_code == 200
    assert server_get(stack, "tara", "files/medium.csv", token).status_code == 200
    since = stack.audit_size()
    big = server_get(stack, "tara", "files/big.bin", token)
    assert big.status_code == 403
    assert big.json()["message"] == (
        "big.bin is 2 MiB; your roles allow raw files up to 1 MiB (rule [roles.trainer] "
        'raw_files = "1M").'
    )
    # a link to the big file is judged by what it points to, inside the sandbox
    assert server_get(stack, "tara", "files/alias.csv", token).status_code == 403
    assert (
        server_get(stack, "tara", "api/contents/big.bin?type=file&format=base64", token).status_code
        == 403
    )
    records = proxy_refusals(stack, since, 3)
    assert {r["reason"] for r in records} == {"rule: roles.trainer.raw_files"}
    # a missing file is the server's 404, not a refusal
    assert server_get(stack, "tara", "files/nothing.csv", token).status_code == 404


def test_egress_past_the_roles_report_size_is_audited(
    stack: LoginStack, tokens: dict[str, str]
) -> None:
    since = stack.audit_size()
    for _ in range(3):  # 3 x 900 KiB passes the trainer's 2M once more today
        assert server_get(stack, "tara", "files/medium.csv", tokens["tara"]).status_code == 200
    record = stack.wait_record("proxy.egress", actor="tara", since=since, timeout=15)
    assert record.detail["server"] == "tara"
    assert record.detail["report_every"] == 2 * M
    assert record.detail["bytes_today"] >= 2 * M
    assert record.detail["routes"]["files"] >= 2 * M


def _watch(socket: Any, urls: list[str], frames: list[int]) -> None:
    urls.append(socket.url)

    def received(payload: str | bytes) -> None:
        frames.append(len(payload.encode() if isinstance(payload, str) else payload))

    socket.on("framereceived", received)


def _egress_metrics(stack: LoginStack, token: str, user: str) -> dict[str, float]:
    text = requests.get(
        f"{stack.hub_url}/hub/metrics", headers={"Authorization": f"token {token}"}, timeout=30
    ).text
    found: dict[str, float] = {}
    pattern = re.compile(r"^ztlab_proxy_egress_bytes_total\{(.*)\} (\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
        if labels["user"] == user and labels["server"] == user:
            found[labels["route"]] = float(match[2])
    return found


def test_what_a_kernel_prints_is_counted_as_kernel_egress(
    stack: LoginStack, tokens: dict[str, str]
) -> None:
    """A kernel's output leaves over its WebSocket, where Traefik's access log sees 0 bytes:
    the WebSocket counter behind the enforcement point counts it."""
    size = 3_000_000
    time.sleep(2.5)  # the earlier requests are counted (the meter polls every second)
    before = _egress_metrics(stack, tokens["ada"], "tara")
    kernel = KernelSession(stack.hub_url, "tara", tokens["tara"])
    try:
        since = stack.audit_size()
        # 15 x 200 kB in 5 s: under the server's IOPub rate limit (1 MB/s), which drops more
        code = "import time\nfor _ in range(15):\n    print('x' * 200_000, flush=True)\n"
        result = kernel.execute(code + "    time.sleep(0.35)\n", timeout=120)
        assert result.stdout == ("x" * 200_000 + "\n") * 15
    finally:
        kernel.close()
    deadline = time.monotonic() + 20
    while True:  # the connection closed: its last bytes are in the counter's log
        after = _egress_metrics(stack, tokens["ada"], "tara")
        sent = after.get("kernels", 0.0) - before.get("kernels", 0.0)
        if sent >= size or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # the output, in one iopub message (JSON, with its header) and a few status messages
    assert size <= sent <= size * 1.01, sent
    # tara passed another multiple of the trainer's 2M report size: kernel output is in it
    record = stack.wait_record("proxy.egress", actor="tara", since=since, timeout=15)
    assert record.detail["routes"]["kernels"] >= 1024**2


def test_notebooks_open_run_and_save_while_raw_files_are_refused(
    stack: LoginStack, tokens: dict[str, str]
) -> None:
    # chromium fetches the favicon outside the page's view of requests: its size, to tell
    # those fetches apart from the page's
    favicon = len(server_get(stack, "vio", "static/favicons/favicon.ico", tokens["vio"]).content)
    time.sleep(2.5)  # the earlier requests are counted (the meter polls every second)
    before = _egress_metrics(stack, tokens["ada"], "vio")
    received: list[Any] = []
    sockets: list[str] = []
    frames: list[int] = []  # the payload size of each WebSocket frame the page received
    home = Path(pwd.getpwnam("ztl-vio").pw_dir)
    with browser_page(stack, "vio") as page:
        page.on("requestfinished", lambda request: received.append(request))
        page.on("websocket", lambda socket: _watch(socket, sockets, frames))
        page.locator("button[type=submit], input[type=submit]").first.click()
        # a new browser since vio's last sign-in: the hub asks for its own second factor
        page.wait_for_selector("#mfa-secret")
        page.fill("#mfa-code", pyotp.TOTP(page.inner_text("#mfa-secret").strip()).now())
        page.click("#mfa-submit")
        page.wait_for_url("**/hub/home**")
        page.goto(f"{stack.hub_url}/user/vio/lab/tree/nb.ipynb")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
        # the kernel is connected once the status bar names it idle; a run before that is
        # dropped by JupyterLab, so the run is retried (Ctrl+Enter adds no cell)
        page.wait_for_selector(".jp-StatusBar-TextItem:has-text('| Idle')", timeout=120_000)
        output = page.locator(".jp-OutputArea-output:has-text('ztlab-ran')")
        for _ in range(6):
            page.locator(".jp-Notebook .jp-Cell .jp-InputArea-editor").first.click()
            page.keyboard.press("Control+Enter")
            try:
                output.wait_for(timeout=10_000)
                break
            except Exception:
                continue
        assert output.count() == 1, f"the cell did not run; kernel sockets: {sockets}"
        page.keyboard.press("Control+s")
        deadline = time.monotonic() + 30
        while "ztlab-ran" not in (home / "nb.ipynb").read_text():
            assert time.monotonic() < deadline, "the notebook was not saved"
            time.sleep(0.2)
        # a raw file, opened in the same browser: refused, with the rule's message
        page.goto(f"{stack.hub_url}/user/vio/files/secret.csv")
        assert VIEWER_RULE in page.inner_text("body")
        page.goto("about:blank")
        # what the browser received from vio's server, compared with the counters
        sent = 0
        for request in received:
            if not request.url.startswith(f"{stack.hub_url}/user/vio/"):
                continue
            response = request.response()
            if response is None or response.headers.get("x-ztlab-decision"):
                continue  # the enforcement point's own answers are not the server's egress
            sent += request.sizes()["responseBodySize"]
    saved = json.loads((home / "nb.ipynb").read_text())
    assert saved["cells"][0]["outputs"][0]["text"] == ["ztlab-ran\n"]
    time.sleep(2.5)  # the meter reads the access log every second
    after = _egress_metrics(stack, tokens["ada"], "vio")
    counted = sum(after.values()) - sum(before.values())
    assert sent > 100_000, "JupyterLab's pages and the notebook came through vio's server"
    assert frames, "the kernel's output came over its WebSocket"
    received = sent + sum(frames)
    assert abs(counted - received) <= 0.01 * received, (counted, received, after)
    # what is left: chromium's favicons and the frames' own headers (2 to 14 bytes each)
    extra = int(counted) - received
    assert any(0 <= extra - n * favicon <= 14 * len(frames) + 64 for n in range(6)), (
        counted,
        received,
        len(frames),
        favicon,
    )
    assert after.get("files", 0.0) == before.get("files", 0.0)
