"""Cell layout: which high-resolution (HR) pixels fall in which low-resolution (LR) cell.

Conventions (DESIGN.md §2): pixel centres. HR pixel ``y`` (a row index) has its centre at ``y``;
LR cell ``i`` has its centre at ``mu_i = (i + 0.5) * sy - 0.5`` in HR pixel units, with
``sy = H / h`` (fractional allowed, and independent per axis). HR pixel ``y`` belongs to the LR cell
whose footprint ``[i * sy, (i + 1) * sy)`` holds its centre ``y + 0.5``:
``i = floor((y + 0.5) / sy)``, computed in exact integer arithmetic.

All HR pixels of one cell share the same neighbour set, so the work is organised per cell: the
pixels of cell ``(i, j)`` are its *phases* ``(py, px)``. With an integer scale every cell has
exactly ``s * s`` phases (this is ``pixel_unshuffle``); with a fractional scale cells have
``floor(s)`` or ``ceil(s)`` phases per axis and the layout pads to the largest count, marking the
padding invalid.

A useful fact: the centre of neighbour ``i + di`` lies exactly ``di * sy`` HR pixels from the
centre of cell ``i``, for every ``i``, so neighbour offsets are constants per offset.

Shifted grids: a low-res grid whose cell edges fall between HR pixel edges (a Landsat L1
product's 30 m bands start half a 15 m pan pixel from the pan band's corner) has a *shift*
``dy`` in HR pixels, ``-0.5 < dy <= 0.5``: cell ``i``'s footprint is ``[dy + i * sy, dy + (i + 1)
* sy)``, its centre ``mu_i = dy + (i + 0.5) * sy - 0.5``, and HR pixel ``y`` belongs to the cell
whose footprint holds its centre, ``floor((y + 0.5 - dy) / sy)`` (the cell whose centre is
nearest; ties to the later cell). Within that range of shifts the ``H = h * sy`` HR pixels still
fall in the ``h`` cells, and at whole-number scales each pixel keeps its cell: only the cell
centres move, so the kernels' and the interpolations' distances do. A cell's *value* on a
shifted grid is the mean over its footprint, which covers the pixels at its edges in part (half
of each at a half-pixel shift): cell means (the guide's, and back-projection's) weigh each pixel
by the part of it the footprint covers (:func:`area_taps`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class AxisLayout:
    """One axis of the layout.

    Attributes:
        n_hr: HR pixel count along the axis.
        n_lr: LR cell count along the axis.
        index: ``[n_lr, n_phase]`` int64, the HR pixel index of each phase of each cell
            (0 where padded).
        valid: ``[n_lr, n_phase]`` bool, False on padding.
        local: ``[n_lr, n_phase]`` float64, HR pixel centre minus the cell centre (HR pixels).
        shift: the LR grid's shift in HR pixels (see the module docstring; 0: the cells' edges
            on the HR pixels' edges).
    """

    n_hr: int
    n_lr: int
    index: torch.Tensor
    valid: torch.Tensor
    local: torch.Tensor
    shift: float = 0.0

    @property
    def scale(self) -> float:
        """HR pixels per LR cell along this axis."""
        return self.n_hr / self.n_lr

    @property
    def n_phase(self) -> int:
        return int(self.index.shape[1])

    @property
    def is_regular(self) -> bool:
        """True when every cell has the same number of phases (integer scale)."""
        return bool(self.valid.all())


def check_shift(shift: float) -> float:
    """``shift`` as a float, refused outside ``(-0.5, 0.5]`` HR pixels (the range in which the
    HR pixels still fall in the LR cells one to one; a whole-pixel part is an offset of the
    arrays, not a shift)."""
    value = float(shift)
    if not -0.5 < value <= 0.5:
        raise ValueError(f"a grid shift of {shift} HR pixels: give it within (-0.5, 0.5] (crop "
                         "the arrays by the whole pixels of a larger offset)")
    return value


def pixel_cells(n_hr: int, n_lr: int, shift: float = 0.0) -> torch.Tensor:
    """``[n_hr]`` int64: the LR cell of each HR pixel along one axis, the one whose footprint
    holds the pixel's centre: ``floor((y + 0.5 - shift) / (n_hr / n_lr))``, in exact integer
    arithmetic without a shift (ties at half-integer scales go to the later cell, as the
    footprint is half-open)."""
    y = torch.arange(n_hr, dtype=torch.int64)
    if shift == 0:
        return ((2 * y + 1) * n_lr) // (2 * n_hr)
    pos = ((y.double() + 0.5 - check_shift(shift)) * n_lr) / n_hr
    # a centre on a footprint's edge to a few ulps belongs to the later cell (exact ties)
    return torch.floor(pos + 1e-9).to(torch.int64).clamp_(0, n_lr - 1)


def area_taps(n_hr: int, n_lr: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [n_lr, T], weight [n_lr, T] float64)``: the HR pixels each LR cell's footprint
    ``[shift + i * s, shift + (i + 1) * s)`` covers along one axis and how much of each (0 to 1;
    ``T = ceil(s) + 1``; pixels beyond the array get weight 0, their index clamped into it)."""
    s = n_hr / n_lr
    start = torch.arange(n_lr, dtype=torch.float64) * s + float(shift)
    first = torch.floor(start).to(torch.int64)
    taps = math.ceil(s) + 1
    pixel = first[:, None] + torch.arange(taps)[None, :]
    lo = torch.maximum(pixel.double(), start[:, None])
    hi = torch.minimum(pixel.double() + 1, start[:, None] + s)
    weight = (hi - lo).clamp_min(0)
    inside = (pixel >= 0) & (pixel < n_hr)
    weight = torch.where(inside, weight, torch.zeros((), dtype=torch.float64))
    return pixel.clamp(0, n_hr - 1), weight


