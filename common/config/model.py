"""The ``ztlab.toml`` configuration model (pydantic v2).

Every model is frozen and rejects unknown keys. Types are strict where TOML has a native
type (an integer is never read from a string), paths must be absolute, and defaults that
depend on other keys (the audit log lives under ``state_dir`` unless set) are computed by
methods when asked, not stored. Cross-references (roles named by groups and GPU pools, a
GPU listed in more than one place) are checked once the structure is valid.

The field descriptions are the configuration reference: the docs generate it from them.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    SecretStr,
    Strict,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ztlab.common.config._units import SIZE_EXPECTED, format_size, parse_size
from ztlab.common.errors import ConfigError, SecretError

__all__ = [
    "DEFAULT_ROLE_NAMES",
    "AuditConfig",
    "Expect",
    "GpuConfig",
    "GpuMonitorConfig",
    "GpuPool",
    "HubConfig",
    "InvalidConfigError",
    "LoginConfig",
    "PolicyConfig",
    "Problem",
    "RoleConfig",
    "RunsConfig",
    "SandboxConfig",
    "ScheduleConfig",
    "SecretRef",
    "SecretsConfig",
    "ZtlabConfig",
    "default_roles",
    "describe_value",
    "key_path",
    "toml_literal",
]


# --------------------------------------------------------------------------------------
# Problems and their wording
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a configuration: where (a TOML key path) and what."""

    #: ``gpu.pools.research.gpus[1]``, ``line 3, column 7``, or ``""`` for the whole file
    path: str
    #: what is wrong and what was expected; never contains a secret
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InvalidConfigError(ConfigError):
    """A configuration that does not validate: every problem found, in one message.

    The message is ``SOURCE: PATH: MESSAGE`` for one problem, or a ``SOURCE: N problems``
    header followed by one indented ``PATH: MESSAGE`` line per problem.
    """

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems: tuple[Problem, ...] = tuple(problems)
        if len(self.problems) == 1:
            message = f"{source}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  {p}" for p in self.problems)
            message = f"{source}: {len(self.problems)} problems\n{lines}"
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Expect:
    """Annotation metadata: how error messages describe what a key expects."""

    text: str


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def key_path(parts: Sequence[str | int]) -> str:
    """A TOML key path for messages: ``("groups", "ml team", 0)`` -> ``groups."ml team"[0]``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        key = part if _BARE_KEY.match(part) else json.dumps(part, ensure_ascii=False)
        out = f"{out}.{key}" if out else key
    return out


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, datetime):
        return "date-time"
    if isinstance(value, date):
        return "date"
    if isinstance(value, time):
        return "time"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


_MAX_SHOWN = 60


def toml_literal(value: object) -> str:
    """``value`` as written in TOML, shortened for messages: ``"two"``, ``-1``, ``true``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        shown = value if len(value) <= _MAX_SHOWN else value[: _MAX_SHOWN - 3] + "..."
        return json.dumps(shown, ensure_ascii=False)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return json.dumps(str(value), ensure_ascii=False)


def describe_value(value: object, *, sensitive: bool = False) -> str:
    """What a wrong value was: ``"two" (string)``; only its type when ``sensitive``."""
    kind = _toml_type(value)
    if isinstance(value, Mapping | list | tuple) or sensitive:
        article = "an" if kind[0] in "aeiou" else "a"
        return f"{article} {kind}"
    return f"{toml_literal(value)} ({kind})"


def _fail(message: str) -> PydanticCustomError:
    """A validation error whose message is ours, verbatim."""
    return PydanticCustomError("ztlab", "{message}", {"message": message})


# --------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------


def _require_absolute(path: Path) -> Path:
    if not path.is_absolute():
        raise _fail(f"expected an absolute path, got {toml_literal(str(path))}")
    return path


#: an absolute filesystem path, written as a TOML string
AbsPath = Annotated[
    Path, Strict(False), AfterValidator(_require_absolute), Expect("an absolute path")
]


def _check_http_url(url: str) -> str:
    expected = 'expected an http:// or https:// URL such as "http://127.0.0.1:8000"'
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError when out of range or not a number
    except ValueError:
        raise _fail(f"{expected}, got {toml_literal(url)}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fail(f"{expected}, got {toml_literal(url)}")
    if parts.username is not None or parts.password is not None:
        raise _fail(f"{expected} (without a user name or password), got {toml_literal(url)}")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise _fail(f"{expected} (without a query or fragment), got {toml_literal(url)}")
    del port
    return url


HttpUrlText = Annotated[str, AfterValidator(_check_http_url), Expect("an http:// or https:// URL")]


def _check_webhook(url: str) -> str:
    if url and not re.match(r"https?://[^/\s]+", url):
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    return url


#: a webhook's address, or empty for none
WebhookUrl = Annotated[str, AfterValidator(_check_webhook), Expect("an http(s):// URL or empty")]

_ORIGIN_RE = re.compile(r"[\x21-\x2a\x2c-\x7e]+\Z")  # printable ASCII, no space, no "+"


def _check_origin(origin: str) -> str:
    if not _ORIGIN_RE.match(origin):
        raise _fail(
            'expected a checkpoint origin such as "ztlab.local/audit" (printable ASCII '
            f'without spaces or "+"), got {toml_literal(origin)}'
        )
    return origin


Origin = Annotated[str, AfterValidator(_check_origin), Expect("a checkpoint origin")]

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_GPU_INDEX_RE = re.compile(r"\d{1,4}\Z")
_GPU_UUID_RE = re.compile(rf"GPU-({_UUID})\Z", re.IGNORECASE)
_MIG_UUID_RE = re.compile(rf"MIG-({_UUID})\Z", re.IGNORECASE)
_MIG_LEGACY_RE = re.compile(rf"MIG-GPU-({_UUID})/(\d+)/(\d+)\Z", re.IGNORECASE)
_GPU_EXPECTED = (
    'a GPU id: an index such as "0", a GPU UUID "GPU-<uuid>" or a MIG device "MIG-<uuid>"'
)


def _normalize_gpu_id(gpu: str) -> str:
    if _GPU_INDEX_RE.match(gpu):
        return str(int(gpu))
    if match := _GPU_UUID_RE.match(gpu):
        return f"GPU-{match[1].lower()}"
    if match := _MIG_UUID_RE.match(gpu):
        return f"MIG-{match[1].lower()}"
    if match := _MIG_LEGACY_RE.match(gpu):
        return f"MIG-GPU-{match[1].lower()}/{int(match[2])}/{int(match[3])}"
    raise _fail(f"expected {_GPU_EXPECTED}, got {toml_literal(gpu)}")


#: a GPU as NVIDIA tools name it; UUIDs are normalized to lower-case hex
GpuId = Annotated[str, AfterValidator(_normalize_gpu_id), Expect(_GPU_EXPECTED)]

_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
_NAME_RULE = 'lower-case letters, digits, "-" and "_", starting with a letter'
RoleName = Annotated[
    str, StringConstraints(pattern=_NAME_PATTERN), Expect(f"a role name ({_NAME_RULE})")
]
PoolName = Annotated[
    str, StringConstraints(pattern=_NAME_PATTERN), Expect(f"a pool name ({_NAME_RULE})")
]
GroupName = Annotated[str, StringConstraints(min_length=1), Expect("a non-empty group name")]
EnvName = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"),
    Expect(
        "the name of an environment variable (letters, digits and _, not starting with a digit)"
    ),
]


def _parse_memory(value: object) -> int:
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError:
            raise _fail(f"expected {SIZE_EXPECTED}, got {toml_literal(value)}") from None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise _fail(f"expected {SIZE_EXPECTED}, got {describe_value(value)}")


#: bytes; written as ``"16G"`` (or a positive integer of bytes), shown as ``"16G"``
MemorySize = Annotated[
    int,
    BeforeValidator(_parse_memory),
    PlainSerializer(format_size, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([KkMmGgTt]([Ii]?[Bb])?|[Bb])?$"},
                {"type": "integer", "exclusiveMinimum": 0},
            ]
        },
        mode="validation",
    ),
    Expect(SIZE_EXPECTED),
]


_RAW_FILES_EXPECTED = '"allow", "refuse" or a size such as "100M" (allowed up to that size)'


def _parse_raw_files(value: object) -> str:
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("allow", "refuse"):
            return word
        try:
            return format_size(parse_size(value))
        except ValueError:
            pass
    raise _fail(f"expected {_RAW_FILES_EXPECTED}, got {describe_value(value)}")


