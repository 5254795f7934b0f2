"""Segmentation of a scene from labelled polygons, through the tiling engine, by one of two paths.

1. The polygons (any CRS) are checked against the scene and reprojected to it.
2. Training, on the scene windows that the polygons touch. A :class:`LinearProbe` (softmax
   regression, classes balanced by default) is fitted with its weight decay, and on the feature
   path its feature set, chosen by cross-validation over the polygons
   (:mod:`geoupsample.probe_selection`: folds hold out whole labelled regions; the held-out
   accuracy is reported and a poor one warned about).

   - ``path="features"`` (the default for ``spectral``): the samples are the labelled *pixels*.
     Their features are the backbone's LR features brought to every pixel by the kernels fitted
     on the window (``method``, rendered as a continuous quantity), and for ``spectral`` also
     the pixel's own band values and indices
     (:meth:`~geoupsample.backbones.spectral.SpectralBackbone.pixel_features`); the
     cross-validation chooses between the pixel's own features alone and both.
   - ``path="probabilities"`` (the default for timm backbones): the samples are the labelled
     LR *cells*, under the polygons' per-class coverage fractions.
3. Prediction, tile by tile (overlapping tiles aligned to the backbone's patch size).

   - features: the probe is linear and the render of a continuous quantity is linear in it
     (fixed kernel weights, back-projection), so the probe's class scores of the cells are
     upsampled instead of the C features (the same numbers, K channels instead of C), the
     pixel's own features' scores added, and a softmax gives each pixel's probabilities.
   - probabilities: LR class probabilities -> upsampled onto the tile's pixels with GSJBU
     kernels fitted on the tile (or a baseline method), the probabilities' render -> clipped at
     0 and renormalised to sum to 1.

   The engine blends the tiles' probabilities (a weighted mean of distributions is a
   distribution) and writes them.
4. The class raster: band 1 ``class`` (uint8 index into the class list, or the class code
   itself when the class field holds whole numbers 0..254: :func:`class_values`; with a colour
   table),
   band 2 ``confidence`` (the winning probability x 254), both with nodata 255; class names in
   the tags ``class_names`` (JSON list) and ``class_<value>``.

Probabilities are kept (``probs_path``) as uint8 (p x 254, nodata 255) or float32 (NaN nodata);
without ``probs_path`` they go to a hidden float32 file beside the output
(:func:`hidden_probs_path`, a fixed name so that ``resume=True`` can continue it), removed at the
end. The tiles run through :func:`tiling.run` (AOI, resume journal, dask.distributed); the
journal key holds the backbone (its weights' digest), the fitted probe and every parameter.

Measured on polygon-to-map agreement tests (``benchmarks/segment_agreement.py``: a few small
polygons on vegetation/built and water/land, the map compared with the index split they were
drawn from) the feature path of ``spectral`` follows the image's edges where the probability
path gives blobs of cells; see that script's docstring for the figures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
import shapely
import torch
from rasterio.windows import Window

import tiling
from geoupsample import labels as gl
from geoupsample.backbones import Backbone, BackboneError
from geoupsample.backbones.spectral import SpectralBackbone
from geoupsample.caller_warnings import warn_caller
from geoupsample.core.allocator import tune_allocator
from geoupsample.core.methods import INTERPOLATIONS
from geoupsample.featuremaps import (
    FeatureTile,
    TileFeatures,
    array_digest,
    backbone_digest,
    bands_tag,
    lr_window_grid,
    run_backbone_job,
)
from geoupsample.heads import HeadError, LinearProbe
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
from geoupsample.pipeline import params_text
from geoupsample.probe_selection import (
    CrossValidation,
    PoorProbeWarning,
    label_groups,
    select_probe,
)
from geoupsample.render_settings import checked_overrides
from geoupsample.scenes import AnyScene, Scene, scene_aoi, windows
from geoupsample.workers import check_device, check_workers, within_threads
from tiling.writer import to_cog

#: How ``segment`` gets to every pixel's probabilities (see the module docstring).
PATHS = ("features", "probabilities")


def default_path(backbone: Backbone) -> str:
    """``features`` for ``spectral`` (measured: ``benchmarks/segment_agreement.py``), else
    ``probabilities`` (timm backbones: the path measured on Vaihingen; their feature path is
    available, unmeasured with real weights here)."""
    return "features" if isinstance(backbone, SpectralBackbone) else "probabilities"


def check_path(path: str | None, backbone: Backbone) -> str:
    """``path``, or the backbone's default when None; :class:`InputError` for an unknown one."""
    if path is None:
        return default_path(backbone)
    if path not in PATHS:
        raise InputError(f"unknown path {path!r}: use one of {', '.join(PATHS)}")
    return path


#: uint8 encodings: probability/confidence p is stored as round(p * 254); 255 is nodata.
UINT8_SCALE = 254
UINT8_NODATA = 255

