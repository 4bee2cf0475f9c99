"""``ztlab --help`` lists every command with a whole one-line description."""

from __future__ import annotations

import click
from click.testing import CliRunner

from ztlab.cli.main import COMMANDS, cli


def test_help_lists_every_command_with_one_line() -> None:
    result = CliRunner().invoke(cli, ["--help"], terminal_width=80)
    assert result.exit_code == 0
    listed = result.output.split("Commands:\n", 1)[1].splitlines()
    names = {line.split()[0]: line for line in listed if line.strip()}
    assert set(names) == set(COMMANDS)
    for name, line in names.items():
        description = line.split(None, 1)[1]
        assert not description.endswith("..."), f"{name}: {description}"
        assert description.endswith("."), f"{name}: {description}"


def test_the_summaries_listed_without_loading_are_each_commands_own() -> None:
    """`ztlab --help` lists summaries kept in cli/main.py (so that listing imports nothing);
    each must be the command's own short help."""
    context = click.Context(cli)
    for name, (_, summary) in COMMANDS.items():
        command = cli.get_command(context, name)
        assert command is not None, name
        assert command.get_short_help_str(limit=200) == summary, name


def test_a_command_loads_only_what_it_needs() -> None:
    """`ztlab data fingerprint` does not import the hub, pydantic or cryptography."""
    import subprocess
    import sys

    code = (
        "import sys; from ztlab.cli.main import cli; "
        "from click.testing import CliRunner; "
        "CliRunner().invoke(cli, ['data', 'fingerprint', '--help']); "
        "print(sorted({m.split('.')[0] + ('.' + m.split('.')[1] if m.startswith('ztlab.') "
        "else '') for m in sys.modules}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    for heavy in ("ztlab.hub", "pydantic", "cryptography", "jupyterhub", "ztlab.extensions"):
        assert f"'{heavy}'" not in loaded, f"{heavy} was imported: {loaded}"
