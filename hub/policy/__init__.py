"""The policy decision point: Cedar policies as code, one ``authorize`` for every caller.

Every enforcement point (spawner, GPU broker, dataset and model registries, scheduler,
audit reader) asks the same question the same way::

    from ztlab.hub.policy import PolicyEngine, Principal

    engine = PolicyEngine.defaults(audit=audit_log)
    decision = engine.authorize(
        Principal(name="alice", roles=frozenset({"trainer"})),
        "lease_gpu",
        "pool:research",
        {"gpus": 2},
    )
    if not decision.allowed:
        ...  # refuse, showing decision.reason

Deny by default (NIST SP 800-207): only what a policy permits is allowed, a ``forbid``
overrides any ``permit``, and a policy that fails to evaluate denies.
"""

from ztlab.hub.policy.engine import (
    AUDIT_ACTION,
    Decision,
    PolicyEngine,
    Principal,
    default_policy_files,
)

__all__ = ["AUDIT_ACTION", "Decision", "PolicyEngine", "Principal", "default_policy_files"]