#: Colours for class names containing these words (RGB); others come from a qualitative palette.
NAMED_COLOURS = {
    "water": (31, 120, 180),
    "veg": (51, 160, 44),
    "tree": (27, 110, 32),
    "grass": (178, 223, 138),
    "crop": (255, 217, 47),
    "build": (227, 26, 28),
    "roof": (227, 26, 28),
    "road": (120, 120, 120),
    "impervious": (160, 160, 160),
    "bare": (202, 178, 214),
    "soil": (177, 89, 40),
}
_PALETTE = [
    (166, 206, 227), (31, 120, 180), (178, 223, 138), (51, 160, 44), (251, 154, 153),
    (227, 26, 28), (253, 191, 111), (255, 127, 0), (202, 178, 214), (106, 61, 154),
    (255, 255, 153), (177, 89, 40),
]  # fmt: skip


def class_colours(classes: Sequence[str]) -> dict[int, tuple[int, int, int, int]]:
    """A colour table ``{index: (r, g, b, 255)}``.

    By class name where it says (water blue, vegetation green, ...; darker for names containing
    "dark" or for a second class with the same colour), else from a qualitative palette.
    """
    table: dict[int, tuple[int, int, int, int]] = {}
    used: set[tuple[int, int, int]] = set()
    for i, name in enumerate(classes):
        low = name.lower()
        rgb = next((c for k, c in NAMED_COLOURS.items() if k in low), None)
        if rgb is not None and ("dark" in low or rgb in used):
            rgb = (int(rgb[0] * 0.55), int(rgb[1] * 0.55), int(rgb[2] * 0.55))
        if rgb is None or rgb in used:
            rgb = next((c for c in _PALETTE if c not in used), _PALETTE[i % len(_PALETTE)])
        used.add(rgb)
        table[i] = (*rgb, 255)
    return table


