"""Guide preparation: validation, nodata masks and robust per-band normalisation.

The guide is a multispectral image ``[d, H, W]`` with any ``d >= 1`` and any numeric dtype. Each
band is mapped to about ``[0, 1]`` by its robust low/high percentiles over the valid pixels.
The tiling engine computes these statistics once per scene (:func:`guide_stats`) and passes them
to every tile's fit so that tiles agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from geoupsample.core.arrays import as_tensor

#: Percentiles used for the robust normalisation of each guide band.
DEFAULT_PERCENTILES: tuple[float, float] = (1.0, 99.0)
#: At most this many valid pixels are sampled per band to estimate the percentiles.
_MAX_SAMPLES = 1_000_000


@dataclass(frozen=True)
class GuideStats:
    """Per-band normalisation: ``normalised = (band - lo) / (hi - lo)``.

    Attributes:
        lo: ``[d]`` float64, the low percentile of each band (guide units).
        hi: ``[d]`` float64, the high percentile of each band (guide units).
    """

    lo: np.ndarray
    hi: np.ndarray

    def __post_init__(self) -> None:
        lo = np.asarray(self.lo, dtype=np.float64).reshape(-1)
        hi = np.asarray(self.hi, dtype=np.float64).reshape(-1)
        if lo.shape != hi.shape:
            raise ValueError(f"GuideStats: lo has {lo.size} bands but hi has {hi.size}")
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise ValueError("GuideStats: lo and hi must be finite numbers")
        if (hi < lo).any():
            raise ValueError(f"GuideStats: hi must be >= lo in every band; got lo {lo}, hi {hi} "
                             "(swapped?)")
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)

    @property
    def bands(self) -> int:
        return int(self.lo.size)

    def apply(self, guide: torch.Tensor) -> torch.Tensor:
        """Normalise ``guide`` ``[d, H, W]`` (float) band by band; a flat band is only shifted."""
        if guide.shape[0] != self.bands:
            raise ValueError(
                f"guide has {guide.shape[0]} bands but the normalisation statistics have "
                f"{self.bands}; compute them with gu.guide_stats on a guide with the same bands"
            )
        span = self.hi - self.lo
        span = np.where(span > 0, span, 1.0)
        lo = torch.as_tensor(self.lo, dtype=guide.dtype, device=guide.device)[:, None, None]
        span_t = torch.as_tensor(span, dtype=guide.dtype, device=guide.device)[:, None, None]
        return (guide - lo) / span_t


def check_guide(guide: object) -> torch.Tensor:
    """Validate and convert a guide to a floating tensor ``[d, H, W]`` (float32 unless float64)."""
    g = as_tensor(guide, "guide").detach()  # the guide is data: the fit never differentiates it
    if g.ndim == 2:
        raise ValueError(
            f"guide must be [bands, H, W]; got a 2-D array {tuple(g.shape)}: "
            "add a band axis, e.g. guide[None]"
        )
    if g.ndim != 3:
        raise ValueError(f"guide must be [bands, H, W]; got shape {tuple(g.shape)}")
    if min(g.shape) == 0:
        raise ValueError(f"guide is empty: shape {tuple(g.shape)}")
    if g.dtype == torch.bool:
        raise TypeError("guide must be numeric, not boolean")
    if g.dtype != torch.float64:
        g = g.float()
    return g


def valid_mask(guide: torch.Tensor, nodata: float | None = None) -> torch.Tensor:
    """``[H, W]`` bool: True where every band is finite and none equals ``nodata``."""
    if nodata is not None and (
        isinstance(nodata, bool) or not isinstance(nodata, (int, float, np.number))
    ):
        raise TypeError(f"nodata must be a number (or None); got {nodata!r}")
    ok = torch.isfinite(guide).all(0)
    if nodata is not None and not np.isnan(nodata):
        ok &= (guide != nodata).all(0)
    return ok


def guide_stats(
    guide: object,
    nodata: float | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> GuideStats:
    """Robust per-band statistics of a guide ``[d, H, W]`` over its valid pixels.

    Args:
        guide: ``[d, H, W]`` numpy array or torch tensor, any numeric dtype.
        nodata: value marking missing pixels (NaN is always missing).
        percentiles: low and high percentiles (0-100).

    Raises:
        ValueError: when the guide has no valid pixel.
    """
    try:
        low, high = (float(p) for p in percentiles)
    except (TypeError, ValueError):
        raise TypeError(f"percentiles must be a pair of numbers; got {percentiles!r}") from None
    if not 0 <= low < high <= 100:
        raise ValueError(f"percentiles must be (low, high) with 0 <= low < high <= 100; got "
                         f"{percentiles!r}")
    g = check_guide(guide)
    ok = valid_mask(g, nodata)
    n_valid = int(ok.sum())
    if n_valid == 0:
        raise ValueError(
            "guide has no valid pixel (all NaN or equal to nodata): nothing to normalise; "
            "check the nodata value and the window you read"
        )
    flat = g.reshape(g.shape[0], -1)[:, ok.reshape(-1)]
    if n_valid > _MAX_SAMPLES:  # a regular subsample is plenty for percentiles
        flat = flat[:, :: int(np.ceil(n_valid / _MAX_SAMPLES))]
    if flat.device.type != "cpu":  # on the device: 2 numbers per band come back, not the pixels
        q = torch.tensor([low / 100, high / 100], dtype=torch.float64, device=flat.device)
        lo, hi = torch.quantile(flat.double(), q, dim=1).cpu().numpy()  # numpy's "linear"
        return GuideStats(lo=lo, hi=hi)
    lo, hi = np.percentile(flat.double().numpy(), [low, high], axis=1)
    return GuideStats(lo=lo, hi=hi)


def prepare_guide(
    guide: object,
    nodata: float | None,
    normalize: bool | GuideStats | tuple[Sequence[float], Sequence[float]],
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated, normalised guide ``[d, H, W]`` and its valid mask ``[H, W]``, on ``device``
    (the guide's own if ``None``): the masks, statistics and normalisation run there.

    Invalid pixels are set to 0 in the returned guide (they are masked everywhere they matter).
    """
    g = check_guide(guide)
    if device is not None:
        g = g.to(device)
    ok = valid_mask(g, nodata)
    if not bool(ok.any()):
        raise ValueError(
            "guide has no valid pixel (all NaN or equal to nodata); check the nodata value"
        )
    if normalize is True:
        stats: GuideStats | None = guide_stats(g, nodata)
    elif normalize is False or normalize is None:
        stats = None
    elif isinstance(normalize, GuideStats):
        stats = normalize
    elif isinstance(normalize, tuple) and len(normalize) == 2:
        stats = GuideStats(lo=np.asarray(normalize[0]), hi=np.asarray(normalize[1]))
    else:
        raise TypeError(
            "normalize must be True, False, a GuideStats or a (lo, hi) pair of per-band "
            f"sequences; got {type(normalize).__name__}"
        )
    g = torch.where(ok[None], g, torch.zeros((), dtype=g.dtype, device=g.device))
    if stats is not None:
        g = stats.apply(g)
        g = torch.where(ok[None], g, torch.zeros((), dtype=g.dtype, device=g.device))
    return g, ok
