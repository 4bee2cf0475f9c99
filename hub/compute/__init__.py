"""Compute pools: per-user Dask clusters on segmented GPU pools.

- :mod:`~ztlab.hub.compute.authority`: a certificate authority per pool
  (:class:`PoolAuthority`), certificates that name one holder for at most an hour;
- :mod:`~ztlab.hub.compute.store`: the clusters and the per-user limits, checked atomically;
- :mod:`~ztlab.hub.compute.service`: :class:`ClusterService`, what the hub's API calls
  (decide, lease, certify, start, sweep, stop);
- :mod:`~ztlab.hub.compute.backend`: the seam to whatever runs the processes
  (``ztlab.compute_backends`` entry points); :mod:`~ztlab.hub.compute.local` runs them in
  the owners' sandboxes on this machine.

The processes themselves (scheduler, workers, the identity check on every connection) are
user-zone code: :mod:`ztlab.kernels.cluster`. The identities certificates carry are the
shared format :mod:`ztlab.common.poolidentity`.
"""
