"""The GSJBU method and its baselines (pure torch; no I/O)."""

from geoupsample.core.openmp import prefer_passive_waits

prefer_passive_waits()  # before torch loads GNU OpenMP: see geoupsample.core.openmp
