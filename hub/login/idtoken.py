"""Verifying OpenID Connect ID tokens: signature, keys from the provider's JWKS, claims.

OAuthenticator decodes the ID token without checking its signature; the hub verifies
everything itself. :meth:`IdTokenVerifier.verify` follows OpenID Connect Core 1.0,
section 3.1.3.7 ("ID Token Validation"); its steps are numbered (1)-(8) in the code, and
each names the items of the specification it implements. A token that does not verify
raises :class:`IdTokenError`, whose ``reason`` is a short stable code for the audit log.

The keys come from the provider's JWK Set (:class:`JwksCache`). The cache refetches the
set once when a token names a key it does not know (the provider rotated its keys), but
never more often than ``min_refresh_interval``: a stream of tokens with made-up ``kid``
values must not turn the hub into a tool for hammering the provider.

Nothing in the token decides how it is verified: the JOSE header is parsed without trust,
``alg`` must be on the allow-list (never ``none``, never an HMAC algorithm), the key comes
only from the configured JWKS (``jku``, ``jwk``, ``x5u`` and ``x5c`` headers are ignored)
and must be of the type the algorithm needs, and PyJWT is given exactly one algorithm.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, NoReturn, TypeAlias
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ec import (
    SECP256R1,
    SECP384R1,
    SECP521R1,
    EllipticCurve,
    EllipticCurvePublicKey,
)
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt import PyJWS
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import (
    InvalidAlgorithmError,
    InvalidKeyError,
    InvalidSignatureError,
    PyJWTError,
)
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from ztlab.common.errors import ConfigError, UsageError, VerificationError

__all__ = [
    "DEFAULT_ALGORITHMS",
    "Fetch",
    "IdTokenError",
    "IdTokenReason",
    "IdTokenVerifier",
    "JwksCache",
    "VerifyingKey",
    "tornado_fetch",
]

#: Why an ID token was refused; stable codes for the audit log.
IdTokenReason: TypeAlias = Literal[
    "malformed",
    "alg-not-allowed",
    "unknown-key",
    "bad-signature",
    "wrong-issuer",
    "wrong-audience",
    "expired",
    "not-yet-valid",
    "issued-in-future",
    "too-old",
    "nonce-mismatch",
    "nonce-missing",
    "azp-mismatch",
    "missing-claim",
    "jwks-unavailable",
]

#: A public key that can verify an ID token signature.
VerifyingKey: TypeAlias = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey

#: Fetches a URL with GET and returns the body of a 2xx response. It raises
#: ``IdTokenError("jwks-unavailable")`` (or :class:`OSError`) when it cannot.
Fetch: TypeAlias = Callable[[str], Awaitable[bytes]]

#: The signature algorithms accepted by default (RFC 7518 names; EdDSA per RFC 8037).
DEFAULT_ALGORITHMS: tuple[str, ...] = ("RS256", "PS256", "ES256", "EdDSA")

#: Larger tokens are refused before any work is done on them.
MAX_TOKEN_BYTES = 64 * 1024
#: Larger discovery documents and JWK Sets are refused by :func:`tornado_fetch`.
MAX_DOCUMENT_BYTES = 1024 * 1024
#: RSA keys shorter than this are never used (NIST SP 800-131A).
MIN_RSA_BITS = 2048

# JWK members that only a private or symmetric key has (RFC 7518 section 6).
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# JOSE "typ" values an ID token may carry (RFC 7519 5.1); "at+jwt" (an access token) is not.
_ID_TOKEN_TYPES = frozenset({"jwt", "application/jwt"})
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class IdTokenError(VerificationError):
    """An ID token did not verify, or the keys to verify it could not be had.

    ``reason`` is one of :data:`IdTokenReason`, for the audit log and for tests. ``message``
    names the claim or header and what was expected; it never contains the token.
    """

    def __init__(self, reason: IdTokenReason, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason: IdTokenReason = reason

    def __repr__(self) -> str:
        return f"IdTokenError({self.reason!r}, {self.message!r})"


# --- algorithms and the keys they need ----------------------------------------------------


@dataclass(frozen=True)
class _KeyNeed:
    """What kind of key an algorithm verifies with."""

    description: str
    types: tuple[type, ...]
    curve: type[EllipticCurve] | None = None

    def fits(self, key: VerifyingKey) -> bool:
        if not isinstance(key, self.types):
            return False
        if self.curve is not None:
            return isinstance(key, EllipticCurvePublicKey) and isinstance(key.curve, self.curve)
        return True


_RSA = _KeyNeed("an RSA key", (RSAPublicKey,))
_KEY_NEEDS: dict[str, _KeyNeed] = {
    "RS256": _RSA,
    "RS384": _RSA,
    "RS512": _RSA,
    "PS256": _RSA,
    "PS384": _RSA,
    "PS512": _RSA,
    "ES256": _KeyNeed("an EC key on P-256", (EllipticCurvePublicKey,), SECP256R1),
    "ES384": _KeyNeed("an EC key on P-384", (EllipticCurvePublicKey,), SECP384R1),
    "ES512": _KeyNeed("an EC key on P-521", (EllipticCurvePublicKey,), SECP521R1),
    "EdDSA": _KeyNeed("an Ed25519 or Ed448 key", (Ed25519PublicKey, Ed448PublicKey)),
}
#: Every algorithm a verifier may be configured to accept.
SUPPORTED_ALGORITHMS: frozenset[str] = frozenset(_KEY_NEEDS)


def _describe_key(key: VerifyingKey) -> str:
    if isinstance(key, RSAPublicKey):
        return f"an RSA key ({key.key_size} bits)"
    if isinstance(key, EllipticCurvePublicKey):
        return f"an EC key on {key.curve.name}"
    if isinstance(key, Ed25519PublicKey):
        return "an Ed25519 key"
    return "an Ed448 key"


# --- small parsing helpers ----------------------------------------------------------------


def _shown(value: object, limit: int = 64) -> str:
    """``repr(value)``, shortened: for untrusted values quoted in messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _when(timestamp: float) -> str:
    """A NumericDate as ISO 8601 UTC, for messages."""
    try:
        return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{timestamp!r} s"


