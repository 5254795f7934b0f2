"""Tiling engine: tile grids, readers, blending, writers, execution. Never imports geoupsample."""
