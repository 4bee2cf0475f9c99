"""Development and single-machine tools: the development OpenID provider and ``ztlab up``.

Nothing here runs inside the hub process or a user's server: :mod:`ztlab.dev.idp` is a
stand-in identity provider for development and tests, and :mod:`ztlab.dev.up` starts the
whole environment on one machine (what ``make up`` runs).
"""
