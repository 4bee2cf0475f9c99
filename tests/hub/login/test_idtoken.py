"""ID-token verification against a provider over real HTTP: the good tokens and every refusal.

Each test starts a tornado server on 127.0.0.1 serving a discovery document and a JWK Set
(tests/hub/login/jwks_server.py) and fetches from it with :func:`tornado_fetch`. Tokens are
signed with keys generated here; the attacks are built by hand where PyJWT would refuse to.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import RSAAlgorithm

from tests.hub.login.jwks_server import JwksServer, PrivateKey, public_jwk, serving_provider
from ztlab.common.errors import ConfigError
from ztlab.hub.login.idtoken import IdTokenError, IdTokenVerifier, JwksCache, tornado_fetch

T = TypeVar("T")

NOW = 1_750_000_000.0
CLIENT = "ztlab-hub"
NONCE = "n-0S6_WzA2Mj"
#: a claim override that leaves the claim out
DROP: Any = object()

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_NEXT = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
ATTACKER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_EC = ec.generate_private_key(ec.SECP256R1())

PUBLISHED = (
    public_jwk(RSA_KEY, kid="rsa-1"),
    public_jwk(EC_KEY, kid="ec-1"),
    public_jwk(ED_KEY, kid="ed-1"),
)


class ManualClock:
    """A monotonic clock for the JWKS cache that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: dict[str, Any], payload: dict[str, Any] | bytes, signature: bytes) -> str:
    """A compact JWS built by hand, for tokens no honest library would produce."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return f"{b64(json.dumps(header).encode())}.{b64(body)}.{b64(signature)}"


def claims(server: JwksServer, **overrides: Any) -> dict[str, Any]:
    """Good ID-token claims for ``server``'s issuer; ``DROP`` leaves a claim out."""
    payload: dict[str, Any] = {
        "iss": server.issuer,
        "sub": "f3c1a9e0-alice",
        "aud": CLIENT,
        "exp": NOW + 300,
        "iat": NOW,
        "auth_time": NOW - 5,
        "nonce": NONCE,
        "preferred_username": "alice",
    }
    payload.update(overrides)
    return {name: value for name, value in payload.items() if value is not DROP}


def sign(
    payload: dict[str, Any] | bytes,
    key: PrivateKey = RSA_KEY,
    *,
    alg: str = "RS256",
    kid: str | None = "rsa-1",
    headers: dict[str, Any] | None = None,
) -> str:
    header = {"kid": kid, **(headers or {})} if kid is not None else dict(headers or {})
    if isinstance(payload, bytes):
        return jwt.PyJWS().encode(payload, key, algorithm=alg, headers=header)
    return jwt.encode(payload, key, algorithm=alg, headers=header)


async def discover(
    server: JwksServer, *, jwks_clock: ManualClock | None = None, **kwargs: Any
) -> IdTokenVerifier:
    return await IdTokenVerifier.from_discovery(
        server.issuer,
        client_id=CLIENT,
        fetch=tornado_fetch(timeout=5),
        clock=lambda: NOW,
        jwks_clock=jwks_clock or ManualClock(),
        **kwargs,
    )


def verify(
    make_token: Callable[[JwksServer], str], *, nonce: str | None = NONCE, **kwargs: Any
) -> dict[str, Any]:
    """Serve the usual keys, discover, verify the token made for that server."""

    async def scenario() -> dict[str, Any]:
        async with serving_provider() as server:
            server.publish(*PUBLISHED)
            verifier = await discover(server, **kwargs)
            return await verifier.verify(make_token(server), nonce=nonce)

    return run(scenario())


def refusal(
    make_token: Callable[[JwksServer], str], *, nonce: str | None = NONCE, **kwargs: Any
) -> IdTokenError:
    with pytest.raises(IdTokenError) as info:
        verify(make_token, nonce=nonce, **kwargs)
    return info.value


