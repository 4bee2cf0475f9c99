"""The package proxy: what users' servers may install, and from where.

- :mod:`~ztlab.hub.packages.mirror` -- devpi-server, the mirror and its cache (127.0.0.1);
- :mod:`~ztlab.hub.packages.gateway` -- the sandboxes' only route to packages: decides,
  checks each file's hash, records what it served;
- :mod:`~ztlab.hub.packages.rules` -- the allowlist (role rules, approved requests);
- :mod:`~ztlab.hub.packages.approvals` -- requests to extend it and the admins' decisions.
"""

from __future__ import annotations

from ztlab.hub.packages.approvals import PackageRequest, PackageRequests, RequestNotFound
from ztlab.hub.packages.mirror import MirrorError, PackageMirror
from ztlab.hub.packages.rules import PackageRules, Rule, Verdict

__all__ = [
    "MirrorError",
    "PackageMirror",
    "PackageRequest",
    "PackageRequests",
    "PackageRules",
    "RequestNotFound",
    "Rule",
    "Verdict",
]
