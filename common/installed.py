"""Where ``make`` installed the parts of zerotrust-lab that are not Python.

The npm packages (oidc-provider for the development identity provider, and
configurable-http-proxy as the benchmarks' baseline proxy) are installed inside the venv, at
``<venv>/share/ztlab/npm``, next to the copy of ztlab itself, so nothing at run time reads
the checkout it was installed from.
``$ZTLAB_NODE_MODULES`` points somewhere else (a ``node_modules`` folder).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ztlab.common.errors import ConfigError

#: what installs the npm parts into the venv
NPM_INSTALL_HINT = "run `make up` or `make test` (they install the npm parts into the venv)"


def node_modules_candidates() -> list[Path]:
    """The folders looked at for npm packages, in order."""
    candidates = [Path(sys.prefix) / "share" / "ztlab" / "npm" / "node_modules"]
    if os.environ.get("ZTLAB_NODE_MODULES"):
        candidates.insert(0, Path(os.environ["ZTLAB_NODE_MODULES"]))
    return candidates


def npm_package(name: str) -> Path:
    """The installed npm package ``name`` (its folder), or :class:`ConfigError` with the fix."""
    candidates = node_modules_candidates()
    for candidate in candidates:
        if (candidate / name / "package.json").is_file():
            return candidate / name
    raise ConfigError(
        f"the npm package {name} is not installed (looked in "
        + ", ".join(str(c) for c in candidates)
        + ")",
        hint=NPM_INSTALL_HINT,
    )


def npm_command(package: str, command: str) -> Path:
    """The executable ``command`` of the installed npm ``package`` (``node_modules/.bin``)."""
    return npm_package(package).parent / ".bin" / command
