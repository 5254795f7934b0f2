"""Consistency with the low-res input (iterative back-projection).

An upsampled raster ``out [C, H, W]`` is *consistent* with its low-res source ``x [C, h, w]``
when averaging ``out`` over each LR cell's footprint gives back ``x`` — the first property of
Wald's protocol, and what mass-preserving quantities (reflectance, elevation, class fractions)
demand. A weighted average of neighbouring cells (any JBU) is not consistent on its own; each
round here adds the bilinearly upsampled residual ``x - cell_mean(out)``. The cell mean uses the
same footprints as the kernels (:mod:`geoupsample.core.layout`; on a shifted grid, the pixels
its footprint covers in part weighed by that part) and only finite pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from geoupsample.core.interpolation import resize
from geoupsample.core.layout import CellLayout
from geoupsample.core.masking import render_with_mask

#: Channels processed at once on the CPU (bounds the temporary memory to a few ``[H, W]`` planes
#: each).
CHANNEL_CHUNK = 8
#: On a GPU, elements of ``[chunk, H, W]`` processed at once (256 MB in float32): chunks of 8
#: channels made a 384-channel render of 224 x 224 pixels pay 48 x 2 rounds of launches.
GPU_CHUNK_ELEMENTS = 1 << 26


def channel_chunk(out: torch.Tensor) -> int:
    """Channels of ``out [C, H, W]`` to back-project at once on its device."""
    if out.device.type == "cpu":
        return CHANNEL_CHUNK
    return max(CHANNEL_CHUNK, GPU_CHUNK_ELEMENTS // max(1, out.shape[1] * out.shape[2]))


def cell_average(
    out: torch.Tensor,
    layout: CellLayout,
    finite: torch.Tensor | None = None,
    all_finite: bool = False,
) -> torch.Tensor:
    """Mean of ``out [C, H, W]`` over each LR cell's finite pixels: ``[C, h, w]`` (NaN if none).

    ``finite`` (``[C, H, W]`` bool) may be passed when known; ``None`` computes it, unless
    ``all_finite=True`` promises that every pixel is finite.
    """
    if layout.is_shifted:  # footprints that cover their edge pixels in part
        mean, covered = layout.area_mean(out, None if not all_finite and finite is None
                                         else (finite if finite is not None
                                               else torch.ones_like(out, dtype=torch.bool)))
        return torch.where(covered, mean, torch.full((), float("nan"), dtype=out.dtype))
    if finite is None and not all_finite:
        finite = torch.isfinite(out)
        if bool(finite.all()):
            finite = None
    if finite is None and layout.is_regular:
        sy, sx = (int(round(s)) for s in layout.scale)
        return F.avg_pool2d(out[None], (sy, sx))[0]
    if finite is None:
        finite = torch.ones_like(out, dtype=torch.bool)
    cells = layout.to_cells(out)  # [h, w, Py, Px, C]
    ok = layout.to_cells(finite) & layout.phase_valid.to(out.device)[..., None]
    zero = torch.zeros((), dtype=out.dtype, device=out.device)
    total = torch.where(ok, cells, zero).sum((2, 3))
    count = ok.sum((2, 3)).to(out.dtype)
    mean = total / count.clamp_min(1)
    mean = torch.where(count > 0, mean, torch.full((), float("nan"), dtype=out.dtype))
    return mean.permute(2, 0, 1)


def back_project(
    out: torch.Tensor,
    x: torch.Tensor,
    layout: CellLayout,
    rounds: float = 1,
    all_finite: bool = False,
) -> torch.Tensor:
    """Make ``out [C, H, W]`` consistent with ``x [C, h, w]`` by ``rounds`` of back-projection.

    Each whole round adds the full upsampled residual; a fractional part adds one more round
    scaled by it (``rounds=0.25``: a quarter step towards consistency).

    Pixels that are NaN in ``out`` stay NaN; cells that are NaN in ``x`` (or have no finite
    pixel in ``out``) add no correction. ``all_finite=True`` promises that ``out`` and ``x`` hold
    no NaN (skips the checks). Works in place on ``out`` and returns it.
    """
    hr_shape = layout.hr_shape
    whole = int(rounds)
    steps = [1.0] * whole + ([float(rounds) - whole] if float(rounds) > whole else [])

    def upsample(r: torch.Tensor) -> torch.Tensor:
        return resize(r, hr_shape, "bilinear", layout.shift)

    chunk = channel_chunk(out)
    for c0 in range(0, out.shape[0], chunk):
        o = out[c0 : c0 + chunk]
        xc = x[c0 : c0 + chunk].to(o.dtype)
        finite = None if all_finite else torch.isfinite(o)
        o_finite = all_finite or bool(finite.all())
        if o_finite:
            finite = None
        for step in steps:
            residual = (xc - cell_average(o, layout, finite, all_finite=o_finite)) * step
            if all_finite or bool(torch.isfinite(residual).all()):
                o += upsample(residual)
            else:
                o += torch.nan_to_num(render_with_mask(residual, upsample), nan=0.0)
    return out
