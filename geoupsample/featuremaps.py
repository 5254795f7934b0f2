"""Backbone features of a whole scene, upsampled to its full resolution, tile by tile.

Each tile of the scene (read windows aligned to the backbone's patch size, so every tile's LR grid
is a sub-grid of the scene's) goes through the backbone to LR features ``[C, h, w]``, optionally
reduced by a PCA fitted once on a sample of the scene's LR features (so tiles agree), then
upsampled onto the tile's pixels with GSJBU kernels fitted on the tile (or a baseline method). The
tiling engine blends overlapping tiles and writes one GeoTIFF with the scene's grid.

How a backbone sees the pixels (:class:`TileFeatures`): the weight-free ``spectral`` backbone gets
the raw values (its indices need them); timm backbones get each band scaled to about [0, 1] by the
scene's 1st/99th percentiles (the guide normalisation), then their own mean/std normalisation;
nodata pixels are filled with 0 for them. LR cells without any valid pixel get NaN features.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from affine import Affine
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

import geoupsample as gu
import tiling
from geoupsample.backbones import Backbone, SpectralBackbone
from geoupsample.pipeline import (
    INTERPOLATIONS,
    InputError,
    _check_dtype,
    _open,
    scene_guide_stats,
    select_bands,
)


@dataclass(frozen=True)
class Scene:
    """A scene raster: path, the bands used (1-based), their names, grid and nodata."""

    path: str
    bands: tuple[int, ...]
    band_names: tuple[str, ...]
    crs: Any
    transform: Affine
    shape: tuple[int, int]
    nodata: float | None

    @classmethod
    def open(cls, path: str | os.PathLike[str], bands: Sequence[int | str] | None = None) -> Scene:
        """Open ``path`` and choose ``bands`` (1-based indexes or descriptions; default all)."""
        p = os.fspath(path)
        with _open(p, "scene") as ds:
            idx = select_bands(ds, bands, "scene")
            _check_dtype(ds, idx, "scene")
            names = tuple(ds.descriptions[i - 1] or f"band{i}" for i in idx)
            if ds.crs is None:
                raise InputError(f"the scene {p} has no CRS; assign one (gdal_edit.py -a_srs)")
            return cls(p, idx, names, ds.crs, ds.transform, (ds.height, ds.width), ds.nodata)

    def reader(self) -> tiling.RasterInput:
        return tiling.RasterInput(self.path, self.bands)

    def read(self, window: Window) -> np.ndarray:
        """float32 ``[d, rows, cols]`` of ``window`` (NaN for nodata and outside the raster)."""
        return self.reader().read(window, self.transform)


class TileFeatures:
    """Picklable callable: guide tile ``[d, H, W]`` (NaN = nodata) -> LR features ``[C, h, w]``.

    ``H`` and ``W`` must be multiples of the backbone's patch size. See the module docstring for
    how the pixels are scaled. Cells without a valid pixel are NaN.
    """

    def __init__(self, backbone: Backbone, stats: gu.GuideStats | None) -> None:
        self.backbone = backbone
        self.raw = isinstance(backbone, SpectralBackbone)
        if not self.raw and stats is None:
            raise ValueError("timm backbones need the scene's guide statistics")
        self.stats = stats

    @property
    def stride(self) -> int:
        return self.backbone.stride

    def __call__(self, guide: np.ndarray) -> np.ndarray:
        g = torch.from_numpy(np.ascontiguousarray(guide, dtype=np.float32))
        valid = torch.isfinite(g).all(0)
        if self.raw:
            x = torch.where(valid[None], g, torch.full((), float("nan")))
        else:
            assert self.stats is not None
            x = self.stats.apply(torch.where(valid[None], g, torch.zeros(())))
            x = torch.where(valid[None], x, torch.zeros(()))
        feats = self.backbone.extract(x)
        s = self.stride
        h, w = feats.shape[-2:]
        cell_ok = valid[: h * s, : w * s].reshape(h, s, w, s).any(dim=(1, 3))
        feats[:, ~cell_ok] = float("nan")
        return feats.numpy().astype(np.float32, copy=False)


@dataclass(frozen=True)
class PCA:
    """A PCA of LR features: ``mean [C]`` and ``components [K, C]`` (rows orthonormal)."""

    mean: np.ndarray
    components: np.ndarray
    explained: np.ndarray

    @classmethod
    def fit(cls, samples: np.ndarray, k: int) -> PCA:
        """Fit on ``samples [N, C]`` (finite rows only); ``k <= min(N, C)``."""
        x = torch.from_numpy(samples[np.isfinite(samples).all(1)]).double()
        if x.shape[0] < 2:
            raise InputError("too few valid feature cells to fit a PCA")
        k = int(k)
        if not 1 <= k <= min(x.shape):
            raise InputError(f"--pca must be between 1 and {min(x.shape)} here, got {k}")
        mean = x.mean(0)
        _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
        var = s**2
        return cls(mean.numpy(), vt[:k].numpy(), (var[:k] / var.sum()).numpy())

    def transform(self, feats: np.ndarray) -> np.ndarray:
        """``[C, h, w]`` -> ``[K, h, w]`` float32 (NaN cells stay NaN)."""
        c, h, w = feats.shape
        flat = feats.reshape(c, -1).astype(np.float64) - self.mean[:, None]
        return (self.components @ flat).reshape(-1, h, w).astype(np.float32)


def windows(scene: Scene, size: int, stride: int) -> Iterator[Window]:
    """Non-overlapping windows of ``size`` px (rounded up to ``stride``) covering the scene."""
    size = max(stride, math.ceil(size / stride) * stride)
    h, w = scene.shape
    for r in range(0, h, size):
        for c in range(0, w, size):
            yield Window(c, r, size, size)


def sample_features(
    scene: Scene,
    features: TileFeatures,
    max_cells: int = 50_000,
    tile: int = 512,
    n_tiles: int = 16,
) -> np.ndarray:
    """LR features ``[N, C]`` from up to ``n_tiles`` windows spread evenly over the scene."""
    wins = list(windows(scene, tile, features.stride))
    pick = np.unique(np.linspace(0, len(wins) - 1, min(n_tiles, len(wins))).round().astype(int))
    parts = []
    for i in pick:
        f = features(scene.read(wins[i]))
        parts.append(f.reshape(f.shape[0], -1).T)
    out = np.concatenate(parts)
    out = out[np.isfinite(out).all(1)]
    if out.shape[0] > max_cells:
        out = out[np.random.default_rng(0).choice(out.shape[0], max_cells, replace=False)]
    return out


class FeatureTile:
    """Per-tile job: LR features (optionally PCA-reduced) upsampled onto the tile's pixels."""

    def __init__(
        self,
        features: TileFeatures,
        method: str,
        stats: gu.GuideStats | None,
        pca: PCA | None = None,
        iters: int = 50,
        radius: int = 3,
        device: str | None = None,
        seed: int = 0,
        render: dict[str, Any] | None = None,
    ) -> None:
        self.features, self.method, self.stats, self.pca = features, method, stats, pca
        self.iters, self.radius, self.device, self.seed = iters, radius, device, seed
        #: extra rendering arguments of gu.upsample (``consistency``, ``self_guidance``)
        self.render = dict(render or {})

    def lowres(self, guide: np.ndarray) -> np.ndarray:
        f = self.features(guide)
        return self.pca.transform(f) if self.pca is not None else f

    def upsample(self, lowres: np.ndarray, guide: np.ndarray) -> np.ndarray:
        """``lowres [C, h, w]`` onto the guide tile ``[d, H, W]``; NaN where the guide is."""
        if self.method in INTERPOLATIONS:
            out = gu.upsample(lowres, guide, method=self.method, **self.render)
        else:
            out = gu.upsample(
                lowres,
                guide,
                method=self.method,
                iters=self.iters,
                radius=self.radius,
                device=self.device,
                seed=self.seed,
                normalize=self.stats,
                **self.render,
            )
        out = np.asarray(out, dtype=np.float32)
        out[:, ~np.isfinite(guide).all(0)] = np.nan
        return out

    def __call__(self, ctx: tiling.TileContext) -> np.ndarray | None:
        g = ctx.data["guide"]
        if not np.isfinite(g).all(0).any():
            return None
        return self.upsample(self.lowres(g), g)