#: ``"allow"``, ``"refuse"`` or a size (``"100M"``): what a role may download as raw files
RawFilesRule = Annotated[str, BeforeValidator(_parse_raw_files), Expect(_RAW_FILES_EXPECTED)]


class _Model(BaseModel):
    """Common settings: frozen, no unknown keys, strict types, inputs kept out of errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, hide_input_in_errors=True)


# --------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------

_PLAIN_STRING_REFUSED: Final = (
    "secrets must come from the environment or a file, not from the configuration file; "
    'expected { env = "NAME" } or { file = "/path" }'
)
_SECRET_MAX_BYTES = 64 * 1024


class SecretRef(_Model):
    """Where a secret comes from: ``{ env = "NAME" }`` or ``{ file = "/path" }``.

    Holds only the reference; :meth:`resolve` reads the secret when called, every time.
    """

    env: EnvName | None = Field(
        default=None,
        description=(
            "Name of the environment variable that holds the secret, read when the secret is "
            'needed. Default: not set. Example: `cookie_secret = { env = "ZTLAB_COOKIE_SECRET" }`.'
        ),
    )
    file: AbsPath | None = Field(
        default=None,
        description=(
            "Absolute path of a file that holds the secret (one trailing newline is "
            "ignored). The file must not be accessible to group or others (mode 0600 or "
            "0400). Default: not set. Example: "
            '`cookie_secret = { file = "/var/lib/ztlab/secrets/cookie-secret" }`.'
        ),
    )

    _key_path: str = PrivateAttr(default="secret")

    @model_validator(mode="before")
    @classmethod
    def _refuse_plain_values(cls, data: Any) -> Any:
        if isinstance(data, str):
            raise _fail(_PLAIN_STRING_REFUSED)
        if not isinstance(data, Mapping | SecretRef):
            raise _fail(
                'expected a table { env = "NAME" } or { file = "/path" }, '
                f"got {describe_value(data, sensitive=True)}"
            )
        return data

    @model_validator(mode="after")
    def _exactly_one_source(self) -> SecretRef:
        if self.env is not None and self.file is not None:
            raise _fail("expected exactly one of env or file, got both")
        if self.env is None and self.file is None:
            raise _fail('expected exactly one of env or file, got neither; e.g. { env = "NAME" }')
        return self

    @property
    def key_path(self) -> str:
        """The key this reference was loaded from (``secrets.cookie_secret``), for messages."""
        return self._key_path

    def describe(self) -> str:
        """The reference as TOML: ``{ env = "NAME" }`` (never a value)."""
        if self.env is not None:
            return f"{{ env = {json.dumps(self.env)} }}"
        return f"{{ file = {json.dumps(str(self.file), ensure_ascii=False)} }}"

    def __repr__(self) -> str:
        return f"SecretRef({self.describe()})"

    def __str__(self) -> str:
        return self.describe()

    def resolve(self) -> SecretStr:
        """Read the secret now.

        Raises :class:`~ztlab.common.errors.SecretError` naming the key when the variable
        is unset or empty, or the file is missing, unreadable, not a regular file, empty,
        too large, not UTF-8, or accessible to group or others.
        """
        key = self._key_path
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise SecretError(
                    f"{key}: environment variable {self.env} is not set",
                    hint=f"set {self.env} in the environment of the ztlab process",
                )
            if not value:
                raise SecretError(f"{key}: environment variable {self.env} is empty")
            return SecretStr(value)
        assert self.file is not None  # guaranteed by _exactly_one_source
        return SecretStr(_read_secret_file(self.file, key))


def _read_secret_file(path: Path, key: str) -> str:
    where = f"{key}: secret file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise SecretError(f"{where} does not exist") from exc
    except PermissionError as exc:
        raise SecretError(f"{where} cannot be read: permission denied") from exc
    except OSError as exc:
        raise SecretError(f"{where} cannot be read: {exc.strerror or exc}") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise SecretError(f"{where} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            what = "readable" if mode & 0o044 else "accessible"
            raise SecretError(
                f"{where} is {what} by group or others (mode {mode:04o}); "
                "expected mode 0600 or 0400",
                hint=f"chmod 600 {path}",
            )
        try:
            raw = handle.read(_SECRET_MAX_BYTES + 1)
        except OSError as exc:
            raise SecretError(f"{where} cannot be read: {exc.strerror or exc}") from exc
    if len(raw) > _SECRET_MAX_BYTES:
        raise SecretError(f"{where} is larger than {_SECRET_MAX_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"{where} is not UTF-8 text") from None  # no bytes of it shown
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise SecretError(f"{where} is empty")
    return text


class SecretsConfig(_Model):
    """``[secrets]``: references to secrets, never the secrets themselves."""

    cookie_secret: SecretRef | None = Field(
        default=None,
        description=(
            "Key the hub signs its session cookies with: at least 32 random bytes, e.g. from "
            "`openssl rand -hex 32`. Default: not set (the hub then generates one and keeps "
            "it in `state_dir`). Example: "
            '`cookie_secret = { file = "/var/lib/ztlab/secrets/cookie-secret" }`.'
        ),
    )
    oidc_client_secret: SecretRef | None = Field(
        default=None,
        description=(
            "Client secret of the hub's OpenID Connect client, as issued by the identity "
            "provider. Default: not set (needed only for OpenID Connect login). Example: "
            '`oidc_client_secret = { env = "ZTLAB_OIDC_CLIENT_SECRET" }`.'
        ),
    )


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


class HubConfig(_Model):
    """``[hub]``: the JupyterHub control plane."""

    bind_url: HttpUrlText = Field(
        default="http://127.0.0.1:8000",
        description=(
            "URL the hub's public proxy listens on: `http://` or `https://`, a host, an "
            "optional port and an optional base path. Default: `http://127.0.0.1:8000` "
            '(this machine only). Example: `bind_url = "https://0.0.0.0:443/lab"`.'
        ),
    )
    cull_idle_seconds: int = Field(
        default=3600,
        ge=0,
        description=(
            "Stop servers idle this long, in seconds, with jupyterhub-idle-culler (their GPU "
            "leases end with them); `0` turns culling off. Default: `3600`. "
            "Example: `cull_idle_seconds = 7200`."
        ),
    )
    api_url: HttpUrlText = Field(
        default="http://127.0.0.1:8081",
        description=(
            "URL the hub's own REST API listens on (`http://` or `https://`), for the proxy "
            "and the user servers. "
            'Default: `http://127.0.0.1:8081`. Example: `api_url = "http://10.0.0.5:8081"`.'
        ),
    )

    @property
    def api_port(self) -> int:
        """The port of :attr:`api_url` (8081 where the URL names none)."""
        return urlsplit(self.api_url).port or 8081

    proxy_api_url: HttpUrlText = Field(
        default="http://127.0.0.1:8001",
        description=(
            "URL the API of the hub's proxy (Traefik) listens on, with a password the hub "
            "makes at each start; only the hub talks to it. Default: `http://127.0.0.1:8001`. "
            'Example: `proxy_api_url = "http://127.0.0.1:9001"`.'
        ),
    )


def _check_network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError as exc:
        raise _fail(
            'expected an IP network such as "10.0.0.0/8" or "127.0.0.1/32", '
            f"got {toml_literal(value)}"
        ) from exc


def _require_openid(scopes: list[str]) -> list[str]:
    if "openid" not in scopes:
        raise _fail(f'expected a list of scopes that includes "openid", got {toml_literal(scopes)}')
    return scopes


Network = Annotated[
    str,
    AfterValidator(_check_network),
    Expect('an IP network such as "10.0.0.0/8" or "127.0.0.1/32"'),
]


class LoginConfig(_Model):
    """``[login]``: OpenID Connect login with enforced MFA and short sessions."""

    issuer: HttpUrlText = Field(
        default="http://127.0.0.1:8009",
        description=(
            "Issuer URL of the OpenID Connect provider (`http://` or `https://`); its "
            "discovery document must name exactly this issuer. Default: "
            "`http://127.0.0.1:8009` (the development provider `make up` "
            'starts). Example: `issuer = "https://keycloak.example.org/realms/research"`.'
        ),
    )
    client_id: str = Field(
        default="ztlab-hub",
        min_length=1,
        description=(
            "Client id of the hub at the provider (a non-empty string); ID tokens must name "
            "it in `aud`. "
            'Default: `ztlab-hub`. Example: `client_id = "jupyterhub"`.'
        ),
    )
    username_claim: str = Field(
        default="preferred_username",
        min_length=1,
        description=(
            "ID-token or userinfo claim that holds the user name (a non-empty string). "
            'Default: `preferred_username`. Example: `username_claim = "email"`.'
        ),
    )
    groups_claim: str = Field(
        default="groups",
        min_length=1,
        description=(
            "ID-token or userinfo claim that lists the user's provider groups, which "
            "`[groups]` maps to roles (a non-empty string). "
            'Default: `groups`. Example: `groups_claim = "roles"`.'
        ),
    )
    scopes: Annotated[list[str], AfterValidator(_require_openid)] = Field(
        default_factory=lambda: ["openid", "profile", "email", "groups", "offline_access"],
        description=(
            "OAuth scopes the hub asks the provider for; include `openid`. Default: "
            '`["openid", "profile", "email", "groups", "offline_access"]`. '
            'Example: `scopes = ["openid", "email", "groups"]`.'
        ),
    )
    accepted_amr: list[str] = Field(
        default_factory=lambda: ["mfa", "otp", "hwk"],
        description=(
            "`amr` values (RFC 8176) that prove a second factor at the provider; a login "
            "whose ID token shows none of them (and no accepted `acr`) must pass the hub's "
            'TOTP step-up. Default: `["mfa", "otp", "hwk"]`. Example: `accepted_amr = ["mfa"]`.'
        ),
    )
    accepted_acr: list[str] = Field(
        default_factory=list,
        description=(
            "`acr` values that prove a second factor at the provider. Default: none. "
            'Example: `accepted_acr = ["urn:ztlab:mfa", "gold"]`.'
        ),
    )
    session_max_age_seconds: int = Field(
        default=8 * 3600,
        ge=1,
        description=(
            "Longest a hub session lasts after login, in seconds (an integer >= 1). "
            "Default: `28800` (8 hours). Example: `session_max_age_seconds = 3600`."
        ),
    )
    session_idle_seconds: int = Field(
        default=3600,
        ge=1,
        description=(
            "Seconds a session may go unused before it needs a new login (an integer >= 1). "
            "Default: `3600` (1 hour). Example: `session_idle_seconds = 900`."
        ),
    )
    auth_refresh_age_seconds: int = Field(
        default=300,
        ge=1,
        description=(
            "How often, in seconds, the hub re-checks a user with the provider (an integer "
            ">= 1); a disabled account or a removed group takes effect then, and before every "
            "spawn. Default: `300` (5 minutes). Example: `auth_refresh_age_seconds = 60`."
        ),
    )
    token_max_age_seconds: int = Field(
        default=8 * 3600,
        ge=60,
        description=(
            "Longest lifetime of an API token the hub issues, in seconds (an integer >= 60). "
            "Default: `28800` (8 hours). Example: `token_max_age_seconds = 3600`."
        ),
    )
    allowed_networks: list[Network] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description=(
            "IP networks of the client addresses allowed to log in, IPv4 or IPv6, such as "
            '"10.0.0.0/8" (a bare address is one host; host bits are ignored). Default: this '
            'machine only (`["127.0.0.0/8", "::1/128"]`). '
            'Example: `allowed_networks = ["10.20.0.0/16"]`.'
        ),
    )
    step_up_on_new_context: bool = Field(
        default=True,
        description=(
            "Ask for the hub's TOTP code again when a user logs in from a new address or "
            "browser, even with provider MFA (risk-based step-up). Default: `true`. "
            "Example: `step_up_on_new_context = false`."
        ),
    )
    totp_max_failures: int = Field(
        default=5,
        ge=1,
        le=100,
        description=(
            "Wrong TOTP codes in a row before the account is locked (an integer >= 1 and "
            "<= 100). Default: `5`. Example: `totp_max_failures = 3`."
        ),
    )
    totp_lockout_seconds: int = Field(
        default=900,
        ge=1,
        description=(
            "How long, in seconds, a locked account stays locked (an integer >= 1); an admin "
            "may unlock it sooner. Default: `900` (15 minutes). "
            "Example: `totp_lockout_seconds = 3600`."
        ),
    )
    pending_login_seconds: int = Field(
        default=300,
        ge=10,
        le=3600,
        description=(
            "How long, in seconds, a login that passed the provider may wait on its TOTP "
            "step-up before it must start over (an integer from 10 to 3600). Default: `300`. "
            "Example: `pending_login_seconds = 120`. Added in 0.3."
        ),
    )
    id_token_leeway_seconds: float = Field(
        default=30.0,
        ge=0,
        le=300,
        description=(
            "Clock skew tolerated when checking an ID token's `exp`, `iat` and `nbf`, in "
            "seconds (0 to 300). Default: `30`. Example: `id_token_leeway_seconds = 10`. "
            "Added in 0.3."
        ),
    )
    development_provider: bool = Field(
        default=False,
        description=(
            "Start the development OpenID provider (demo users, on `issuer`) with `ztlab up`; "
            "its client secret is generated under `state_dir`. Never for production. "
            "Default: `false`. Example: `development_provider = true`."
        ),
    )
    validate_provider_certificate: bool = Field(
        default=True,
        description=(
            "Verify the provider's TLS certificate. Default: `true` (turn off only for a "
            "test provider). Example: `validate_provider_certificate = false`."
        ),
    )


def _check_package_rule(value: str) -> str:
    """A package rule: ``*`` (any package) or a requirement such as ``requests>=2,<3``."""
    if value.strip() == "*":
        return "*"
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        requirement = Requirement(value)
    except InvalidRequirement as exc:
        raise ValueError(
            f'{value!r} is not a package rule: expected "*" or a name with an optional '
            f'version range, such as "requests>=2,<3" ({exc})'
        ) from None
    if requirement.url or requirement.marker or requirement.extras:
        raise ValueError(
            f"{value!r}: a package rule is a name and a version range (no URL, extras or "
            "environment marker)"
        )
    return str(requirement)


PackageRule = Annotated[str, AfterValidator(_check_package_rule)]


def _check_pool(value: str) -> str:
    try:
        network = ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise _fail(
            f'expected an IPv4 network such as "10.213.0.0/16", got {toml_literal(value)}'
        ) from exc
    if network.prefixlen > 29:
        raise _fail(f"expected a network of at least 8 addresses (/29), got {toml_literal(value)}")
    return str(network)


class SandboxConfig(_Model):
    """``[sandbox]``: how each user's server is isolated on this machine."""

    enabled: bool = Field(
        default=True,
        description=(
            "Run each server in its own namespaces, cgroup and network namespace (needs root, "
            "bubblewrap and nftables); `false` runs it as the user's own account only. "
            "Default: `true`. Example: `enabled = false`."
        ),
    )
    address_pool: Annotated[str, AfterValidator(_check_pool)] = Field(
        default="10.213.0.0/16",
        description=(
            "IPv4 network the servers' network namespaces take their /30 from; the hub API "
            "listens on its last usable address. Default: `10.213.0.0/16`. "
            'Example: `address_pool = "10.99.0.0/20"`.'
        ),
    )
    datasets: dict[
        Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]*$")], AbsPath
    ] = Field(
        default_factory=dict,
        description=(
            "Datasets on this machine: name -> directory. A server gets `/datasets/NAME`, "
            "read-only, for each dataset the policy lets its user `read_dataset`. Default: "
            'none. Example: `mnist = "/srv/datasets/mnist"`.'
        ),
    )
    firewall_table: Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$")] = (
        Field(
            default="ztlab",
            description=(
                "nftables table (family inet) that holds the servers' network rules. "
                'Default: `ztlab`. Example: `firewall_table = "ztlab_lab2"`.'
            ),
        )
    )
    bwrap: str = Field(
        default="bwrap",
        min_length=1,
        description=(
            "The bubblewrap program that builds each server's sandbox: a name looked up on "
            "`PATH` or an absolute path. A missing one fails the spawn's sandbox stage with "
            'a message. Default: `bwrap`. Example: `bwrap = "/usr/local/bin/bwrap"`. '
            "Added in 0.3."
        ),
    )
    pids_max: int = Field(
        default=1024,
        ge=16,
        description=(
            "Most processes and threads one user's server may run (a fork bomb stops here); an "
            "integer >= 16. Default: `1024`. Example: `pids_max = 4096`."
        ),
    )


