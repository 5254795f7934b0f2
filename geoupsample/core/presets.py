"""Render defaults by the kind of raster: continuous quantities or class probabilities.

Kernels fitted to rebuild the guide's colours are right for quantities that follow the guide
(bands, elevation, features) and wrong for class probabilities wherever a class boundary does
not follow a colour edge (a grey roof beside a grey road, one crop beside another): the fit
makes the kernels sharp in colour (small range sigmas) and tight in space, so a pixel takes its
class from the neighbours of its colour, across the true boundary, and the rest copy their own
cell (blocky borders). Probabilities therefore render with

- ``self_guidance=1`` (scale 1): the range term also compares the probabilities' trend at the
  pixel (bicubic interpolation, :data:`geoupsample.core.self_guidance.TREND`) with each
  neighbour's probabilities, so weight goes to neighbours of the locally likely class, not only
  to those of the same colour;
- ``min_sigma_r=0.3``: the fitted range sigmas are floored, so colour alone cannot cut a pixel
  off from the neighbours of its class;
- ``consistency=1``: one back-projection round, so each cell's class shares average back to
  ``x`` (for exact fractions the truth does);
- outputs clipped to ``[0, 1]`` and renormalised to sum to 1.

Measured with ``benchmarks/quality_labels.py`` (mIoU minus bilinear's, x8 / x16; oracle = area
fractions of the true labels, predicted = a spectral linear probe's probabilities, mean of six
train/test splits; smoothed = the fractions blurred by 0.7 cells, an over-smooth predictor with
its classes in the right places):

============================  ===========  ===========  ===========  ===============
render                        oracle       predicted    smoothed     parcels oracle
============================  ===========  ===========  ===========  ===============
these defaults                -0.0 / +1.0  -0.3 / -0.0  +1.0 / +2.6  +0.0 / -0.1
``consistency=0``             -0.2 / -1.3  +1.7 / +1.2  -3.3 / -4.9
sharp (``consistency=0,       -3.0 / -2.7  -0.2 / -1.0  -3.6 / -3.0
min_sigma_r=0``)
``kind="continuous"``         -1.9 / -2.8                              -4.4 / -8.5
============================  ===========  ===========  ===========  ===============

The Vaihingen crop's figures; parcels = ``--parcels 60``, three Landsat farmland windows cut
into random parcels whose boundaries owe nothing to the image, the worst case for any guidance.
Without back-projection the probe's probabilities gain, but exact fractions and over-smooth,
well-placed probabilities lose: that gain is the kernels smoothing the probe's scattered errors,
not better boundaries, so the defaults keep the round. With the border pixels scored
(``--borders nearest``) the defaults give oracle +0.4 / +1.9 and predicted -0.3 / +0.2;
``bicubic`` alone gives oracle +1.4 / +2.8 there and predicted -0.4 / +0.1. With a bilinear trend
the defaults gave oracle -0.2 / -0.0 and parcels -0.5 / -0.9.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Tolerance on ``sum_c x = 1`` and on the range ``[0, 1]`` when telling probabilities apart.
SIMPLEX_TOLERANCE = 1e-3
#: Tolerance on ``sum_c x = 1`` for rasters the user declares to be probabilities.
DECLARED_TOLERANCE = 0.05


@dataclass(frozen=True)
class RenderDefaults:
    """Defaults of :meth:`geoupsample.Kernels.render` for one kind of raster."""

    consistency: float
    self_guidance: float
    self_guidance_scale: float | None
    min_sigma_r: float
    simplex: bool  # clip to [0, 1] and renormalise the channels to sum to 1


#: Rounds of back-projection for continuous rasters (and the rounds the fit's objective sees).
#: Measured on the Wald-protocol benchmark (benchmarks/quality.py): +0.9 dB (MS from pan) and
#: +1.5 dB (NIR from RGB) over the pure kernels; the second round adds ~0.1 dB, more add nothing.
DEFAULT_CONSISTENCY = 2
CONTINUOUS = RenderDefaults(DEFAULT_CONSISTENCY, 0.0, None, 0.0, simplex=False)
PROBABILITIES = RenderDefaults(1, 1.0, 1.0, 0.3, simplex=True)
KINDS = {"continuous": CONTINUOUS, "probabilities": PROBABILITIES}


def complete_cells(x: torch.Tensor, min_channels: int = 2) -> torch.Tensor | None:
    """The channel values ``[cells, C]`` (float64) of the cells of ``x [..., C, h, w]`` whose
    channels are all finite and, with two channels or more, not all zero (an empty cell, see
    :func:`without_empty_cells`); None when ``x`` has fewer than ``min_channels`` channels, is
    not real-valued, or has no such cell."""
    if x.ndim < 3 or x.shape[-3] < min_channels or x.dtype == torch.bool or x.is_complex():
        return None
    complete = torch.isfinite(x).all(-3)
    if x.shape[-3] >= 2:
        complete &= (x != 0).any(-3)
    if not bool(complete.any()):
        return None
    return x.movedim(-3, -1)[complete].double()


def without_empty_cells(x: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``x [..., C, h, w]`` (floating) with NaN in every channel of the
    cells whose channels are all 0: no class has any probability there, so the cell holds no
    prediction (a model's output padded with zeros beyond its footprint) and renders as a
    missing cell. Blended in as zeros they would pull the neighbouring pixels' classes towards
    nothing, and they make the raster fail the sum-to-one test of :func:`probability_unit`."""
    if x.shape[-3] < 2:
        return x
    empty = (x == 0).all(-3, keepdim=True)
    if not bool(empty.any()):
        return x
    return x.masked_fill(empty, float("nan"))


#: Storage units whose rounding :func:`rounding` recognises in fractions (8-bit x 254 or 255,
#: percent, per mille, basis points).
ROUNDING_UNITS = (254, 255, 100, 1000, 10000)


