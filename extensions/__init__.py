"""Kernel-side code (untrusted zone): runs inside a user's kernel.

It may ask the control plane for decisions and signatures, never make them.
"""