def axis_layout(n_hr: int, n_lr: int, shift: float = 0.0) -> AxisLayout:
    """Build the layout of one axis of ``n_hr`` HR pixels over ``n_lr`` LR cells (n_lr <= n_hr)
    whose grid is shifted by ``shift`` HR pixels (see the module docstring)."""
    cell = pixel_cells(n_hr, n_lr, shift)
    counts = torch.bincount(cell, minlength=n_lr)
    n_phase = int(counts.max())
    first = torch.cumsum(counts, 0) - counts
    phase = torch.arange(n_phase, dtype=torch.int64)
    index = first[:, None] + phase[None, :]
    valid = phase[None, :] < counts[:, None]
    index = torch.where(valid, index, torch.zeros_like(index))
    scale = n_hr / n_lr
    centre = (torch.arange(n_lr, dtype=torch.float64) + 0.5) * scale - 0.5 + float(shift)
    local = torch.where(valid, index.double() - centre[:, None], torch.zeros(()).double())
    return AxisLayout(n_hr=n_hr, n_lr=n_lr, index=index, valid=valid, local=local,
                      shift=float(shift))


@dataclass(frozen=True)
class CellLayout:
    """The 2-D layout of an ``[H, W]`` HR grid over an ``[h, w]`` LR grid.

    Cells are flattened row-major (``n = i * w + j``), phases likewise (``p = py * Px + px``).
    """

    rows: AxisLayout
    cols: AxisLayout

    @classmethod
    def build(cls, hr_shape: tuple[int, int], lr_shape: tuple[int, int],
              shift: tuple[float, float] = (0.0, 0.0)) -> CellLayout:  # fmt: skip
        """The layout of ``hr_shape`` over ``lr_shape`` (rows, cols), the LR grid shifted by
        ``shift`` ``(dy, dx)`` HR pixels (see the module docstring)."""
        return cls(axis_layout(hr_shape[0], lr_shape[0], shift[0]),
                   axis_layout(hr_shape[1], lr_shape[1], shift[1]))  # fmt: skip

    @property
    def hr_shape(self) -> tuple[int, int]:
        return (self.rows.n_hr, self.cols.n_hr)

    @property
    def lr_shape(self) -> tuple[int, int]:
        return (self.rows.n_lr, self.cols.n_lr)

    @property
    def n_cells(self) -> int:
        return self.rows.n_lr * self.cols.n_lr

    @property
    def n_phases(self) -> int:
        return self.rows.n_phase * self.cols.n_phase

    @property
    def scale(self) -> tuple[float, float]:
        """``(sy, sx)``: HR pixels per LR cell along rows and columns."""
        return (self.rows.scale, self.cols.scale)

    @property
    def is_regular(self) -> bool:
        return self.rows.is_regular and self.cols.is_regular

    @property
    def shift(self) -> tuple[float, float]:
        """``(dy, dx)``: the LR grid's shift in HR pixels (0 for grids on the pixel edges)."""
        return (self.rows.shift, self.cols.shift)

    @property
    def is_shifted(self) -> bool:
        return self.rows.shift != 0 or self.cols.shift != 0

    def area_mean(self, image: torch.Tensor, valid: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Mean of ``image [C, H, W]`` over each cell's footprint, each pixel weighted by the
        part of it the footprint covers (:func:`area_taps`) and by ``valid [C, H, W]`` (or
        ``[H, W]``; default: the finite pixels): ``(mean [C, h, w], covered [C, h, w])``, the
        mean 0 where nothing valid is covered."""
        if valid is None:
            valid = torch.isfinite(image)
        m = valid.to(image.dtype).expand_as(image)
        num, den = torch.where(valid, image, torch.zeros((), dtype=image.dtype)), m
        for axis, ax in ((1, self.rows), (2, self.cols)):
            index, weight = area_taps(ax.n_hr, ax.n_lr, ax.shift)
            index = index.to(image.device)
            weight = weight.to(image.device, image.dtype)
            shape = [1, 1, 1]
            shape[axis] = ax.n_lr
            num = sum(num.index_select(axis, index[:, k]) * weight[:, k].reshape(shape)
                      for k in range(index.shape[1]))  # fmt: skip
            den = sum(den.index_select(axis, index[:, k]) * weight[:, k].reshape(shape)
                      for k in range(index.shape[1]))  # fmt: skip
        covered = den > 0
        return num / den.clamp_min(1e-12) * covered, covered

    @cached_property
    def phase_valid(self) -> torch.Tensor:
        """``[h, w, Py, Px]`` bool: True where a phase is a real HR pixel."""
        r, c = self.rows.valid, self.cols.valid
        return r[:, None, :, None] & c[None, :, None, :]

    def indices_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The flattened row and column pixel indices of :attr:`rows` / :attr:`cols` on
        ``device``, copied there once: a fit step that rearranges images on a GPU copies nothing
        from the host (a CUDA graph cannot record a copy from pageable host memory)."""
        cache = self.__dict__.setdefault("_indices_on", {})
        key = str(torch.device(device))
        if key not in cache:
            cache[key] = (self.rows.index.reshape(-1).to(device),
                          self.cols.index.reshape(-1).to(device))  # fmt: skip
        return cache[key]

    def to_cells(self, image: torch.Tensor) -> torch.Tensor:
        """Rearrange an HR image ``[C, H, W]`` into cell layout ``[h, w, Py, Px, C]``.

        Padded phases hold copies of a real pixel; mask them with :attr:`phase_valid`.
        """
        ri, ci = self.indices_on(image.device)
        g = image.index_select(1, ri).index_select(2, ci)
        c = image.shape[0]
        g = g.reshape(c, self.rows.n_lr, self.rows.n_phase, self.cols.n_lr, self.cols.n_phase)
        return g.permute(1, 3, 2, 4, 0)

    def row_band(
        self, i0: int, i1: int
    ) -> tuple[int, int, torch.Tensor | None, torch.Tensor | None]:
        """HR rows covered by LR cell rows ``[i0, i1)`` and the selectors that drop padding.

        Returns ``(y0, y1, row_select, col_select)``: the HR rows ``[y0, y1)``, and the indices
        into the flattened ``(cell row, phase)`` and ``(cell col, phase)`` axes of the padded
        layout that keep real pixels (``None`` when nothing is padded).
        """
        valid_r = self.rows.valid[i0:i1]
        y0 = int(self.rows.index[i0, 0])
        y1 = y0 + int(valid_r.sum())
        row_select = None if bool(valid_r.all()) else valid_r.reshape(-1).nonzero().squeeze(1)
        col_select = (
            None if self.cols.is_regular else self.cols.valid.reshape(-1).nonzero().squeeze(1)
        )
        return y0, y1, row_select, col_select

    def offsets(self, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Neighbour-centre offsets ``(dy, dx)``, each ``[K]`` float64, in HR pixels.

        ``K = (2 radius + 1)^2``; ``k = (di + radius) * (2 radius + 1) + (dj + radius)``, the order
        of :func:`torch.nn.functional.unfold`.
        """
        d = torch.arange(-radius, radius + 1, dtype=torch.float64)
        dy = (d[:, None] * self.rows.scale).expand(-1, d.numel()).reshape(-1)
        dx = (d[None, :] * self.cols.scale).expand(d.numel(), -1).reshape(-1)
        return dy, dx
