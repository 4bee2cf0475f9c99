"""Tests for ``ztlab config``: check, show, schema; exit statuses and messages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ztlab.cli import config as config_cli
from ztlab.cli.main import cli
from ztlab.common.config import ZtlabConfig, load_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "ztlab.example.toml"
EXAMPLE_OK = "ztlab.example.toml: OK (5 roles, 1 GPU pool, 4 group mappings, 1 secret referenced)"
SECRET = "s3cr3t-cookie-value"


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in ``tmp_path``, with $ZTLAB_CONFIG unset and no default file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ZTLAB_CONFIG", raising=False)
    monkeypatch.setattr(config_cli, "DEFAULT_CONFIG_PATH", str(tmp_path / "etc" / "ztlab.toml"))
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o644)
    return path


def example_with_secrets(directory: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example as ``ztlab.toml``, with both secrets set and resolvable to ``SECRET``."""
    secret_file = directory / "oidc-client-secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    monkeypatch.setenv("ZTLAB_COOKIE_SECRET", SECRET)
    text = EXAMPLE.read_text(encoding="utf-8")
    for old, new in [
        (
            '# cookie_secret = { file = "/var/lib/ztlab/secrets/cookie-secret" }\n',
            'cookie_secret = { env = "ZTLAB_COOKIE_SECRET" }\n',
        ),
        (
            'oidc_client_secret = { file = "/var/lib/ztlab/secrets/oidc-client-secret" }',
            f'oidc_client_secret = {{ file = "{secret_file}" }}',
        ),
    ]:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return write(directory / "ztlab.toml", text)


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_check_example(in_tmp: Path) -> None:
    shutil.copy(EXAMPLE, in_tmp / "ztlab.example.toml")
    assert run("config", "check", "ztlab.example.toml") == (0, EXAMPLE_OK + "\n", "")


def test_check_counts_in_the_singular(in_tmp: Path) -> None:
    write(
        in_tmp / "ztlab.toml",
        '[roles.x]\n[gpu.pools.a]\ngpus = ["0"]\nroles = []\n[groups]\ng = []\n'
        '[secrets]\ncookie_secret = { env = "X" }\n',
    )
    code, out, _ = run("config", "check", "ztlab.toml")
    assert (code, out) == (
        0,
        "ztlab.toml: OK (6 roles, 1 GPU pool, 1 group mapping, 1 secret referenced)\n",
    )


def test_check_invalid_exits_2_with_the_message_on_stderr(in_tmp: Path) -> None:
    write(in_tmp / "ztlab.toml", '[roles.trainer]\nmax_gpus = "two"\n[groups]\nml = ["x"]\n')
    assert run("config", "check", "ztlab.toml") == (
        2,
        "",
        'error: ztlab.toml: roles.trainer.max_gpus: expected an integer >= 0, got "two" (string)\n',
    )
    write(in_tmp / "ztlab.toml", '[groups]\nml = ["x", "viewer", "y"]\n')
    code, out, err = run("config", "check", "ztlab.toml")
    assert (code, out) == (2, "")
    assert err.startswith('error: ztlab.toml: 2 problems\n  groups.ml[0]: role "x" does not')


def test_check_plain_secret_never_echoes_it(in_tmp: Path) -> None:
    write(in_tmp / "ztlab.toml", f'[secrets]\ncookie_secret = "{SECRET}"\n')
    code, out, err = run("config", "check", "ztlab.toml")
    assert code == 2
    assert SECRET not in out + err
    assert "secrets must come from the environment or a file" in err


