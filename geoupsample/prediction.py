"""The user's own segmentation model over a whole scene: class probabilities at full resolution.

Tile by tile through the tiling engine (:func:`predict_raster`, the ``geoupsample predict``
command), each tile ``[d, H, W]`` of the scene's chosen bands goes

1. to the model's grid: averaged over ``model_scale`` x ``model_scale`` pixels (the
   probability path: the model runs on ``model_scale^2`` times fewer pixels), then prepared as
   the model card says (:class:`Preprocessing`: scale and offset to reflectance, per-band mean
   and standard deviation; nodata becomes 0, the model's view of "nothing");
2. through the model (:func:`predict_array`): a model of fixed input size in overlapping
   windows, in batches, their outputs blended with raised-cosine weights over the overlaps; a
   model of any input size in one call on the tile (padded to a multiple of
   ``input_multiple``). Logits become probabilities (softmax; a single channel: sigmoid,
   giving two classes);
3. back to the scene's grid: when the model's output is coarser than the scene (``model_scale``
   > 1, or a model whose output stride is above 1), upsampled with ``method`` (gsjbu by default,
   with the label-safe probability defaults) guided by the tile's full-resolution pixels; NaN
   where the scene is nodata.

The engine blends overlapping tiles (a weighted mean of distributions is a distribution) and
writes the probabilities: uint8 (p x 254, nodata 255) by default, as ``segment --probs`` does,
with the class names in the ``class_names`` tag; ``classes_path`` adds the class raster with a
colour table (:func:`geoupsample.segmentation.write_classes`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
import torch

import geoupsample as gu
import tiling
from geoupsample.core.methods import INTERPOLATIONS
from geoupsample.featuremaps import bands_tag
from geoupsample.inputs import InputError, check_method_options, check_output_paths, is_zarr_path
from geoupsample.options import (
    OutputOptions,
    RenderOptions,
    TilingOptions,
    takes_option_groups,
)
from geoupsample.pipeline import params_text
from geoupsample.scenes import AnyScene, Scene, scene_aoi
from geoupsample.segmentation import (
    UINT8_NODATA,
    UINT8_SCALE,
    probability_render,
    write_classes,
)
from geoupsample.user_model import SegmentationModel, load_model
from geoupsample.workers import (
    available_cores,
    check_device,
    check_workers,
    threads_per_worker,
    within_threads,
)
from tiling.blend import ramp

#: What the model's output is: ``auto`` decides from a sample of the scene (probabilities when
#: every pixel's channels lie in [0, 1] and sum to 1, or a single channel lies in [0, 1]).
OUTPUT_KINDS = ("auto", "logits", "probabilities")
#: Dynamic models get tiles padded to a multiple of this (encoders halve the grid 5 times).
INPUT_MULTIPLE = 32


@dataclass(frozen=True)
class Preprocessing:
    """What the model sees of the bands ``x [C, H, W]``: ``((x * scale + offset) - mean) /
    std`` band by band (``scale`` and ``offset`` turn stored values into physical ones, e.g.
    reflectance; ``mean`` and ``std`` are the model card's normalisation), nodata as 0."""

    scale: tuple[float, ...]
    offset: tuple[float, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.scale)
        for name in ("offset", "mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise InputError(f"--{name} gives {len(v)} value(s) for {n} band(s): give one "
                                 "per band (or one for all, for --offset)")
        if self.std is not None and any(not s > 0 for s in self.std):
            raise InputError(f"--std must be positive for every band; got {list(self.std)}")

    @classmethod
    def of(cls, bands: int, scale: Sequence[float] | float | None = None,
           offset: Sequence[float] | float | None = None, mean: Sequence[float] | None = None,
           std: Sequence[float] | None = None,
           file_packing: tuple[Sequence[float], Sequence[float]] | None = None
           ) -> Preprocessing:  # fmt: skip
        """From options: a scale or offset for all bands or one per band; without them the
        file's own GDAL scales and offsets (``file_packing``), else 1 and 0."""
        def per_band(v: Any, default: Sequence[float], name: str) -> tuple[float, ...]:
            if v is None:
                return tuple(float(t) for t in default)
            vals = [float(v)] if np.isscalar(v) else [float(t) for t in v]
            if len(vals) == 1:
                vals = vals * bands
            if len(vals) != bands:
                raise InputError(f"--{name} gives {len(vals)} values for {bands} bands: give one "
                                 "for all bands or one per band")
            return tuple(vals)

        fs, fo = file_packing if file_packing is not None else ([1.0] * bands, [0.0] * bands)
        return cls(
            per_band(scale, fs, "scale-factor"), per_band(offset, fo, "offset"),
            None if mean is None else per_band(mean, (), "mean"),
            None if std is None else per_band(std, (), "std"),
        )  # fmt: skip

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x [C, H, W]`` (NaN = nodata) -> float32 ``[C, H, W]`` for the model, nodata 0."""
        c = x.shape[0]
        v = x * np.asarray(self.scale, np.float32).reshape(c, 1, 1)
        v += np.asarray(self.offset, np.float32).reshape(c, 1, 1)
        if self.mean is not None:
            v -= np.asarray(self.mean, np.float32).reshape(c, 1, 1)
        if self.std is not None:
            v /= np.asarray(self.std, np.float32).reshape(c, 1, 1)
        return np.where(np.isfinite(v), v, np.float32(0.0)).astype(np.float32, copy=False)

    def as_dict(self) -> dict[str, Any]:
        return {"scale": list(self.scale), "offset": list(self.offset),
                "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std)}  # fmt: skip


def to_probabilities(out: np.ndarray, kind: str) -> np.ndarray:
    """A model's output ``[B, K, h, w]`` as probabilities ``[B, K', h, w]``: softmax of logits
    over the channels, as they are for probabilities (clipped to [0, 1]); a single channel is
    the positive class's (sigmoid of a logit), giving ``K' = 2`` (negative, positive)."""
    if out.shape[1] == 1:
        p = 1.0 / (1.0 + np.exp(-out)) if kind == "logits" else np.clip(out, 0.0, 1.0)
        return np.concatenate([1.0 - p, p], axis=1).astype(np.float32)
    if kind == "logits":
        return torch.softmax(torch.from_numpy(out), dim=1).numpy()
    return np.clip(out, 0.0, 1.0)


def output_kind(out: np.ndarray) -> str:
    """``"probabilities"`` when every pixel of a model's output ``[B, K, h, w]`` looks like
    them (``K = 1``: in [0, 1]; else in [0, 1] and summing to 1 within 1e-3), else
    ``"logits"``."""
    if out.size == 0 or not np.isfinite(out).all():
        return "logits"
    if out.min() < -1e-6 or out.max() > 1 + 1e-6:
        return "logits"
    if out.shape[1] == 1:
        return "probabilities"
    return "probabilities" if float(np.abs(out.sum(1) - 1).max()) <= 1e-3 else "logits"


def window_starts(length: int, size: int, step: int) -> list[int]:
    """Starts of windows of ``size`` along an axis of ``length`` every ``step``, the last one
    ending at ``length`` (one window at 0 when ``length <= size``: it is padded)."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, step))
    return sorted(set(starts + [length - size]))


