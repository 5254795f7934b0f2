"""Self-guidance: the low-res raster itself as extra guide channels of the range term.

The fitted kernels weigh neighbours by how much their guide colour resembles the pixel's. Where a
raster's edges do not follow colour edges (class boundaries across uniform fields, say), that can
pull values across the raster's own edges. With ``self_guidance = s > 0`` the range distance gains
a term comparing the raster's local trend at the pixel — ``x`` upsampled by bicubic
interpolation (:data:`TREND`) — with each neighbour's own value:

    (3 / d) ||G(p) - Gbar(q)||^2  +  s^2 (3 / c) ||xhat_up(p) - xhat(q)||^2

``xhat`` is ``x`` divided by a scale: given (``scale=1`` for probabilities; the tiling engine
passes one per scene so that tiles agree) or its robust span (1st to 99th percentile over all
channels). Rasters with more than ``MAX_CHANNELS`` channels are projected onto ``MAX_CHANNELS``
by a fixed random Gaussian matrix (seeded: the same for every tile), which keeps squared
distances on average, so ``c`` above stays the raster's own channel count. Implemented by
extending the guide, so the same fast render path applies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from geoupsample.core.interpolation import interpolate

if TYPE_CHECKING:
    from geoupsample.core.kernels import Kernels, _Prepared

#: Most channels of ``x`` that enter the range term (more are projected, see below).
MAX_CHANNELS = 8
#: The interpolation that gives the trend ``xhat_up``. Bicubic places a class boundary inside a
#: mixed cell closer to the truth than bilinear (argmax of upsampled area fractions, Vaihingen
#: x16, border pixels scored: bicubic 85.9 mIoU, bilinear 83.1), and the range term pulls each
#: pixel towards the neighbours that agree with it. ``benchmarks/quality_labels.py``, gsjbu's
#: defaults minus bilinear, x8 / x16, bilinear -> bicubic trend: oracle -0.2 / -0.0 -> -0.0 /
#: +1.0; random parcels (``--parcels 60``) -0.5 / -0.9 -> +0.0 / -0.1; predicted -0.2 / -0.0 ->
#: -0.3 / -0.0.
TREND = "bicubic"


def robust_span(x: torch.Tensor) -> float:
    """1st-to-99th percentile span of the finite values of ``x`` (1.0 if flat or empty)."""
    values = x[torch.isfinite(x)]
    if values.numel() == 0:
        return 1.0
    step = max(1, values.numel() // 1_000_000)
    q = torch.tensor([0.01, 0.99], dtype=torch.float64, device=values.device)
    lo, hi = torch.quantile(values[::step].double(), q)
    return float(hi - lo) if float(hi - lo) > 0 else 1.0


def guidance_channels(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``x [C, h, w]`` (NaN = missing, set to 0) as ``[c, h, w]`` range channels.

    Divided by ``scale`` (``None``: :func:`robust_span`); more than ``MAX_CHANNELS`` channels
    are projected by a fixed seeded Gaussian matrix with entries of variance
    ``1 / MAX_CHANNELS``.
    """
    span = robust_span(x) if scale is None else float(scale)
    if not span > 0:
        raise ValueError(f"self_guidance_scale must be > 0; got {scale!r}")
    xhat = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) / span
    if x.shape[0] <= MAX_CHANNELS:
        return xhat
    generator = torch.Generator().manual_seed(0)
    proj = torch.randn(MAX_CHANNELS, x.shape[0], generator=generator, dtype=torch.float64)
    proj = (proj / MAX_CHANNELS**0.5).to(x.device, x.dtype)
    return (proj @ xhat.reshape(x.shape[0], -1)).reshape(MAX_CHANNELS, *x.shape[1:])


def self_guided(
    kernels: Kernels, x: torch.Tensor, strength: float, scale: float | None = None
) -> _Prepared:
    """The kernels' prepared guide extended with ``x``'s range channels, weighted by ``strength``.

    ``x`` is ``[C, h, w]`` on the kernels' LR grid and device; ``scale`` as in
    :func:`guidance_channels`.
    """
    from geoupsample.core.kernels import _Prepared

    if not strength > 0:
        raise ValueError(f"self_guidance must be >= 0; got {strength!r}")
    base = kernels._prepared
    d = kernels.guide.shape[0]
    xhat = guidance_channels(x, scale)
    c = x.shape[0]  # the raster's own channel count, also when projected
    n_range = xhat.shape[0]
    missing = ~torch.isfinite(x).all(0)
    xhat_nan = xhat.masked_fill(missing[None], float("nan"))
    upsampled = interpolate(xhat_nan, kernels.hr_shape, TREND, kernels.shift)
    # build_psi scales distances by 3 / (d + c): pre-scale so the guide keeps 3 / d and x gets
    # strength^2 * 3 / c.
    total = d + n_range
    g_scale = (total / d) ** 0.5
    x_scale = strength * (total / c) ** 0.5
    guide = torch.cat([kernels.guide * g_scale, torch.nan_to_num(upsampled) * x_scale])
    gbar = torch.cat([base.gbar * g_scale, xhat * x_scale])
    return _Prepared.build(guide, kernels.valid, kernels.lr_shape, kernels.radius, gbar=gbar,
                           shift=kernels.shift)  # fmt: skip
