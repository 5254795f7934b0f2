"""Plain (unguided) interpolation of a low-res raster onto a finer grid, NaN-aware.

Pixel-centre convention throughout (``align_corners=False``), no antialiasing: the output pixel
``(i, j)`` of an ``[H, W]`` grid over an ``[h, w]`` raster sits at cell coordinates
``((i + 0.5) h / H - 0.5, (j + 0.5) w / W - 0.5)``; on a grid shifted by ``(dy, dx)`` HR pixels
(:mod:`geoupsample.core.layout`), at ``((i + 0.5 - dy) h / H - 0.5, (j + 0.5 - dx) w / W -
0.5)``: the bilinear and bicubic formulas evaluated at the HR pixel centres, borders handled as
PyTorch does (bilinear: coordinates below 0 clamped to 0 and the upper neighbour to the last
cell; bicubic: every tap clamped into the raster).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from geoupsample.core.layout import pixel_cells
from geoupsample.core.masking import render_with_mask


def interpolate(x: torch.Tensor, hr_shape: tuple[int, int], mode: str,
                shift: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:  # fmt: skip
    """Plain interpolation of ``x [C, h, w]`` to ``hr_shape`` (pixel centres, no antialiasing),
    the LR grid shifted by ``shift`` HR pixels (module docstring).

    NaN cells are missing: ``nearest`` keeps them NaN; ``bilinear`` renormalises over the valid
    cells of its 2 x 2 support; ``bicubic`` interpolates the raster with missing cells filled
    from their valid neighbours and is NaN where bilinear has no valid cell.
    """
    if mode == "nearest":  # the cell whose footprint holds the pixel centre, as everywhere
        rows = pixel_cells(hr_shape[0], x.shape[-2], shift[0]).to(x.device)
        cols = pixel_cells(hr_shape[1], x.shape[-1], shift[1]).to(x.device)
        return x.index_select(-2, rows).index_select(-1, cols)
    if mode == "bilinear":
        return render_with_mask(x, lambda v: resize(v, hr_shape, "bilinear", shift))
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return resize(x, hr_shape, "bicubic", shift)
    support = render_with_mask(x, lambda v: resize(v, hr_shape, "bilinear", shift))
    out = resize(fill_missing(x), hr_shape, "bicubic", shift)
    return torch.where(torch.isnan(support), support, out)


#: ATen's resize operators that write into a given tensor, by mode.
_RESIZE_OUT = {"bilinear": "upsample_bilinear2d", "bicubic": "upsample_bicubic2d"}
#: Outputs of at least this many bytes are allocated by numpy (see :func:`resize`).
NUMPY_ALLOCATED_BYTES = 4 << 20


def resize(x: torch.Tensor, size: tuple[int, int], mode: str,
           shift: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:  # fmt: skip
    """``x [C, h, w]`` resized to ``size`` by ``mode`` (pixel centres, no antialiasing; the LR
    grid shifted by ``shift`` HR pixels: :func:`shifted_resize`).

    A large CPU output is allocated by numpy and filled in place: numpy asks the kernel for
    huge pages on large blocks, where torch's allocator maps blocks above glibc's largest mmap
    threshold (32 MB, a 1040 x 1040 tile of 8 bands is 34.6 MB) afresh at every call and faults
    them in 4 kB page by page. Measured on an 8-band 1040 x 1040 bilinear tile, one thread:
    22 ms against 40 ms; the values are the same, bit for bit.
    """
    if shift[0] or shift[1]:
        return shifted_resize(x, size, mode, shift)
    out_bytes = x.shape[0] * size[0] * size[1] * x.element_size()
    op = _RESIZE_OUT.get(mode)
    if (x.device.type != "cpu" or op is None or out_bytes < NUMPY_ALLOCATED_BYTES
            or x.requires_grad):  # (out= has no autograd)
        return F.interpolate(x[None], size=size, mode=mode, align_corners=False)[0]
    dtype = np.dtype(str(x.dtype).removeprefix("torch."))
    out = torch.from_numpy(np.empty((1, x.shape[0], *size), dtype))
    getattr(torch.ops.aten, op).out(x[None], list(size), False, None, None, out=out)
    return out[0]


#: PyTorch's bicubic convolution coefficient (``upsample_bicubic2d``).
CUBIC_A = -0.75


def axis_taps(n_hr: int, n_lr: int, shift: float, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [n_hr, T], weight [n_hr, T] float64)``: the LR cells and weights of each HR pixel
    along one axis (``T`` = 2 for bilinear, 4 for bicubic), at the pixel's centre in cell
    coordinates ``(y + 0.5 - shift) n_lr / n_hr - 0.5``, borders as PyTorch handles them."""
    u = (torch.arange(n_hr, dtype=torch.float64) + 0.5 - shift) * (n_lr / n_hr) - 0.5
    if mode == "bilinear":
        u = u.clamp_min(0)
        i0 = torch.floor(u)
        t = u - i0
        i0 = i0.to(torch.int64).clamp_(max=n_lr - 1)
        index = torch.stack([i0, (i0 + 1).clamp_(max=n_lr - 1)], 1)
        return index, torch.stack([1 - t, t], 1)
    if mode != "bicubic":
        raise ValueError(f"no shifted resize for mode {mode!r}")
    i0 = torch.floor(u)
    t = u - i0
    a = CUBIC_A
    near = [1 + t, t, 1 - t, 2 - t]  # distances to the taps i0 - 1 .. i0 + 2
    weight = torch.stack([((a * d - 5 * a) * d + 8 * a) * d - 4 * a if k in (0, 3)
                          else ((a + 2) * d - (a + 3)) * d * d + 1
                          for k, d in enumerate(near)], 1)  # fmt: skip
    index = (i0.to(torch.int64)[:, None] + torch.arange(-1, 3)[None, :]).clamp_(0, n_lr - 1)
    return index, weight


def shifted_resize(x: torch.Tensor, size: tuple[int, int], mode: str,
                   shift: tuple[float, float]) -> torch.Tensor:  # fmt: skip
    """:func:`resize` onto an HR grid from an LR grid shifted by ``shift`` HR pixels: the
    separable bilinear or bicubic taps (:func:`axis_taps`) applied along rows, then columns."""
    out = x
    for axis, (n_hr, s) in enumerate(zip(size, shift, strict=True)):
        dim = out.ndim - 2 + axis
        index, weight = axis_taps(n_hr, out.shape[dim], float(s), mode)
        index, weight = index.to(out.device), weight.to(out.device, out.dtype)
        shape = [1] * out.ndim
        shape[dim] = n_hr
        acc = None
        for k in range(index.shape[1]):
            term = out.index_select(dim, index[:, k]) * weight[:, k].reshape(shape)
            acc = term if acc is None else acc + term
        out = acc
    return out


def fill_missing(x: torch.Tensor, rounds: int = 4) -> torch.Tensor:
    """Fill non-finite cells of ``x [C, h, w]`` with the mean of their valid 3 x 3 neighbours,
    repeated ``rounds`` times; what is still missing becomes 0."""
    finite = torch.isfinite(x)
    v = torch.where(finite, x, torch.zeros((), dtype=x.dtype))
    m = finite.to(x.dtype)
    for _ in range(rounds):
        num = F.avg_pool2d(v[None], 3, 1, 1, count_include_pad=False)[0]
        den = F.avg_pool2d(m[None], 3, 1, 1, count_include_pad=False)[0]
        grow = (m == 0) & (den > 0)
        v = torch.where(grow, num / den.clamp_min(1e-12), v)
        m = torch.where(grow, torch.ones_like(m), m)
    return v