def window_weights(start: int, size: int, length: int, overlap: int) -> np.ndarray:
    """Blend weights ``[size]`` of a window along one axis: raised-cosine ramps over ``overlap``
    pixels at its ends, none where it meets the axis's ends (no frame of low weight)."""
    w = np.ones(size, np.float64)
    if overlap > 0:
        r = ramp(min(overlap, size))
        if start > 0:
            w[: r.size] = r
        if start + size < length:
            w[size - r.size :] = np.minimum(w[size - r.size :], r[::-1])
    return w


def predict_array(model: Callable[[np.ndarray], np.ndarray], x: np.ndarray, *,
                  stride: int, kind: str, input_size: tuple[int, int] | None = None,
                  overlap: int = 0, batch: int = 8,
                  input_multiple: int = INPUT_MULTIPLE) -> np.ndarray:  # fmt: skip
    """Class probabilities ``[K, H / stride, W / stride]`` of ``x [C, H, W]`` (prepared for the
    model; ``H`` and ``W`` multiples of the model's output ``stride``).

    With ``input_size`` (a model of fixed input size), overlapping windows of that size every
    ``input_size - overlap`` pixels (the last flush with the edge; padded with 0 where ``x`` is
    smaller), ``batch`` per model call, their probabilities blended with raised-cosine weights
    over the overlaps (:func:`window_weights`). Without, one call on ``x`` padded with 0 to a
    multiple of ``input_multiple``. ``kind``: what the model outputs (:data:`OUTPUT_KINDS`,
    not ``auto``)."""
    c, hh, ww = x.shape
    r = int(stride)
    if input_size is None:
        m = max(int(input_multiple), r)
        ph, pw = -hh % m, -ww % m
        xp = np.pad(x, ((0, 0), (0, ph), (0, pw))) if ph or pw else x
        probs = to_probabilities(model(xp[None]), kind)[0]
        return np.ascontiguousarray(probs[:, : hh // r, : ww // r])
    sy, sx = input_size
    ov_y, ov_x = min(overlap, sy - r), min(overlap, sx - r)
    step_y, step_x = max(r, (sy - ov_y) // r * r), max(r, (sx - ov_x) // r * r)
    rows = window_starts(hh, sy, step_y)
    cols = window_starts(ww, sx, step_x)
    jobs = [(y, xx) for y in rows for xx in cols]
    wy_of = {y: window_weights(y // r, sy // r, hh // r, ov_y // r).astype(np.float32)
             for y in rows}  # fmt: skip
    wx_of = {xx: window_weights(xx // r, sx // r, ww // r, ov_x // r).astype(np.float32)
             for xx in cols}  # fmt: skip
    total: np.ndarray | None = None
    weight = np.zeros((hh // r, ww // r), np.float32)
    for b0 in range(0, len(jobs), max(1, batch)):
        chunk = jobs[b0 : b0 + max(1, batch)]
        inp = np.zeros((len(chunk), c, sy, sx), np.float32)
        for i, (y, xx) in enumerate(chunk):
            part = x[:, y : y + sy, xx : xx + sx]
            inp[i, :, : part.shape[1], : part.shape[2]] = part
        probs = to_probabilities(model(inp), kind)
        if total is None:
            total = np.zeros((probs.shape[1], hh // r, ww // r), np.float32)
        for i, (y, xx) in enumerate(chunk):
            oy, ox = y // r, xx // r
            h = min(sy, hh - y) // r
            w = min(sx, ww - xx) // r
            wgt = wy_of[y][:h, None] * wx_of[xx][None, :w]
            total[:, oy : oy + h, ox : ox + w] += probs[i, :, :h, :w] * wgt
            weight[oy : oy + h, ox : ox + w] += wgt
    assert total is not None
    total /= weight
    return total


def cell_means(x: np.ndarray, scale: int) -> np.ndarray:
    """``x [C, H, W]`` (``H``, ``W`` multiples of ``scale``; NaN = nodata) averaged over each
    ``scale`` x ``scale`` cell's valid pixels (NaN where a cell has none)."""
    if scale == 1:
        return x
    c, hh, ww = x.shape
    cells = x.reshape(c, hh // scale, scale, ww // scale, scale)
    valid = np.isfinite(cells)
    total = np.where(valid, cells, 0.0).sum((2, 4), dtype=np.float64)
    count = valid.sum((2, 4))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan).astype(np.float32)


class PredictTile:
    """Per-tile job of :func:`predict_raster` (see the module docstring). Picklable: the model
    travels as its file's bytes."""

    def __init__(self, model: SegmentationModel, pre: Preprocessing, *, kind: str, stride: int,
                 model_scale: int = 1, input_size: tuple[int, int] | None = None,
                 overlap: int = 0, batch: int = 8, input_multiple: int = INPUT_MULTIPLE,
                 method: str = "gsjbu", stats: gu.GuideStats | None = None, iters: int = 50,
                 radius: int = 3, device: str | None = None, seed: int = 0,
                 render: dict[str, Any] | None = None, unit: float = 1.0) -> None:  # fmt: skip
        self.model, self.pre, self.kind, self.stride = model, pre, kind, int(stride)
        self.model_scale, self.input_size, self.overlap = int(model_scale), input_size, overlap
        self.batch, self.input_multiple = int(batch), int(input_multiple)
        self.method, self.stats, self.iters, self.radius = method, stats, iters, radius
        self.device, self.seed, self.unit = device, seed, float(unit)
        self.render = dict(render or {})

    @property
    def align(self) -> int:
        """Guide pixels per model output cell: tiles are multiples of it."""
        return self.model_scale * self.stride

    def lowres(self, guide: np.ndarray) -> np.ndarray:
        """The model's probabilities ``[K, H / align, W / align]`` of a scene tile."""
        x = self.pre.apply(cell_means(guide, self.model_scale))
        return predict_array(self.model, x, stride=self.stride, kind=self.kind,
                             input_size=self.input_size, overlap=self.overlap, batch=self.batch,
                             input_multiple=self.input_multiple)  # fmt: skip

    def upsample(self, probs: np.ndarray, guide: np.ndarray) -> np.ndarray:
        """``probs`` onto the tile's pixels (as they are when the model's output is on them)."""
        if self.align == 1:
            return probs
        if self.method in INTERPOLATIONS:
            out = gu.upsample(probs, guide, method=self.method, **self.render)
        else:
            out = gu.upsample(probs, guide, method=self.method, iters=self.iters,
                              radius=self.radius, device=self.device, seed=self.seed,
                              normalize=self.stats, **self.render)  # fmt: skip
        return np.asarray(out, dtype=np.float32)

    def __call__(self, ctx: tiling.TileContext) -> np.ndarray | None:
        gu.tune_allocator()  # once per process, so on dask.distributed workers too
        g = ctx.data["guide"]
        valid = np.isfinite(g).all(0)
        if not valid.any():
            return None
        out = self.upsample(self.lowres(g), g)
        out = np.array(out, dtype=np.float32)  # a copy: scaled in place
        out[:, ~valid] = np.nan
        out *= np.float32(self.unit)
        return out


@dataclass
class PredictPlan:
    """The per-tile job, the class names and the parameters of a run's journal."""

    job: PredictTile
    classes: tuple[str, ...]
    params: dict[str, Any]
    tags: dict[str, str]


def class_names_for(names: Sequence[str] | None, channels: int) -> tuple[str, ...]:
    """The classes of a model with ``channels`` output channels (a single channel gives two:
    its negative and positive class), named ``names`` or ``class_1..``."""
    k = 2 if channels == 1 else channels
    if names is None:
        if channels == 1:
            return ("negative", "positive")
        return tuple(f"class_{i + 1}" for i in range(k))
    names = [str(n) for n in names]
    if channels == 1 and len(names) == 1:
        return (f"not_{names[0]}", names[0])
    if len(names) != k:
        raise InputError(f"--class-names gives {len(names)} name(s) but the model predicts {k} "
                         "classes" + (" (one output channel: name its positive class, or both "
                                      "classes)" if channels == 1 else ""))
    if len(set(names)) != len(names):
        raise InputError(f"--class-names repeats a name: {names}")
    return tuple(names)


def check_predict_options(model_scale: object, overlap: object, batch: object,
                          input_size: object) -> None:  # fmt: skip
    """Refuse bad numbers before any work (:class:`InputError` naming the option)."""
    if isinstance(model_scale, bool) or not isinstance(model_scale, (int, np.integer)) or (
            model_scale < 1):  # fmt: skip
        raise InputError(f"--model-scale must be a whole number >= 1; got {model_scale!r}")
    if not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise InputError(f"--overlap is a fraction of the model's input size in [0, 1); got "
                         f"{overlap!r}")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise InputError(f"--batch-size must be a whole number >= 1; got {batch!r}")
    if input_size is not None and (not isinstance(input_size, (int, np.integer)) or (
            input_size < 8)):  # fmt: skip
        raise InputError(f"--input-size must be a whole number of pixels >= 8; got {input_size!r}")


def plan_predict(scene: AnyScene, model: SegmentationModel, pre: Preprocessing, *,
                 output: str = "auto", class_names: Sequence[str] | None = None,
                 model_scale: int = 1, input_size: int | None = None, overlap: float = 0.2,
                 batch: int = 8, method: str = "gsjbu", iters: int = 50, radius: int = 3,
                 device: str | None = None, seed: int = 0, unit: float = 1.0,
                 consistency: float | None = None, self_guidance: float | None = None,
                 min_sigma_r: float | None = None) -> PredictPlan:  # fmt: skip
    """Check the model against the scene (it runs once on a sample window: its classes, its
    output stride, and whether it gives logits or probabilities), and build the job."""
    check_predict_options(model_scale, overlap, batch, input_size)
    check_method_options(method, iters, radius, seed)
    if output not in OUTPUT_KINDS:
        raise InputError(f"--output must be one of {', '.join(OUTPUT_KINDS)}; got {output!r}")
    bands = len(scene.bands)
    sig = model.signature
    if sig.input_size is not None and input_size is not None and (
            (input_size, input_size) != sig.input_size):  # fmt: skip
        raise InputError(f"{model.name} takes {sig.input_size[0]}x{sig.input_size[1]} inputs; "
                         f"--input-size {input_size} does not fit it (drop it)")
    size = sig.input_size or ((input_size, input_size) if input_size else None)
    probe_size = size or (2 * INPUT_MULTIPLE, 2 * INPUT_MULTIPLE)
    channels, stride = model.probe(bands, probe_size)
    any_size = size is not None or _takes_any_size(model, bands, stride)
    multiple = stride if any_size else INPUT_MULTIPLE
    if size is not None and (size[0] % stride or size[1] % stride):
        raise InputError(f"--input-size {size[0]} is not a multiple of the model's output "
                         f"stride {stride}")
    sample = _sample_window(scene, model_scale, probe_size)
    if output == "auto":
        batch_in = np.zeros((sig.batch or 1, bands, *probe_size), np.float32)
        batch_in[0] = pre.apply(sample)
        output = output_kind(model(batch_in)[:1])
    classes = class_names_for(class_names, channels)
    overlap_px = int(round(overlap * size[0])) // stride * stride if size else 0
    stats = scene.guide_stats()
    render = probability_render(method, consistency, self_guidance, min_sigma_r)
    job = PredictTile(model, pre, kind=output, stride=stride, model_scale=model_scale,
                      input_size=size, overlap=overlap_px, batch=sig.batch or batch,
                      input_multiple=multiple, method=method, stats=stats, iters=iters,
                      radius=radius, device=device, seed=seed, render=render,
                      unit=unit)  # fmt: skip
    from geoupsample import __version__

    params = {
        "kind": "predict", "model": model.name, "model_digest": model.digest,
        "format": model.format, "output": output, "classes": list(classes),
        "preprocessing": pre.as_dict(), "model_scale": model_scale, "stride": stride,
        "input_size": None if size is None else list(size), "overlap": overlap_px,
        "input_multiple": multiple,
        "batch": job.batch, "method": method, "iters": int(iters), "radius": radius,
        "seed": seed, "device": str(device), "stats": [stats.lo.tolist(), stats.hi.tolist()],
        "render": render, "unit": unit, "version": __version__,
    }  # fmt: skip
    tags = {
        "geoupsample_version": __version__,
        "geoupsample_model": json.dumps({"file": model.name, "format": model.format,
                                         "digest": model.digest, "output": output,
                                         "stride": stride, "input_size": params["input_size"],
                                         "overlap": overlap_px}),
        "geoupsample_preprocessing": json.dumps(pre.as_dict()),
        "geoupsample_model_scale": str(model_scale),
        "geoupsample_method": method if job.align > 1 else "none",
        "geoupsample_render": json.dumps(render if job.align > 1 else {}),
        "class_names": json.dumps(list(classes)),
    }
    return PredictPlan(job, classes, params, tags)


def _takes_any_size(model: SegmentationModel, bands: int, stride: int) -> bool:
    """Whether a model of dynamic input size takes a size that is no multiple of
    :data:`INPUT_MULTIPLE` (then its tiles are not padded: at the scene's edges it pads as it
    does on one whole-array call); an encoder-decoder refuses one, or mismatches its output."""
    size = 2 * INPUT_MULTIPLE + stride
    try:
        out = model(np.zeros((model.signature.batch or 1, bands, size, size), np.float32))
    except Exception:  # noqa: BLE001 - any refusal means no
        return False
    return out.shape[2:] == (size // stride, size // stride)


def _sample_window(scene: AnyScene, model_scale: int, size: tuple[int, int]) -> np.ndarray:
    """The scene's centre window as the model sees it at ``model_scale`` (``[C, *size]``)."""
    from rasterio.windows import Window

    h, w = scene.shape
    sh, sw = size[0] * model_scale, size[1] * model_scale
    win = Window(max(0, (w - sw) // 2), max(0, (h - sh) // 2), sw, sh)
    x = cell_means(scene.read(win), model_scale)
    return x[:, : size[0], : size[1]]


@dataclass
class PredictReport:
    """What :func:`predict_raster` did."""

    path: str
    classes_path: str | None
    classes: tuple[str, ...]
    output: str
    stride: int
    run: tiling.RunReport
    class_fractions: dict[str, float] | None = None


def file_packing(scene: Scene) -> tuple[list[float], list[float]] | None:
    """The GDAL scales and offsets of the scene's chosen bands, or None when all are 1 and 0."""
    with rasterio.open(scene.path) as ds:
        scales = [float(ds.scales[i - 1]) for i in scene.bands]
        offsets = [float(ds.offsets[i - 1]) for i in scene.bands]
    if all(s == 1.0 for s in scales) and all(o == 0.0 for o in offsets):
        return None
    return scales, offsets


@takes_option_groups(TilingOptions, OutputOptions, RenderOptions)
@within_threads(default=available_cores)  # the model session takes torch's thread count
def predict_raster(
    scene_path: str | os.PathLike[str],
    model: str | os.PathLike[str] | SegmentationModel,
    out_path: str | os.PathLike[str],
    *,
    bands: Sequence[int | str] | None = None,
    scale_factor: Sequence[float] | float | None = None,
    offset: Sequence[float] | float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: int | None = None,
    overlap: float = 0.2,
    batch: int = 8,
    output: str = "auto",
    class_names: Sequence[str] | None = None,
    model_scale: int = 1,
    method: str = "gsjbu",
    iters: int = 50,
    radius: int = 3,
    seed: int = 0,
    consistency: float | None = None,
    self_guidance: float | None = None,
    min_sigma_r: float | None = None,
    dtype: str = "uint8",
    classes_path: str | os.PathLike[str] | None = None,
    tile: int = 512,
    halo: int = 64,
    compress: str = "deflate",
    cog: bool = False,
    blocksize: int = 256,
    aoi: Any = None,
    aoi_crs: Any = None,
    resume: bool = False,
    scheduler: Any = None,
    workers: int | None = None,
    device: str | None = None,
    progress: Callable[[tiling.Progress], None] | None = None,
    threads: int | None = None,
    tiling_options: TilingOptions | None = None,
    output_options: OutputOptions | None = None,
    render_options: RenderOptions | None = None,
) -> PredictReport:
    """Class probabilities of the user's model over a scene (see the module docstring).

    Args:
        scene_path: the image; ``bands`` chooses and orders the bands the model takes (1-based
            indexes or descriptions; default all, in the file's order).
        model: an ONNX or TorchScript file (:class:`~geoupsample.user_model.SegmentationModel`).
        scale_factor, offset: stored value x scale + offset gives what the model was trained on
            (reflectance, say): one for all bands or one per band; default the file's own GDAL
            scale and offset of each band (1 and 0 when it has none).
        mean, std: the model card's per-band normalisation, applied after the scaling.
        input_size: the model's input size for a model of any input size to run in windows of
            that size (default: one call per tile); a model of fixed input size says its own.
        overlap: fraction of the input size by which windows overlap (fixed-size models).
        batch: windows per model call (a model exported with batch 1 takes one).
        output: ``logits``, ``probabilities`` or ``auto`` (decided from a sample window).
        class_names: the model's classes, in channel order (default ``class_1``...; a
            single-channel model gives two classes: name its positive class, or both).
        model_scale: run the model on the scene averaged to cells of this many pixels, and
            upsample its probabilities with ``method`` (the probability path: ``model_scale^2``
            times fewer pixels through the model).
        method, iters, radius, seed, consistency, self_guidance, min_sigma_r: the upsampling,
            when the model's output is coarser than the scene (``model_scale`` > 1 or an output
            stride above 1): as in :func:`geoupsample.segmentation.segment_raster`.
        dtype: ``uint8`` (p x 254, nodata 255) or ``float32`` (NaN nodata).
        classes_path: also write the class raster there (class and confidence, with a colour
            table; as ``geoupsample segment`` writes it).
        tile, halo, compress, cog, blocksize, aoi, aoi_crs, resume, scheduler, workers, device:
            as for the other whole-scene commands (tiles aligned to the model's output cells).
        threads: CPU threads of the run in all, the model's included (default: the CPUs this
            process may use; :func:`geoupsample.workers.available_cores`).
        tiling_options, output_options, render_options: these options as groups
            (:mod:`geoupsample.options`; every field but ``kind``): a field given (not None)
            counts as the keyword of its name; the keyword given too with another value, or a
            field not taken, is an :class:`~geoupsample.inputs.InputError`.

    Returns:
        :class:`PredictReport`.
    """
    check_workers(workers, scheduler)
    check_device(device, local=scheduler is None)
    gu.tune_allocator()
    if dtype not in ("uint8", "float32"):
        raise InputError(f"--dtype must be uint8 or float32 for probabilities, got {dtype!r}")
    out_path = os.fspath(out_path)
    model_file = model.name if isinstance(model, SegmentationModel) else model
    check_output_paths({"-o": out_path, "--classes": classes_path},
                       {"the scene": scene_path, "the model": model_file},
                       rasters=("-o", "--classes"))  # fmt: skip
    if is_zarr_path(out_path) or (classes_path is not None and is_zarr_path(classes_path)):
        raise InputError("predict writes GeoTIFFs; give .tif paths")
    scene = Scene.open(scene_path, bands)
    net = load_model(model, device)
    pre = Preprocessing.of(len(scene.bands), scale_factor, offset, mean, std,
                           file_packing(scene))  # fmt: skip
    geom = scene_aoi(aoi, aoi_crs, scene)
    unit = float(UINT8_SCALE) if dtype == "uint8" else 1.0
    plan = plan_predict(scene, net, pre, output=output, class_names=class_names,
                        model_scale=model_scale, input_size=input_size, overlap=overlap,
                        batch=batch, method=method, iters=iters, radius=radius, device=device,
                        seed=seed, unit=unit, consistency=consistency,
                        self_guidance=self_guidance, min_sigma_r=min_sigma_r)  # fmt: skip
    tags = {**plan.tags, "geoupsample_bands": bands_tag(scene.bands, scene.band_names),
            "geoupsample_params": params_text(method, iters, radius, tile, halo, "taper", seed),
            "probability_scale": str(1.0 / unit)}  # fmt: skip
    spec = tiling.OutputSpec(
        out_path, crs=scene.crs, transform=scene.transform, width=scene.shape[1],
        height=scene.shape[0], count=len(plan.classes), dtype=dtype,
        nodata=UINT8_NODATA if dtype == "uint8" else None, descriptions=list(plan.classes),
        tags=tags, compress=compress, blocksize=blocksize, cog=cog,
    )  # fmt: skip
    with threads_per_worker(None if scheduler is not None else workers, device):
        run = tiling.run(plan.job, {"guide": scene.reader()}, spec, tile=tile, halo=halo,
                         align=plan.job.align, aoi=geom, resume=resume, params=plan.params,
                         scheduler=scheduler, workers=workers or 1, progress=progress)
    fractions = None
    if classes_path is not None:
        class_tags = {k: v for k, v in tags.items() if k != "probability_scale"}
        fractions = write_classes(out_path, os.fspath(classes_path), plan.classes, unit,
                                  class_tags, compress, cog, blocksize)  # fmt: skip
    return PredictReport(out_path, None if classes_path is None else os.fspath(classes_path),
                         plan.classes, plan.job.kind, plan.job.stride, run, fractions)

