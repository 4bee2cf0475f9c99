"""Start, reconfigure and stop the development OpenID provider (``server.mjs``, on Node).

:class:`DevIdP` writes the provider's state into ``state_dir`` (mode 0700; every file in it
mode 0600): ``config.json`` (clients and their secrets, cookie keys, TTLs), ``jwks.json``
(the private signing keys; the first one signs, the others are only published),
``users.json`` (the users database, re-read by the provider on every lookup) and
``store.json`` (the provider's sessions, grants and tokens, so a restart keeps them). It then
runs ``node server.mjs`` and waits for its ``ztlab-devidp ready <issuer>`` line.

Example::

    idp = DevIdP(
        port=8009,
        clients=[OIDCClient(client_id="hub", client_secret=secret,
                            redirect_uris=("http://127.0.0.1:8000/hub/oauth_callback",))],
        users=demo_users(),
        state_dir=Path("/var/lib/ztlab/devidp"),
    )
    with idp:
        idp.set_user("bob", groups=["model-approvers", "ml-trainers"])
        idp.rotate_keys()
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Literal, Self

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from ztlab.common.errors import ZtlabError

__all__ = [
    "NPM_INSTALL_COMMAND",
    "READY_PREFIX",
    "DevIdP",
    "DevIdPError",
    "DevIdPNotInstalledError",
    "OIDCClient",
    "demo_users",
    "generate_signing_jwk",
    "public_jwks",
    "run_forever",
]

log = logging.getLogger("ztlab.dev.idp")

#: what installs the Node packages (``oidc-provider``, ``configurable-http-proxy``)
NPM_INSTALL_COMMAND = "npm ci --no-audit --no-fund"
#: the line the provider prints once it listens
READY_PREFIX = "ztlab-devidp ready "

SigningAlg = Literal["RS256", "ES256"]
JsonObject = dict[str, Any]

_USER_STR_FIELDS = ("password", "password_sha256", "email", "name", "acr")
_USER_LIST_FIELDS = ("groups", "amr")
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class DevIdPError(ZtlabError):
    """The development identity provider could not be configured, started or stopped."""


class DevIdPNotInstalledError(DevIdPError):
    """Node or the ``oidc-provider`` npm package is missing."""


# ---------------------------------------------------------------------------------------
# clients, users, keys


@dataclass(frozen=True, kw_only=True)
class OIDCClient:
    """A relying party registered at the development IdP (confidential, ``client_secret_basic``).

    It may use the authorization-code grant (PKCE S256 required) and the refresh-token grant.
    """

    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]
    post_logout_redirect_uris: tuple[str, ...] = ()
    client_name: str | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> OIDCClient:
        """Build a client from ``{"client_id", "client_secret", "redirect_uris", ...}``."""

        def strings(key: str) -> tuple[str, ...]:
            value = data.get(key, ())
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise DevIdPError(f"devidp client {data.get('client_id')!r}: {key} must be a list")
            if not all(isinstance(v, str) for v in value):
                raise DevIdPError(f"devidp client {data.get('client_id')!r}: {key} must be strings")
            return tuple(str(v) for v in value)

        client_id = data.get("client_id")
        client_secret = data.get("client_secret")
        name = data.get("client_name")
        if not isinstance(client_id, str) or not client_id:
            raise DevIdPError("devidp client: client_id must be a non-empty string")
        if not isinstance(client_secret, str) or not client_secret:
            raise DevIdPError(f"devidp client {client_id!r}: client_secret must be a string")
        return cls(
            client_id=client_id,
            client_secret=client_secret,
            redirect_uris=strings("redirect_uris"),
            post_logout_redirect_uris=strings("post_logout_redirect_uris"),
            client_name=name if isinstance(name, str) else None,
        )

    def to_json(self) -> JsonObject:
        """The client as ``server.mjs`` reads it."""
        out: JsonObject = {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "redirect_uris": list(self.redirect_uris),
            "post_logout_redirect_uris": list(self.post_logout_redirect_uris),
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["authorization_code", "refresh_token"],
        }
        if self.client_name:
            out["client_name"] = self.client_name
        return out


def demo_users() -> dict[str, dict[str, object]]:
    """The demonstration users (password ``<name>-password``).

    - ``alice``: ``ml-trainers``; the provider did MFA (``amr`` pwd+otp, ``acr`` mfa)
    - ``bob``: ``model-approvers``; password only, so the hub asks for its own TOTP
    - ``carol``: ``data-stewards``; password only
    - ``dave``: no groups, so no role maps to him
    - ``erin``: ``ztlab-admins``; password and a hardware key
    - ``frank``: disabled, cannot log in
    """

    def user(
        name: str,
        groups: list[str],
        amr: list[str],
        acr: str,
        *,
        disabled: bool = False,
    ) -> dict[str, object]:
        return {
            "password": f"{name}-password",
            "email": f"{name}@example.org",
            "name": name.capitalize(),
            "groups": groups,
            "amr": amr,
            "acr": acr,
            "disabled": disabled,
        }

    mfa, pwd = "urn:ztlab:mfa", "urn:ztlab:pwd"
    return {
        "alice": user("alice", ["ml-trainers"], ["pwd", "otp"], mfa),
        "bob": user("bob", ["model-approvers"], ["pwd"], pwd),
        "carol": user("carol", ["data-stewards"], ["pwd"], pwd),
        "dave": user("dave", [], ["pwd"], pwd),
        "erin": user("erin", ["ztlab-admins"], ["pwd", "hwk"], mfa),
        "frank": user("frank", ["ml-trainers"], ["pwd"], pwd, disabled=True),
    }


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: Mapping[str, object]) -> str:
    """The RFC 7638 SHA-256 thumbprint of an RSA or EC JWK (base64url)."""
    kty = jwk.get("kty")
    members: tuple[str, ...]
    if kty == "RSA":
        members = ("e", "kty", "n")
    elif kty == "EC":
        members = ("crv", "kty", "x", "y")
    else:
        raise DevIdPError(f"devidp: unsupported key type {kty!r} (expected RSA or EC)")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def generate_signing_jwk(alg: SigningAlg = "RS256") -> JsonObject:
    """A new private signing key as a JWK: RSA-2048 for RS256, P-256 for ES256.

    ``kid`` is the key's RFC 7638 thumbprint; ``use`` is ``sig``.
    """
    jwk: JsonObject
    if alg == "RS256":
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = dict(RSAAlgorithm.to_jwk(rsa_key, as_dict=True))
    elif alg == "ES256":
        ec_key = ec.generate_private_key(ec.SECP256R1())
        jwk = dict(ECAlgorithm.to_jwk(ec_key, as_dict=True))
    else:
        raise DevIdPError(f"devidp: unsupported signing algorithm {alg!r} (RS256 or ES256)")
    jwk.pop("key_ops", None)
    jwk.update(kid=jwk_thumbprint(jwk), alg=alg, use="sig")
    return jwk


def public_jwks(jwks: Mapping[str, object]) -> JsonObject:
    """The public half of a private JWKS (what the provider publishes at ``/jwks``)."""
    keys = jwks.get("keys")
    if not isinstance(keys, list):
        raise DevIdPError("devidp: a JWKS needs a 'keys' list")
    return {
        "keys": [
            {k: v for k, v in key.items() if k not in _PRIVATE_JWK_MEMBERS}
            for key in keys
            if isinstance(key, dict)
        ]
    }


def _check_jwks(jwks: Mapping[str, object]) -> list[JsonObject]:
    keys = jwks.get("keys")
    if not isinstance(keys, list) or not keys:
        raise DevIdPError("devidp: jwks must be a JWKS with at least one private key")
    out: list[JsonObject] = []
    for i, key in enumerate(keys):
        if not isinstance(key, dict) or "d" not in key:
            raise DevIdPError(f"devidp: jwks key {i} is not a private JWK")
        if key.get("kty") not in ("RSA", "EC"):
            raise DevIdPError(f"devidp: jwks key {i}: kty must be RSA or EC")
        key = dict(key)
        key.setdefault("kid", jwk_thumbprint(key))
        key.setdefault("alg", "ES256" if key["kty"] == "EC" else "RS256")
        key.setdefault("use", "sig")
        out.append(key)
    return out


def _check_user(name: str, fields: Mapping[str, object]) -> dict[str, object]:
    if not isinstance(name, str) or not name:
        raise DevIdPError(f"devidp users: user name {name!r} must be a non-empty string")
    for key in _USER_STR_FIELDS:
        if key in fields and not isinstance(fields[key], str):
            raise DevIdPError(f"devidp users: {name}.{key} must be a string")
    for key in _USER_LIST_FIELDS:
        value = fields.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DevIdPError(f"devidp users: {name}.{key} must be a list of strings")
    if not isinstance(fields.get("disabled", False), bool):
        raise DevIdPError(f"devidp users: {name}.disabled must be true or false")
    if "password" not in fields and "password_sha256" not in fields:
        raise DevIdPError(f"devidp users: {name} needs a password (or password_sha256)")
    return dict(fields)


# ---------------------------------------------------------------------------------------
# files


def _write_private_json(path: Path, data: object) -> None:
    """Write ``data`` as JSON to ``path`` atomically, mode 0600 from the start."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), 0o600)
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _script_path() -> Path:
    return (Path(__file__).resolve().parent / "server.mjs").resolve()


