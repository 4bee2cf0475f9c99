"""The control plane's tamper-evident audit log (the writer; verification is in common)."""

from ztlab.hub.audit.writer import DEFAULT_ORIGIN, AuditLog, Receipt, RecoveryReport

__all__ = ["DEFAULT_ORIGIN", "AuditLog", "Receipt", "RecoveryReport"]