def _kid_text(kid: str | None) -> str:
    """How messages name a key."""
    return f"key {_shown(kid)}" if kid is not None else "the key (the token names no kid)"


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _secure_url(url: str) -> bool:
    """``https://``, or ``http://`` to this machine (a local IdP in development and tests)."""
    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(parts.hostname))


def _b64url_decode(segment: str, name: str) -> bytes:
    """Strict base64url (RFC 7515 section 2): no padding, no stray characters, canonical."""
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise IdTokenError("malformed", f"the {name} is not base64url")
    raw = segment.encode("ascii")
    try:
        decoded = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        raise IdTokenError("malformed", f"the {name} is not base64url") from None
    if base64.urlsafe_b64encode(decoded).rstrip(b"=") != raw:
        raise IdTokenError("malformed", f"the {name} is not canonical base64url")
    return decoded


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for name, value in pairs:
        if name in seen:
            raise ValueError(f"duplicate member {name!r}")
        seen[name] = value
    return seen


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _json_object(data: bytes) -> dict[str, Any]:
    """Parse a JSON object strictly: UTF-8, no duplicate members, no NaN or Infinity.

    RFC 7515 section 4 lets a parser reject duplicate header names; refusing them closes
    the gap between parsers that keep the first and those that keep the last.
    """
    value = json.loads(
        data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants
    )
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _numeric_date(claims: dict[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519 section 2), or ``None`` when absent."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise IdTokenError(
            "malformed", f"claim {name!r} must be a number of seconds since the epoch"
        )
    return float(value)


# --- the provider's keys ------------------------------------------------------------------


@dataclass(frozen=True)
class _Jwk:
    """A usable signing key from the JWK Set."""

    kid: str | None
    key: VerifyingKey
    alg: str | None