# --- tokens that verify ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "key", "kid"),
    [
        ("RS256", RSA_KEY, "rsa-1"),
        ("PS256", RSA_KEY, "rsa-1"),
        ("ES256", EC_KEY, "ec-1"),
        ("EdDSA", ED_KEY, "ed-1"),
    ],
)
def test_a_good_token_verifies_and_its_claims_come_back(
    alg: str, key: PrivateKey, kid: str
) -> None:
    expected: dict[str, Any] = {}

    def make(server: JwksServer) -> str:
        expected.update(claims(server))
        return sign(expected, key, alg=alg, kid=kid)

    assert verify(make) == expected


def test_a_token_without_kid_verifies_when_exactly_one_key_fits() -> None:
    got = verify(lambda s: sign(claims(s), EC_KEY, alg="ES256", kid=None))
    assert got["sub"] == "f3c1a9e0-alice"


def test_leeway_absorbs_small_clock_skew() -> None:
    got = verify(
        lambda s: sign(claims(s, exp=NOW - 10, iat=NOW + 10, nbf=NOW + 10)),
        leeway_seconds=30,
    )
    assert got["exp"] == NOW - 10


def test_several_audiences_verify_when_azp_is_this_client() -> None:
    got = verify(lambda s: sign(claims(s, aud=[CLIENT, "other-rp"], azp=CLIENT)))
    assert got["azp"] == CLIENT


@pytest.mark.parametrize("token_nonce", [DROP, "anything"])
def test_a_refreshed_token_does_not_check_the_nonce(token_nonce: Any) -> None:
    got = verify(lambda s: sign(claims(s, nonce=token_nonce)), nonce=None)
    assert got["sub"] == "f3c1a9e0-alice"


def test_an_allowed_rs512_verifies_when_configured() -> None:
    # the control for test_an_unexpected_alg_is_refused: the token itself is sound
    got = verify(lambda s: sign(claims(s), alg="RS512"), algorithms=("RS512",))
    assert got["sub"] == "f3c1a9e0-alice"


def test_discovery_exposes_the_provider_metadata() -> None:
    async def scenario() -> None:
        async with serving_provider() as server:
            verifier = await discover(server)
            assert verifier.metadata["token_endpoint"] == server.issuer + (
                "/protocol/openid-connect/token"
            )
            assert verifier.jwks.jwks_url == server.jwks_url
            assert server.jwks_fetches == 0  # keys are fetched on first use

    run(scenario())


# --- forged signatures and forbidden algorithms ---------------------------------------------


@pytest.mark.parametrize(
    ("alg", "key", "kid"), [("RS256", ATTACKER_RSA, "rsa-1"), ("ES256", ATTACKER_EC, "ec-1")]
)
def test_a_token_signed_with_another_key_under_a_published_kid_is_refused(
    alg: str, key: PrivateKey, kid: str
) -> None:
    error = refusal(lambda s: sign(claims(s), key, alg=alg, kid=kid))
    assert error.reason == "bad-signature"


def test_a_token_signed_with_another_key_under_an_unknown_kid_is_refused() -> None:
    error = refusal(lambda s: sign(claims(s), ATTACKER_RSA, kid="attacker-1"))
    assert error.reason == "unknown-key"
    assert "attacker-1" in error.message


def test_a_tampered_payload_is_refused() -> None:
    def make(server: JwksServer) -> str:
        header, _, signature = sign(claims(server)).split(".")
        forged = b64(json.dumps(claims(server, sub="root")).encode())
        return f"{header}.{forged}.{signature}"

    assert refusal(make).reason == "bad-signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_refused(alg: str) -> None:
    error = refusal(lambda s: compact({"alg": alg, "typ": "JWT"}, claims(s), b""))
    assert error.reason == "alg-not-allowed"


