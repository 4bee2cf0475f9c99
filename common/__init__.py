"""Shared pure code: formats and checks that both the control plane and the kernel side use.

Nothing here holds a key, writes the audit log or decides access; nothing here imports
:mod:`ztlab.hub` or :mod:`ztlab.extensions` (enforced by import-linter in ``make lint``).
"""
