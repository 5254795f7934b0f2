"""Time series: each date's fit starts halfway from the previous date's kernels.

A date's kernels are fitted to its own guide; the next date's guide shows mostly the same fields,
roofs and roads, so a fit that starts near the previous kernels needs fewer steps than one from
the initial kernels. Not *from* them: on ten NAIP dates a year or more apart
(``benchmarks/series.py``: NIR at 40 m from RGB at 5 m, later dates' mean PSNR) the previous
date's kernels as they are gave 24.94 dB after 50 steps against 25.06 from the initial ones:
they are fitted to details of their own date that the next one does not share. Halfway between
the two (:data:`WARM_BLEND`) reaches 25.06 in 25 steps (:data:`WARM_ITERS`; 25.01 in 15, and
from the initial kernels 24.99 in 15).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from geoupsample.core import gsjbu
from geoupsample.core.kernels import Kernels, fit
from geoupsample.core.layout import CellLayout

#: Adam steps of each date after the first.
WARM_ITERS = 25
#: Where a date's fit starts: ``initial + WARM_BLEND x (previous date's - initial)`` in the
#: kernels' raw parameters (0: from scratch, 1: from the previous date's kernels).
WARM_BLEND = 0.5


def warm_start(previous: Kernels, sigma_r: float = 0.12,
               blend: float = WARM_BLEND) -> torch.Tensor:  # fmt: skip
    """The raw parameters ``[4, h, w]`` the next date's fit starts from (see the module
    docstring): ``blend`` of the way from the initial kernels to ``previous``."""
    layout = CellLayout.build(previous.hr_shape, previous.lr_shape)
    initial = gsjbu.initial_params(previous.lr_shape, layout.scale, sigma_r,
                                   previous.params.dtype, previous.params.device)  # fmt: skip
    return initial + float(blend) * (previous.params - initial)


def fit_series(guides: Sequence[Any], lr_shape: tuple[int, int], iters: int = 50,
               warm_iters: int = WARM_ITERS, warm_blend: float = WARM_BLEND,
               **fit_kwargs: Any) -> list[Kernels]:
    """Kernels for each guide of a time series (``[d, H, W]`` each, on one grid, in date
    order): the first date fitted with ``iters`` steps, each later one with ``warm_iters``
    steps from :func:`warm_start` of the date before (other arguments as
    :func:`geoupsample.fit`)."""
    kernels: list[Kernels] = []
    sigma_r = fit_kwargs.get("sigma_r", 0.12)
    for guide in guides:
        if not kernels:
            kernels.append(fit(guide, lr_shape, iters=iters, **fit_kwargs))
            continue
        init = warm_start(kernels[-1], sigma_r, warm_blend)
        kernels.append(fit(guide, lr_shape, iters=warm_iters, init=init, **fit_kwargs))
    return kernels
