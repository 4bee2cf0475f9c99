"""The hub's own pages (cookie-authenticated HTML), next to JupyterHub's."""
