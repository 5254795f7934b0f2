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

Outputs: a GeoTIFF (float32, or float16 stored as IEEE half floats) or, when the output path
ends with ``.zarr``, a Zarr store (variable ``features``, see :mod:`tiling.zarr_writer`) for
many channels. Both are written tile by tile by :func:`tiling.run` (AOI, resume journal,
dask.distributed scheduler); the journal key holds the backbone (its weights' digest), the PCA
and every upsampling parameter, so a resume with anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from affine import Affine
from rasterio.windows import Window
from rasterio.windows import transform as window_transform
from shapely.geometry.base import BaseGeometry

import geoupsample as gu
import tiling
from geoupsample.backbones import Backbone, SpectralBackbone
from geoupsample.core.methods import INTERPOLATIONS
from geoupsample.inputs import (
    InputError,
    check_method_options,
    check_output_paths,
    is_zarr_path,
)
from geoupsample.options import (
    OutputOptions,
    RenderOptions,
    TilingOptions,
    takes_option_groups,
)
from geoupsample.pca import PCA
from geoupsample.render_settings import checked_overrides
from geoupsample.scenes import AnyScene, Scene, scene_aoi, windows
from geoupsample.workers import check_device, check_workers, threads_per_worker, within_threads
from tiling.aoi import window_intersects

#: Output dtypes of a features raster.
FEATURE_DTYPES = ("float32", "float16")


def backbone_digest(backbone: Backbone) -> str:
    """A digest of the backbone's description and all its weights and buffers (for journals)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(backbone).__name__.encode())
    h.update(backbone.extra_repr().encode())
    for name, t in backbone.state_dict().items():
        h.update(name.encode())
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def bands_tag(indexes: Sequence[int], names: Sequence[str]) -> str:
    """The ``geoupsample_bands`` tag: which of the scene's bands were used (the CLI's
    ``--bands``, ``bands=`` of the Python functions), as JSON
    ``{"indexes": [1-based band numbers], "names": [their names]}``."""
    return json.dumps({"indexes": [int(i) for i in indexes], "names": [str(n) for n in names]})


def array_digest(*arrays: np.ndarray, decimals: int = 6) -> str:
    """A digest of arrays rounded to ``decimals`` (refits on the same data agree)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(np.round(np.asarray(a, dtype=np.float64), decimals)))
    return h.hexdigest()


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

    @property
    def margin(self) -> int:
        """Pixels around a window that its cells' features depend on, in whole cells
        (``spectral``'s context rings and gradient; 0 for other backbones, whose tiles carry the
        engine's halo instead)."""
        return -(-self.backbone.context_margin // self.stride) * self.stride

    def of_window(self, scene: Any, window: Window) -> np.ndarray:
        """LR features ``[C, h, w]`` of the cells of ``window`` of ``scene``, read with
        :attr:`margin` around it so that edge cells see the same neighbourhood as in a tile of
        the whole-scene run (beyond the scene's edge: nodata, as there)."""
        m = self.margin
        if m == 0:
            return self(scene.read(window))
        wide = Window(window.col_off - m, window.row_off - m, window.width + 2 * m,
                      window.height + 2 * m)
        k = m // self.stride
        return self(scene.read(wide))[:, k:-k, k:-k]

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


def sample_features(
    scene: AnyScene,
    features: TileFeatures,
    max_cells: int = 50_000,
    tile: int = 512,
    n_tiles: int = 16,
    aoi: BaseGeometry | None = None,
) -> np.ndarray:
    """LR features ``[N, C]`` from up to ``n_tiles`` windows spread evenly over the scene (over
    the windows that touch ``aoi``, in the scene's CRS, when given)."""
    wins = list(windows(scene, tile, features.stride))
    if aoi is not None:
        wins = [w for w in wins if window_intersects(aoi, w, scene.transform)] or wins
    pick = np.unique(np.linspace(0, len(wins) - 1, min(n_tiles, len(wins))).round().astype(int))
    parts = []
    for i in pick:
        f = features.of_window(scene, wins[i])
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
        """The tile's LR features ``[C, h, w]`` (PCA-reduced if any) from its guide."""
        gu.tune_allocator()  # once per process, so on dask.distributed workers too
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


@dataclass
class FeaturePlan:
    """Everything a features run needs besides the output: the per-tile job, the band names,
    the tags of the output and the parameters that identify the run in a resume journal."""

    job: FeatureTile
    names: list[str]
    tags: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)


