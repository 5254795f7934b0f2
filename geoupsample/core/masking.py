"""Missing values in low-res rasters: render so that non-finite cells take no weight."""

from __future__ import annotations

from collections.abc import Callable

import torch


def render_with_mask(
    x: torch.Tensor, render: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply a linear ``render`` to ``x [C, h, w]`` so that non-finite cells take no weight.

    With missing cells, renders ``[x * m, m]`` and divides: the weights of the valid cells are
    renormalised. One mask channel serves all channels when they share the same missing cells.
    Pixels with no valid contribution are NaN.
    """
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return render(x)
    c = x.shape[0]
    shared = bool((finite == finite[:1]).all())
    masks = finite[:1] if shared else finite
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    stacked = torch.cat([torch.where(finite, x, zero), masks.to(x.dtype)], 0)
    out = render(stacked)
    num, den = out[:c], out[c:]
    nan = torch.full((), float("nan"), dtype=x.dtype, device=x.device)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), nan)
