"""End to end: the real provider, the real hub, the real proxy; logins and the attacks.

Each attack must be refused with a clear page and leave an audit record; a user without a
proven second factor must never hold a hub session cookie.
"""

from __future__ import annotations

import http.client
import re
import time
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import pyotp
import pytest
import requests

from tests.hubstack import LoginStack
from ztlab.dev.idp.flow import LoginRejectedError, idp_login

pytestmark = pytest.mark.e2e

LOGIN_COOKIE = "jupyterhub-hub-login"


def _has_login_cookie(session: requests.Session) -> bool:
    return any(cookie.name == LOGIN_COOKIE for cookie in session.cookies)


def _mfa_form(response: requests.Response) -> dict[str, str]:
    page = response.text
    fields = dict(re.findall(r'name="(_xsrf|stage)" value="([^"]*)"', page))
    secret = re.search(r'id="mfa-secret">([A-Z2-7]+)<', page)
    if secret:
        fields["secret"] = secret.group(1)
    fields["recovery"] = ",".join(re.findall(r"<li><code>([A-Z0-9-]+)</code></li>", page))
    return fields


def _submit_code(
    stack: LoginStack, session: requests.Session, form: dict[str, str], code: str
) -> requests.Response:
    return session.post(
        f"{stack.hub_url}/hub/ztlab/mfa",
        data={"_xsrf": form["_xsrf"], "stage": form["stage"], "code": code},
        allow_redirects=False,
        timeout=10,
    )


def _start_step_up(
    stack: LoginStack, user: str, user_agent: str = "ztlab-e2e/1.0"
) -> tuple[requests.Session, dict[str, str]]:
    session = stack.session(user_agent)
    response = stack.login(session, user, follow=False)
    assert response.status_code == 302, response.text[:500]
    assert response.headers["Location"].endswith("/hub/ztlab/mfa")
    assert not _has_login_cookie(session)
    page = session.get(f"{stack.hub_url}/hub/ztlab/mfa", timeout=10)
    assert page.status_code == 200
    return session, _mfa_form(page)


def test_login_with_provider_mfa(login_stack: LoginStack) -> None:
    start = login_stack.audit_size()
    session = login_stack.session()
    final = login_stack.login(session, "alice")
    assert final.status_code == 200, final.text[:500]
    assert urlsplit(final.url).path == "/hub/home"
    assert _has_login_cookie(session)
    record = login_stack.wait_record("login.success", actor="alice", since=start)
    assert record.detail["mfa"] == "provider"
    assert record.detail["roles"] == ["trainer"]
    # the session's token works for the user's own model
    user = session.get(f"{login_stack.hub_url}/hub/api/user", timeout=10)
    assert user.status_code == 200
    assert user.json()["name"] == "alice"
    assert "ztlab-role-trainer" in user.json()["groups"]


def test_totp_enrollment_then_step_up_and_replay(login_stack: LoginStack) -> None:
    start = login_stack.audit_size()
    session, form = _start_step_up(login_stack, "bob")
    assert form["stage"] == "enroll"
    assert len(form["recovery"].split(",")) == 10
    # no session before the second factor: the hub API refuses the cookies we hold
    assert session.get(f"{login_stack.hub_url}/hub/api/user", timeout=10).status_code == 403
    assert not login_stack.logged_in(session)
    code = pyotp.TOTP(form["secret"]).now()
    done = _submit_code(login_stack, session, form, code)
    assert done.status_code == 302, done.text[:500]
    assert _has_login_cookie(session)
    assert login_stack.logged_in(session)
    assert login_stack.wait_record("mfa.totp.enrolled", actor="bob", since=start)
    success = login_stack.wait_record("login.success", actor="bob", since=start)
    assert success.detail["mfa"] == "totp"

    # the next login asks for a code; the one just used is refused as a replay
    again, form2 = _start_step_up(login_stack, "bob")
    assert form2["stage"] == "verify"
    assert "secret" not in form2  # the QR code and key were shown once only
    replay = _submit_code(login_stack, again, form2, code)
    assert replay.status_code == 403
    assert "already been used" in replay.text or "replay" in replay.text.lower()
    assert not _has_login_cookie(again)
    failed = login_stack.wait_record("mfa.totp.failed", actor="bob", since=start)
    assert failed.detail["reason"] == "replayed"
    # a wrong code is refused too
    wrong = _submit_code(login_stack, again, _mfa_form(replay), "000000")
    assert wrong.status_code == 403
    assert not _has_login_cookie(again)
    # a recovery code works once
    recovery = form["recovery"].split(",")[0]
    ok = _submit_code(login_stack, again, _mfa_form(wrong), recovery)
    assert ok.status_code == 302
    assert _has_login_cookie(again)
    assert login_stack.wait_record("mfa.recovery_code.used", actor="bob", since=start)