def progress_printer(
    desc: str, quiet: bool
) -> tuple[Any, Callable[[tiling.Progress], None] | None]:
    """A tqdm bar on stderr and its tiling progress callback (``(None, None)`` when quiet)."""
    if quiet:
        return None, None
    import sys

    from tqdm import tqdm

    bar = tqdm(total=0, unit="tile", desc=desc, dynamic_ncols=True, file=sys.stderr)

    def progress(p: tiling.Progress) -> None:
        bar.total = p.total
        bar.n = p.done
        rate = p.megapixels / p.seconds if p.seconds > 0 else 0.0
        bar.set_postfix_str(f"{p.megapixels:.1f} MP, {rate:.2f} MP/s", refresh=False)
        bar.refresh()

    return bar, progress


def check_method(method: str, iters: int) -> None:
    if method not in gu.METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(gu.METHODS)}")
    if isinstance(iters, bool) or int(iters) < 0:
        raise InputError(f"iters must be an integer >= 0, got {iters!r}")


def features_raster(
    scene_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    backbone: Backbone,
    *,
    bands: Sequence[int | str] | None = None,
    pca: int | None = None,
    method: str = "gsjbu",
    iters: int = 50,
    radius: int = 3,
    tile: int = 512,
    halo: int = 64,
    compress: str = "deflate",
    device: str | None = None,
    seed: int = 0,
    consistency: int | None = None,
    workers: int | None = None,
    progress: Callable[[tiling.Progress], None] | None = None,
) -> tiling.RunReport:
    """Write the backbone's features of the scene, upsampled to full resolution (float32).

    Args:
        scene_path: the image (any bands; ``bands`` chooses, 1-based or by description).
        out_path: output GeoTIFF on the scene's grid, one band per feature (or PCA component).
        backbone: from :func:`geoupsample.backbones.create`; it is given the chosen bands.
        pca: reduce to this many components (PCA on a sample of the scene's LR features).
        method, iters, radius, seed, device: the upsampling (see :func:`geoupsample.upsample`).
        consistency: back-projection rounds of the render (None: the library default).
        tile, halo: tile core and overlap in pixels (rounded to the backbone's patch size).
    """
    check_method(method, iters)
    scene = Scene.open(scene_path, bands)
    if os.path.abspath(os.fspath(out_path)) == os.path.abspath(scene.path):
        raise InputError("the output path must differ from the scene path")
    stats = scene_guide_stats(scene.path, scene.bands)
    feats = TileFeatures(backbone, stats)
    reducer = None
    if pca is not None:
        reducer = PCA.fit(sample_features(scene, feats, tile=tile), pca)
        names = [f"pca_{i + 1}" for i in range(reducer.components.shape[0])]
    else:
        names = backbone.feature_names(len(scene.bands))
    render = {} if consistency is None else {"consistency": int(consistency)}
    job = FeatureTile(feats, method, stats, reducer, int(iters), radius, device, seed, render)
    from geoupsample import __version__

    spec = tiling.OutputSpec(
        os.fspath(out_path),
        crs=scene.crs,
        transform=scene.transform,
        width=scene.shape[1],
        height=scene.shape[0],
        count=len(names),
        dtype="float32",
        descriptions=names,
        tags={
            "geoupsample_version": __version__,
            "geoupsample_method": method,
            "geoupsample_backbone": repr(backbone.extra_repr()),
            "geoupsample_stride": str(backbone.stride),
            "geoupsample_pca": str(pca or 0),
        },
        compress=compress,
    )
    params = {
        "kind": "features",
        "method": method,
        "iters": int(iters),
        "radius": radius,
        "seed": seed,
        "backbone": backbone.extra_repr(),
        "pca": pca,
        "render": render,
    }
    return run_backbone_job(job, scene, spec, backbone, tile, halo, params, workers, progress)


def run_backbone_job(
    job: Any,
    scene: Scene,
    spec: tiling.OutputSpec,
    backbone: Backbone,
    tile: int,
    halo: int,
    params: dict[str, Any],
    workers: int | None,
    progress: Callable[[tiling.Progress], None] | None,
) -> tiling.RunReport:
    """Run a per-tile backbone ``job`` over ``scene``, tiles aligned to the backbone's stride."""
    return tiling.run(
        job,
        {"guide": scene.reader()},
        spec,
        tile=tile,
        halo=halo,
        align=backbone.stride,
        params=params,
        workers=workers or 1,
        progress=progress,
    )


def lr_window_grid(
    transform: Affine, window: Window, stride: int
) -> tuple[Affine, tuple[int, int]]:
    """The LR grid (transform, shape) of a scene window at ``stride``."""
    t = window_transform(window, transform) @ Affine.scale(stride)
    return t, (int(window.height) // stride, int(window.width) // stride)
