"""``ztlab config``: placeholder, filled in by its own change."""

import click


@click.group("config")
def config_group() -> None:
    """(not yet implemented)"""
