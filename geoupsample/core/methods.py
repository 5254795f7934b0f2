"""The upsampling methods behind one interface, in a timm-style registry.

Every method maps a low-res raster ``x`` (``[C, h, w]`` or ``[B, C, h, w]``) and a guide
``[d, H, W]`` to ``[C, H, W]`` / ``[B, C, H, W]`` on the guide's grid, with the same conventions:
pixel centres, NaN in ``x`` is missing and never leaks into valid output, and outputs are NaN
where the guide is invalid.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from geoupsample.core import presets
from geoupsample.core.arrays import as_tensor, float_dtype, like_input
from geoupsample.core.consistency import back_project
from geoupsample.core.guide import check_guide, valid_mask
from geoupsample.core.interpolation import interpolate
from geoupsample.core.kernels import (
    check_grid_shift,
    check_lr_shape,
    check_raster,
    check_rounds,
    fit,
)
from geoupsample.core.layout import CellLayout

Method = Callable[..., Any]
_REGISTRY: dict[str, Method] = {}
#: The interpolating methods: no kernels to fit; a guide only gives the output grid and masks
#: nodata.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
#: Keyword arguments of :func:`fit`; baselines accept and ignore them so callers can loop
#: over methods with one set of arguments.
FIT_KWARGS = frozenset(inspect.signature(fit).parameters) - {"guide", "lr_shape"}
#: Keyword arguments every method takes.
COMMON_KWARGS = frozenset(
    {"consistency", "self_guidance", "self_guidance_scale", "min_sigma_r", "kind", "shift"}
)


def register_method(name: str) -> Callable[[Method], Method]:
    """Register an upsampling method under ``name`` (decorator)."""

    def wrap(fn: Method) -> Method:
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_methods() -> tuple[str, ...]:
    """Names accepted by :func:`upsample`'s ``method``."""
    return tuple(_REGISTRY)


def upsample(x: Any, guide: Any, method: str = "gsjbu", keep_missing: bool = False,
             **kwargs: Any) -> Any:
    """Upsample ``x`` onto the grid of ``guide``.

    Args:
        x: ``[C, h, w]`` or ``[B, C, h, w]`` low-res raster, numpy or torch (NaN = missing).
        guide: ``[d, H, W]`` the high-resolution guide (its shape fixes the output grid).
        method: one of :func:`list_methods`: ``nearest``, ``bilinear``, ``bicubic``, ``jbu``,
            ``gsjbu``.
        keep_missing: output NaN on the whole footprint of every missing cell of ``x`` (a
            cloud mask's, say: the pixels whose centre lies in the cell). By default a
            pixel there gets a value wherever the method's support reaches a valid cell
            (nearest: none; bilinear: about half a cell; jbu/gsjbu: up to ``radius`` cells).
        **kwargs: ``consistency``, ``self_guidance``, ``self_guidance_scale``,
            ``min_sigma_r`` and ``kind`` (see :meth:`Kernels.render`: class probabilities get
            label-safe defaults) and the arguments of :func:`geoupsample.fit` (``iters``,
            ``radius``, ``nodata``, ...); the non-guided methods ignore all but
            ``consistency``, ``kind`` (probabilities: ``bicubic``'s overshoot and
            back-projection's are clipped to [0, 1] and renormalised) and ``nodata``. Every
            method takes ``shift=(dy, dx)``: the low-res grid's cells start that many guide
            pixels (``-0.5 < dy, dx <= 0.5``) from the guide pixels' edges (a Landsat L1
            product's 30 m bands on its 15 m pan band: ``(0.5, 0.5)``); the cell centres move
            with it, in the kernels and in the interpolations alike.

    Returns:
        ``[C, H, W]`` / ``[B, C, H, W]``, float32 (float64 for float64 ``x``), same array kind
        as ``x``.
    """
    if method not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(_REGISTRY)}")
    unknown = set(kwargs) - FIT_KWARGS - COMMON_KWARGS
    if unknown:
        raise TypeError(
            f"unexpected argument(s) {', '.join(sorted(unknown))}; upsample takes consistency "
            f"and the keyword arguments of gu.fit: {', '.join(sorted(FIT_KWARGS))}"
        )
    out = _REGISTRY[method](x, guide, **kwargs)
    if keep_missing:
        return without_missing_cells(out, x, kwargs.get("shift", (0.0, 0.0)))
    return out