class ProxyConfig(_Model):
    """``[proxy]``: the proxy (Traefik) and the enforcement point in front of every server."""

    decision_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        le=60,
        description=(
            "How long, in seconds, the enforcement point reuses a decision for the same "
            "credential, server and route class (0 to 60; 0: decide every request). A "
            "revoked token or a sign-out takes effect within this time. Default: `5`. "
            "Example: `decision_cache_seconds = 2`. Added in 0.3."
        ),
    )
    session_seconds: int = Field(
        default=900,
        ge=60,
        le=86400,
        description=(
            "Lifetime, in seconds, of the enforcement point's session cookie for a server's "
            "path (60 to 86400); renewed while in use, never past the hub session's maximum "
            "age. Default: `900` (15 minutes). Example: `session_seconds = 300`. Added in 0.3."
        ),
    )


class AuditConfig(_Model):
    """``[audit]``: the tamper-evident audit log."""

    log: AbsPath | None = Field(
        default=None,
        description=(
            "File the audit records are appended to (JSON lines); checkpoints, public key "
            "and lock file sit next to it. Default: `<state_dir>/audit/audit.jsonl`. "
            'Example: `log = "/var/lib/ztlab/audit/audit.jsonl"`.'
        ),
    )
    signing_key: AbsPath | None = Field(
        default=None,
        description=(
            "Ed25519 private key that signs the checkpoints (created on first start, "
            "readable only by the control plane). Default: "
            "`<state_dir>/keys/audit-ed25519.key`. "
            'Example: `signing_key = "/var/lib/ztlab/keys/audit-ed25519.key"`.'
        ),
    )
    checkpoint_interval_seconds: float = Field(
        default=2.0,
        gt=0,
        le=60,
        allow_inf_nan=False,
        description=(
            "How often, in seconds, the log signs a checkpoint of what it has written (a "
            "number > 0 and <= 60). Default: `2.0`. "
            "Example: `checkpoint_interval_seconds = 5`."
        ),
    )
    origin: Origin = Field(
        default="ztlab.local/audit",
        description=(
            "Origin line of the signed checkpoints (C2SP tlog-checkpoint) and the name of "
            "the signing key: printable ASCII without spaces or `+`, by convention a "
            "schema-less URL naming this log. Default: `ztlab.local/audit`. "
            'Example: `origin = "gpu1.example.org/ztlab/audit"`.'
        ),
    )

    def log_path(self, state_dir: Path) -> Path:
        """The audit log file: ``log`` if set, else ``<state_dir>/audit/audit.jsonl``."""
        return self.log if self.log is not None else state_dir / "audit" / "audit.jsonl"

    def signing_key_path(self, state_dir: Path) -> Path:
        """The signing key file: ``signing_key`` if set, else under ``<state_dir>/keys``."""
        if self.signing_key is not None:
            return self.signing_key
        return state_dir / "keys" / "audit-ed25519.key"


