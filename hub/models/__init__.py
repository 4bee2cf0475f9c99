"""Models: the MLflow tracking server behind the hub, signed model versions, approvals."""

from __future__ import annotations
