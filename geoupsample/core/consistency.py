"""Consistency with the low-res input (iterative back-projection).

An upsampled raster ``out [C, H, W]`` is *consistent* with its low-res source ``x [C, h, w]``
when averaging ``out`` over each LR cell's footprint gives back ``x`` — the first property of
Wald's protocol, and what mass-preserving quantities (reflectance, elevation, class fractions)
demand. A weighted average of neighbouring cells (any JBU) is not consistent on its own; each
round here adds the bilinearly upsampled residual ``x - cell_mean(out)``. The cell mean uses the
same footprints as the kernels (:mod:`geoupsample.core.layout`) and only valid pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from geoupsample.core.layout import CellLayout
from geoupsample.core.masking import render_with_mask

#: Channels processed at once (bounds the temporary memory to a few ``[H, W]`` planes each).
CHANNEL_CHUNK = 16


def cell_average(out: torch.Tensor, layout: CellLayout) -> torch.Tensor:
    """Mean of ``out [C, H, W]`` over each LR cell's finite pixels: ``[C, h, w]`` (NaN if none)."""
    if layout.is_regular and bool(torch.isfinite(out).all()):
        sy, sx = (int(round(s)) for s in layout.scale)
        return F.avg_pool2d(out[None], (sy, sx))[0]
    cells = layout.to_cells(out)  # [h, w, Py, Px, C]
    ok = torch.isfinite(cells) & layout.phase_valid.to(out.device)[..., None]
    total = torch.where(ok, cells, torch.zeros((), dtype=out.dtype, device=out.device)).sum((2, 3))
    count = ok.sum((2, 3)).to(out.dtype)
    mean = total / count.clamp_min(1)
    mean = torch.where(count > 0, mean, torch.full((), float("nan"), dtype=out.dtype))
    return mean.permute(2, 0, 1)


def back_project(
    out: torch.Tensor, x: torch.Tensor, layout: CellLayout, rounds: int = 1
) -> torch.Tensor:
    """Make ``out [C, H, W]`` consistent with ``x [C, h, w]`` by ``rounds`` of back-projection.

    Pixels that are NaN in ``out`` stay NaN; cells that are NaN in ``x`` (or have no finite
    pixel in ``out``) add no correction. Works in place on ``out`` and returns it.
    """
    hr_shape = layout.hr_shape
    for c0 in range(0, out.shape[0], CHANNEL_CHUNK):
        o = out[c0 : c0 + CHANNEL_CHUNK]
        for _ in range(rounds):
            residual = x[c0 : c0 + CHANNEL_CHUNK].to(o.dtype) - cell_average(o, layout)
            correction = render_with_mask(
                residual,
                lambda r: F.interpolate(r[None], size=hr_shape, mode="bilinear")[0],
            )
            o += torch.nan_to_num(correction, nan=0.0)
    return out
