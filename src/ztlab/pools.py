"""``ztlab.pools``: a Dask cluster of your own in a GPU pool, from a notebook."""

from __future__ import annotations

from ztlab.extensions.pools import cluster, clusters, connect, stop

__all__ = ["cluster", "clusters", "connect", "stop"]