@pytest.mark.parametrize(
    ("alg", "digest"),
    [("HS256", hashlib.sha256), ("HS384", hashlib.sha384), ("HS512", hashlib.sha512)],
)
def test_hmac_signed_with_the_rsa_public_key_is_refused(
    alg: str, digest: Callable[[], Any]
) -> None:
    # the key-confusion attack: the public key (which anyone can fetch) as the HMAC secret
    async def scenario() -> IdTokenError:
        async with serving_provider() as server:
            server.publish(*PUBLISHED)
            verifier = await discover(server)
            pem = RSA_KEY.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            header = b64(json.dumps({"alg": alg, "typ": "JWT", "kid": "rsa-1"}).encode())
            body = b64(json.dumps(claims(server)).encode())
            mac = hmac.new(pem, f"{header}.{body}".encode(), digest).digest()
            with pytest.raises(IdTokenError) as info:
                await verifier.verify(f"{header}.{body}.{b64(mac)}", nonce=NONCE)
            assert server.jwks_fetches == 0  # refused before any key was looked up
            return info.value

    assert run(scenario()).reason == "alg-not-allowed"


def test_an_unexpected_alg_is_refused() -> None:
    error = refusal(lambda s: sign(claims(s), alg="RS512"))
    assert error.reason == "alg-not-allowed"
    assert "RS512" in error.message


def test_an_alg_the_provider_does_not_sign_with_is_refused() -> None:
    async def scenario() -> IdTokenError:
        async with serving_provider() as server:
            server.publish(*PUBLISHED)
            server.discovery_overrides["id_token_signing_alg_values_supported"] = ["RS256"]
            verifier = await discover(server)
            assert verifier.algorithms == ("RS256",)
            with pytest.raises(IdTokenError) as info:
                await verifier.verify(
                    sign(claims(server), EC_KEY, alg="ES256", kid="ec-1"), nonce=NONCE
                )
            return info.value

    assert run(scenario()).reason == "alg-not-allowed"


def test_a_key_of_the_wrong_type_for_alg_is_refused() -> None:
    # ES256 header naming the RSA key: the key type must fit the algorithm
    error = refusal(lambda s: sign(claims(s), EC_KEY, alg="ES256", kid="rsa-1"))
    assert error.reason == "unknown-key"
    assert "RSA" in error.message


def test_a_crit_header_is_refused() -> None:
    error = refusal(lambda s: sign(claims(s), headers={"crit": ["exp"], "exp": NOW}))
    assert error.reason == "malformed"
    assert "crit" in error.message


def test_an_access_token_typ_is_refused() -> None:
    error = refusal(lambda s: sign(claims(s), headers={"typ": "at+jwt"}))
    assert error.reason == "malformed"


def test_a_duplicated_header_member_is_refused() -> None:
    # two "alg" members: parsers disagree on which wins, so neither may
    def make(server: JwksServer) -> str:
        _, body, signature = sign(claims(server)).split(".")
        header = b'{"alg":"RS256","kid":"rsa-1","alg":"none"}'
        return f"{b64(header)}.{body}.{signature}"

    assert refusal(make).reason == "malformed"


# --- claims ---------------------------------------------------------------------------------

ClaimCase = tuple[str, Callable[[JwksServer], dict[str, Any]], str]