class DatasetsConfig(_Model):
    """``[datasets]``: the dataset registry and the key that signs its manifests."""

    storage_roots: list[AbsPath] = Field(
        default_factory=lambda: [Path("/srv/datasets")],
        description=(
            "Directories datasets may be registered from; a registration whose path does not "
            "resolve inside one of them is refused (a steward cannot publish `/etc` as a "
            'dataset). Default: `["/srv/datasets"]`. '
            'Example: `storage_roots = ["/srv/datasets", "/data/shared"]`.'
        ),
    )
    registry: AbsPath | None = Field(
        default=None,
        description=(
            "SQLite file of registered dataset versions and their signed manifests (mode "
            "0600). Default: `<state_dir>/datasets/registry.sqlite`. "
            'Example: `registry = "/var/lib/ztlab/datasets/registry.sqlite"`.'
        ),
    )
    signing_key: AbsPath | None = Field(
        default=None,
        description=(
            "ECDSA P-256 private key that signs dataset manifests (and, later, models); "
            "created on first use, readable only by the control plane; its public key is "
            "written next to it as `.pub`. Default: `<state_dir>/keys/attest-p256.key`. "
            'Example: `signing_key = "/var/lib/ztlab/keys/attest-p256.key"`.'
        ),
    )


class PolicyConfig(_Model):
    """``[policy]``: the Cedar access policies."""

    directory: AbsPath | None = Field(
        default=None,
        description=(
            "Directory of Cedar policy files (`*.cedar`) used instead of the shipped "
            "defaults. Default: not set (the policies shipped with ztlab). "
            'Example: `directory = "/etc/ztlab/policies"`.'
        ),
    )


class RoleConfig(_Model):
    """``[roles.NAME]``: what a role is for and how much of the machine it may use."""

    description: str = Field(
        default="",
        description=(
            "What the role is for, shown to administrators. Default: empty for a new role; "
            'the built-in roles have their own. Example: `description = "Runs training"`.'
        ),
    )
    max_gpus: int = Field(
        default=0,
        ge=0,
        description=(
            "Most GPUs one server of this role may hold (an integer >= 0). Default: `0` "
            "(built-in: 1 for `trainer`, 0 for the others). Example: `max_gpus = 2`."
        ),
    )
    memory: MemorySize = Field(
        default=2 * 1024**3,
        description=(
            'Memory limit of one server: a size such as "16G" or "512M" (K, M, G and T are '
            '1024-based; a bare integer is bytes). Default: `"2G"` (built-in: admin 4G, '
            'data-steward 8G, trainer 32G, approver 4G, viewer 2G). Example: `memory = "16G"`.'
        ),
    )
    cpus: float = Field(
        default=1.0,
        gt=0,
        allow_inf_nan=False,
        description=(
            "CPU cores one server may use (a number > 0; fractions allowed). Default: `1` "
            "(built-in: admin 2, data-steward 2, trainer 8, approver 1, viewer 1). "
            "Example: `cpus = 4`."
        ),
    )
    max_server_hours: float = Field(
        default=8.0,
        gt=0,
        allow_inf_nan=False,
        description=(
            "Hours a server of this role may run before it is stopped (a number > 0). "
            "Default: `8` (built-in: trainer 24, viewer 4, the others 8). "
            "Example: `max_server_hours = 12`."
        ),
    )
    raw_files: RawFilesRule = Field(
        default="refuse",
        description=(
            "What the enforcement point lets through on the raw-file routes of the role's own "
            "server (`/files/`, `/view/`, nbconvert downloads, and the contents API for "
            'anything but notebooks and directories): `"allow"`, `"refuse"`, or a size such '
            'as `"100M"` (files up to that size). Notebooks still open, run and save. With '
            'several roles the most generous rule applies. Default: `"refuse"` (for a new '
            'role; built-in: data-steward "allow", admin and trainer "100M", approver "10M", '
            'viewer "refuse"). Example: `raw_files = "1G"`. Added in 0.3.'
        ),
    )
    egress_report: MemorySize = Field(
        default=100 * 1024**2,
        description=(
            "An audit record (`proxy.egress`) each time the bytes sent out of one user's "
            "server in a UTC day pass another multiple of this size (a size such as "
            '"100M"). With several roles the largest applies. Default: `"100M"` (for a new '
            'role; built-in: data-steward "10G", trainer "1G", admin and approver "100M", '
            'viewer "50M"). Example: `egress_report = "500M"`. Added in 0.3.'
        ),
    )

    packages: Annotated[list[PackageRule], Expect("an array of package rules")] = Field(
        default_factory=list,
        description=(
            "Packages the role may install through the package proxy (`pip install` in a "
            'server): each a name with an optional version range ("requests", '
            '"torch>=2.4,<3"), or "*" for every package the proxy mirrors. With several '
            "roles the union applies; approved requests (`ztlab packages approve`) add to it. "
            "Default: none (built-in: none for every role). "
            'Example: `packages = ["requests>=2", "tqdm"]`. Added in 0.4.'
        ),
    )

    @property
    def raw_files_limit(self) -> int | None:
        """Bytes a raw file may have to go out: ``None`` without a limit, ``0`` refused."""
        if self.raw_files == "allow":
            return None
        if self.raw_files == "refuse":
            return 0
        return parse_size(self.raw_files)


#: the built-in roles, in their documented order
DEFAULT_ROLE_NAMES: Final = ("admin", "data-steward", "trainer", "approver", "viewer")


