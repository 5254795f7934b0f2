"""Fitted GSJBU kernels: :func:`fit` builds them, :meth:`Kernels.render` applies them.

``fit`` solves the test-time optimisation of "Upsample Anything": per-LR-cell anisotropic Gaussian
kernels of a joint bilateral upsampler, fitted with Adam on the L1 error of rebuilding the
(normalised) guide from its own cell means. The fitted kernels then render any raster on the
same LR grid: backbone features, class probabilities, bands, elevation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from geoupsample.core import (
    backend,
    cuda_graph,
    gsjbu,
    lattice_fit,
    numba_gsjbu,
    presets,
    row_render,
)
from geoupsample.core.adam import Adam
from geoupsample.core.arrays import as_tensor, float_dtype, like_input
from geoupsample.core.consistency import back_project
from geoupsample.core.guide import GuideStats, prepare_guide
from geoupsample.core.layout import CellLayout, check_shift
from geoupsample.core.masking import render_with_mask
from geoupsample.core.objective import BilinearStencil, back_projected_l1, detail_l1
from geoupsample.core.self_guidance import self_guided

#: Format version written by :meth:`Kernels.save`.
FORMAT_VERSION = 1
#: Fraction of the guide's pixels in each fit step's loss (:class:`lattice_fit.Sampling`: on the
#: CPU a lattice of cells and up to 16 pixels of each). Measured on the quality benchmark
#: (``benchmarks/quality.py``) against every pixel at every step: within 0.1 dB at x8, a few
#: tenths at x2; the fit costs about as much per output pixel at every scale from x2 to x16.
DEFAULT_SAMPLE = 1 / 16
#: The torch and Triton paths (GPU, float64) sample phases in every cell: at least this many.
MIN_SAMPLED_PHASES = 12
#: Adam's ``eps`` for a loss summed over cells (torch's default), see :func:`adam_eps`.
ADAM_EPS_PER_CELL = 1e-8


def adam_eps(cell_valid: torch.Tensor) -> float:
    """Adam's ``eps`` for the fit's loss, a *mean* over the valid pixels of ``cell_valid [h, w]``.

    A kernel's gradient of that mean shrinks as ``1 / cells`` (its own pixels are a fixed share
    of all): about 2e-7 at 32 x 32 cells, 2e-8 at 128 x 128, below torch's ``eps = 1e-8`` beyond.
    A fixed ``eps`` would then shorten the steps of large tiles (about 0.7 x ``lr`` at 1024 px
    and x8, 0.4 x at 2048 px), so that one scene fitted in tiles of two sizes got two different
    fits. ``eps / cells`` is that ``eps`` for the loss summed over cells: the steps depend on
    the tile's content, not on its size.
    """
    return ADAM_EPS_PER_CELL / max(1, int(cell_valid.sum()))


#: Fit objectives (see :func:`fit`).
OBJECTIVES = ("detail", "plain", "back_projected")


def parse_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; otherwise ``torch.device(device)``, without
    asking whether that device exists here (a cluster's workers may have a GPU the client lacks).

    Raises:
        ValueError: ``device`` names no torch device (e.g. ``"gpu"``).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be 'cpu', 'cuda' or 'cuda:N' (or None: CUDA when available); "
            f"got {device!r}"
        ) from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """:func:`parse_device`, and refuse CUDA where torch sees no CUDA GPU (``ValueError``)."""
    dev = parse_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA GPU; use device='cpu'")
    return dev


def check_fit_options(iters: object, radius: object, seed: object = 0) -> None:
    """Refuse a bad ``iters``, ``radius`` or ``seed`` of :func:`fit` (``ValueError`` naming
    what to pass); whole-scene runs call it before any work."""
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0; got {iters!r}")
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 1:
        raise ValueError(f"radius must be an integer >= 1 (LR pixels); got {radius!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")


def check_lr_shape(lr_shape: object, hr_shape: tuple[int, int]) -> tuple[int, int]:
    """Validate ``lr_shape`` against the guide's ``(H, W)``."""
    try:
        h, w = (int(v) for v in lr_shape)  # type: ignore[union-attr]
        whole = all(float(v) == int(v) for v in lr_shape)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(f"lr_shape must be a pair of ints (h, w); got {lr_shape!r}") from None
    if not whole:
        raise TypeError(f"lr_shape must be whole numbers of cells (h, w); got {lr_shape!r}")
    if h < 1 or w < 1:
        raise ValueError(f"lr_shape must be positive; got {(h, w)}")
    if h > hr_shape[0] or w > hr_shape[1]:
        hint = ""
        if w > hr_shape[1] and hr_shape[1] <= 16:  # (H, W, bands) read as (bands, H, W)
            hint = (f"; a guide {hr_shape[1]} pixels wide: is it channels-last [H, W, bands]? "
                    "pass [bands, H, W], e.g. np.moveaxis(guide, -1, 0)")
        raise ValueError(
            f"the low-res grid {(h, w)} is finer than the guide {hr_shape} along at least one "
            "axis; the guide must have at least as many pixels as the low-res raster "
            f"(h <= H, w <= W){hint}"
        )
    return h, w


