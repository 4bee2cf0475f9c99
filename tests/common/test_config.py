"""Tests for :mod:`ztlab.common.config`: loading, exact error messages, secrets, output."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, SecretStr, ValidationError

from ztlab.common.config import (
    DEFAULT_ROLE_NAMES,
    InvalidConfigError,
    Problem,
    SecretRef,
    ZtlabConfig,
    default_roles,
    dump_json,
    dump_toml,
    format_size,
    load_config,
    parse_config,
    parse_size,
)
from ztlab.common.config.model import (
    AuditConfig,
    ComputeConfig,
    DatasetsConfig,
    EnvironmentsConfig,
    GpuConfig,
    GpuMonitorConfig,
    GpuPool,
    HubConfig,
    LoginConfig,
    ModelsConfig,
    PackagesConfig,
    PolicyConfig,
    ProxyConfig,
    RoleConfig,
    RunsConfig,
    SandboxConfig,
    ScheduleConfig,
    SecretsConfig,
)
from ztlab.common.errors import ConfigError, SecretError

EXAMPLE = Path(__file__).resolve().parents[2] / "ztlab.example.toml"
ROLES = "admin, approver, data-steward, trainer, viewer"
G = 1024**3


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in ``tmp_path`` so messages name the file as ``ztlab.toml``."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(directory: Path, text: str, name: str = "ztlab.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    path.chmod(0o644)
    return path


def error_for(directory: Path, text: str) -> str:
    write(directory, text)
    with pytest.raises(ConfigError) as info:
        load_config("ztlab.toml")
    return info.value.message


# --------------------------------------------------------------------------------------
# Valid configurations
# --------------------------------------------------------------------------------------


def test_defaults_are_least_privilege_and_computed_from_state_dir() -> None:
    config = ZtlabConfig()
    assert tuple(config.roles) == DEFAULT_ROLE_NAMES
    assert {n for n, r in config.roles.items() if r.max_gpus > 0} == {"trainer"}
    assert all(r.description for r in config.roles.values())
    assert config.state_dir == Path("/var/lib/ztlab")
    assert config.hub.bind_url == "http://127.0.0.1:8000"
    assert config.hub.api_url == "http://127.0.0.1:8081"
    assert config.hub.proxy_api_url == "http://127.0.0.1:8001"
    assert config.login == LoginConfig()
    assert config.login.allowed_networks == ["127.0.0.0/8", "::1/128"]
    assert config.login.development_provider is False
    assert config.login.validate_provider_certificate is True
    assert config.audit.log is None
    assert config.audit_log_path == Path("/var/lib/ztlab/audit/audit.jsonl")
    assert config.audit_signing_key_path == Path("/var/lib/ztlab/keys/audit-ed25519.key")
    assert config.audit.checkpoint_interval_seconds == 2.0
    assert config.audit.origin == "ztlab.local/audit"
    assert config.policy_directory is None
    assert config.groups == {}
    assert config.gpu.pools == {}
    assert config.secret_refs() == {}


def test_empty_file_is_the_default_configuration(in_tmp: Path) -> None:
    write(in_tmp, "")
    assert load_config("ztlab.toml") == ZtlabConfig()


def test_audit_paths_follow_state_dir_unless_set(in_tmp: Path) -> None:
    write(in_tmp, 'state_dir = "/srv/zt"\n')
    config = load_config(in_tmp / "ztlab.toml")
    assert config.audit_log_path == Path("/srv/zt/audit/audit.jsonl")
    assert config.audit_signing_key_path == Path("/srv/zt/keys/audit-ed25519.key")
    write(
        in_tmp,
        'state_dir = "/srv/zt"\n[audit]\nlog = "/logs/a.jsonl"\nsigning_key = "/k/key"\n'
        '[policy]\ndirectory = "/etc/ztlab/policies"\n',
    )
    config = load_config(str(in_tmp / "ztlab.toml"))
    assert config.audit_log_path == Path("/logs/a.jsonl")
    assert config.audit_signing_key_path == Path("/k/key")
    assert config.policy_directory == Path("/etc/ztlab/policies")


def test_example_file_loads() -> None:
    config = load_config(EXAMPLE)
    assert tuple(config.roles) == DEFAULT_ROLE_NAMES
    # the example shows the built-in values, but for the trainers' package allowlist (built
    # in: none, deny by default; the example lets them install a few common packages)
    built_in = ZtlabConfig().roles
    assert {n: r.model_copy(update={"packages": []}) for n, r in config.roles.items()} == built_in
    assert built_in["trainer"].packages == []
    assert "requests>=2" in config.roles["trainer"].packages
    assert config.groups == {
        "ml-trainers": ["trainer"],
        "model-approvers": ["approver"],
        "data-stewards": ["data-steward"],
        "ztlab-admins": ["admin"],
    }
    assert list(config.gpu.pools) == ["research"]
    assert config.gpu.pools["research"].gpus == ["0"]
    assert sorted(config.secret_refs()) == ["secrets.oidc_client_secret"]
    assert config.secrets.cookie_secret is None
    assert config.login.issuer == "http://127.0.0.1:8009"
    assert config.login.client_id == "ztlab-hub"
    assert config.login.allowed_networks == ["127.0.0.0/8", "::1/128"]
    assert config.login.development_provider is True
    assert config.audit_log_path == Path("/var/lib/ztlab/audit/audit.jsonl")
    assert config.state_dir == Path("/var/lib/ztlab")


def test_roles_in_the_file_are_merged_over_the_built_in_roles(in_tmp: Path) -> None:
    write(
        in_tmp,
        '[roles.trainer]\nmax_gpus = 2\nmemory = "64G"\n'
        '[roles.auditor]\ndescription = "Reads the audit log"\n',
    )
    config = load_config("ztlab.toml")
    assert list(config.roles) == [*DEFAULT_ROLE_NAMES, "auditor"]
    trainer = config.roles["trainer"]
    assert (trainer.max_gpus, trainer.memory) == (2, 64 * G)
    assert trainer.cpus == 8.0  # kept from the built-in trainer
    assert trainer.max_server_hours == 24.0
    assert config.roles["viewer"] == default_roles()["viewer"]
    auditor = config.roles["auditor"]
    assert auditor == RoleConfig(description="Reads the audit log")
    assert (auditor.max_gpus, auditor.memory, auditor.cpus) == (0, 2 * G, 1.0)


def test_toml_native_types_are_accepted(in_tmp: Path) -> None:
    write(
        in_tmp,
        "[audit]\ncheckpoint_interval_seconds = 1\n[roles.viewer]\ncpus = 0.5\nmemory = 1048576\n"
        "max_server_hours = 1\n",
    )
    config = load_config("ztlab.toml")
    assert config.audit.checkpoint_interval_seconds == 1.0
    assert config.roles["viewer"].cpus == 0.5
    assert config.roles["viewer"].memory == 1024**2


def test_gpu_ids_are_normalized(in_tmp: Path) -> None:
    write(
        in_tmp,
        "[gpu.pools.a]\n"
        'gpus = ["00", "GPU-ABCDEF01-2345-6789-ABCD-EF0123456789", '
        '"mig-abcdef01-2345-6789-abcd-ef0123456789", '
        '"MIG-GPU-abcdef01-2345-6789-abcd-ef0123456789/1/0"]\n'
        'roles = ["trainer"]\n',
    )
    assert load_config("ztlab.toml").gpu.pools["a"].gpus == [
        "0",
        "GPU-abcdef01-2345-6789-abcd-ef0123456789",
        "MIG-abcdef01-2345-6789-abcd-ef0123456789",
        "MIG-GPU-abcdef01-2345-6789-abcd-ef0123456789/1/0",
    ]


def test_models_are_frozen() -> None:
    config = ZtlabConfig()
    with pytest.raises(ValidationError):
        config.state_dir = Path("/tmp")  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.audit.origin = "x"  # type: ignore[misc]


def test_default_roles_are_a_new_dict_each_time() -> None:
    first = default_roles()
    first.pop("admin")
    assert "admin" in default_roles()
    assert "admin" in ZtlabConfig().roles


# --------------------------------------------------------------------------------------
# Exact messages, one problem each
# --------------------------------------------------------------------------------------

TOP_KEYS = ", ".join(
    (
        "audit",
        "compute",
        "datasets",
        "environments",
        "gpu",
        "groups",
        "hub",
        "login",
        "models",
        "packages",
        "policy",
        "proxy",
        "roles",
        "runs",
        "sandbox",
        "secrets",
        "state_dir",
    )
)

ONE_PROBLEM: list[tuple[str, str, str]] = [
    (
        "unknown top-level key",
        'stat_dir = "/var/lib/ztlab"\n',
        f"ztlab.toml: stat_dir: unknown key; expected one of: {TOP_KEYS}",
    ),
    (
        "unknown nested key",
        "[audit]\ncheckpoint_intervall = 2\n",
        "ztlab.toml: audit.checkpoint_intervall: unknown key; "
        "expected one of: checkpoint_interval_seconds, log, origin, signing_key",
    ),
    (
        "unknown key in a role",
        "[roles.trainer]\ngpus = 1\n",
        "ztlab.toml: roles.trainer.gpus: unknown key; "
        "expected one of: cpus, description, egress_report, max_gpus, max_server_hours, "
        "memory, packages, raw_files",
    ),
    (
        "unknown table",
        "[gpus]\n",
        f"ztlab.toml: gpus: unknown key; expected one of: {TOP_KEYS}",
    ),
    (
        "string for an integer",
        '[roles.trainer]\nmax_gpus = "two"\n',
        'ztlab.toml: roles.trainer.max_gpus: expected an integer >= 0, got "two" (string)',
    ),
    (
        "digit string for an integer is not coerced",
        '[roles.trainer]\nmax_gpus = "2"\n',
        'ztlab.toml: roles.trainer.max_gpus: expected an integer >= 0, got "2" (string)',
    ),
    (
        "boolean for an integer",
        "[roles.trainer]\nmax_gpus = true\n",
        "ztlab.toml: roles.trainer.max_gpus: expected an integer >= 0, got true (boolean)",
    ),
    (
        "float for an integer",
        "[roles.trainer]\nmax_gpus = 1.5\n",
        "ztlab.toml: roles.trainer.max_gpus: expected an integer >= 0, got 1.5 (float)",
    ),
    (
        "negative quota",
        "[roles.trainer]\nmax_gpus = -1\n",
        "ztlab.toml: roles.trainer.max_gpus: expected an integer >= 0, got -1",
    ),
    (
        "zero cpus",
        "[roles.viewer]\ncpus = 0\n",
        "ztlab.toml: roles.viewer.cpus: expected a number > 0, got 0",
    ),
    (
        "infinite hours",
        "[roles.viewer]\nmax_server_hours = inf\n",
        "ztlab.toml: roles.viewer.max_server_hours: expected a number > 0, got inf",
    ),
    (
        "string for a number",
        '[roles.viewer]\ncpus = "2"\n',
        'ztlab.toml: roles.viewer.cpus: expected a number > 0, got "2" (string)',
    ),
    (
        "bad memory size",
        '[roles.trainer]\nmemory = "16 gigs"\n',
        'ztlab.toml: roles.trainer.memory: expected a size such as "16G" or "512M" (a number '
        "with an optional K, M, G or T suffix, 1024-based; a bare number is bytes), "
        'got "16 gigs"',
    ),
    (
        "zero memory",
        '[roles.trainer]\nmemory = "0G"\n',
        'ztlab.toml: roles.trainer.memory: expected a size such as "16G" or "512M" (a number '
        "with an optional K, M, G or T suffix, 1024-based; a bare number is bytes), "
        'got "0G"',
    ),
    (
        "memory of the wrong type",
        "[roles.trainer]\nmemory = true\n",
        'ztlab.toml: roles.trainer.memory: expected a size such as "16G" or "512M" (a number '
        "with an optional K, M, G or T suffix, 1024-based; a bare number is bytes), "
        "got true (boolean)",
    ),
    (
        "interval zero",
        "[audit]\ncheckpoint_interval_seconds = 0\n",
        "ztlab.toml: audit.checkpoint_interval_seconds: expected a number > 0 and <= 60, got 0",
    ),
    (
        "interval too long",
        "[audit]\ncheckpoint_interval_seconds = 60.5\n",
        "ztlab.toml: audit.checkpoint_interval_seconds: expected a number > 0 and <= 60, got 60.5",
    ),
    (
        "origin with a space",
        '[audit]\norigin = "ztlab local"\n',
        'ztlab.toml: audit.origin: expected a checkpoint origin such as "ztlab.local/audit" '
        '(printable ASCII without spaces or "+"), got "ztlab local"',
    ),
    (
        "origin with a plus",
        '[audit]\norigin = "a+b"\n',
        'ztlab.toml: audit.origin: expected a checkpoint origin such as "ztlab.local/audit" '
        '(printable ASCII without spaces or "+"), got "a+b"',
    ),
    (
        "relative path",
        'state_dir = "var/lib/ztlab"\n',
        'ztlab.toml: state_dir: expected an absolute path, got "var/lib/ztlab"',
    ),
    (
        "integer for a path",
        "[audit]\nlog = 3\n",
        "ztlab.toml: audit.log: expected an absolute path, got 3 (integer)",
    ),
    (
        "not an http URL",
        '[hub]\nbind_url = "ftp://127.0.0.1:8000"\n',
        "ztlab.toml: hub.bind_url: expected an http:// or https:// URL such as "
        '"http://127.0.0.1:8000", got "ftp://127.0.0.1:8000"',
    ),
    (
        "URL with a bad port",
        '[hub]\nbind_url = "http://127.0.0.1:99999"\n',
        "ztlab.toml: hub.bind_url: expected an http:// or https:// URL such as "
        '"http://127.0.0.1:8000", got "http://127.0.0.1:99999"',
    ),
    (
        "hub API URL not an http URL",
        '[hub]\napi_url = "127.0.0.1:8081"\n',
        "ztlab.toml: hub.api_url: expected an http:// or https:// URL such as "
        '"http://127.0.0.1:8000", got "127.0.0.1:8081"',
    ),
    (
        "integer for the proxy API URL",
        "[hub]\nproxy_api_url = 8001\n",
        "ztlab.toml: hub.proxy_api_url: expected an http:// or https:// URL, got 8001 (integer)",
    ),
    (
        "login issuer not a URL",
        '[login]\nissuer = "keycloak.example.org"\n',
        "ztlab.toml: login.issuer: expected an http:// or https:// URL such as "
        '"http://127.0.0.1:8000", got "keycloak.example.org"',
    ),
    (
        "login issuer with a query",
        '[login]\nissuer = "https://idp.example.org/realms/lab?x=1"\n',
        "ztlab.toml: login.issuer: expected an http:// or https:// URL such as "
        '"http://127.0.0.1:8000" (without a query or fragment), '
        'got "https://idp.example.org/realms/lab?x=1"',
    ),
    (
        "login session of zero seconds",
        "[login]\nsession_max_age_seconds = 0\n",
        "ztlab.toml: login.session_max_age_seconds: expected an integer >= 1, got 0",
    ),
    (
        "login session length as a string",
        '[login]\nsession_max_age_seconds = "8h"\n',
        'ztlab.toml: login.session_max_age_seconds: expected an integer >= 1, got "8h" (string)',
    ),
    (
        "login token lifetime under a minute",
        "[login]\ntoken_max_age_seconds = 59\n",
        "ztlab.toml: login.token_max_age_seconds: expected an integer >= 60, got 59",
    ),
    (
        "login TOTP failures out of range",
        "[login]\ntotp_max_failures = 101\n",
        "ztlab.toml: login.totp_max_failures: expected an integer >= 1 and <= 100, got 101",
    ),
    (
        "login network of the wrong type",
        "[login]\nallowed_networks = [10]\n",
        "ztlab.toml: login.allowed_networks[0]: expected an IP network such as "
        '"10.0.0.0/8" or "127.0.0.1/32", got 10 (integer)',
    ),
    (
        "login networks not an array",
        '[login]\nallowed_networks = "10.0.0.0/8"\n',
        'ztlab.toml: login.allowed_networks: expected an array, got "10.0.0.0/8" (string)',
    ),
    (
        "unknown key in login",
        "[login]\nmfa = true\n",
        "ztlab.toml: login.mfa: unknown key; expected one of: accepted_acr, accepted_amr, "
        "allowed_networks, auth_refresh_age_seconds, client_id, development_provider, "
        "groups_claim, id_token_leeway_seconds, issuer, pending_login_seconds, scopes, "
        "session_idle_seconds, session_max_age_seconds, "
        "step_up_on_new_context, token_max_age_seconds, totp_lockout_seconds, "
        "totp_max_failures, username_claim, validate_provider_certificate",
    ),
    (
        "string for a table",
        'hub = "http://127.0.0.1:8000"\n',
        'ztlab.toml: hub: expected a table, got "http://127.0.0.1:8000" (string)',
    ),
    (
        "table for a string",
        "[roles.trainer.description]\n",
        "ztlab.toml: roles.trainer.description: expected a string, got a table",
    ),
    (
        "bad role name",
        '[roles."Data Steward"]\n',
        'ztlab.toml: roles."Data Steward": invalid key; expected a role name (lower-case '
        'letters, digits, "-" and "_", starting with a letter), got "Data Steward"',
    ),
    (
        "bad pool name",
        '[gpu.pools.GPU0]\ngpus = ["0"]\nroles = []\n',
        "ztlab.toml: gpu.pools.GPU0: invalid key; expected a pool name (lower-case letters, "
        'digits, "-" and "_", starting with a letter), got "GPU0"',
    ),
    (
        "bad GPU id",
        '[gpu.pools.a]\ngpus = ["0", "gpu1"]\nroles = []\n',
        'ztlab.toml: gpu.pools.a.gpus[1]: expected a GPU id: an index such as "0", a GPU UUID '
        '"GPU-<uuid>" or a MIG device "MIG-<uuid>", got "gpu1"',
    ),
    (
        "integer GPU id",
        "[gpu.pools.a]\ngpus = [0]\nroles = []\n",
        'ztlab.toml: gpu.pools.a.gpus[0]: expected a GPU id: an index such as "0", a GPU UUID '
        '"GPU-<uuid>" or a MIG device "MIG-<uuid>", got 0 (integer)',
    ),
    (
        "pool without gpus key",
        '[gpu.pools.a]\nroles = ["trainer"]\n',
        "ztlab.toml: gpu.pools.a.gpus: missing required key; expected an array of GPU ids",
    ),
    (
        "pool with no GPUs",
        '[gpu.pools.a]\ngpus = []\nroles = ["trainer"]\n',
        "ztlab.toml: gpu.pools.a.gpus: the pool has no GPUs; expected at least one GPU id",
    ),
    (
        "duplicate GPU in one pool",
        '[gpu.pools.research]\ngpus = ["0", "0"]\nroles = ["trainer"]\n',
        'ztlab.toml: gpu.pools.research.gpus[1]: GPU "0" is listed twice '
        "(also at gpu.pools.research.gpus[0]); expected each GPU in exactly one pool",
    ),
    (
        "duplicate GPU across pools",
        '[gpu.pools.a]\ngpus = ["0", "1"]\nroles = ["trainer"]\n'
        '[gpu.pools.b]\ngpus = ["2", "1"]\nroles = ["trainer"]\n',
        'ztlab.toml: gpu.pools.b.gpus[1]: GPU "1" is listed twice (also at gpu.pools.a.gpus[1]); '
        "expected each GPU in exactly one pool",
    ),
    (
        "same UUID spelled differently",
        '[gpu.pools.a]\ngpus = ["GPU-abcdef01-2345-6789-abcd-ef0123456789"]\nroles = []\n'
        '[gpu.pools.b]\ngpus = ["GPU-ABCDEF01-2345-6789-ABCD-EF0123456789"]\nroles = []\n',
        'ztlab.toml: gpu.pools.b.gpus[0]: GPU "GPU-abcdef01-2345-6789-abcd-ef0123456789" is '
        "listed twice (also at gpu.pools.a.gpus[0]); expected each GPU in exactly one pool",
    ),
    (
        "unknown role in groups",
        '[groups]\nml-team = ["trainr"]\n',
        f'ztlab.toml: groups.ml-team[0]: role "trainr" does not exist; expected one of: {ROLES}',
    ),
    (
        "unknown role in a quoted group",
        '[groups]\n"cn=ml,ou=groups" = ["viewer", "Trainer"]\n',
        'ztlab.toml: groups."cn=ml,ou=groups"[1]: role "Trainer" does not exist; '
        f"expected one of: {ROLES}",
    ),
    (
        "role twice in a group",
        '[groups]\nml-team = ["trainer", "trainer"]\n',
        'ztlab.toml: groups.ml-team[1]: role "trainer" is listed twice '
        "(also at groups.ml-team[0]); expected each once",
    ),
    (
        "string for a group's roles",
        '[groups]\nml-team = "trainer"\n',
        'ztlab.toml: groups.ml-team: expected an array of role names, got "trainer" (string)',
    ),
    (
        "unknown role in pool roles",
        '[gpu.pools.research]\ngpus = ["0"]\nroles = ["trainer", "student"]\n',
        'ztlab.toml: gpu.pools.research.roles[1]: role "student" does not exist; '
        f"expected one of: {ROLES}",
    ),
    (
        "plain-string secret",
        '[secrets]\ncookie_secret = "s3cr3t-cookie-value"\n',
        "ztlab.toml: secrets.cookie_secret: secrets must come from the environment or a file, "
        'not from the configuration file; expected { env = "NAME" } or { file = "/path" }',
    ),
    (
        "both env and file",
        '[secrets]\noidc_client_secret = { env = "OIDC", file = "/run/secrets/oidc" }\n',
        "ztlab.toml: secrets.oidc_client_secret: expected exactly one of env or file, got both",
    ),
    (
        "neither env nor file",
        "[secrets]\noidc_client_secret = {}\n",
        "ztlab.toml: secrets.oidc_client_secret: expected exactly one of env or file, "
        'got neither; e.g. { env = "NAME" }',
    ),
    (
        "unknown key in a secret reference",
        '[secrets]\noidc_client_secret = { value = "s3cr3t-cookie-value" }\n',
        "ztlab.toml: secrets.oidc_client_secret.value: unknown key; expected one of: env, file",
    ),
    (
        "secret reference of the wrong type",
        "[secrets]\ncookie_secret = 12345678\n",
        'ztlab.toml: secrets.cookie_secret: expected a table { env = "NAME" } or '
        '{ file = "/path" }, got an integer',
    ),
    (
        "secret file path relative",
        '[secrets]\ncookie_secret = { file = "secrets/cookie" }\n',
        'ztlab.toml: secrets.cookie_secret.file: expected an absolute path, got "secrets/cookie"',
    ),
    (
        "secret put where the variable name goes",
        '[secrets]\ncookie_secret = { env = "s3cr3t-cookie-value" }\n',
        "ztlab.toml: secrets.cookie_secret.env: expected the name of an environment variable "
        "(letters, digits and _, not starting with a digit), got a string",
    ),
    (
        "invalid TOML",
        "[hub]\nbind_url = http://127.0.0.1:8000\n",
        "ztlab.toml: line 2, column 12: invalid TOML: invalid value",
    ),
    (
        "duplicate TOML key",
        'state_dir = "/a"\nstate_dir = "/b"\n',
        "ztlab.toml: line 2, column 17: invalid TOML: cannot overwrite a value",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [pytest.param(text, expected, id=name) for name, text, expected in ONE_PROBLEM],
)
def test_exact_message_for_one_problem(in_tmp: Path, text: str, expected: str) -> None:
    message = error_for(in_tmp, text)
    assert message == expected
    assert "s3cr3t" not in message
    for leak in ("Input should", "pydantic", "type=", "errors.pydantic.dev", "[key]"):
        assert leak not in message


def test_one_problem_is_one_config_error_with_the_problem(in_tmp: Path) -> None:
    write(in_tmp, "[roles.trainer]\nmax_gpus = -1\n")
    with pytest.raises(InvalidConfigError) as info:
        load_config("ztlab.toml")
    assert isinstance(info.value, ConfigError)
    assert info.value.exit_code == 2
    assert info.value.source == "ztlab.toml"
    assert info.value.problems == (
        Problem("roles.trainer.max_gpus", "expected an integer >= 0, got -1"),
    )


def test_several_problems_are_one_message(in_tmp: Path) -> None:
    message = error_for(
        in_tmp,
        'stat_dir = "/x"\n'
        "[audit]\ncheckpoint_interval_seconds = 0\n"
        '[roles.trainer]\nmax_gpus = "two"\nmemory = "lots"\n'
        '[secrets]\ncookie_secret = "s3cr3t-cookie-value"\n',
    )
    assert message == (
        "ztlab.toml: 5 problems\n"
        f"  stat_dir: unknown key; expected one of: {TOP_KEYS}\n"
        "  audit.checkpoint_interval_seconds: expected a number > 0 and <= 60, got 0\n"
        '  roles.trainer.max_gpus: expected an integer >= 0, got "two" (string)\n'
        '  roles.trainer.memory: expected a size such as "16G" or "512M" (a number with an '
        'optional K, M, G or T suffix, 1024-based; a bare number is bytes), got "lots"\n'
        "  secrets.cookie_secret: secrets must come from the environment or a file, not from "
        'the configuration file; expected { env = "NAME" } or { file = "/path" }'
    )


def test_several_cross_reference_problems_are_one_message(in_tmp: Path) -> None:
    message = error_for(
        in_tmp,
        '[groups]\nml-team = ["trainr"]\n'
        '[gpu.pools.a]\ngpus = ["0", "0"]\nroles = ["nobody"]\n'
        '[gpu.pools.b]\ngpus = []\nroles = ["trainer"]\n',
    )
    assert message == (
        "ztlab.toml: 4 problems\n"
        f'  groups.ml-team[0]: role "trainr" does not exist; expected one of: {ROLES}\n'
        '  gpu.pools.a.gpus[1]: GPU "0" is listed twice (also at gpu.pools.a.gpus[0]); '
        "expected each GPU in exactly one pool\n"
        f'  gpu.pools.a.roles[0]: role "nobody" does not exist; expected one of: {ROLES}\n'
        "  gpu.pools.b.gpus: the pool has no GPUs; expected at least one GPU id"
    )


def test_a_role_added_in_the_file_can_be_referenced(in_tmp: Path) -> None:
    write(in_tmp, '[roles.student]\n[groups]\nclass = ["student"]\n')
    assert load_config("ztlab.toml").groups == {"class": ["student"]}


def test_message_names_the_file_as_given(tmp_path: Path) -> None:
    path = write(tmp_path, "[hub]\nport = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.message == (
        f"{path}: hub.port: unknown key; expected one of: "
        "api_url, bind_url, cull_idle_seconds, proxy_api_url"
    )


def test_login_networks_are_normalized(in_tmp: Path) -> None:
    write(in_tmp, '[login]\nallowed_networks = ["10.1.2.3/8", "192.0.2.7", "2001:DB8::/32"]\n')
    assert load_config("ztlab.toml").login.allowed_networks == [
        "10.0.0.0/8",
        "192.0.2.7/32",
        "2001:db8::/32",
    ]


@pytest.mark.parametrize("network", ["10.0.0.0/33", "intranet"])
def test_invalid_login_network_is_named_by_its_key_path(in_tmp: Path, network: str) -> None:
    message = error_for(in_tmp, f'[login]\nallowed_networks = ["{network}", "::1/128"]\n')
    assert message.startswith("ztlab.toml: login.allowed_networks[0]: ")
    assert network in message
    assert "\n" not in message  # one problem: the valid second entry is not reported


@pytest.mark.parametrize("network", ["10.0.0.0/33", "intranet"])
def test_invalid_login_network_says_what_was_expected(in_tmp: Path, network: str) -> None:
    message = error_for(in_tmp, f'[login]\nallowed_networks = ["{network}"]\n')
    assert message == (
        "ztlab.toml: login.allowed_networks[0]: expected an IP network such as "
        f'"10.0.0.0/8" or "127.0.0.1/32", got "{network}"'
    )


# --------------------------------------------------------------------------------------
# Files that cannot be read
# --------------------------------------------------------------------------------------


def test_missing_file(in_tmp: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("ztlab.toml")
    assert info.value.message == "ztlab.toml: no such file"


def test_directory(in_tmp: Path) -> None:
    (in_tmp / "ztlab.toml").mkdir()
    with pytest.raises(ConfigError) as info:
        load_config("ztlab.toml")
    assert info.value.message == "ztlab.toml: is a directory; expected a TOML file"


def test_world_writable_file_is_refused(in_tmp: Path) -> None:
    write(in_tmp, "").chmod(0o666)
    with pytest.raises(ConfigError) as info:
        load_config("ztlab.toml")
    assert info.value.message == (
        "ztlab.toml: is writable by others (mode 0666); expected a file only its owner can change"
    )
    assert info.value.hint == "chmod o-w ztlab.toml"


def test_unreadable_file(in_tmp: Path) -> None:
    """Root reads any file, so as root the check runs as the unprivileged user nobody."""
    if os.geteuid() != 0:
        write(in_tmp, "").chmod(0o000)
        with pytest.raises(ConfigError) as info:
            load_config("ztlab.toml")
        assert info.value.message == "ztlab.toml: cannot be read: permission denied"
        return
    folder = Path(tempfile.mkdtemp(prefix="ztlab-unreadable-"))
    try:
        folder.chmod(0o755)
        write(folder, "").chmod(0o000)
        script = (
            "from ztlab.common.config import load_config\n"
            "from ztlab.common.errors import ConfigError\n"
            "try:\n    load_config('ztlab.toml')\n"
            "except ConfigError as exc:\n    print(exc.message)\n"
        )
        result = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-c",
                script,
            ],
            cwd=folder,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert result.stdout.strip() == "ztlab.toml: cannot be read: permission denied", (
            result.stderr
        )
    finally:
        shutil.rmtree(folder)


def test_not_utf8(in_tmp: Path) -> None:
    (in_tmp / "ztlab.toml").write_bytes(b'state_dir = "/a"\norigin = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config("ztlab.toml")
    assert info.value.message == "ztlab.toml: line 2: invalid TOML: expected UTF-8 text"


# --------------------------------------------------------------------------------------
# Validation outside files
# --------------------------------------------------------------------------------------


def test_parse_config_reports_like_load_config() -> None:
    with pytest.raises(InvalidConfigError) as info:
        parse_config({"groups": {"g": ["x"]}})
    assert info.value.message == (
        f'<config>: groups.g[0]: role "x" does not exist; expected one of: {ROLES}'
    )
    with pytest.raises(InvalidConfigError) as info:
        parse_config({"hub": {"bind_url": 8000}}, source="test")
    assert info.value.message == "test: hub.bind_url: expected an http:// or https:// URL, " + (
        "got 8000 (integer)"
    )


def test_direct_construction_runs_the_cross_reference_checks() -> None:
    pool = GpuPool(gpus=["0"], roles=["nobody"])
    with pytest.raises(InvalidConfigError):
        ZtlabConfig(gpu=GpuConfig(pools={"a": pool}))


# --------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------


def secret_config(directory: Path, ref: str) -> ZtlabConfig:
    write(directory, f"[secrets]\ncookie_secret = {ref}\n")
    return load_config(directory / "ztlab.toml")


def test_secret_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZT_TEST_COOKIE", "s3cr3t-cookie-value")
    config = secret_config(tmp_path, '{ env = "ZT_TEST_COOKIE" }')
    ref = config.secrets.cookie_secret
    assert ref is not None
    assert ref.key_path == "secrets.cookie_secret"
    value = ref.resolve()
    assert isinstance(value, SecretStr)
    assert value.get_secret_value() == "s3cr3t-cookie-value"
    assert config.resolve_secrets()["secrets.cookie_secret"] == value
    for text in (repr(config), str(config), repr(ref), str(ref), repr(value), str(value)):
        assert "s3cr3t" not in text
    assert repr(ref) == 'SecretRef({ env = "ZT_TEST_COOKIE" })'
    assert str(ref) == '{ env = "ZT_TEST_COOKIE" }'


def test_secret_from_environment_unset_or_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZT_TEST_COOKIE", raising=False)
    config = secret_config(tmp_path, '{ env = "ZT_TEST_COOKIE" }')
    with pytest.raises(SecretError) as info:
        config.resolve_secrets()
    assert info.value.message == (
        "secrets.cookie_secret: environment variable ZT_TEST_COOKIE is not set"
    )
    assert info.value.exit_code == 2
    monkeypatch.setenv("ZT_TEST_COOKIE", "")
    with pytest.raises(SecretError) as info:
        config.resolve_secrets()
    assert (
        info.value.message == "secrets.cookie_secret: environment variable ZT_TEST_COOKIE is empty"
    )


def test_secret_from_file(tmp_path: Path) -> None:
    secret = tmp_path / "cookie"
    secret.write_text("s3cr3t-cookie-value\n")
    secret.chmod(0o600)
    config = secret_config(tmp_path, f'{{ file = "{secret}" }}')
    assert config.resolve_secrets() == {"secrets.cookie_secret": SecretStr("s3cr3t-cookie-value")}
    secret.chmod(0o400)
    assert config.resolve_secrets()["secrets.cookie_secret"].get_secret_value() == (
        "s3cr3t-cookie-value"
    )
    assert "s3cr3t" not in repr(config) + str(config.secrets)


@pytest.mark.parametrize(
    ("mode", "wording"),
    [(0o644, "readable"), (0o640, "readable"), (0o604, "readable"), (0o620, "accessible")],
)
def test_secret_file_open_to_group_or_others_is_refused(
    tmp_path: Path, mode: int, wording: str
) -> None:
    secret = tmp_path / "cookie"
    secret.write_text("s3cr3t-cookie-value")
    secret.chmod(mode)
    config = secret_config(tmp_path, f'{{ file = "{secret}" }}')
    with pytest.raises(SecretError) as info:
        config.resolve_secrets()
    assert info.value.message == (
        f"secrets.cookie_secret: secret file {secret} is {wording} by group or others "
        f"(mode {mode:04o}); expected mode 0600 or 0400"
    )
    assert info.value.hint == f"chmod 600 {secret}"
    assert "s3cr3t" not in info.value.diagnostics()


@pytest.mark.parametrize(
    ("make", "ending"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(mode=0o700), "is not a regular file"),
        (lambda p: (p.write_bytes(b"\n"), p.chmod(0o600)), "is empty"),
        (lambda p: (p.write_bytes(b"\xff\xfe"), p.chmod(0o600)), "is not UTF-8 text"),
        (
            lambda p: (p.write_bytes(b"x" * (64 * 1024 + 1)), p.chmod(0o600)),
            "is larger than 65536 bytes",
        ),
    ],
    ids=["missing", "directory", "empty", "binary", "huge"],
)
def test_secret_file_problems(tmp_path: Path, make: Any, ending: str) -> None:
    secret = tmp_path / "cookie"
    make(secret)
    config = secret_config(tmp_path, f'{{ file = "{secret}" }}')
    with pytest.raises(SecretError) as info:
        config.resolve_secrets()
    assert info.value.message == f"secrets.cookie_secret: secret file {secret} {ending}"


def test_several_unresolvable_secrets_are_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZT_TEST_OIDC", raising=False)
    write(
        tmp_path,
        "[secrets]\n"
        f'cookie_secret = {{ file = "{tmp_path / "nope"}" }}\n'
        'oidc_client_secret = { env = "ZT_TEST_OIDC" }\n',
    )
    config = load_config(tmp_path / "ztlab.toml")
    with pytest.raises(SecretError) as info:
        config.resolve_secrets()
    assert info.value.message == (
        "2 secrets cannot be resolved\n"
        f"  secrets.cookie_secret: secret file {tmp_path / 'nope'} does not exist\n"
        "  secrets.oidc_client_secret: environment variable ZT_TEST_OIDC is not set"
    )


def test_secret_ref_built_in_code() -> None:
    ref = SecretRef(env="X")
    assert ref.key_path == "secret"
    with pytest.raises(ValidationError):
        SecretRef()
    with pytest.raises(ValidationError):
        SecretRef(env="X", file=Path("/x"))


# --------------------------------------------------------------------------------------
# Writing the configuration back out
# --------------------------------------------------------------------------------------


def test_toml_output_round_trips(tmp_path: Path) -> None:
    effective = load_config(EXAMPLE).effective()
    text = dump_toml(effective, header="a header\nof two lines")
    assert text.startswith("# a header\n# of two lines\n\n")
    assert "\n# cookie_secret: not set\n" in text
    assert 'oidc_client_secret = { file = "/var/lib/ztlab/secrets/oidc-client-secret" }' in text
    assert 'memory = "32G"' in text
    assert "\n[login]\n" in text
    assert 'allowed_networks = ["127.0.0.0/8", "::1/128"]' in text
    path = write(tmp_path, text, "shown.toml")
    assert load_config(path) == effective


def test_toml_output_quotes_keys_and_strings(tmp_path: Path) -> None:
    write(
        tmp_path,
        '[groups]\n"cn=ml, ou=groups" = ["trainer"]\n'
        '[roles.trainer]\ndescription = "Says \\"hi\\"\\n\\ttab \\u007f and ü"\n',
    )
    config = load_config(tmp_path / "ztlab.toml")
    text = dump_toml(config)
    assert '"cn=ml, ou=groups" = ["trainer"]' in text
    assert "[gpu.pools]" in text  # empty tables are kept
    assert load_config(write(tmp_path, text, "shown.toml")) == config


def test_json_output(tmp_path: Path) -> None:
    effective = load_config(EXAMPLE).effective()
    data = json.loads(dump_json(effective))
    assert data["audit"]["log"] == "/var/lib/ztlab/audit/audit.jsonl"
    assert data["secrets"] == {
        "oidc_client_secret": {"file": "/var/lib/ztlab/secrets/oidc-client-secret"},
    }
    assert data["login"]["development_provider"] is True
    assert data["roles"]["trainer"]["memory"] == "32G"
    assert parse_config(data) == effective


def test_effective_fills_in_computed_defaults() -> None:
    effective = ZtlabConfig(state_dir=Path("/s")).effective()
    assert effective.audit.log == Path("/s/audit/audit.jsonl")
    assert effective.audit.signing_key == Path("/s/keys/audit-ed25519.key")


# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("16G", 16 * G),
        ("16g", 16 * G),
        ("16GB", 16 * G),
        ("16GiB", 16 * G),
        ("16Gi", 16 * G),
        ("512M", 512 * 1024**2),
        ("1.5G", 3 * G // 2),
        ("1T", 1024**4),
        ("64K", 65536),
        ("100", 100),
        ("100B", 100),
        (" 2 G ", 2 * G),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "16X", "-1G", "0", "0.5", "1.2.3G", "16 gigs", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@given(st.integers(min_value=1, max_value=2**50))
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_format_size_is_short() -> None:
    assert [format_size(n) for n in (16 * G, 512 * 1024**2, 1536, 1000)] == [
        "16G",
        "512M",
        "1536",
        "1000",
    ]


# --------------------------------------------------------------------------------------
# The model as documentation
# --------------------------------------------------------------------------------------

ALL_MODELS: list[type[BaseModel]] = [
    RunsConfig,
    ScheduleConfig,
    ZtlabConfig,
    HubConfig,
    AuditConfig,
    PolicyConfig,
    LoginConfig,
    SandboxConfig,
    ProxyConfig,
    RoleConfig,
    GpuConfig,
    GpuPool,
    GpuMonitorConfig,
    ComputeConfig,
    DatasetsConfig,
    ModelsConfig,
    PackagesConfig,
    EnvironmentsConfig,
    SecretsConfig,
    SecretRef,
]


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_every_key_is_documented(model: type[BaseModel]) -> None:
    assert model.__doc__
    assert model.model_config.get("extra") == "forbid"
    assert model.model_config.get("frozen") is True
    for name, field in model.model_fields.items():
        assert field.description, f"{model.__name__}.{name} has no description"
        if field.annotation not in ALL_MODELS:
            assert "Default" in field.description, f"{model.__name__}.{name}"
            assert "Example" in field.description, f"{model.__name__}.{name}"


def test_json_schema() -> None:
    schema = ZtlabConfig.model_json_schema()
    assert set(schema["properties"]) == set(ZtlabConfig.model_fields)
    assert schema["additionalProperties"] is False
    memory = schema["$defs"]["RoleConfig"]["properties"]["memory"]
    assert {alt["type"] for alt in memory["anyOf"]} == {"string", "integer"}


def test_mode_constants_are_what_the_messages_say() -> None:
    assert stat.S_IMODE(0o100600) == 0o600


def test_login_scopes_must_include_openid(in_tmp: Path) -> None:
    message = error_for(in_tmp, '[login]\nscopes = ["email", "groups"]\n')
    assert message == (
        'ztlab.toml: login.scopes: expected a list of scopes that includes "openid", got an array'
    )


def test_sandbox_settings_are_checked(in_tmp: Path) -> None:
    message = error_for(in_tmp, '[sandbox]\naddress_pool = "10.0.0.0/30"\npids_max = 4\n')
    assert message.splitlines() == [
        "ztlab.toml: 2 problems",
        "  sandbox.address_pool: expected a network of at least 8 addresses (/29), "
        'got "10.0.0.0/30"',
        "  sandbox.pids_max: expected an integer >= 16, got 4",
    ]


@pytest.mark.parametrize(
    ("value", "limit"),
    [("allow", None), ("refuse", 0), ("Refuse", 0), ("100M", 100 * 1024**2), ("1g", G)],
)
def test_raw_files_rule(in_tmp: Path, value: str, limit: int | None) -> None:
    path = in_tmp / "ztlab.toml"
    path.write_text(f'[roles.viewer]\nraw_files = "{value}"\n')
    assert load_config(path).roles["viewer"].raw_files_limit == limit


def test_raw_files_rule_bad_value(in_tmp: Path) -> None:
    message = error_for(in_tmp, '[roles.viewer]\nraw_files = "sometimes"\n')
    assert message == (
        'ztlab.toml: roles.viewer.raw_files: expected "allow", "refuse" or a size such as '
        '"100M" (allowed up to that size), got "sometimes" (string)'
    )


def test_built_in_raw_file_rules() -> None:
    roles = load_config(EXAMPLE).roles
    assert roles["viewer"].raw_files == "refuse"
    assert roles["data-steward"].raw_files_limit is None
    assert roles["trainer"].raw_files_limit == 100 * 1024**2
    # a new role refuses raw files unless it says otherwise
    assert RoleConfig().raw_files_limit == 0
