"""A real browser (Debian's chromium driven by Playwright) signs in and reaches its server.

It goes through the identity provider's login page and the hub's TOTP enrollment page, then
opens JupyterLab on the user's own server (started as a dedicated Unix account). A
screenshot of each stage is kept in ``test-artifacts/``.
"""

from __future__ import annotations

import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest

from tests.hubstack import LoginStack, browser_page, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"
USER = "grace"


@pytest.fixture(scope="module")
def browser_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoginStack]:
    """A stack of its own: the shared one ends sessions after 8 s, and a first spawn on a
    busy 2-core machine can take longer than that (the user would be asked to sign in
    again, which is right, but not what this test is about)."""
    grace = {
        "password": f"{USER}-password",
        "email": f"{USER}@example.org",
        "name": "Grace",
        "groups": ["model-approvers"],
        "amr": ["pwd"],
        "acr": "urn:ztlab:pwd",
        "disabled": False,
    }
    with running_stack(
        tmp_path_factory.mktemp("browser-stack"),
        extra_users={USER: grace},
        pool="10.223.0.0/16",
        table="ztlab_test_browser",
        session_max_age=600,
    ) as stack:
        yield stack


@pytest.fixture
def grace(browser_stack: LoginStack) -> Iterator[str]:
    """A provider user with a password only, so the hub asks for its own TOTP."""
    yield USER
    account = f"ztl-{USER}"
    subprocess.run(["pkill", "-KILL", "-u", account], check=False)
    try:
        pwd.getpwnam(account)
    except KeyError:
        return
    subprocess.run(["userdel", "--remove", account], check=False, capture_output=True)


def test_browser_login_with_totp_reaches_the_users_server(
    browser_stack: LoginStack, grace: str
) -> None:
    login_stack = browser_stack
    ARTIFACTS.mkdir(exist_ok=True)
    with browser_page(login_stack, grace) as page:
        page.screenshot(path=str(ARTIFACTS / "browser-1-idp-login.png"))
        page.locator("button[type=submit], input[type=submit]").first.click()
        # the hub's TOTP enrollment page: QR code shown once
        page.wait_for_selector("#mfa-secret")
        page.screenshot(path=str(ARTIFACTS / "browser-2-totp-enroll.png"), full_page=True)
        secret = page.inner_text("#mfa-secret").strip()
        page.fill("#mfa-code", pyotp.TOTP(secret).now())
        page.click("#mfa-submit")
        page.wait_for_url("**/hub/home**")
        # start the user's own server and open JupyterLab in it
        page.goto(f"{login_stack.hub_url}/hub/spawn")
        # the spawn form asks how many GPUs (none here) and from which pool
        page.wait_for_selector("#spawn_form")
        page.fill("#gpus", "0")
        page.screenshot(path=str(ARTIFACTS / "browser-3-spawn-form.png"))
        page.locator("#spawn_form [type=submit]").click()
        page.wait_for_url(f"**/user/{grace}/lab**", timeout=120_000)
        page.wait_for_selector(".jp-LabShell, #jp-main-dock-panel", timeout=120_000)
        page.wait_for_selector(".jp-Launcher", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "browser-4-jupyterlab.png"))
        assert f"/user/{grace}/lab" in page.url
    # the server runs as the dedicated, unprivileged account
    entry = pwd.getpwnam(f"ztl-{grace}")
    assert entry.pw_uid != 0
    processes = subprocess.run(
        ["pgrep", "-u", entry.pw_name, "-f", "jupyterhub.singleuser"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert processes.stdout.strip(), "the user's server is not running as its own account"
    success = login_stack.wait_record("login.success", actor=grace)
    assert success.detail["mfa"] == "totp"
    decision = login_stack.wait_record("policy.decision", actor=grace)
    assert decision.detail["action"] == "spawn_server"
    assert decision.detail["allowed"] is True