@dataclass
class TrainingSet:
    """Features ``[C, n, 1]``, soft labels ``[K, n, 1]`` and labelled-region ids ``[n]`` of the
    labelled samples (cells, or pixels on the feature path), per window."""

    features: list[np.ndarray]
    fractions: list[np.ndarray]
    windows: int
    cells: int
    groups: list[np.ndarray] | None = None
    unit: str = "cells"

    def samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(x [N, C], y [N, K], groups [N])`` of all windows."""
        x = np.concatenate([f[:, :, 0].T for f in self.features])
        y = np.concatenate([f[:, :, 0].T for f in self.fractions])
        g = np.concatenate(self.groups or [np.zeros(len(x), dtype=np.int64)])
        return x, y, g


def training_set(
    scene: AnyScene,
    labels: gl.LabelPolygons,
    features: TileFeatures,
    tile: int = 512,
    supersample: int | None = None,
) -> TrainingSet:
    """Features and coverage fractions of every scene window that the polygons touch.

    ``labels`` must be in the scene's CRS (see :func:`geoupsample.labels.check_scene`).
    """
    s = features.stride
    tree = shapely.STRtree(list(labels.geometries))
    feats, fracs, groups, n_win, n_cells, n_groups = [], [], [], 0, 0, 0
    for win in windows(scene, tile, s):
        t, shape = lr_window_grid(scene.transform, win, s)
        bounds = rasterio.windows.bounds(win, scene.transform)
        if len(tree.query(shapely.box(*bounds))) == 0:
            continue
        frac = gl.rasterize_fractions(labels, t, shape, supersample=supersample or min(s, 16))
        labelled = frac.sum(0) > 0
        if not labelled.any():
            continue
        f = features.of_window(scene, win)
        n_win += 1
        keep = labelled & np.isfinite(f).all(0)
        n_cells += int(keep.sum())
        ids, n = label_groups(np.where(labelled, frac.argmax(0) + 1, 0), n_groups)
        n_groups += n
        # only the labelled cells are kept, as [C, n, 1] "images" (memory ~ labelled area)
        feats.append(f[:, keep][:, :, None])
        fracs.append(frac[:, keep][:, :, None])
        groups.append(ids[keep])
    if n_cells == 0:
        raise InputError("no labelled cell has valid pixels in the scene: nothing to train on")
    return TrainingSet(feats, fracs, n_win, n_cells, groups)


def pixel_training_set(
    scene: AnyScene,
    labels: gl.LabelPolygons,
    job: FeatureSegmentTile,
    tile: int = 512,
) -> TrainingSet:
    """Features at every labelled pixel (:meth:`FeatureSegmentTile.pixel_features`) of every
    scene window that the polygons touch, each window read with a margin of cells around it
    (so the kernels near its edge see neighbours, as inside a tile), with the pixels' one-hot
    labels (by pixel centre) and labelled regions."""
    s = job.features.stride
    pad = -(-32 // s) * s
    tree = shapely.STRtree(list(labels.geometries))
    feats, fracs, groups, n_win, n_px, n_groups = [], [], [], 0, 0, 0
    for win in windows(scene, tile, s):
        bounds = rasterio.windows.bounds(win, scene.transform)
        if len(tree.query(shapely.box(*bounds))) == 0:
            continue
        h, w = int(win.height), int(win.width)
        t = rasterio.windows.transform(win, scene.transform)
        frac = gl.rasterize_fractions(labels, t, (h, w), supersample=1)
        labelled = frac.sum(0) > 0
        if not labelled.any():
            continue
        wide = Window(win.col_off - pad, win.row_off - pad, w + 2 * pad, h + 2 * pad)
        g = scene.read(wide)
        f = job.pixel_features(g)[:, pad:pad + h, pad:pad + w]
        keep = labelled & np.isfinite(f).all(0)
        if not keep.any():
            continue
        n_win += 1
        n_px += int(keep.sum())
        ids, n = label_groups(np.where(labelled, frac.argmax(0) + 1, 0), n_groups)
        n_groups += n
        feats.append(f[:, keep][:, :, None])
        fracs.append(frac[:, keep][:, :, None])
        groups.append(ids[keep])
    if n_px == 0:
        raise InputError("no labelled pixel is valid in the scene: nothing to train on")
    return TrainingSet(feats, fracs, n_win, n_px, groups, unit="pixels")


def probability_render(
    method: str,
    consistency: float | None = None,
    self_guidance: float | None = None,
    min_sigma_r: float | None = None,
) -> dict[str, Any]:
    """``gu.upsample`` arguments for probabilities: the probability preset, unit scale (the same
    in every tile), with the given overrides (validated: :func:`checked_overrides`)."""
    render: dict[str, Any] = {"kind": "probabilities"}
    if method not in INTERPOLATIONS:  # the interpolations have no range term
        render["self_guidance_scale"] = 1.0
    render.update(checked_overrides(method, consistency=consistency,
                                    self_guidance=self_guidance, min_sigma_r=min_sigma_r))
    return render


class SegmentTile(FeatureTile):
    """Per-tile job: LR probabilities from the probe, upsampled and renormalised, scaled."""

    def __init__(self, probe: LinearProbe, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.probe, self.scale = probe, scale

    def __call__(self, ctx: tiling.TileContext) -> np.ndarray | None:
        g = ctx.data["guide"]
        if not np.isfinite(g).all(0).any():
            return None
        probs = self.probe.predict_proba(self.lowres(g))
        hr = self.upsample(probs, g)
        hr = np.clip(hr, 0.0, None)
        total = hr.sum(0, keepdims=True)
        hr = np.where(total > 0, hr / np.where(total > 0, total, 1.0), 1.0 / hr.shape[0])
        # no probability reached the pixel (no valid features near it): nodata, not a class
        hr[:, ~np.isfinite(g).all(0) | np.isnan(total[0])] = np.nan
        return hr * np.float32(self.scale)


class FeatureSegmentTile(FeatureTile):
    """Per-tile job of the feature path: each pixel's class probabilities from its features
    (see the module docstring), scaled.

    The probe's columns are ``layout["pixel"]`` features of the pixel's own (``spectral``'s
    :meth:`~geoupsample.backbones.spectral.SpectralBackbone.pixel_features`), then
    ``layout["cells"]`` cell features rendered at the pixel (``render``: a continuous
    quantity's, linear in the rendered values)."""

    def __init__(self, probe: LinearProbe | None, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.probe, self.scale = probe, scale
        bb = self.features.backbone
        self.n_pixel = (len(bb.pixel_feature_names(bb.in_chans))
                        if isinstance(bb, SpectralBackbone) and bb.in_chans else 0)

    def own(self, guide: np.ndarray) -> np.ndarray | None:
        """The pixel's own features ``[P, H, W]`` (``spectral``), or None."""
        bb = self.features.backbone
        if not isinstance(bb, SpectralBackbone):
            return None
        g = torch.from_numpy(np.ascontiguousarray(guide, dtype=np.float32))
        return bb.pixel_features(g).numpy()

    def pixel_features(self, guide: np.ndarray) -> np.ndarray:
        """Every feature of every pixel of the guide tile ``[d, H, W]``: its own, then the cells'
        rendered at it, ``[P + C, H, W]`` (training; prediction renders class scores)."""
        cells = self.upsample(self.lowres(guide), guide)
        own = self.own(guide)
        if own is not None:
            self.n_pixel = own.shape[0]
        return cells if own is None else np.concatenate([own, cells])

    def logits(self, guide: np.ndarray) -> np.ndarray:
        """Class scores ``[K, H, W]`` (float64) of every pixel of the guide tile."""
        probe = self.probe
        assert probe is not None and probe.weight is not None and probe.bias is not None
        assert probe.mean is not None and probe.std is not None
        a = (probe.weight / probe.std[None]).numpy()  # scores of raw (unstandardised) features
        bias = (probe.bias - (probe.weight * (probe.mean / probe.std)[None]).sum(1)).numpy()
        p = int(probe.layout.get("pixel", 0))
        out = np.broadcast_to(bias[:, None, None], (len(bias), *guide.shape[-2:])).copy()
        if np.any(a[:, p:] != 0):
            lr = self.lowres(guide).astype(np.float64)
            scores = np.einsum("kc,chw->khw", a[:, p:], lr).astype(np.float32)
            out += self.upsample(scores, guide)
        if p:
            own = self.own(guide)
            assert own is not None
            out += np.einsum("kc,chw->khw", a[:, :p], own.astype(np.float64))
        return out

    def __call__(self, ctx: tiling.TileContext) -> np.ndarray | None:
        g = ctx.data["guide"]
        valid = np.isfinite(g).all(0)
        if not valid.any():
            return None
        z = self.logits(g)
        ok = valid & np.isfinite(z).all(0)
        z = np.where(ok, z, 0.0)
        e = np.exp(z - z.max(0, keepdims=True))
        hr = (e / e.sum(0, keepdims=True)).astype(np.float32)
        hr[:, ~ok] = np.nan
        return hr * np.float32(self.scale)


@dataclass
class SegmentReport:
    """What :func:`segment_raster` did."""

    path: str
    probs_path: str | None
    classes: tuple[str, ...]
    class_fractions: dict[str, float]
    train_cells: int
    train_windows: int
    run: tiling.RunReport
    probe: LinearProbe
    prediction_path: str = "probabilities"  # "features" or "probabilities": see PATHS
    cv: CrossValidation | None = None


def load_labels(
    labels: str | os.PathLike[str] | gl.LabelPolygons,
    class_field: str | None,
    scene: AnyScene,
    *,
    labels_crs: str | None = None,
    layer: str | None = None,
) -> gl.LabelPolygons:
    """The polygons (a vector file, a GeoDataFrame or :class:`~geoupsample.labels.LabelPolygons`)
    that overlap the scene, in its CRS; at most :data:`UINT8_SCALE` classes."""
    if isinstance(labels, gl.LabelPolygons):
        polys = labels
    elif gl.is_frame(labels):
        if class_field is None:
            raise InputError("class_field is needed to read labels from a GeoDataFrame")
        polys = gl.from_frame(labels, class_field, crs=labels_crs)
    else:
        if class_field is None:
            raise InputError("class_field is needed to read labels from a file")
        polys = gl.read_polygons(labels, class_field, crs=labels_crs, layer=layer)
    polys = gl.check_scene(polys, scene.transform, scene.shape, scene.crs)
    if len(polys.classes) > UINT8_SCALE:
        raise InputError(f"{len(polys.classes)} classes: at most {UINT8_SCALE} fit a uint8 raster")
    return polys


@dataclass
class SegmentPlan:
    """A fitted probe and the per-tile job predicting with it, with the journal parameters."""

    job: SegmentTile | FeatureSegmentTile
    probe: LinearProbe
    train: TrainingSet
    params: dict[str, Any]
    path: str = "probabilities"
    cv: CrossValidation | None = None


#: Back-projection rounds of the feature path's render by default: none, the pure kernels. The
#: class scores are not a raster whose cell means must be kept, and the rounds' corrections
#: overshoot at class edges: on the Vaihingen crop (``benchmarks/quality_labels.py --regime
#: segment --path features``, mIoU x8 / x16) gsjbu 53.9 / 56.5 without, 44.2 / 53.4 with the
#: continuous default's two rounds (bilinear 48.8 / 56.6).
FEATURE_PATH_CONSISTENCY = 0.0


def feature_render(method: str, consistency: float | None = None,
                   self_guidance: float | None = None, min_sigma_r: float | None = None
                   ) -> dict[str, Any]:
    """``gu.upsample`` arguments of the feature path: features (and class scores, linear in
    them) render as continuous quantities, with :data:`FEATURE_PATH_CONSISTENCY` rounds unless
    ``consistency`` says otherwise; the probabilities' own options are refused."""
    if self_guidance is not None or min_sigma_r is not None:
        raise InputError("self_guidance and min_sigma_r (--self-guidance, --min-sigma-r) set the "
                         "render of probabilities: use them with path probabilities (--path "
                         "probabilities), or leave them out")
    if consistency is None and method not in INTERPOLATIONS:
        consistency = FEATURE_PATH_CONSISTENCY
    return {"kind": "continuous", **checked_overrides(method, consistency=consistency)}


def plan_segment(
    scene: AnyScene,
    labels: gl.LabelPolygons | None,
    backbone: Backbone,
    *,
    probe: LinearProbe | None = None,
    path: str | None = None,
    scale: float = 1.0,
    method: str = "gsjbu",
    iters: int = 50,
    radius: int = 3,
    tile: int = 512,
    weight_decay: float | None = None,
    class_weight: str | None = "balanced",
    device: str | None = None,
    seed: int = 0,
    consistency: float | None = None,
    self_guidance: float | None = None,
    min_sigma_r: float | None = None,
) -> SegmentPlan:
    """Fit the probe on all the polygons (``labels`` in the scene's CRS), or take a fitted
    ``probe`` (``labels`` None), and build the job of ``path`` (None: the backbone's default,
    or the saved probe's path).

    ``scale`` multiplies the probabilities (254 for uint8 outputs, 1 for float32).
    ``weight_decay`` None: chosen by cross-validation (:mod:`geoupsample.probe_selection`).
    """
    check_method_options(method, iters, radius, seed)
    if probe is not None:
        saved = str(probe.layout.get("path", "probabilities"))
        if path is not None and path != saved:
            raise InputError(f"the probe was fitted for path {saved}; apply it with that path "
                             f"(--path {saved}) or fit a new one with --labels")
        path = saved
    path = check_path(path, backbone)
    if class_weight not in (None, "balanced"):
        raise InputError(f"class_weight must be None or 'balanced', got {class_weight!r}")
    stats = scene.guide_stats()
    feats = TileFeatures(backbone, stats)
    common = dict(features=feats, method=method, stats=stats, iters=int(iters), radius=radius,
                  device=device, seed=seed)
    job: SegmentTile | FeatureSegmentTile
    if path == "features":
        job = FeatureSegmentTile(None, scale, render=feature_render(
            method, consistency, self_guidance, min_sigma_r), **common)
    else:
        job = SegmentTile(None, scale,  # type: ignore[arg-type]
                          render=probability_render(method, consistency, self_guidance,
                                                    min_sigma_r), **common)
    cv = None
    if probe is not None:
        train = TrainingSet([], [], 0, 0)  # nothing learnt here
        if probe.cv is not None:
            cv = CrossValidation(**probe.cv)
    else:
        assert labels is not None
        if path == "features":
            assert isinstance(job, FeatureSegmentTile)
            train = pixel_training_set(scene, labels, job, tile=tile)
        else:
            train = training_set(scene, labels, feats, tile=tile)
        x, y, groups = train.samples()
        sets = None
        layout: dict[str, Any] = {"path": path}
        if path == "features":
            p = job.n_pixel if isinstance(job, FeatureSegmentTile) else 0
            layout.update(pixel=p, cells=x.shape[1] - p)
            if p:  # simplest first (see geoupsample.probe_selection)
                n_idx = p - len(scene.bands)  # the pixel's bands, then its indices
                sets = {"pixel": np.arange(p), "pixel+cells": np.arange(x.shape[1])}
                if n_idx:
                    sets = {"pixel indices": np.arange(p - n_idx, p), **sets}
        try:
            probe, cv = select_probe(x, y, groups, labels.classes, class_weight=class_weight,
                                     weight_decay=weight_decay, feature_sets=sets, seed=seed)
        except HeadError as err:
            raise InputError(str(err)) from err
        probe.layout = layout
        probe.cv = _cv_dict(cv)
    job.probe = probe
    from geoupsample import __version__

    params = {
        "kind": "segment",
        "path": path,
        "method": method,
        "iters": int(iters),
        "radius": radius,
        "seed": seed,
        "device": str(device),
        "backbone": backbone.extra_repr(),
        "backbone_digest": backbone_digest(backbone),
        "stats": [stats.lo.tolist(), stats.hi.tolist()],
        "render": job.render,
        "scale": scale,
        "classes": list(probe.classes),
        "layout": probe.layout,
        "probe": probe.weight.numpy().round(8).tolist() if probe.weight is not None else None,
        "probe_digest": array_digest(
            *(np.asarray(v) for v in (probe.weight, probe.bias, probe.mean, probe.std))
        ),
        "version": __version__,
    }
    return SegmentPlan(job, probe, train, params, path, cv)


def _cv_dict(cv: CrossValidation) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cv)


def labels_or_probe(
    labels: Any, class_field: str | None, probe: str | os.PathLike[str] | LinearProbe | None,
    scene: AnyScene, backbone: Backbone, labels_crs: Any = None, layer: str | None = None,
) -> tuple[gl.LabelPolygons | None, LinearProbe | None]:
    """What a segmentation learns from: ``(polygons in the scene's CRS, None)`` to fit a probe,
    or ``(None, probe)`` to apply a saved one (:func:`applied_probe`); exactly one is given."""
    if probe is not None:
        if labels is not None:
            raise InputError("give labelled polygons to train a probe (--labels, "
                             "--class-field) or a saved probe to apply (--probe), not both")
        return None, applied_probe(probe, backbone)
    if labels is None or not class_field:
        raise InputError("segment needs labelled polygons and their class field to train a "
                         "probe (--labels FILE --class-field NAME), or a saved probe (--probe "
                         "FILE, from --save-probe)")
    return load_labels(labels, class_field, scene, labels_crs=labels_crs, layer=layer), None


def applied_probe(probe: str | os.PathLike[str] | LinearProbe, backbone: Backbone
                  ) -> LinearProbe:
    """A fitted probe (or the file it was saved to) checked against the features
    ``backbone`` gives, before any tile runs."""
    if not isinstance(probe, LinearProbe):
        try:
            probe = LinearProbe.load(probe)
        except HeadError as err:
            raise InputError(f"--probe: {err}") from err
    if not probe.fitted:
        raise InputError("the probe is not fitted: fit it, or load the file --save-probe wrote")
    try:
        expected = backbone.num_features
    except BackboneError:  # a spectral backbone without band names: known at the first tile
        return probe
    own = int(probe.layout.get("pixel", 0)) if probe.layout.get("path") == "features" else 0
    fitted = probe.num_features - own  # the cells' features (the pixel's own come first)
    own_here = (len(backbone.pixel_feature_names()) if own and isinstance(
        backbone, SpectralBackbone) else own)
    if fitted == expected and own == own_here:
        return probe
    beside = f" (the cells'; {own} of the pixel's own beside them)" if own else ""
    if (isinstance(backbone, SpectralBackbone) and not backbone.index_pairs
            and fitted > expected):  # a file without band descriptions, likely
        names = ", ".join(backbone.band_names or ()) or "none"
        raise InputError(
            f"the probe was fitted on {fitted} features but the spectral backbone "
            f"gives {expected} here{beside}: it found no red, green or nir band among the "
            f"scene's band names ({names}), so it computes no NDVI or NDWI. Name the scene's "
            "bands, one per band of the file in order (--band-names red,green,blue,nir on the "
            "command line, band_names= in Python), and use the backbone options the probe was "
            "fitted with")
    raise InputError(
        f"the probe was fitted on {fitted} features but the backbone "
        f"({backbone.extra_repr()}) gives {expected}{beside}: use the backbone, layer, bands "
        "and options it was fitted with"
    )


def hidden_probs_path(out_path: str) -> str:
    """Where the probabilities go when they are not kept: a fixed name beside the output (so
    that an interrupted run can be resumed), removed at the end."""
    p = os.path.abspath(out_path)
    return os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.probs.tif")


@takes_option_groups(TilingOptions, OutputOptions, RenderOptions)
@within_threads
def segment_raster(
    scene_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str] | gl.LabelPolygons | Any | None,
    class_field: str | None,
    out_path: str | os.PathLike[str],
    backbone: Backbone,
    *,
    bands: Sequence[int | str] | None = None,
    band_names: Sequence[str] | None = None,
    labels_crs: str | None = None,
    layer: str | None = None,
    probs_path: str | os.PathLike[str] | None = None,
    probs_dtype: str = "uint8",
    method: str = "gsjbu",
    iters: int = 50,
    radius: int = 3,
    tile: int = 512,
    halo: int = 64,
    weight_decay: float | None = None,
    class_weight: str | None = "balanced",
    path: str | None = None,
    probe_path: str | os.PathLike[str] | None = None,
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
    self_guidance: float | None = None,
    min_sigma_r: float | None = None,
    workers: int | None = None,
    threads: int | None = None,
    probe: str | os.PathLike[str] | LinearProbe | None = None,
    progress: Callable[[tiling.Progress], None] | None = None,
    tiling_options: TilingOptions | None = None,
    output_options: OutputOptions | None = None,
    render_options: RenderOptions | None = None,
) -> SegmentReport:
    """Segment a scene from labelled polygons (see the module docstring for the steps), or with
    a probe fitted before (``probe``; ``labels_path`` and ``class_field`` None).

    Args:
        scene_path: the image; ``bands`` chooses its bands (1-based or descriptions);
            ``band_names`` names the file's bands (all of them, in file order) where it does
            not (the CLI's ``--band-names``; recorded in the ``geoupsample_bands`` tag).
        labels_path, class_field, labels_crs, layer: the polygons (any vector file GDAL reads,
            a GeoDataFrame, or :class:`~geoupsample.labels.LabelPolygons`), the attribute
            holding the class, their CRS if the file does not say, the layer (files with
            several).
        out_path: the class raster (2 bands uint8: class, confidence).
        backbone: from :func:`geoupsample.backbones.create` (``spectral`` works offline).
        probs_path, probs_dtype: also keep the probabilities (``uint8`` or ``float32``).
        path: ``features`` (features at every pixel, the probe per pixel) or
            ``probabilities`` (the probe on the cells, its probabilities upsampled); None: the
            backbone's default (:func:`default_path`), or a saved ``probe``'s.
        method, iters, radius, seed, device: the upsampling (of the features' class scores,
            or of the probabilities).
        consistency, self_guidance, min_sigma_r: override the render's defaults for
            probabilities (:mod:`geoupsample.core.presets`: one back-projection round, the
            probabilities themselves in the range term at weight 1, range sigmas floored at
            0.3; measured on Vaihingen in benchmarks/quality_labels.py). ``consistency=0,
            min_sigma_r=0`` renders sharper: it can help on a probe's over-smooth
            probabilities at large scales and loses where the probabilities are right.
        tile, halo: tile core and overlap in pixels (aligned to the backbone's patch size).
        weight_decay, class_weight: the linear probe's (see :class:`LinearProbe`); weight
            decay None (default): chosen by cross-validation over the polygons, which also
            measures the held-out accuracy (:mod:`geoupsample.probe_selection`; tags
            ``probe_cv``, ``probe_accuracy``, ``probe_warning``; a poor one is warned about
            with :class:`~geoupsample.probe_selection.PoorProbeWarning`). Classes balanced by
            default.
        probe_path: save the fitted probe there (safetensors).
        probe: a fitted probe, or the file ``probe_path`` saved it to (on another scene, say),
            applied instead of training one: the backbone must give the features it was
            fitted on (same backbone, layer, bands and options).
        compress, cog, blocksize: GeoTIFF compression, Cloud-Optimized GeoTIFFs (class raster
            and kept probabilities), block size (a multiple of 16).
        aoi, aoi_crs: area of interest (see :func:`geoupsample.featuremaps.features_raster`):
            the probe is trained on all the polygons, the prediction covers only the AOI
            (nodata elsewhere).
        resume: continue an interrupted run (the probabilities' tiles) with the same inputs and
            parameters; another backbone, probe or parameter is refused
            (:class:`tiling.JournalMismatch`).
        scheduler: dask.distributed ``Client`` or scheduler address (default: local threads).
        workers, threads: tiles computed at once, and CPU threads of the run in all (as in
            :func:`geoupsample.pipeline.upsample_raster`).
        tiling_options, output_options, render_options: these options as groups
            (:mod:`geoupsample.options`; every field but ``dtype`` and ``kind``): a field given
            (not None) counts as the keyword of its name; the keyword given too with another
            value, or a field not taken, is an :class:`~geoupsample.inputs.InputError`.
    """
    check_method_options(method, iters, radius, seed)
    check_workers(workers, scheduler)
    check_device(device, local=scheduler is None)
    if check_path(path, backbone) == "features" and probe is None:
        feature_render(method, consistency, self_guidance, min_sigma_r)  # refuse bad ones now
    else:
        probability_render(method, consistency, self_guidance, min_sigma_r)
    tune_allocator()  # before the run's threads allocate: see geoupsample.core.allocator
    if probs_dtype not in ("uint8", "float32"):
        raise InputError(f"probs dtype must be uint8 or float32, got {probs_dtype!r}")
    scene = Scene.open(scene_path, bands, band_names=band_names)
    out_path = os.fspath(out_path)
    check_output_paths({"-o": out_path, "--probs": probs_path, "--save-probe": probe_path},
                       {"the scene": scene.path, "the labels": labels_path,
                        "the probe": probe})  # fmt: skip
    if is_zarr_path(out_path) or (probs_path is not None and is_zarr_path(probs_path)):
        raise InputError("segment writes GeoTIFFs; give .tif paths (Zarr is for features)")
    labels, fitted = labels_or_probe(labels_path, class_field, probe, scene, backbone,
                                     labels_crs=labels_crs, layer=layer)
    geom = scene_aoi(aoi, aoi_crs, scene)

    keep_probs = probs_path is not None
    ppath = os.fspath(probs_path) if keep_probs else hidden_probs_path(out_path)
    pdtype = probs_dtype if keep_probs else "float32"
    scale = float(UINT8_SCALE) if pdtype == "uint8" else 1.0
    plan = plan_segment(
        scene,
        labels,
        backbone,
        probe=fitted,
        path=path,
        scale=scale,
        method=method,
        iters=iters,
        radius=radius,
        tile=tile,
        weight_decay=weight_decay,
        class_weight=class_weight,
        device=device,
        seed=seed,
        consistency=consistency,
        self_guidance=self_guidance,
        min_sigma_r=min_sigma_r,
    )
    if probe_path is not None:
        plan.probe.save(probe_path)
    if plan.cv is not None and labels is not None and plan.cv.warning():
        warn_caller(plan.cv.warning() or "", PoorProbeWarning)  # at the caller's line

    from geoupsample import __version__

    classes = plan.probe.classes
    if labels is not None:
        from_file = not (isinstance(labels_path, gl.LabelPolygons) or gl.is_frame(labels_path))
        labels_name = labels_path if from_file else labels.source
        source = {"labels": os.path.basename(os.fspath(labels_name)),
                  "class_field": str(class_field)}
    else:
        source = {"probe": os.path.basename(os.fspath(probe)) if isinstance(
            probe, (str, os.PathLike)) else "LinearProbe"}
    tags = {
        "geoupsample_version": __version__,
        "geoupsample_method": method,
        "geoupsample_backbone": backbone.extra_repr(),
        "geoupsample_bands": bands_tag(scene.bands, scene.band_names),
        "geoupsample_render": json.dumps(plan.job.render),
        "geoupsample_params": params_text(method, iters, radius, tile, halo, "taper", seed),
        "class_names": json.dumps(list(classes)),
        "geoupsample_path": plan.path,
        **(plan.cv.tags() if plan.cv is not None else {}),
        **source,
    }
    spec = tiling.OutputSpec(
        ppath,
        crs=scene.crs,
        transform=scene.transform,
        width=scene.shape[1],
        height=scene.shape[0],
        count=len(classes),
        dtype=pdtype,
        nodata=UINT8_NODATA if pdtype == "uint8" else None,
        descriptions=list(classes),
        tags={**tags, "probability_scale": str(1.0 / scale)},
        compress=compress,
        blocksize=blocksize,
        cog=cog and keep_probs,
    )
    try:
        run = run_backbone_job(
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
        fractions = write_classes(
            ppath, out_path, classes, scale, tags, compress, cog, blocksize
        )
    finally:
        if not keep_probs and os.path.exists(ppath):
            os.remove(ppath)
    return SegmentReport(
        out_path,
        ppath if keep_probs else None,
        classes,
        fractions,
        plan.train.cells,
        plan.train.windows,
        run,
        plan.probe,
        plan.path,
        plan.cv,
    )


def class_values(classes: Sequence[str]) -> np.ndarray | None:
    """The pixel value of each class in the class raster: the class codes themselves when every
    class is a whole number from 0 to 254 (a numeric class field: ``"3"`` is written as 3),
    else None (classes are written as their index in ``classes``). uint8 ``[K]``."""
    codes = []
    for name in classes:
        text = str(name).strip()
        if not text.isdigit() or str(int(text)) != text or int(text) >= UINT8_NODATA:
            return None
        codes.append(int(text))
    return np.array(codes, dtype=np.uint8)


def class_bands(probs: np.ndarray, scale: float = 1.0,
                values: np.ndarray | None = None) -> np.ndarray:
    """Probabilities ``[K, h, w]`` (times ``scale``; NaN = nodata) -> uint8 ``[2, h, w]``: the
    winning class (its index, or ``values[index]``: :func:`class_values`) and its probability
    x :data:`UINT8_SCALE`, :data:`UINT8_NODATA` where any probability is missing."""
    p = np.asarray(probs, dtype=np.float32)
    valid = np.isfinite(p).all(0)
    safe = np.where(np.isfinite(p), p, -1.0)
    cls = safe.argmax(0)
    if values is not None:
        cls = values[cls]
    conf = np.clip(np.round(safe.max(0) / scale * UINT8_SCALE), 0, UINT8_SCALE)
    cls = np.where(valid, cls, UINT8_NODATA).astype(np.uint8)
    conf = np.where(valid, conf, UINT8_NODATA).astype(np.uint8)
    return np.stack([cls, conf])


def write_classes(
    probs_path: str,
    out_path: str,
    classes: Sequence[str],
    scale: float,
    tags: dict[str, str],
    compress: str = "deflate",
    cog: bool = False,
    blocksize: int = 256,
) -> dict[str, float]:
    """Class + confidence raster from a probabilities raster, block by block, atomically
    (a Cloud-Optimized GeoTIFF with ``cog``).

    Returns the share of valid pixels given to each class.
    """
    tmp = os.path.join(
        os.path.dirname(os.path.abspath(out_path)), f".{os.path.basename(out_path)}.partial.tif"
    )
    cog_tmp = tmp[: -len(".tif")] + ".cog.tif"
    values = class_values(classes)
    pixel = values if values is not None else np.arange(len(classes))  # each class's value
    counts = np.zeros(256, dtype=np.int64)
    with rasterio.open(probs_path) as src:
        profile = dict(
            driver="GTiff",
            width=src.width,
            height=src.height,
            count=2,
            dtype="uint8",
            crs=src.crs,
            transform=src.transform,
            nodata=UINT8_NODATA,
            tiled=True,
            blockxsize=blocksize,
            blockysize=blocksize,
            compress=compress if compress != "none" else None,
            bigtiff="IF_SAFER",
        )
        profile = {k: v for k, v in profile.items() if v is not None}
        try:
            with rasterio.open(tmp, "w", **profile) as dst:
                for _, win in dst.block_windows(1):
                    p = src.read(window=win, masked=True).astype(np.float32).filled(np.nan)
                    out = class_bands(p, scale, values)
                    cls = out[0][out[0] != UINT8_NODATA]
                    counts += np.bincount(cls.ravel(), minlength=256)
                    dst.write(out, window=win)
                colours = class_colours(classes)
                dst.write_colormap(1, {int(pixel[i]): c for i, c in colours.items()})
                dst.set_band_description(1, "class")
                dst.set_band_description(2, "confidence")
                dst.update_tags(
                    **tags,
                    **{f"class_{int(pixel[i])}": c for i, c in enumerate(classes)},
                    confidence_scale=str(1.0 / UINT8_SCALE),
                )
            if cog:
                to_cog(tmp, cog_tmp, blocksize, compress, "uint8")
                os.replace(cog_tmp, out_path)
            else:
                os.replace(tmp, out_path)
        finally:
            for leftover in (tmp, cog_tmp):
                if os.path.exists(leftover):
                    os.remove(leftover)
    total = max(1, int(counts.sum()))
    return {c: float(counts[v]) / total for c, v in zip(classes, pixel, strict=True)}