CLAIM_CASES: list[ClaimCase] = [
    ("another issuer", lambda s: {"iss": "https://idp.evil.example/realms/ztlab"}, "wrong-issuer"),
    ("issuer plus slash", lambda s: {"iss": s.issuer + "/"}, "wrong-issuer"),
    ("issuer in capitals", lambda s: {"iss": s.issuer.upper()}, "wrong-issuer"),
    ("no issuer", lambda s: {"iss": DROP}, "missing-claim"),
    ("another audience", lambda s: {"aud": "other-rp"}, "wrong-audience"),
    ("audiences without us", lambda s: {"aud": ["a", "b"], "azp": "a"}, "wrong-audience"),
    ("no audience", lambda s: {"aud": DROP}, "missing-claim"),
    ("several audiences, no azp", lambda s: {"aud": [CLIENT, "other-rp"]}, "azp-mismatch"),
    (
        "several audiences, other azp",
        lambda s: {"aud": [CLIENT, "other-rp"], "azp": "other-rp"},
        "azp-mismatch",
    ),
    ("one audience, other azp", lambda s: {"azp": "other-rp"}, "azp-mismatch"),
    ("expired", lambda s: {"exp": NOW - 31}, "expired"),
    ("expired long ago", lambda s: {"exp": NOW - 86400, "iat": NOW - 90000}, "expired"),
    ("no exp", lambda s: {"exp": DROP}, "missing-claim"),
    ("exp not a number", lambda s: {"exp": "tomorrow"}, "malformed"),
    ("exp a boolean", lambda s: {"exp": True}, "malformed"),
    ("issued in the future", lambda s: {"iat": NOW + 31}, "issued-in-future"),
    ("no iat", lambda s: {"iat": DROP}, "missing-claim"),
    ("not yet valid", lambda s: {"nbf": NOW + 31}, "not-yet-valid"),
    ("another nonce", lambda s: {"nonce": "n-replayed"}, "nonce-mismatch"),
    ("a nonce prefix", lambda s: {"nonce": NONCE[:-1]}, "nonce-mismatch"),
    ("nonce not a string", lambda s: {"nonce": 12345}, "nonce-mismatch"),
    ("no nonce", lambda s: {"nonce": DROP}, "nonce-missing"),
    ("no sub", lambda s: {"sub": DROP}, "missing-claim"),
    ("empty sub", lambda s: {"sub": ""}, "missing-claim"),
    ("sub not a string", lambda s: {"sub": 42}, "missing-claim"),
]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [pytest.param(make, reason, id=name) for name, make, reason in CLAIM_CASES],
)
def test_a_bad_claim_is_refused_with_its_reason(
    overrides: Callable[[JwksServer], dict[str, Any]], reason: str
) -> None:
    error = refusal(lambda s: sign(claims(s, **overrides(s))))
    assert error.reason == reason


def test_messages_name_the_claim_and_never_hold_the_token() -> None:
    token = ""

    def make(server: JwksServer) -> str:
        nonlocal token
        token = sign(claims(server, iss="https://idp.evil.example"))
        return token

    error = refusal(make)
    assert error.reason == "wrong-issuer"
    assert "'iss'" in error.message
    assert "https://idp.evil.example" in error.message
    assert token.split(".")[2] not in error.message


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        pytest.param({"iat": NOW - 700, "auth_time": DROP}, "too-old", id="iat too old"),
        pytest.param({"auth_time": NOW - 700}, "too-old", id="auth_time too old"),
        pytest.param({"iat": NOW - 100, "auth_time": NOW - 100}, None, id="recent enough"),
    ],
)
def test_max_age_bounds_the_authentication_time(
    overrides: dict[str, Any], reason: str | None
) -> None:
    def make(server: JwksServer) -> str:
        return sign(claims(server, **overrides))

    if reason is None:
        assert verify(make, max_age_seconds=600)["sub"] == "f3c1a9e0-alice"
    else:
        assert refusal(make, max_age_seconds=600).reason == reason


# --- malformed tokens -----------------------------------------------------------------------


def _signed_payload(payload: bytes) -> Callable[[JwksServer], str]:
    return lambda s: sign(payload)


MALFORMED: list[tuple[str, Callable[[JwksServer], str]]] = [
    ("two segments", lambda s: ".".join(sign(claims(s)).split(".")[:2])),
    ("five segments (JWE)", lambda s: "a.b.c.d.e"),
    ("empty", lambda s: ""),
    ("bad base64 header", lambda s: "eyJ!bGci.e30." + b64(b"x")),
    ("padded base64", lambda s: sign(claims(s)) + "=="),
    ("header not JSON", lambda s: f"{b64(b'not json')}.{b64(b'{}')}.{b64(b'sig')}"),
    ("header a JSON list", lambda s: f"{b64(b'[1]')}.{b64(b'{}')}.{b64(b'sig')}"),
    ("header without alg", lambda s: compact({"typ": "JWT"}, claims(s), b"sig")),
    ("payload not JSON", _signed_payload(b"not json")),
    ("payload a JSON list", _signed_payload(b'["sub", "alice"]')),
    ("payload not UTF-8", _signed_payload(b"\xff\xfe{}")),
    (
        "exp is Infinity",
        lambda s: sign(json.dumps(claims(s, exp=DROP))[:-1].encode() + b', "exp": Infinity}'),
    ),
    ("aud a number", lambda s: sign(claims(s, aud=7))),
]


