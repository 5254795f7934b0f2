"""Fit and render in bands of LR rows, never holding ``psi`` for a whole tile (torch path).

``psi [n, 6 + d, K]`` (:mod:`geoupsample.core.gsjbu`) has ``(6 + d) K`` numbers per LR cell. At
x8 that is small beside the guide (64 pixels per cell), but at x2 a cell covers 4 pixels and
``psi`` is about 2.75 ``[K, H, W]`` tensors: 715 MB for a 1152² tile with 4 bands, as much again
for its gradient and half as much for its geometry (``Gbar(q) - Gbar(n)`` per neighbour). Here
each band of LR rows builds its geometry and ``psi`` from the cells' coefficient maps
``[4, h, w]``, uses them and drops them; the backward rebuilds them (or keeps the band's weights
when all of them fit in :data:`gsjbu.KEEP_WEIGHTS_ELEMENTS`) and adds each band's coefficient
gradients into one ``[4, h, w]`` map. Memory is the budget of one band,
:data:`BAND_ELEMENTS`, whatever the scale. The Triton path builds ``psi`` in registers
and does not come here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from geoupsample.core import gsjbu
from geoupsample.core.layout import CellLayout

#: Rough element budget of one band's ``[cells, 6 + d, K]`` tensors (32 MB in float32; a band's
#: working set is about 2.5 times that). Bands of a quarter of it (``gsjbu.CHUNK_ELEMENTS``) took
#: 1.5x longer for a fit at x2 in a worker thread: four times the (small) parallel regions.
BAND_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class PsiSource:
    """What ``psi`` is built from besides the kernel parameters (fixed for a fit).

    Attributes:
        gbar: ``[d, h, w]`` cell means of the normalised guide.
        cell_valid: ``[h, w]`` bool, False for cells without a valid guide pixel.
        layout: the cell layout of the HR grid.
        radius: neighbourhood radius in LR pixels.
        geometries: the bands' geometries, kept from call to call (a fit's steps) when all of
            them stay within :data:`gsjbu.KEEP_WEIGHTS_ELEMENTS`; rebuilt at each call else.
    """

    gbar: torch.Tensor
    cell_valid: torch.Tensor
    layout: CellLayout
    radius: int
    geometries: dict = field(default_factory=dict, repr=False)

    @property
    def n_neighbours(self) -> int:
        return (2 * self.radius + 1) ** 2

    def coefficients(self, params: torch.Tensor) -> torch.Tensor:
        """``[4, h, w]`` maps ``(a, b, c, R)`` of raw ``params [4, h, w]`` (differentiable)."""
        return torch.stack(gsjbu.kernel_coefficients(params, self.gbar.shape[0]))

    def geometry(self, rows: tuple[int, int], dtype: torch.dtype) -> gsjbu.PsiGeometry:
        """:class:`gsjbu.PsiGeometry` of the cells of LR rows ``rows = (i0, i1)``."""
        geom = self.geometries.get((rows, dtype))
        if geom is None:
            geom = gsjbu.psi_geometry(self.gbar, self.cell_valid, self.layout, self.radius, dtype,
                                      rows)  # fmt: skip
            d, h, w = self.gbar.shape
            if h * w * (d + 2) * self.n_neighbours <= gsjbu.KEEP_WEIGHTS_ELEMENTS:
                self.geometries[(rows, dtype)] = geom
        return geom

    def psi(
        self, coef: torch.Tensor, rows: tuple[int, int], geom: gsjbu.PsiGeometry | None = None
    ) -> torch.Tensor:
        """``psi [cells, 6 + d, K]`` of the cells of LR rows ``rows`` from ``coef [4, h, w]``."""
        return gsjbu.psi_of_coefficients(coef, geom or self.geometry(rows, coef.dtype), rows)

    def bands(self, per_cell: int) -> list[tuple[int, int]]:
        """Bands ``(i0, i1)`` of LR rows whose ``[cells, per_cell]`` tensors stay near
        :data:`BAND_ELEMENTS`."""
        h, w = self.layout.lr_shape
        rows = max(1, BAND_ELEMENTS // max(1, w * per_cell))
        return [(i0, min(h, i0 + rows)) for i0 in range(0, h, rows)]


ValuesOfRows = Callable[[int, int], torch.Tensor]


def neighbour_values(source: PsiSource, maps: torch.Tensor) -> tuple[ValuesOfRows, int]:
    """``(values_of, C)``: ``values_of(i0, i1)`` gives the neighbours of the cells of LR rows
    ``[i0, i1)`` in ``maps [C, h, w]`` as planes ``[C, cells, K]``. Gathered once for all cells
    when that stays within :data:`gsjbu.KEEP_WEIGHTS_ELEMENTS`, else band by band at every call
    (call this once per fit, not per step)."""
    c, h, w = maps.shape
    k = source.n_neighbours

    def gather(i0: int, i1: int) -> torch.Tensor:
        out = torch.empty(c, (i1 - i0) * w, k, dtype=maps.dtype, device=maps.device)
        return gsjbu.neighbour_planes(maps, source.radius, out, (i0, i1))

    if h * w * k * c <= gsjbu.KEEP_WEIGHTS_ELEMENTS:
        gathered = gather(0, h)
        return (lambda i0, i1: gathered[:, i0 * w : i1 * w]), c
    return gather, c


class RenderRows(torch.autograd.Function):
    """``out [n, P, C] = softmax_K(phi @ psi(coef)) @ values``, band by band of LR rows, with
    each band's neighbour values from ``values_of`` (:func:`neighbour_values`).

    Differentiable in ``coef [4, h, w]``; the values and ``phi [n, P, F]`` are constants.
    """

    @staticmethod
    def forward(ctx, coef, phi, source, values_of, channels):  # type: ignore[override]
        n, p, f = phi.shape
        k, c = source.n_neighbours, channels
        w = source.layout.lr_shape[1]
        bands = source.bands(max(p, f) * k)
        out = torch.empty(n, p, c, dtype=phi.dtype, device=phi.device)
        d = f - gsjbu.N_SPATIAL - 1
        # the weights, and the geometries (then kept by the source: the same budget), for backward
        keep = ctx.needs_input_grad[0] and n * (p + d + 2) * k <= gsjbu.KEEP_WEIGHTS_ELEMENTS
        kept = []
        for i0, i1 in bands:
            s, e = i0 * w, i1 * w
            weights = gsjbu.chunk_weights(phi[s:e], source.psi(coef, (i0, i1)))
            torch.bmm(weights, values_of(i0, i1).permute(1, 2, 0), out=out[s:e])  # strided
            if keep:
                kept.append(weights)
        ctx.source, ctx.bands, ctx.kept, ctx.values_of = source, bands, kept, values_of
        ctx.save_for_backward(coef, phi, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        coef, phi, out = ctx.saved_tensors
        source, kept = ctx.source, ctx.kept
        ctx.kept = []
        h, w = source.layout.lr_shape
        r = source.radius
        grad_coef = torch.zeros(4, h + 2 * r, w + 2 * r, dtype=coef.dtype, device=coef.device)
        for i, (i0, i1) in enumerate(ctx.bands):
            s, e = i0 * w, i1 * w
            geom = source.geometry((i0, i1), coef.dtype)
            weights = kept[i] if kept else gsjbu.chunk_weights(
                phi[s:e], source.psi(coef, (i0, i1), geom))  # fmt: skip
            values_t = ctx.values_of(i0, i1).transpose(0, 1)  # [cells, C, K], strided
            grad_psi = gsjbu.psi_grad(phi[s:e], weights, grad_out[s:e], values_t, out[s:e])
            planes = torch.empty(4, *geom.bias.shape, dtype=coef.dtype, device=coef.device)
            gsjbu.add_gathered(gsjbu.psi_planes_grad(grad_psi, geom, planes), grad_coef, r, i0)
        return grad_coef[:, r : r + h, r : r + w], None, None, None, None


def render(
    source: PsiSource,
    params: torch.Tensor,
    values: tuple[ValuesOfRows, int],
    phi: torch.Tensor,
) -> torch.Tensor:
    """``[n, P, C]`` rendering of the maps of ``values`` (:func:`neighbour_values`) at the pixels
    ``phi [n, P, F]`` with the kernels of ``params [4, h, w]`` (differentiable in ``params``), in
    bands of LR rows."""
    values_of, channels = values
    return RenderRows.apply(source.coefficients(params), phi, source, values_of, channels)
