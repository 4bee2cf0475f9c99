"""The hub's own second factor: TOTP enrollments and recovery codes, sealed at rest.

A control-plane service (:class:`~ztlab.hub.mfa.totp.TotpStore`), owned by the
:class:`~ztlab.hub.controlplane.ControlPlane`; the login's step-up page asks it.
"""

from ztlab.hub.mfa.totp import TotpError, TotpStore, TotpStoreError

__all__ = ["TotpError", "TotpStore", "TotpStoreError"]
