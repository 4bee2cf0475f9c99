"""Spawners: how each user's notebook server is started (control plane)."""
