"""JupyterHub configuration file for zerotrust-lab: everything comes from ``ztlab.toml``.

Run ``ztlab hub --config ztlab.toml`` (it starts ``jupyterhub -f`` with this file and
``ZTLAB_CONFIG`` set); do not edit settings here.
"""

import os
from pathlib import Path

from ztlab.common.config import load_config
from ztlab.hub.hubconfig import configure

_path = Path(os.environ.get("ZTLAB_CONFIG", "/etc/ztlab/ztlab.toml"))
configure(get_config(), load_config(_path), config_path=_path)  # type: ignore[name-defined]  # noqa: F821
