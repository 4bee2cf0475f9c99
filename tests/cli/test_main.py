"""``ztlab --help`` lists every command with a whole one-line description."""

from __future__ import annotations

from click.testing import CliRunner

from ztlab.cli.main import cli


def test_help_lists_every_command_with_one_line() -> None:
    result = CliRunner().invoke(cli, ["--help"], terminal_width=80)
    assert result.exit_code == 0
    listed = result.output.split("Commands:\n", 1)[1].splitlines()
    names = {line.split()[0]: line for line in listed if line.strip()}
    assert set(names) == set(cli.commands)
    for name, line in names.items():
        description = line.split(None, 1)[1]
        assert not description.endswith("..."), f"{name}: {description}"
        assert description.endswith("."), f"{name}: {description}"
