"""zerotrust-lab: a zero-trust research environment for Jupyter on shared GPU servers.

The import package mirrors the trust boundary:

- :mod:`ztlab.common` (``common/``): pure shared formats both sides import
  (errors, configuration model, canonical JSON, Merkle trees, audit-log format
  and verification).
- :mod:`ztlab.hub` (``hub/``): the control plane. Holds keys, the audit-log writer
  and the policy decision point. Never imported by kernel-side code.
- :mod:`ztlab.extensions` and :mod:`ztlab.kernels` (``extensions/``, ``kernels/``):
  code that runs inside a user's (untrusted) kernel. It may ask the control plane,
  never decide.
- :mod:`ztlab.cli`: the ``ztlab`` command; the only layer that exits the process.
"""

__version__ = "0.1.0"
