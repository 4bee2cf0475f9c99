"""The user's own layer on top of an environment: where ``pip install`` puts packages.

Environments are read-only. Each user gets, per environment, a small venv in their home,
``~/.local/share/ztlab/layers/NAME``, whose ``site-packages`` comes first and then chains to
the environment's (``_ztlab_environment.pth``), so:

- ``pip install X`` (in a terminal: the layer's ``bin/pip``; in a notebook: ``%pip``, which
  runs the kernel's interpreter) installs into the layer, from the package proxy
  (``PIP_INDEX_URL``), and pip sees the environment's packages as installed;
- ``uv pip install X`` installs into the layer too (``VIRTUAL_ENV``);
- a new kernel sees what was installed; a package in the layer replaces the environment's
  copy, which :func:`shadowed` reports (the kernel extension says so in the notebook).

This runs as the user, inside their sandbox: it only ever writes in the user's home.
:func:`main` is the server's start (``python -I -m ztlab.kernels.layers -- SERVER...``):
it makes the layers of the environments the control plane granted (``ZTLAB_ENVIRONMENTS``,
name -> folder, JSON) and then runs the server.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Final

#: the file that chains a layer to its environment
CHAIN_PTH: Final = "_ztlab_environment.pth"

_PIP_SHIM = """#!{python}
import sys
from pip._internal.cli.main import main
sys.exit(main())
"""


def layer_path(name: str, home: Path | None = None) -> Path:
    """``~/.local/share/ztlab/layers/NAME``."""
    return (home or Path.home()) / ".local" / "share" / "ztlab" / "layers" / name


def _site(prefix: Path) -> Path:
    return prefix / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def ensure_layer(name: str, environment: Path, home: Path | None = None) -> Path:
    """Make (or repair) the user's layer of ``environment``; its folder."""
    layer = layer_path(name, home)
    chain = f"import site; site.addsitedir({str(_site(environment))!r})\n"
    pth = _site(layer) / CHAIN_PTH
    if (layer / "pyvenv.cfg").exists() and pth.exists() and pth.read_text() == chain:
        return layer
    import venv  # only when a layer is made (kernel start is the common path)

    venv.EnvBuilder(with_pip=False, symlinks=True).create(layer)
    pth.write_text(chain)
    for script in ("pip", "pip3"):
        shim = layer / "bin" / script
        shim.write_text(_PIP_SHIM.format(python=layer / "bin" / "python"))
        shim.chmod(0o755)
    return layer


def shadowed(layer: Path) -> list[tuple[str, str, str]]:
    """Packages in ``layer`` that replace one of its environment's: (name, layer's version,
    environment's version)."""
    import importlib.metadata as metadata

    own = _site(layer)
    mine: dict[str, str] = {}
    theirs: dict[str, str] = {}
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
        location = Path(str(dist.locate_file(""))).resolve()
        target = mine if location == own.resolve() else theirs
        target.setdefault(name, dist.version)
    return [
        (name, version, theirs[name])
        for name, version in sorted(mine.items())
        if name in theirs and theirs[name] != version
    ]


def main(argv: list[str]) -> None:
    """Make the granted layers, then ``exec`` the server command after ``--``."""
    if not argv or argv[0] != "--" or len(argv) < 2:
        raise SystemExit("usage: python -I -m ztlab.kernels.layers -- SERVER COMMAND...")
    granted: dict[str, str] = json.loads(os.environ.get("ZTLAB_ENVIRONMENTS", "{}"))
    for name, folder in granted.items():
        try:
            ensure_layer(name, Path(folder))
        except OSError as exc:  # a full or broken home: the server still starts
            print(f"ztlab: cannot make your layer of {name}: {exc}", file=sys.stderr)
    os.execv(argv[1], argv[1:])  # noqa: S606 - the control plane's server command


if __name__ == "__main__":
    main(sys.argv[1:])