def _default_role_tables() -> dict[str, dict[str, Any]]:
    """The built-in roles as TOML tables (least privilege: only ``trainer`` gets a GPU)."""
    return {
        "admin": {
            "description": (
                "Operates the environment: users, groups, policies, GPU pools and the audit "
                "log. Runs no GPU work."
            ),
            "max_gpus": 0,
            "memory": "4G",
            "cpus": 2.0,
            "max_server_hours": 8.0,
            "raw_files": "100M",
            "egress_report": "100M",
        },
        "data-steward": {
            "description": "Registers and classifies data sets and decides who may use them.",
            "max_gpus": 0,
            "memory": "8G",
            "cpus": 2.0,
            "max_server_hours": 8.0,
            "raw_files": "allow",
            "egress_report": "10G",
        },
        "trainer": {
            "description": "Trains and evaluates models on the GPU pools open to the role.",
            "max_gpus": 1,
            "memory": "32G",
            "cpus": 8.0,
            "max_server_hours": 24.0,
            "raw_files": "100M",
            "egress_report": "1G",
        },
        "approver": {
            "description": (
                "Reviews and approves requests raised by others, such as exporting results "
                "or models."
            ),
            "max_gpus": 0,
            "memory": "4G",
            "cpus": 1.0,
            "max_server_hours": 8.0,
            "raw_files": "10M",
            "egress_report": "100M",
        },
        "viewer": {
            "description": "Reads shared results and reports; runs no GPU work.",
            "max_gpus": 0,
            "memory": "2G",
            "cpus": 1.0,
            "max_server_hours": 4.0,
            "raw_files": "refuse",
            "egress_report": "50M",
        },
    }


def default_roles() -> dict[str, RoleConfig]:
    """The five built-in roles with their default quotas (a new dict on every call)."""
    return {name: RoleConfig.model_validate(t) for name, t in _default_role_tables().items()}


class GpuPool(_Model):
    """``[gpu.pools.NAME]``: a set of GPUs and the roles allowed to use them."""

    description: str = Field(
        default="",
        description=(
            "What the pool is for, shown to users choosing a pool. Default: empty. "
            'Example: `description = "A100s for training"`.'
        ),
    )
    gpus: Annotated[list[GpuId], Expect("an array of GPU ids")] = Field(
        description=(
            'GPUs in the pool, as NVIDIA tools name them: an index ("0"), a GPU UUID '
            '("GPU-<uuid>") or a MIG device ("MIG-<uuid>"). A GPU may be in only one pool, '
            'once. Default: none, required (at least one GPU). Example: `gpus = ["0", "1"]`.'
        ),
    )
    roles: Annotated[list[str], Expect("an array of role names")] = Field(
        description=(
            "Roles allowed to use the pool; each must be a defined role. Default: none, "
            'required (an empty array closes the pool). Example: `roles = ["trainer"]`.'
        ),
    )
    max_clusters: int = Field(
        default=1,
        ge=0,
        description=(
            "Dask clusters one user may run in the pool at once (an integer >= 0; 0 lets "
            "nobody start one). Default: `1`. Example: `max_clusters = 2`. Added in 0.4."
        ),
    )
    max_workers: int = Field(
        default=4,
        ge=1,
        le=256,
        description=(
            "Workers one user may run in the pool at once, over all their clusters (1-256). "
            "Default: `4`. Example: `max_workers = 8`. Added in 0.4."
        ),
    )
    max_cluster_gpus: int = Field(
        default=1,
        ge=0,
        description=(
            "GPUs one user's clusters may lease from the pool at once (an integer >= 0); the "
            "roles' `max_gpus` still caps everything the user leases, servers included. "
            "Default: `1`. Example: `max_cluster_gpus = 4`. Added in 0.4."
        ),
    )
    worker_memory: MemorySize = Field(
        default=4 * 1024**3,
        description=(
            'Memory limit of one worker (its own cgroup): a size such as "16G". '
            'Default: `"4G"`. Example: `worker_memory = "32G"`. Added in 0.4.'
        ),
    )
    worker_cpus: float = Field(
        default=1.0,
        gt=0,
        allow_inf_nan=False,
        description=(
            "CPU cores one worker may use (a number > 0). Default: `1`. "
            "Example: `worker_cpus = 4`. Added in 0.4."
        ),
    )
    cluster_hours: float = Field(
        default=8.0,
        gt=0,
        allow_inf_nan=False,
        description=(
            "Hours a cluster may run before the control plane stops it and releases its "
            "GPUs (a number > 0). Default: `8`. Example: `cluster_hours = 24`. Added in 0.4."
        ),
    )
    certificate_minutes: int = Field(
        default=60,
        ge=5,
        le=60,
        description=(
            "Lifetime of the certificates the pool's authority issues to clients, "
            "schedulers and workers, in minutes (5-60); clients renew theirs while their "
            "session lives. Default: `60`. Example: `certificate_minutes = 30`. Added in 0.4."
        ),
    )
    allow_sharing: bool = Field(
        default=False,
        description=(
            "Whether an owner may share a cluster with named users (each must be allowed "
            "in the pool by the policy). Default: `false`. Example: `allow_sharing = true`. "
            "Added in 0.4."
        ),
    )


