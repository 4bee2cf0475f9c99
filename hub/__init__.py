"""The control plane (trusted zone): policy decisions, the audit-log writer, keys, services.

Runs as root or a service account on the host. Kernel-side code never imports it.
"""
