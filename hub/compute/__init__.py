"""Compute pools: per-user Dask clusters on segmented GPU pools (the interface for now).

:class:`~ztlab.hub.compute.backend.ComputeBackend` is what the control plane will ask for a
user's cluster; backends register as ``ztlab.compute_backends`` entry points and the
configuration names one, as for GPU leases (:mod:`ztlab.hub.gpu.backend`).
"""