def _public_key(entry: dict[str, Any]) -> VerifyingKey:
    """The public key of one JWK, or ``ValueError`` saying why it cannot be used."""
    if _PRIVATE_MEMBERS & entry.keys():
        raise ValueError("it carries private or symmetric key material")
    use = entry.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"its use is {_shown(use)}, not 'sig'")
    key_ops = entry.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise ValueError("its key_ops do not include 'verify'")
    alg = entry.get("alg")
    if alg is not None and not isinstance(alg, str):
        raise ValueError("its alg is not a string")
    kty = entry.get("kty")
    try:
        key: object
        if kty == "RSA":
            key = RSAAlgorithm.from_jwk(entry)
        elif kty == "EC":
            key = ECAlgorithm.from_jwk(entry)
        elif kty == "OKP":
            key = OKPAlgorithm.from_jwk(entry)
        else:
            raise ValueError(f"key type {_shown(kty)} is not supported")
    except (InvalidKeyError, KeyError, TypeError) as exc:
        raise ValueError(f"it is not a valid {kty} key: {exc}") from None
    if not isinstance(
        key, RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey
    ):
        raise ValueError("it is not a public key")
    if isinstance(key, RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"its RSA modulus has {key.key_size} bits; at least {MIN_RSA_BITS}")
    return key


