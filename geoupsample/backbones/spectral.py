"""``spectral``: a weight-free extractor of per-cell band statistics and spectral indices.

For each LR cell of ``cell_size x cell_size`` HR pixels it gives, for each statistic in turn
(``mean``, ``std``, ``edge``), its value for every band, then for each spectral index whose bands
can be identified. ``edge`` is the cell mean of the pixel gradient's magnitude (central
differences, in the band's units per pixel): texture, which tells a tree crown from a lawn of the
same colour. Indices are computed per HR pixel before the cell statistics:

- NDVI = (nir - red) / (nir + red)
- NDWI = (green - nir) / (green + nir)         (McFeeters 1996, open water)
- NDBI = (swir1 - nir) / (swir1 + nir)         (built-up; needs a SWIR band)

Bands are identified from ``band_names`` (case-insensitive: ``red``/``r``, ``green``/``g``,
``blue``/``b``, ``nir``/``near-infrared``/``nir08``, ``swir1``/``swir16``) or given explicitly as
``index_bands={"red": 0, "nir": 3}``. Indices are meaningful on reflectance-like values (raw
digital numbers or reflectances, not per-band rescaled data); pass the tile as read.
Non-finite pixels (nodata as NaN) are left out of every statistic; a cell without valid pixels
gets NaN features.

With ``context=r`` (default 1) every one of those features is followed, after all of them, by its
mean over the ``(2r + 1) x (2r + 1)`` cells centred on the cell (cells outside the tile or
without valid pixels left out): what surrounds a cell tells a lawn from a tree crown or a roof
from a road where the cell's own colour does not. On the 512 x 512 Vaihingen development crop
(``benchmarks/quality_labels.py``, predicted regime, bilinear) a linear probe scores 40.1 / 39.7
mIoU at x8 / x16 on ``mean`` and ``std`` alone, 42.0 / 40.4 with ``context=1``, and 41.7 / 44.8
with ``edge`` too (the defaults); end to end through ``segment`` (``--regime segment``), gsjbu
41.6 / 48.4, 47.0 / 52.8 and 47.1 / 59.1. A tile's edge cells see a truncated neighbourhood:
tile with a halo of at least :attr:`SpectralBackbone.context_margin` pixels (``r`` cells and a
pixel; the engine's default halo, 64 px, covers ``r x cell_size < 64``).

Features at every pixel (:meth:`SpectralBackbone.pixel_features`): the pixel's own band values
followed by its indices, ``[B, d + n_indices, H, W]`` at full resolution; where no index band is
identified (a file without band descriptions), the normalised differences of every band pair
stand in for the indices (:data:`MAX_PAIR_BANDS`; on the polygon tests of
``benchmarks/segment_agreement.py`` without band names, Rotterdam ms1 went from 68.3% to 84.5% of
pixels agreeing with the NDVI split, 95.3% with the bands named); ``segment``'s
feature path (:mod:`geoupsample.segmentation`) puts them beside the cells' features brought to
every pixel by the fitted kernels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .base import Backbone, BackboneError, BandCountError

#: Band roles and the names (lower case) that identify them.
BAND_ALIASES: dict[str, tuple[str, ...]] = {
    "red": ("red", "r"),
    "green": ("green", "g"),
    "blue": ("blue", "b"),
    "nir": ("nir", "near-infrared", "near infrared", "nir08", "nir1"),
    "swir1": ("swir1", "swir16", "swir_1", "swir"),
}

#: Index name -> (positive role, negative role) of the normalised difference (a - b) / (a + b).
INDICES: dict[str, tuple[str, str]] = {
    "ndvi": ("nir", "red"),
    "ndwi": ("green", "nir"),
    "ndbi": ("swir1", "nir"),
}

STATS = ("mean", "std", "edge")

#: Scenes with no identified index band and at most this many bands get, among the features at
#: every pixel, the normalised difference of every band pair (an NDVI of unnamed bands is one of
#: them; 8 bands: 28 pairs).
MAX_PAIR_BANDS = 8


def identify_bands(band_names: Sequence[str] | None) -> dict[str, int]:
    """Map band roles (``red``, ``nir``, ...) to indices using :data:`BAND_ALIASES`."""
    roles: dict[str, int] = {}
    for i, name in enumerate(band_names or ()):
        key = name.strip().lower()
        for role, aliases in BAND_ALIASES.items():
            if key in aliases and role not in roles:
                roles[role] = i
    return roles


class SpectralBackbone(Backbone):
    """Per-cell band statistics and spectral indices; no weights, deterministic. The channels
    are in mixed units (:attr:`mixed_units`: a ``--pca`` standardises them).

    Output channels, in order: for each statistic (``mean``, ``std``, ``edge``), every band
    followed by every index; then, with ``context``, their neighbourhood means in the same order
    (see :meth:`feature_names`).

    Args:
        cell_size: HR pixels per LR cell along each axis (the stride).
        band_names: names of the input tile's bands; fixes ``in_chans`` and identifies index bands.
        in_chans: number of input bands when no names are given (None: any).
        index_bands: explicit role -> band index mapping, overriding the names.
        indices: which indices to compute: ``"auto"`` (all whose bands are present), or a list.
        stats: per-cell statistics, a subset of ``("mean", "std", "edge")``.
        context: rings of neighbouring cells over which every feature is also averaged (0: the
            cell's own statistics only).
    """

    mixed_units = True

    def __init__(
        self,
        *,
        cell_size: int = 8,
        band_names: Sequence[str] | None = None,
        in_chans: int | None = None,
        index_bands: Mapping[str, int] | None = None,
        indices: str | Sequence[str] = "auto",
        stats: Sequence[str] = STATS,
        context: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(context, bool) or int(context) != context or context < 0:
            raise BackboneError(f"context must be a whole number of cells >= 0, got {context!r}")
        self.context = int(context)
        if int(cell_size) < 1:
            raise BackboneError(f"cell_size must be a positive number of pixels, got {cell_size}")
        if band_names is not None and in_chans is not None and len(band_names) != in_chans:
            raise BandCountError(f"{len(band_names)} band names given for in_chans={in_chans}")
        bad = [s for s in stats if s not in STATS]
        if bad or not stats:
            raise BackboneError(f"stats must be a non-empty subset of {STATS}, got {list(stats)}")
        self.stride = int(cell_size)
        self.band_names = tuple(band_names) if band_names is not None else None
        self.in_chans = len(band_names) if band_names is not None else in_chans  # type: ignore[assignment]
        self.stats = tuple(stats)
        roles = identify_bands(band_names)
        roles.update({k.lower(): int(v) for k, v in (index_bands or {}).items()})
        if indices == "auto":
            chosen = [n for n, (a, b) in INDICES.items() if a in roles and b in roles]
        else:
            chosen = [str(n).lower() for n in indices]
            for n in chosen:
                if n not in INDICES:
                    raise BackboneError(f"unknown index {n!r}; known: {sorted(INDICES)}")
                missing = [r for r in INDICES[n] if r not in roles]
                if missing:
                    raise BackboneError(
                        f"index {n} needs the {' and '.join(missing)} band(s): name the bands "
                        "(band_names=...) or give index_bands={'red': 0, 'nir': 3}"
                    )
        self.index_pairs = [(n, roles[INDICES[n][0]], roles[INDICES[n][1]]) for n in chosen]
        self._min_bands = 1 + max((max(a, b) for _, a, b in self.index_pairs), default=-1)
        if self.in_chans is not None and self._min_bands > self.in_chans:
            raise BandCountError(f"index bands {roles} out of range for {self.in_chans} bands")

    @property
    def num_features(self) -> int:  # type: ignore[override]
        if self.in_chans is None:
            raise BackboneError(
                "num_features depends on the band count: pass band_names or in_chans"
            )
        return (1 + (self.context > 0)) * len(self.stats) * (self.in_chans + len(self.index_pairs))

    @property
    def context_margin(self) -> int:
        """Pixels beyond a cell's own that its features depend on: ``context`` cells, and one
        pixel more for ``edge`` (its central differences)."""
        return self.context * self.stride + ("edge" in self.stats)

    def feature_names(self, d: int | None = None) -> list[str]:
        """Names of the output channels for a tile of ``d`` bands (default: ``in_chans``)."""
        d = self.in_chans if d is None else d
        if d is None:
            raise BackboneError("pass the band count d")
        bands = (
            list(self.band_names)
            if self.band_names is not None
            else [f"band{i + 1}" for i in range(d)]
        )
        indices = [n for n, _, _ in self.index_pairs]
        own = [f"{name}_{s}" for s in self.stats for name in bands + indices]
        if not self.context:
            return own
        return own + [f"{name}_around{2 * self.context + 1}" for name in own]

    def band_pairs(self, d: int) -> list[tuple[int, int]]:
        """The band pairs ``(i, j)``, ``i < j``, whose normalised differences the pixel
        features hold for ``d`` bands: every pair when no index band is identified and
        ``d <= MAX_PAIR_BANDS`` (the indices of bands nobody named), else none."""
        if self.index_pairs or d > MAX_PAIR_BANDS:
            return []
        return [(i, j) for i in range(d) for j in range(i + 1, d)]

    def pixel_feature_names(self, d: int | None = None) -> list[str]:
        """Names of :meth:`pixel_features`' channels for ``d`` bands (default ``in_chans``):
        every band, then every index (``nd_<a>_<b>`` for a band pair's)."""
        d = self.in_chans if d is None else d
        if d is None:
            raise BackboneError("pass the band count d")
        bands = list(self.band_names) if self.band_names is not None else [
            f"band{i + 1}" for i in range(d)]
        return (bands + [n for n, _, _ in self.index_pairs]
                + [f"nd_{bands[i]}_{bands[j]}" for i, j in self.band_pairs(d)])

    def pixel_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features at every pixel of ``x [B, d, H, W]`` (or ``[d, H, W]``; raw values, NaN =
        nodata): the band values, then each index (with no identified index band, the
        normalised difference of every band pair: :meth:`band_pairs`), float32
        ``[B, d + n_indices, H, W]`` (``[d + n_indices, H, W]`` for an unbatched input); NaN
        where a band is."""
        batched = x.ndim == 4
        x = x if batched else x[None]
        self._check_bands(x.shape[1])
        x = x.double()
        pairs = [(a, b) for _, a, b in self.index_pairs] + self.band_pairs(x.shape[1])
        parts = [x] + [normalised_difference(x[:, a], x[:, b])[:, None] for a, b in pairs]
        out = torch.cat(parts, dim=1).float()
        return out if batched else out[0]

    def _check_bands(self, d: int) -> None:
        super()._check_bands(d)
        if d < self._min_bands:
            raise BandCountError(
                f"the spectral indices need {self._min_bands} bands, the tile has {d}"
            )

    def _cell_stats(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-cell statistics of ``x [B, n, H, W]``: ``[B, n, h, w]`` each, in ``stats`` order."""
        b, n, hh, ww = x.shape
        s = self.stride
        valid = torch.isfinite(x)
        zero = torch.zeros((), dtype=x.dtype)

        def cell_blocks(v: torch.Tensor) -> torch.Tensor:  # [B, n, h, s, w, s], invalid as 0
            return torch.where(valid, v, zero).view(b, n, hh // s, s, ww // s, s)

        blocks = cell_blocks(x)
        vblocks = valid.view(b, n, hh // s, s, ww // s, s).to(x.dtype)
        count = vblocks.sum(dim=(3, 5))
        mean = blocks.sum(dim=(3, 5)) / count  # NaN where no valid pixel
        out = []
        for stat in self.stats:
            if stat == "mean":
                out.append(mean)
            elif stat == "edge":  # the gradient is finite exactly where x is
                out.append(cell_blocks(gradient_magnitude(x)).sum(dim=(3, 5)) / count)
            else:
                dev = (blocks - mean[:, :, :, None, :, None]) * vblocks
                out.append(torch.sqrt((dev * dev).sum(dim=(3, 5)) / count))
        return out

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()  # accurate sums on raw digital numbers
        per_stat = self._cell_stats(x)
        if self.index_pairs:
            idx = [normalised_difference(x[:, a], x[:, b]) for _, a, b in self.index_pairs]
            idx_stats = self._cell_stats(torch.stack(idx, dim=1))
            per_stat = [torch.cat([p, q], dim=1) for p, q in zip(per_stat, idx_stats, strict=True)]
        own = torch.cat(per_stat, dim=1)
        if not self.context:
            return own.float()
        return torch.cat([own, neighbourhood_mean(own, self.context)], dim=1).float()

    def extra_repr(self) -> str:
        names = [n for n, _, _ in self.index_pairs]
        return (f"cell_size={self.stride}, stats={self.stats}, indices={names}, "
                f"context={self.context}")


def normalised_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a - b) / (a + b)`` per pixel: 0 where ``a + b`` is 0, NaN where either is."""
    num, den = a - b, a + b
    v = torch.where(den.abs() > 1e-12, num / den, torch.zeros((), dtype=a.dtype))
    return torch.where(torch.isfinite(den), v, torch.full((), float("nan"), dtype=a.dtype))


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """``|grad x|`` of ``x [B, n, H, W]`` per pixel by central differences (half the difference
    of the two neighbours), a neighbour beyond the edge or non-finite replaced by the pixel
    itself: so a window read with NaN around it agrees with the same pixels inside a larger
    tile; NaN where the pixel is."""
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1), value=float("nan"))
    centre = pad[:, :, 1:-1, 1:-1]

    def neighbour(v: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.isfinite(v), v, centre)

    gy = (neighbour(pad[:, :, 2:, 1:-1]) - neighbour(pad[:, :, :-2, 1:-1])) / 2
    gx = (neighbour(pad[:, :, 1:-1, 2:]) - neighbour(pad[:, :, 1:-1, :-2])) / 2
    return torch.sqrt(gx * gx + gy * gy)


def neighbourhood_mean(f: torch.Tensor, rings: int) -> torch.Tensor:
    """Mean of ``f [B, C, h, w]`` over the ``(2 rings + 1)^2`` cells centred on each cell, NaN
    cells and cells beyond the edge left out; NaN where none of them is finite."""
    ok = torch.isfinite(f)
    k = 2 * rings + 1
    values = torch.where(ok, f, torch.zeros((), dtype=f.dtype))
    total = torch.nn.functional.avg_pool2d(values, k, stride=1, padding=rings,
                                           count_include_pad=True)
    count = torch.nn.functional.avg_pool2d(ok.to(f.dtype), k, stride=1, padding=rings,
                                           count_include_pad=True)
    return torch.where(count > 0, total / count.clamp_min(1e-12),
                       torch.full((), float("nan"), dtype=f.dtype))
