"""The audit-log format: records, signed checkpoints and their verification (pure, no keys)."""