class ModelsConfig(_Model):
    """``[models]``: the MLflow tracking server, model signing and approvals."""

    enabled: bool = Field(
        default=True,
        description=(
            "Run an MLflow tracking server as a hub-managed service, reachable only through "
            "the hub's API with a hub token. Default: `true`. Example: `enabled = false`."
        ),
    )
    mlflow_port: int = Field(
        default=5001,
        ge=1024,
        le=65535,
        description=(
            "Port of the MLflow server on 127.0.0.1 (not reachable by users' servers; the "
            "hub forwards to it). Default: `5001`. Example: `mlflow_port = 5500`."
        ),
    )
    protected_aliases: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]+$")]] = Field(
        default_factory=lambda: ["production"],
        description=(
            "Registered-model aliases only the approval service may set or delete (through "
            'MLflow\'s API they are refused for everyone). Default: `["production"]`. '
            'Example: `protected_aliases = ["production", "staging"]`.'
        ),
    )
    sign_on_register: bool = Field(
        default=True,
        description=(
            "Sign each model version as soon as it is registered through the hub (for the "
            "user who registers it, who must be the run's trainer; lineage is checked as "
            "for `ztlab.models.sign`). Scheduled runs need no sign call; a refusal leaves the "
            "version unsigned and is audited. Default: `true`. Example: "
            "`sign_on_register = false`."
        ),
    )
    default_permission: Annotated[
        Literal["READ", "NO_PERMISSIONS"], Expect('"READ" or "NO_PERMISSIONS"')
    ] = Field(
        default="READ",
        description=(
            "What a user may do with another user's MLflow experiments and registered "
            "models unless granted more (MLflow's own permissions: creators get MANAGE and "
            "may grant READ, EDIT or MANAGE to others). `READ` lets a team see each other's "
            'runs; `NO_PERMISSIONS` hides them. Default: `"READ"`. '
            'Example: `default_permission = "NO_PERMISSIONS"`.'
        ),
    )
    artifacts_destination: (
        Annotated[
            str,
            StringConstraints(pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$"),
            Expect("an s3://BUCKET/PREFIX URI"),
        ]
        | None
    ) = Field(
        default=None,
        description=(
            "Object storage for model artifacts (S3 or S3-compatible) instead of the local "
            "store. MLflow writes there, and the signing service reads the files straight "
            "from it with the hub's credentials, taken from the hub's environment "
            "(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`...; never from this "
            "file); needs `pip install 'zerotrust-lab[s3]'`. Default: none (local). "
            'Example: `artifacts_destination = "s3://ml-artifacts/ztlab"`.'
        ),
    )
    s3_endpoint_url: HttpUrlText | None = Field(
        default=None,
        description=(
            "Endpoint of an S3-compatible service (MinIO, Ceph...) for "
            "`artifacts_destination`. Default: none (AWS). "
            'Example: `s3_endpoint_url = "https://minio.example.org"`.'
        ),
    )
    store: AbsPath | None = Field(
        default=None,
        description=(
            "Directory of the MLflow database, artifacts, signatures and approvals (mode "
            "0700). Default: `<state_dir>/mlflow`. "
            'Example: `store = "/var/lib/ztlab/mlflow"`.'
        ),
    )


class PackagesConfig(_Model):
    """``[packages]``: the package proxy, the sandboxes' only route to packages."""

    enabled: bool = Field(
        default=True,
        description=(
            "Run the package proxy: devpi-server mirrors the upstream index on 127.0.0.1 and "
            "the control plane's gateway, on the sandboxes' service address, lets each user "
            "download only what the rules of their roles allow, each file checked against "
            "the index's hash and audited. Default: `true`. Example: `enabled = false`."
        ),
    )
    port: int = Field(
        default=3141,
        ge=1024,
        le=65535,
        description=(
            "Port of the gateway on the sandboxes' service address (where `pip` in a server "
            "points). Default: `3141`. Example: `port = 3200`."
        ),
    )
    devpi_port: int = Field(
        default=3142,
        ge=1024,
        le=65535,
        description=(
            "Port of devpi-server on 127.0.0.1 (never reachable from a sandbox). "
            "Default: `3142`. Example: `devpi_port = 3300`."
        ),
    )
    upstream: HttpUrlText = Field(
        default="https://pypi.org/simple/",
        description=(
            "The index devpi-server mirrors (a PEP 503 simple index). Default: "
            '`"https://pypi.org/simple/"`. Example: `upstream = "https://nexus.example/simple/"`.'
        ),
    )
    offline: bool = Field(
        default=False,
        description=(
            "Serve only what the mirror has cached (devpi-server's offline mode): for "
            "machines with no route to the upstream. Default: `false`. Example: "
            "`offline = true`."
        ),
    )


class EnvironmentsConfig(_Model):
    """``[environments]``: where built kernel environments live."""

    root: AbsPath = Field(
        default_factory=lambda: Path("/opt/ztlab/envs"),
        description=(
            "Directory of built environments, one read-only folder per build; readable by "
            "users' servers (each sees only the environments the policy lets it use), so "
            "not under `state_dir` nor in a checkout. Default: `/opt/ztlab/envs`. "
            'Example: `root = "/srv/ztlab/envs"`.'
        ),
    )


class GpuMonitorConfig(_Model):
    """``[gpu.monitor]``: the GPU activity monitor (sampling, attribution, metrics, alerts)."""

    source: Literal["auto", "nvml", "replay", "off"] = Field(
        default="auto",
        description=(
            "Where readings come from. `auto`: NVML when the driver and `nvidia-ml-py` work "
            "on this machine, else no monitor; `nvml`: NVML, and the hub refuses to start "
            "without it; `replay`: the trace file in `trace` (demos and tests); `off`: no "
            'monitor. Default: `auto`. Example: `source = "nvml"`. Added in 0.5.'
        ),
    )
    trace: str = Field(
        default="",
        description=(
            'With `source = "replay"`: a `ztlab-nvml-trace/1` file, replayed from its start '
            "whenever it changes. Default: empty. Example: "
            '`trace = "/var/lib/ztlab/monitor/demo-trace.json"`. Added in 0.5.'
        ),
    )
    interval_seconds: float = Field(
        default=1.0,
        ge=0.1,
        le=60.0,
        description=(
            "Seconds between samples (0.1 to 60). Alerts fire within two intervals. "
            "Default: `1.0`. Example: `interval_seconds = 2`. Added in 0.5."
        ),
    )
    handover_checks: bool = Field(
        default=True,
        description=(
            "Hold a GPU back after its lease ends until the monitor has seen no process of "
            "the old holder on it (and recorded its ECC mode). Default: `true`. "
            "Example: `handover_checks = false`. Added in 0.5."
        ),
    )
    baseline_threshold: float = Field(
        default=8.0,
        ge=2.0,
        le=100.0,
        description=(
            "How far above a user's own baseline (in robust standard deviations: median and "
            "scaled MAD) utilization, power or transfer volume must be for a `baseline` alert. "
            "Default: `8.0`. Example: `baseline_threshold = 10`. Added in 0.5."
        ),
    )
    baseline_window_hours: float = Field(
        default=24.0,
        gt=0.0,
        le=24.0 * 30,
        description=(
            "Hours of history a user's baseline covers. Default: `24`. "
            "Example: `baseline_window_hours = 72`. Added in 0.5."
        ),
    )
    baseline_min_hours: float = Field(
        default=2.0,
        gt=0.0,
        le=24.0 * 30,
        description=(
            "Hours of a user's own history before their baseline is used; until then the "
            "baseline pooled over all users applies. Default: `2`. "
            "Example: `baseline_min_hours = 8`. Added in 0.5."
        ),
    )
    full_load_seconds: float = Field(
        default=60.0,
        ge=1.0,
        le=24.0 * 3600,
        description=(
            "How long full load must last on an idle user's server before "
            "`idle_full_load` fires. Default: `60`. Example: `full_load_seconds = 300`. "
            "Added in 0.5."
        ),
    )
    idle_minutes: float = Field(
        default=30.0,
        gt=0.0,
        description=(
            "A server whose user has shown no activity for this long is idle: full GPU load "
            "on it raises `idle_full_load`. Default: `30`. Example: `idle_minutes = 60`. "
            "Added in 0.5."
        ),
    )
    full_load_percent: int = Field(
        default=90,
        ge=1,
        le=100,
        description=(
            "GPU utilization (percent) counted as full load. Default: `90`. "
            "Example: `full_load_percent = 95`. Added in 0.5."
        ),
    )
    ecc_sbe_threshold: int = Field(
        default=100,
        ge=1,
        description=(
            "New correctable (single-bit) ECC errors within an hour that raise `ecc_error` "
            "(any new uncorrectable error always does). Default: `100`. "
            "Example: `ecc_sbe_threshold = 1000`. Added in 0.5."
        ),
    )
    miner_patterns: list[str] = Field(
        default_factory=list,
        description=(
            "Extra regular expressions matched (case-insensitively) against the process "
            "name, command line and loaded libraries of every GPU process, on top of the "
            "built-in miner signatures. Default: none. "
            'Example: `miner_patterns = ["mysteryminer"]`. Added in 0.5.'
        ),
    )
    notify_url: WebhookUrl = Field(
        default="",
        description=(
            "An http(s) URL each alert is POSTed to as an Alertmanager-style webhook "
            "(admins also see alerts on the hub's page /hub/ztlab/monitor and with "
            "`ztlab monitor alerts`). "
            'Default: none. Example: `notify_url = "https://alerts.example.org/ztlab"`. '
            "Added in 0.5."
        ),
    )

    @field_validator("miner_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from exc
        return patterns

    @model_validator(mode="after")
    def _trace_for_replay(self) -> GpuMonitorConfig:
        if self.source == "replay" and not self.trace:
            raise ValueError('source = "replay" needs trace = "PATH" (a ztlab-nvml-trace/1 file)')
        return self


class GpuConfig(_Model):
    """``[gpu]``: GPU pools, and who hands out their GPUs."""

    lease_backend: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,63}$")] = Field(
        default="local",
        description=(
            "Which lease backend hands out GPUs: the name of a `ztlab.lease_backends` entry "
            "point. `local` keeps the leases in SQLite under `state_dir` (one machine). "
            'Default: `local`. Example: `lease_backend = "local"`. Added in 0.3.'
        ),
    )
    pools: dict[PoolName, GpuPool] = Field(
        default_factory=dict,
        description=(
            "GPU pools by name (lower-case letters, digits, `-` and `_`). Default: none (no "
            "GPU is handed out). Example: `[gpu.pools.research]` with "
            '`gpus = ["0", "1"]` and `roles = ["trainer"]`.'
        ),
    )
    monitor: GpuMonitorConfig = Field(
        default_factory=GpuMonitorConfig,
        description="The GPU activity monitor: attribution, metrics, alerts.",
    )


