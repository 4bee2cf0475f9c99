"""``ztlab policy``: placeholder, filled in by its own change."""

import click


@click.group("policy")
def policy_group() -> None:
    """(not yet implemented)"""