@dataclass
class _Prepared:
    """Everything derived from the guide that the fit and the render need (on one device)."""

    layout: CellLayout
    radius: int
    guide_cells: torch.Tensor  # [n, P, d]
    pixel_valid: torch.Tensor  # [n, P]
    gbar: torch.Tensor  # [d, h, w]
    cell_valid: torch.Tensor  # [h, w]

    @classmethod
    def build(
        cls,
        guide: torch.Tensor,
        valid: torch.Tensor,
        lr_shape: tuple[int, int],
        radius: int,
        gbar: torch.Tensor | None = None,
        shift: tuple[float, float] = (0.0, 0.0),
    ):
        """Prepare ``guide [d, H, W]``; ``gbar [d, h, w]`` overrides the cell means if given;
        ``shift``: the LR grid's shift in HR pixels (:mod:`geoupsample.core.layout`)."""
        layout = CellLayout.build(tuple(guide.shape[1:]), lr_shape, shift)
        h, w = lr_shape
        cells = layout.to_cells(guide).reshape(h, w, layout.n_phases, guide.shape[0])
        pvalid = layout.to_cells(valid[None]).reshape(h, w, layout.n_phases)
        pvalid = pvalid & layout.phase_valid.to(valid.device).reshape(h, w, -1)
        if layout.is_shifted:  # the cells' footprints cover their edge pixels in part
            means, cell_valid = layout.area_mean(guide, valid[None].expand_as(guide))
            cell_valid = cell_valid.all(0)
        else:
            means, cell_valid = gsjbu.cell_means(cells, pvalid)
        gbar = means if gbar is None else gbar
        n = h * w
        return cls(
            layout, radius, cells.reshape(n, layout.n_phases, -1), pvalid.reshape(n, -1), gbar,
            cell_valid,
        )  # fmt: skip

    @cached_property
    def phi(self) -> torch.Tensor:
        """``[n, P, F]`` the pixel features of the bilinear form (torch and Triton paths only:
        the Numba kernels compute them in place)."""
        h, w = self.layout.lr_shape
        p = self.layout.n_phases
        cells = self.guide_cells.reshape(h, w, p, -1)
        return gsjbu.build_phi(self.layout, cells, self.pixel_valid.reshape(h, w, p), self.gbar)

    @cached_property
    def cells(self) -> numba_gsjbu.CellTensors:
        """The guide in cell layout as the Numba kernels read it (CPU, float32)."""
        return numba_gsjbu.CellTensors.of(self)

    @cached_property
    def source(self) -> row_render.PsiSource:
        """What ``psi`` is built from, for rendering in bands of rows (:mod:`row_render`); one
        per prepared guide, so that the fit's steps and later renders share its geometries."""
        return row_render.PsiSource(self.gbar, self.cell_valid, self.layout, self.radius)

    def psi(self, params: torch.Tensor, workspace: gsjbu.Workspace | None = None) -> torch.Tensor:
        """``psi`` of ``params`` for every cell (into ``workspace``'s buffer during a fit, else a
        new tensor): the Triton path and the plain objective; the torch path's back-projected
        fit and renders build it band by band instead (:mod:`row_render`)."""
        geometry = None  # the Triton kernel builds its own
        if backend.name(params) != "triton":
            geometry = self.source.geometry((0, self.layout.lr_shape[0]), params.dtype)
        return backend.build_psi(
            params, self.gbar, self.cell_valid, self.layout, self.radius, geometry, workspace
        )