@pytest.mark.parametrize("make", [pytest.param(make, id=name) for name, make in MALFORMED])
def test_a_malformed_token_is_refused(make: Callable[[JwksServer], str]) -> None:
    assert refusal(make).reason == "malformed"


# --- discovery ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "advertised",
    [
        lambda s: s.issuer + "/",
        lambda s: "https://idp.evil.example/realms/ztlab",
        lambda s: s.issuer.replace("127.0.0.1", "localhost"),
        lambda s: None,
    ],
    ids=["trailing slash", "another host", "another spelling", "missing"],
)
def test_a_discovery_document_for_another_issuer_is_refused(
    advertised: Callable[[JwksServer], str | None],
) -> None:
    async def scenario() -> IdTokenError:
        async with serving_provider() as server:
            server.discovery_overrides["issuer"] = advertised(server)
            with pytest.raises(IdTokenError) as info:
                await discover(server)
            return info.value

    assert run(scenario()).reason == "wrong-issuer"


def test_a_discovery_document_with_an_insecure_jwks_uri_is_refused() -> None:
    async def scenario() -> IdTokenError:
        async with serving_provider() as server:
            server.discovery_overrides["jwks_uri"] = "http://idp.example/certs"
            with pytest.raises(IdTokenError) as info:
                await discover(server)
            return info.value

    assert run(scenario()).reason == "jwks-unavailable"


def test_an_unreachable_discovery_document_is_jwks_unavailable() -> None:
    async def scenario() -> IdTokenError:
        async with serving_provider() as server:
            server.discovery_status = 500
            with pytest.raises(IdTokenError) as info:
                await discover(server)
            return info.value

    error = run(scenario())
    assert error.reason == "jwks-unavailable"
    assert "500" in error.message


# --- key rotation and the refetch rate limit ------------------------------------------------


def test_a_rotated_key_verifies_after_exactly_one_refetch() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        async with serving_provider() as server:
            server.publish(*PUBLISHED)
            verifier = await discover(server, jwks_clock=clock)
            await verifier.verify(sign(claims(server)), nonce=NONCE)
            assert server.jwks_fetches == 1

            # the provider rotates: a new key, the old one withdrawn
            server.publish(public_jwk(RSA_NEXT, kid="rsa-2"), *PUBLISHED[1:])
            clock.advance(60)
            new_token = sign(claims(server), RSA_NEXT, kid="rsa-2")
            assert (await verifier.verify(new_token, nonce=NONCE))["sub"] == "f3c1a9e0-alice"
            assert server.jwks_fetches == 2
            await verifier.verify(new_token, nonce=NONCE)
            assert server.jwks_fetches == 2  # cached

            # the withdrawn key no longer verifies, and asking for it does not refetch
            with pytest.raises(IdTokenError) as info:
                await verifier.verify(sign(claims(server)), nonce=NONCE)
            assert info.value.reason == "unknown-key"
            assert server.jwks_fetches == 2

    run(scenario())


def test_a_rotation_right_after_a_fetch_waits_for_the_refresh_interval() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        async with serving_provider() as server:
            server.publish(*PUBLISHED)
            verifier = await discover(server, jwks_clock=clock, jwks_min_refresh_interval=10)
            await verifier.verify(sign(claims(server)), nonce=NONCE)
            server.publish(public_jwk(RSA_NEXT, kid="rsa-2"))
            new_token = sign(claims(server), RSA_NEXT, kid="rsa-2")
            clock.advance(5)
            with pytest.raises(IdTokenError) as info:
                await verifier.verify(new_token, nonce=NONCE)
            assert info.value.reason == "unknown-key"
            assert server.jwks_fetches == 1
            clock.advance(5)
            await verifier.verify(new_token, nonce=NONCE)
            assert server.jwks_fetches == 2

    run(scenario())