def test_brute_force_hits_the_lockout(login_stack: LoginStack) -> None:
    start = login_stack.audit_size()
    session, form = _start_step_up(login_stack, "carol")
    secret = form["secret"]
    statuses = []
    for attempt in range(3):
        response = _submit_code(login_stack, session, form, f"{attempt:06d}")
        statuses.append(response.status_code)
        form = _mfa_form(response)
    assert statuses[-1] == 423
    assert "locked" in response.text.lower()
    # even the right code is refused while locked
    right = _submit_code(login_stack, session, form, pyotp.TOTP(secret).now())
    assert right.status_code == 423
    assert not _has_login_cookie(session)
    assert login_stack.wait_record("mfa.totp.locked", actor="carol", since=start)


def test_no_second_factor_means_no_session(login_stack: LoginStack) -> None:
    """A password-only user who skips the step-up page has no session at all."""
    start = login_stack.audit_size()
    session = login_stack.session()
    response = login_stack.login(session, "bob", follow=False)
    assert response.headers["Location"].endswith("/hub/ztlab/mfa")
    assert not _has_login_cookie(session)
    home = session.get(f"{login_stack.hub_url}/hub/home", allow_redirects=False, timeout=10)
    assert home.status_code == 302
    assert "/hub/login" in home.headers["Location"]
    token = session.post(f"{login_stack.hub_url}/hub/api/users/bob/tokens", json={}, timeout=10)
    assert token.status_code == 403
    record = login_stack.wait_record("login.mfa_required", actor="bob", since=start)
    assert "second factor" in record.detail["why"]


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("wrong-key", "bad-signature"),
        ("unknown-kid", "unknown-key"),
        ("alg-none", "alg-not-allowed"),
        ("hs256-confusion", "alg-not-allowed"),
        ("wrong-aud", "wrong-audience"),
        ("wrong-iss", "wrong-issuer"),
        ("expired", "expired"),
        ("bad-nonce", "nonce-mismatch"),
    ],
)
def test_forged_id_tokens_are_refused(login_stack: LoginStack, mode: str, reason: str) -> None:
    start = login_stack.audit_size()
    login_stack.proxy.mode = mode
    try:
        session = login_stack.session()
        response = login_stack.login(session, "alice", follow=False)
    finally:
        login_stack.proxy.mode = None
    assert login_stack.proxy.forged >= 1, login_stack.proxy.seen
    assert response.status_code == 403, response.text[:300]
    assert "could not be verified" in response.text
    assert reason in response.text
    assert not _has_login_cookie(session)
    record = login_stack.wait_record("login.refused", since=start)
    assert record.detail["reason"] == f"id-token-{reason}"


def test_state_mismatch_is_refused(login_stack: LoginStack) -> None:
    start = login_stack.audit_size()
    session = login_stack.session()
    begin = session.get(f"{login_stack.hub_url}/hub/oauth_login", allow_redirects=False, timeout=10)
    authorize = urlsplit(begin.headers["Location"])
    query = {k: v[0] for k, v in parse_qs(authorize.query).items()}
    query["state"] = "eyJzdGF0ZV9pZCI6ICJmb3JnZWQifQ=="  # {"state_id": "forged"}
    forged = urlunsplit(authorize._replace(query=urlencode(query)))
    response = idp_login(session, forged, username="alice", password="alice-password")
    assert response.status_code == 400
    assert "did not match the sign-in" in response.text
    assert not _has_login_cookie(session)
    record = login_stack.wait_record("login.refused", since=start)
    assert record.detail["reason"] == "oauth-state-mismatch"


def test_user_in_no_mapped_group_is_refused(login_stack: LoginStack) -> None:
    start = login_stack.audit_size()
    session = login_stack.session()
    response = login_stack.login(session, "dave", follow=False)
    assert response.status_code == 403
    assert "none of your groups gives you a role" in response.text
    assert not _has_login_cookie(session)
    record = login_stack.wait_record("login.refused", actor="dave", since=start)
    assert record.detail["reason"] == "no-role"


