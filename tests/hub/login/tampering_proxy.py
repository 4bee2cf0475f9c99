"""A real HTTP proxy in front of the identity provider that can forge its ID tokens.

It stands where a network attacker or a compromised provider would: every request is
forwarded unchanged, and when ``mode`` is set the ``id_token`` in the token endpoint's
answer is replaced. The hub talks to it over HTTP like to any provider; nothing in the hub
is patched.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tornado import httpclient, httpserver, web

MODES = (
    "wrong-key",
    "unknown-kid",
    "alg-none",
    "hs256-confusion",
    "wrong-aud",
    "wrong-iss",
    "expired",
    "bad-nonce",
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TamperingProxy:
    """Forward to ``upstream``; forge ID tokens according to :attr:`mode`."""

    def __init__(self, *, upstream: str, port: int, signing_key: Any, kid: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = port
        self.mode: str | None = None
        self.forged = 0
        self.seen: list[str] = []
        self._idp_key = signing_key
        self._kid = kid
        self._attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    # -- forging ------------------------------------------------------------------------------

    def forge(self, token: str) -> str:
        claims = jwt.decode(token, options={"verify_signature": False})
        header = {"kid": self._kid}
        mode = self.mode
        if mode == "wrong-key":
            return jwt.encode(claims, self._attacker, algorithm="RS256", headers=header)
        if mode == "unknown-kid":
            return jwt.encode(claims, self._attacker, algorithm="RS256", headers={"kid": "x"})
        if mode == "alg-none":
            head = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
            return f"{head}.{_b64(json.dumps(claims).encode())}."
        if mode == "hs256-confusion":
            public = self._idp_key.public_key().public_bytes(
                Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
            )
            head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": self._kid}).encode())
            body = _b64(json.dumps(claims).encode())
            mac = hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest()
            return f"{head}.{body}.{_b64(mac)}"
        if mode == "wrong-aud":
            claims["aud"] = "another-client"
        elif mode == "wrong-iss":
            claims["iss"] = "http://127.0.0.1:1/evil"
        elif mode == "expired":
            claims["iat"] = int(time.time()) - 7200
            claims["exp"] = int(time.time()) - 3600
        elif mode == "bad-nonce":
            claims["nonce"] = "forged-nonce"
        return jwt.encode(claims, self._idp_key, algorithm="RS256", headers=header)

    # -- serving ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("tampering proxy did not start")

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        proxy = self

        class Forward(web.RequestHandler):
            SUPPORTED_METHODS = ("GET", "POST", "HEAD", "OPTIONS")

            async def _forward(self) -> None:
                request = self.request
                # the Host header is kept: the provider names its endpoints after it
                headers = dict(request.headers.get_all())
                response = await httpclient.AsyncHTTPClient().fetch(
                    proxy.upstream + request.uri,
                    method=request.method,
                    headers=headers,
                    body=request.body if request.method == "POST" else None,
                    follow_redirects=False,
                    raise_error=False,
                    decompress_response=False,
                )
                body = response.body or b""
                proxy.seen.append(f"{request.method} {request.path} {response.code}")
                if proxy.mode and request.path.endswith("/token") and response.code == 200:
                    answer = json.loads(body)
                    if "id_token" in answer:
                        answer["id_token"] = proxy.forge(answer["id_token"])
                        proxy.forged += 1
                    body = json.dumps(answer).encode()
                self.set_status(response.code, response.reason)
                self.clear_header("Content-Type")
                for name, value in response.headers.get_all():
                    if name.lower() in ("content-length", "transfer-encoding", "connection"):
                        continue
                    self.add_header(name, value)
                if body:
                    self.write(body)

            get = post = head = options = _forward

        server = httpserver.HTTPServer(web.Application([(r".*", Forward)]))
        server.listen(self.port, "127.0.0.1")
        self._loop.call_soon(self._started.set)
        self._loop.run_forever()
        server.stop()