def backbone_name(backbone: Backbone) -> str:
    """``SpectralBackbone(cell_size=8, ...)``: the backbone's class and options (not a timm
    model's module tree)."""
    return f"{type(backbone).__name__}({backbone.extra_repr()})"


def scene_pca(scene: AnyScene, backbone: Backbone, feats: TileFeatures,
              pca: int | str | os.PathLike[str] | PCA | None, tile: int) -> PCA | None:
    """The PCA of a run: None; fitted on a sample of the whole scene (``pca`` components); or
    given (a :class:`PCA` or a file of :meth:`PCA.save`), checked against the backbone's
    features: their count, and the backbone it was fitted on when the file says."""
    if pca is None:
        return None
    if isinstance(pca, (int, np.integer)) and not isinstance(pca, bool):
        reducer = PCA.fit(sample_features(scene, feats, tile=tile), int(pca),
                          standardize=backbone.mixed_units)  # fmt: skip
        about = {"backbone": backbone_name(backbone), "n_features": reducer.n_features,
                 "scene": os.path.basename(str(getattr(scene, "path", "") or "array"))}
        return PCA(reducer.mean, reducer.components, reducer.explained, reducer.scale, about)
    reducer = pca if isinstance(pca, PCA) else PCA.load(pca)
    n = len(backbone.feature_names(len(scene.bands)))
    fitted = reducer.about.get("backbone")
    if reducer.n_features != n or (fitted and fitted != backbone_name(backbone)):
        raise InputError(
            f"the PCA was fitted on {reducer.n_features} features of {fitted or 'a backbone'}; "
            f"this run's backbone gives {n} ({backbone_name(backbone)}): reuse a PCA with the "
            "backbone, layer, bands and options it was fitted with")
    return reducer


def plan_features(
    scene: AnyScene,
    backbone: Backbone,
    *,
    pca: int | str | os.PathLike[str] | PCA | None = None,
    method: str = "gsjbu",
    iters: int = 50,
    radius: int = 3,
    tile: int = 512,
    device: str | None = None,
    seed: int = 0,
    consistency: float | None = None,
    band_indexes: Sequence[int] | None = None,
) -> FeaturePlan:
    """Scene statistics, the PCA (:func:`scene_pca`: fitted on the whole scene, whatever area
    the run covers) and the job.

    ``band_indexes``: the 1-based numbers, in the source the scene was chosen from, of the
    scene's bands, recorded in the ``geoupsample_bands`` tag (default ``scene.bands``: a
    :class:`Scene`'s file band numbers)."""
    check_method_options(method, iters, radius, seed)
    stats = scene.guide_stats()
    feats = TileFeatures(backbone, stats)
    reducer = scene_pca(scene, backbone, feats, pca, tile)
    if reducer is not None:
        names = [f"pca_{i + 1}" for i in range(reducer.components.shape[0])]
    else:
        names = backbone.feature_names(len(scene.bands))
    render = checked_overrides(method, consistency=consistency)
    job = FeatureTile(feats, method, stats, reducer, int(iters), radius, device, seed, render)
    from geoupsample import __version__

    tags = {
        "geoupsample_version": __version__,
        "geoupsample_method": method,
        "geoupsample_backbone": backbone.extra_repr(),
        "geoupsample_bands": bands_tag(
            scene.bands if band_indexes is None else band_indexes, scene.band_names
        ),
        "geoupsample_stride": str(backbone.stride),
        "geoupsample_pca": str(0 if reducer is None else reducer.components.shape[0]),
        **({"geoupsample_pca_scaling": "none" if np.all(reducer.scale == 1)
            else "standardized", "geoupsample_pca_fitted_on": reducer.about.get("scene", "")}
           if reducer is not None else {}),
        "geoupsample_render": json.dumps(render),
    }
    params = {
        "kind": "features",
        "method": method,
        "iters": int(iters),
        "radius": radius,
        "seed": seed,
        "device": str(device),
        "backbone": backbone.extra_repr(),
        "backbone_digest": backbone_digest(backbone),
        "stats": [stats.lo.tolist(), stats.hi.tolist()],
        "pca": None if reducer is None else int(reducer.components.shape[0]),
        "pca_digest": None if reducer is None
        else array_digest(reducer.mean, reducer.scale, reducer.components),
        "render": render,
        "version": __version__,
    }
    return FeaturePlan(job, names, tags, params)