def test_new_browser_triggers_the_step_up(login_stack: LoginStack) -> None:
    first = login_stack.session("browser-one/1.0")
    assert login_stack.login(first, "erin").status_code == 200
    _, form = _start_step_up(login_stack, "erin", user_agent="browser-two/2.0")
    assert form["stage"] == "enroll"
    record = login_stack.wait_record("login.mfa_required", actor="erin")
    assert record.detail["why"] == "new browser since the last sign-in"


def test_session_older_than_the_maximum_age_ends(login_stack: LoginStack) -> None:
    session = login_stack.session()
    assert login_stack.login(session, "alice").status_code == 200
    cookie = session.cookies.get(LOGIN_COOKIE)
    assert cookie
    time.sleep(9)  # the test hub's maximum session age is 8 s
    # replay the old cookie by hand, as an attacker who kept it would
    stale = requests.get(
        f"{login_stack.hub_url}/hub/home",
        headers={"Cookie": f"{LOGIN_COOKIE}={cookie}"},
        allow_redirects=False,
        timeout=10,
    )
    assert stale.status_code == 302
    assert "/hub/login" in stale.headers["Location"]


def test_disabled_provider_account_is_noticed_at_refresh(login_stack: LoginStack) -> None:
    start = login_stack.audit_size()
    session = login_stack.session()
    assert login_stack.login(session, "alice").status_code == 200
    login_stack.idp.set_user("alice", disabled=True)
    try:
        time.sleep(1.5)  # past the test hub's auth_refresh_age of 1 s
        home = session.get(f"{login_stack.hub_url}/hub/home", allow_redirects=False, timeout=20)
        assert home.status_code == 302
        assert "/hub/login" in home.headers["Location"]
        login_stack.wait_record("session.refresh_refused", actor="alice", since=start)
        # and a new login is refused at the provider
        with pytest.raises(LoginRejectedError, match="disabled"):
            login_stack.login(login_stack.session(), "alice")
    finally:
        login_stack.idp.set_user("alice", disabled=False)


@pytest.mark.parametrize(
    "spoofed",
    [
        {},
        {"X-Forwarded-For": "127.0.0.1"},
        {"X-Real-Ip": "127.0.0.1"},
        {"X-Real-Ip": "127.0.0.1", "X-Forwarded-For": "127.0.0.1, 127.0.0.1"},
    ],
)
def test_sign_in_from_outside_the_allowed_networks_is_refused(
    login_stack: LoginStack, spoofed: dict[str, str]
) -> None:
    """The test hub allows 127.0.0.1/32 only; this client connects from 127.0.0.2 and may
    claim 127.0.0.1 in X-Forwarded-For or X-Real-Ip: only the proxy's own entry counts."""
    start = login_stack.audit_size()
    parts = urlsplit(login_stack.hub_url)
    connection = http.client.HTTPConnection(
        parts.hostname, parts.port, timeout=10, source_address=("127.0.0.2", 0)
    )
    connection.request("GET", "/hub/oauth_login", headers=spoofed)
    response = connection.getresponse()
    body = response.read().decode()
    connection.close()
    assert response.status == 403
    assert "not allowed from your network address (127.0.0.2)" in body
    record = login_stack.wait_record("login.refused", since=start)
    assert record.detail == {"reason": "network", "client_ip": "127.0.0.2"}


def test_group_changes_at_the_provider_take_effect_at_refresh(login_stack: LoginStack) -> None:
    start = login_stack.audit_size()
    session = login_stack.session()
    assert login_stack.login(session, "alice").status_code == 200
    try:
        login_stack.idp.set_user("alice", groups=["model-approvers"])
        time.sleep(1.5)  # past the test hub's auth_refresh_age of 1 s
        user = session.get(f"{login_stack.hub_url}/hub/api/user", timeout=20).json()
        assert "ztlab-role-approver" in user["groups"]
        assert "ztlab-role-trainer" not in user["groups"]
        changed = login_stack.wait_record("session.roles_changed", actor="alice", since=start)
        assert changed.detail == {"old": ["trainer"], "new": ["approver"]}
        # with no mapped group left, the session ends
        login_stack.idp.set_user("alice", groups=[])
        time.sleep(1.5)
        home = session.get(f"{login_stack.hub_url}/hub/home", allow_redirects=False, timeout=20)
        assert home.status_code == 302
        refused = login_stack.wait_record("session.refresh_refused", actor="alice", since=start)
        assert refused.detail["reason"] in ("no-role", "provider")
    finally:
        login_stack.idp.set_user("alice", groups=["ml-trainers"])