def _parse_jwks(body: bytes, url: str) -> tuple[tuple[_Jwk, ...], dict[str, str]]:
    """The usable keys of a JWK Set (RFC 7517 section 5), and why others were skipped."""
    try:
        document = _json_object(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise IdTokenError("jwks-unavailable", f"{url} did not return a JSON object") from None
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise IdTokenError("jwks-unavailable", f"{url} returned no 'keys' list (not a JWK Set)")
    keys: list[_Jwk] = []
    skipped: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        try:
            keys.append(_Jwk(kid=kid, key=_public_key(entry), alg=entry.get("alg")))
        except ValueError as exc:
            skipped[kid if kid is not None else "(no kid)"] = str(exc)
    return tuple(keys), skipped


class JwksCache:
    """The provider's JSON Web Key Set, fetched on first use and cached.

    The set is refetched when older than ``ttl_seconds``, and once when a token names a
    ``kid`` the cached set lacks (the provider rotated its keys). No fetch, whether it
    succeeded or failed, is followed by another within ``min_refresh_interval`` seconds:
    made-up ``kid`` values cost the provider at most one request per interval. Concurrent
    callers share one fetch. When the set is stale and cannot be refetched, verification
    fails closed with ``jwks-unavailable``.
    """

    def __init__(
        self,
        *,
        jwks_url: str,
        fetch: Fetch,
        ttl_seconds: float = 300,
        min_refresh_interval: float = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not _secure_url(jwks_url):
            raise ConfigError(f"JWKS URL {jwks_url!r} must use https (http only to this machine)")
        if not ttl_seconds > 0 or not min_refresh_interval >= 0:
            raise ConfigError("ttl_seconds must be > 0 and min_refresh_interval >= 0")
        self.jwks_url = jwks_url
        self.ttl_seconds = ttl_seconds
        self.min_refresh_interval = min_refresh_interval
        self._fetch = fetch
        self._clock = clock
        self._lock = asyncio.Lock()
        self._keys: tuple[_Jwk, ...] | None = None
        self._skipped: dict[str, str] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._attempts = 0  # fetches started
        self._completed = 0  # fetches that ended with keys or an IdTokenError
        self._last_error: IdTokenError | None = None

    @property
    def fetches(self) -> int:
        """How many times the JWK Set has been requested (for metrics and tests)."""
        return self._attempts

    async def key_for(self, kid: str | None, alg: str) -> VerifyingKey:
        """The key named ``kid`` that can verify ``alg`` signatures.

        Without a ``kid`` (OIDC Core 10.1 allows that when there is a single key), the only
        key in the set that fits ``alg``. Raises ``IdTokenError("unknown-key")`` when there
        is no such key, ``IdTokenError("jwks-unavailable")`` when the set cannot be had.
        """
        need = _KEY_NEEDS.get(alg)
        if need is None:
            raise IdTokenError("alg-not-allowed", f"alg {_shown(alg)} is not supported")
        if self._stale():
            if self._lock.locked() or self._may_refetch():
                await self._refresh()
            elif self._last_error is not None:
                raise IdTokenError(
                    "jwks-unavailable",
                    f"{self._last_error.message} (retried at most every "
                    f"{self.min_refresh_interval:g} s)",
                )
            # else: fetched less than min_refresh_interval ago; keep using that set
        found = self._lookup(kid, alg, need)
        if found is None and (self._lock.locked() or self._may_refetch()):
            # a key we do not know: perhaps the provider rotated its keys
            await self._refresh()
            found = self._lookup(kid, alg, need)
        if found is None:
            raise IdTokenError(
                "unknown-key", f"{_kid_text(kid)} is not in the JWKS at {self.jwks_url}"
            )
        if isinstance(found, str):
            raise IdTokenError("unknown-key", found)
        return found

    def _stale(self) -> bool:
        return (
            self._keys is None
            or self._fetched_at is None
            or self._clock() - self._fetched_at >= self.ttl_seconds
        )

    def _may_refetch(self) -> bool:
        return (
            self._attempted_at is None
            or self._clock() - self._attempted_at >= self.min_refresh_interval
        )

    def _lookup(self, kid: str | None, alg: str, need: _KeyNeed) -> VerifyingKey | str | None:
        """The key; or a message when the set has ``kid`` but no usable key; or ``None``."""
        keys = self._keys or ()
        named = [jwk for jwk in keys if jwk.kid == kid] if kid is not None else list(keys)
        usable = [jwk for jwk in named if need.fits(jwk.key) and jwk.alg in (None, alg)]
        if len(usable) == 1:
            return usable[0].key
        if kid is None:
            if len(usable) > 1:
                return f"the token has no kid and the JWKS has {len(usable)} keys for {alg}"
            return None
        if usable:
            return f"the JWKS has {len(usable)} keys with kid {_shown(kid)} for {alg}"
        if named:
            kinds = ", ".join(
                f"{_describe_key(jwk.key)}" + (f" for {jwk.alg}" if jwk.alg else "")
                for jwk in named
            )
            return f"key {_shown(kid)} is {kinds}; alg {alg} needs {need.description}"
        if kid in self._skipped:
            return f"key {_shown(kid)} in the JWKS cannot be used: {self._skipped[kid]}"
        return None

    async def _refresh(self) -> None:
        """Fetch the set, unless another caller's fetch finished while this one waited."""
        seen = self._completed
        async with self._lock:
            if self._completed != seen:
                if self._last_error is not None:
                    raise IdTokenError("jwks-unavailable", self._last_error.message)
                return
            self._attempts += 1
            self._attempted_at = self._clock()
            try:
                try:
                    body = await self._fetch(self.jwks_url)
                except OSError as exc:
                    raise IdTokenError(
                        "jwks-unavailable", f"cannot fetch {self.jwks_url}: {exc}"
                    ) from exc
                keys, skipped = _parse_jwks(body, self.jwks_url)
            except IdTokenError as exc:
                self._last_error = exc
                self._completed += 1
                raise
            self._last_error = None
            self._keys, self._skipped = keys, skipped
            self._fetched_at = self._attempted_at
            self._completed += 1


# --- the verifier -------------------------------------------------------------------------


class IdTokenVerifier:
    """Verifies ID tokens from one OpenID provider for one client (relying party).

    Build it with :meth:`from_discovery` (the usual way; ``metadata`` then holds the
    provider's discovery document, e.g. its ``token_endpoint``) or directly with a
    :class:`JwksCache`. ``leeway_seconds`` absorbs clock skew in ``exp``, ``iat``,
    ``nbf`` and ``max_age``. With ``max_age_seconds``, the authentication (``auth_time``,
    or ``iat`` when the provider sends no ``auth_time``) must be that recent.
    """

    def __init__(
        self,
        *,
        issuer: str,
        client_id: str,
        jwks: JwksCache,
        algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
        leeway_seconds: float = 30,
        max_age_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if not issuer or not _secure_url(issuer):
            raise ConfigError(f"issuer {issuer!r} must be an https URL (http only to this machine)")
        if not client_id:
            raise ConfigError("client_id must not be empty")
        if isinstance(algorithms, str):
            algorithms = [algorithms]
        refused = [alg for alg in algorithms if alg not in SUPPORTED_ALGORITHMS]
        if refused or not algorithms:
            raise ConfigError(
                f"ID token algorithms must be a non-empty list drawn from "
                f"{sorted(SUPPORTED_ALGORITHMS)}; not supported: {refused}",
                hint="'none' and the HMAC algorithms (HS*) are never accepted",
            )
        if not leeway_seconds >= 0 or (max_age_seconds is not None and not max_age_seconds > 0):
            raise ConfigError("leeway_seconds must be >= 0 and max_age_seconds > 0")
        self.issuer = issuer
        self.client_id = client_id
        self.jwks = jwks
        self.algorithms: tuple[str, ...] = tuple(dict.fromkeys(algorithms))
        self.leeway_seconds = leeway_seconds
        self.max_age_seconds = max_age_seconds
        #: the provider's discovery document (read-only; empty when not discovered)
        self.metadata: Mapping[str, Any] = MappingProxyType(dict(metadata or {}))
        self._clock = clock
        self._jws = PyJWS(algorithms=self.algorithms)

    @classmethod
    async def from_discovery(
        cls,
        issuer: str,
        *,
        client_id: str,
        fetch: Fetch,
        algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
        leeway_seconds: float = 30,
        max_age_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
        jwks_ttl_seconds: float = 300,
        jwks_min_refresh_interval: float = 10,
        jwks_clock: Callable[[], float] = time.monotonic,
    ) -> IdTokenVerifier:
        """A verifier configured from the provider's discovery document.

        The steps follow OpenID Connect Discovery 1.0, sections 4 and 4.3.
        """
        if not issuer or not _secure_url(issuer):
            raise ConfigError(f"issuer {issuer!r} must be an https URL (http only to this machine)")
        # (1) Discovery 4: the document is at the issuer, less any trailing "/", followed
        #     by /.well-known/openid-configuration.
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            body = await fetch(url)
        except OSError as exc:
            raise IdTokenError("jwks-unavailable", f"cannot fetch {url}: {exc}") from exc
        try:
            document = _json_object(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise IdTokenError("jwks-unavailable", f"{url} did not return a JSON object") from None
        # (2) Discovery 4.3: the issuer in the document must be exactly the one we asked
        #     (no normalisation), or an attacker's document could impersonate a provider.
        if document.get("issuer") != issuer:
            raise IdTokenError(
                "wrong-issuer",
                f"the discovery document at {url} names issuer "
                f"{_shown(document.get('issuer'), 200)}, expected {issuer!r}",
            )
        # (3) the keys: jwks_uri is required, over https.
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not _secure_url(jwks_uri):
            raise IdTokenError(
                "jwks-unavailable",
                f"the discovery document at {url} has no https jwks_uri: {_shown(jwks_uri)}",
            )
        # (4) accept only algorithms the provider says it signs ID tokens with.
        offered = document.get("id_token_signing_alg_values_supported")
        if isinstance(offered, list):
            narrowed = [alg for alg in algorithms if alg in offered]
            if not narrowed:
                raise IdTokenError(
                    "alg-not-allowed",
                    f"the provider signs ID tokens with {_shown(offered, 200)}; "
                    f"this hub accepts only {list(algorithms)}",
                )
            algorithms = narrowed
        jwks = JwksCache(
            jwks_url=jwks_uri,
            fetch=fetch,
            ttl_seconds=jwks_ttl_seconds,
            min_refresh_interval=jwks_min_refresh_interval,
            clock=jwks_clock,
        )
        return cls(
            issuer=issuer,
            client_id=client_id,
            jwks=jwks,
            algorithms=algorithms,
            leeway_seconds=leeway_seconds,
            max_age_seconds=max_age_seconds,
            clock=clock,
            metadata=document,
        )

    async def verify(self, token: str, *, nonce: str | None) -> dict[str, Any]:
        """Verify ``token`` and return its claims; raise :class:`IdTokenError` if it fails.

        ``nonce`` is the value sent in the authentication request. Pass ``None`` only for
        an ID token from a refresh-token grant, where OIDC Core 12.2 lets the provider
        leave the nonce out; then a nonce claim is not checked.
        """
        if nonce == "":
            raise UsageError("nonce must be None or the non-empty value that was sent")

        # (1) Parse the JOSE header without trusting it (Core 3.1.3.7 items 1, 7, 8;
        #     RFC 8725 3.1). Only the compact JWS form; JWE (5 segments) is not supported.
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
            raise IdTokenError("malformed", "the ID token is not a string of sane length")
        segments = token.split(".")
        if len(segments) != 3:
            kind = " (an encrypted JWE?)" if len(segments) == 5 else ""
            raise IdTokenError(
                "malformed",
                f"an ID token has 3 dot-separated segments; this one has {len(segments)}{kind}",
            )
        header_bytes = _b64url_decode(segments[0], "JOSE header")
        _b64url_decode(segments[1], "payload")
        _b64url_decode(segments[2], "signature")
        try:
            header = _json_object(header_bytes)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise IdTokenError("malformed", f"the JOSE header is not valid: {exc}") from None
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise IdTokenError("malformed", "the JOSE header has no alg")
        if alg not in self.algorithms:
            # never "none", never HS* (a public key used as an HMAC secret), nothing unplanned
            raise IdTokenError(
                "alg-not-allowed",
                f"alg {_shown(alg)} is not allowed; expected one of {list(self.algorithms)}",
            )
        if "crit" in header:
            raise IdTokenError(
                "malformed",
                f"critical header parameters are not supported: {_shown(header['crit'])}",
            )
        if header.get("b64", True) is not True:
            raise IdTokenError("malformed", "unencoded payloads (b64) are not supported")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ID_TOKEN_TYPES):
            raise IdTokenError(
                "malformed", f"typ {_shown(typ)} is not an ID token type (expected 'JWT')"
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise IdTokenError("malformed", "the JOSE header's kid is not a string")

        # (2) Find the key in the provider's JWKS by kid; its type must fit alg
        #     (Core 10.1). An unknown kid triggers one rate-limited refetch (rotation).
        key = await self.jwks.key_for(kid, alg)

        # (3) Verify the signature (Core 3.1.3.7 item 6) with exactly the algorithm
        #     checked in (1) and the key from (2), then parse the claims it covers.
        try:
            payload = self._jws.decode(
                token, key, algorithms=[alg], options={"enforce_minimum_key_length": True}
            )
        except InvalidSignatureError:
            raise IdTokenError(
                "bad-signature",
                f"the {alg} signature does not verify with {_kid_text(kid)} "
                f"from {self.jwks.jwks_url}",
            ) from None
        except (InvalidAlgorithmError, InvalidKeyError) as exc:
            raise IdTokenError("unknown-key", f"{_kid_text(kid)} cannot verify: {exc}") from None
        except PyJWTError as exc:
            raise IdTokenError("malformed", f"the ID token is not a valid JWS: {exc}") from None
        try:
            claims = _json_object(payload)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise IdTokenError(
                "malformed", f"the ID token's payload is not a JSON object: {exc}"
            ) from None

        # (4) iss must equal the issuer exactly (Core 3.1.3.7 item 2).
        if "iss" not in claims:
            raise IdTokenError("missing-claim", "the ID token has no 'iss' claim")
        if claims["iss"] != self.issuer:
            raise IdTokenError(
                "wrong-issuer",
                f"claim 'iss' is {_shown(claims['iss'], 200)}, expected {self.issuer!r}",
            )

        # (5) aud must contain our client_id (item 3); with several audiences azp must be
        #     present (item 4), and when azp is present it must be our client_id (item 5).
        if "aud" not in claims:
            raise IdTokenError("missing-claim", "the ID token has no 'aud' claim")
        aud = claims["aud"]
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            raise IdTokenError("malformed", "claim 'aud' must be a string or a list of strings")
        if self.client_id not in audiences:
            raise IdTokenError(
                "wrong-audience",
                f"claim 'aud' is {_shown(aud, 200)}, which does not include {self.client_id!r}",
            )
        if len(set(audiences)) > 1 and "azp" not in claims:
            raise IdTokenError(
                "azp-mismatch",
                "claim 'azp' is required when 'aud' has several values "
                f"({len(set(audiences))}), and it is missing",
            )
        if "azp" in claims and claims["azp"] != self.client_id:
            raise IdTokenError(
                "azp-mismatch",
                f"claim 'azp' is {_shown(claims['azp'])}, expected {self.client_id!r}",
            )

        # (6) Times (items 9, 10, 13; RFC 7519 4.1.5): exp in the future, iat and nbf not
        #     in the future, each with leeway; with max_age, auth_time (or iat) recent.
        now = self._clock()
        leeway = self.leeway_seconds
        exp = _numeric_date(claims, "exp")
        iat = _numeric_date(claims, "iat")
        nbf = _numeric_date(claims, "nbf")
        auth_time = _numeric_date(claims, "auth_time")
        if exp is None or iat is None:
            missing = "exp" if exp is None else "iat"
            raise IdTokenError("missing-claim", f"the ID token has no {missing!r} claim")
        if now >= exp + leeway:
            raise IdTokenError(
                "expired",
                f"the ID token expired at {_when(exp)} (now {_when(now)}, leeway {leeway:g} s)",
            )
        if iat > now + leeway:
            raise IdTokenError(
                "issued-in-future",
                f"claim 'iat' is {_when(iat)}, after now ({_when(now)}, leeway {leeway:g} s)",
            )
        if nbf is not None and nbf > now + leeway:
            raise IdTokenError(
                "not-yet-valid",
                f"the ID token is not valid before {_when(nbf)} "
                f"(now {_when(now)}, leeway {leeway:g} s)",
            )
        if self.max_age_seconds is not None:
            authenticated = auth_time if auth_time is not None else iat
            source = "auth_time" if auth_time is not None else "iat"
            if now - authenticated > self.max_age_seconds + leeway:
                raise IdTokenError(
                    "too-old",
                    f"the user authenticated at {_when(authenticated)} (claim {source!r}), "
                    f"more than max_age {self.max_age_seconds:g} s ago",
                )

        # (7) nonce (item 11): when one was sent it must come back unchanged; compared in
        #     constant time. A refresh (nonce=None) does not check it (Core 12.2).
        if nonce is not None:
            if "nonce" not in claims:
                raise IdTokenError(
                    "nonce-missing", "the ID token has no 'nonce' claim, but one was sent"
                )
            got = claims["nonce"]
            if not isinstance(got, str) or not hmac.compare_digest(
                got.encode("utf-8"), nonce.encode("utf-8")
            ):
                raise IdTokenError(
                    "nonce-mismatch",
                    "claim 'nonce' does not match the nonce sent in the authentication request",
                )

        # (8) sub identifies the user (Core 2): present and a non-empty string.
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise IdTokenError(
                "missing-claim", "the ID token has no 'sub' claim (a non-empty string)"
            )
        return claims


# --- HTTP ---------------------------------------------------------------------------------


def tornado_fetch(*, validate_cert: bool = True, timeout: float = 10) -> Fetch:
    """A :data:`Fetch` over HTTP(S) with tornado's ``AsyncHTTPClient`` (the hub's loop).

    Redirects are not followed and a non-2xx status, a network error, or a body larger
    than :data:`MAX_DOCUMENT_BYTES` raises ``IdTokenError("jwks-unavailable")`` naming
    the URL.
    """

    async def fetch(url: str) -> bytes:
        request = HTTPRequest(
            url,
            method="GET",
            headers={"Accept": "application/json"},
            connect_timeout=timeout,
            request_timeout=timeout,
            validate_cert=validate_cert,
            follow_redirects=False,
        )
        try:
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except (HTTPClientError, OSError, ValueError) as exc:
            raise IdTokenError("jwks-unavailable", f"cannot fetch {url}: {exc}") from exc
        if not 200 <= response.code < 300:
            raise IdTokenError(
                "jwks-unavailable", f"GET {url} returned HTTP {response.code}, expected 2xx"
            )
        body = response.body or b""
        if len(body) > MAX_DOCUMENT_BYTES:
            raise IdTokenError(
                "jwks-unavailable", f"GET {url} returned {len(body)} bytes; too large"
            )
        return body

    return fetch