def test_random_kids_refetch_at_most_once_per_interval() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        async with serving_provider() as server:
            server.publish(*PUBLISHED)
            verifier = await discover(server, jwks_clock=clock, jwks_min_refresh_interval=10)
            await verifier.verify(sign(claims(server)), nonce=NONCE)
            assert server.jwks_fetches == 1

            async def attack(count: int) -> None:
                for _ in range(count):
                    token = sign(claims(server), ATTACKER_RSA, kid=uuid.uuid4().hex)
                    with pytest.raises(IdTokenError) as info:
                        await verifier.verify(token, nonce=NONCE)
                    assert info.value.reason == "unknown-key"

            clock.advance(10)
            await attack(50)
            assert server.jwks_fetches == 2
            clock.advance(9.9)
            await attack(50)
            assert server.jwks_fetches == 2
            clock.advance(0.1)
            await attack(50)
            assert server.jwks_fetches == 3

            # concurrently, too: the attackers share the one permitted fetch
            clock.advance(10)
            tokens = [sign(claims(server), ATTACKER_RSA, kid=uuid.uuid4().hex) for _ in range(20)]
            results = await asyncio.gather(
                *(verifier.verify(t, nonce=NONCE) for t in tokens), return_exceptions=True
            )
            assert {getattr(r, "reason", None) for r in results} == {"unknown-key"}
            assert server.jwks_fetches == 4

    run(scenario())


def test_concurrent_logins_after_a_rotation_share_one_refetch() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        async with serving_provider() as server:
            server.publish(*PUBLISHED)
            verifier = await discover(server, jwks_clock=clock)
            await verifier.verify(sign(claims(server)), nonce=NONCE)
            server.publish(public_jwk(RSA_NEXT, kid="rsa-2"))
            clock.advance(60)
            new_token = sign(claims(server), RSA_NEXT, kid="rsa-2")
            results = await asyncio.gather(
                *(verifier.verify(new_token, nonce=NONCE) for _ in range(10))
            )
            assert all(r["sub"] == "f3c1a9e0-alice" for r in results)
            assert server.jwks_fetches == 2

    run(scenario())


def test_the_key_set_is_refetched_when_its_ttl_has_passed() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        async with serving_provider() as server:
            server.publish(*PUBLISHED)
            verifier = await discover(server, jwks_clock=clock, jwks_ttl_seconds=300)
            token = sign(claims(server))
            await verifier.verify(token, nonce=NONCE)
            clock.advance(299)
            await verifier.verify(token, nonce=NONCE)
            assert server.jwks_fetches == 1
            clock.advance(1)
            await verifier.verify(token, nonce=NONCE)
            assert server.jwks_fetches == 2

    run(scenario())


# --- the key set cannot be had --------------------------------------------------------------


def test_a_failing_jwks_endpoint_is_jwks_unavailable() -> None:
    async def scenario() -> tuple[IdTokenError, str]:
        async with serving_provider() as server:
            server.publish(*PUBLISHED)
            server.jwks_status = 503
            verifier = await discover(server)
            with pytest.raises(IdTokenError) as info:
                await verifier.verify(sign(claims(server)), nonce=NONCE)
            return info.value, server.jwks_url

    error, url = run(scenario())
    assert error.reason == "jwks-unavailable"
    assert url in error.message
    assert "503" in error.message


def test_a_jwks_endpoint_nobody_listens_on_is_jwks_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # the port is closed again: connections to it are refused

    async def scenario() -> None:
        cache = JwksCache(jwks_url=f"http://127.0.0.1:{port}/certs", fetch=tornado_fetch(timeout=5))
        with pytest.raises(IdTokenError) as info:
            await cache.key_for("rsa-1", "RS256")
        assert info.value.reason == "jwks-unavailable"

    run(scenario())


def test_an_outage_is_retried_only_after_the_refresh_interval() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        async with serving_provider() as server:
            server.publish(*PUBLISHED)
            server.jwks_status = 503
            verifier = await discover(server, jwks_clock=clock, jwks_min_refresh_interval=10)
            token = sign(claims(server))
            for _ in range(5):
                with pytest.raises(IdTokenError) as info:
                    await verifier.verify(token, nonce=NONCE)
                assert info.value.reason == "jwks-unavailable"
            assert server.jwks_fetches == 1
            server.jwks_status = None
            clock.advance(10)
            await verifier.verify(token, nonce=NONCE)
            assert server.jwks_fetches == 2

    run(scenario())


