"""``ztlab policy``: exit statuses 0 (allowed), 1 (denied), 2 (bad input), and the output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ztlab.cli.main import cli
from ztlab.cli.policy import policy_group


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["policy", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def check(*args: str) -> tuple[int, str, str]:
    return run("check", *args)


def test_allowed_exits_0_and_names_the_policy() -> None:
    code, out, _ = check(
        "--principal", "alice", "--roles", "trainer", "--action", "lease_gpu",
        "--resource", "pool:research", "--context", '{"gpus": 2}',
    )  # fmt: skip
    assert code == 0
    assert out == (
        "ALLOW  alice lease_gpu pool:research\n"
        "  permitted by policy 'trainer-lease-gpu': trainers lease GPUs to train models\n"
    )


def test_denied_by_default_exits_1() -> None:
    code, out, _ = check(
        "--principal", "vera", "--roles", "viewer", "--action", "lease_gpu",
        "--resource", "pool:research",
    )  # fmt: skip
    assert code == 1
    assert out.startswith("DENY   vera lease_gpu pool:research\n")
    assert (
        "denied by default: no policy permits roles [viewer] to lease_gpu on pool:research" in out
    )


def test_two_person_rule_exits_1_with_the_forbid() -> None:
    code, out, _ = check(
        "--principal", "bob", "--roles", "approver, trainer", "--action", "approve_model",
        "--resource", "model:churn@7", "--context", '{"trainer": "bob"}',
    )  # fmt: skip
    assert code == 1
    assert "forbidden by policy 'two-person-rule': " in out


def test_no_roles_given_means_no_roles() -> None:
    code, out, _ = check(
        "--principal", "eve", "--action", "spawn_server", "--resource", "server:eve"
    )
    assert code == 1
    assert "roles []" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--action", "lease", "--resource", "pool:research"],
            "error: unknown action 'lease'; expected one of: access_server, approve_model,",
        ),
        (
            ["--action", "lease_gpu", "--resource", "pool:research", "--context", '{"gpus": 2,}'],
            "error: --context is not valid JSON: Expecting property name enclosed in double "
            "quotes at line 1, column 12 (char 11)",
        ),
        (
            ["--action", "lease_gpu", "--resource", "pool:research", "--context", "[1]"],
            "error: --context must be a JSON object, got list",
        ),
        (
            ["--action", "lease_gpu", "--resource", "dataset:mnist@3"],
            "error: action 'lease_gpu' applies to pool resources (pool:NAME), "
            "got 'dataset:mnist@3'",
        ),
        (
            ["--action", "lease_gpu", "--resource", "pool:research", "--context", '{"gpus": "2"}'],
            "must be a Long, got str '2'",
        ),
        (
            [
                "--action",
                "lease_gpu",
                "--resource",
                "pool:research",
                "--policy-dir",
                "/nonexistent",
            ],
            "error: policy directory /nonexistent does not exist or is not a directory",
        ),
    ],
    ids=["unknown-action", "bad-json", "json-not-object", "wrong-kind", "wrong-type", "bad-dir"],
)
def test_bad_input_exits_2(extra: list[str], message: str) -> None:
    code, out, err = check("--principal", "alice", "--roles", "trainer", *extra)
    assert code == 2
    assert out == ""
    assert message in err


def test_bad_role_name_exits_2() -> None:
    code, _, err = check(
        "--principal", "alice", "--roles", "trainer,bad role", "--action", "lease_gpu",
        "--resource", "pool:research",
    )  # fmt: skip
    assert code == 2
    assert "invalid role 'bad role'" in err


def test_missing_option_is_a_click_usage_error() -> None:
    code, _, err = check("--action", "lease_gpu", "--resource", "pool:research")
    assert code == 2
    assert "Missing option '--principal'" in err


def test_check_with_a_policy_dir(tmp_path: Path) -> None:
    (tmp_path / "only.cedar").write_text(
        '@id("viewers-read-audit")\n@reason("viewers may read the audit log here")\n'
        'permit (principal in Ztlab::Role::"viewer", action == Ztlab::Action::"read_audit", '
        "resource);\n",
        encoding="utf-8",
    )
    code, out, _ = check(
        "--principal", "vera", "--roles", "viewer", "--action", "read_audit",
        "--resource", "audit:main", "--policy-dir", str(tmp_path),
    )  # fmt: skip
    assert code == 0
    assert "permitted by policy 'viewers-read-audit'" in out


def test_validate_defaults() -> None:
    assert run("validate") == (0, "38 policies, 15 actions, valid\n", "")


def test_validate_reports_the_broken_file(tmp_path: Path) -> None:
    (tmp_path / "ok.cedar").write_text(
        '@id("a")\n@reason("r")\npermit (principal, action == Ztlab::Action::"read_audit", '
        "resource);\n",
        encoding="utf-8",
    )
    (tmp_path / "typo.cedar").write_text(
        '\n@id("b")\n@reason("r")\npermit (principal, action == Ztlab::Action::"read_audits", '
        "resource);\n",
        encoding="utf-8",
    )
    code, out, err = run("validate", "--policy-dir", str(tmp_path))
    assert code == 2
    assert out == ""
    assert f"error: {tmp_path / 'typo.cedar'}:2: policy 'b' does not match the schema" in err
    assert "read_audits" in err


def test_show_defaults_prints_schema_and_policies() -> None:
    code, out, _ = run("show-defaults")
    assert code == 0
    assert out.startswith("// ==== schema.cedarschema ====\n")
    assert "// ==== guardrails.cedar ====" in out
    assert '@id("two-person-rule")' in out


@pytest.mark.parametrize("command", [[], ["check"], ["validate"], ["show-defaults"]])
def test_every_command_has_help(command: list[str]) -> None:
    code, out, _ = run(*command, "--help")
    assert code == 0
    assert "(not yet implemented)" not in out
    group_or_command: click.Command = policy_group
    if command:
        group_or_command = policy_group.commands[command[0]]
    assert group_or_command.help
    assert group_or_command.help.splitlines()[0].strip()
    for param in group_or_command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{command} {param.name} has no help text"
    if not command:
        assert set(policy_group.commands) == {"check", "validate", "show-defaults"}


def _ztlab() -> list[str]:
    script = Path(sys.executable).with_name("ztlab")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ztlab"]


def test_real_subprocess_exit_statuses() -> None:
    base = [*_ztlab(), "policy", "check", "--principal", "alice", "--resource", "pool:research"]
    allowed = subprocess.run(
        [*base, "--roles", "trainer", "--action", "lease_gpu"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.startswith("ALLOW  alice lease_gpu pool:research\n")
    denied = subprocess.run(
        [*base, "--roles", "admin", "--action", "join_pool"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert denied.returncode == 1
    assert "forbidden by policy 'admins-do-not-compute'" in denied.stdout
    bad = subprocess.run(
        [*base, "--roles", "admin", "--action", "join_pool", "--context", "{"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "error: --context is not valid JSON" in bad.stderr


def test_check_records_the_decision_in_an_audit_log(tmp_path: Path) -> None:
    from tests.auditlog_helpers import record_lines, verify
    from ztlab.common.auditlog.record import parse_record

    log = tmp_path / "audit.jsonl"
    result = CliRunner().invoke(
        cli,
        [
            "policy",
            "check",
            "--principal",
            "bob",
            "--roles",
            "viewer",
            "--action",
            "lease_gpu",
            "--resource",
            "pool:research",
            "--audit-log",
            str(log),
        ],
    )
    assert result.exit_code == 1
    assert verify(log).records == 1
    record = parse_record(record_lines(log)[0][:-1])
    assert (record.actor, record.action) == ("bob", "policy.decision")
    assert record.detail["allowed"] is False
    assert record.detail["resource"] == "pool:research"