def _find_node_modules(start: Path) -> Path | None:
    for directory in (start, *start.parents):
        candidate = directory / "node_modules"
        if (candidate / "oidc-provider" / "package.json").is_file():
            return candidate
    return None


def _project_root(start: Path) -> Path | None:
    for directory in (start, *start.parents):
        if (directory / "package.json").is_file():
            return directory
    return None


# ---------------------------------------------------------------------------------------
# the provider process


class DevIdP:
    """The development OpenID provider: ``node server.mjs`` on ``host:port``.

    Keyword-only; nothing is written or started before :meth:`start`. With ``port=0`` a free
    port is chosen now, so :attr:`issuer` is known before the start. Without ``jwks`` the
    keys in ``state_dir/jwks.json`` are reused if present, or a new ``key_alg`` key is made.
    """

    def __init__(
        self,
        *,
        users: Mapping[str, Mapping[str, object]],
        clients: Sequence[OIDCClient | Mapping[str, object]],
        state_dir: Path,
        port: int = 0,
        issuer: str | None = None,
        host: str = "127.0.0.1",
        jwks: Mapping[str, object] | None = None,
        key_alg: SigningAlg = "RS256",
        id_token_ttl: int = 3600,
        access_token_ttl: int = 3600,
        refresh_token_ttl: int = 24 * 3600,
        ready_timeout: float = 20.0,
        node: str | None = None,
        node_modules: Path | None = None,
    ) -> None:
        if not clients:
            raise DevIdPError("devidp: register at least one client")
        for name, value in (
            ("id_token_ttl", id_token_ttl),
            ("access_token_ttl", access_token_ttl),
            ("refresh_token_ttl", refresh_token_ttl),
        ):
            if value <= 0:
                raise DevIdPError(f"devidp: {name} must be a positive number of seconds")
        self._clients = tuple(
            c if isinstance(c, OIDCClient) else OIDCClient.from_mapping(c) for c in clients
        )
        self._users = {name: _check_user(name, fields) for name, fields in users.items()}
        self._state_dir = Path(state_dir)
        self._host = host
        self._port = port or _free_port(host)
        self._issuer = (issuer or f"http://{host}:{self._port}").rstrip("/")
        self._keys = _check_jwks(jwks) if jwks is not None else None
        self._key_alg: SigningAlg = key_alg
        self._ttls = {
            "id_token_ttl": int(id_token_ttl),
            "access_token_ttl": int(access_token_ttl),
            "refresh_token_ttl": int(refresh_token_ttl),
        }
        self._ready_timeout = ready_timeout
        self._node = node
        self._node_modules = node_modules
        self._cookie_keys = [secrets.token_urlsafe(32)]
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._lines: collections.deque[str] = collections.deque(maxlen=200)
        self._lock = threading.Lock()

    # -- where things are ---------------------------------------------------------------

    @property
    def issuer(self) -> str:
        """The issuer URL, e.g. ``http://127.0.0.1:8009`` (no trailing slash)."""
        return self._issuer

    @property
    def port(self) -> int:
        return self._port

    @property
    def discovery_url(self) -> str:
        return f"{self._issuer}/.well-known/openid-configuration"

    @property
    def jwks_url(self) -> str:
        return f"{self._issuer}/jwks"

    @property
    def authorization_url(self) -> str:
        return f"{self._issuer}/auth"

    @property
    def token_url(self) -> str:
        return f"{self._issuer}/token"

    @property
    def userinfo_url(self) -> str:
        return f"{self._issuer}/me"

    @property
    def end_session_url(self) -> str:
        return f"{self._issuer}/session/end"

    @property
    def state_dir(self) -> Path:
        return self._state_dir

    @property
    def config_file(self) -> Path:
        return self._state_dir / "config.json"

    @property
    def users_file(self) -> Path:
        return self._state_dir / "users.json"

    @property
    def jwks_file(self) -> Path:
        return self._state_dir / "jwks.json"

    @property
    def log_file(self) -> Path:
        """Everything the provider printed (appended across restarts)."""
        return self._state_dir / "devidp.log"

    @property
    def clients(self) -> tuple[OIDCClient, ...]:
        return self._clients

    @property
    def users(self) -> dict[str, dict[str, object]]:
        """A copy of the users database as last written."""
        return json.loads(json.dumps(self._users))  # type: ignore[no-any-return]

    @property
    def signing_kid(self) -> str:
        """The ``kid`` of the key that signs new tokens."""
        return str(self._ensure_keys()[0]["kid"])

    @property
    def jwks(self) -> JsonObject:
        """The published (public) JWKS: the signing key first."""
        return public_jwks({"keys": self._ensure_keys()})

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def output(self) -> str:
        """The provider's last lines of output (for error messages and test failures)."""
        return "\n".join(self._lines)

    # -- users --------------------------------------------------------------------------

    def write_users(self, users: Mapping[str, Mapping[str, object]]) -> None:
        """Replace the users database (atomically; the provider sees it on its next lookup)."""
        checked = {name: _check_user(name, fields) for name, fields in users.items()}
        with self._lock:
            self._users = checked
            self._prepare_state_dir()
            _write_private_json(self.users_file, self._users)

    def set_user(self, name: str, **fields: object) -> None:
        """Add a user or change some of their fields (``groups=[...]``, ``disabled=True``)."""
        users = self.users
        users[name] = {**users.get(name, {}), **fields}
        self.write_users(users)

    # -- keys ---------------------------------------------------------------------------

    def _ensure_keys(self) -> list[JsonObject]:
        if self._keys is None:
            try:
                stored = json.loads(self.jwks_file.read_text(encoding="utf-8"))
            except FileNotFoundError:
                stored = None
            except (OSError, ValueError) as exc:
                raise DevIdPError(f"{self.jwks_file}: cannot read the IdP's keys: {exc}") from exc
            if stored is not None:
                self._keys = _check_jwks(stored)
            else:
                self._keys = [generate_signing_jwk(self._key_alg)]
        return self._keys

    def rotate_keys(self) -> str:
        """Sign with a new key from now on, keep publishing the previous one; return its kid.

        A running provider is restarted (sessions, grants and refresh tokens survive it).
        """
        old = self._ensure_keys()[0]
        alg: SigningAlg = "ES256" if old.get("kty") == "EC" else "RS256"
        new = generate_signing_jwk(alg)
        self._keys = [new, old]
        if self.running:
            self.stop()
            self.start()
        else:
            self._prepare_state_dir()
            _write_private_json(self.jwks_file, {"keys": self._keys})
        return str(new["kid"])

    # -- lifecycle ----------------------------------------------------------------------

    def _prepare_state_dir(self) -> None:
        try:
            self._state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._state_dir.chmod(0o700)
        except OSError as exc:
            raise DevIdPError(
                f"devidp: cannot create the state directory {self._state_dir}: {exc.strerror}"
            ) from exc

    def _locate(self) -> tuple[str, Path, Path]:
        node = self._node or shutil.which("node")
        if node is not None and not (Path(node).is_file() and os.access(node, os.X_OK)):
            node = None
        script = _script_path()
        root = _project_root(script.parent)
        install_hint = (
            f"run `{NPM_INSTALL_COMMAND}` in {root}" if root else f"run `{NPM_INSTALL_COMMAND}`"
        ) + " (the `make up` and `make test` targets do it)"
        if node is None:
            raise DevIdPNotInstalledError(
                "the development IdP needs Node.js (>= 20), and "
                + (f"{self._node} is not executable" if self._node else "`node` is not on PATH"),
                hint="install Node.js 20 or later (Debian: apt-get install nodejs npm), then "
                + install_hint,
            )
        if not script.is_file():
            raise DevIdPNotInstalledError(f"the development IdP's script is missing: {script}")
        from ztlab.common.installed import node_modules_candidates

        candidates = [self._node_modules, *node_modules_candidates()]
        node_modules = next(
            (
                c
                for c in candidates
                if c is not None and (c / "oidc-provider" / "package.json").is_file()
            ),
            None,
        ) or _find_node_modules(script.parent)
        if node_modules is None:
            raise DevIdPNotInstalledError(
                "the development IdP needs the npm package oidc-provider, which is not installed",
                hint=install_hint,
            )
        return node, script, node_modules

    def _write_state(self) -> None:
        self._prepare_state_dir()
        keys = self._ensure_keys()
        _write_private_json(self.jwks_file, {"keys": keys})
        _write_private_json(self.users_file, self._users)
        config: JsonObject = {
            "issuer": self._issuer,
            "host": self._host,
            "port": self._port,
            "clients": [c.to_json() for c in self._clients],
            "jwks_file": str(self.jwks_file),
            "users_file": str(self.users_file),
            "store_file": str(self._state_dir / "store.json"),
            "cookie_keys": self._cookie_keys,
            **self._ttls,
        }
        _write_private_json(self.config_file, config)

    def start(self) -> Self:
        """Write the state files, start the provider and wait until it listens."""
        if self.running:
            raise DevIdPError(f"devidp: already running at {self._issuer}")
        node, script, node_modules = self._locate()
        self._write_state()
        env = {
            **os.environ,
            "ZTLAB_DEVIDP_CONFIG": str(self.config_file),
            "ZTLAB_DEVIDP_NODE_MODULES": str(node_modules),
            "ZTLAB_DEVIDP_EXIT_WITH_PARENT": "1",
        }
        self._ready.clear()
        self._lines.clear()
        try:
            log_fh = self.log_file.open("a", encoding="utf-8")
            self.log_file.chmod(0o600)
            proc = subprocess.Popen(
                [node, str(script)],
                cwd=self._state_dir,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                encoding="utf-8",
                errors="replace",
                start_new_session=True,
            )
        except OSError as exc:
            raise DevIdPError(f"devidp: cannot run {node}: {exc.strerror}") from exc
        self._proc = proc
        assert proc.stdout is not None
        self._reader = threading.Thread(
            target=self._pump, args=(proc.stdout, log_fh), name="devidp-output", daemon=True
        )
        self._reader.start()

        deadline = time.monotonic() + self._ready_timeout
        while not self._ready.wait(0.02):
            if proc.poll() is not None:
                self._join_reader()
                self._proc = None
                raise DevIdPError(
                    f"devidp: the provider exited with status {proc.returncode} before it was "
                    f"ready on {self._issuer}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise DevIdPError(
                    f"devidp: the provider was not ready on {self._issuer} within "
                    f"{self._ready_timeout:g} s:\n{self.output()}"
                )
        log.info("development IdP ready at %s (pid %d)", self._issuer, proc.pid)
        return self

    def _pump(self, stream: IO[str], log_fh: IO[str]) -> None:
        with log_fh:
            for raw in stream:
                line = raw.rstrip("\n")
                self._lines.append(line)
                log_fh.write(raw)
                log_fh.flush()
                log.info("%s", line)
                if line.startswith(READY_PREFIX):
                    self._ready.set()

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the provider (SIGTERM, then SIGKILL after ``timeout`` s); its exit status.

        Idempotent: ``None`` when it was not running.
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        self._join_reader()
        self._proc = None
        return proc.returncode

    def restart(self) -> None:
        """Stop and start again with the current clients, users and keys."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"DevIdP(issuer={self._issuer!r}, {state})"


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_forever(idp: DevIdP) -> None:
    """Start ``idp`` and keep it running until SIGTERM or SIGINT (main thread only)."""
    with _stop_on_signals() as stop, idp:
        while not stop.wait(0.5):
            if not idp.running:
                raise DevIdPError(f"devidp: the provider exited unexpectedly:\n{idp.output()}")
