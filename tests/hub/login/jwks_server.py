"""An OpenID provider's key endpoints over real HTTP, for tests.

:func:`serving_provider` starts a tornado server on 127.0.0.1 (a free port) in the running
event loop. It serves an OpenID Connect discovery document under the issuer and the JWK
Set it points to, counts the requests to each, and can be switched to a new key set
(rotation) or to failing with an HTTP status. :func:`public_jwk` turns a test key into the
JWK a provider would publish.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

PrivateKey = RSAPrivateKey | EllipticCurvePrivateKey | Ed25519PrivateKey


def public_jwk(key: PrivateKey, *, kid: str | None, alg: str | None = None) -> dict[str, Any]:
    """The public JWK of ``key`` as a provider publishes it (``use: sig``)."""
    jwk: dict[str, Any]
    if isinstance(key, RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    elif isinstance(key, EllipticCurvePrivateKey):
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk["use"] = "sig"
    if kid is not None:
        jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    return jwk


class JwksServer:
    """The provider's side: what it serves, and how often it was asked."""

    def __init__(self, issuer_path: str = "/realms/ztlab") -> None:
        self.issuer_path = issuer_path
        self.port = 0
        #: the JWK Set served at :attr:`jwks_url`
        self.jwks: dict[str, Any] = {"keys": []}
        #: merged over the default discovery document
        self.discovery_overrides: dict[str, Any] = {}
        #: when set, the JWKS endpoint answers with this status and no keys
        self.jwks_status: int | None = None
        #: when set, the discovery endpoint answers with this status
        self.discovery_status: int | None = None
        #: requests per path
        self.hits: Counter[str] = Counter()
        self._server: HTTPServer | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return self.origin + self.issuer_path

    @property
    def discovery_path(self) -> str:
        return self.issuer_path + "/.well-known/openid-configuration"

    @property
    def jwks_path(self) -> str:
        return self.issuer_path + "/protocol/openid-connect/certs"

    @property
    def jwks_url(self) -> str:
        return self.origin + self.jwks_path

    @property
    def jwks_fetches(self) -> int:
        """How many times the JWK Set was requested."""
        return self.hits[self.jwks_path]

    def publish(self, *jwks: dict[str, Any]) -> None:
        """Serve exactly these keys from now on (a rotation replaces the whole set)."""
        self.jwks = {"keys": list(jwks)}

    def discovery(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "issuer": self.issuer,
            "authorization_endpoint": self.issuer + "/protocol/openid-connect/auth",
            "token_endpoint": self.issuer + "/protocol/openid-connect/token",
            "userinfo_endpoint": self.issuer + "/protocol/openid-connect/userinfo",
            "jwks_uri": self.jwks_url,
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "RS512", "PS256", "ES256", "EdDSA"],
        }
        document.update(self.discovery_overrides)
        return document

    async def start(self) -> None:
        sockets = bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        app = Application([(r"/.*", _Handler, {"provider": self})])
        self._server = HTTPServer(app)
        self._server.add_sockets(sockets)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None


class _Handler(RequestHandler):
    def initialize(self, provider: JwksServer) -> None:
        self.provider = provider

    def get(self) -> None:
        path = self.request.path
        self.provider.hits[path] += 1
        if path == self.provider.discovery_path:
            status, document = self.provider.discovery_status, self.provider.discovery()
        elif path == self.provider.jwks_path:
            status, document = self.provider.jwks_status, self.provider.jwks
        else:
            status, document = 404, {}
        if status is not None:
            self.set_status(status)
            self.finish(b"unavailable")
            return
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(document).encode())


@asynccontextmanager
async def serving_provider(issuer_path: str = "/realms/ztlab") -> AsyncIterator[JwksServer]:
    """A :class:`JwksServer` listening on 127.0.0.1 for the duration of the block."""
    server = JwksServer(issuer_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
