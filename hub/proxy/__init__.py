"""The proxy and the policy enforcement point in front of every user's server.

:mod:`~ztlab.hub.proxy.traefik` runs Traefik (the proxy), which asks
:mod:`~ztlab.hub.proxy.enforce` (in the hub) before any request reaches a server;
:mod:`~ztlab.hub.proxy.routes` says whose server a request is for and which class of route.
"""