def without_missing_cells(out: Any, x: Any, shift: tuple[float, float] = (0.0, 0.0)) -> Any:
    """``out`` (``[..., C, H, W]``, an upsampling of ``x [..., C, h, w]`` on a grid shifted by
    ``shift`` guide pixels) with NaN on the footprint of each missing (non-finite) cell of
    ``x``, channel by channel; same array kind as ``x``."""
    xt = as_tensor(x, "x")
    result = as_tensor(out, "out")
    flat = xt.reshape(-1, *xt.shape[-2:]).to(float_dtype(xt))
    missing = ~torch.isfinite(interpolate(flat, tuple(result.shape[-2:]), "nearest", shift))
    return like_input(result.masked_fill(missing.reshape(result.shape).to(result.device),
                                         float("nan")), x)


@register_method("gsjbu")
def _gsjbu(
    x: Any,
    guide: Any,
    consistency: float | None = None,
    self_guidance: float | None = None,
    self_guidance_scale: float | None = None,
    min_sigma_r: float | None = None,
    kind: str = "auto",
    **kwargs: Any,
) -> Any:
    xt = as_tensor(x, "x")
    if xt.ndim not in (3, 4):
        check_raster(xt, (0, 0))
    kernels = fit(guide, tuple(xt.shape[-2:]), **kwargs)
    return kernels.render(
        x,
        consistency=consistency,
        self_guidance=self_guidance,
        self_guidance_scale=self_guidance_scale,
        min_sigma_r=min_sigma_r,
        kind=kind,
    )


@register_method("jbu")
def _jbu(x: Any, guide: Any, **kwargs: Any) -> Any:
    return _gsjbu(x, guide, **{**kwargs, "iters": 0})


def _interpolating(mode: str) -> Method:
    def run(
        x: Any,
        guide: Any,
        nodata: float | None = None,
        consistency: int = 0,
        kind: str = "auto",
        shift: tuple[float, float] = (0.0, 0.0),
        **_: Any,
    ) -> Any:
        g = check_guide(guide)
        shift = check_grid_shift(shift)
        xt = as_tensor(x, "x")
        presets.check_kind(kind)
        lead = check_raster(xt, tuple(xt.shape[-2:]) if xt.ndim in (3, 4) else (0, 0))
        hr_shape = (int(g.shape[1]), int(g.shape[2]))
        lr_shape = check_lr_shape(xt.shape[-2:], hr_shape)
        dtype = float_dtype(xt)
        if kind == "probabilities":
            presets.check_probabilities(xt)
        simplex = presets.resolve(kind, xt)[1].simplex
        if simplex:  # cells of all-zero probabilities hold none: missing
            xt = presets.without_empty_cells(xt.to(dtype))
        flat = xt.reshape(-1, *lr_shape).to(dtype)
        out = interpolate(flat, hr_shape, mode, shift)
        valid = valid_mask(g, nodata).to(out.device)
        if not bool(valid.all()):
            out.masked_fill_(~valid[None], float("nan"))
        if check_rounds(consistency):
            out = back_project(out, flat, CellLayout.build(hr_shape, lr_shape, shift),
                               consistency)  # fmt: skip
        out = out.reshape(*lead, *hr_shape)
        if simplex and (mode == "bicubic" or consistency):  # may leave [0, 1]: back on it
            out = presets.to_simplex(out)
        return like_input(out, x)

    return run


for _mode in ("nearest", "bilinear", "bicubic"):
    register_method(_mode)(_interpolating(_mode))
