"""Start a kernel in an environment, on top of the user's own layer.

An environment's kernelspec runs ``ENV/bin/python -m ztlab.kernels.launch -f CONNECTION``.
This makes the user's layer of the environment if it is missing
(:func:`ztlab.kernels.layers.ensure_layer`), sets the kernel's environment variables --
``ZTLAB_ENVIRONMENT`` and ``ZTLAB_ENVIRONMENT_DIGEST`` (from the environment's lock: what
lineage records), ``VIRTUAL_ENV`` and ``PATH`` (so ``!pip`` and ``uv pip`` in the kernel
install into the layer) -- and execs IPython's kernel with the ztlab extension from the
layer's interpreter. It runs as the user, in their sandbox.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ztlab.common.envlock import LOCK_NAME
from ztlab.kernels.layers import ensure_layer


def main(argv: list[str]) -> None:
    """``-f CONNECTION_FILE`` (what Jupyter passes)."""
    if len(argv) != 2 or argv[0] != "-f":
        raise SystemExit("usage: ENV/bin/python -m ztlab.kernels.launch -f CONNECTION_FILE")
    environment = Path(sys.prefix)
    lock = json.loads((environment / LOCK_NAME).read_text())
    name = lock["name"]
    layer = ensure_layer(name, environment)
    os.environ.update(
        {
            "ZTLAB_ENVIRONMENT": name,
            "ZTLAB_ENVIRONMENT_DIGEST": lock["digest"],
            "ZTLAB_ENVIRONMENT_BUILD": str(lock["build"]),
            "VIRTUAL_ENV": str(layer),
            "PATH": f"{layer / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        }
    )
    os.environ.pop("PYTHONHOME", None)
    python = str(layer / "bin" / "python")
    os.execv(  # noqa: S606 - the layer's own interpreter
        python,
        [
            python,
            "-m",
            "ipykernel_launcher",
            "-f",
            argv[1],
            "--IPKernelApp.extensions=['ztlab.extensions']",
        ],
    )


if __name__ == "__main__":
    main(sys.argv[1:])
