"""How the import package ``ztlab`` is assembled from the checkout's top-level folders.

Everything else about the distribution is in ``pyproject.toml``. The folders carry the
trust boundary (``hub/`` is the control plane, ``extensions/`` and ``kernels/`` run in a
user's kernel, ``common/`` holds the shared formats), so each folder is mapped onto a
subpackage instead of being nested under one ``ztlab/`` folder; ``src/ztlab`` holds only the
package root and the public names notebooks import (``ztlab.datasets``, ``ztlab.models``).
It lives under ``src/`` so that no checkout folder can shadow the installed package.
"""

from __future__ import annotations

from setuptools import find_namespace_packages, setup

#: top-level folder -> ``ztlab.<folder>``
SUBPACKAGES = ("cli", "common", "hub", "extensions", "kernels", "dev", "deploy")

setup(
    package_dir={"ztlab": "src/ztlab", **{f"ztlab.{name}": name for name in SUBPACKAGES}},
    packages=[
        "ztlab",
        *(f"ztlab.{name}" for name in SUBPACKAGES),
        # namespace packages too: folders of data (templates, default policies) go along
        *(
            f"ztlab.{name}.{sub}"
            for name in SUBPACKAGES
            for sub in find_namespace_packages(name, exclude=["__pycache__", "*.__pycache__"])
        ),
    ],
)