class ScheduleConfig(_Model):
    """``[[runs.schedules]]``: a schedule an administrator owns in the configuration."""

    name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")] = Field(
        description=(
            "The schedule's name (lower-case letters, digits, `-` and `_`), unique per owner. "
            'Default: none (required). Example: `name = "nightly-retrain"`. Added in 0.6.'
        ),
    )
    owner: Annotated[str, StringConstraints(min_length=1)] = Field(
        description=(
            "The hub user the runs run as: their sandbox, quotas, roles and token. Each run "
            "is a policy decision (`run_schedule`) on their roles at the time it starts. "
            'Default: none (required). Example: `owner = "alice"`. Added in 0.6.'
        ),
    )
    notebook: AbsPath = Field(
        description=(
            "The notebook file on the hub's machine; the hub keeps a copy (by its SHA-256) "
            "when it starts, so a later edit changes nothing until the hub restarts. "
            "Default: none (required). "
            'Example: `notebook = "/srv/ztlab/notebooks/retrain.ipynb"`. Added in 0.6.'
        ),
    )
    cron: str = Field(
        description=(
            "Five-field cron expression (minute hour day-of-month month day-of-week), read in "
            '`timezone`. Default: none (required). Example: `cron = "0 2 * * *"`. Added in 0.6.'
        ),
    )
    timezone: str = Field(
        default="UTC",
        description=(
            "IANA time zone of the cron expression. Default: `UTC`. "
            'Example: `timezone = "Europe/Berlin"`. Added in 0.6.'
        ),
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Papermill parameters (name = value). Default: none. "
            "Example: `parameters = { epochs = 3 }`. Added in 0.6."
        ),
    )
    pool: PoolName | None = Field(
        default=None,
        description=(
            "GPU pool of the runs' GPUs (needed with `gpus` when there are several pools). "
            'Default: none. Example: `pool = "research"`. Added in 0.6.'
        ),
    )
    gpus: int = Field(
        default=0,
        ge=0,
        le=64,
        description="GPUs each run leases. Default: `0`. Example: `gpus = 1`. Added in 0.6.",
    )
    retries: int = Field(
        default=0,
        ge=0,
        le=10,
        description=(
            "Further attempts after a run fails or is interrupted. Default: `0`. "
            "Example: `retries = 2`. Added in 0.6."
        ),
    )
    retry_backoff_seconds: int = Field(
        default=60,
        ge=0,
        le=86_400,
        description=(
            "Seconds before the first retry; each further one waits twice as long. "
            "Default: `60`. Example: `retry_backoff_seconds = 300`. Added in 0.6."
        ),
    )
    concurrency: Literal["skip", "queue"] = Field(
        default="skip",
        description=(
            "A fire while the previous run still runs: `skip` records it as skipped, `queue` "
            'runs it afterwards. Default: `skip`. Example: `concurrency = "queue"`. Added in 0.6.'
        ),
    )
    missed: Literal["skip", "latest", "all"] = Field(
        default="latest",
        description=(
            "Fire times missed while the hub was down: `latest` runs the last of them once, "
            "`all` runs each, `skip` runs none (each is recorded as missed). "
            'Default: `latest`. Example: `missed = "skip"`. Added in 0.6.'
        ),
    )
    paused: bool = Field(
        default=False,
        description="Keep it, but fire nothing. Default: `false`. Example: `paused = true`.",
    )

    @model_validator(mode="after")
    def _spec(self) -> ScheduleConfig:
        self.spec()  # the cron expression, time zone and parameters, checked
        return self

    def spec(self) -> Any:
        """The :class:`~ztlab.common.schedule.ScheduleSpec` (raises ``ValueError``)."""
        from ztlab.common.schedule import ScheduleError, ScheduleSpec

        try:
            return ScheduleSpec.parse(
                self.model_dump(exclude={"owner", "notebook", "paused"}), where=self.name
            )
        except ScheduleError as exc:
            raise ValueError(exc.message + (f" ({exc.hint})" if exc.hint else "")) from exc


class RunsConfig(_Model):
    """``[runs]``: notebooks run with papermill in their owners' sandboxes, by hand or on a
    schedule, with signed provenance."""

    enabled: bool = Field(
        default=True,
        description=(
            "Run notebooks (`ztlab run`, `ztlab schedule`). Needs `[sandbox]`: each run gets "
            "its own cgroup in its owner's sandbox. Default: `true`. Example: "
            "`enabled = false`. Added in 0.6."
        ),
    )
    tick_seconds: float = Field(
        default=5.0,
        ge=0.2,
        le=60.0,
        description=(
            "How often the scheduler looks for fire times that have come (a run started by "
            "hand starts at once). Default: `5`. Example: `tick_seconds = 1`. Added in 0.6."
        ),
    )
    on_time_seconds: float = Field(
        default=300.0,
        ge=1.0,
        le=86_400.0,
        description=(
            "A fire time at most this many seconds old is on time; an older one was missed "
            "(the hub was down) and the schedule's `missed` policy decides. Default: `300`. "
            "Example: `on_time_seconds = 900`. Added in 0.6."
        ),
    )
    max_hours: float = Field(
        default=6.0,
        gt=0.0,
        le=24.0 * 7,
        description=(
            "Longest a run may run; it is then stopped and fails. Its hub token expires then "
            "too. Default: `6`. Example: `max_hours = 12`. Added in 0.6."
        ),
    )
    max_active_per_user: int = Field(
        default=2,
        ge=1,
        le=64,
        description=(
            "Runs one user may have running at once; more wait in the queue. Default: `2`. "
            "Example: `max_active_per_user = 4`. Added in 0.6."
        ),
    )
    max_notebook_bytes: int = Field(
        default=16 * 2**20,
        ge=1024,
        description=(
            "Largest notebook a run takes, and largest executed notebook the control plane "
            "keeps. Default: `16777216` (16 MiB). Example: `max_notebook_bytes = 67108864`. "
            "Added in 0.6."
        ),
    )
    notify_url: WebhookUrl = Field(
        default="",
        description=(
            "Webhook that gets a JSON document for every run that fails, is refused or is "
            "interrupted (its owner, id, schedule and reason); failures are also on the "
            "runs page and in the audit log. Default: none. "
            'Example: `notify_url = "http://127.0.0.1:9093/hooks/runs"`. Added in 0.6.'
        ),
    )
    schedules: list[ScheduleConfig] = Field(
        default_factory=list,
        description=(
            "Schedules an administrator owns here rather than through `ztlab schedule add`; "
            "the hub adds, changes and removes them to match when it starts. Default: none. "
            'Example: `[[runs.schedules]]` with `name = "nightly"`, `owner = "alice"`, '
            '`notebook = "/srv/nb/train.ipynb"` and `cron = "0 2 * * *"`. Added in 0.6.'
        ),
    )


class ComputeConfig(_Model):
    """``[compute]``: who runs the users' Dask clusters in the GPU pools."""

    backend: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,63}$")] = Field(
        default="local",
        description=(
            "Which compute backend runs clusters: the name of a `ztlab.compute_backends` "
            "entry point. `local` runs each cluster's scheduler and workers on this machine, "
            "as the owner's account, in the owner's network namespace. Default: `local`. "
            'Example: `backend = "local"`. Added in 0.4.'
        ),
    )
    port_base: int = Field(
        default=9700,
        ge=1024,
        le=65000,
        description=(
            "First port of the schedulers (and, one above each, their dashboards) inside a "
            "user's network namespace; a user's Nth cluster listens on `port_base + 2*N`. "
            "Default: `9700`. Example: `port_base = 9700`. Added in 0.4."
        ),
    )
    relay_port_base: int = Field(
        default=9800,
        ge=1024,
        le=65000,
        description=(
            "First of 200 ports on the sandboxes' service address where the hub relays the "
            "users a cluster is shared with to its scheduler (TLS end to end; only their "
            "network namespaces may connect). Default: `9800`. Example: "
            "`relay_port_base = 9800`. Added in 0.4."
        ),
    )


# --------------------------------------------------------------------------------------
# The whole file
# --------------------------------------------------------------------------------------