def test_check_uses_ztlab_config(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(EXAMPLE, in_tmp / "site.toml")
    monkeypatch.setenv("ZTLAB_CONFIG", "site.toml")
    code, out, _ = run("config", "check")
    assert code == 0
    assert out.startswith("site.toml: OK (")


def test_check_default_path(in_tmp: Path) -> None:
    default = in_tmp / "etc" / "ztlab.toml"
    code, out, err = run("config", "check")
    assert (code, out) == (2, "")
    assert err == (
        f"error: {default}: no such file\n"
        "  hint: pass FILE, or set $ZTLAB_CONFIG (ztlab.example.toml is a start)\n"
    )
    default.parent.mkdir()
    shutil.copy(EXAMPLE, default)
    code, out, _ = run("config", "check")
    assert (code, out.split(": OK")[0]) == (0, str(default))


def test_check_missing_file_and_directory(in_tmp: Path) -> None:
    assert run("config", "check", "nope.toml") == (2, "", "error: nope.toml: no such file\n")
    assert run("config", "check", ".") == (
        2,
        "",
        "error: .: is a directory; expected a TOML file\n",
    )


def test_check_invalid_toml(in_tmp: Path) -> None:
    write(in_tmp / "ztlab.toml", "[hub\n")
    code, _, err = run("config", "check", "ztlab.toml")
    assert code == 2
    assert err.startswith("error: ztlab.toml: line 1, column 5: invalid TOML: ")


def test_check_resolve_secrets(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = in_tmp / "cookie"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    write(
        in_tmp / "ztlab.toml",
        f'[secrets]\ncookie_secret = {{ file = "{secret_file}" }}\n'
        'oidc_client_secret = { env = "ZT_TEST_OIDC" }\n',
    )
    monkeypatch.setenv("ZT_TEST_OIDC", "oidc-" + SECRET)
    code, out, err = run("config", "check", "--resolve-secrets", "ztlab.toml")
    assert (code, err) == (0, "")
    assert out == (
        "ztlab.toml: OK (5 roles, 0 GPU pools, 0 group mappings, 2 secrets referenced, "
        "all resolved)\n"
    )
    # Without the flag nothing is read: a broken secret is not noticed.
    monkeypatch.delenv("ZT_TEST_OIDC")
    secret_file.chmod(0o644)
    assert run("config", "check", "ztlab.toml")[0] == 0
    code, out, err = run("config", "check", "--resolve-secrets", "ztlab.toml")
    assert (code, out) == (2, "")
    assert err == (
        "error: ztlab.toml: 2 secrets cannot be resolved\n"
        f"  secrets.cookie_secret: secret file {secret_file} is readable by group or others "
        "(mode 0644); expected mode 0600 or 0400\n"
        "  secrets.oidc_client_secret: environment variable ZT_TEST_OIDC is not set\n"
        f"  hint: chmod 600 {secret_file}; set ZT_TEST_OIDC in the environment of the ztlab "
        "process\n"
    )
    assert SECRET not in out + err


def test_show_toml_masks_secrets_and_round_trips(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(EXAMPLE, in_tmp / "ztlab.toml")
    code, out, err = run("config", "show", "ztlab.toml")
    assert (code, err) == (0, "")
    assert out.startswith("# Effective configuration from ztlab.toml: defaults filled in,\n")
    assert "# cookie_secret: not set\n" in out
    assert 'oidc_client_secret = { file = "/var/lib/ztlab/secrets/oidc-client-secret" }\n' in out
    shown = write(in_tmp / "shown.toml", out)
    assert load_config(shown) == load_config(EXAMPLE).effective()

    # With secrets that resolve, only their references are shown.
    config = example_with_secrets(in_tmp, monkeypatch)
    assert load_config(config).resolve_secrets()  # both secrets are readable
    code, out, err = run("config", "show", "ztlab.toml")
    assert (code, err) == (0, "")
    assert SECRET not in out
    assert 'cookie_secret = { env = "ZTLAB_COOKIE_SECRET" }\n' in out
    assert f'oidc_client_secret = {{ file = "{in_tmp / "oidc-client-secret"}" }}\n' in out
    shown = write(in_tmp / "shown.toml", out)
    assert load_config(shown) == load_config(config).effective()


def test_show_fills_in_computed_defaults(in_tmp: Path) -> None:
    write(in_tmp / "ztlab.toml", 'state_dir = "/srv/zt"\n')
    code, out, _ = run("config", "show", "ztlab.toml")
    assert code == 0
    assert 'log = "/srv/zt/audit/audit.jsonl"\n' in out
    assert 'signing_key = "/srv/zt/keys/audit-ed25519.key"\n' in out
    assert "# directory: not set\n" in out


def test_show_json(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(EXAMPLE, in_tmp / "ztlab.toml")
    code, out, _ = run("config", "show", "--format", "json", "ztlab.toml")
    assert code == 0
    data = json.loads(out)
    assert data["secrets"] == {
        "oidc_client_secret": {"file": "/var/lib/ztlab/secrets/oidc-client-secret"}
    }
    assert data["audit"]["signing_key"] == "/var/lib/ztlab/keys/audit-ed25519.key"
    assert data["login"]["issuer"] == "http://127.0.0.1:8009"
    assert ZtlabConfig.model_validate(data) == load_config(EXAMPLE).effective()

    config = example_with_secrets(in_tmp, monkeypatch)
    assert load_config(config).resolve_secrets()  # both secrets are readable
    code, out, _ = run("config", "show", "--format", "json", "ztlab.toml")
    assert code == 0
    assert SECRET not in out
    data = json.loads(out)
    assert data["secrets"] == {
        "cookie_secret": {"env": "ZTLAB_COOKIE_SECRET"},
        "oidc_client_secret": {"file": str(in_tmp / "oidc-client-secret")},
    }
    assert ZtlabConfig.model_validate(data) == load_config(config).effective()


def test_show_invalid_exits_2(in_tmp: Path) -> None:
    write(in_tmp / "ztlab.toml", "[audit]\ncheckpoint_interval_seconds = 0\n")
    code, out, err = run("config", "show", "ztlab.toml")
    assert (code, out) == (2, "")
    assert err == (
        "error: ztlab.toml: audit.checkpoint_interval_seconds: expected a number > 0 and "
        "<= 60, got 0\n"
    )


def test_schema() -> None:
    code, out, _ = run("config", "schema")
    assert code == 0
    schema = json.loads(out)
    assert schema == ZtlabConfig.model_json_schema()
    assert "roles" in schema["properties"]


def test_every_command_has_a_one_line_help() -> None:
    code, out, _ = run("config", "--help")
    assert code == 0
    commands = out.split("Commands:\n", 1)[1].strip().splitlines()
    assert [line.split()[0] for line in commands] == ["check", "schema", "show"]
    for line in commands:
        assert len(line.split(None, 1)) == 2
        assert not line.endswith("...")
    for name in ("check", "show", "schema"):
        assert run("config", name, "--help")[0] == 0


def test_real_process_checks_the_example() -> None:
    ztlab = Path(sys.executable).parent / "ztlab"
    assert ztlab.exists(), f"{ztlab} is not installed (make test installs it)"
    done = subprocess.run(
        [str(ztlab), "config", "check", "ztlab.example.toml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, EXAMPLE_OK + "\n", "")