def check_feature_output(
    out_path: str | os.PathLike[str], dtype: str, compress: str, cog: bool
) -> None:
    """Raise :class:`InputError` for output options that do not fit together."""
    if dtype not in FEATURE_DTYPES:
        raise InputError(f"unsupported features dtype {dtype!r}; use {' or '.join(FEATURE_DTYPES)}")
    if is_zarr_path(out_path):
        if cog:
            raise InputError(
                "--cog (cog=True) applies to GeoTIFF outputs, but the output ends with .zarr; "
                "drop --cog or write a .tif"
            )
        if compress.lower() == "lzw":
            raise InputError("lzw is not available for Zarr outputs; use deflate, zstd or none")


def feature_output(
    out_path: str | os.PathLike[str],
    scene: AnyScene,
    names: Sequence[str],
    tags: dict[str, str],
    *,
    dtype: str = "float32",
    compress: str = "deflate",
    cog: bool = False,
    blocksize: int = 256,
) -> tiling.OutputSpec:
    """The output of a features run: a GeoTIFF, or a Zarr store when the path ends with .zarr."""
    check_feature_output(out_path, dtype, compress, cog)
    common: dict[str, Any] = dict(
        crs=scene.crs,
        transform=scene.transform,
        width=scene.shape[1],
        height=scene.shape[0],
        count=len(names),
        dtype=dtype,
        descriptions=list(names),
        tags=tags,
        compress=compress,
        blocksize=blocksize,
    )
    if is_zarr_path(out_path):
        path = os.fspath(out_path).rstrip("/")
        return tiling.ZarrOutputSpec(path, variable="features", **common)
    return tiling.OutputSpec(os.fspath(out_path), cog=cog, **common)