class ZtlabConfig(_Model):
    """The validated contents of ``ztlab.toml``.

    Build one with :func:`~ztlab.common.config.load_config` (a file) or
    :func:`~ztlab.common.config.parse_config` (a mapping); both raise one
    :class:`InvalidConfigError` listing every problem. ``ZtlabConfig()`` is the default
    configuration.
    """

    state_dir: AbsPath = Field(
        default_factory=lambda: Path("/var/lib/ztlab"),
        description=(
            "Directory for files that hold state or secrets (audit log, keys, generated "
            "secrets). It must be readable only by the control plane. "
            'Default: `/var/lib/ztlab`. Example: `state_dir = "/srv/ztlab/state"`.'
        ),
    )
    hub: HubConfig = Field(
        default_factory=HubConfig, description="The hub (JupyterHub control plane)."
    )
    audit: AuditConfig = Field(
        default_factory=AuditConfig,
        description="The tamper-evident audit log and its signed checkpoints.",
    )
    policy: PolicyConfig = Field(
        default_factory=PolicyConfig, description="The Cedar access-control policies."
    )
    proxy: ProxyConfig = Field(
        default_factory=ProxyConfig, description="The proxy and the enforcement point."
    )
    sandbox: SandboxConfig = Field(
        default_factory=SandboxConfig,
        description="Isolation of each user's server: namespaces, cgroups, network.",
    )
    login: LoginConfig = Field(
        default_factory=LoginConfig,
        description="The OpenID Connect login, with enforced MFA and short sessions.",
    )
    roles: dict[RoleName, RoleConfig] = Field(
        default_factory=default_roles,
        description=(
            "Roles and their quotas. The built-in roles admin, data-steward, trainer, "
            "approver and viewer always exist; a `[roles.NAME]` table changes the keys it "
            "sets of a built-in role (the others keep their built-in values) or adds a new "
            "role (unset keys take the defaults below). Roles cannot be removed. "
            "Default: the five built-in roles. Example: `[roles.trainer]` with `max_gpus = 2`."
        ),
    )
    groups: dict[GroupName, Annotated[list[str], Expect("an array of role names")]] = Field(
        default_factory=dict,
        description=(
            "Roles granted to the members of each identity-provider group: group name -> "
            "list of role names, each a defined role. Default: none (nobody has a role). "
            'Example: `ml-team = ["trainer", "viewer"]`.'
        ),
    )
    gpu: GpuConfig = Field(default_factory=GpuConfig, description="GPU pools.")
    compute: ComputeConfig = Field(
        default_factory=ComputeConfig,
        description="Dask clusters in the GPU pools.",
    )
    runs: RunsConfig = Field(
        default_factory=RunsConfig,
        description="Notebook runs with papermill: by hand and on schedules, with provenance.",
    )
    models: ModelsConfig = Field(
        default_factory=ModelsConfig,
        description="MLflow behind the hub, signed models and two-person approvals.",
    )
    datasets: DatasetsConfig = Field(
        default_factory=DatasetsConfig,
        description="The dataset registry: where datasets may come from, how they are signed.",
    )
    packages: PackagesConfig = Field(
        default_factory=PackagesConfig,
        description="The package proxy: what users' servers may install, and from where.",
    )
    environments: EnvironmentsConfig = Field(
        default_factory=EnvironmentsConfig,
        description="Kernel environments built by the control plane.",
    )
    secrets: SecretsConfig = Field(
        default_factory=SecretsConfig,
        description=(
            'Secrets, each a reference `{ env = "NAME" }` or `{ file = "/path" }`; a secret '
            "written into the configuration file itself is refused."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _merge_default_roles(cls, data: Any) -> Any:
        """Lay the ``[roles]`` tables of the file over the built-in roles, key by key."""
        if not isinstance(data, Mapping) or "roles" not in data:
            return data
        given = data["roles"]
        if not isinstance(given, Mapping):
            return data
        merged: dict[Any, Any] = dict(_default_role_tables())
        for name, table in given.items():
            base = merged.get(name)
            if isinstance(base, dict) and isinstance(table, Mapping):
                merged[name] = {**base, **table}
            elif isinstance(table, RoleConfig) and isinstance(base, dict):
                merged[name] = {**base, **table.model_dump(exclude_unset=True)}
            else:
                merged[name] = table
        return {**data, "roles": merged}

    @model_validator(mode="after")
    def _check_references(self) -> ZtlabConfig:
        problems = list(_cross_reference_problems(self))
        if problems:
            # Not a ValueError: pydantic lets it through unchanged, with every problem.
            raise InvalidConfigError("<config>", problems)
        for path, ref in self.secret_refs().items():
            ref._key_path = path
        return self

    # -- derived values --------------------------------------------------------------

    @property
    def audit_log_path(self) -> Path:
        """The audit log file (``audit.log``, default ``<state_dir>/audit/audit.jsonl``)."""
        return self.audit.log_path(self.state_dir)

    @property
    def audit_signing_key_path(self) -> Path:
        """The checkpoint signing key (default ``<state_dir>/keys/audit-ed25519.key``)."""
        return self.audit.signing_key_path(self.state_dir)

    @property
    def dataset_registry_path(self) -> Path:
        """The registry database (default ``<state_dir>/datasets/registry.sqlite``)."""
        return self.datasets.registry or self.state_dir / "datasets" / "registry.sqlite"

    @property
    def models_store(self) -> Path:
        """MLflow's database, artifacts, signatures (default ``<state_dir>/mlflow``)."""
        return self.models.store or self.state_dir / "mlflow"

    @property
    def attestation_key_path(self) -> Path:
        """The statement signing key (default ``<state_dir>/keys/attest-p256.key``)."""
        return self.datasets.signing_key or self.state_dir / "keys" / "attest-p256.key"

    @property
    def policy_directory(self) -> Path | None:
        """The policy directory, or ``None`` for the policies shipped with ztlab."""
        return self.policy.directory

    def public_url(self, path: str) -> str:
        """The URL users reach ``path`` at on the hub (the bind address made connectable)."""
        parts = urlsplit(self.hub.bind_url)
        host = parts.hostname or "127.0.0.1"
        if host in ("0.0.0.0", "::"):  # noqa: S104 - a bind address, not a connection target
            host = "127.0.0.1"
        netloc = f"{host}:{parts.port}" if parts.port else host
        return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}{path}"

    def secret_refs(self) -> dict[str, SecretRef]:
        """Every secret reference that is set, by key path (``secrets.cookie_secret``)."""
        return dict(_iter_secret_refs(self, ()))

    def resolve_secrets(self) -> dict[str, SecretStr]:
        """Resolve every secret reference now; one :class:`SecretError` lists all failures."""
        values: dict[str, SecretStr] = {}
        failures: list[SecretError] = []
        for path, ref in self.secret_refs().items():
            try:
                values[path] = ref.resolve()
            except SecretError as exc:
                failures.append(exc)
        if len(failures) == 1:
            raise failures[0]
        if failures:
            lines = "\n".join(f"  {f.message}" for f in failures)
            hints = "; ".join(f.hint for f in failures if f.hint)
            raise SecretError(
                f"{len(failures)} secrets cannot be resolved\n{lines}", hint=hints or None
            )
        return values

    def effective(self) -> ZtlabConfig:
        """A copy with the computed defaults written in (the audit log and key paths)."""
        audit = self.audit.model_copy(
            update={"log": self.audit_log_path, "signing_key": self.audit_signing_key_path}
        )
        return self.model_copy(update={"audit": audit})


def _iter_secret_refs(
    model: BaseModel, prefix: tuple[str | int, ...]
) -> Iterator[tuple[str, SecretRef]]:
    for name in type(model).model_fields:
        value = getattr(model, name)
        here = (*prefix, name)
        if isinstance(value, SecretRef):
            yield key_path(here), value
        elif isinstance(value, BaseModel):
            yield from _iter_secret_refs(value, here)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(item, SecretRef):
                    yield key_path((*here, str(key))), item
                elif isinstance(item, BaseModel):
                    yield from _iter_secret_refs(item, (*here, str(key)))


def _cross_reference_problems(config: ZtlabConfig) -> Iterator[Problem]:
    """Problems no single key shows: unknown roles, GPUs listed twice, empty pools."""
    known = ", ".join(sorted(config.roles))

    def check_roles(names: Sequence[str], where: tuple[str | int, ...]) -> Iterator[Problem]:
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            here = key_path((*where, i))
            if name not in config.roles:
                yield Problem(here, f'role "{name}" does not exist; expected one of: {known}')
            elif name in seen:
                first = key_path((*where, seen[name]))
                yield Problem(
                    here, f'role "{name}" is listed twice (also at {first}); expected each once'
                )
            seen.setdefault(name, i)

    for group, roles in config.groups.items():
        yield from check_roles(roles, ("groups", group))

    gpu_seen: dict[str, str] = {}
    for pool_name, pool in config.gpu.pools.items():
        where = ("gpu", "pools", pool_name)
        if not pool.gpus:
            yield Problem(
                key_path((*where, "gpus")),
                "the pool has no GPUs; expected at least one GPU id",
            )
        for i, gpu in enumerate(pool.gpus):
            here = key_path((*where, "gpus", i))
            if gpu in gpu_seen:
                yield Problem(
                    here,
                    f'GPU "{gpu}" is listed twice (also at {gpu_seen[gpu]}); '
                    "expected each GPU in exactly one pool",
                )
            else:
                gpu_seen[gpu] = here
        yield from check_roles(pool.roles, (*where, "roles"))
    seen_schedules: dict[tuple[str, str], int] = {}
    for i, schedule in enumerate(config.runs.schedules):
        at: tuple[str | int, ...] = ("runs", "schedules", i)
        first = seen_schedules.get((schedule.owner, schedule.name))
        if first is not None:
            yield Problem(
                key_path((*at, "name")),
                f'{schedule.owner} has a schedule "{schedule.name}" already (at '
                f"{key_path(('runs', 'schedules', first))})",
            )
        seen_schedules.setdefault((schedule.owner, schedule.name), i)
        if schedule.pool is not None and schedule.pool not in config.gpu.pools:
            known_pools = ", ".join(sorted(config.gpu.pools)) or "none configured"
            yield Problem(
                key_path((*at, "pool")),
                f'pool "{schedule.pool}" does not exist; expected one of: {known_pools}',
            )
