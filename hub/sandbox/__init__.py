"""The sandbox around each user's server: cgroups, namespaces, network."""
