"""The ``ztlab`` command line. The only layer that turns errors into exit statuses."""
