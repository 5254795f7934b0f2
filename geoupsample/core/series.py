"""Time series: each date's fit starts halfway from the previous date's kernels.

A date's kernels are fitted to its own guide; the next date's guide shows mostly the same fields,
roofs and roads, so a fit that starts near the previous kernels needs fewer steps than one from
the initial kernels. Not *from* them: on ten NAIP dates a year or more apart (NIR at 40 m from
RGB at 5 m, later dates' mean PSNR, one normalisation for all dates) the previous date's kernels
as they are gave 24.94 dB after 50 steps against 25.06 from the initial ones: they are fitted to
details of their own date that the next one does not share. Halfway between the two
(:data:`WARM_BLEND`) reached 25.06 in 25 steps (:data:`WARM_ITERS`; 25.01 in 15, and from the
initial kernels 24.99 in 15). On the scene path, each date normalised by its own statistics
(``benchmarks/series.py``): 25.00 dB in 25 steps per later date, 25.01 from scratch in 50.

Temporal consistency (:func:`carry_forward`): where a pixel of the guide has not changed since
the date before, neither has the ground's fine detail, so the output keeps the previous date's
and takes only the smooth (bilinear) change of the low-res raster; where it has changed, the
date's own render. The weight falls off as a Gaussian of the guide's change, in units of the
previous date's per-band robust range (:data:`STABLE_TOLERANCE`). On the ten NAIP dates
(``benchmarks/series.py``), over the pixels whose image barely changes between two dates (every
band by less than 0.02 x 255), the outputs then change as much as bilinear's (RMS 0.12678 in
0-1 units, bilinear's 0.12678; each date alone 0.152; the truth 0.150), the error's change
drops below bilinear's (0.0682 against 0.0687; alone 0.0843) and the later dates gain 0.2 dB
(25.22 against 25.00: fine detail kept from dates where the ground had it). 0.25 is the
smallest tolerance whose outputs there change no more than bilinear's (0.2: 0.12685, 0.02 dB
more).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from geoupsample.core import gsjbu
from geoupsample.core.guide import GuideStats, guide_stats
from geoupsample.core.kernels import Kernels, fit
from geoupsample.core.layout import CellLayout
from geoupsample.core.methods import upsample

#: Adam steps of each date after the first.
WARM_ITERS = 25
#: Where a date's fit starts: ``initial + WARM_BLEND x (previous date's - initial)`` in the
#: kernels' raw parameters (0: from scratch, 1: from the previous date's kernels).
WARM_BLEND = 0.5
#: Guide change (largest over bands, in units of the previous date's robust range ``hi - lo``)
#: at which a pixel's output keeps ``exp(-1)`` of the previous date's detail (0: off).
STABLE_TOLERANCE = 0.25


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


def stable_weight(previous_guide: Any, guide: Any, stats: GuideStats | None = None,
                  tolerance: float = STABLE_TOLERANCE) -> np.ndarray:  # fmt: skip
    """How unchanged each pixel of the guide is since the date before: ``[H, W]`` float32 in
    [0, 1], ``exp(-(change / tolerance)^2)`` with ``change`` the largest band's absolute change
    in units of ``stats``' range (the previous date's statistics; default computed from
    ``previous_guide``); 0 where either date's pixel is missing (NaN) or ``tolerance`` is 0.

    Args:
        previous_guide, guide: ``[d, H, W]`` the two dates' guides as read (same units).
    """
    a = np.asarray(previous_guide, dtype=np.float32)
    b = np.asarray(guide, dtype=np.float32)
    if a.shape != b.shape:
        raise ValueError(f"the dates' guides differ in shape: {a.shape} and {b.shape}")
    if tolerance <= 0:
        return np.zeros(a.shape[-2:], np.float32)
    stats = stats or guide_stats(a)
    span = np.maximum(stats.hi - stats.lo, 1e-12).astype(np.float32)[:, None, None]
    change = (np.abs(b - a) / span).max(0)
    weight = np.exp(-((change / np.float32(tolerance)) ** 2))
    return np.where(np.isfinite(weight), weight, 0).astype(np.float32)


def carry_forward(previous_out: np.ndarray, out: np.ndarray, previous_x: np.ndarray,
                  x: np.ndarray, weight: np.ndarray, guide: Any,
                  shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:  # fmt: skip
    """A date's output ``[C, H, W]`` made consistent with the date before:
    ``weight x (previous_out + bilinear(x - previous_x)) + (1 - weight) x out`` (the module
    docstring says why); the date's own ``out`` where the previous one is missing.

    Args:
        previous_out, out: ``[C, H, W]`` the two dates' rendered outputs.
        previous_x, x: ``[C, h, w]`` their low-res rasters (NaN for missing cells).
        weight: ``[H, W]`` :func:`stable_weight`.
        guide: ``[d, H, W]`` the date's guide (for the bilinear upsampling's grid).
        shift: the low-res grid's shift in guide pixels (:func:`geoupsample.fit`).
    """
    delta = np.asarray(upsample(np.asarray(x, np.float32) - np.asarray(previous_x, np.float32),
                                guide, method="bilinear", shift=shift), dtype=np.float32)
    carried = previous_out + delta
    w = np.where(np.isfinite(carried), weight[None], 0).astype(np.float32)
    return np.where(w > 0, w * np.nan_to_num(carried) + (1 - w) * out, out).astype(np.float32)


def render_series(kernels: Sequence[Kernels], rasters: Sequence[Any], guides: Sequence[Any],
                  stats: Sequence[GuideStats] | None = None, tolerance: float = STABLE_TOLERANCE,
                  **render: Any) -> list[np.ndarray]:  # fmt: skip
    """Each date's raster ``[C, h, w]`` rendered with its kernels (:func:`fit_series`) and
    carried forward from the date before where its guide has not changed (:func:`carry_forward`;
    ``tolerance=0``: the plain renders).

    Args:
        guides: the dates' guides ``[d, H, W]`` as read (the ones the kernels were fitted on).
        stats: each date's guide statistics (default: computed from each guide), the units of
            the guide's change.
        **render: :meth:`Kernels.render` arguments (a continuous raster's).
    """
    outs: list[np.ndarray] = []
    for t, (k, x, g) in enumerate(zip(kernels, rasters, guides, strict=True)):
        out = np.asarray(k.render(x, **render), dtype=np.float32)
        if t and tolerance > 0:
            weight = stable_weight(guides[t - 1], g, stats[t - 1] if stats else None, tolerance)
            out = carry_forward(outs[-1], out, rasters[t - 1], x, weight, g, k.shift)
        outs.append(out)
    return outs
