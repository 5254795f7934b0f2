"""Self-guidance: the low-res raster itself as extra guide channels of the range term.

The fitted kernels weigh neighbours by how much their guide colour resembles the pixel's. Where a
raster's edges do not follow colour edges (class boundaries across uniform fields, say), that can
pull values across the raster's own edges. With ``self_guidance = s > 0`` the range distance gains
a term comparing the raster's local trend at the pixel — ``x`` bilinearly upsampled — with each
neighbour's own value:

    (3 / d) ||G(p) - Gbar(q)||^2  +  s^2 (3 / c) ||xhat_up(p) - xhat(q)||^2

``xhat`` is ``x`` divided by its robust span (1st to 99th percentile over all channels, so
probabilities stay as they are), reduced to its first ``MAX_CHANNELS`` principal components when
it has more channels. Implemented by extending the guide, so the same fast render path applies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from geoupsample.core.masking import render_with_mask

if TYPE_CHECKING:
    from geoupsample.core.kernels import Kernels, _Prepared

#: Most channels of ``x`` that enter the range term (more are reduced by PCA).
MAX_CHANNELS = 8


def guidance_channels(x: torch.Tensor) -> torch.Tensor:
    """``x [C, h, w]`` (NaN = missing) as ``[c, h, w]`` range channels, ``c <= MAX_CHANNELS``."""
    finite = torch.isfinite(x)
    values = x[finite]
    if values.numel() == 0:
        return torch.zeros_like(x[:1])
    lo, hi = torch.quantile(values.double()[:1_000_000], torch.tensor([0.01, 0.99]).double())
    span = float(hi - lo) if float(hi - lo) > 0 else 1.0
    xhat = torch.where(finite, x, torch.zeros((), dtype=x.dtype)) / span
    if x.shape[0] <= MAX_CHANNELS:
        return xhat
    flat = xhat.reshape(x.shape[0], -1)
    centred = flat - flat.mean(1, keepdim=True)
    u, _, _ = torch.linalg.svd(centred.double(), full_matrices=False)
    basis = u[:, :MAX_CHANNELS].to(x.dtype)  # [C, c]: the projection keeps distances' bulk
    return (basis.T @ centred).reshape(MAX_CHANNELS, *x.shape[1:])


def self_guided(kernels: Kernels, x: torch.Tensor, strength: float) -> _Prepared:
    """The kernels' prepared guide extended with ``x``'s range channels, weighted by ``strength``.

    ``x`` is ``[C, h, w]`` on the kernels' LR grid and device.
    """
    from geoupsample.core.kernels import _Prepared

    if not strength > 0:
        raise ValueError(f"self_guidance must be >= 0; got {strength!r}")
    base = kernels._prepared
    d = kernels.guide.shape[0]
    xhat = guidance_channels(x)
    c = xhat.shape[0]
    missing = ~torch.isfinite(x).all(0)
    xhat_nan = xhat.masked_fill(missing[None], float("nan"))
    upsampled = render_with_mask(
        xhat_nan, lambda v: F.interpolate(v[None], size=kernels.hr_shape, mode="bilinear")[0]
    )
    # build_psi scales distances by 3 / (d + c): pre-scale so the guide keeps 3 / d and x gets
    # strength^2 * 3 / c.
    total = d + c
    g_scale = (total / d) ** 0.5
    x_scale = strength * (total / c) ** 0.5
    guide = torch.cat([kernels.guide * g_scale, torch.nan_to_num(upsampled) * x_scale])
    gbar = torch.cat([base.gbar * g_scale, xhat * x_scale])
    return _Prepared.build(guide, kernels.valid, kernels.lr_shape, kernels.radius, gbar=gbar)
