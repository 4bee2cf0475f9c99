"""Kernel environments as control-plane objects.

- :mod:`~ztlab.hub.environments.build` -- one build: venv, layers, install through the
  package proxy, kernelspec, lock;
- :mod:`~ztlab.hub.environments.registry` -- definitions, builds and their locks;
- :mod:`~ztlab.hub.environments.service` -- define, build, retire, verify; who sees which.
"""

from __future__ import annotations

from ztlab.hub.environments.build import BuildFailed
from ztlab.hub.environments.registry import EnvironmentNotFound, EnvironmentRegistry
from ztlab.hub.environments.service import EnvironmentDenied, EnvironmentService, Usable

__all__ = [
    "BuildFailed",
    "EnvironmentDenied",
    "EnvironmentNotFound",
    "EnvironmentRegistry",
    "EnvironmentService",
    "Usable",
]
