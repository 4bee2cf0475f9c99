"""Development and single-machine tools: the development OpenID provider, ``ztlab up`` and
synthetic GPU traces.

Nothing here runs inside the hub process or a user's server: :mod:`ztlab.dev.idp` is a
stand-in identity provider for development and tests, :mod:`ztlab.dev.up` starts the
whole environment on one machine (what ``make up`` runs), and :mod:`ztlab.dev.gputraces`
makes deterministic GPU traces (a day of normal training, one scenario per alert kind) that
the monitor's tests, the benchmark and demos replay.
"""
