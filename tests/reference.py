"""A slow, plainly written GSJBU for the tests: loops over HR pixels and their neighbours.

It follows DESIGN.md §2 literally (pixel centres, square window of LR neighbours around the cell
that holds the pixel, out-of-image neighbours excluded, Gaussian with covariance
``R(theta) diag(sx^2, sy^2) R(theta)^T``, range term on cell means with the ``3 / d`` band factor,
softmax), sharing no code with the package.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def cell_index(y: int, n_hr: int, n_lr: int) -> int:
    """The LR cell whose footprint holds the centre of HR pixel ``y``."""
    return math.floor(Fraction(2 * y + 1, 2) / Fraction(n_hr, n_lr))


def cell_means(guide: np.ndarray, valid: np.ndarray, lr_shape: tuple[int, int]):
    d, H, W = guide.shape
    h, w = lr_shape
    total = np.zeros((d, h, w))
    count = np.zeros((h, w))
    for y in range(H):
        for x in range(W):
            if valid[y, x]:
                i, j = cell_index(y, H, h), cell_index(x, W, w)
                total[:, i, j] += guide[:, y, x]
                count[i, j] += 1
    return total / np.maximum(count, 1), count > 0


def render(params, guide, valid, lr_shape, radius, x):
    """``out[C, H, W]`` from raw ``params[4, h, w]``, normalised ``guide[d, H, W]``, ``x[C, h, w]``.

    Neighbours whose value is NaN in a channel are skipped for that channel; pixels that are
    invalid in the guide, or have no usable neighbour, are NaN.
    """
    params = np.asarray(params, dtype=np.float64)
    guide = np.asarray(guide, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    d, H, W = guide.shape
    h, w = lr_shape
    sy, sx = H / h, W / w
    gbar, cell_ok = cell_means(guide, valid, lr_shape)
    out = np.full((x.shape[0], H, W), np.nan)
    for y in range(H):
        for xx in range(W):
            if not valid[y, xx]:
                continue
            i, j = cell_index(y, H, h), cell_index(xx, W, w)
            logs, vals = [], []
            for qi in range(i - radius, i + radius + 1):
                for qj in range(j - radius, j + radius + 1):
                    if not (0 <= qi < h and 0 <= qj < w) or not cell_ok[qi, qj]:
                        continue
                    sig_x, sig_y = math.exp(params[0, qi, qj]), math.exp(params[1, qi, qj])
                    theta = math.pi * math.tanh(params[2, qi, qj])
                    sig_r = math.exp(params[3, qi, qj])
                    rot = np.array(
                        [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
                    )
                    cov = rot @ np.diag([sig_x**2, sig_y**2]) @ rot.T
                    mu_y, mu_x = (qi + 0.5) * sy - 0.5, (qj + 0.5) * sx - 0.5
                    dvec = np.array([xx - mu_x, y - mu_y])
                    spatial = -0.5 * dvec @ np.linalg.inv(cov) @ dvec
                    dist2 = (3.0 / d) * np.sum((guide[:, y, xx] - gbar[:, qi, qj]) ** 2)
                    logs.append(spatial - dist2 / (2 * sig_r**2))
                    vals.append(x[:, qi, qj])
            logs = np.array(logs)
            vals = np.array(vals)  # [n, C]
            for c in range(x.shape[0]):
                ok = np.isfinite(vals[:, c])
                if not ok.any():
                    continue
                lw = logs[ok] - logs[ok].max()
                wgt = np.exp(lw) / np.exp(lw).sum()
                out[c, y, xx] = np.sum(wgt * vals[ok, c])
    return out


def classic_jbu(guide, valid, lr_shape, x, sigma_r=0.12, radius=3):
    """Kopf et al.'s joint bilateral upsampling with an isotropic spatial Gaussian of one LR
    pixel and a range Gaussian on the cell means, written in its classic form."""
    d, H, W = guide.shape
    h, w = lr_shape
    sy, sx = H / h, W / w
    gbar, cell_ok = cell_means(guide, valid, lr_shape)
    out = np.full((x.shape[0], H, W), np.nan)
    for y in range(H):
        for xx in range(W):
            if not valid[y, xx]:
                continue
            i, j = cell_index(y, H, h), cell_index(xx, W, w)
            num, den = np.zeros(x.shape[0]), 0.0
            for qi in range(max(0, i - radius), min(h, i + radius + 1)):
                for qj in range(max(0, j - radius), min(w, j + radius + 1)):
                    if not cell_ok[qi, qj]:
                        continue
                    dy = (y - ((qi + 0.5) * sy - 0.5)) / sy
                    dx = (xx - ((qj + 0.5) * sx - 0.5)) / sx
                    f = math.exp(-(dx * dx + dy * dy) / 2)
                    dist2 = np.sum((guide[:, y, xx] - gbar[:, qi, qj]) ** 2) * 3.0 / d
                    g = math.exp(-dist2 / (2 * sigma_r**2))
                    num += f * g * x[:, qi, qj]
                    den += f * g
            out[:, y, xx] = num / den
    return out
