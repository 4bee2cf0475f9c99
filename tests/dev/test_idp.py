"""The development OpenID provider, run for real on Node, with a stand-in relying party.

The relying party is a small real HTTP server: ``/login`` sends the browser to the
provider's authorization endpoint (PKCE S256, state, nonce) and ``/callback`` exchanges
the code at the token endpoint with ``client_secret_basic`` and answers the token response
as JSON. :func:`idp_login` plays the browser.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import shutil
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
import pytest
import requests

from ztlab.dev.idp import (
    DevIdP,
    DevIdPNotInstalledError,
    LoginFlowError,
    LoginRejectedError,
    OIDCClient,
    demo_users,
    generate_signing_jwk,
    idp_login,
)
from ztlab.dev.idp import launcher as launcher_module

SCOPE = "openid profile email groups offline_access"
CLIENT_ID = "standin-rp"


class StandInRP:
    """A minimal confidential OIDC relying party on 127.0.0.1 (a real HTTP server)."""

    def __init__(self) -> None:
        self.secret = secrets.token_urlsafe(24)
        self.idp: DevIdP | None = None
        self.pending: dict[str, dict[str, str]] = {}
        rp = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def reply(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/login":
                    self.send_response(302)
                    self.send_header("Location", rp.authorize_url(query))
                    self.end_headers()
                elif url.path == "/callback":
                    status, body = rp.callback(query)
                    self.reply(status, body)
                else:
                    self.reply(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def login_url(self) -> str:
        return f"{self.base}/login"

    @property
    def callback_url(self) -> str:
        return f"{self.base}/callback"

    def client(self) -> OIDCClient:
        return OIDCClient(
            client_id=CLIENT_ID,
            client_secret=self.secret,
            redirect_uris=(self.callback_url,),
            client_name="Stand-in RP",
        )

    def authorize_url(self, query: dict[str, str]) -> str:
        assert self.idp is not None
        state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
        verifier = secrets.token_urlsafe(48)
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        self.pending[state] = {
            "nonce": nonce,
            "verifier": secrets.token_urlsafe(48) if query.get("bad_verifier") else verifier,
        }
        params = {
            "response_type": "code",
            "client_id": query.get("client_id", CLIENT_ID),
            "redirect_uri": self.callback_url,
            "scope": query.get("scope", SCOPE),
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        return f"{self.idp.authorization_url}?{urlencode(params)}"

    def callback(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        assert self.idp is not None
        if "error" in query:
            return 400, {"error": query["error"], "description": query.get("error_description")}
        pending = self.pending.pop(query.get("state", ""), None)
        if pending is None:
            return 400, {"error": "unknown state"}
        resp = requests.post(
            self.idp.token_url,
            auth=(CLIENT_ID, self.secret),
            data={
                "grant_type": "authorization_code",
                "code": query["code"],
                "redirect_uri": self.callback_url,
                "code_verifier": pending["verifier"],
            },
            timeout=10,
        )
        return 200, {"status": resp.status_code, "token": resp.json(), "nonce": pending["nonce"]}

    def refresh(self, refresh_token: str) -> requests.Response:
        assert self.idp is not None
        return requests.post(
            self.idp.token_url,
            auth=(CLIENT_ID, self.secret),
            data={"grant_type": "refresh_token", "refresh_token": refresh_token},
            timeout=10,
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_idp(rp: StandInRP, state_dir: Path, **kwargs: Any) -> DevIdP:
    idp = DevIdP(
        users=demo_users(),
        clients=[rp.client()],
        state_dir=state_dir,
        refresh_token_ttl=3600,
        **kwargs,
    )
    rp.idp = idp
    return idp.start()


@pytest.fixture(scope="module")
def rp() -> Iterator[StandInRP]:
    server = StandInRP()
    yield server
    server.close()


@pytest.fixture(scope="module")
def idp(rp: StandInRP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevIdP]:
    provider = start_idp(rp, tmp_path_factory.mktemp("devidp") / "state")
    yield provider
    assert provider.stop() == 0, provider.output()


def login(rp: StandInRP, username: str, password: str | None = None, **query: str) -> Any:
    url = rp.login_url + (f"?{urlencode(query)}" if query else "")
    with requests.Session() as session:
        resp = idp_login(
            session, url, username=username, password=password or f"{username}-password"
        )
    assert resp.status_code == 200, resp.text
    assert resp.url.startswith(rp.callback_url)
    return resp.json()


def verify_id_token(idp: DevIdP, id_token: str, **options: Any) -> dict[str, Any]:
    key = jwt.PyJWKClient(idp.jwks_url, cache_keys=False).get_signing_key_from_jwt(id_token)
    claims: dict[str, Any] = jwt.decode(
        id_token,
        key=key.key,
        algorithms=["RS256", "ES256"],
        audience=CLIENT_ID,
        issuer=idp.issuer,
        **options,
    )
    return claims


def userinfo(idp: DevIdP, access_token: str) -> requests.Response:
    return requests.get(
        idp.userinfo_url, headers={"Authorization": f"Bearer {access_token}"}, timeout=10
    )


# ---------------------------------------------------------------------------------------
# the provider, for real


@pytest.mark.e2e
def test_discovery_document(idp: DevIdP) -> None:
    doc = requests.get(idp.discovery_url, timeout=10).json()
    assert doc["issuer"] == idp.issuer
    assert doc["jwks_uri"] == idp.jwks_url
    assert doc["authorization_endpoint"] == idp.authorization_url
    assert doc["token_endpoint"] == idp.token_url
    assert doc["userinfo_endpoint"] == idp.userinfo_url
    assert doc["end_session_endpoint"] == idp.end_session_url
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["response_types_supported"] == ["code"]
    assert set(doc["grant_types_supported"]) == {"authorization_code", "refresh_token"}
    assert set(SCOPE.split()) <= set(doc["scopes_supported"])
    assert {"groups", "amr", "acr", "email", "name"} <= set(doc["claims_supported"])
    assert "client_secret_basic" in doc["token_endpoint_auth_methods_supported"]
    assert "none" not in doc["token_endpoint_auth_methods_supported"]
    published = requests.get(idp.jwks_url, timeout=10).json()
    assert [k["kid"] for k in published["keys"]] == [idp.signing_kid]
    assert all("d" not in k for k in published["keys"])


@pytest.mark.e2e
def test_login_with_pkce_gives_verifiable_tokens(idp: DevIdP, rp: StandInRP) -> None:
    result = login(rp, "alice")
    assert result["status"] == 200, result
    token = result["token"]
    assert token["token_type"] == "Bearer"
    assert token["refresh_token"]
    assert jwt.get_unverified_header(token["id_token"])["kid"] == idp.signing_kid
    claims = verify_id_token(idp, token["id_token"])
    assert claims["sub"] == "alice"
    assert claims["nonce"] == result["nonce"]
    assert claims["amr"] == ["pwd", "otp"]
    assert claims["acr"] == "urn:ztlab:mfa"
    assert claims["groups"] == ["ml-trainers"]
    assert claims["email"] == "alice@example.org"
    assert claims["preferred_username"] == "alice"

    info = userinfo(idp, token["access_token"])
    assert info.status_code == 200, info.text
    assert info.json()["groups"] == ["ml-trainers"]
    assert info.json()["sub"] == "alice"

    refreshed = rp.refresh(token["refresh_token"])
    assert refreshed.status_code == 200, refreshed.text
    new = refreshed.json()
    assert new["access_token"] != token["access_token"]
    new_claims = verify_id_token(idp, new["id_token"])
    assert new_claims["sub"] == "alice"
    assert new_claims["amr"] == ["pwd", "otp"]
    assert new_claims["groups"] == ["ml-trainers"]
    assert userinfo(idp, new["access_token"]).status_code == 200


@pytest.mark.e2e
def test_password_only_user_has_pwd_amr(idp: DevIdP, rp: StandInRP) -> None:
    claims = verify_id_token(idp, login(rp, "bob")["token"]["id_token"])
    assert claims["amr"] == ["pwd"]
    assert claims["acr"] == "urn:ztlab:pwd"
    assert claims["groups"] == ["model-approvers"]


@pytest.mark.e2e
def test_pkce_is_required_and_checked(idp: DevIdP, rp: StandInRP) -> None:
    bad = login(rp, "carol", bad_verifier="1")
    assert bad["status"] == 400
    assert bad["token"]["error"] == "invalid_grant"

    params = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": rp.callback_url,
        "scope": "openid",
        "state": "s",
    }
    resp = requests.get(idp.authorization_url, params=params, allow_redirects=False, timeout=10)
    assert resp.status_code in (302, 303)
    location = parse_qs(urlsplit(resp.headers["location"]).query)
    assert location["error"] == ["invalid_request"]
    assert "PKCE" in location["error_description"][0]


@pytest.mark.e2e
def test_login_page_is_a_plain_form(idp: DevIdP, rp: StandInRP) -> None:
    with requests.Session() as session:
        resp = session.get(rp.login_url, timeout=10)
    assert resp.status_code == 200
    assert resp.url.startswith(f"{idp.issuer}/interaction/")
    html = resp.text
    assert '<form method="post"' in html
    assert 'id="login" name="login"' in html
    assert 'id="password" name="password" type="password"' in html
    assert 'type="submit"' in html


@pytest.mark.e2e
def test_wrong_password_is_refused_with_the_idp_error(idp: DevIdP, rp: StandInRP) -> None:
    with requests.Session() as session, pytest.raises(LoginRejectedError) as info:
        idp_login(session, rp.login_url, username="alice", password="not-her-password")
    assert "Invalid username or password" in info.value.idp_error
    assert "Invalid username or password" in info.value.message
    with requests.Session() as session, pytest.raises(LoginRejectedError):
        idp_login(session, rp.login_url, username="nobody", password="x")


@pytest.mark.e2e
def test_disabled_user_cannot_log_in(idp: DevIdP, rp: StandInRP) -> None:
    with requests.Session() as session, pytest.raises(LoginRejectedError) as info:
        idp_login(session, rp.login_url, username="frank", password="frank-password")
    assert "disabled" in info.value.idp_error


@pytest.mark.e2e
def test_disabling_a_user_after_login_stops_userinfo_and_refresh(
    idp: DevIdP, rp: StandInRP
) -> None:
    idp.set_user("gina", password="gina-password", groups=["ml-trainers"], amr=["pwd"])
    token = login(rp, "gina")["token"]
    assert userinfo(idp, token["access_token"]).status_code == 200

    idp.set_user("gina", disabled=True)
    assert userinfo(idp, token["access_token"]).status_code == 401
    refreshed = rp.refresh(token["refresh_token"])
    assert refreshed.status_code == 400
    assert refreshed.json()["error"] == "invalid_grant"

    idp.set_user("gina", disabled=False)
    assert rp.refresh(token["refresh_token"]).status_code == 200


@pytest.mark.e2e
def test_group_changes_show_on_the_next_userinfo_and_refresh(idp: DevIdP, rp: StandInRP) -> None:
    token = login(rp, "dave")["token"]
    assert verify_id_token(idp, token["id_token"])["groups"] == []
    assert userinfo(idp, token["access_token"]).json()["groups"] == []

    idp.set_user("dave", groups=["data-stewards", "ml-trainers"])
    assert userinfo(idp, token["access_token"]).json()["groups"] == [
        "data-stewards",
        "ml-trainers",
    ]
    refreshed = rp.refresh(token["refresh_token"]).json()
    assert verify_id_token(idp, refreshed["id_token"])["groups"] == [
        "data-stewards",
        "ml-trainers",
    ]
    idp.set_user("dave", groups=[])


@pytest.mark.e2e
def test_existing_idp_session_skips_the_form(idp: DevIdP, rp: StandInRP) -> None:
    with requests.Session() as session:
        first = idp_login(session, rp.login_url, username="erin", password="erin-password")
        assert first.json()["status"] == 200
        # the provider remembers erin: no form this time, the password is not used
        second = idp_login(session, rp.login_url, username="erin", password="")
    result = second.json()
    assert result["status"] == 200
    claims = verify_id_token(idp, result["token"]["id_token"])
    assert claims["sub"] == "erin"
    assert claims["nonce"] == result["nonce"]
    assert claims["amr"] == ["pwd", "hwk"]


@pytest.mark.e2e
def test_error_page_at_the_idp_raises(idp: DevIdP, rp: StandInRP) -> None:
    with requests.Session() as session, pytest.raises(LoginFlowError) as info:
        idp_login(
            session,
            f"{rp.login_url}?client_id=no-such-client",
            username="alice",
            password="alice-password",
        )
    assert not isinstance(info.value, LoginRejectedError)
    assert "answered 400" in info.value.message
    assert "invalid_client" in info.value.message


@pytest.mark.e2e
def test_key_rotation_keeps_old_tokens_valid(tmp_path: Path) -> None:
    rp = StandInRP()
    try:
        idp = start_idp(rp, tmp_path / "state", key_alg="ES256")
        with idp:
            old_kid = idp.signing_kid
            before = login(rp, "alice")["token"]
            header = jwt.get_unverified_header(before["id_token"])
            assert (header["alg"], header["kid"]) == ("ES256", old_kid)

            new_kid = idp.rotate_keys()
            assert new_kid != old_kid
            assert idp.signing_kid == new_kid
            published = requests.get(idp.jwks_url, timeout=10).json()
            assert [k["kid"] for k in published["keys"]] == [new_kid, old_kid]

            # the old ID token still verifies; sessions and refresh tokens survived the restart
            assert verify_id_token(idp, before["id_token"], options={"verify_exp": True})
            refreshed = rp.refresh(before["refresh_token"])
            assert refreshed.status_code == 200, refreshed.text
            assert jwt.get_unverified_header(refreshed.json()["id_token"])["kid"] == new_kid
            after = login(rp, "bob")["token"]
            assert jwt.get_unverified_header(after["id_token"])["kid"] == new_kid
            assert verify_id_token(idp, after["id_token"])["sub"] == "bob"
        assert not idp.running
    finally:
        rp.close()


# ---------------------------------------------------------------------------------------
# the launcher, without starting anything


@pytest.mark.e2e
def test_state_files_are_private(idp: DevIdP) -> None:
    assert stat.S_IMODE(idp.state_dir.stat().st_mode) == 0o700
    for path in (idp.config_file, idp.users_file, idp.jwks_file, idp.state_dir / "store.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    config = json.loads(idp.config_file.read_text())
    assert config["issuer"] == idp.issuer
    assert config["clients"][0]["token_endpoint_auth_method"] == "client_secret_basic"
    assert "d" in json.loads(idp.jwks_file.read_text())["keys"][0]


def test_write_users_is_atomic_and_private(tmp_path: Path) -> None:
    idp = DevIdP(
        users={},
        clients=[{"client_id": "c", "client_secret": "s", "redirect_uris": ["http://x/cb"]}],
        state_dir=tmp_path / "s",
    )
    idp.set_user("zoe", password="pw", groups=["g"])
    idp.set_user("zoe", disabled=True)
    stored = json.loads(idp.users_file.read_text())
    assert stored == {"zoe": {"password": "pw", "groups": ["g"], "disabled": True}}
    assert stat.S_IMODE(idp.users_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(idp.state_dir.stat().st_mode) == 0o700
    assert [p.name for p in idp.state_dir.iterdir()] == ["users.json"]
    with pytest.raises(launcher_module.DevIdPError, match="groups must be a list"):
        idp.set_user("zoe", groups="g")


def test_missing_node_or_package_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = OIDCClient(client_id="c", client_secret="s", redirect_uris=("http://x/cb",))
    idp = DevIdP(users={}, clients=[client], state_dir=tmp_path / "s", node="/nonexistent/node")
    with pytest.raises(DevIdPNotInstalledError) as info:
        idp.start()
    assert "Node.js" in info.value.message
    assert "npm ci --no-audit --no-fund" in (info.value.hint or "")

    monkeypatch.setattr(launcher_module, "_find_node_modules", lambda start: None)
    monkeypatch.setattr("ztlab.common.installed.node_modules_candidates", lambda: [])
    idp = DevIdP(users={}, clients=[client], state_dir=tmp_path / "s", node=shutil.which("sh"))
    with pytest.raises(DevIdPNotInstalledError) as info:
        idp.start()
    assert "oidc-provider" in info.value.message
    assert "npm ci --no-audit --no-fund" in (info.value.hint or "")


def test_demo_users() -> None:
    users = demo_users()
    assert set(users) == {"alice", "bob", "carol", "dave", "erin", "frank"}
    assert users["alice"]["amr"] == ["pwd", "otp"]
    assert users["bob"]["amr"] == ["pwd"]
    assert users["dave"]["groups"] == []
    assert users["erin"]["groups"] == ["ztlab-admins"]
    assert users["frank"]["disabled"] is True
    assert all(u["password"] == f"{name}-password" for name, u in users.items())


def test_generated_keys_are_private_jwks_with_thumbprint_kids() -> None:
    for alg in ("RS256", "ES256"):
        jwk = generate_signing_jwk(alg)
        assert jwk["alg"] == alg
        assert jwk["use"] == "sig"
        assert "d" in jwk
        assert jwk["kid"] == launcher_module.jwk_thumbprint(jwk)
        assert jwt.PyJWK(jwk).algorithm_name == alg
        public = launcher_module.public_jwks({"keys": [jwk]})["keys"][0]
        assert "d" not in public
        assert public["kid"] == jwk["kid"]