def test_a_stale_key_set_that_cannot_be_refreshed_fails_closed() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        async with serving_provider() as server:
            server.publish(*PUBLISHED)
            verifier = await discover(server, jwks_clock=clock, jwks_ttl_seconds=300)
            token = sign(claims(server))
            await verifier.verify(token, nonce=NONCE)
            server.jwks_status = 502
            clock.advance(300)
            with pytest.raises(IdTokenError) as info:
                await verifier.verify(token, nonce=NONCE)
            assert info.value.reason == "jwks-unavailable"

    run(scenario())


@pytest.mark.parametrize(
    "document",
    [{"nokeys": []}, {"keys": {"kty": "RSA"}}, ["keys"]],
    ids=["no keys", "keys not a list", "not an object"],
)
def test_a_document_that_is_no_jwk_set_is_jwks_unavailable(document: Any) -> None:
    async def scenario() -> IdTokenError:
        async with serving_provider() as server:
            server.jwks = document
            verifier = await discover(server)
            with pytest.raises(IdTokenError) as info:
                await verifier.verify(sign(claims(server)), nonce=NONCE)
            return info.value

    assert run(scenario()).reason == "jwks-unavailable"


# --- keys the JWK Set must not offer --------------------------------------------------------


def _private_rsa_jwk() -> dict[str, Any]:
    jwk = RSAAlgorithm.to_jwk(RSA_KEY, as_dict=True)
    return {**jwk, "kid": "rsa-1"}


@pytest.mark.parametrize(
    ("published", "alg", "why"),
    [
        pytest.param(_private_rsa_jwk(), "RS256", "private", id="private key material"),
        pytest.param({**PUBLISHED[0], "use": "enc"}, "RS256", "use", id="an encryption key"),
        pytest.param(
            {**PUBLISHED[0], "key_ops": ["encrypt"]},
            "RS256",
            "key_ops",
            id="key_ops without verify",
        ),
        pytest.param(
            {**PUBLISHED[0], "alg": "RS256"}, "PS256", "PS256", id="pinned to another alg"
        ),
        pytest.param(
            public_jwk(rsa.generate_private_key(public_exponent=65537, key_size=1024), kid="rsa-1"),
            "RS256",
            "1024",
            id="a 1024-bit RSA key",
        ),
        pytest.param(
            {"kty": "oct", "k": b64(b"secret"), "kid": "rsa-1"},
            "RS256",
            "private",
            id="a symmetric key",
        ),
    ],
)
def test_an_unusable_published_key_is_never_used(
    published: dict[str, Any], alg: str, why: str
) -> None:
    async def scenario() -> IdTokenError:
        async with serving_provider() as server:
            server.publish(published)
            verifier = await discover(server)
            token = sign(claims(server), RSA_KEY, alg=alg, kid="rsa-1")
            with pytest.raises(IdTokenError) as info:
                await verifier.verify(token, nonce=NONCE)
            return info.value

    error = run(scenario())
    assert error.reason == "unknown-key"
    assert why in error.message


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("algorithms", [("RS256", "none"), ("HS256",), (), ("RS256", "ES256K")])
def test_algorithms_that_can_never_be_right_are_refused_at_configuration(
    algorithms: tuple[str, ...],
) -> None:
    cache = JwksCache(jwks_url="https://idp.example/certs", fetch=tornado_fetch())
    with pytest.raises(ConfigError):
        IdTokenVerifier(
            issuer="https://idp.example", client_id=CLIENT, jwks=cache, algorithms=algorithms
        )


def test_a_plain_http_issuer_elsewhere_is_refused_at_configuration() -> None:
    cache = JwksCache(jwks_url="https://idp.example/certs", fetch=tornado_fetch())
    with pytest.raises(ConfigError):
        IdTokenVerifier(issuer="http://idp.example", client_id=CLIENT, jwks=cache)
    with pytest.raises(ConfigError):
        JwksCache(jwks_url="http://idp.example/certs", fetch=tornado_fetch())