@dataclass(eq=False)
class Kernels:
    """GSJBU kernels fitted to one guide; render any raster on their LR grid.

    Attributes:
        params: ``[4, h, w]`` raw parameters (``log sigma_x``, ``log sigma_y``, ``theta_raw``,
            ``log sigma_r``; see :mod:`geoupsample.core.gsjbu`).
        guide: ``[d, H, W]`` the normalised guide (0 where invalid).
        valid: ``[H, W]`` bool, the guide's valid pixels; outputs are NaN elsewhere.
        radius: neighbourhood radius in LR pixels (``K = (2 radius + 1)^2`` neighbours).
        loss_history: L1 loss before each Adam step of the fit (empty when not fitted).
        shift: ``(dy, dx)`` the LR grid's shift in HR pixels (0: the cells' edges on the guide
            pixels' edges; :mod:`geoupsample.core.layout`).
    """

    params: torch.Tensor
    guide: torch.Tensor
    valid: torch.Tensor
    radius: int
    loss_history: list[float] = field(default_factory=list)
    shift: tuple[float, float] = (0.0, 0.0)

    def __repr__(self) -> str:
        """Shapes and the fit's outcome, not the tensors (a 1024 px guide is millions of
        numbers)."""
        (h, w), (hh, ww) = self.lr_shape, self.hr_shape
        fit = (f"{len(self.loss_history)} steps, L1 {self.loss_history[0]:.4g} -> "
               f"{self.loss_history[-1]:.4g}" if self.loss_history else "not fitted")
        return (f"Kernels(lr_shape=({h}, {w}), hr_shape=({hh}, {ww}), "
                f"guide_bands={int(self.guide.shape[0])}, radius={self.radius}, {fit}, "
                f"device={self.device})")

    # --- geometry -------------------------------------------------------------------------
    @property
    def lr_shape(self) -> tuple[int, int]:
        return (int(self.params.shape[1]), int(self.params.shape[2]))

    @property
    def hr_shape(self) -> tuple[int, int]:
        return (int(self.guide.shape[1]), int(self.guide.shape[2]))

    @property
    def scale(self) -> tuple[float, float]:
        """``(sy, sx)`` HR pixels per LR pixel."""
        return (self.hr_shape[0] / self.lr_shape[0], self.hr_shape[1] / self.lr_shape[1])

    @property
    def device(self) -> torch.device:
        return self.params.device

    @cached_property
    def _prepared(self) -> _Prepared:
        return _Prepared.build(self.guide, self.valid, self.lr_shape, self.radius,
                               shift=self.shift)  # fmt: skip

    @cached_property
    def _psi(self) -> torch.Tensor:
        with torch.no_grad():
            return self._prepared.psi(self.params)

    def sigmas(self) -> dict[str, np.ndarray]:
        """The fitted kernels in physical units, each ``[h, w]`` float64.

        ``sigma_x``, ``sigma_y`` in HR pixels; ``theta`` in radians; ``sigma_r`` in normalised
        guide units.
        """
        p = self.params.detach().double().cpu()
        return {
            "sigma_x": torch.exp(p[0]).numpy(),
            "sigma_y": torch.exp(p[1]).numpy(),
            "theta": (math.pi * torch.tanh(p[2])).numpy(),
            "sigma_r": torch.exp(p[3]).numpy(),
        }

    # --- rendering ------------------------------------------------------------------------
    def render(
        self,
        x: Any,
        consistency: float | None = None,
        self_guidance: float | None = None,
        self_guidance_scale: float | None = None,
        min_sigma_r: float | None = None,
        kind: str = "auto",
    ) -> torch.Tensor | np.ndarray:
        """Render a low-res raster at the guide's resolution with these kernels.

        Args:
            x: ``[C, h, w]`` or ``[B, C, h, w]`` on the kernels' LR grid, numpy or torch, any
                numeric dtype. NaN marks missing values: missing cells take no weight (the
                weights of the others are renormalised) and never leak into the output.
            consistency: rounds of back-projection (:mod:`geoupsample.core.consistency`) that
                make the output average back to ``x`` over each LR cell (Wald's consistency
                property); 0 renders the pure kernels, a convex combination of the neighbours;
                a fraction adds one damped round (0.25: a quarter step).
            self_guidance: weight of ``x`` itself in the range term (0 = off): the range
                distance also compares ``x`` interpolated (bicubic) at the pixel with ``x`` at
                the neighbour (:mod:`geoupsample.core.self_guidance`), so that weight goes to
                neighbours whose values agree with the local trend of ``x``, not only with
                the guide's colour.
            self_guidance_scale: the unit of ``x`` in that term (1 for probabilities); ``None``
                takes the robust span of ``x`` — pass a scene-wide value when tiling.
            min_sigma_r: floor on the fitted range sigmas (normalised guide units) while
                rendering; 0 renders the kernels as fitted.
            kind: ``"continuous"`` (bands, elevation, features), ``"probabilities"`` (class
                probabilities or fractions: ``C >= 2`` channels in ``[0, 1]`` summing to 1) or
                ``"auto"`` (probabilities when ``x`` looks like them). It picks the defaults of
                the four arguments above (:mod:`geoupsample.core.presets`): continuous
                ``consistency=2`` and nothing else; probabilities ``consistency=1``,
                ``self_guidance=1`` at scale 1, ``min_sigma_r=0.3``, and outputs kept on the
                simplex (clipped to [0, 1], renormalised). A cell of probabilities whose
                channels are all 0 holds no prediction (zero padding): it is missing, as NaN.

        Returns:
            ``[C, H, W]`` / ``[B, C, H, W]``, float32 (float64 for float64 input), the same kind
            of array as ``x`` (and, for torch, on ``x``'s device). NaN where the guide is
            invalid or no neighbour of a pixel has a valid value.
        """
        xt = as_tensor(x, "x")
        lead = check_raster(xt, self.lr_shape)
        out_dtype = float_dtype(xt)
        if kind == "probabilities":  # declared, not detected (detection already checked it)
            presets.check_probabilities(xt)
        name, preset = presets.resolve(kind, xt)
        if preset.simplex:  # cells of all-zero probabilities hold none: missing
            xt = presets.without_empty_cells(xt.to(out_dtype))
        rounds = check_rounds(preset.consistency if consistency is None else consistency)
        if self_guidance is None:
            self_guidance = preset.self_guidance
        if self_guidance_scale is None:
            self_guidance_scale = preset.self_guidance_scale
        floor = check_min_sigma_r(preset.min_sigma_r if min_sigma_r is None else min_sigma_r)
        if self_guidance and len(lead) == 2 and lead[0] > 1:
            # the range term looks at x itself: each item of a batch is its own guide
            items = [
                self.render(item, consistency=rounds, self_guidance=self_guidance,
                            self_guidance_scale=self_guidance_scale, min_sigma_r=floor,
                            kind=name)
                for item in xt
            ]  # fmt: skip
            return like_input(torch.stack(items).to(xt.device), x)
        flat = xt.reshape(-1, *self.lr_shape)
        offset = None if preset.simplex else precision_offset(flat, out_dtype, self.params.dtype)
        if offset is not None:  # weighted means and back-projection commute with a shift
            flat = flat.to(offset.dtype) - offset
        flat = flat.to(self.device, self.params.dtype)
        params = self.params
        if floor > 0:
            params = params.clone()
            params[3].clamp_min_(math.log(floor))
        if self_guidance:
            prep = self_guided(self, flat, float(self_guidance), self_guidance_scale)
        else:
            prep = self._prepared
        if backend.name(params) == "numba":
            out = render_with_mask(flat, lambda v: self._render_numba(v, prep, params))
        else:
            psi_rows = self._psi_rows(prep, params, cached=not (self_guidance or floor > 0))
            out = render_with_mask(flat, lambda v: self._render_flat(v, prep, psi_rows))
        if rounds:
            all_finite = bool(torch.isfinite(flat).all()) and bool(self.valid.all())
            out = back_project(out, flat, self._prepared.layout, rounds, all_finite)
        if offset is not None:
            out = out.to(out_dtype) + offset.to(out.device, out_dtype)
        out = out.reshape(*lead, *self.hr_shape)
        if preset.simplex:
            out = presets.to_simplex(out)
        out = out.to(out_dtype)
        if isinstance(x, torch.Tensor):
            out = out.to(x.device)
        return like_input(out, x)

    def _psi_rows(
        self, prep: _Prepared, params: torch.Tensor, cached: bool
    ) -> Callable[[int, int], torch.Tensor]:
        """``(i0, i1) -> psi`` of the cells of LR rows ``[i0, i1)`` for ``params``.

        The torch path builds each band on demand (:mod:`row_render`: memory of one band). The
        Triton path builds ``psi`` for every cell in one kernel and slices it (``cached``: the
        kernels' own ``psi``, kept for the next render).
        """
        if backend.name(params) == "triton":
            if cached:
                psi = self._psi
            else:
                with torch.no_grad():
                    psi = prep.psi(params)
            w = prep.layout.lr_shape[1]
            return lambda i0, i1: psi[i0 * w : i1 * w]
        source = prep.source
        with torch.no_grad():
            coef = source.coefficients(params)
        return lambda i0, i1: source.psi(coef, (i0, i1))

    def _render_flat(
        self, x: torch.Tensor, prep: _Prepared, psi_rows: Callable[[int, int], torch.Tensor]
    ) -> torch.Tensor:
        """``[C, h, w]`` finite values -> ``[C, H, W]``, NaN where the guide is invalid;
        ``psi_rows(i0, i1)`` gives ``psi`` of the cells of LR rows ``[i0, i1)``."""
        render_chunk = backend.render_chunk(prep.phi)  # fused Triton kernel on CUDA, else torch
        w = prep.layout.lr_shape[1]

        def band(i0: int, i1: int, values: torch.Tensor) -> torch.Tensor:
            return render_chunk(prep.phi[i0 * w : i1 * w], psi_rows(i0, i1), values)

        return self._render_bands(x, prep, band)

    def _render_bands(
        self, x: torch.Tensor, prep: _Prepared,
        band_of: Callable[[int, int, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:  # fmt: skip
        """``[C, h, w]`` finite values -> ``[C, H, W]``, NaN where the guide is invalid, band by
        band of LR rows: ``band_of(i0, i1, values)`` renders the cells of rows ``[i0, i1)``
        from their neighbours' ``values [cells, K, C]`` as ``[cells, P, C]``."""
        layout = prep.layout
        h, w = layout.lr_shape
        py, px = layout.rows.n_phase, layout.cols.n_phase
        c = x.shape[0]
        out = torch.empty(c, *self.hr_shape, dtype=x.dtype, device=x.device)
        k = (2 * self.radius + 1) ** 2
        f = gsjbu.N_SPATIAL + 1 + prep.gbar.shape[0]
        rows = gsjbu.rows_per_chunk(layout, max(c, k, f * k // max(1, layout.n_phases)))
        with torch.no_grad():
            for i0 in range(0, h, rows):
                i1 = min(h, i0 + rows)
                values = gsjbu.neighbours(x, self.radius, i0, i1)  # [cells, K, C]
                band = band_of(i0, i1, values)  # [cells, P, C]
                band = band.view(i1 - i0, w, py, px, c).permute(4, 0, 2, 1, 3)
                if layout.is_regular:  # one copy, straight into the output
                    out.view(c, h, py, w, px)[:, i0:i1].copy_(band)
                    continue
                band = band.reshape(c, (i1 - i0) * py, w * px)
                y0, y1, row_select, col_select = layout.row_band(i0, i1)
                if row_select is not None:
                    band = band.index_select(1, row_select.to(band.device))
                if col_select is not None:
                    band = band.index_select(2, col_select.to(band.device))
                out[:, y0:y1] = band
        out.masked_fill_(~self.valid[None], float("nan"))
        return out

    def _render_numba(self, x: torch.Tensor, prep: _Prepared, params: torch.Tensor
                      ) -> torch.Tensor:  # fmt: skip
        """:meth:`_render_flat` on the Numba kernels: fused for a few channels; for more than
        :data:`numba_gsjbu.CHANNELS_LAST`, the kernels give each band's weights and a batched
        matrix product (BLAS) applies them to the channels."""
        coef = numba_gsjbu.coefficients(params.numpy(), int(prep.gbar.shape[0]), prep.radius)
        cells = prep.cells
        if x.shape[0] <= numba_gsjbu.CHANNELS_LAST:
            return numba_gsjbu.render(coef, cells, x)

        def band(i0: int, i1: int, values: torch.Tensor) -> torch.Tensor:
            return torch.bmm(numba_gsjbu.weights(coef, cells, (i0, i1)), values)

        return self._render_bands(x, prep, band)

    # --- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the kernels to ``path`` (a torch file of plain tensors, loadable safely)."""
        torch.save(
            {
                "format": FORMAT_VERSION,
                "params": self.params.detach().cpu(),
                "guide": self.guide.detach().cpu(),
                "valid": self.valid.detach().cpu(),
                "radius": int(self.radius),
                "loss_history": [float(v) for v in self.loss_history],
                "shift": [float(v) for v in self.shift],
            },
            os.fspath(path),
        )

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = "cpu") -> Kernels:
        """Read kernels written by :meth:`save` (with ``weights_only=True``: no code is run)."""
        try:
            state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
            raise ValueError(f"{path} is not a geoupsample kernels file: {err}") from err
        if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a geoupsample kernels file (format {FORMAT_VERSION})")
        missing = {"params", "guide", "valid", "radius", "loss_history"} - set(state)
        if missing:
            absent = ", ".join(sorted(missing))
            raise ValueError(f"{path} is an incomplete kernels file (no {absent}); write it "
                             "again with Kernels.save")
        dev = resolve_device(device)
        return cls(
            params=state["params"].to(dev),
            guide=state["guide"].to(dev),
            valid=state["valid"].to(dev),
            radius=int(state["radius"]),
            loss_history=list(state["loss_history"]),
            shift=tuple(float(v) for v in state.get("shift", (0.0, 0.0))),  # older files: 0
        )


def check_rounds(consistency: object) -> float:
    """Validate a number of back-projection rounds (a number >= 0; a fraction is one damped
    round)."""
    return _non_negative_number(consistency, "consistency")


def precision_offset(
    x: torch.Tensor, out_dtype: torch.dtype, dtype: torch.dtype
) -> torch.Tensor | None:
    """Per-channel mean ``[N, 1, 1]`` (in ``out_dtype``) of ``x [N, h, w]`` to take out before
    rendering in the kernels' ``dtype``, or ``None`` when ``out_dtype`` is no wider than it.

    A float64 output of a raster far from zero (northings, elevations, 4e6 + detail) would keep
    only float32's 7 digits of its magnitude; centred, the render keeps them for its variations.
    """
    if (
        torch.empty((), dtype=out_dtype).element_size()
        <= torch.empty((), dtype=dtype).element_size()
    ):
        return None
    x = x.to(out_dtype)
    finite = torch.isfinite(x)
    count = finite.sum((1, 2), keepdim=True)
    total = torch.where(finite, x, torch.zeros((), dtype=x.dtype)).sum((1, 2), keepdim=True)
    return total / count.clamp_min(1)


def check_min_sigma_r(value: object) -> float:
    """Validate a floor on the range sigmas (a number >= 0)."""
    return _non_negative_number(value, "min_sigma_r")


def render_overrides(
    consistency: object = None, self_guidance: object = None, min_sigma_r: object = None
) -> dict[str, float]:
    """The given :meth:`Kernels.render` overrides, validated (``None`` = the kind's default,
    left out): ``{"consistency": ..., "self_guidance": ..., "min_sigma_r": ...}``."""
    given = {"consistency": consistency, "self_guidance": self_guidance,
             "min_sigma_r": min_sigma_r}  # fmt: skip
    return {k: _non_negative_number(v, k) for k, v in given.items() if v is not None}


def _non_negative_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name} must be a number >= 0; got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0; got {value!r}")
    return float(value)


def check_raster(x: torch.Tensor, lr_shape: tuple[int, int]) -> tuple[int, ...]:
    """Check ``x`` is ``[C, h, w]`` or ``[B, C, h, w]`` on ``lr_shape``; return its leading dims."""
    if x.ndim not in (3, 4):
        raise ValueError(
            f"x must be [C, h, w] or [B, C, h, w]; got shape {tuple(x.shape)}"
            + (" (add a channel axis: x[None])" if x.ndim == 2 else "")
        )
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"x must be real numbers; got {x.dtype}")
    if tuple(x.shape[-2:]) != tuple(lr_shape):
        raise ValueError(
            f"x is on a {tuple(x.shape[-2:])} grid but the kernels were fitted for lr_shape "
            f"{tuple(lr_shape)}; fit with lr_shape=x.shape[-2:]"
        )
    if min(x.shape) == 0:
        raise ValueError(f"x is empty: shape {tuple(x.shape)}")
    return tuple(x.shape[:-2])


def fit(
    guide: Any,
    lr_shape: tuple[int, int],
    iters: int = 50,
    radius: int = 3,
    device: str | torch.device | None = None,
    nodata: float | None = None,
    seed: int = 0,
    normalize: bool | GuideStats | tuple = True,
    lr: float = 0.1,
    sigma_r: float = 0.12,
    sample: float = DEFAULT_SAMPLE,
    objective: str = "detail",
    init: Kernels | Any | None = None,
    shift: tuple[float, float] = (0.0, 0.0),
) -> Kernels:
    """Fit GSJBU kernels so that they rebuild ``guide`` from its own cell means.

    Args:
        guide: ``[d, H, W]`` image, any ``d >= 1``, any numeric dtype, numpy or torch.
        lr_shape: ``(h, w)`` of the low-res grid, ``h <= H``, ``w <= W``; the scale ``H / h``,
            ``W / w`` may be fractional and differ per axis (pixel-centre convention).
        iters: Adam steps (0 gives classic JBU at the initial parameters).
        radius: neighbourhood radius in LR pixels (``(2 radius + 1)^2`` neighbours).
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available).
        nodata: guide value marking missing pixels (NaN always counts as missing). Missing pixels
            are left out of the loss and of the cell means; outputs are NaN there.
        seed: seed of the random choices (phase sampling when ``sample < 1``).
        normalize: ``True`` normalises each band by its 1st/99th percentiles over the valid
            pixels; ``False`` uses the guide as given (expected in about [0, 1]); a
            :class:`GuideStats` (or ``(lo, hi)``) applies given, e.g. scene-wide, statistics.
        lr: Adam learning rate on the raw parameters.
        sigma_r: initial range sigma (normalised guide units).
        sample: fraction of the guide's pixels in each step's loss (``0 < sample <= 1``), drawn
            anew each step. On the CPU, the cells of a lattice (every ``t``-th cell along each
            axis, from an offset that cycles through all positions) and up to 16 pixels of each
            (:class:`geoupsample.core.lattice_fit.Sampling`), so that a step costs about the same
            per pixel at every scale; on the torch and Triton paths, pixels of every cell, at
            least 12 per cell (all if fewer). ``1`` sees every pixel at every step.
        objective: ``"detail"``: L1 error of the guide rebuilt from its cell means, less each
            cell's mean error over its sampled pixels: the cell means are back-projection's to
            fix (``render``'s default for continuous rasters, :mod:`geoupsample.core.consistency`),
            and the kernels are judged on the detail within cells; ``"plain"``: the whole L1
            error of the pure kernels' reconstruction (the paper's); ``"back_projected"``: the
            L1 error after the render's two rounds of back-projection
            (:mod:`geoupsample.core.objective`; torch path only, slow on the CPU).
        init: start from these kernels (:class:`Kernels` on the same LR grid, or their raw
            parameters ``[4, h, w]``) instead of the initial ones: the previous date of a time
            series, whose kernels need only a few steps on the next date's guide
            (:func:`geoupsample.core.series.fit_series`). ``sigma_r`` is then unused.
        shift: ``(dy, dx)`` in guide pixels, ``-0.5 < dy, dx <= 0.5``: the low-res grid's cell
            edges lie that far from the guide pixels' edges (a Landsat L1 product's 30 m bands
            start half a 15 m pan pixel from the pan band's corner: ``(0.5, 0.5)``). The cell
            centres, and so the kernels' distances, move with it; each guide pixel still belongs
            to the cell whose footprint holds its centre (:mod:`geoupsample.core.layout`).

    The CPU fit runs on Numba kernels in float32 (:mod:`geoupsample.core.numba_gsjbu`) for the
    ``detail`` and ``plain`` objectives; ``GEOUPSAMPLE_BACKEND=torch`` takes the torch path,
    which keeps a float64 guide in float64 (:mod:`geoupsample.core.backend`).

    Returns:
        The fitted :class:`Kernels`.
    """
    check_fit_options(iters, radius, seed)
    if not 0.0 < float(sample) <= 1.0:
        raise ValueError(f"sample must be in (0, 1]; got {sample!r}")
    if not sigma_r > 0:
        raise ValueError(f"sigma_r must be > 0; got {sigma_r!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    dev = resolve_device(device)
    g, valid = prepare_guide(guide, nodata, normalize, device=dev)
    path = backend.fit_path(dev, objective)
    if path == "numba":
        g = g.float()
    hr_shape = (int(g.shape[1]), int(g.shape[2]))
    h, w = check_lr_shape(lr_shape, hr_shape)
    shift = check_grid_shift(shift)
    layout = CellLayout.build(hr_shape, (h, w), shift)
    params = gsjbu.initial_params((h, w), layout.scale, sigma_r, g.dtype, dev)
    if init is not None:
        params = _init_params(init, (h, w), g.dtype, dev)
    kernels = Kernels(params=params, guide=g, valid=valid, radius=int(radius), shift=shift)
    if iters == 0:
        return kernels
    prep = kernels._prepared
    eps = adam_eps(prep.cell_valid)
    if path == "numba":
        params, history = lattice_fit.fit_cells(
            prep, params, int(iters), lr, eps, float(sample), objective == "detail", int(seed))
    else:
        params, history = _fit_torch(prep, params, int(iters), lr, eps, float(sample),
                                     objective, int(seed), dev)  # fmt: skip
    if not bool(torch.isfinite(params).all()):
        raise FloatingPointError(
            f"the fit diverged: its kernels are not finite after {iters} steps (loss history "
            f"{history[:3]}...); lower the learning rate (lr={lr!r}; the default is 0.1)"
        )
    kernels = Kernels(params=params.detach(), guide=g, valid=valid, radius=int(radius),
                      loss_history=history, shift=shift)  # fmt: skip
    kernels.__dict__["_prepared"] = prep  # reuse what the fit built
    return kernels


def check_grid_shift(shift: Any) -> tuple[float, float]:
    """``shift`` as ``(dy, dx)`` floats in ``(-0.5, 0.5]`` guide pixels, or a clear error."""
    try:
        dy, dx = (float(v) for v in shift)
    except (TypeError, ValueError):
        raise ValueError(f"shift must be (dy, dx) in guide pixels; got {shift!r}") from None
    return (check_shift(dy), check_shift(dx))


def _init_params(init: Any, lr_shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:  # fmt: skip
    """The raw parameters ``[4, h, w]`` a fit starts from, from ``init`` (kernels or their
    parameters), checked against the grid."""
    params = init.params if isinstance(init, Kernels) else as_tensor(init, "init")
    if tuple(params.shape) != (4, *lr_shape):
        raise ValueError(f"init holds kernels for a {tuple(params.shape[1:])} low-res grid (raw "
                         f"parameters {tuple(params.shape)}); this fit's grid is {lr_shape}: "
                         "start from kernels fitted on the same grid")
    if not bool(torch.isfinite(params).all()):
        raise ValueError("init holds non-finite kernel parameters")
    return params.detach().to(device, dtype).clone()


def _fit_torch(
    prep: _Prepared, params: torch.Tensor, iters: int, lr: float, eps: float, sample: float,
    objective: str, seed: int, dev: torch.device,
) -> tuple[torch.Tensor, list[float]]:  # fmt: skip
    """The fit on the torch and Triton paths (GPU, float64 guides, ``back_projected``):
    pixels of every cell at each step (at least :data:`MIN_SAMPLED_PHASES`)."""
    layout = prep.layout
    radius = prep.radius
    # torch path: psi band by band (row_render), and the neighbours' cell means too if large
    source = prep.source if backend.name(params) != "triton" else None
    if source is not None and objective != "plain":
        values, banded_values = None, row_render.neighbour_values(source, prep.gbar)
    else:
        values = gsjbu.neighbours(prep.gbar, radius)  # [n, K, d]
    n_phases = layout.n_phases
    n_sample = min(n_phases, max(MIN_SAMPLED_PHASES, round(float(sample) * n_phases)))
    generator = torch.Generator().manual_seed(int(seed))
    params = params.clone().requires_grad_(True)
    fit_step = backend.fit_step(prep.phi)  # fused Triton kernel on CUDA, else torch
    fused = stencil = None  # CUDA: the plain objective's Adam steps fused, no sync
    if objective == "plain":
        fused = backend.adam_fit(prep, params, values, lr, eps)
    elif objective == "back_projected":
        stencil = BilinearStencil.build(prep, params.dtype)
    graphed = fused is None and cuda_graph.enabled(dev, int(iters))
    optimizer = Adam(params, lr=lr, eps=eps, steps=int(iters) if graphed else None)
    workspace = gsjbu.Workspace()  # whole-tile psi and its gradient (Triton, plain objective)
    schedule = None  # the sampled phases of every step, drawn up front: one copy to the device
    if n_sample < n_phases:
        draws = [torch.randperm(n_phases, generator=generator)[:n_sample] for _ in range(iters)]
        schedule = torch.stack(draws).to(dev)

    def step_once(phases: torch.Tensor | None) -> torch.Tensor:
        """One Adam step on ``params``; returns the loss before it (no host sync)."""
        if objective != "plain":
            phi = prep.phi if phases is None else prep.phi.index_select(1, phases)
            if source is not None:
                rendered = row_render.render(source, params, banded_values, phi)
            else:
                rendered = gsjbu.render_cells(prep.psi(params, workspace), values, phi, workspace)
            if objective == "detail":
                loss = detail_l1(rendered, prep, phases)
            else:
                loss = back_projected_l1(rendered, prep, phases, stencil=stencil)
            loss.backward()
        else:
            psi = prep.psi(params, workspace)
            loss, grad_psi = fit_step(
                psi.detach(), prep.phi, values, prep.guide_cells, prep.pixel_valid, phases
            )
            psi.backward(grad_psi)
        optimizer.step()
        return loss.detach()

    run_step = cuda_graph.GraphedStep(step_once, dev) if graphed else step_once
    losses: list[torch.Tensor] = []
    for step in range(int(iters)):
        phases = None if schedule is None else schedule[step]
        if fused is not None:
            fused.step(phases)  # no host sync per step
            continue
        losses.append(run_step(phases))
    if fused is not None:
        return fused.params, fused.history()
    return params, torch.stack(losses).double().cpu().tolist()
