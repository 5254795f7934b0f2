"""Blending weights for overlapping tiles.

A tile's weight is separable: ``w(y, x) = wy(y) * wx(x)``. Along an axis it is 1 on the tile's
core, 0 outside its support, and across each *interior* core boundary ``a`` it follows a raised
cosine over ``[a - taper // 2, a - taper // 2 + taper)`` whose complement is the neighbour's ramp,
so the weights of all tiles sum to exactly 1 everywhere (a partition of unity). There is no ramp at
the region border: the first/last tile has weight 1 up to the edge (no zero-weight frame).
With ``taper == 0`` (crop mode) each pixel has weight 1 from exactly one tile.
"""

from __future__ import annotations

import numpy as np

from tiling.grid import Axis


def ramp(length: int) -> np.ndarray:
    """Rising raised-cosine ramp, float64 ``[length]``, values in (0, 1); ``r + r[::-1] == 1``."""
    i = np.arange(length, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(np.pi * (i + 0.5) / length)


def smooth_step(x: np.ndarray, a: int, taper: int) -> np.ndarray:
    """0 before ``a - taper // 2``, 1 from ``a - taper // 2 + taper`` on, raised cosine between.

    With ``taper == 0`` it is the hard step ``x >= a``. float64, same shape as ``x``.
    """
    if taper <= 0:
        return (x >= a).astype(np.float64)
    z0 = a - taper // 2
    i = np.clip(x - z0, -1, taper)
    r = np.concatenate([[0.0], ramp(taper), [1.0]])
    return r[i + 1]


def axis_weights(axis: Axis, t: int, taper: int, begin: int, end: int) -> np.ndarray:
    """Weights of tile ``t`` along ``axis`` for pixels ``[begin, end)``, float32 ``[end - begin]``.

    ``w_t = S(a_t) - S(a_{t+1})`` with ``S`` the smooth step at each interior core boundary (hard
    steps at the region ends), so the weights of all tiles telescope to exactly 1 even where a
    short last core is narrower than the ramp.
    """
    x = np.arange(begin, end)
    lo = smooth_step(x, axis.cores[t], taper if t > 0 else 0)
    if t < axis.n_tiles - 1:
        hi = smooth_step(x, axis.cores[t + 1], taper)
    else:
        hi = smooth_step(x, axis.stop, 0)
    return (lo - hi).astype(np.float32)
