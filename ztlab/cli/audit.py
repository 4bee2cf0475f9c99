"""``ztlab audit``: placeholder, filled in by its own change."""

import click


@click.group("audit")
def audit_group() -> None:
    """(not yet implemented)"""
