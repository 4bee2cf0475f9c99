"""Deployment past one machine: the same roles, quotas and pools rendered for existing
engines (Zero to JupyterHub / KubeSpawner on Kubernetes)."""
