"""Render defaults by the kind of raster: continuous quantities or class probabilities.

Kernels fitted to rebuild the guide's colours are right for quantities that follow the guide
(bands, elevation, features) and can be wrong for class probabilities: where a class boundary
does not follow a colour edge (a grey roof beside a grey road, one crop beside another), sharp
colour kernels copy each pixel's own cell and pull the class across the boundary; on the
Vaihingen crop the continuous defaults lost 2.7 mIoU to bilinear with oracle labels at x8
(``benchmarks/quality_labels.py``). Probabilities therefore render with

- ``self_guidance=1`` (scale 1): the range term also compares the probabilities' bilinear trend
  at the pixel with each neighbour's probabilities, so weight goes to neighbours of the locally
  likely class, not only to those of the same colour;
- ``min_sigma_r=0.1``: the fitted range sigmas are floored, so colour alone cannot cut a cell off;
- ``consistency=0.25``: one damped back-projection step (exact fractions average back to
  ``x``; a predictor's over-smooth probabilities do not need to);
- outputs clipped to ``[0, 1]`` and renormalised to sum to 1.

Measured on that crop (mIoU minus bilinear, oracle x8 / x16, probe-predicted x8 / x16): the
continuous defaults -2.66 / -2.23 / -0.69 / -1.73; these -0.27 / -0.31 / -0.22 / +2.40.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Tolerance on ``sum_c x = 1`` and on the range ``[0, 1]`` when telling probabilities apart.
SIMPLEX_TOLERANCE = 1e-3


@dataclass(frozen=True)
class RenderDefaults:
    """Defaults of :meth:`geoupsample.Kernels.render` for one kind of raster."""

    consistency: float
    self_guidance: float
    self_guidance_scale: float | None
    min_sigma_r: float
    simplex: bool  # clip to [0, 1] and renormalise the channels to sum to 1


CONTINUOUS = RenderDefaults(2, 0.0, None, 0.0, simplex=False)
PROBABILITIES = RenderDefaults(0.25, 1.0, 1.0, 0.1, simplex=True)
KINDS = {"continuous": CONTINUOUS, "probabilities": PROBABILITIES}


def looks_like_probabilities(x: torch.Tensor) -> bool:
    """Whether ``x [..., C, h, w]`` holds class probabilities (or fractions).

    True when ``C >= 2``, every finite value lies in ``[0, 1]`` and the channels of every cell
    whose channels are all finite sum to 1 (within :data:`SIMPLEX_TOLERANCE`); cells with a
    missing channel are ignored, and at least one cell must be complete.
    """
    if x.ndim < 3 or x.shape[-3] < 2 or x.dtype == torch.bool or x.is_complex():
        return False
    complete = torch.isfinite(x).all(-3)
    if not bool(complete.any()):
        return False
    values = x.movedim(-3, -1)[complete]  # [cells, C]
    tol = SIMPLEX_TOLERANCE
    if bool((values < -tol).any()) or bool((values > 1 + tol).any()):
        return False
    return bool(((values.double().sum(-1) - 1.0).abs() <= tol).all())


def resolve(kind: str, x: torch.Tensor) -> tuple[str, RenderDefaults]:
    """``(kind, defaults)`` for ``kind`` in ``"auto"``, ``"continuous"``, ``"probabilities"``."""
    if kind == "auto":
        kind = "probabilities" if looks_like_probabilities(x) else "continuous"
    if kind not in KINDS:
        raise ValueError(f"kind must be 'auto', 'continuous' or 'probabilities'; got {kind!r}")
    return kind, KINDS[kind]


def to_simplex(out: torch.Tensor, channel_dim: int = -3) -> torch.Tensor:
    """Clip ``out`` to ``[0, 1]`` and renormalise along ``channel_dim`` (NaN stays NaN)."""
    out = out.clamp(0.0, 1.0)
    return out / out.sum(channel_dim, keepdim=True).clamp_min(1e-12)
