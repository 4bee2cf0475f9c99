"""``ztlab up``: state directory, keys and the first audit record, from a config file."""

from __future__ import annotations

import stat
from pathlib import Path

from click.testing import CliRunner

from tests.auditlog_helpers import verify
from ztlab.cli.main import cli
from ztlab.common.auditlog.record import parse_record


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "ztlab.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n{extra}')
    return path


def test_up_prepares_the_state_and_records_itself(tmp_path: Path) -> None:
    config = _config(tmp_path)
    result = CliRunner().invoke(cli, ["up", "--config", str(config)])
    assert result.exit_code == 0, result.output
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    key = state / "keys" / "audit-ed25519.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    log = state / "audit" / "audit.jsonl"
    report = verify(log)
    assert report.records == report.covered == 1
    record = parse_record(log.read_bytes().splitlines()[0])
    assert record.action == "control_plane.up"
    assert "trainer" in record.detail["roles"]
    assert "audit public key  ztlab.local/audit+" in result.output
    # a second start appends to the same log with the same key
    result = CliRunner().invoke(cli, ["up", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert verify(log).records == 2


def test_up_refuses_an_invalid_config(tmp_path: Path) -> None:
    config = _config(tmp_path, "[audit]\ncheckpoint_interval_seconds = 0\n")
    result = CliRunner().invoke(cli, ["up", "--config", str(config)])
    assert result.exit_code == 2
    assert "audit.checkpoint_interval_seconds" in result.stderr
    assert not (tmp_path / "state").exists()  # nothing starts on a half-valid config
