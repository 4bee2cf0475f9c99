"""Kernel-side code (untrusted zone): runs inside a user's kernel.

It may ask the control plane for decisions and signatures, never make them. Loaded as an
IPython extension by the secure kernel (``%load_ext ztlab.extensions``).
"""

from __future__ import annotations

from typing import Any


def load_ipython_extension(ipython: Any) -> None:
    """Preloaded by the ``ztlab-secure`` kernel: make the sandbox's lease visible and flag
    dataset files read without verification (an audit hook; see ``ztlab.datasets``), tag
    MLflow runs with the kernel's environment and say which packages of the user's layer
    replace the environment's."""
    from ztlab.extensions import environment
    from ztlab.extensions.datasets.hooks import install
    from ztlab.extensions.models import configure_mlflow_tls
    from ztlab.extensions.session import session_info

    ipython.user_ns.setdefault("ztlab_session", session_info())
    install()
    configure_mlflow_tls()
    environment.install(ipython)
