"""Which environment the kernel runs in: recorded in MLflow runs, and layer conflicts shown.

The environment's name and lock digest come from its kernel launcher
(:mod:`ztlab.kernels.launch`: ``ZTLAB_ENVIRONMENT``, ``ZTLAB_ENVIRONMENT_DIGEST``). After
each cell, an MLflow run the user's code started gets them as tags once
(``ztlab.environment``, ``ztlab.environment_digest``), next to the dataset inputs
lineage records. Before the first cell, packages in the user's layer that replace one of
the environment's are listed, each with the command that removes it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

_TAGGED: set[str] = set()


def environment_tags() -> dict[str, str]:
    """The tags a run gets (empty outside an environment's kernel)."""
    name = os.environ.get("ZTLAB_ENVIRONMENT")
    if not name:
        return {}
    return {
        "ztlab.environment": name,
        "ztlab.environment_digest": os.environ.get("ZTLAB_ENVIRONMENT_DIGEST", ""),
    }


def tag_active_run(*_: Any) -> bool:
    """Tag the active MLflow run with the environment, once per run."""
    mlflow = sys.modules.get("mlflow")
    tags = environment_tags()
    if mlflow is None or not tags:
        return False
    run = mlflow.active_run()
    if run is None or run.info.run_id in _TAGGED:
        return False
    mlflow.set_tags(tags)
    _TAGGED.add(run.info.run_id)
    return True


def layer_conflicts() -> list[str]:
    """One line per package of the user's layer that replaces the environment's copy."""
    layer = os.environ.get("VIRTUAL_ENV")
    if not layer or not os.environ.get("ZTLAB_ENVIRONMENT"):
        return []
    from ztlab.kernels.layers import shadowed

    return [
        f"{name} {mine} in your layer ({layer}) replaces {name} {theirs} of environment "
        f"{os.environ['ZTLAB_ENVIRONMENT']}; to use the environment's: pip uninstall {name}"
        for name, mine, theirs in shadowed(Path(layer))
    ]


def install(ipython: Any) -> None:
    """Register the hooks on the kernel's IPython."""
    warned = False

    def warn(*_: Any) -> None:
        nonlocal warned
        if warned:
            return
        warned = True
        for line in layer_conflicts():
            print(f"ztlab: {line}", file=sys.stderr)

    ipython.events.register("pre_run_cell", warn)
    ipython.events.register("post_run_cell", tag_active_run)
