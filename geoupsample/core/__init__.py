"""The GSJBU method and its baselines (pure torch; no I/O)."""