@takes_option_groups(TilingOptions, OutputOptions, RenderOptions)
@within_threads
def features_raster(
    scene_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    backbone: Backbone,
    *,
    bands: Sequence[int | str] | None = None,
    band_names: Sequence[str] | None = None,
    pca: int | str | os.PathLike[str] | PCA | None = None,
    method: str = "gsjbu",
    iters: int = 50,
    radius: int = 3,
    tile: int = 512,
    halo: int = 64,
    dtype: str = "float32",
    compress: str = "deflate",
    cog: bool = False,
    blocksize: int = 256,
    aoi: Any = None,
    aoi_crs: Any = None,
    resume: bool = False,
    scheduler: Any = None,
    device: str | None = None,
    seed: int = 0,
    consistency: float | None = None,
    workers: int | None = None,
    progress: Callable[[tiling.Progress], None] | None = None,
    threads: int | None = None,
    save_pca: str | os.PathLike[str] | None = None,
    tiling_options: TilingOptions | None = None,
    output_options: OutputOptions | None = None,
    render_options: RenderOptions | None = None,
) -> tiling.RunReport:
    """Write the backbone's features of the scene, upsampled to full resolution.

    Args:
        scene_path: the image (any bands; ``bands`` chooses, 1-based or by description;
            ``band_names`` names all the file's bands, in file order, where it does not).
        out_path: output on the scene's grid, one band per feature (or PCA component): a
            GeoTIFF, or a Zarr store (variable ``features``) when it ends with ``.zarr``. It
            appears only when complete.
        backbone: from :func:`geoupsample.backbones.create`; it is given the chosen bands.
        pca: reduce to this many components (a PCA on a sample of the whole scene's LR
            features, with an AOI too, so that adjacent AOIs' runs agree), or with a PCA
            saved before (a :class:`~geoupsample.pca.PCA` or its file): one projection for
            several runs and scenes.
        save_pca: write the run's PCA there (JSON; ``pca=`` takes it back).
        method, iters, radius, seed, device: the upsampling (see :func:`geoupsample.upsample`).
        consistency: back-projection rounds of the render (None: the library default).
        tile, halo: tile core and overlap in pixels (rounded to the backbone's patch size).
        dtype: ``float32`` or ``float16`` (half floats: half the size, ~3 significant digits).
        compress: deflate, zstd, lzw (GeoTIFF only) or none.
        cog: write a Cloud-Optimized GeoTIFF (not with a Zarr output).
        blocksize: GeoTIFF block size, or Zarr chunk size along y and x (a multiple of 16).
        aoi, aoi_crs: area of interest (shapely geometry in the scene's CRS unless ``aoi_crs``
            says otherwise, or a GeoJSON file/dict, EPSG:4326 unless it names a CRS): tiles
            outside are skipped, pixels outside are nodata.
        resume: continue an interrupted run with the same inputs and parameters (another
            backbone, weights, PCA or parameter is refused: :class:`tiling.JournalMismatch`).
        scheduler: dask.distributed ``Client`` or scheduler address (default: local threads).
        workers: tiles computed at once by local threads (default 1: torch uses every core inside
            a tile; with more, each tile gets ``cores // workers`` torch threads and its own
            working memory, see :mod:`geoupsample.workers`).
        threads: CPU threads of the run in all (default: the CPUs this process may use, its
            affinity and cgroup quota; see :func:`geoupsample.workers.available_cores`).
        tiling_options, output_options, render_options: these options as groups
            (:mod:`geoupsample.options`; of the render only ``consistency``): a field given
            (not None) counts as the keyword of its name; the keyword given too with another
            value, or a field not taken, is an :class:`~geoupsample.inputs.InputError`.
    """
    check_method_options(method, iters, radius, seed)
    check_workers(workers, scheduler)
    check_device(device, local=scheduler is None)
    checked_overrides(method, consistency=consistency)  # refuse a bad value before any work
    gu.tune_allocator()  # before the run's threads allocate: see geoupsample.core.allocator
    scene = Scene.open(scene_path, bands, band_names=band_names)
    check_output_paths({"-o": out_path}, {"the scene": scene.path})
    check_feature_output(out_path, dtype, compress, cog)
    geom = scene_aoi(aoi, aoi_crs, scene)
    plan = plan_features(
        scene,
        backbone,
        pca=pca,
        method=method,
        iters=iters,
        radius=radius,
        tile=tile,
        device=device,
        seed=seed,
        consistency=consistency,
    )
    if save_pca is not None:
        if plan.job.pca is None:
            raise InputError("--save-pca needs a PCA to save: give --pca K (components)")
        plan.job.pca.save(save_pca)
    spec = feature_output(
        out_path,
        scene,
        plan.names,
        plan.tags,
        dtype=dtype,
        compress=compress,
        cog=cog,
        blocksize=blocksize,
    )
    return run_backbone_job(
        plan.job,
        scene,
        spec,
        backbone,
        tile,
        halo,
        plan.params,
        workers,
        progress,
        aoi=geom,
        resume=resume,
        scheduler=scheduler,
        device=device,
    )


def run_backbone_job(
    job: Any,
    scene: AnyScene,
    spec: tiling.OutputSpec,
    backbone: Backbone,
    tile: int,
    halo: int,
    params: dict[str, Any],
    workers: int | None,
    progress: Callable[[tiling.Progress], None] | None,
    *,
    aoi: BaseGeometry | None = None,
    resume: bool = False,
    scheduler: Any = None,
    device: str | None = None,
) -> tiling.RunReport:
    """Run a per-tile backbone ``job`` over ``scene``, tiles aligned to the backbone's stride.

    ``aoi`` is a geometry in the scene's CRS (:func:`scene_aoi`); ``resume`` and ``scheduler``
    as in :func:`tiling.run`. With ``workers > 1`` local tiles at once, each gets
    ``cores // workers`` torch threads (:func:`geoupsample.workers.threads_per_worker`; ``device``
    is the fits' device: nothing changes on CUDA).
    """
    with threads_per_worker(None if scheduler is not None else workers, device):
        return tiling.run(
            job,
            {"guide": scene.reader()},
            spec,
            tile=tile,
            halo=halo,
            align=backbone.stride,
            aoi=aoi,
            resume=resume,
            params=params,
            scheduler=scheduler,
            workers=workers or 1,
            progress=progress,
        )


def lr_window_grid(
    transform: Affine, window: Window, stride: int
) -> tuple[Affine, tuple[int, int]]:
    """The LR grid (transform, shape) of a scene window at ``stride``."""
    t = window_transform(window, transform) @ Affine.scale(stride)
    return t, (int(window.height) // stride, int(window.width) // stride)
