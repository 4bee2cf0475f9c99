"""What a user's server runs with: its command line, configuration and paths, all from the
control plane; nothing the user can write decides how the server runs.

The single-user server is the user's own process: every file its user can write is a file
the user's kernel, terminal or upload can change. So the server reads none of them:

=================================================  ==========================================
user-writable source                               why the server ignores it
=================================================  ==========================================
``~/.jupyter/*config*.py|json``, ``*.d/*.json``    ``JUPYTER_CONFIG_DIR`` is a control-plane
                                                   directory (read-only in the sandbox), and
                                                   JupyterHub's ``disable_user_config`` drops
                                                   every path under ``$HOME`` from the rest
``~/.local/share/jupyter`` (kernelspecs,           ``JUPYTER_DATA_DIR`` is a control-plane
labextensions, nbconvert templates)                directory, likewise
configuration files in the working directory       Jupyter reads none, and ``python -I`` keeps
                                                   the working directory off ``sys.path``
Python user site, its ``.pth`` files,              ``python -I`` (isolated mode: no user site,
``usercustomize``, ``sitecustomize`` in ``$HOME``  no ``PYTHON*`` variables, no working
                                                   directory on ``sys.path``)
shell start-up files (``~/.profile``,              nothing in the start-up chain is an
``~/.bashrc``, ``BASH_ENV``)                       interactive or login shell; the environment
                                                   is written by the hub
environment variables                              the hub builds the whole environment
                                                   (``env_keep`` holds only the locale); the
                                                   sandbox clears everything else
=================================================  ==========================================

What stays in ``$HOME``, because it is the user's own state and not how the server runs:
JupyterLab's UI settings and workspaces (``JUPYTERLAB_SETTINGS_DIR``,
``JUPYTERLAB_WORKSPACES_DIR``), the runtime directory (kernel connection files) and the
notebook trust database. Kernels are the user's code and may read what the user likes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Final

#: the control plane's Jupyter configuration directory for servers, under the venv
CONFIG_DIR: Final = Path("etc") / "ztlab" / "server-config"
#: the control plane's Jupyter data directory for servers (kernelspecs come from the venv)
DATA_DIR: Final = Path("share") / "ztlab" / "server-data"

#: what the server's configuration file says (the command line adds the per-server parts)
SERVER_CONFIG: Final[dict[str, dict[str, object]]] = {
    "ServerApp": {
        # a server answers only requests that carry the hub's credentials (the enforcement
        # point in front of it already checked them; this is the second line)
        "allow_unauthenticated_access": False,
        # terminals start an interactive shell, not a login shell: a login shell reads
        # /etc/profile, which resets PATH, and `pip` would no longer be the user's layer's
        # (nor `uv`, `ztlab` from the kernel runtime); ~/.bashrc still runs
        "terminado_settings": {
            "shell_command": ["/bin/bash" if Path("/bin/bash").exists() else "/bin/sh"]
        },
    },
}


def server_command(python: str | None = None) -> list[str]:
    """The server's command line: the venv's Python in isolated mode."""
    return [python or sys.executable, "-I", "-m", "jupyterhub.singleuser"]


def install(prefix: Path) -> tuple[Path, Path]:
    """Write the server configuration and data directories under ``prefix`` (the venv),
    readable by everyone and writable by root only; return (config dir, data dir)."""
    config_dir = prefix / CONFIG_DIR
    data_dir = prefix / DATA_DIR
    for folder in (config_dir, data_dir):
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)
    # Jupyter "migrates" an old ~/.ipython into a config directory without this marker,
    # which it would try to write (the directory is read-only to the server)
    (config_dir / "migrated").write_text("ztlab\n")
    (config_dir / "migrated").chmod(0o644)
    config = config_dir / "jupyter_server_config.json"
    config.write_text(json.dumps(SERVER_CONFIG, indent=1) + "\n")
    config.chmod(0o644)
    return config_dir, data_dir


def server_environment(prefix: Path, home: Path) -> dict[str, str]:
    """The Jupyter paths of a server whose account's home is ``home``."""
    user_data = home / ".local" / "share" / "jupyter"
    return {
        "JUPYTER_CONFIG_DIR": str(prefix / CONFIG_DIR),
        "JUPYTER_DATA_DIR": str(prefix / DATA_DIR),
        "JUPYTER_RUNTIME_DIR": str(user_data / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / ".jupyter" / "lab" / "user-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / ".jupyter" / "lab" / "workspaces"),
        "PYTHONNOUSERSITE": "1",
    }