def rounding(values: torch.Tensor) -> float:
    """Half the step to which ``values`` (float64) were rounded: 0.5 for whole numbers,
    ``0.5 / U`` for fractions stored as whole multiples of ``1 / U`` (:data:`ROUNDING_UNITS`:
    8-bit probabilities divided by 255, values rounded to 2 decimals...), 0 otherwise."""
    if bool((values == values.round()).all()):
        return 0.5
    for unit in ROUNDING_UNITS:
        scaled = values * unit
        if bool(((scaled - scaled.round()).abs() <= 1e-3).all()):
            return 0.5 / unit
    return 0.0


def looks_like_probabilities(x: torch.Tensor) -> bool:
    """Whether ``x [..., C, h, w]`` holds class probabilities (or fractions).

    True when ``C >= 2``, every finite value lies in ``[0, 1]`` and the channels of every cell
    whose channels are all finite sum to 1, within :data:`SIMPLEX_TOLERANCE` or the rounding
    of their storage (``C`` x :func:`rounding`: 8-bit probabilities divided by 255 sum to
    1 +- 0.008 with 4 classes); cells with a missing channel, and empty cells (all channels 0:
    no prediction, see :func:`without_empty_cells`), are ignored, and at least one cell must be
    complete.
    """
    values = complete_cells(x)
    if values is None:
        return False
    tol = SIMPLEX_TOLERANCE
    if bool((values < -tol).any()) or bool((values > 1 + tol).any()):
        return False
    step = rounding(values)
    if step < 0.5:  # whole numbers in [0, 1] are 0 and 1: one-hot, exact
        tol = max(tol, values.shape[-1] * step)
    return bool(((values.sum(-1) - 1.0).abs() <= tol).all())


def probability_unit(x: torch.Tensor) -> float | None:
    """The unit ``S`` of class probabilities stored as fractions of ``S`` (1, 100, 254, 255,
    10000...) in ``x [..., C, h, w]``, or None when ``x`` does not hold such probabilities.

    ``S`` is the channels' common sum: ``C >= 2``, no negative value, and every complete cell
    (all channels finite) sums to ``S`` up to rounding (per channel, :func:`rounding`: 0.5 for
    whole numbers, e.g. uint8 storage, ``0.5 / U`` for fractions stored as multiples of
    ``1 / U``; at least :data:`SIMPLEX_TOLERANCE` x ``S`` for fractions). Empty cells (all
    channels 0) are ignored; at least one cell must be complete.
    """
    values = complete_cells(x)
    if values is None or bool((values < 0).any()):
        return None
    sums = values.sum(-1)
    unit = float(sums.median())
    step = rounding(values)
    if step == 0.5:  # whole numbers
        tolerance = step * values.shape[-1]
    else:  # fractions: float sums (1.0000000008 is 1), or stored rounded (0.99 is 1)
        tolerance = max(step * values.shape[-1], SIMPLEX_TOLERANCE * unit)
    if abs(unit - round(unit)) <= tolerance:
        unit = float(round(unit))
    if not unit > 0 or float((sums - unit).abs().max()) > tolerance:
        return None
    return unit


def check_probabilities(x: torch.Tensor) -> None:
    """Refuse ``x`` declared as class probabilities (``kind="probabilities"``) when it clearly is
    not: a finite value outside ``[-0.01, 1.01]`` or a complete cell whose channels do not sum
    to 1 within :data:`DECLARED_TOLERANCE` (loose enough for probabilities rounded to 8 bits and
    rescaled). Rendering such a raster as probabilities (clipped to [0, 1], renormalised) would
    return garbage, e.g. uniform classes for probabilities stored as 0..255.
    """
    values = complete_cells(x, min_channels=1)  # one channel is no probabilities either
    if values is None:
        return
    sums = values.sum(-1)
    lo, hi = float(values.min()), float(values.max())
    if lo >= -0.01 and hi <= 1.01 and float((sums - 1.0).abs().max()) <= DECLARED_TOLERANCE:
        return
    unit = probability_unit(x)
    hint = (f"these look like probabilities scaled by {unit:g}: divide by {unit:g} first"
            if unit else "pass kind='continuous' for other rasters")  # fmt: skip
    raise ValueError(
        f"kind='probabilities' but the raster is not class probabilities: values from {lo:.4g} "
        f"to {hi:.4g}, channel sums from {float(sums.min()):.4g} to {float(sums.max()):.4g} "
        f"(probabilities lie in [0, 1] and sum to 1 over the channels); {hint}"
    )


def check_kind(kind: object) -> None:
    """Refuse a ``kind`` other than ``"auto"``, ``"continuous"``, ``"probabilities"``."""
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"kind must be 'auto', 'continuous' or 'probabilities'; got {kind!r}")


def resolve(kind: str, x: torch.Tensor | None) -> tuple[str, RenderDefaults]:
    """``(kind, defaults)`` for ``kind`` in ``"auto"``, ``"continuous"``, ``"probabilities"``;
    ``x`` (the raster, or a sample of it) is looked at only for ``"auto"``."""
    check_kind(kind)
    if kind == "auto":
        if x is None:
            raise ValueError("kind='auto' needs the raster to look at")
        kind = "probabilities" if looks_like_probabilities(x) else "continuous"
    return kind, KINDS[kind]


def to_simplex(out: torch.Tensor, channel_dim: int = -3) -> torch.Tensor:
    """Clip ``out`` to ``[0, 1]`` and renormalise along ``channel_dim`` (NaN stays NaN)."""
    out = out.clamp(0.0, 1.0)
    return out / out.sum(channel_dim, keepdim=True).clamp_min(1e-12)
